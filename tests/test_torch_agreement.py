"""Agreement with PyTorch, forward and backward, in float64.

* :func:`attention_ref.scaled_dot_product_attention` and its backward against
  ``torch.nn.functional.scaled_dot_product_attention`` on the math backend: GQA/MQA
  (``enable_gqa``), boolean and additive masks, causal ``top_left`` (``is_causal``) and
  ``bottom_right`` (``causal_lower_right``), fully masked rows.
* :func:`attention_ref.multi_head_attention` and its backward against
  ``torch.nn.MultiheadAttention`` with the module's weights converted to ``(in, out)``: self- and
  cross-attention (``kdim``/``vdim``), key padding, a causal ``attn_mask``, bias on and off,
  averaged weights (``need_weights=True``), fully padded batch elements.

Every gradient is a vector-Jacobian product with a random cotangent (``out.backward(c)``), never
``.sum()``. Weights, masks and SDPA's keyword arguments are converted by
:mod:`attention_ref.adapters.torch` (``params_from_torch``, ``mask_from_key_padding_mask``,
``torch_sdpa_kwargs``, ...), whose own tests are ``tests/test_adapters_torch.py``; a wrong
conversion shows here as a disagreement. The tests skip without torch, and fail when
``ATTENTION_REF_REQUIRE_TORCH=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pytest
from conftest import require_torch

from attention_ref import (
    causal_mask,
    mha_forward,
    multi_head_attention,
    multi_head_attention_backward,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
)
from attention_ref.adapters.torch import (
    ignore_mask_from_mask,
    mask_from_key_padding_mask,
    param_grads_from_torch,
    params_from_torch,
    torch_sdpa_kwargs,
)
from attention_ref.gradcheck import error_report

#: Pass threshold on max|ours - torch| / max|torch|. Both sides compute the same float64 formulas in
#: different summation orders: a few ulps (u = 1.1e-16) per reduction over at most a few dozen terms
#: gives ~1e-15 at these sizes; a wrong formula (a missing scale, a mask of the other polarity, a
#: gradient not summed over a GQA group) is off by O(1e-2) or more.
TORCH_RTOL = 1e-12


def assert_agree(
    ours: Mapping[str, np.ndarray],
    theirs: Mapping[str, np.ndarray],
    *,
    finite: bool = True,
    scale_from: Mapping[str, str] | None = None,
) -> None:
    """Every named array of ``ours`` within TORCH_RTOL of torch's, NaN where torch's is NaN.

    With ``finite`` (the default) both sides must also be free of NaN and inf, so two matching
    NaNs cannot pass for agreement. ``scale_from`` maps the name of a gradient that is 0 in exact
    arithmetic (both sides hold round-off) to the array whose max|torch| measures its error.
    """
    assert ours.keys() == theirs.keys(), f"ours has {sorted(ours)}, torch has {sorted(theirs)}"
    scale_from = scale_from or {}
    failures = []
    for name, expected in theirs.items():
        actual = ours[name]
        report = error_report(actual, expected)
        scale = report.scale
        if name in scale_from:
            scale = max(scale, float(np.abs(theirs[scale_from[name]]).max()))
        if finite and not (np.isfinite(actual).all() and np.isfinite(expected).all()):
            failures.append(
                f"{name}: non-finite entries (ours {int((~np.isfinite(actual)).sum())}, "
                f"torch {int((~np.isfinite(expected)).sum())})"
            )
        elif report.nonfinite_mismatch or report.max_abs_error > TORCH_RTOL * scale:
            failures.append(
                f"{name}: {report}"
                + (f"; measured against {scale:.2e}" if name in scale_from else "")
            )
    assert not failures, "disagreement with torch:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention vs torch.nn.functional.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SdpaCase:
    name: str
    B: int = 2
    H: int = 4
    Hkv: int = 4
    T: int = 3
    S: int = 5
    Dk: int = 6
    Dv: int = 4
    mask: str = (
        "none"  # "none", "bool" (True = may attend) or "float" (additive, some -inf entries)
    )
    mask_dims: str = "BHTS"  # the mask's shape in glossary letters, "1" for a broadcast axis
    causal: str | None = (
        None  # None, "top_left" (torch is_causal) or "bottom_right" (causal_lower_right)
    )
    empty_row: bool = False  # mask out every key of one query row


SDPA_CASES = [
    SdpaCase("plain-T<S", H=3, Hkv=3, T=4, S=6, Dk=5, Dv=7),
    SdpaCase("gqa-H4-Hkv2-T>S", Hkv=2, T=5, S=3, Dk=4, Dv=6),
    SdpaCase("mqa-H4-Hkv1", B=3, Hkv=1, Dv=2),
    SdpaCase("single_query_key-T1-S1", H=2, Hkv=1, T=1, S=1),
    SdpaCase("bool_mask-BHTS-gqa", Hkv=2, mask="bool"),
    SdpaCase("bool_mask-B1TS-mqa-T>S", Hkv=1, T=6, S=4, mask="bool", mask_dims="B1TS"),
    SdpaCase("float_mask-BHTS-gqa", Hkv=2, mask="float"),
    SdpaCase("float_mask-TS-broadcast", H=3, Hkv=3, T=4, S=6, mask="float", mask_dims="TS"),
    SdpaCase("float_mask-1HTS-mqa", Hkv=1, T=5, S=3, mask="float", mask_dims="1HTS"),
    SdpaCase("causal_top_left-T<S-gqa", Hkv=2, T=3, S=6, causal="top_left"),
    SdpaCase("causal_top_left-T>S", T=6, S=3, causal="top_left"),
    SdpaCase("causal_bottom_right-T<S-gqa", Hkv=2, T=3, S=6, causal="bottom_right"),
    SdpaCase("causal_bottom_right-T1-decode-mqa", Hkv=1, T=1, S=5, causal="bottom_right"),
    SdpaCase("empty_rows-causal_bottom_right-T>S", Hkv=2, T=6, S=3, causal="bottom_right"),
    SdpaCase("empty_rows-bool_mask-BHTS-gqa", Hkv=2, T=4, mask="bool", empty_row=True),
    SdpaCase("empty_rows-bool_mask-B1TS", T=4, mask="bool", mask_dims="B1TS", empty_row=True),
    SdpaCase("empty_rows-float_mask-BHTS-mqa", Hkv=1, T=4, mask="float", empty_row=True),
]


def _sdpa_mask(case: SdpaCase, rng: np.random.Generator):
    """(mask, bias): a boolean mask (True = may attend) or an additive float mask, or neither.

    Random entries are masked, but every row keeps one key, except the one row ``empty_row``
    clears (index 1 of T at index 0 of every leading axis).
    """
    if case.mask == "none":
        return None, None
    sizes = {"B": case.B, "H": case.H, "T": case.T, "S": case.S, "1": 1}
    shape = tuple(sizes[c] for c in case.mask_dims)
    keep_one = rng.integers(case.S, size=shape[:-1] + (1,))  # one key per row that stays allowed
    allowed = rng.random(shape) < 0.6
    np.put_along_axis(allowed, keep_one, True, axis=-1)
    if case.empty_row:
        allowed[(0,) * (len(shape) - 2) + (1, slice(None))] = False
    if case.mask == "bool":
        return allowed, None
    return None, np.where(allowed, rng.normal(size=shape), -np.inf)


def sdpa_both(torch, case: SdpaCase, rng: np.random.Generator):
    """Run ours and torch's SDPA on the same inputs and cotangent; return both as named arrays."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = rng.normal(size=(case.B, case.H, case.T, case.Dk))
    k = rng.normal(size=(case.B, case.Hkv, case.S, case.Dk))
    v = rng.normal(size=(case.B, case.Hkv, case.S, case.Dv))
    mask, bias = _sdpa_mask(case, rng)
    dout = rng.normal(size=(case.B, case.H, case.T, case.Dv))

    options = dict(
        mask=mask, bias=bias, causal=case.causal is not None, align=case.causal or "top_left"
    )
    g = scaled_dot_product_attention_backward(dout, q, k, v, **options)
    ours = {
        "out": scaled_dot_product_attention(q, k, v, **options),
        "dq": g.dq,
        "dk": g.dk,
        "dv": g.dv,
    }
    if bias is not None:
        ours["dbias"] = g.dbias

    leaves = {
        name: torch.tensor(a, requires_grad=True)
        for name, a in (("q", q), ("k", k), ("v", v), ("bias", bias))
        if a is not None
    }
    # is_causal (top_left), causal_lower_right (bottom_right, T <= S) or an explicit mask (T > S),
    # a boolean attn_mask or the float one built from the bias leaf (so its gradient is torch's)
    kwargs = torch_sdpa_kwargs(
        case.T,
        case.S,
        num_heads=case.H,
        num_kv_heads=case.Hkv,
        **{**options, "bias": leaves.get("bias")},
    )
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            leaves["q"], leaves["k"], leaves["v"], **kwargs
        )
    out.backward(torch.from_numpy(dout))
    theirs = {
        "out": out.detach().numpy(),
        **{f"d{name}": t.grad.numpy() for name, t in leaves.items()},
    }
    return ours, theirs


@pytest.mark.parametrize("case", SDPA_CASES, ids=[c.name for c in SDPA_CASES])
def test_sdpa_agrees_with_torch(case, rng):
    torch = require_torch()
    assert_agree(*sdpa_both(torch, case, rng))


# ---------------------------------------------------------------------------------------------
# multi_head_attention vs torch.nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MhaCase:
    name: str
    kind: str = "self"  # "self": one tensor as query, key and value (T = S); "cross": three tensors
    B: int = 2
    T: int = 4
    S: int = 4
    E: int = 8  # embed_dim: D of the query and of the output
    H: int = 2
    kdim: int | None = None  # key input width (None: E, packed in_proj_weight)
    vdim: int | None = None  # value input width
    bias: bool = True
    key_padding: str = (
        "none"  # "none", "tail" (the last keys of batch element 1) or "all" (all of them)
    )
    causal: bool = False  # torch: a boolean attn_mask, True (= ignore) above the diagonal
    need_weights: bool = (
        False  # torch's explicit-softmax path, which also returns head-averaged weights
    )
    empty_rows: str = "zero"  # our policy for the fully padded batch element of key_padding="all"
    grads: bool = True


MHA_CASES = [
    MhaCase("self-bias", T=5, S=5),
    MhaCase("self-no_bias", T=5, S=5, bias=False),
    MhaCase("self-causal-key_padding", T=5, S=5, causal=True, key_padding="tail"),
    MhaCase("cross-packed-T<S-key_padding", kind="cross", T=3, S=6, key_padding="tail"),
    MhaCase(
        "cross-kdim_vdim-bias-key_padding",
        kind="cross",
        H=4,
        T=3,
        S=7,
        kdim=6,
        vdim=5,
        key_padding="tail",
    ),
    MhaCase("cross-kdim_vdim-no_bias-T>S", kind="cross", T=6, S=3, kdim=5, vdim=3, bias=False),
    MhaCase(
        "cross-kdim_vdim-need_weights",
        kind="cross",
        H=4,
        T=3,
        S=5,
        kdim=6,
        vdim=5,
        key_padding="tail",
        need_weights=True,
    ),
    # A fully padded batch element: torch's SDPA path (need_weights=False) gives zero rows, our
    # "zero".
    MhaCase("fully_padded-need_weights_False-zero", key_padding="all"),
    # torch's explicit softmax (need_weights=True) gives NaN rows and NaN weights, our "nan".
    # Forward only: torch's NaN also reaches dquery/dkey and every in_proj gradient (its -inf mask
    # is added to the scores), ours reaches dvalue only (masked entries pass no gradient, see
    # sdpa_backward).
    MhaCase(
        "fully_padded-need_weights_True-nan",
        key_padding="all",
        need_weights=True,
        empty_rows="nan",
        grads=False,
    ),
]


def mha_both(torch, case: MhaCase, rng: np.random.Generator):
    """Run ours and nn.MultiheadAttention on the same weights, inputs and cotangent."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    module = torch.nn.MultiheadAttention(
        case.E,
        case.H,
        bias=case.bias,
        kdim=case.kdim,
        vdim=case.vdim,
        batch_first=True,
        dtype=torch.float64,
    )
    with torch.no_grad():  # random weights, and nonzero biases (torch initialises them to 0)
        for p in module.parameters():
            p.copy_(torch.from_numpy(0.5 * rng.normal(size=tuple(p.shape))))
    params, _ = params_from_torch(module)  # (out, in) -> (in, out); in_proj_weight rows q, k, v

    query = rng.normal(size=(case.B, case.T, case.E))
    if case.kind == "self":
        assert case.S == case.T and case.kdim is None and case.vdim is None
        key = value = query
    else:
        key = rng.normal(size=(case.B, case.S, case.kdim or case.E))
        value = rng.normal(size=(case.B, case.S, case.vdim or case.E))
    key_padding_mask = None  # torch polarity: True = ignore
    if case.key_padding != "none":
        key_padding_mask = np.zeros((case.B, case.S), dtype=bool)
        key_padding_mask[1, {"tail": case.S - 2, "all": 0}[case.key_padding] :] = True
    dout = rng.normal(size=(case.B, case.T, case.E))

    options = dict(
        num_heads=case.H,
        causal=case.causal,
        empty_rows=case.empty_rows,
        mask=None if key_padding_mask is None else mask_from_key_padding_mask(key_padding_mask),
    )  # (B, 1, 1, S)
    ours = {"out": multi_head_attention(query, key, value, params, **options)}
    if case.need_weights:
        ours["weights"] = mha_forward(query, key, value, params, **options).attention.probs.mean(
            axis=1
        )
    if case.grads:
        g = multi_head_attention_backward(dout, query, key, value, params, **options)
        if case.kind == "self":
            ours["dx"] = g.dquery + g.dkey + g.dvalue  # the one input is seen three times
        else:
            ours.update(dquery=g.dquery, dkey=g.dkey, dvalue=g.dvalue)
        ours.update({f"d{name}": a for name, a in g.dparams.as_dict().items()})

    inputs = {
        name: torch.tensor(a, requires_grad=True)
        for name, a in (("query", query), ("key", key), ("value", value))
    }
    if case.kind == "self":
        inputs["key"] = inputs["value"] = inputs["query"]
    attn_mask = (
        torch.from_numpy(ignore_mask_from_mask(causal_mask(case.T, case.S)))
        if case.causal
        else None
    )  # True = ignore
    with sdpa_kernel(SDPBackend.MATH):
        out, weights = module(
            inputs["query"],
            inputs["key"],
            inputs["value"],
            key_padding_mask=None
            if key_padding_mask is None
            else torch.from_numpy(key_padding_mask),
            attn_mask=attn_mask,
            need_weights=case.need_weights,
        )
    theirs = {"out": out.detach().numpy()}
    if case.need_weights:
        theirs["weights"] = weights.detach().numpy()
    if case.grads:
        out.backward(torch.from_numpy(dout))
        if case.kind == "self":
            theirs["dx"] = inputs["query"].grad.numpy()
        else:
            theirs.update({f"d{name}": t.grad.numpy() for name, t in inputs.items()})
        theirs.update(
            {f"d{name}": a for name, a in param_grads_from_torch(module).as_dict().items()}
        )
    return ours, theirs


@pytest.mark.parametrize("case", MHA_CASES, ids=[c.name for c in MHA_CASES])
def test_mha_agrees_with_torch(case, rng):
    torch = require_torch()
    # The key bias's gradient is 0 in exact arithmetic (it adds q . b_k to a whole row of scores,
    # and softmax is shift-invariant), so both sides hold round-off: measure it against d(w_k).
    assert_agree(
        *mha_both(torch, case, rng), finite=case.empty_rows != "nan", scale_from={"db_k": "dw_k"}
    )
