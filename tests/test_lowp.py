"""Real low-precision formats: bfloat16 and FP8 through ml_dtypes, the rounding points of the
policies and presets, quantize_fp8 and fp8_attention, and the error budget with FP8.

The independent references here: the bfloat16 bit trick (add 0x7FFF plus the kept bit to the
float32 pattern, clear the low 16 bits), every float8_e4m3fn / e5m2 value built from its bit
fields by formula (sign, biased exponent, mantissa; OCP 8-bit floating point spec: e4m3fn has no
infinity, its all-ones pattern is NaN; e5m2 is IEEE-like), round-to-nearest-even written as a
search in that table, and FlashAttention 3's FP8 reference (``hopper/test_util.py``,
``attention_ref``: descale in float32, float32 softmax, the weights rounded to e4m3 before ``P V``
via ``intermediate_dtype``, the output in bfloat16) recomputed with einsum.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.core import precision as prec
from attention_ref.testing import check_budget, round_to, round_to_bfloat16, sdpa_baseline

ml_dtypes = pytest.importorskip("ml_dtypes")


def bit_trick_bfloat16(x):
    """The hand-written bfloat16 rounding (round to nearest even on the dropped 16 bits)."""
    f = np.asarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), np.float32(np.nan), rounded).astype(np.float32)


def fp8_table(fmt):
    """Every finite value of an FP8 format, from its bit fields, sorted (negative zero dropped)."""
    ebits, mbits, bias = {"float8_e4m3fn": (4, 3, 7), "float8_e5m2": (5, 2, 15)}[fmt]
    vals = []
    for e in range(2**ebits):
        for m in range(2**mbits):
            if fmt == "float8_e4m3fn" and e == 2**ebits - 1 and m == 2**mbits - 1:
                continue  # NaN
            if fmt == "float8_e5m2" and e == 2**ebits - 1:
                continue  # inf and NaN
            if e == 0:
                v = m / 2**mbits * 2.0 ** (1 - bias)  # subnormal
            else:
                v = (1 + m / 2**mbits) * 2.0 ** (e - bias)
            vals += [v, -v]
    return np.unique(np.array(vals))


def round_nearest_even(x, table):
    """x rounded to the nearest entry of ``table`` (ties to the one with an even mantissa: the
    even index among the non-negative values, mirrored for negatives)."""
    out = np.empty_like(x)
    pos = table[table >= 0]  # 0, then increasing; index parity = mantissa parity
    for i, val in enumerate(x.ravel()):
        a = abs(val)
        j = np.searchsorted(pos, a)
        if j == len(pos):
            out.flat[i] = np.nan
            continue
        if pos[j] == a or j == 0:
            r = pos[j]
        else:
            lo, hi = pos[j - 1], pos[j]
            if a - lo < hi - a:
                r = lo
            elif hi - a < a - lo:
                r = hi
            else:
                r = lo if (j - 1) % 2 == 0 else hi
        out.flat[i] = np.copysign(r, val)
    return out


def test_bfloat16_is_ml_dtypes_and_agrees_bit_for_bit_with_the_bit_trick():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.normal(size=20000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 20000),
            np.float32([1 + 2**-8, 1 + 3 * 2**-8, np.inf, -np.inf, np.nan, 3.4e38, 0.0, -0.0]),
        ]
    ).astype(np.float32)
    a, b = round_to_bfloat16(x), bit_trick_bfloat16(x)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_baselines_agree_bit_for_bit_with_the_hand_written_bfloat16(monkeypatch):
    """The bfloat16 baseline through ml_dtypes and through the bit trick: the same bits, forward
    and backward."""
    rng = np.random.default_rng(1)
    q, k, v = (
        rng.normal(size=(2, 4, 5, 8)),
        rng.normal(size=(2, 2, 7, 8)),
        rng.normal(size=(2, 2, 7, 6)),
    )
    dout = rng.normal(size=(2, 4, 5, 6))
    real = sdpa_baseline(q, k, v, dout, precision="bfloat16", causal=True)
    original = prec.round_to

    def hand(x, precision):
        return bit_trick_bfloat16(x) if precision == "bfloat16" else original(x, precision)

    monkeypatch.setattr(prec, "round_to", hand)
    emulated = sdpa_baseline(q, k, v, dout, precision="bfloat16", causal=True)
    assert np.array_equal(real.out, emulated.out)
    for name in real.grads:
        assert np.array_equal(real.grads[name], emulated.grads[name]), name


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_rounding_is_nearest_even_on_the_formats_own_values(fmt):
    table = fp8_table(fmt)
    ml = getattr(ml_dtypes, fmt)
    assert len(table) == {"float8_e4m3fn": 253, "float8_e5m2": 247}[fmt]  # 2*126+1, 2*123+1
    assert np.array_equal(
        np.sort(
            np.unique(
                np.arange(256, dtype=np.uint8)
                .view(ml)
                .astype(np.float64)[
                    np.isfinite(np.arange(256, dtype=np.uint8).view(ml).astype(np.float64))
                ]
            )
        ),
        table,
    )
    rng = np.random.default_rng(2)
    top = table.max()
    x = np.concatenate(
        [
            rng.uniform(-top, top, 3000),
            rng.normal(size=3000) * 2.0 ** rng.integers(-18, 4, 3000),
            (table[1:] + table[:-1]) / 2,  # every tie
        ]
    ).astype(np.float32)
    want = round_nearest_even(x.astype(np.float64), table)
    got = round_to(x, fmt).astype(np.float64)
    assert np.array_equal(got, want, equal_nan=True)
    assert prec.UNIT_ROUNDOFF[fmt] == 2.0 ** -{"float8_e4m3fn": 4, "float8_e5m2": 3}[fmt]


def test_e4m3fn_overflow_is_nan_and_quantize_saturates():
    assert np.isnan(round_to(np.float32(500.0), "float8_e4m3fn"))  # no infinity in e4m3fn
    assert np.isinf(round_to(np.float32(1e6), "float8_e5m2"))
    x = np.zeros((1, 1, 2, 2))
    x[0, 0, 0, 0], x[0, 0, 1, 1] = 1000.0, -3.0
    qx = ar.quantize_fp8(x, granularity="tensor")
    assert float(qx.data.astype(np.float32)[0, 0, 0, 0]) == 448.0  # the amax maps to fmt_max
    assert np.isfinite(qx.data.astype(np.float32)).all()


@pytest.mark.parametrize("granularity,block", [("tensor", None), ("head", None), ("block", 3)])
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
def test_quantize_fp8_scales_and_error(granularity, block, fmt):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 7, 5)) * rng.uniform(0.1, 10, size=(2, 3, 1, 1))
    before = x.copy()
    qx = ar.quantize_fp8(x, fmt, granularity, block=block)
    assert np.array_equal(x, before)
    assert qx.data.dtype == np.dtype(getattr(ml_dtypes, fmt)) and qx.data.shape == x.shape
    top = float(ml_dtypes.finfo(getattr(ml_dtypes, fmt)).max)
    a = np.abs(x)
    if granularity == "tensor":
        amax = a.max()
    elif granularity == "head":
        amax = a.max(axis=(2, 3))
    else:
        amax = np.stack([a[:, :, i : i + 3].max(axis=(2, 3)) for i in range(0, 7, 3)], axis=-1)
    np.testing.assert_allclose(qx.scale, amax / top, rtol=2**-23)
    assert qx.scale.shape == np.shape(amax)
    err = np.abs(qx.dequantize() - x)
    rel = err / np.maximum(np.abs(x), 1e-300)
    normal = np.abs(qx.data.astype(np.float64)) >= float(
        ml_dtypes.finfo(getattr(ml_dtypes, fmt)).tiny
    )
    assert rel[normal].max() <= prec.UNIT_ROUNDOFF[fmt] * (1 + 1e-6)


def independent_fp8_attention(qf, kf, vf, qd, kd, vd, causal):
    """FlashAttention 3's FP8 reference, recomputed: descale in float32, float32 scores and
    softmax, the normalised weights to e4m3, P V in float32, the output to bfloat16."""
    G = qf.shape[1] // kf.shape[1]
    q = qf.astype(np.float32) * np.repeat(qd, G, axis=1)[:, :, None, None].astype(np.float32)
    k = kf.astype(np.float32) * kd[:, :, None, None].astype(np.float32)
    v = vf.astype(np.float32) * vd[:, :, None, None].astype(np.float32)
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q, k) * np.float32(1 / np.sqrt(q.shape[-1]))
    if causal:
        T, S = s.shape[-2:]
        s = np.where(np.arange(S)[None] <= np.arange(T)[:, None], s, -np.inf).astype(np.float32)
    e = np.exp(s - s.max(-1, keepdims=True))
    p = (e / e.sum(-1, keepdims=True)).astype(np.float32)
    p8 = p.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    out = np.einsum("bhts,bhsd->bhtd", p8, v).astype(np.float32)
    return out.astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_fp8_attention_matches_flash_attention_3s_reference_recomputed(causal):
    rng = np.random.default_rng(4)
    q, k, v = (
        rng.normal(size=(2, 4, 9, 16)),
        rng.normal(size=(2, 2, 11, 16)),
        rng.normal(size=(2, 2, 11, 8)),
    )
    if causal:
        k, v = k[:, :, :9], v[:, :, :9]
    k8, v8 = ar.quantize_fp8(k, granularity="head"), ar.quantize_fp8(v, granularity="head")
    # FA3's q_descale is (batch, num_heads_k), shared by the query heads of each kv head: one
    # scale per tensor here, given in that layout
    q8 = ar.quantize_fp8(q, granularity="tensor")
    qd = np.full((2, 2), q8.scale, dtype=np.float32)
    inputs = [x.copy() for x in (q8.data, k8.data, v8.data)]
    got = ar.fp8_attention(
        q8.data,
        k8.data,
        v8.data,
        q_descale=qd,
        k_descale=k8.scale,
        v_descale=v8.scale,
        causal=causal,
    )
    assert all(
        np.array_equal(a, b) for a, b in zip(inputs, (q8.data, k8.data, v8.data), strict=True)
    )
    want = independent_fp8_attention(q8.data, k8.data, v8.data, qd, k8.scale, v8.scale, causal)
    diff = np.abs(got - want)
    # float32 sums in another order can move a weight across an e4m3 tie or an output across a
    # bfloat16 one: rare, and by one unit
    assert (diff == 0).mean() >= 0.97
    assert diff.max() <= 2 * 2**-8 * np.abs(want).max()
    ref = ar.scaled_dot_product_attention(q, k, v, causal=causal)
    assert 1e-3 < np.abs(got - ref).max() / np.abs(ref).max() < 0.2  # FP8 is coarse


def test_flash_attention_2_preset_rounds_only_the_weights_and_the_output():
    rng = np.random.default_rng(5)
    q, k, v = (
        rng.normal(size=(1, 2, 6, 8)),
        rng.normal(size=(1, 2, 6, 8)),
        rng.normal(size=(1, 2, 6, 4)),
    )
    base = sdpa_baseline(q, k, v, policy="flash_attention_2_bf16")
    bf = ml_dtypes.bfloat16
    qb, kb, vb = (x.astype(np.float32).astype(bf).astype(np.float32) for x in (q, k, v))
    s = np.einsum("bhtd,bhsd->bhts", qb, kb) * np.float32(1 / np.sqrt(8))
    e = np.exp(s - s.max(-1, keepdims=True))
    p = (e / e.sum(-1, keepdims=True)).astype(np.float32).astype(bf).astype(np.float32)
    want = np.einsum("bhts,bhsd->bhtd", p, vb).astype(np.float32).astype(bf).astype(np.float32)
    diff = np.abs(base.out - want)
    assert (diff == 0).mean() >= 0.9 and diff.max() <= 2**-7 * np.abs(want).max()
    every = sdpa_baseline(q, k, v, policy="pytorch_bf16")
    assert not np.array_equal(every.out, base.out)  # rounding every stage is another policy
    assert prec.PRESETS["flash_attention_3_fp8"].format_at("probs") == "float8_e4m3fn"
    assert prec.PRESETS["flash_attention_3_fp8"].format_at("output") == "bfloat16"


def test_the_error_budget_accepts_fp8_candidates_and_catches_a_wrong_one():
    rng = np.random.default_rng(6)
    q, k, v = (rng.normal(size=(2, 2, 32, 16)) for _ in range(3))
    ref = ar.scaled_dot_product_attention(q, k, v)
    q8, k8, v8 = (ar.quantize_fp8(x) for x in (q, k, v))
    kw = dict(q_descale=q8.scale, k_descale=k8.scale, v_descale=v8.scale)
    base = ar.fp8_attention(q8.data, k8.data, v8.data, **kw)
    # a candidate summing in another order (the keys reversed): the same function
    cand = ar.fp8_attention(q8.data, k8.data[:, :, ::-1], v8.data[:, :, ::-1], **kw)
    assert check_budget(cand, ref, base, precision="float8_e4m3fn").passed
    wrong = ar.fp8_attention(q8.data, k8.data, v8.data, **{**kw, "v_descale": 1.0})  # no v descale
    assert not check_budget(wrong, ref, base, precision="float8_e4m3fn").passed
    assert ar.testing.noise_floor(ref, "float8_e4m3fn") == ar.testing.noise_floor(ref, "bfloat16")


def test_missing_ml_dtypes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(ImportError, match=r"attention_ref\[lowp\]"):
        round_to(1.0, "bfloat16")
    with pytest.raises(ImportError, match=r"attention_ref\[lowp\]"):
        ar.quantize_fp8(np.ones((1, 1, 1, 1)))
    assert float(round_to(0.1, "float16")) == float(np.float16(0.1))  # NumPy's own formats work


def test_bad_inputs():
    x = np.ones((1, 1, 2, 2))
    with pytest.raises(ValueError, match="x must be 4-D"):
        ar.quantize_fp8(np.ones((2, 2)))
    with pytest.raises(ValueError, match="fmt must be one of"):
        ar.quantize_fp8(x, "float8_e3m4")
    with pytest.raises(ValueError, match="needs block="):
        ar.quantize_fp8(x, granularity="block")
    with pytest.raises(ValueError, match="block is only for"):
        ar.quantize_fp8(x, granularity="head", block=2)
    with pytest.raises(ValueError, match="finite"):
        ar.quantize_fp8(x * np.nan)
    with pytest.raises(ValueError, match=r"q8 must hold float8_e4m3fn values.*quantize_fp8"):
        ar.fp8_attention(x * 0.1, x, x)
    with pytest.raises(ValueError, match=r"k_descale of shape \(B, H\) must be \(1, 1\)"):
        ar.fp8_attention(x, x, x, k_descale=np.ones((2, 2)))
    with pytest.raises(ValueError, match="give descale_block"):
        ar.fp8_attention(x, x, x, q_descale=np.ones((1, 1, 2)))
    with pytest.raises(ValueError, match="fp8_attention does not support rounding"):
        ar.fp8_attention(x, x, x, rounding=prec.Rounding("bfloat16"))
    with pytest.raises(ValueError, match=r"probs must be None or one of"):
        prec.Rounding("bfloat16", probs="int8")
    with pytest.raises(ValueError, match="needs a low precision"):
        prec.Rounding("float64", output="bfloat16")
    with pytest.raises(ValueError, match="policy must be a Rounding or one of"):
        sdpa_baseline(x, x, x, policy="fa9")
    with pytest.raises(ValueError, match="not both"):
        sdpa_baseline(x, x, x, precision="bfloat16", policy="pytorch_bf16")
