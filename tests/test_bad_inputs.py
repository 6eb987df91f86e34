"""Inputs that used to escape validation (issue: reliability) now give a ValueError or TypeError
naming the argument, or are honoured as documented: huge window bounds, empty softmax axes,
non-bool flags, numpy.ma masks, scores that overflow, calls too large for the plain path, and
ml_dtypes inputs (upcast exactly)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special

import attention_ref as ar
from attention_ref.core import attention as core_attention


@pytest.fixture
def qkv(rng):
    return rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 3))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(window=(2**63, None)), r"window\[0\] \(left\) must be at most"),
        (dict(window=(None, 2**70)), r"window\[1\] \(right\) must be at most"),
        (dict(chunk_size=2**63), "chunk_size must be at most"),
        (dict(causal=True, window=(2, 0), sink_tokens=2**64), "sink_tokens must be at most"),
    ],
)
def test_positions_past_int64_are_refused(qkv, options, match):
    with pytest.raises(ValueError, match=match):
        ar.scaled_dot_product_attention(*qkv, **options)
    with pytest.raises(ValueError, match=match.split(" ")[0]):
        ar.AllowedPairs.build(3, 5, **options)


def test_a_window_as_large_as_allowed_is_unbounded(qkv):
    big = ar.scaled_dot_product_attention(*qkv, window=(2**40, 2**40))
    np.testing.assert_array_equal(big, ar.scaled_dot_product_attention(*qkv))


def test_softmax_and_logsumexp_refuse_an_empty_axis_and_loose_flags():
    for f in (ar.softmax, ar.logsumexp):
        with pytest.raises(ValueError, match="length 0 along axis"):
            f(np.zeros((2, 0)))
    with pytest.raises(TypeError, match="keepdims must be a bool; got 'no'"):
        ar.logsumexp([1.0, 2.0], keepdims="no")
    with pytest.raises(TypeError, match="keepdims must be a bool"):
        ar.logsumexp_backward(1.0, [1.0, 2.0], keepdims=1)


@pytest.mark.parametrize(
    "row", [[np.inf, 0.0], [np.nan, 1.0], [-np.inf, -np.inf], [np.inf, np.inf], [1.0, -np.inf]]
)
def test_softmax_of_non_finite_rows_is_scipys(row):
    with np.errstate(invalid="ignore"):
        want = scipy.special.softmax(np.array(row))
    np.testing.assert_array_equal(ar.softmax(row), want)


def test_masked_arrays_are_refused_not_silently_unmasked(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="q is a numpy.ma masked array"):
        ar.scaled_dot_product_attention(np.ma.array(q, mask=q > 0), k, v)
    mask = np.ma.array(np.ones((3, 5), bool), mask=np.eye(3, 5, dtype=bool))
    with pytest.raises(TypeError, match="mask is a numpy.ma masked array"):
        ar.scaled_dot_product_attention(q, k, v, mask=mask)


@pytest.mark.parametrize("how", ["large inputs", "large scale"])
def test_scores_that_overflow_are_an_error_not_nan(qkv, how):
    q, k, v = qkv
    kw = {"scale": 1e308} if how == "large scale" else {}
    q = q * 1e155 if how == "large inputs" else q
    k = k * 1e155 if how == "large inputs" else k
    with pytest.raises(ValueError, match="the scores overflowed"):
        ar.scaled_dot_product_attention(q, k, v, **kw)
    # the same inputs with a soft-cap are finite: nothing overflows after the cap
    assert np.isfinite(ar.scaled_dot_product_attention(q, k, v, softcap=5.0, **kw)).all()


def test_a_call_too_large_for_the_plain_path_is_refused_before_allocating(monkeypatch, qkv):
    q, k, v = qkv
    monkeypatch.setattr(core_attention, "MAX_INTERMEDIATE_BYTES", 3 * 2 * 3 * 5 * 8 - 1)
    with pytest.raises(ValueError, match="flash_attention_forward, whose memory is linear"):
        ar.scaled_dot_product_attention(q, k, v)
    monkeypatch.setattr(core_attention, "MAX_INTERMEDIATE_BYTES", 3 * 2 * 3 * 5 * 8)
    ar.scaled_dot_product_attention(q, k, v)  # exactly at the limit: allowed
    monkeypatch.setenv("ATTENTION_REF_MAX_BYTES", "10")
    with pytest.raises(ValueError, match="ATTENTION_REF_MAX_BYTES"):
        ar.scaled_dot_product_attention(q, k, v)
    monkeypatch.setenv("ATTENTION_REF_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="must be an int"):
        ar.scaled_dot_product_attention(q, k, v)
    from attention_ref.variants.flash import flash_attention_forward

    monkeypatch.setenv("ATTENTION_REF_MAX_BYTES", "10")
    flash_attention_forward(q, k, v)  # the tiled path has no such limit


def test_ml_dtypes_inputs_are_upcast_exactly(qkv):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = qkv
    for dt in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        lo = [x.astype(dt) for x in (q, k, v)]
        exact = [x.astype(np.float64) for x in lo]  # every value of these formats is a float64
        np.testing.assert_array_equal(
            ar.scaled_dot_product_attention(*lo), ar.scaled_dot_product_attention(*exact)
        )


def test_multi_head_params_refuse_head_counts_they_were_not_made_for(rng):
    p = ar.init_params(rng, d_model=8, num_heads=4, num_kv_heads=2)
    x = rng.normal(size=(2, 3, 8))
    assert (p.num_heads, p.num_kv_heads) == (4, 2)
    # 4 heads of width 2 would run as 8 heads of width 1: another model, same shapes
    with pytest.raises(ValueError, match="made for num_heads=4, num_kv_heads=2; got num_heads=8"):
        ar.multi_head_attention(x, x, x, p, num_heads=8, num_kv_heads=4)
    ar.multi_head_attention(x, x, x, p, num_heads=4, num_kv_heads=2)
    # weights from elsewhere carry no counts and are not checked; as_dict holds arrays only
    bare = ar.MultiHeadParams(**p.as_dict())
    assert bare.num_heads is None and set(bare.as_dict()) == set(p.as_dict())
    ar.multi_head_attention(x, x, x, bare, num_heads=8, num_kv_heads=4)


def test_a_key_padding_mask_goes_in_its_own_argument_never_guessed(rng):
    """A (B, S) key-padding mask given as mask= is read as (T, S) by numpy's broadcasting (here
    B == T, so it even fits); key_padding_mask= says what it is, and every path agrees."""
    from attention_ref.variants.context_parallel import context_parallel_attention
    from attention_ref.variants.flash import flash_attention_backward, flash_attention_forward

    B, H, T, S = 3, 2, 3, 4
    q, k, v = (
        rng.normal(size=(B, H, T, 4)),
        rng.normal(size=(B, H, S, 4)),
        rng.normal(size=(B, H, S, 5)),
    )
    keys = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)  # (B, S): True = may attend
    by_hand = ar.scaled_dot_product_attention(q, k, v, mask=keys[:, None, None, :])
    got = ar.scaled_dot_product_attention(q, k, v, key_padding_mask=keys)
    np.testing.assert_array_equal(got, by_hand)
    assert not np.allclose(ar.scaled_dot_product_attention(q, k, v, mask=keys[:, :S]), by_hand)
    tiled = flash_attention_forward(q, k, v, key_padding_mask=keys, block_k=3)
    np.testing.assert_allclose(tiled.out, by_hand, rtol=1e-13)
    ring = context_parallel_attention(q[..., :2, :], k, v, 2, key_padding_mask=keys)
    want = ar.scaled_dot_product_attention(q[..., :2, :], k, v, key_padding_mask=keys)
    np.testing.assert_allclose(ring, want, rtol=1e-13)
    dout = rng.normal(size=got.shape)
    g = ar.scaled_dot_product_attention_backward(dout, q, k, v, key_padding_mask=keys)
    gt = flash_attention_backward(dout, q, k, v, *tiled, key_padding_mask=keys)
    np.testing.assert_allclose(gt.dk, g.dk, rtol=1e-12, atol=1e-15)
    assert np.all(g.dk[1, :, 2:] == 0) and np.all(g.dv[2, :, 1:] == 0)  # padded keys: no gradient
    with pytest.raises(ValueError, match=r"key_padding_mask must have the scores' batch dims"):
        ar.scaled_dot_product_attention(q, k, v, key_padding_mask=keys[:1])
    with pytest.raises(TypeError, match="key_padding_mask must be a boolean array"):
        ar.scaled_dot_product_attention(q, k, v, key_padding_mask=keys.astype(int))
    with pytest.raises(ValueError, match="varlen attention does not support key_padding_mask"):
        from attention_ref.variants.varlen import varlen_attention

        varlen_attention(
            q[0].swapaxes(0, 1),
            k[0].swapaxes(0, 1),
            v[0].swapaxes(0, 1),
            [0, 3],
            [0, 4],
            key_padding_mask=keys,
        )
