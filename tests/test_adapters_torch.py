"""attention_ref.adapters.torch: mask polarity, weights, the option mapping, and the runners.

* The NumPy converters round-trip and keep their polarity (hand-written expected values); they run
  without torch.
* ``params_from_torch`` / ``params_to_torch`` round-trip through a real ``nn.MultiheadAttention``
  (packed ``in_proj_weight`` and separate ``q/k/v_proj_weight``, with and without biases) and
  refuse what the module cannot hold.
* ``run_torch_sdpa`` and ``run_torch_mha`` agree with the reference in float64, forward and every
  gradient for a random cotangent, on shapes with T != S, B > 1, H > 1, GQA and Dk != Dv, for every
  mapping (``is_causal``, ``causal_lower_right``, boolean and float ``attn_mask``,
  ``key_padding_mask``, windows, fully masked rows).
* A wrong mapping (the other polarity, the other causal alignment) is caught by the same check.
* The module imports, and its NumPy converters work, without torch.

The tests that need torch skip without it, and fail when ``ATTENTION_REF_REQUIRE_TORCH=1``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_torch

from attention_ref import (
    causal_mask,
    init_params,
    multi_head_attention,
    multi_head_attention_backward,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
)
from attention_ref.adapters import UnsupportedOption
from attention_ref.adapters.torch import (
    TORCH_MHA_EMPTY_ROWS,
    TORCH_SDPA_EMPTY_ROWS,
    additive_mask_from_mask,
    ignore_mask_from_mask,
    key_padding_mask_from_mask,
    mask_and_bias_from_additive_mask,
    mask_from_ignore_mask,
    mask_from_key_padding_mask,
    param_grads_from_torch,
    params_from_torch,
    params_to_torch,
    run_torch_mha,
    run_torch_sdpa,
    torch_mha_kwargs,
    torch_sdpa_kwargs,
)
from attention_ref.gradcheck import error_report

ROOT = Path(__file__).resolve().parents[1]

#: Pass threshold on max|ours - torch| / max|torch|: both sides compute the same float64 formulas in
#: different orders, a few ulps (1.1e-16) per reduction over a few dozen terms, ~1e-15 at these
#: sizes (7.8e-15 is the worst measured in tests/test_torch_agreement.py). A wrong mapping (the
#: other polarity or alignment, a missing bias) is off by 1e-2 or more.
TORCH_RTOL = 1e-12
#: A wrong mapping must be off by at least this (relative): far above TORCH_RTOL, far below the
#: O(0.1-1) errors a wrong mask gives on unit-scale random inputs.
WRONG_MIN = 1e-3


def assert_agree(ours: dict, theirs: dict, *, zero_scale: dict | None = None) -> None:
    """Every named array of ``ours`` within TORCH_RTOL of torch's, both finite.

    ``zero_scale`` maps the name of a gradient that is 0 in exact arithmetic (both sides hold
    round-off: the key projection's bias) to the name of the array whose scale measures it.
    """
    assert ours.keys() == theirs.keys(), (sorted(ours), sorted(theirs))
    failures = []
    for name, expected in theirs.items():
        actual = ours[name]
        assert np.isfinite(actual).all() and np.isfinite(expected).all(), name
        scale = None
        if zero_scale and name in zero_scale:
            scale = max(
                float(np.abs(expected).max()), float(np.abs(theirs[zero_scale[name]]).max())
            )
        report = error_report(actual, expected, scale=scale)
        if not report.rel_error <= TORCH_RTOL:
            failures.append(f"{name}: {report}")
    assert not failures, "disagreement with torch:\n" + "\n".join(failures)


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# ---------------------------------------------------------------------------------------------
# Mask polarity converters (NumPy only)
# ---------------------------------------------------------------------------------------------


def test_key_padding_mask_polarity_and_round_trip():
    kpm = np.array(
        [
            [False, False, False, True],  # batch 0: key 3 is padding (torch: True = ignore)
            [False, True, True, True],
        ]
    )  # batch 1: only key 0 is real
    mask = mask_from_key_padding_mask(kpm)
    assert mask.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(
        mask[:, 0, 0, :], [[1, 1, 1, 0], [1, 0, 0, 0]]
    )  # True = may attend
    np.testing.assert_array_equal(key_padding_mask_from_mask(mask), kpm)
    assert not np.shares_memory(key_padding_mask_from_mask(mask), mask)


def test_ignore_mask_polarity_and_round_trip(rng):
    no_peeking = np.array(
        [[False, True, True], [False, False, True]]
    )  # torch's causal attn_mask, T=2, S=3
    np.testing.assert_array_equal(mask_from_ignore_mask(no_peeking), causal_mask(2, 3))
    np.testing.assert_array_equal(ignore_mask_from_mask(causal_mask(2, 3)), no_peeking)
    # (B, H, T, S) <-> (B*H, T, S) with batch b, head h at row b*H + h
    mask = rng.random((2, 3, 4, 5)) < 0.5
    flat = ignore_mask_from_mask(mask)
    assert flat.shape == (6, 4, 5)
    np.testing.assert_array_equal(flat[1 * 3 + 2], ~mask[1, 2])
    np.testing.assert_array_equal(mask_from_ignore_mask(flat, num_heads=3), mask)


def test_additive_mask_split_and_join(rng):
    attn_mask = np.where(rng.random((3, 4)) < 0.3, -np.inf, rng.normal(size=(3, 4)))
    mask, bias = mask_and_bias_from_additive_mask(attn_mask)
    np.testing.assert_array_equal(mask, np.isfinite(attn_mask))
    np.testing.assert_array_equal(bias[mask], attn_mask[mask])
    assert (bias[~mask] == 0).all()
    np.testing.assert_array_equal(additive_mask_from_mask(mask, bias), attn_mask)
    # a -inf bias and its split are the same attention
    attn_mask[:, 0] = 0.0  # every row keeps a key
    q, k, v = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 4, 5)), rng.normal(size=(2, 4, 6))
    mask, bias = mask_and_bias_from_additive_mask(attn_mask)
    np.testing.assert_allclose(
        scaled_dot_product_attention(q, k, v, mask=mask, bias=bias),
        scaled_dot_product_attention(q, k, v, bias=attn_mask),
        rtol=0,
        atol=1e-15,
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mask_from_key_padding_mask(np.zeros((2, 3))), "boolean array .*True = ignore"),
        (
            lambda: key_padding_mask_from_mask(np.ones((2, 2, 1, 3), dtype=bool)),
            r"shape \(B, 1, 1, S\)",
        ),
        (lambda: mask_from_ignore_mask(np.ones((6, 2, 3), dtype=bool)), "num_heads is needed"),
        (
            lambda: mask_from_ignore_mask(np.ones((7, 2, 3), dtype=bool), num_heads=2),
            "multiple of num_heads=2",
        ),
        (
            lambda: ignore_mask_from_mask(np.ones((2, 2, 3), dtype=bool)),
            r"\(T, S\) or \(B, H, T, S\)",
        ),
        (lambda: mask_and_bias_from_additive_mask(np.array([[np.nan, 0.0]])), "finite or -inf"),
        (lambda: additive_mask_from_mask(), "needs a mask, a bias or both"),
    ],
)
def test_converters_validate(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


def test_converters_accept_torch_tensors():
    torch = require_torch()
    kpm = torch.tensor([[False, True]])
    np.testing.assert_array_equal(mask_from_key_padding_mask(kpm)[0, 0, 0], [True, False])
    np.testing.assert_array_equal(
        mask_from_ignore_mask(torch.tensor([[False, True]])), [[True, False]]
    )
    mask, bias = mask_and_bias_from_additive_mask(
        torch.tensor([[0.5, float("-inf")]], dtype=torch.float64)
    )
    np.testing.assert_array_equal(mask, [[True, False]])


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kdim, vdim, bias",
    [(None, None, True), (None, None, False), (6, 5, True), (6, 5, False)],
    ids=["packed-bias", "packed-no_bias", "kdim_vdim-bias", "kdim_vdim-no_bias"],
)
def test_params_round_trip_through_a_module(kdim, vdim, bias, rng):
    torch = require_torch()
    E, H = 8, 2
    module = torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, dtype=torch.float64)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape))))
    params, config = params_from_torch(module)
    assert config == {
        "num_heads": H,
        "embed_dim": E,
        "kdim": kdim or E,
        "vdim": vdim or E,
        "batch_first": False,
        "dropout": 0.0,
    }
    # the query projection reads the first E rows of in_proj_weight (or q_proj_weight), transposed
    a_q = module.in_proj_weight[:E] if module._qkv_same_embed_dim else module.q_proj_weight
    np.testing.assert_array_equal(params.w_q, a_q.detach().numpy().T)
    if bias:
        np.testing.assert_array_equal(params.b_k, module.in_proj_bias[E : 2 * E].detach().numpy())
    else:
        assert params.b_q is None and params.b_o is None
    back = params_to_torch(params, num_heads=H)
    assert (
        back.batch_first
        and back.training
        and back._qkv_same_embed_dim == module._qkv_same_embed_dim
    )
    theirs, ours = module.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys()
    for name in theirs:
        assert ours[name].dtype == torch.float64
        np.testing.assert_array_equal(ours[name].numpy(), theirs[name].numpy(), err_msg=name)
    p2, _ = params_from_torch(back)
    for name, value in params.as_dict().items():
        np.testing.assert_array_equal(getattr(p2, name), value)


def test_params_to_torch_computes_the_reference(rng):
    """Independent of the mapping: the module built from params, called by hand, is the
    reference."""
    torch = require_torch()
    p = init_params(rng, d_model=8, num_heads=4, kdim=6, vdim=3)
    module = params_to_torch(p, num_heads=4)
    query, key, value = (
        rng.normal(size=(2, 3, 8)),
        rng.normal(size=(2, 5, 6)),
        rng.normal(size=(2, 5, 3)),
    )
    out, _ = module(*(torch.from_numpy(x) for x in (query, key, value)), need_weights=False)
    assert (
        error_report(
            out.detach().numpy(), multi_head_attention(query, key, value, p, num_heads=4)
        ).rel_error
        < TORCH_RTOL
    )


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(num_kv_heads=2), "num_kv_heads=2"),  # GQA
        (dict(v_head_dim=3), "params.w_v"),  # Dv != Dk
        (dict(out_dim=6), "params.w_o"),  # output width != D
        (dict(head_dim=3), "params.w_q"),  # H*Dk != D
        (dict(drop_bias="b_k"), "params.b_*"),  # some biases None, others not
    ],
)
def test_params_to_torch_refuses_what_the_module_cannot_hold(change, option, rng):
    require_torch()
    kw = {k: v for k, v in change.items() if k != "drop_bias"}
    p = init_params(rng, d_model=8, num_heads=4, **kw)
    if "drop_bias" in change:
        p = type(p)(**{**p.as_dict(), change["drop_bias"]: None})
    with pytest.raises(UnsupportedOption, match="cannot express") as info:
        params_to_torch(p, num_heads=4, num_kv_heads=change.get("num_kv_heads"))
    assert info.value.option == option, str(info.value)


@pytest.mark.parametrize("flag", ["add_bias_kv", "add_zero_attn"])
def test_params_from_torch_refuses_extra_key_rows(flag):
    torch = require_torch()
    module = torch.nn.MultiheadAttention(8, 2, **{flag: True})
    with pytest.raises(UnsupportedOption, match=f"{flag}=True"):
        params_from_torch(module)


def test_param_grads_need_a_backward():
    torch = require_torch()
    with pytest.raises(ValueError, match="in_proj_weight.grad is None"):
        param_grads_from_torch(torch.nn.MultiheadAttention(4, 2))


# ---------------------------------------------------------------------------------------------
# The option mapping
# ---------------------------------------------------------------------------------------------


def test_sdpa_kwargs_choose_torch_native_arguments():
    torch = require_torch()
    from torch.nn.attention.bias import CausalBias

    kw = torch_sdpa_kwargs(3, 5, num_heads=4, num_kv_heads=2, causal=True)
    assert kw == {
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": True,
        "scale": None,
        "enable_gqa": True,
    }
    kw = torch_sdpa_kwargs(3, 5, causal=True, align="bottom_right")
    assert isinstance(kw["attn_mask"], CausalBias) and not kw["is_causal"]
    assert torch_sdpa_kwargs(4, 4, causal=True, align="bottom_right")[
        "is_causal"
    ]  # T = S: the same mask
    kw = torch_sdpa_kwargs(5, 3, causal=True, align="bottom_right")  # T > S: explicit (empty rows)
    assert kw["attn_mask"].dtype == torch.bool and not kw["is_causal"]
    np.testing.assert_array_equal(kw["attn_mask"].numpy(), causal_mask(5, 3, align="bottom_right"))
    kw = torch_sdpa_kwargs(
        2, 3, causal=True, bias=np.zeros((2, 3))
    )  # causal + bias: one float mask
    assert kw["attn_mask"].dtype == torch.float64 and not kw["is_causal"]
    np.testing.assert_array_equal(kw["attn_mask"].numpy(), [[0, -np.inf, -np.inf], [0, 0, -np.inf]])
    kw = torch_sdpa_kwargs(3, 3, window=(1, 0), scale=0.5)
    assert kw["attn_mask"].dtype == torch.bool and kw["scale"] == 0.5


@pytest.mark.parametrize(
    "T, S, kwargs, option",
    [
        (2, 3, dict(softcap=30.0), "softcap"),
        (2, 3, dict(dropout_p=0.1, dropout_mask=np.ones((2, 3), dtype=bool)), "dropout_p"),
        (
            2,
            3,
            dict(mask=np.array([[True, True, False], [False, False, False]]), empty_rows="uniform"),
            "empty_rows",
        ),
        (
            3,
            2,
            dict(causal=True, align="bottom_right", empty_rows="nan"),
            "empty_rows",
        ),  # row 0 attends nothing
    ],
)
def test_sdpa_kwargs_refuse_what_torch_cannot_express(T, S, kwargs, option):
    # No torch needed: the options are checked before torch is imported.
    with pytest.raises(UnsupportedOption) as info:
        torch_sdpa_kwargs(T, S, **kwargs)
    assert info.value.option == option
    assert str(info.value).startswith("torch F.scaled_dot_product_attention cannot express")


def test_empty_rows_policy_matters_only_when_a_row_is_empty():
    require_torch()
    # "uniform" with no fully masked row: the policy never applies, so torch can compute it
    kw = torch_sdpa_kwargs(
        2, 3, mask=np.array([[True, False, False], [False, True, True]]), empty_rows="uniform"
    )
    assert kw["attn_mask"] is not None
    with pytest.raises(UnsupportedOption, match="1 query row"):
        torch_sdpa_kwargs(
            2, 3, bias=np.array([[0.0, -np.inf, 1.0], [-np.inf] * 3]), empty_rows="uniform"
        )


def test_mha_kwargs_use_key_padding_mask_when_they_can(rng):
    torch = require_torch()
    keep = np.ones((2, 1, 1, 5), dtype=bool)
    keep[1, ..., 3:] = False
    kw = torch_mha_kwargs(2, 4, 5, num_heads=3, mask=keep)
    np.testing.assert_array_equal(kw["key_padding_mask"].numpy(), ~keep[:, 0, 0, :])
    assert kw["attn_mask"] is None and kw["need_weights"] is False
    full = rng.random((2, 3, 4, 5)) < 0.7
    full[..., 0] = True
    kw = torch_mha_kwargs(2, 4, 5, num_heads=3, mask=full)
    assert kw["key_padding_mask"] is None
    np.testing.assert_array_equal(kw["attn_mask"].numpy(), ~full.reshape(6, 4, 5))
    kw = torch_mha_kwargs(2, 4, 5, num_heads=3, bias=np.zeros((4, 5)), mask=keep)
    assert kw["key_padding_mask"] is None and tuple(kw["attn_mask"].shape) == (6, 4, 5)
    assert kw["attn_mask"].dtype == torch.float64
    with pytest.raises(UnsupportedOption, match="fixed at 1/sqrt"):
        torch_mha_kwargs(2, 4, 5, num_heads=3, head_dim=4, scale=1.0)
    assert torch_mha_kwargs(2, 4, 5, num_heads=3, head_dim=4, scale=0.5)["attn_mask"] is None


# ---------------------------------------------------------------------------------------------
# Runners against the reference: scaled dot-product attention
# ---------------------------------------------------------------------------------------------


def build_sdpa_case(
    rng,
    *,
    B=2,
    H=4,
    Hkv=2,
    T=3,
    S=5,
    Dk=6,
    Dv=4,
    mask=None,
    bias=None,
    neg_inf=False,
    empty_row=False,
    **options,
):
    """Random q, k, v, a random cotangent and the options; ``mask``/``bias`` name their shape in
    glossary letters ("B1TS", "1HTS", ...). Every row keeps a key unless ``empty_row`` clears
    row 1 (at index 0 of the leading axes)."""
    sizes = {"B": B, "H": H, "T": T, "S": S, "1": 1}
    q, k, v = (
        rng.normal(size=(B, H, T, Dk)),
        rng.normal(size=(B, Hkv, S, Dk)),
        rng.normal(size=(B, Hkv, S, Dv)),
    )
    dout = rng.normal(size=(B, H, T, Dv))
    if mask is not None:
        shape = tuple(sizes[c] for c in mask)
        m = rng.random(shape) < 0.6
        m[..., 0] = True
        if empty_row:
            m[(0,) * (len(shape) - 2) + (1, slice(None))] = False
        options["mask"] = m
    if bias is not None:
        shape = tuple(sizes[c] for c in bias)
        b = rng.normal(size=shape)
        if neg_inf:
            b = np.where(rng.random(shape) < 0.3, -np.inf, b)
            b[..., 0] = 0.5
        options["bias"] = b
    return q, k, v, dout, options


SDPA_CASES = {
    "plain-T<S-Dk!=Dv": dict(H=3, Hkv=3, T=4, S=6, Dk=5, Dv=7),
    "gqa-T>S": dict(T=5, S=3),
    "mqa-H4-Hkv1": dict(B=3, Hkv=1),
    "bool_mask-BHTS-gqa": dict(mask="BHTS"),
    "mask-B1TS-and-bias-1HTS": dict(mask="B1TS", bias="1HTS"),
    "bias_with_-inf-TS": dict(bias="TS", neg_inf=True),
    "causal-top_left-T<S": dict(causal=True),
    "causal-top_left-T>S": dict(T=6, S=3, causal=True),
    "causal-bottom_right-T<S": dict(causal=True, align="bottom_right"),
    "causal-bottom_right-T>S-empty_rows": dict(T=6, S=3, causal=True, align="bottom_right"),
    "causal-bottom_right-and-mask": dict(mask="B1TS", causal=True, align="bottom_right"),
    "causal-and-bias": dict(bias="BHTS", causal=True),
    "window-top_left": dict(T=4, S=7, window=(2, 1)),
    "window-bottom_right-T>S": dict(T=5, S=3, window=(1, None), align="bottom_right"),
    "empty_row-bool_mask": dict(mask="BHTS", empty_row=True),
    "scale": dict(scale=0.7),
}


@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_run_torch_sdpa_agrees_with_the_reference(name, rng):
    require_torch()
    q, k, v, dout, options = build_sdpa_case(rng, **SDPA_CASES[name])
    run = run_torch_sdpa(q, k, v, dout, **options)
    g = scaled_dot_product_attention_backward(dout, q, k, v, **options)
    ours = {
        "out": scaled_dot_product_attention(q, k, v, **options),
        "dq": g.dq,
        "dk": g.dk,
        "dv": g.dv,
    }
    theirs = {"out": run.out, "dq": run.grads.dq, "dk": run.grads.dk, "dv": run.grads.dv}
    if "bias" in options:
        ours["dbias"], theirs["dbias"] = g.dbias, run.grads.dbias
        assert run.grads.dbias.shape == options["bias"].shape
    assert_agree(ours, theirs)


# torch warns at causal_lower_right(T > S) that its rows will be NaN: true of the flash kernels, and
# the reason the mapping uses an explicit mask there; the math backend gives 0, as checked here.
@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs:UserWarning")
def test_torch_sdpa_empty_rows_are_zero():
    """TORCH_SDPA_EMPTY_ROWS, measured on torch itself (no adapter): a fully masked row is 0."""
    torch = require_torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    rng = np.random.default_rng(1)
    q, k, v = (
        torch.tensor(rng.normal(size=s), requires_grad=True)
        for s in ((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4))
    )
    allowed = torch.ones(3, 5, dtype=torch.bool)
    allowed[1] = False  # query row 1 attends nothing
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    dout = torch.tensor(rng.normal(size=(1, 2, 3, 4)))
    dout[..., [0, 2], :] = 0.0  # a cotangent on the empty row only
    out.backward(dout)
    assert TORCH_SDPA_EMPTY_ROWS == "zero"
    assert (
        (out[:, :, 1] == 0).all()
        and (q.grad == 0).all()
        and (k.grad == 0).all()
        and (v.grad == 0).all()
    )
    # a float mask with a row of -inf, and causal_lower_right with T > S (rows 0, 1 see no key)
    additive = torch.zeros(3, 5, dtype=torch.float64)
    additive[1] = float("-inf")
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive)
        lower_right = torch.nn.functional.scaled_dot_product_attention(  # T = 3 queries, S = 1 key
            q.detach(),
            k.detach()[:, :, :1],
            v.detach()[:, :, :1],
            attn_mask=causal_lower_right(3, 1),
        )
    assert (
        (out[:, :, 1] == 0).all()
        and (lower_right[:, :, :2] == 0).all()
        and (lower_right[:, :, 2] != 0).all()
    )


def test_runner_inputs_are_not_modified_and_outputs_are_fresh(rng):
    require_torch()
    q, k, v, dout, options = build_sdpa_case(rng, mask="BHTS", bias="1HTS")
    copies = [x.copy() for x in (q, k, v, dout, options["mask"], options["bias"])]
    run = run_torch_sdpa(q, k, v, dout, **options)
    for before, after in zip(
        copies, (q, k, v, dout, options["mask"], options["bias"]), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    assert run.out.dtype == np.float64 and run.out.flags.writeable
    assert not np.shares_memory(run.grads.dbias, options["bias"])


# ---------------------------------------------------------------------------------------------
# A wrong mapping is caught
# ---------------------------------------------------------------------------------------------


def test_wrong_polarity_is_caught(rng):
    """Passing nn.MultiheadAttention's key_padding_mask (True = ignore) as the mask, unconverted."""
    require_torch()
    q, k, v, dout, _ = build_sdpa_case(rng)
    kpm = np.zeros((2, 5), dtype=bool)
    kpm[:, 3:] = True  # keys 3, 4 are padding
    right = scaled_dot_product_attention(q, k, v, mask=mask_from_key_padding_mask(kpm))
    assert (
        rel_error(run_torch_sdpa(q, k, v, mask=mask_from_key_padding_mask(kpm)).out, right)
        < TORCH_RTOL
    )
    assert rel_error(run_torch_sdpa(q, k, v, mask=kpm[:, None, None, :]).out, right) > WRONG_MIN


def test_wrong_alignment_is_caught(rng):
    """torch's is_causal is top-left: a test that mapped bottom_right to it would fail."""
    torch = require_torch()
    q, k, v, _, _ = build_sdpa_case(rng, T=3, S=6)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        is_causal = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(x) for x in (q, k, v)), is_causal=True, enable_gqa=True
        ).numpy()
    top_left = scaled_dot_product_attention(q, k, v, causal=True, align="top_left")
    bottom_right = scaled_dot_product_attention(q, k, v, causal=True, align="bottom_right")
    assert rel_error(is_causal, top_left) < TORCH_RTOL
    assert rel_error(is_causal, bottom_right) > WRONG_MIN
    assert (
        rel_error(run_torch_sdpa(q, k, v, causal=True, align="bottom_right").out, bottom_right)
        < TORCH_RTOL
    )


# ---------------------------------------------------------------------------------------------
# Runners against the reference: multi-head attention
# ---------------------------------------------------------------------------------------------

MHA_CASES = {
    "self-bias": dict(kind="self", T=5, S=5),
    "cross-packed-T<S-key_padding": dict(T=3, S=6, key_padding=True),
    "cross-kdim_vdim-causal_bottom_right-key_padding": dict(
        H=4, T=3, S=7, kdim=6, vdim=5, key_padding=True, causal=True, align="bottom_right"
    ),
    "cross-kdim_vdim-no_bias-full_mask-T>S": dict(
        T=6, S=3, kdim=5, vdim=3, bias=False, mask="BHTS"
    ),
    "attention_bias-1HTS-and-key_padding": dict(T=4, S=5, attn_bias="1HTS", key_padding=True),
    "window-top_left": dict(T=4, S=6, window=(1, 2)),
    "fully_padded_batch_element-zero": dict(T=3, S=4, key_padding="all"),
    "scale-equal_to_default": dict(T=3, S=4, scale=0.5),  # Dk = 8 / 2 = 4
}


def build_mha_case(
    rng,
    *,
    kind="cross",
    B=2,
    T=4,
    S=4,
    E=8,
    H=2,
    kdim=None,
    vdim=None,
    bias=True,
    key_padding=False,
    mask=None,
    attn_bias=None,
    **options,
):
    p = init_params(rng, d_model=E, num_heads=H, kdim=kdim, vdim=vdim, bias=bias)
    query = rng.normal(size=(B, T, E))
    if kind == "self":
        key = value = query
    else:
        key, value = rng.normal(size=(B, S, kdim or E)), rng.normal(size=(B, S, vdim or E))
    if key_padding:
        kpm = np.zeros((B, S), dtype=bool)  # torch polarity: True = ignore
        kpm[1, (0 if key_padding == "all" else S - 2) :] = True
        options["mask"] = mask_from_key_padding_mask(kpm)
    if mask is not None:
        m = rng.random((B, H, T, S)) < 0.6
        m[..., 0] = True
        options["mask"] = m
    if attn_bias is not None:
        options["bias"] = rng.normal(size=(1, H, T, S))
    return query, key, value, p, rng.normal(size=(B, T, E)), dict(num_heads=H, **options)


@pytest.mark.parametrize("name", list(MHA_CASES))
def test_run_torch_mha_agrees_with_the_reference(name, rng):
    require_torch()
    query, key, value, p, dout, options = build_mha_case(rng, **MHA_CASES[name])
    run = run_torch_mha(query, key, value, p, dout, **options)
    g = multi_head_attention_backward(dout, query, key, value, p, **options)
    ours = {"out": multi_head_attention(query, key, value, p, **options), **g.as_dict()}
    theirs = {"out": run.out, **run.grads.as_dict()}
    # b_k's gradient is 0 in exact arithmetic (it shifts a whole score row): round-off on both
    # sides, measured against the scale of dw_k.
    assert_agree(ours, theirs, zero_scale={"b_k": "w_k"})


def test_torch_mha_empty_rows_are_zero(rng):
    """TORCH_MHA_EMPTY_ROWS: the fully padded batch element's output rows are out_proj.bias."""
    require_torch()
    query, key, value, p, _, options = build_mha_case(rng, T=3, S=4, key_padding="all")
    out = run_torch_mha(query, key, value, p, **options).out
    assert TORCH_MHA_EMPTY_ROWS == "zero"
    np.testing.assert_allclose(out[1], np.broadcast_to(p.b_o, (3, 8)), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(num_kv_heads=1), "num_kv_heads=1"),
        (dict(softcap=5.0), "softcap"),
        (dict(scale=1.0), "scale"),
        (dict(mask=np.zeros((2, 1, 1, 4), dtype=bool), empty_rows="uniform"), "empty_rows"),
    ],
)
def test_run_torch_mha_refuses_what_torch_cannot_express(kwargs, option, rng):
    require_torch()
    query, key, value, p, dout, options = build_mha_case(rng, T=3, S=4)
    with pytest.raises(UnsupportedOption) as info:
        run_torch_mha(query, key, value, p, dout, **{**options, **kwargs})
    assert info.value.option == option


# ---------------------------------------------------------------------------------------------
# Without torch; the docs page
# ---------------------------------------------------------------------------------------------


def test_imports_and_converts_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # import torch now raises ImportError
        "import numpy as np\n"
        "import attention_ref.adapters.torch as t\n"
        "assert t.mask_from_key_padding_mask(np.array([[False, True]]))[0, 0, 0].tolist() "
        "== [True, False]\n"
        "try:\n"
        "    t.run_torch_sdpa(np.ones((1, 2, 3)), np.ones((1, 2, 3)), np.ones((1, 2, 3)))\n"
        "except ImportError as exc:\n"
        "    assert 'pip install torch' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def _doc_blocks(framework: str) -> list[str]:
    """The ```python blocks of docs/adapters.md, but those that import the other framework or its
    adapter."""
    text = (ROOT / "docs" / "adapters.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    other = {"torch": "jax", "jax": "torch"}[framework]
    needs_other = re.compile(
        rf"^(import|from) ({other}|attention_ref\.adapters\.{other})\b", flags=re.M
    )
    return [b for b in blocks if not needs_other.search(b)]


def test_docs_examples_run():
    require_torch()
    blocks = _doc_blocks("torch")
    assert any("run_torch_sdpa" in b for b in blocks), "docs/adapters.md has no torch example"
    namespace: dict = {"__name__": "docs_adapters_torch"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/adapters.md (torch-or-numpy block {i})", "exec"), namespace)
