"""attention_ref.adapters.jax: layout, the option mapping (both ways), the runners, JAX's semantics.

* Layout and sequence-length converters, and the option mapping, are NumPy code: tested without jax.
* JAX's own behaviour, measured on ``jax.nn.dot_product_attention`` itself (no adapter): mask
  polarity, top-left ``is_causal`` and ``local_window_size`` when T != S, GQA grouping, uniform
  empty rows, zeroed rows beyond ``query_seq_lengths``, a float32 softmax under x64.
* ``run_jax_sdpa`` and ``run_jax_mha`` against the reference, forward and every gradient for a
  random cotangent, by the rule ``attention-ref compare jax`` applies
  (:mod:`attention_ref.oracle.conformance`): JAX's softmax is float32 even for float64 inputs, so
  its error is judged by the error-budget rule of :mod:`attention_ref.testing` against the reference
  computed in float32, not by 1e-12.
* ``options_from_jax_kwargs`` against real JAX calls with sequence lengths.
* A wrong mapping (the other polarity or alignment) fails that rule; the caller's x64 setting
  survives; the module imports without jax.

The tests that need jax skip without it, and fail when ``ATTENTION_REF_REQUIRE_JAX=1``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_jax

from attention_ref import (
    causal_mask,
    init_params,
    multi_head_attention,
    multi_head_attention_backward,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
    window_mask,
)
from attention_ref.adapters import UnsupportedOption
from attention_ref.adapters.jax import (
    JAX_ALIGN,
    JAX_EMPTY_ROWS,
    JAX_QUERY_PADDING_ROWS,
    JAX_SOFTMAX_DTYPE,
    bhtd_from_bthd,
    bthd_from_bhtd,
    jax_dpa_kwargs,
    mask_from_seq_lengths,
    options_from_jax_kwargs,
    run_jax_mha,
    run_jax_sdpa,
)
from attention_ref.oracle.conformance import MIXED_PRECISION_GRADIENT_BUDGET
from attention_ref.testing import (
    OUTPUT_BUDGET,
    BudgetReport,
    check_budget,
    mha_baseline,
    noise_floor,
    sdpa_baseline,
)

ROOT = Path(__file__).resolve().parents[1]

#: The precision JAX's results carry, and so the baseline's: its softmax is float32 under x64.
LOW = JAX_SOFTMAX_DTYPE
#: A wrong convention (mask polarity, alignment, GQA grouping, empty-row policy) must exceed the
#: rule's allowance (budget x baseline error + floor) by at least this factor: measured 5.9e5 or
#: more on these shapes, while a right one needs at most 13.65 of the 24x gradient budget.
WRONG_MIN_EXCESS = 1e4


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def judge(theirs: dict, ours: dict, base: dict) -> list[BudgetReport]:
    """JAX's output and gradients judged as ``attention-ref compare jax`` judges them.

    ``theirs``, ``ours`` (the float64 reference) and ``base`` (the reference computed in float32,
    :func:`~attention_ref.testing.sdpa_baseline` / :func:`~attention_ref.testing.mha_baseline`) map
    "out", "dq", ... to arrays. The rule of
    :func:`attention_ref.oracle.conformance.run_conformance`:
    :func:`~attention_ref.testing.check_budget`, ``OUTPUT_BUDGET`` for the output,
    ``MIXED_PRECISION_GRADIENT_BUDGET`` for each gradient, whose floor is at least the noise floor
    of the case's largest gradient (a gradient that is 0 in exact arithmetic, the key projection's
    bias ``b_k``, is round-off on both sides).
    """
    assert theirs.keys() == ours.keys() == base.keys(), (sorted(theirs), sorted(ours), sorted(base))
    grad_scale = max(float(np.abs(g).max(initial=0.0)) for n, g in ours.items() if n != "out")
    reports = []
    for name, expected in ours.items():
        actual = theirs[name]
        assert actual.shape == expected.shape and actual.dtype == np.float64, (
            name,
            actual.shape,
            actual.dtype,
        )
        floor = (
            None
            if name == "out"
            else max(noise_floor(expected, LOW), noise_floor([grad_scale], LOW))
        )
        budget = OUTPUT_BUDGET if name == "out" else MIXED_PRECISION_GRADIENT_BUDGET
        reports.append(
            check_budget(
                actual,
                expected,
                base[name],
                precision=LOW,
                rtol_budget=budget,
                floor=floor,
                name=name,
            )
        )
    return reports


def assert_within_budget(theirs: dict, ours: dict, base: dict) -> None:
    """Every report of :func:`judge` passes."""
    failures = [str(r) for r in judge(theirs, ours, base) if not r.passed]
    assert not failures, "JAX outside its error budget:\n" + "\n".join(failures)


def named(out, grads: dict) -> dict:
    """``{"out": out, "dq": ..., ...}`` from gradients keyed by input name (``q``, ``w_k``, ...)."""
    return {"out": np.asarray(out), **{"d" + n: np.asarray(g) for n, g in grads.items()}}


def jax_call(jax, q, k, v, **kwargs):
    """jax.nn.dot_product_attention on reference-layout float64 arrays, result in reference layout.

    Jitted (array arguments traced, the others static): one compilation instead of one per op."""
    arrays = {n: a for n, a in kwargs.items() if isinstance(a, np.ndarray)}
    static = {n: a for n, a in kwargs.items() if n not in arrays}
    with jax.enable_x64(True):
        f = jax.jit(
            lambda q, k, v, arrays: jax.nn.dot_product_attention(q, k, v, **arrays, **static)
        )
        out = f(*(jax.numpy.asarray(bthd_from_bhtd(x)) for x in (q, k, v)), arrays)
    return bhtd_from_bthd(np.asarray(out))


# ---------------------------------------------------------------------------------------------
# NumPy converters and the option mapping (no jax needed)
# ---------------------------------------------------------------------------------------------


def test_layout_round_trip(rng):
    x = rng.normal(size=(2, 3, 4, 5))  # (B, H, T, D)
    y = bthd_from_bhtd(x)
    assert y.shape == (2, 4, 3, 5) and y.flags.c_contiguous and not np.shares_memory(x, y)
    assert y[1, 2, 0, 4] == x[1, 0, 2, 4]  # [b, t, h, d] == [b, h, t, d]
    np.testing.assert_array_equal(bhtd_from_bthd(y), x)
    with pytest.raises(ValueError, match="3 or more dims"):
        bthd_from_bhtd(np.zeros((2, 3)))


def test_mask_from_seq_lengths():
    m = mask_from_seq_lengths(
        3, 4, query_seq_lengths=np.array([3, 1]), key_value_seq_lengths=np.array([2, 4])
    )
    assert m.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(m[0, 0], [[1, 1, 0, 0]] * 3)
    np.testing.assert_array_equal(m[1, 0], [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(
        mask_from_seq_lengths(2, 3, key_value_seq_lengths=np.array([1]))[0, 0],
        [[1, 0, 0], [1, 0, 0]],
    )
    with pytest.raises(ValueError, match="got neither"):
        mask_from_seq_lengths(2, 3)
    with pytest.raises(TypeError, match="integer array"):
        mask_from_seq_lengths(2, 3, query_seq_lengths=np.array([1.5]))


def test_dpa_kwargs_use_jax_arguments_where_they_mean_the_same():
    kw = jax_dpa_kwargs(3, 5, causal=True, window=(2, None), scale=0.5)
    assert kw == {
        "bias": None,
        "mask": None,
        "scale": 0.5,
        "is_causal": True,
        "local_window_size": (2, 5),
        "implementation": "xla",
    }
    assert (
        jax_dpa_kwargs(3, 5, window=(None, None))["local_window_size"] is None
    )  # no restriction at all
    # bottom_right has no JAX argument when T != S: an explicit mask; when T = S it is the same as
    # top_left
    kw = jax_dpa_kwargs(2, 4, causal=True, window=(1, 0), align="bottom_right")
    assert not kw["is_causal"] and kw["local_window_size"] is None
    np.testing.assert_array_equal(
        kw["mask"][0, 0],
        causal_mask(2, 4, align="bottom_right") & window_mask(2, 4, (1, 0), align="bottom_right"),
    )
    assert jax_dpa_kwargs(4, 4, causal=True, align="bottom_right")["is_causal"]
    # a -inf bias entry moves into the mask (a row of -inf would be NaN in JAX's softmax)
    kw = jax_dpa_kwargs(
        2,
        3,
        bias=np.array([[0.5, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]]),
        empty_rows="uniform",
    )
    np.testing.assert_array_equal(kw["mask"][0, 0], [[True, False, True], [False, False, False]])
    np.testing.assert_array_equal(kw["bias"][0, 0], [[0.5, 0.0, 1.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "T, S, kwargs, option",
    [
        (2, 3, dict(softcap=30.0), "softcap"),
        (2, 3, dict(dropout_p=0.1, dropout_mask=np.ones((2, 3), dtype=bool)), "dropout_p"),
        (
            3,
            2,
            dict(causal=True, align="bottom_right"),
            "empty_rows",
        ),  # row 0 attends nothing; JAX: uniform
        (2, 3, dict(mask=np.ones((1, 1, 1, 2, 3), dtype=bool)), "mask"),  # JAX takes 4-D masks
    ],
)
def test_dpa_kwargs_refuse_what_jax_cannot_express(T, S, kwargs, option):
    with pytest.raises(UnsupportedOption) as info:
        jax_dpa_kwargs(T, S, **kwargs)
    assert info.value.option == option
    assert str(info.value).startswith("jax.nn.dot_product_attention cannot express")


def test_options_from_jax_kwargs_pick_the_empty_row_policy():
    ql = np.array([3, 1], dtype=np.int32)
    opts = options_from_jax_kwargs(
        3, 4, query_seq_lengths=ql
    )  # padded query rows only: JAX zeroes them
    assert opts["empty_rows"] == JAX_QUERY_PADDING_ROWS == "zero"
    opts = options_from_jax_kwargs(3, 4, key_value_seq_lengths=np.array([0, 4], dtype=np.int32))
    assert opts["empty_rows"] == JAX_EMPTY_ROWS == "uniform"  # batch 0 attends nothing: uniform
    with pytest.raises(UnsupportedOption, match="one empty_rows policy cannot express both"):
        options_from_jax_kwargs(
            3, 4, query_seq_lengths=ql, key_value_seq_lengths=np.array([0, 4], dtype=np.int32)
        )
    with pytest.raises(UnsupportedOption, match="NaN in JAX"):
        options_from_jax_kwargs(2, 3, bias=np.array([[0.0, 1.0, 2.0], [-np.inf, -np.inf, -np.inf]]))
    opts = options_from_jax_kwargs(2, 3, is_causal=True, local_window_size=(1, 0), scale=0.25)
    assert (opts["causal"], opts["align"], opts["window"], opts["scale"], opts["mask"]) == (
        True,
        "top_left",
        (1, 0),
        0.25,
        None,
    )


# ---------------------------------------------------------------------------------------------
# JAX's semantics, measured on jax.nn.dot_product_attention itself
# ---------------------------------------------------------------------------------------------


def test_jax_semantics_as_recorded(rng):
    """Each constant of the adapter, and each row of its mapping table, checked on JAX directly."""
    jax = require_jax()
    B, H, Hkv, T, S, D = 2, 4, 2, 3, 5, 4
    q, k, v = (
        rng.normal(size=(B, H, T, D)),
        rng.normal(size=(B, Hkv, S, D)),
        rng.normal(size=(B, Hkv, S, D)),
    )
    mask = rng.random((B, 1, T, S)) < 0.6
    mask[..., 0] = True
    empty = mask.copy()
    empty[0, 0, 1] = False  # batch 0, query 1 attends nothing
    ql = np.array([2, 3], dtype=np.int32)
    calls = {  # name -> keyword arguments of jax.nn.dot_product_attention; compiled as one function
        "plain": {},
        "mask": dict(mask=mask),
        "flipped": dict(mask=~mask | causal_mask(T, S)),
        "is_causal": dict(is_causal=True),
        "window": dict(local_window_size=(1, 2)),
        "empty": dict(mask=empty),
        "padded": dict(query_seq_lengths=ql),
    }
    with jax.enable_x64(True):
        qj, kj, vj = (jax.numpy.asarray(bthd_from_bhtd(x)) for x in (q, k, v))
        outs = jax.jit(
            lambda q, k, v: {
                n: jax.nn.dot_product_attention(q, k, v, **kw) for n, kw in calls.items()
            }
        )(qj, kj, vj)
    outs = {n: bhtd_from_bthd(np.asarray(o)) for n, o in outs.items()}

    def judged(out, q, k, v, **ours) -> BudgetReport:
        """JAX's output against the reference with the options ``ours``, by the error-budget
        rule."""
        return check_budget(
            out,
            scaled_dot_product_attention(q, k, v, **ours),
            sdpa_baseline(q, k, v, precision=LOW, **ours).out,
            precision=LOW,
        )

    def close(name, **ours):  # within the budget
        return judged(outs[name], q, k, v, **ours).passed

    def off(name, q=q, k=k, v=v, **ours):  # outside it by orders of magnitude
        r = judged(outs[name], q, k, v, **ours)
        return r.candidate.max_abs_error > WRONG_MIN_EXCESS * r.allowed

    # mask: True = takes part
    assert close("mask", mask=mask) and off("flipped", mask=mask)
    # GQA: query head h reads kv head h // (H // Hkv), not h % Hkv
    assert close("plain") and off(
        "plain", k=np.tile(k, (1, H // Hkv, 1, 1)), v=np.tile(v, (1, H // Hkv, 1, 1))
    )
    # is_causal and local_window_size: top-left when T != S
    assert JAX_ALIGN == "top_left"
    assert close("is_causal", causal=True, align="top_left") and off(
        "is_causal", causal=True, align="bottom_right"
    )
    assert close("window", window=(1, 2), align="top_left") and off(
        "window", window=(1, 2), align="bottom_right"
    )
    # empty rows: uniform; rows beyond query_seq_lengths: zero
    assert JAX_EMPTY_ROWS == "uniform" and close("empty", mask=empty, empty_rows="uniform")
    assert off("empty", mask=empty, empty_rows="zero")
    assert JAX_QUERY_PADDING_ROWS == "zero" and (outs["padded"][0, :, 2] == 0).all()
    assert close(
        "padded", mask=mask_from_seq_lengths(T, S, query_seq_lengths=ql), empty_rows="zero"
    )
    # the softmax is float32 under x64: float64 inputs and output, float32-sized error
    err = rel_error(outs["plain"], scaled_dot_product_attention(q, k, v))
    assert (
        JAX_SOFTMAX_DTYPE == "float32" and outs["plain"].dtype == np.float64 and 1e-10 < err < 1e-5
    ), err


# ---------------------------------------------------------------------------------------------
# Runners against the reference
# ---------------------------------------------------------------------------------------------


def build_sdpa_case(
    rng,
    *,
    B=2,
    H=4,
    Hkv=2,
    T=3,
    S=5,
    D=4,
    mask=None,
    bias=None,
    neg_inf=False,
    empty_row=False,
    **options,
):
    """Random q, k, v (Dk = Dv = D: JAX's requirement), a random cotangent and the options;
    ``mask``/``bias`` name their shape in glossary letters ("B1TS", ...)."""
    sizes = {"B": B, "H": H, "T": T, "S": S, "1": 1}
    q, k, v = (
        rng.normal(size=(B, H, T, D)),
        rng.normal(size=(B, Hkv, S, D)),
        rng.normal(size=(B, Hkv, S, D)),
    )
    dout = rng.normal(size=(B, H, T, D))
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
    return q, k, v, dout, {"empty_rows": "uniform", **options}


SDPA_CASES = {  # each a different path of the mapping (each costs JAX a compilation)
    "plain-T<S-H3-scale": dict(H=3, Hkv=3, T=4, S=6, scale=0.9),
    "gqa-T>S": dict(T=5, S=3),
    "bool_mask-BHTS-empty_row": dict(mask="BHTS", empty_row=True),
    "mask-B1TS-and-bias-1HTS": dict(mask="B1TS", bias="1HTS"),
    "bias_with_-inf-TS": dict(bias="TS", neg_inf=True),
    "causal-top_left-T<S": dict(causal=True),
    "causal-bottom_right-T<S": dict(causal=True, align="bottom_right"),
    "causal-bottom_right-T>S-empty_rows": dict(T=5, S=3, causal=True, align="bottom_right"),
    "window-top_left-one_sided": dict(window=(2, None)),
    "window-bottom_right-T>S-mqa": dict(T=5, S=3, Hkv=1, window=(1, 0), align="bottom_right"),
}


def reference_arrays(q, k, v, dout, options) -> dict:
    """The reference's output and gradients, by name ("out", "dq", "dk", "dv", "dbias")."""
    g = scaled_dot_product_attention_backward(dout, q, k, v, **options)
    grads = {"q": g.dq, "k": g.dk, "v": g.dv, **({} if g.dbias is None else {"bias": g.dbias})}
    return named(scaled_dot_product_attention(q, k, v, **options), grads)


def baseline_arrays(q, k, v, dout, options) -> dict:
    """The same computed in float32, every stage rounded (the error budget's baseline)."""
    base = sdpa_baseline(q, k, v, dout, precision=LOW, **options)
    return named(base.out, base.grads)


def run_arrays(run) -> dict:
    g = run.grads
    return named(
        run.out, {"q": g.dq, "k": g.dk, "v": g.dv, **({} if g.dbias is None else {"bias": g.dbias})}
    )


@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_run_jax_sdpa_within_budget(name, rng):
    require_jax()
    q, k, v, dout, options = build_sdpa_case(rng, **SDPA_CASES[name])
    run = run_jax_sdpa(q, k, v, dout, **options)
    assert_within_budget(
        run_arrays(run),
        reference_arrays(q, k, v, dout, options),
        baseline_arrays(q, k, v, dout, options),
    )


@pytest.mark.parametrize("wrong", ["polarity", "alignment"])
def test_wrong_mapping_fails_the_rule(wrong, rng):
    """JAX run with the other mask polarity, or the other causal alignment, judged against the
    reference and baseline of the right options: the output and every gradient fail the rule by
    orders of magnitude (the right mappings pass it in test_run_jax_sdpa_within_budget)."""
    require_jax()
    q, k, v, dout, options = build_sdpa_case(rng, T=3, S=5, mask="B1TS")
    if wrong == "polarity":
        right, given = (
            options,
            {**options, "mask": ~options["mask"] | causal_mask(3, 5)},
        )  # True = ignore; no row empty
    else:
        right, given = dict(causal=True, align="bottom_right"), dict(causal=True, align="top_left")
    reports = judge(
        run_arrays(run_jax_sdpa(q, k, v, dout, **given)),
        reference_arrays(q, k, v, dout, right),
        baseline_arrays(q, k, v, dout, right),
    )
    assert [r.name for r in reports] == ["out", "dq", "dk", "dv"]
    excess = {r.name: r.candidate.max_abs_error / r.allowed for r in reports}
    assert min(excess.values()) > WRONG_MIN_EXCESS, excess


def test_run_jax_sdpa_keeps_the_callers_x64_setting_and_dtype(rng):
    jax = require_jax()
    before = jax.config.jax_enable_x64
    q, k, v, dout, options = build_sdpa_case(rng)
    run = run_jax_sdpa(q, k, v, dout, **options)
    assert jax.config.jax_enable_x64 == before
    assert run.out.dtype == np.float64 and run.out.flags.writeable
    run32 = run_jax_sdpa(
        q, k, v, **options, dtype=np.float32
    )  # a float32 run, for a float32 comparison
    assert run32.out.dtype == np.float32 and 1e-9 < rel_error(run32.out, run.out) < 1e-5


def test_run_jax_refuses_what_jax_cannot_express(rng):
    require_jax()
    q, k, v, dout, _ = build_sdpa_case(rng)
    with pytest.raises(UnsupportedOption, match="Dv != Dk"):
        run_jax_sdpa(q, k, np.concatenate([v, v], axis=-1))
    with pytest.raises(UnsupportedOption, match="empty_rows"):
        run_jax_sdpa(
            q, k, v, causal=True, align="bottom_right", mask=np.zeros((1, 1, 3, 5), dtype=bool)
        )
    p = init_params(rng, d_model=8, num_heads=2, v_head_dim=3)
    x = rng.normal(size=(2, 3, 8))
    with pytest.raises(UnsupportedOption, match="Dv != Dk"):
        run_jax_mha(x, x, x, p, num_heads=2)


@pytest.mark.parametrize(
    "jax_kwargs",
    [
        dict(
            query_seq_lengths=np.array([2, 4], dtype=np.int32),
            key_value_seq_lengths=np.array([3, 5], dtype=np.int32),
            is_causal=True,
        ),
        dict(
            key_value_seq_lengths=np.array([0, 4], dtype=np.int32), local_window_size=1
        ),  # batch 0: uniform
    ],
    ids=["query_and_key_lengths-causal", "key_lengths-empty_batch-window"],
)
def test_options_from_jax_kwargs_match_jax(jax_kwargs, rng):
    jax = require_jax()
    B, H, T, S, D = 2, 2, 4, 5, 3
    q, k, v = (
        rng.normal(size=(B, H, T, D)),
        rng.normal(size=(B, H, S, D)),
        rng.normal(size=(B, H, S, D)),
    )
    bias = rng.normal(size=(1, H, T, S))
    theirs = jax_call(jax, q, k, v, bias=bias, **jax_kwargs)
    options = options_from_jax_kwargs(T, S, bias=bias, **jax_kwargs)
    r = check_budget(
        theirs,
        scaled_dot_product_attention(q, k, v, **options),
        sdpa_baseline(q, k, v, precision=LOW, **options).out,
        precision=LOW,
        rtol_budget=OUTPUT_BUDGET,
    )
    assert r.passed, r


MHA_CASES = {
    "self-bias": dict(kind="self", T=5, S=5),
    "cross-gqa-kdim_vdim-T<S": dict(H=4, Hkv=2, T=3, S=6, kdim=6, vdim=5),
    "no_bias-causal_bottom_right-mask-attention_bias-fully_padded": dict(
        T=3,
        S=5,
        bias=False,
        mask=True,
        attn_bias=True,
        padded=True,
        causal=True,
        align="bottom_right",
    ),
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
    Hkv=None,
    kdim=None,
    vdim=None,
    bias=True,
    mask=False,
    attn_bias=False,
    padded=False,
    **options,
):
    p = init_params(rng, d_model=E, num_heads=H, num_kv_heads=Hkv, kdim=kdim, vdim=vdim, bias=bias)
    query = rng.normal(size=(B, T, E))
    key, value = (
        (query, query)
        if kind == "self"
        else (rng.normal(size=(B, S, kdim or E)), rng.normal(size=(B, S, vdim or E)))
    )
    if mask:
        options["mask"] = rng.random((B, 1, T, S)) < 0.7
        options["mask"][..., 0] = True  # key 0: every query may attend it under a causal mask
    if padded:
        options["mask"] = options.get("mask", np.ones((B, 1, T, S), dtype=bool)).copy()
        options["mask"][1] = False  # batch element 1: every key is padding (uniform rows)
    if attn_bias:
        options["bias"] = rng.normal(size=(1, H, T, S))
    return (
        query,
        key,
        value,
        p,
        rng.normal(size=(B, T, E)),
        dict(num_heads=H, num_kv_heads=Hkv, empty_rows="uniform", **options),
    )


@pytest.mark.parametrize("name", list(MHA_CASES))
def test_run_jax_mha_within_budget(name, rng):
    require_jax()
    query, key, value, p, dout, options = build_mha_case(rng, **MHA_CASES[name])
    run = run_jax_mha(query, key, value, p, dout, **options)
    g = multi_head_attention_backward(dout, query, key, value, p, **options)
    base = mha_baseline(query, key, value, p, dout, precision=LOW, **options)
    theirs = named(run.out, run.grads.as_dict())
    assert_within_budget(
        theirs,
        named(multi_head_attention(query, key, value, p, **options), g.as_dict()),
        named(base.out, base.grads),
    )
    # db_k is judged too: 0 in exact arithmetic (b_k shifts whole score rows), round-off on both
    # sides
    assert ("db_k" in theirs) == (p.b_k is not None)


# ---------------------------------------------------------------------------------------------
# Without jax; the docs page
# ---------------------------------------------------------------------------------------------


def test_imports_and_converts_without_jax():
    code = (
        "import sys; sys.modules['jax'] = None\n"  # import jax now raises ImportError
        "import numpy as np\n"
        "import attention_ref.adapters.jax as j\n"
        "assert j.bthd_from_bhtd(np.zeros((1, 2, 3, 4))).shape == (1, 3, 2, 4)\n"
        "assert j.jax_dpa_kwargs(2, 3, causal=True)['is_causal']\n"
        "try:\n"
        "    j.run_jax_sdpa(np.ones((1, 1, 2, 3)), np.ones((1, 1, 2, 3)), np.ones((1, 1, 2, 3)))\n"
        "except ImportError as exc:\n"
        "    assert 'pip install jax' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_docs_examples_run():
    require_jax()
    text = (ROOT / "docs" / "adapters.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    needs_torch = re.compile(r"^(import|from) (torch|attention_ref\.adapters\.torch)\b", flags=re.M)
    blocks = [b for b in blocks if not needs_torch.search(b)]
    assert any("run_jax_sdpa" in b for b in blocks), "docs/adapters.md has no jax example"
    namespace: dict = {"__name__": "docs_adapters_jax"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/adapters.md (jax-or-numpy block {i})", "exec"), namespace)
