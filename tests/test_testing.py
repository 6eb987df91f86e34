"""attention_ref.testing: compare / assert_close, bfloat16 emulation, and the error-budget rule.

The error-budget tests run honest low-precision candidates (an independent float32 NumPy
attention written here, PyTorch's bfloat16/float16 SDPA on the CPU, the reordered baseline) and
candidates with planted bugs (scale off by 1%, a causal mask off by one position), and show the
rule passing the first and failing the second.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import require_torch

from attention_ref import scaled_dot_product_attention as sdpa
from attention_ref.cases import cases, get_case
from attention_ref.testing import (
    DEFAULT_TOLERANCES,
    GRADIENT_BUDGET,
    OUTPUT_BUDGET,
    assert_close,
    assert_within_budget,
    budget_reports,
    check_budget,
    compare,
    noise_floor,
    round_to,
    round_to_bfloat16,
    sdpa_baseline,
)

# ----------------------------------------------------------------------------- bfloat16 emulation


def test_bfloat16_rounding_by_hand():
    # spacing of bfloat16 at 1 is 2^-7: 1 + 2^-8 is a tie between 1 (even) and 1 + 2^-7 (odd)
    x = np.array(
        [1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 2.0**-130, 0.0, -0.0]
    )
    want = [1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -1.0, 2.0**-130, 0.0, -0.0]
    got = round_to_bfloat16(x)
    assert got.dtype == np.float32 and got.tolist() == want
    assert np.signbit(got[-1])
    special = round_to_bfloat16(np.array([np.inf, -np.inf, np.nan, 3.4e38]))
    assert special[0] == np.inf and special[1] == -np.inf and np.isnan(special[2])
    assert special[3] == np.inf  # past the largest bfloat16 (3.39e38): rounds to infinity


def test_bfloat16_rounding_keeps_8_significant_bits(rng):
    x = rng.normal(size=10_000) * 10.0 ** rng.integers(-30, 30, size=10_000)
    r = round_to_bfloat16(x).astype(np.float64)
    x32 = x.astype(np.float32).astype(np.float64)
    assert np.all(np.abs(r - x32) <= 2.0**-8 * np.abs(x32))  # half an ulp: u = 2^-8
    m, _ = np.frexp(r)
    assert np.all(np.abs(m * 2**8 - np.round(m * 2**8)) == 0)  # 8 significant bits


def test_bfloat16_rounding_matches_torch(rng):
    torch = require_torch()
    x = (rng.normal(size=5000) * 10.0 ** rng.integers(-20, 20, size=5000)).astype(np.float32)
    x[:4] = [1 + 2**-8, 1 + 3 * 2**-8, np.inf, -np.inf]
    theirs = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(round_to_bfloat16(x), theirs)


def test_round_to_other_precisions():
    assert float(round_to(1 + 2**-12, "float16")) == 1.0
    assert float(round_to(1 + 2**-25, "float32")) == 1.0
    assert round_to(0.1, "float64").dtype == np.float64
    with pytest.raises(ValueError, match="precision must be one of"):
        round_to(1.0, "bf16")


def test_noise_floor_is_two_ulps_of_the_output_plus_point_three(rng):
    """noise_floor is the bound of FlashAttention's empirical ``2 max|fl(fl(r + 0.3) - 0.3) - r|``:
    two gaps between neighbours of precision p at max|r| + 0.3. Checked on worked values, against
    numpy's np.spacing, and against the empirical form itself on large arrays in each precision
    (numpy's float64, float32, float16 arithmetic; torch's bfloat16): never above the floor, at
    least a quarter of it, and reaching it where r fills the binade of max|r| + 0.3."""
    # worked by hand: the gap of p significant bits in [2^e, 2^(e+1)) is 2^(e - p + 1)
    assert noise_floor([1.0, -0.5], "bfloat16") == 2 * 2.0**-7  # 1.3 in [1, 2), p = 8
    assert noise_floor([-3.0, 2.0], "float16") == 2 * 2.0**-9  # 3.3 in [2, 4), p = 11
    assert noise_floor([0.0], "float32") == 2 * 2.0**-25  # 0.3 in [0.25, 0.5), p = 24
    assert noise_floor([1000.0, np.nan, -np.inf], "float64") == 2 * 2.0**-43  # [512, 1024), p = 53
    assert noise_floor([np.nan, np.inf], "float32") == 0.0  # nothing finite: no floor
    # np.spacing: the gap above a value of that dtype; bfloat16 keeps float32's exponent and 16
    # fewer significand bits, so its gap is float32's times 2^16
    spacing = {
        "float64": lambda x: np.spacing(np.float64(x)),
        "float32": lambda x: np.spacing(np.float32(x)),
        "float16": lambda x: np.spacing(np.float16(x)),
        "bfloat16": lambda x: np.spacing(np.float32(x)) * 2.0**16,
    }
    for m in rng.uniform(0.0, 1.0, 60) * 10.0 ** rng.integers(-4, 4, 60):  # max|r| over 8 decades
        r = m * rng.uniform(-1, 1, 5)
        top = float(np.max(np.abs(r))) + 0.3
        for precision, gap in spacing.items():
            assert noise_floor(r, precision) == 2 * float(gap(top)), (precision, top)

    # the empirical form, on 10^5 entries per case, each precision's own arithmetic; the last
    # subtraction is exact in float64
    def numpy_empirical(dtype):
        def fl_fl(r):
            rp = r.astype(dtype)
            return ((rp + 0.3) - 0.3).astype(np.float64), rp.astype(np.float64)  # NEP 50: in dtype

        return fl_fl

    def bfloat16_empirical(r):
        torch = require_torch()
        rp = torch.from_numpy(r).to(torch.bfloat16)
        return (rp + 0.3 - 0.3).double().numpy(), rp.double().numpy()

    forms = {
        "float64": numpy_empirical(np.float64),
        "float32": numpy_empirical(np.float32),
        "float16": numpy_empirical(np.float16),
        "bfloat16": bfloat16_empirical,
    }
    for precision, fl_fl in forms.items():
        ratios = {}
        for m in (0.01, 0.2, 0.69, 1.0, 1.5, 3.0, 200.0):  # 0.69, 1.5: r fills m + 0.3's binade
            y, r = fl_fl(m * rng.uniform(-1, 1, 100_000))
            empirical = 2 * float(np.max(np.abs(y - r)))
            ratios[m] = empirical / noise_floor(r, precision)
        assert all(0.25 <= x <= 1.0 for x in ratios.values()), (precision, ratios)
        assert max(ratios[0.69], ratios[1.5]) >= 0.99, (precision, ratios)  # the bound is reached


# ---------------------------------------------------------------------------- compare, assert_close


def test_compare_reports_where_and_both_values():
    a = np.zeros((2, 3))
    e = np.zeros((2, 3))
    a[1, 2], e[1, 2] = 1.5, 1.0
    a[0, 0] = np.nan
    e[0, 1] = np.inf
    c = compare(a, e, name="dq")
    assert (c.max_abs_error, c.location, c.actual, c.expected) == (0.5, (1, 2), 1.5, 1.0)
    assert (c.nan_mismatch, c.inf_mismatch) == (1, 1)
    assert "dq (2, 3)" in str(c) and "(1, 2)" in str(c) and "1 NaN and 1 Inf mismatches" in str(c)
    with pytest.raises(ValueError, match=r"must have the reference's shape \(2, 3\); got \(3, 2\)"):
        compare(a.T, e)


def test_compare_accepts_torch_tensors_including_bfloat16():
    torch = require_torch()
    t = torch.tensor([1.0, 2.0], dtype=torch.bfloat16, requires_grad=True) * 1
    c = compare(t, np.array([1.0, 2.0]))
    assert c.max_abs_error == 0.0


def test_assert_close_message_is_the_report():
    ref = np.linspace(0, 1, 12).reshape(3, 4)
    bad = ref.copy()
    bad[2, 1] += 1e-3
    with pytest.raises(AssertionError) as err:
        assert_close(bad, ref, name="out")
    text = str(err.value)
    assert "out (3, 4): max abs error 1.000e-03 at index (2, 1)" in text
    assert "rtol = 1e-12" in text and "1 of 12 entries break it" in text


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_assert_close_defaults_follow_the_candidates_precision(precision, rng):
    ref = rng.normal(size=1000)
    cand = round_to(ref, precision)  # half an ulp off at most: inside every default
    assert_close(cand, ref, precision=precision)
    tol = DEFAULT_TOLERANCES[precision]
    with pytest.raises(AssertionError, match=precision):
        assert_close(ref * (1 + 3 * tol.rtol) + 3 * tol.atol, ref, precision=precision)


def test_assert_close_checks_nan_and_inf_placement():
    with pytest.raises(AssertionError, match="1 NaN and 0 Inf mismatches"):
        assert_close(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    assert_close(np.array([np.nan, -np.inf]), np.array([np.nan, -np.inf]))


# ----------------------------------------------------------------------------- the error budget


def _float32_attention(q, k, v, *, scale=None, causal=False, shift=0):
    """An independent float32 attention (top_left causal shifted by ``shift`` diagonals: a planted
    bug)."""
    q, k, v = (np.asarray(a, dtype=np.float32) for a in (q, k, v))
    scale = np.float32(1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    s = (q * scale) @ np.swapaxes(k, -1, -2)
    if causal:
        T, S = s.shape[-2:]
        allowed = np.arange(S)[None, :] <= np.arange(T)[:, None] + shift
        s = np.where(allowed, s, np.float32(-1e30))
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


@pytest.fixture
def qkv(rng):
    return (
        rng.normal(size=(2, 4, 32, 16)),
        rng.normal(size=(2, 4, 40, 16)),
        rng.normal(size=(2, 4, 40, 16)),
    )


def test_budget_passes_an_honest_float32_candidate_and_fails_planted_bugs(qkv):
    q, k, v = qkv
    ref = sdpa(q, k, v, causal=True)
    base = sdpa(q, k, v, causal=True, dtype=np.float32)  # the baseline: the reference in float32
    report = assert_within_budget(
        _float32_attention(q, k, v, causal=True), ref, base, precision="float32"
    )
    assert report.ratio < OUTPUT_BUDGET
    scale_bug = check_budget(
        _float32_attention(q, k, v, causal=True, scale=1.01 / 4), ref, base, precision="float32"
    )
    mask_bug = check_budget(
        _float32_attention(q, k, v, causal=True, shift=1), ref, base, precision="float32"
    )
    assert not scale_bug.passed and scale_bug.ratio > 1e3
    assert not mask_bug.passed and mask_bug.ratio > 1e3
    with pytest.raises(AssertionError, match="OVER BUDGET"):
        assert_within_budget(
            _float32_attention(q, k, v, causal=True, shift=1), ref, base, precision="float32"
        )


def test_budget_with_an_emulated_bfloat16_candidate(qkv):
    q, k, v = qkv
    ref = sdpa(q, k, v, causal=True)
    base = sdpa_baseline(q, k, v, precision="bfloat16", causal=True)
    honest = sdpa_baseline(
        q * 1.0, k, v, precision="bfloat16", causal=True, reorder=True, scale=0.3
    )
    ref_03 = sdpa(q, k, v, causal=True, scale=0.3)
    base_03 = sdpa_baseline(q, k, v, precision="bfloat16", causal=True, scale=0.3)
    assert check_budget(
        honest.out, ref_03, base_03.out, precision="bfloat16"
    ).passed  # a different order passes
    # a causal mask shifted by one position is far outside a bfloat16 budget
    shifted = sdpa_baseline(q, k, v, precision="bfloat16", mask=np.tri(32, 40, k=1, dtype=bool))
    report = check_budget(shifted.out, ref, base.out, precision="bfloat16")
    assert not report.passed and report.ratio > 10
    # bfloat16 carries 8 bits: a 1% scale error is inside its noise at unit-size scores; 10% is not
    scaled = sdpa_baseline(q, k, v, precision="bfloat16", causal=True, scale=1.1 / 4)
    assert not check_budget(scaled.out, ref, base.out, precision="bfloat16").passed


@pytest.mark.parametrize("case", [c for c in cases() if "long" not in c.tags], ids=str)
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_reordered_baseline_is_within_budget_on_every_case(case, precision):
    from attention_ref import MultiHeadParams
    from attention_ref.testing import mha_baseline

    data = case.build()
    if case.kind == "sdpa":
        cand = sdpa_baseline(
            **data.inputs, dout=data.cotangent, precision=precision, reorder=True, **data.options
        )
    else:
        w = {n: a for n, a in data.inputs.items() if n.startswith(("w_", "b_"))}
        extra = {"bias": data.inputs["bias"]} if "bias" in data.inputs else {}
        cand = mha_baseline(
            data.inputs["query"],
            data.inputs["key"],
            data.inputs["value"],
            MultiHeadParams(**w),
            data.cotangent,
            precision=precision,
            reorder=True,
            **extra,
            **data.options,
        )
    reports = budget_reports(data, cand.out, cand.grads, precision=precision)
    assert len(reports) == 1 + len(data.inputs)
    assert all(r.passed for r in reports), "\n".join(map(str, reports))
    assert [r.rtol_budget for r in reports] == [OUTPUT_BUDGET] + [GRADIENT_BUDGET] * len(
        data.inputs
    )


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
def test_budget_on_torch_low_precision_sdpa(dtype_name, qkv):
    """A real low-precision implementation: PyTorch's SDPA on the CPU, forward and backward."""
    torch = require_torch()
    q, k, v = qkv
    data_dout = np.random.default_rng(1).normal(size=(2, 4, 32, 16))
    dt = getattr(torch, dtype_name)
    tq, tk, tv = (torch.tensor(a, dtype=dt, requires_grad=True) for a in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    out.backward(torch.tensor(data_dout, dtype=dt))
    from attention_ref import scaled_dot_product_attention_backward

    ref_out = sdpa(q, k, v, causal=True)
    ref_g = scaled_dot_product_attention_backward(data_dout, q, k, v, causal=True)
    base = sdpa_baseline(q, k, v, data_dout, precision=dtype_name, causal=True)
    assert base.grads is not None
    assert_within_budget(out, ref_out, base.out, precision=dtype_name, name="out")
    for name, theirs, ref in (
        ("q", tq.grad, ref_g.dq),
        ("k", tk.grad, ref_g.dk),
        ("v", tv.grad, ref_g.dv),
    ):
        assert_within_budget(
            theirs,
            ref,
            base.grads[name],
            precision=dtype_name,
            rtol_budget=GRADIENT_BUDGET,
            name="d" + name,
        )


def test_budget_report_reads_without_a_debugger(qkv):
    q, k, v = qkv
    ref = sdpa(q, k, v)
    r = check_budget(
        _float32_attention(q, k, v, scale=0.3),
        ref,
        sdpa(q, k, v, dtype=np.float32),
        precision="float32",
        name="out",
    )
    text = str(r)
    assert text.startswith("out: OVER BUDGET (float32): candidate error")
    assert "2 x baseline error" in text and "at index" in text and "ratio" in text


def test_budget_arguments_are_validated(qkv):
    q, k, v = qkv
    ref = sdpa(q, k, v)
    with pytest.raises(ValueError, match="rtol_budget must be a number >= 1; got 0.5"):
        check_budget(ref, ref, ref, precision="float32", rtol_budget=0.5)
    with pytest.raises(ValueError, match="precision must be one of"):
        check_budget(ref, ref, ref, precision="fp32")
    with pytest.raises(ValueError, match="a baseline does not support dtype"):
        sdpa_baseline(q, k, v, precision="float32", dtype=np.float64)
    with pytest.raises(ValueError, match="not an input of case 'gqa'"):
        data = get_case("gqa").build()
        budget_reports(data, data.reference().out, {"x": ref}, precision="float32")
