"""Decoding with a KV cache: token by token and in chunks equals full causal self-attention
(both alignments, and an independent loop implementation), with GQA, MQA, sliding windows,
soft-capping and batch dims; the cache is never mutated; errors for mismatched heads and widths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from naive import naive_attention

import attention_ref as ar
from attention_ref.gradcheck import error_report
from attention_ref.variants.decode import DecodeResult, KVCache, decode_step

#: Decoding against full attention: the same float64 formula per row, but with the cached keys
#: only (the full call adds exact zeros for the future keys), so a few ulps apart, far below this.
RTOL = 1e-12
#: A wrong step (top-left alignment) is off by O(1) relative; anything above this is a failure.
WRONG_MIN = 1e-3

# (id, batch dims, H, Hkv, L, Dk, Dv, options). L positions in all, Dk != Dv, H > 1.
CASES = [
    ("GQA", (2,), 4, 2, 7, 5, 3, {}),
    ("MHA", (2,), 3, 3, 6, 4, 2, {}),
    ("MQA", (2,), 4, 1, 6, 3, 5, {}),
    ("sliding window", (2,), 4, 2, 8, 5, 3, {"window": (2, 0)}),
    ("window with right side", (2,), 4, 2, 6, 5, 3, {"window": (1, 3)}),
    ("softcap and scale", (2,), 4, 2, 6, 5, 3, {"softcap": 1.5, "scale": 0.9}),
    ("two batch dims", (2, 3), 2, 1, 5, 4, 6, {"window": (3, None)}),
    ("no batch dim, B = 1", (), 2, 2, 5, 3, 2, {}),
]
IDS = [c[0] for c in CASES]
#: Chunk sizes tried for each case (summing to L): one token at a time, a prompt then tokens,
#: uneven chunks, and the whole sequence at once.
CHUNKINGS = {
    "tokens": "ones",
    "prompt then tokens": "prompt",
    "uneven chunks": "uneven",
    "one chunk": "all",
}


def chunk_sizes(kind, L):
    return {"ones": [1] * L, "prompt": [3] + [1] * (L - 3), "uneven": [2, 1, L - 4, 1], "all": [L]}[
        kind
    ]


def make_sequence(rng, lead, H, Hkv, L, Dk, Dv):
    return (
        rng.normal(size=lead + (H, L, Dk)),
        rng.normal(size=lead + (Hkv, L, Dk)),
        rng.normal(size=lead + (Hkv, L, Dv)),
    )


def run_decoding(q, k, v, sizes, **opts):
    """Feed the sequence through decode_step in chunks of the given sizes; the outputs
    concatenated."""
    lead, Hkv, Dk, Dv = k.shape[:-3], k.shape[-3], k.shape[-1], v.shape[-1]
    cache = KVCache.empty(lead, num_kv_heads=Hkv, head_dim=Dk, v_head_dim=Dv)
    outs, start = [], 0
    for size in sizes:
        block = slice(start, start + size)
        out, cache = decode_step(
            q[..., block, :], cache, k[..., block, :], v[..., block, :], **opts
        )
        assert out.shape == q.shape[:-2] + (size, Dv)
        outs.append(out)
        start += size
    assert cache.length == q.shape[-2]
    return np.concatenate(outs, axis=-2), cache


@pytest.mark.parametrize("chunking", list(CHUNKINGS), ids=list(CHUNKINGS))
@pytest.mark.parametrize("_id, lead, H, Hkv, L, Dk, Dv, opts", CASES, ids=IDS)
def test_decoding_equals_full_causal_attention(rng, _id, lead, H, Hkv, L, Dk, Dv, opts, chunking):
    q, k, v = make_sequence(rng, lead, H, Hkv, L, Dk, Dv)
    stepped, cache = run_decoding(q, k, v, chunk_sizes(CHUNKINGS[chunking], L), **opts)
    for align in ("top_left", "bottom_right"):  # they coincide when T == S
        full = ar.scaled_dot_product_attention(q, k, v, causal=True, align=align, **opts)
        rep = error_report(stepped, full)
        assert rep.rel_error <= RTOL, f"align={align}: {rep}"
    # the final cache holds the whole sequence, in order
    np.testing.assert_array_equal(cache.k, k)
    np.testing.assert_array_equal(cache.v, v)


@pytest.mark.parametrize(
    "_id, lead, H, Hkv, L, Dk, Dv, opts",
    [c for c in CASES if len(c[1]) == 1],
    ids=[c[0] for c in CASES if len(c[1]) == 1],
)
def test_decoding_equals_naive_loops(rng, _id, lead, H, Hkv, L, Dk, Dv, opts):
    """Independent of the library's attention: the loop reference of tests/naive.py."""
    q, k, v = make_sequence(rng, lead, H, Hkv, L, Dk, Dv)
    stepped, _ = run_decoding(q, k, v, chunk_sizes("uneven", L), **opts)
    rep = error_report(stepped, naive_attention(q, k, v, causal=True, **opts))
    assert rep.rel_error <= RTOL, rep


def test_a_top_left_step_would_be_caught(rng):
    """The comparison can fail: attending a new chunk with a top-left causal mask (query i sees
    keys j <= i instead of j <= S_old + i) disagrees with full causal attention."""
    q, k, v = make_sequence(rng, (2,), 4, 2, 6, 5, 3)
    cache = KVCache(k[..., :4, :], v[..., :4, :])
    wrong = ar.scaled_dot_product_attention(q[..., 4:, :], k, v, causal=True, align="top_left")
    right, _ = decode_step(q[..., 4:, :], cache, k[..., 4:, :], v[..., 4:, :])
    full = ar.scaled_dot_product_attention(q, k, v, causal=True)[..., 4:, :]
    assert error_report(right, full).rel_error <= RTOL
    assert error_report(wrong, full).rel_error > WRONG_MIN


def test_the_window_forgets_old_keys(rng):
    """With window (1, 0) a step sees only its own key and the one before: changing older cached
    keys and values changes nothing."""
    q, k, v = make_sequence(rng, (2,), 4, 2, 5, 3, 2)
    k2, v2 = k.copy(), v.copy()
    k2[..., :3, :] += 10.0
    v2[..., :3, :] -= 10.0
    outs = [
        decode_step(
            q[..., 4:, :],
            KVCache(kk[..., :4, :], vv[..., :4, :]),
            kk[..., 4:, :],
            vv[..., 4:, :],
            window=(1, 0),
        ).out
        for kk, vv in ((k, v), (k2, v2))
    ]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_the_cache_is_never_mutated(rng):
    q, k, v = make_sequence(rng, (2,), 4, 2, 5, 3, 2)
    k_in, v_in = k[..., :3, :].copy(), v[..., :3, :].copy()
    cache = KVCache(k_in, v_in)
    # the cache holds its own read-only copies: the caller's arrays can change, the cache cannot
    assert not np.shares_memory(cache.k, k_in) and not np.shares_memory(cache.v, v_in)
    k_in += 1.0
    np.testing.assert_array_equal(cache.k, k[..., :3, :])
    with pytest.raises(ValueError, match="read-only"):
        cache.k[0, 0, 0, 0] = 5.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cache.k = k  # type: ignore[misc]

    before_k, before_v = cache.k.copy(), cache.v.copy()
    q_new, k_new, v_new = q[..., 3:, :].copy(), k[..., 3:, :].copy(), v[..., 3:, :].copy()
    result = decode_step(q_new, cache, k_new, v_new)
    assert isinstance(result, DecodeResult)
    out, new_cache = result
    np.testing.assert_array_equal(cache.k, before_k)  # the old cache is unchanged
    np.testing.assert_array_equal(cache.v, before_v)
    assert cache.length == 3 and new_cache.length == 5
    for x, original in ((q_new, q[..., 3:, :]), (k_new, k[..., 3:, :]), (v_new, v[..., 3:, :])):
        np.testing.assert_array_equal(x, original)  # inputs untouched
    for produced in (out, new_cache.k, new_cache.v):
        assert not any(
            np.shares_memory(produced, x) for x in (q_new, k_new, v_new, cache.k, cache.v)
        )
    assert not new_cache.k.flags.writeable and not new_cache.v.flags.writeable
    # two continuations of one prefix do not see each other
    other = cache.append(k_new + 1.0, v_new)
    np.testing.assert_array_equal(new_cache.k[..., 3:, :], k[..., 3:, :])
    assert other.length == 5 and not np.array_equal(other.k, new_cache.k)
    # the same step from the same cache gives the same result
    np.testing.assert_array_equal(decode_step(q_new, cache, k_new, v_new).out, out)


def test_dtypes(rng):
    q, k, v = make_sequence(rng, (2,), 2, 1, 3, 4, 2)
    cache = KVCache(k.astype(np.float32), v.astype(np.float16))
    assert cache.k.dtype == np.float64 and cache.v.dtype == np.float64  # float64 whatever the input
    out, new = decode_step(q.astype(np.float32), KVCache.empty((2,), 1, 4, 2), k, v)
    assert out.dtype == np.float64 and new.k.dtype == np.float64
    low = KVCache.empty((2,), 1, 4, 2, dtype=np.float32)
    out32, new32 = decode_step(q, low, k, v)
    assert out32.dtype == np.float32 and new32.k.dtype == np.float32
    assert error_report(out32, out).rel_error < 1e-5  # float32 rounding, nothing more


def test_empty_cache_shape_and_checks():
    cache = KVCache.empty((3, 2), num_kv_heads=2, head_dim=4)
    assert (
        cache.k.shape == (3, 2, 2, 0, 4) and cache.v.shape == (3, 2, 2, 0, 4) and cache.length == 0
    )
    with pytest.raises(
        ValueError, match=r"batch_shape must be a tuple of positive ints .*got \[2\]"
    ):
        KVCache.empty([2], 1, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int; got 0"):
        KVCache.empty((), 0, 4)
    with pytest.raises(TypeError, match="head_dim must be a positive int; got 2.0"):
        KVCache.empty((), 1, 2.0)  # type: ignore[arg-type]


# Each: (id, q_new shape, k_new shape, v_new shape, error, message regex). The cache: batch (2,),
# Hkv = 2, S_old = 3, Dk = 4, Dv = 3.
STEP_ERRORS = [
    (
        "k_new heads",
        (2, 4, 1, 4),
        (2, 1, 1, 4),
        (2, 2, 1, 3),
        ValueError,
        (
            r"k_new must have the cache's batch dims \(2,\), Hkv=2 heads and Dk=4, "
            r"i.e. shape \(2, 2, 1, 4\); got k_new.shape=\(2, 1, 1, 4\)"
        ),
    ),
    (
        "k_new Dk",
        (2, 4, 1, 4),
        (2, 2, 1, 5),
        (2, 2, 1, 3),
        ValueError,
        r"k_new must have .* Dk=4, i.e. shape \(2, 2, 1, 4\); got k_new.shape=\(2, 2, 1, 5\)",
    ),
    (
        "v_new Dv",
        (2, 4, 1, 4),
        (2, 2, 1, 4),
        (2, 2, 1, 4),
        ValueError,
        r"v_new must have .* Dv=3, i.e. shape \(2, 2, 1, 3\); got v_new.shape=\(2, 2, 1, 4\)",
    ),
    (
        "v_new positions",
        (2, 4, 2, 4),
        (2, 2, 2, 4),
        (2, 2, 1, 3),
        ValueError,
        r"v_new must have as many new positions as k_new, T_new=2; got v_new.shape=\(2, 2, 1, 3\)",
    ),
    (
        "k_new batch",
        (2, 4, 1, 4),
        (3, 2, 1, 4),
        (3, 2, 1, 3),
        ValueError,
        r"k_new must have the cache's batch dims \(2,\)",
    ),
    (
        "q_new Dk",
        (2, 4, 1, 5),
        (2, 2, 1, 4),
        (2, 2, 1, 3),
        ValueError,
        (
            r"q_new must have shape \(\.\.\., H, T_new, Dk\) "
            r"with the cache's batch dims \(\.\.\.\) = \(2,\) and Dk = 4; "
            r"got q_new.shape=\(2, 4, 1, 5\)"
        ),
    ),
    (
        "q_new batch",
        (4, 1, 4),
        (2, 2, 1, 4),
        (2, 2, 1, 3),
        ValueError,
        r"q_new must have shape .* batch dims \(\.\.\.\) = \(2,\) .*got q_new.shape=\(4, 1, 4\)",
    ),
    (
        "H not a multiple of Hkv",
        (2, 3, 1, 4),
        (2, 2, 1, 4),
        (2, 2, 1, 3),
        ValueError,
        r"q_new's head count H=3 must be a multiple of the cache's Hkv=2",
    ),
    (
        "T_new mismatch",
        (2, 4, 2, 4),
        (2, 2, 1, 4),
        (2, 2, 1, 3),
        ValueError,
        r"k_new and v_new must hold one position per new query, T_new=2 .*got 1 new positions",
    ),
    (
        "no new query",
        (2, 4, 0, 4),
        (2, 2, 0, 4),
        (2, 2, 0, 3),
        ValueError,
        r"q_new must not be empty",
    ),
    (
        "k_new 2-D",
        (2, 4, 1, 4),
        (1, 4),
        (2, 2, 1, 3),
        ValueError,
        r"k_new must have shape \(\.\.\., Hkv, T_new, Dk\) \(3 or more dims\); got shape \(1, 4\)",
    ),
]


@pytest.mark.parametrize(
    "_id, qs, ks, vs, error, message", STEP_ERRORS, ids=[e[0] for e in STEP_ERRORS]
)
def test_mismatched_heads_and_widths_are_refused(rng, _id, qs, ks, vs, error, message):
    cache = KVCache(rng.normal(size=(2, 2, 3, 4)), rng.normal(size=(2, 2, 3, 3)))
    before = cache.k.copy()
    with pytest.raises(error, match=message):
        decode_step(rng.normal(size=qs), cache, rng.normal(size=ks), rng.normal(size=vs))
    np.testing.assert_array_equal(cache.k, before)


def test_bad_caches_are_refused(rng):
    with pytest.raises(
        TypeError, match=r"cache must be a KVCache \(KVCache.empty\(...\) to start\); got tuple"
    ):
        decode_step(
            rng.normal(size=(2, 1, 4)),
            (np.zeros((1, 0, 4)), np.zeros((1, 0, 3))),  # type: ignore[arg-type]
            rng.normal(size=(1, 1, 4)),
            rng.normal(size=(1, 1, 3)),
        )
    with pytest.raises(
        ValueError,
        match=r"v must have the same \(\.\.\., Hkv, S\) as k = \(2, 3\); got v.shape=\(2, 4, 3\)",
    ):
        KVCache(rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 4, 3)))
    with pytest.raises(
        ValueError,
        match=r"k must have shape \(\.\.\., Hkv, S, Dk\) \(3 or more dims\); got shape \(3, 4\)",
    ):
        KVCache(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)))
    with pytest.raises(TypeError, match="k must hold real numbers"):
        KVCache(np.array([["a"]]), rng.normal(size=(1, 1, 3)))
    with pytest.raises(ValueError, match=r"window\[0\] \(left\) must be >= 0"):
        decode_step(
            rng.normal(size=(2, 1, 4)),
            KVCache.empty((), 1, 4),
            rng.normal(size=(1, 1, 4)),
            rng.normal(size=(1, 1, 4)),
            window=(-1, 0),
        )
