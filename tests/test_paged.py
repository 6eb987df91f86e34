"""Paged KV caches: paged attention against a dense implementation written here (loop gathers, the
softmax written out), on every layout (FlashInfer NHD/HND, vLLM, vLLM's flash backend) and back;
the backward against finite differences, with the unused slots' gradients exactly 0 and shared
prefix pages summed; poisoned padding (the reference unchanged bit for bit, a toy kernel's
off-by-one exposed); attention_with_kvcache against a re-implementation of FlashAttention's
documented semantics; every error; no input mutated. Also runs the code blocks of
docs/serving_layouts.md."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from attention_ref.gradcheck import check_vjp
from attention_ref.variants.paged import (
    attention_with_kvcache,
    from_flashinfer,
    from_vllm,
    from_vllm_flash,
    gather_pages,
    make_paged_cache,
    paged_attention,
    paged_attention_backward,
    poison_unused,
    to_flashinfer,
    to_vllm,
    to_vllm_flash,
    vllm_x,
)

#: Agreement with the dense implementation below: float64 evaluations of one formula in different
#: orders, a few ulps times the number of terms apart, far below this.
RTOL = 1e-12
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "serving_layouts.md"


# ----------------------------------------------------------------------------- independent helpers


def random_cache(rng, lens, page_size, num_blocks, Hkv, Dk, Dv, max_blocks=None):
    """A paged cache with a shuffled table: the pages of all sequences drawn from a permutation
    of the ids, and the unused table entries holding random *valid* ids (never read)."""
    lens = list(lens)
    need = [-(-n // page_size) for n in lens]
    max_blocks = max_blocks or max(need)
    ids = list(rng.permutation(num_blocks))
    table = rng.integers(0, num_blocks, size=(len(lens), max_blocks))
    for b, n in enumerate(need):
        for j in range(n):
            table[b, j] = ids.pop()
    k_pages = rng.normal(size=(num_blocks, page_size, Hkv, Dk))
    v_pages = rng.normal(size=(num_blocks, page_size, Hkv, Dv))
    return k_pages, v_pages, table, np.array(lens)


def loop_gather(pages, table, lens):
    """Per sequence, (Hkv, S_b, D): position p read from page table[b][p // ps], slot p % ps."""
    ps = pages.shape[1]
    seqs = []
    for b, n in enumerate(lens):
        rows = []
        for p in range(int(n)):
            rows.append(pages[table[b][p // ps], p % ps])  # (Hkv, D)
        empty = np.zeros((pages.shape[2], 0, pages.shape[3]))
        seqs.append(np.stack(rows, axis=1) if rows else empty)  # (Hkv, S_b, D)
    return seqs


def owned_slots(table, lens, page_size, leftpad=None):
    """The set of (page, slot) some sequence reads, by loops."""
    owned = set()
    for b, n in enumerate(lens):
        start = 0 if leftpad is None else int(leftpad[b])
        for p in range(start, int(n)):
            owned.add((int(table[b][p // page_size]), p % page_size))
    return owned


def dense_attention(
    q, k, v, *, causal=False, window=None, softcap=None, scale=None, sinks=None, top_left=False
):
    """q (H, T, Dk), k (Hkv, S, Dk), v (Hkv, S, Dv) -> out (H, T, Dv), lse (H, T); bottom-right
    positions i' = i + S - T unless top_left; the softmax written out, sinks as one more logit."""
    H, T, Dk = q.shape
    Hkv, S, Dv = k.shape[0], k.shape[1], v.shape[2]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    out, lse = np.zeros((H, T, Dv)), np.full((H, T), -np.inf)
    for h in range(H):
        kv = h // (H // Hkv)
        s = scale * np.einsum("td,sd->ts", q[h], k[kv])  # (T, S)
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        for i in range(T):
            ip = i if top_left else i + S - T
            allowed = np.ones(S, bool)
            for j in range(S):
                if causal and j > ip:
                    allowed[j] = False
                if window is not None:
                    left, right = window
                    if left is not None and j < ip - left:
                        allowed[j] = False
                    if right is not None and j > ip + right:
                        allowed[j] = False
            logits = s[i][allowed]
            extra = [] if sinks is None else [sinks[h]]
            if logits.size == 0 and not extra:
                continue
            m = max(list(logits) + extra)
            e = np.exp(logits - m)
            den = e.sum() + sum(math.exp(x - m) for x in extra)
            out[h, i] = e @ v[kv][allowed] / den
            lse[h, i] = m + math.log(den)
    return out, lse


def dense_paged(q, k_pages, v_pages, table, lens, **opts):
    """The dense implementation on the loop-gathered keys, sequence by sequence."""
    ks, vs = loop_gather(k_pages, table, lens), loop_gather(v_pages, table, lens)
    res = [dense_attention(q[b], ks[b], vs[b], **opts) for b in range(len(lens))]
    return np.stack([r[0] for r in res]), np.stack([r[1] for r in res])


def snapshot(*arrays):
    return [np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, after):
    for x, y in zip(before, after, strict=True):
        assert np.array_equal(x, y, equal_nan=True)


# ----------------------------------------------------------------------------- paged attention

# (id, lens, T, H, Hkv, Dk, Dv, page_size, num_blocks, options). Lengths differ, T != S_b, H > 1,
# Hkv < H, Dk != Dv; the tables are shuffled.
CASES = [
    ("plain, T = 1", [5, 9, 2], 1, 4, 2, 5, 3, 4, 9, {}),
    ("causal T > 1", [5, 9, 3], 3, 4, 2, 5, 3, 4, 9, {"causal": True}),
    ("window + causal", [7, 12], 3, 4, 1, 4, 6, 3, 11, {"causal": True, "window": (2, None)}),
    ("window both sides", [6, 8], 2, 2, 2, 3, 4, 2, 10, {"window": (1, 1)}),
    ("softcap + scale", [4, 10, 6], 2, 6, 3, 4, 5, 4, 10, {"softcap": 2.5, "scale": 0.7}),
    (
        "sinks + causal",
        [5, 8],
        3,
        4,
        2,
        4,
        3,
        3,
        8,
        {"causal": True, "sinks": [0.3, -1.0, 2.0, 0.0]},
    ),
    ("page size 1", [3, 4], 2, 2, 1, 3, 2, 1, 9, {"causal": True}),
    ("S_b = T", [3, 5], 3, 2, 2, 3, 4, 4, 4, {"causal": True}),
]


@pytest.mark.parametrize(("name", "lens", "T", "H", "Hkv", "Dk", "Dv", "ps", "N", "opts"), CASES)
def test_paged_attention_matches_dense(rng, name, lens, T, H, Hkv, Dk, Dv, ps, N, opts):
    k_pages, v_pages, table, lens = random_cache(rng, lens, ps, N, Hkv, Dk, Dv)
    q = rng.normal(size=(len(lens), H, T, Dk))
    before = snapshot(q, k_pages, v_pages, table, lens)
    out, lse = paged_attention(q, k_pages, v_pages, table, lens, return_lse=True, **opts)
    assert_unchanged(before, [q, k_pages, v_pages, table, lens])
    ref_opts = dict(opts)
    if "sinks" in ref_opts:
        ref_opts["sinks"] = np.asarray(ref_opts["sinks"])
    ref_out, ref_lse = dense_paged(q, k_pages, v_pages, table, lens, **ref_opts)
    assert out.shape == (len(lens), H, T, Dv) and lse.shape == (len(lens), H, T)
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(lse, ref_lse, rtol=RTOL, atol=0)
    assert np.array_equal(paged_attention(q, k_pages, v_pages, table, lens, **opts), out)


def test_dense_check_can_fail(rng):
    """The comparison above catches a wrong alignment: top-left causal differs by O(1)."""
    k_pages, v_pages, table, lens = random_cache(rng, [5, 9], 4, 9, 2, 4, 3)
    q = rng.normal(size=(2, 2, 3, 4))
    out = paged_attention(q, k_pages, v_pages, table, lens, causal=True)
    wrong, _ = dense_paged(q, k_pages, v_pages, table, lens, causal=True, top_left=True)
    assert np.abs(out - wrong).max() > 1e-2


def test_gather_and_make_paged_cache(rng):
    k_pages, v_pages, table, lens = random_cache(rng, [5, 0, 7], 3, 8, 2, 4, 3)
    g = gather_pages(k_pages, table, lens, fill=-7.0)
    assert g.dense.shape == (3, 2, 7, 4) and np.array_equal(g.lengths, lens)
    for b, seq in enumerate(loop_gather(k_pages, table, lens)):
        assert np.array_equal(g.dense[b, :, : lens[b]], seq)
        assert (g.dense[b, :, lens[b] :] == -7.0).all()
    # make_paged_cache writes dense keys back into pages (with the same shuffled table)
    v_dense = gather_pages(v_pages, table, lens).dense
    cache = make_paged_cache(
        g.dense, v_dense, lens, 3, block_table=table, num_blocks=8, fill=np.nan
    )
    for page, slot in owned_slots(table, lens, 3):
        assert np.array_equal(cache.k_pages[page, slot], k_pages[page, slot])
    assert np.isnan(cache.k_pages).sum() == (8 * 3 - len(owned_slots(table, lens, 3))) * 2 * 4
    # without a table: consecutive pages, and gather is its inverse
    auto = make_paged_cache(g.dense, v_dense, lens, 2)
    assert auto.block_table[:, 0].tolist() == [0, 0, 3] and auto.k_pages.shape == (7, 2, 2, 4)
    back = gather_pages(auto.k_pages, auto.block_table, lens, fill=-7.0).dense
    assert np.array_equal(back, g.dense)
    with pytest.raises(ValueError, match="gives page 1 to sequences"):
        make_paged_cache(g.dense, v_dense, [2, 2, 2], 2, block_table=[[1], [1], [2]])


# ----------------------------------------------------------------------------- layouts


def test_flashinfer_layouts_round_trip_and_read(rng):
    ps = 3
    k_pages, v_pages, table, lens = random_cache(rng, [5, 9, 1], ps, 10, 2, 4, 3)
    q = rng.normal(size=(3, 4, 1, 4))
    ref = paged_attention(q, k_pages, v_pages, table, lens, causal=True)
    ks = loop_gather(k_pages, table, lens)
    for layout in ("NHD", "HND"):
        fi = to_flashinfer(k_pages, v_pages, table, lens, kv_layout=layout)
        # the CSR description, built independently: [0, n_0, n_0 + n_1, ...], last page fill
        n = [-(-int(s) // ps) for s in lens]
        assert fi.kv_indptr.tolist() == [0, n[0], n[0] + n[1], sum(n)]
        assert fi.kv_indices.tolist() == [int(table[b][j]) for b in range(3) for j in range(n[b])]
        assert fi.kv_last_page_len.tolist() == [
            int(s) - ps * (m - 1) for s, m in zip(lens, n, strict=True)
        ]
        # FlashInfer's reading of the same keys: request b, position p
        for b in range(3):
            for p in range(int(lens[b])):
                page = fi.kv_indices[fi.kv_indptr[b] + p // ps]
                key = fi.k_data[page, p % ps] if layout == "NHD" else fi.k_data[page, :, p % ps]
                assert np.array_equal(key, ks[b][:, p])
        back = from_flashinfer(*fi[:5], kv_layout=layout, max_blocks=table.shape[1], pad_id=99)
        assert np.array_equal(back.k_pages, k_pages) and np.array_equal(back.v_pages, v_pages)
        assert np.array_equal(back.seqlens, lens)
        for b in range(3):
            assert np.array_equal(back.block_table[b, : n[b]], table[b, : n[b]])
            assert (back.block_table[b, n[b] :] == 99).all()
        out = paged_attention(
            q, back.k_pages, back.v_pages, back.block_table, back.seqlens, causal=True
        )
        assert np.array_equal(out, ref)


def test_vllm_layouts_round_trip_and_read(rng):
    k_pages, v_pages, table, lens = random_cache(rng, [5, 9], 4, 6, 2, 8, 3)
    q = rng.normal(size=(2, 4, 2, 8))
    ref = paged_attention(q, k_pages, v_pages, table, lens, causal=True)
    for x in (1, 2, 4, 8):
        key_cache, value_cache = to_vllm(k_pages, v_pages, x=x)
        assert key_cache.shape == (6, 2, 8 // x, 4, x) and value_cache.shape == (6, 2, 3, 4)
        for n, s, h, d in np.ndindex(k_pages.shape):  # the kernels' indexing, element by element
            assert key_cache[n, h, d // x, s, d % x] == k_pages[n, s, h, d]
        for n, s, h, e in np.ndindex(v_pages.shape):
            assert value_cache[n, h, e, s] == v_pages[n, s, h, e]
        kb, vb = from_vllm(key_cache, value_cache)
        assert np.array_equal(kb, k_pages) and np.array_equal(vb, v_pages)
        assert np.array_equal(paged_attention(q, kb, vb, table, lens, causal=True), ref)
    assert to_vllm(k_pages, v_pages)[0].shape[-1] == vllm_x(np.float64) == 2
    assert (vllm_x(np.float16), vllm_x(np.float32)) == (8, 4)
    with pytest.raises(ValueError, match="multiple of x = 3"):
        to_vllm(k_pages, v_pages, x=3)
    # the FlashAttention backend's (2, num_blocks, block_size, Hkv, D): needs Dk = Dv
    k2, v2, table2, lens2 = random_cache(rng, [5, 9], 4, 6, 2, 4, 4)
    kv = to_vllm_flash(k2, v2)
    assert kv.shape == (2, 6, 4, 2, 4) and np.array_equal(kv[0], k2) and np.array_equal(kv[1], v2)
    kb, vb = from_vllm_flash(kv)
    assert np.array_equal(kb, k2) and np.array_equal(vb, v2)
    with pytest.raises(ValueError, match="Dv = Dk"):
        to_vllm_flash(k_pages, v_pages)


def test_converter_errors(rng):
    k_pages, v_pages, table, lens = random_cache(rng, [5, 0], 4, 6, 2, 4, 3)
    with pytest.raises(ValueError, match=r"seqlens\[1\] = 0: FlashInfer"):
        to_flashinfer(k_pages, v_pages, table, lens)
    with pytest.raises(ValueError, match="kv_layout must be one of"):
        to_flashinfer(k_pages, v_pages, table, [5, 1], kv_layout="NDH")
    fi = to_flashinfer(k_pages, v_pages, table, [5, 1])
    with pytest.raises(ValueError, match=r"kv_last_page_len\[1\] must be in \[1, page_size\]"):
        from_flashinfer(*fi[:4], [1, 0])
    with pytest.raises(ValueError, match="increase by >= 1 per request"):
        from_flashinfer(fi.k_data, fi.v_data, [0, 3, 3], [1, 2, 3], [1, 1])
    with pytest.raises(ValueError, match=r"kv_indptr\[-1\] must equal len\(kv_indices\)"):
        from_flashinfer(fi.k_data, fi.v_data, [0, 2, 4], [1, 2, 3], [1, 1])
    with pytest.raises(ValueError, match="max_blocks = 1 is less than"):
        from_flashinfer(*fi[:5], max_blocks=1)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 9 is not a page id"):
        from_flashinfer(fi.k_data, fi.v_data, [0, 2, 3], [1, 9, 3], [1, 1])
    with pytest.raises(ValueError, match="value_cache must have"):
        from_vllm(np.zeros((6, 2, 2, 4, 2)), np.zeros((6, 2, 3, 5)))


def test_converters_never_alias_their_inputs(rng):
    """Size-1 axes make a transposed view "contiguous": the outputs must still be new arrays."""
    k_pages, v_pages, table, lens = random_cache(rng, [3, 1], 1, 5, 1, 2, 1)
    outs = [
        *to_flashinfer(k_pages, v_pages, table, lens, kv_layout="HND")[:2],
        *to_vllm(k_pages, v_pages, x=1),
        *from_vllm(*to_vllm(k_pages, v_pages, x=2)),
        *from_vllm_flash(to_vllm_flash(k_pages, k_pages)),
        *poison_unused(k_pages, v_pages, table, lens)[:2],
    ]
    for out in outs:
        assert not np.shares_memory(out, k_pages) and not np.shares_memory(out, v_pages)
    fi = to_flashinfer(k_pages, v_pages, table, lens, kv_layout="HND")
    back = from_flashinfer(*fi[:5], kv_layout="HND")
    assert not np.shares_memory(back.k_pages, fi.k_data)


# ----------------------------------------------------------------------------- backward


def grads_check(rng, k_pages, v_pages, table, lens, q, opts, *, backward=paged_attention_backward):
    """check_vjp of [out, lse] with random cotangents for both, w.r.t. q, the pages (and sinks)."""
    out, lse = paged_attention(q, k_pages, v_pages, table, lens, return_lse=True, **opts)
    dout, dlse = rng.normal(size=out.shape), rng.normal(size=lse.shape)
    sinks = opts.get("sinks")
    rest = {n: o for n, o in opts.items() if n != "sinks"}

    def f(q, k_pages, v_pages, sinks=None):
        extra = {} if sinks is None else {"sinks": sinks}
        o, s = paged_attention(q, k_pages, v_pages, table, lens, return_lse=True, **rest, **extra)
        return np.concatenate([o.ravel(), s.ravel()])

    g = backward(dout, q, k_pages, v_pages, table, lens, dlse=dlse, **opts)
    inputs = {"q": q, "k_pages": k_pages, "v_pages": v_pages}
    grads = {"q": g.dq, "k_pages": g.dk_pages, "v_pages": g.dv_pages}
    if sinks is not None:
        inputs["sinks"], grads["sinks"] = np.asarray(sinks, float), g.dsinks
    return g, check_vjp(f, inputs, np.concatenate([dout.ravel(), dlse.ravel()]), grads)


@pytest.mark.parametrize(
    "opts",
    [
        {"causal": True},
        {"window": (1, 2), "softcap": 2.0},
        {"causal": True, "sinks": [0.5, -0.2, 1.0, 0.1]},
    ],
    ids=["causal", "window-softcap", "sinks"],
)
def test_backward_matches_finite_differences(rng, opts):
    k_pages, v_pages, table, lens = random_cache(rng, [5, 7], 3, 7, 2, 3, 2)
    q = rng.normal(size=(2, 4, 2, 3))
    before = snapshot(q, k_pages, v_pages, table, lens)
    g, result = grads_check(rng, k_pages, v_pages, table, lens, q, opts)
    assert result.passed, str(result)
    assert_unchanged(before, [q, k_pages, v_pages, table, lens])
    assert g.dk_pages.shape == k_pages.shape and g.dv_pages.shape == v_pages.shape
    owned = owned_slots(table, lens, 3)
    for page, slot in np.ndindex(7, 3):
        if (page, slot) not in owned:  # nobody reads it: exactly zero, not just small
            assert (g.dk_pages[page, slot] == 0).all() and (g.dv_pages[page, slot] == 0).all()
    assert len(owned) < 7 * 3  # the cache does have unowned slots


def test_shared_prefix_pages(rng):
    """Two sequences read the same prefix pages: the forward equals each sequence alone, the
    backward sums their gradients (finite differences agree), and a backward that assigns instead
    of adding -- the last sequence's gradient wins -- fails the check."""
    ps, N = 2, 6
    k_pages, v_pages = rng.normal(size=(N, ps, 1, 3)), rng.normal(size=(N, ps, 1, 2))
    table = np.array([[4, 1, 0], [4, 1, 5]])  # pages 4 and 1: a common prompt of 4 tokens
    lens = np.array([5, 6])
    q = rng.normal(size=(2, 2, 2, 3))
    out = paged_attention(q, k_pages, v_pages, table, lens, causal=True)
    ref, _ = dense_paged(q, k_pages, v_pages, table, lens, causal=True)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=1e-14)
    g, result = grads_check(rng, k_pages, v_pages, table, lens, q, {"causal": True})
    assert result.passed, str(result)

    def assigning_backward(dout, q, k_pages, v_pages, table, lens, *, dlse=None, **opts):
        good = paged_attention_backward(dout, q, k_pages, v_pages, table, lens, dlse=dlse, **opts)
        dk, dv = np.zeros_like(good.dk_pages), np.zeros_like(good.dv_pages)
        for b in range(2):  # each sequence's gradient alone, assigned: the last one wins
            only = np.arange(2) == b
            g_b = paged_attention_backward(
                dout * only[:, None, None, None],
                q,
                k_pages,
                v_pages,
                table,
                lens,
                dlse=None if dlse is None else dlse * only[:, None, None],
                **opts,
            )
            for page, slot in owned_slots(table[b : b + 1], lens[b : b + 1], ps):
                dk[page, slot], dv[page, slot] = g_b.dk_pages[page, slot], g_b.dv_pages[page, slot]
        return good._replace(dk_pages=dk, dv_pages=dv)

    _, wrong = grads_check(
        rng, k_pages, v_pages, table, lens, q, {"causal": True}, backward=assigning_backward
    )
    assert not wrong.passed
    assert not wrong.reports["k_pages"].passed(wrong.rtol, wrong.atol)
    assert wrong.reports["q"].passed(wrong.rtol, wrong.atol)


def test_wrong_backward_fails(rng):
    """A backward computed with the top-left alignment fails the finite-difference check."""
    k_pages, v_pages, table, lens = random_cache(rng, [5, 7], 3, 7, 2, 3, 2)
    q = rng.normal(size=(2, 4, 2, 3))
    from attention_ref import scaled_dot_product_attention_backward

    def top_left_backward(dout, q, k_pages, v_pages, table, lens, *, dlse=None, **opts):
        good = paged_attention_backward(dout, q, k_pages, v_pages, table, lens, dlse=dlse, **opts)
        dq = np.zeros_like(good.dq)
        ks, vs = loop_gather(k_pages, table, lens), loop_gather(v_pages, table, lens)
        for b in range(2):
            g = scaled_dot_product_attention_backward(
                dout[b], q[b], ks[b], vs[b], causal=True, dlse=None if dlse is None else dlse[b]
            )
            dq[b] = g.dq
        return good._replace(dq=dq)

    _, result = grads_check(
        rng, k_pages, v_pages, table, lens, q, {"causal": True}, backward=top_left_backward
    )
    assert not result.passed


# ----------------------------------------------------------------------------- errors


def test_paged_attention_errors(rng):
    k_pages, v_pages, table, lens = random_cache(rng, [5, 9], 4, 9, 2, 4, 3)
    q = rng.normal(size=(2, 2, 3, 4))

    def call(table=table, lens=lens, q=q, **opts):
        return paged_attention(q, k_pages, v_pages, table, lens, **opts)

    bad = table.copy()
    bad[1, 2] = 9
    with pytest.raises(
        ValueError,
        match=r"block_table\[1, 2\] = 9 is not a page id in \[0, num_blocks\) = \[0, 9\)",
    ):
        call(bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = -1 is not a page id"):
        call(bad)
    unused = table.copy()
    unused[0, 2] = 12345  # past sequence 0's two pages: never read, so allowed
    assert np.array_equal(call(unused), call())
    with pytest.raises(ValueError, match=r"seqlens\[1\] = 13 exceeds the table's capacity"):
        call(lens=[5, 13])
    with pytest.raises(ValueError, match=r"seqlens\[0\] must be >= 0; got -1"):
        call(lens=[-1, 9])
    with pytest.raises(ValueError, match=r"seqlens\[0\] = 2 must be >= q's T = 3"):
        call(lens=[2, 9])
    dup = table.copy()
    dup[1, 2] = dup[1, 0]
    with pytest.raises(
        ValueError, match=r"block_table\[1\] uses page \d+ twice, at entries \[0, 2\]"
    ):
        call(dup)
    shared = table.copy()
    shared[1, 0] = shared[0, 0]  # two sequences read one page: allowed (a prefix cache)
    call(shared)
    with pytest.raises(ValueError, match="does not support mask"):
        call(mask=np.ones((3, 9), bool))
    with pytest.raises(ValueError, match="does not support bias"):
        call(bias=np.zeros((3, 9)))
    with pytest.raises(ValueError, match="does not support dropout_p"):
        call(dropout_p=0.1, dropout_mask=np.random.default_rng(0))
    with pytest.raises(ValueError, match="bottom_right aligned"):
        call(align="top_left")
    assert np.array_equal(call(align="bottom_right", causal=True), call(causal=True))
    with pytest.raises(ValueError, match="one row per sequence, B = 3"):
        call(q=rng.normal(size=(3, 2, 3, 4)))
    with pytest.raises(ValueError, match="multiple of the pages' Hkv=2"):
        call(q=rng.normal(size=(2, 3, 3, 4)))
    with pytest.raises(ValueError, match="Dk = 5 like q"):
        call(q=rng.normal(size=(2, 2, 3, 5)))
    with pytest.raises(TypeError, match="block_table must hold integers"):
        call(table.astype(float))
    with pytest.raises(
        ValueError, match=r"v_pages must have the same \(num_blocks, page_size, Hkv\)"
    ):
        paged_attention(q, k_pages, v_pages[:, :2], table, lens)
    with pytest.raises(ValueError, match=r"dout must have the output's shape"):
        paged_attention_backward(np.zeros((2, 2, 3, 4)), q, k_pages, v_pages, table, lens)
    with pytest.raises(ValueError, match=r"dlse must have the log-sum-exp's shape \(B, H, T\)"):
        paged_attention_backward(
            np.zeros((2, 2, 3, 3)), q, k_pages, v_pages, table, lens, dlse=np.zeros((2, 3))
        )


# ----------------------------------------------------------------------------- poisoning


def test_poison_unused_marks_exactly_the_unowned(rng):
    ps, N = 3, 9
    k_pages, v_pages, table, lens = random_cache(rng, [5, 0, 7], ps, N, 2, 4, 3, max_blocks=4)
    before = snapshot(k_pages, v_pages, table, lens)
    p = poison_unused(k_pages, v_pages, table, lens)
    assert_unchanged(before, [k_pages, v_pages, table, lens])
    owned = owned_slots(table, lens, ps)
    for page, slot in np.ndindex(N, ps):
        if (page, slot) in owned:
            assert np.array_equal(p.k_pages[page, slot], k_pages[page, slot])
            assert np.array_equal(p.v_pages[page, slot], v_pages[page, slot])
        else:
            assert np.isnan(p.k_pages[page, slot]).all() and np.isnan(p.v_pages[page, slot]).all()
    for b, n in enumerate(lens):
        used = -(-int(n) // ps)
        assert np.array_equal(p.block_table[b, :used], table[b, :used])
        assert (p.block_table[b, used:] == N).all()  # num_blocks: out of range
    assert p.block_table[1].tolist() == [N] * 4  # an empty sequence uses no page
    assert (
        poison_unused(k_pages, v_pages, table, lens, bad_page=2**31 - 1).block_table[1] > N
    ).all()
    with pytest.raises(ValueError, match=r"bad_page must be outside \[0, num_blocks\)"):
        poison_unused(k_pages, v_pages, table, lens, bad_page=3)
    # float32 pages stay float32 (to feed a kernel); integers become float64 (NaN needs a float)
    assert (
        poison_unused(k_pages.astype(np.float32), v_pages, table, lens).k_pages.dtype == np.float32
    )


def test_poison_with_leftpad_and_a_dense_cache(rng):
    """A dense FlashAttention cache (B, S_cache, Hkv, D) is B pages of S_cache slots."""
    k_cache, v_cache = rng.normal(size=(3, 8, 1, 2)), rng.normal(size=(3, 8, 1, 2))
    cache_seqlens, leftpad = np.array([5, 8, 2]), np.array([2, 0, 2])
    p = poison_unused(k_cache, v_cache, np.arange(3)[:, None], cache_seqlens, cache_leftpad=leftpad)
    for b in range(3):
        for j in range(8):
            valid = leftpad[b] <= j < cache_seqlens[b]
            assert np.isnan(p.k_pages[b, j]).all() != valid
    assert p.block_table[:, 0].tolist() == [0, 1, 3]  # sequence 2 owns no position
    # paged with leftpad: a page wholly in the left padding is unused too
    k_pages, v_pages = rng.normal(size=(6, 2, 1, 2)), rng.normal(size=(6, 2, 1, 2))
    pl = poison_unused(k_pages, v_pages, [[4, 1, 3]], [6], cache_leftpad=[3])
    assert pl.block_table.tolist() == [[6, 1, 3]]
    assert np.isnan(pl.k_pages[1, 0]).all() and not np.isnan(pl.k_pages[1, 1]).any()
    with pytest.raises(ValueError, match=r"cache_leftpad\[0\] must be in \[0, seqlens\[0\]\]"):
        poison_unused(k_pages, v_pages, [[4, 1, 3]], [6], cache_leftpad=[7])


def test_reference_is_bit_identical_on_poisoned_caches(rng):
    k_pages, v_pages, table, lens = random_cache(rng, [5, 9, 4], 4, 10, 2, 4, 3)
    q, dout = rng.normal(size=(3, 4, 2, 4)), rng.normal(size=(3, 4, 2, 3))
    opts = {"causal": True, "sinks": np.array([0.1, 0.2, -0.3, 1.0]), "softcap": 4.0}
    p = poison_unused(k_pages, v_pages, table, lens)
    assert np.isnan(p.k_pages).any()
    clean = paged_attention(q, k_pages, v_pages, table, lens, return_lse=True, **opts)
    dirty = paged_attention(q, *p, return_lse=True, **opts)
    for a, b in zip(clean, dirty, strict=True):
        assert np.isfinite(b).all() and np.array_equal(a, b)
    g_clean = paged_attention_backward(dout, q, k_pages, v_pages, table, lens, **opts)
    g_dirty = paged_attention_backward(dout, q, *p, **opts)
    for a, b in zip(g_clean, g_dirty, strict=True):
        assert np.isfinite(b).all() and np.array_equal(a, b)


def toy_paged_kernel(q, k_pages, v_pages, table, lens, *, extra=1):
    """A paged decode kernel with a planted off-by-one: it loops over ``lens[b] + extra`` keys,
    masking the weights of the keys past the end with a multiply -- as a kernel that reads whole
    tiles does. q (B, H, Dk) -> (B, H, Dv); MHA."""
    B, H, Dk = q.shape
    ps = k_pages.shape[1]
    out = np.zeros((B, H, v_pages.shape[-1]))
    for b in range(B):
        n = int(lens[b]) + extra
        k = np.stack([k_pages[table[b][p // ps], p % ps] for p in range(n)])  # (n, H, Dk)
        v = np.stack([v_pages[table[b][p // ps], p % ps] for p in range(n)])
        valid = (np.arange(n) < lens[b]).astype(float)  # (n,)
        for h in range(H):
            s = k[:, h] @ q[b, h] / math.sqrt(Dk)
            m = np.max(np.where(valid > 0, s, -np.inf))
            w = np.exp(s - m) * valid  # 0 * exp(NaN - m) is NaN on poison; 0 * finite is 0
            out[b, h] = (w @ v[:, h]) / w.sum()
    return out


def test_poisoning_exposes_an_off_by_one_read(rng):
    ps, N = 4, 10
    k_pages, v_pages, table, lens = random_cache(rng, [5, 7], ps, N, 2, 4, 3)
    q = rng.normal(size=(2, 2, 4))
    ref = paged_attention(q[:, :, None], k_pages, v_pages, table, lens)[:, :, 0]
    clean = toy_paged_kernel(q, k_pages, v_pages, table, lens)
    np.testing.assert_allclose(clean, ref, rtol=1e-12)  # the clean cache hides the bug
    assert np.allclose(toy_paged_kernel(q, k_pages, v_pages, table, lens, extra=0), ref)
    p = poison_unused(k_pages, v_pages, table, lens)
    assert np.isnan(toy_paged_kernel(q, *p)).all()  # the poisoned cache exposes it
    assert np.isfinite(toy_paged_kernel(q, *p, extra=0)).all()  # the fixed kernel is clean
    # a sequence filling its last page: the stray read goes through the next table entry, which
    # is out of range on the poisoned table (the clean table holds a valid id: silent)
    k_pages, v_pages, table, lens = random_cache(rng, [8, 4], ps, N, 2, 4, 3, max_blocks=3)
    toy_paged_kernel(q, k_pages, v_pages, table, lens)
    with pytest.raises(IndexError):
        toy_paged_kernel(q, *poison_unused(k_pages, v_pages, table, lens))


# ----------------------------------------------------------------------------- FA's kvcache


def rope_fa(x, cos, sin, interleaved):
    """FlashAttention's ``apply_rotary_emb_torch`` (flash_attn/layers/rotary.py), in NumPy:
    x (..., D), cos/sin (..., r/2) broadcast against x[..., :r]."""
    r = 2 * cos.shape[-1]
    if interleaved:
        c, s = np.repeat(cos, 2, axis=-1), np.repeat(sin, 2, axis=-1)
        x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
        rot = np.stack([-x2, x1], axis=-1).reshape(x[..., :r].shape)
    else:
        c, s = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
        rot = np.concatenate([-x2, x1], axis=-1)
    return np.concatenate([x[..., :r] * c + rot * s, x[..., r:]], axis=-1)


def fa_kvcache_reference(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    *,
    cache_seqlens,
    rotary_cos=None,
    rotary_sin=None,
    rotary_interleaved=False,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    softmax_scale=None,
):
    """flash_attn_with_kvcache as its docstring and tests/test_flash_attn.py::
    test_flash_attn_kvcache define it: the cache materialised per sequence, rotary k at
    cache_seqlens + i, q at cache_seqlens + i (causal or local) or cache_seqlens, a key padding
    mask arange < cache_seqlens + seqlen_new (and >= cache_leftpad), the local mask on columns
    counted from cache_leftpad. Returns out, lse and the expected new caches."""
    B, T, H, D = q.shape
    cs = np.full(B, cache_seqlens) if np.isscalar(cache_seqlens) else np.asarray(cache_seqlens)
    lp = np.zeros(B, int) if cache_leftpad is None else np.asarray(cache_leftpad)
    T_new = 0 if k is None else k.shape[1]
    k_new, v_new = k_cache.copy(), v_cache.copy()
    if block_table is not None:
        ps, M = k_cache.shape[1], block_table.shape[1]
        kc = np.stack(
            [np.concatenate([k_cache[block_table[b, j]] for j in range(M)]) for b in range(B)]
        )
        vc = np.stack(
            [np.concatenate([v_cache[block_table[b, j]] for j in range(M)]) for b in range(B)]
        )
    else:
        idx = np.arange(B) if cache_batch_idx is None else np.asarray(cache_batch_idx)
        kc, vc = k_cache[idx].copy(), v_cache[idx].copy()
    local = tuple(window_size) != (-1, -1)
    q_ro = q.copy()
    for b in range(B):
        if rotary_cos is not None:
            rows = cs[b] + (np.arange(T) if (causal or local) else np.zeros(T, int))
            q_ro[b] = rope_fa(
                q[b], rotary_cos[rows][:, None], rotary_sin[rows][:, None], rotary_interleaved
            )
        if k is None:
            continue
        k_ro = k[b]
        if rotary_cos is not None:
            rows = cs[b] + np.arange(T_new)
            k_ro = rope_fa(
                k[b], rotary_cos[rows][:, None], rotary_sin[rows][:, None], rotary_interleaved
            )
        kc[b, cs[b] : cs[b] + T_new], vc[b, cs[b] : cs[b] + T_new] = k_ro, v[b]
        for i in range(T_new):
            p = cs[b] + i
            if block_table is not None:
                k_new[block_table[b, p // ps], p % ps] = k_ro[i]
                v_new[block_table[b, p // ps], p % ps] = v[b, i]
            else:
                k_new[idx[b], p], v_new[idx[b], p] = k_ro[i], v[b, i]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    Hkv, Dv = kc.shape[2], vc.shape[3]
    out, lse = np.zeros((B, T, H, Dv)), np.full((B, H, T), -np.inf)
    for b in range(B):
        sk = cs[b] + T_new - lp[b]  # the valid keys, counted from the left padding
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(T):
                logits, vals = [], []
                for j in range(kc.shape[1]):
                    if not lp[b] <= j < cs[b] + T_new:  # key_padding_mask
                        continue
                    col = j - lp[b]
                    if causal and col > i + sk - T:
                        continue
                    if window_size[0] >= 0 and col < i + sk - T - window_size[0]:
                        continue
                    if window_size[1] >= 0 and col > i + sk - T + window_size[1]:
                        continue
                    s = scale * float(q_ro[b, i, h] @ kc[b, j, kv])
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    logits.append(s)
                    vals.append(vc[b, j, kv])
                if not logits:
                    continue  # "If the row of the mask is all zero, the output will be zero."
                m = max(logits)
                e = np.exp(np.array(logits) - m)
                out[b, i, h] = e @ np.array(vals) / e.sum()
                lse[b, h, i] = m + math.log(e.sum())
    return out, lse, k_new, v_new


KV_CASES = [
    ("decode, no rotary", {"causal": True}, {}),
    ("rotary neox causal", {"causal": True, "rotary_interleaved": False}, {"rotary": 4}),
    ("rotary interleaved causal", {"causal": True, "rotary_interleaved": True}, {"rotary": 6}),
    ("rotary non-causal: q at cache_seqlens", {}, {"rotary": 4}),
    ("rotary local: window", {"window_size": (3, 0)}, {"rotary": 4}),
    ("cache_batch_idx", {"causal": True}, {"batch_idx": True, "rotary": 4}),
    ("cache_leftpad", {"causal": True}, {"leftpad": True, "rotary": 4}),
    ("paged", {"causal": True}, {"paged": True, "rotary": 4}),
    ("paged + leftpad", {"causal": True, "window_size": (4, -1)}, {"paged": True, "leftpad": True}),
    ("softcap + scale", {"causal": True, "softcap": 3.0, "softmax_scale": 0.4}, {}),
    ("T != T_new", {"causal": True}, {"T_new": 1, "rotary": 4}),
    ("no append", {"causal": True}, {"T_new": 0}),
    ("no append, empty rows", {"causal": True}, {"T_new": 0, "short": True}),
]


@pytest.mark.parametrize(("name", "kwargs", "setup"), KV_CASES)
def test_attention_with_kvcache_matches_flash_attention(rng, name, kwargs, setup):
    B, T, H, Hkv, D, Dv, S_cache = 3, 3, 4, 2, 6, 5, 12
    T_new = setup.get("T_new", T)
    q = rng.normal(size=(B, T, H, D))
    k = rng.normal(size=(B, T_new, Hkv, D)) if T_new else None
    v = rng.normal(size=(B, T_new, Hkv, Dv)) if T_new else None
    cs = np.array([0, 1, 2]) if setup.get("short") else np.array([4, 0, 7])
    call = {"cache_seqlens": cs, **kwargs}
    if setup.get("paged"):
        ps, N = 4, 11
        k_cache, v_cache = rng.normal(size=(N, ps, Hkv, D)), rng.normal(size=(N, ps, Hkv, Dv))
        call["block_table"] = rng.permutation(N)[: B * 3].reshape(B, 3)
    else:
        B_cache = 5 if setup.get("batch_idx") else B
        k_cache = rng.normal(size=(B_cache, S_cache, Hkv, D))
        v_cache = rng.normal(size=(B_cache, S_cache, Hkv, Dv))
        if setup.get("batch_idx"):
            call["cache_batch_idx"] = np.array([3, 0, 4])
    if setup.get("leftpad"):
        call["cache_leftpad"] = np.array([2, 0, 5])
    if "rotary" in setup:
        angle = rng.uniform(0, 2 * np.pi, size=(S_cache, setup["rotary"] // 2))
        call["rotary_cos"], call["rotary_sin"] = np.cos(angle), np.sin(angle)
    ref_out, ref_lse, ref_k, ref_v = fa_kvcache_reference(q, k_cache, v_cache, k, v, **call)
    inputs = [q, k_cache, v_cache] + ([k, v] if k is not None else []) + list(call.values())
    before = snapshot(*inputs)
    res = attention_with_kvcache(q, k_cache, v_cache, k, v, return_lse=True, **call)
    assert_unchanged(before, inputs)
    np.testing.assert_allclose(res.out, ref_out, rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(res.lse, ref_lse, rtol=RTOL, atol=0)
    np.testing.assert_allclose(res.k_cache, ref_k, rtol=1e-14, atol=1e-15)
    assert np.array_equal(res.v_cache, ref_v)
    if setup.get("short"):
        assert (res.out[0, :2] == 0).all() and np.isneginf(res.lse[0, :, :2]).all()
    plain = attention_with_kvcache(q, k_cache, v_cache, k, v, **call)
    assert np.array_equal(plain.out, res.out) and len(plain) == 3


def test_kvcache_reference_check_can_fail(rng):
    """Rotating q at cache_seqlens + i when not causal (instead of FA's cache_seqlens) differs."""
    q, k = rng.normal(size=(2, 3, 2, 4)), rng.normal(size=(2, 3, 2, 4))
    k_cache, v_cache = rng.normal(size=(2, 8, 2, 4)), rng.normal(size=(2, 8, 2, 4))
    angle = rng.uniform(0, 2 * np.pi, size=(8, 2))
    call = {"cache_seqlens": [2, 4], "rotary_cos": np.cos(angle), "rotary_sin": np.sin(angle)}
    out = attention_with_kvcache(q, k_cache, v_cache, k, k, **call).out
    as_causal, *_ = fa_kvcache_reference(q, k_cache, v_cache, k, k, causal=True, **call)
    plain, *_ = fa_kvcache_reference(q, k_cache, v_cache, k, k, **call)
    np.testing.assert_allclose(out, plain, rtol=RTOL, atol=1e-14)
    # causal=True changes both the mask and q's positions: compare the non-causal pair instead
    q_shifted = fa_kvcache_reference(q, k_cache, v_cache, k, k, window_size=(100, 100), **call)[0]
    assert np.abs(out - q_shifted).max() > 1e-3 and np.abs(out - as_causal).max() > 1e-3


def test_paged_kvcache_equals_paged_attention(rng):
    """Without an append, attention_with_kvcache on pages is paged_attention in FA's layouts."""
    k_pages, v_pages, table, lens = random_cache(rng, [5, 9], 4, 9, 2, 4, 3)
    q = rng.normal(size=(2, 4, 3, 4))  # (B, H, T, Dk)
    opts = {"causal": True, "window": (3, None), "sinks": np.array([0.1, 0.0, -1.0, 0.5])}
    out, lse = paged_attention(q, k_pages, v_pages, table, lens, return_lse=True, **opts)
    res = attention_with_kvcache(
        q.swapaxes(1, 2),
        k_pages,
        v_pages,
        cache_seqlens=lens,
        block_table=table,
        return_lse=True,
        **opts,
    )
    np.testing.assert_allclose(res.out, out.swapaxes(1, 2), rtol=RTOL, atol=1e-15)
    np.testing.assert_allclose(res.lse, lse, rtol=RTOL, atol=0)
    # int cache_seqlens applies to every sequence; window_size=(-1, -1) is no window
    same = attention_with_kvcache(
        q.swapaxes(1, 2), k_pages, v_pages, cache_seqlens=5, block_table=table
    )
    np.testing.assert_allclose(
        same.out[1],
        paged_attention(q, k_pages, v_pages, table, [5, 5])[1].swapaxes(0, 1),
        rtol=RTOL,
    )


def test_attention_with_kvcache_errors(rng):
    q, k = rng.normal(size=(2, 1, 2, 4)), rng.normal(size=(2, 1, 2, 4))
    k_cache = rng.normal(size=(2, 6, 2, 4))
    cos = sin = np.ones((6, 2))

    def call(k=k, kc=k_cache, **kw):
        kw.setdefault("cache_seqlens", [2, 3])
        return attention_with_kvcache(q, kc, kc, k, None if k is None else k, **kw)

    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] \+ T_new = 6 \+ 1 = 7 exceeds"):
        call(cache_seqlens=[2, 6])
    with pytest.raises(ValueError, match="need the new k and v"):
        call(k=None, rotary_cos=cos, rotary_sin=sin)
    with pytest.raises(ValueError, match="given together"):
        call(rotary_cos=cos)
    with pytest.raises(ValueError, match="seqlen_ro = 3 rows"):
        call(rotary_cos=cos[:3], rotary_sin=sin[:3])
    with pytest.raises(ValueError, match="exceeds Dk = 4"):
        call(rotary_cos=np.ones((6, 3)), rotary_sin=np.ones((6, 3)))
    with pytest.raises(
        ValueError, match=r"cache_leftpad\[0\] must be in \[0, cache_seqlens\[0\]\]"
    ):
        call(cache_leftpad=[3, 0])
    with pytest.raises(ValueError, match="repeats a row"):
        call(cache_batch_idx=[1, 1])
    call(k=None, cache_batch_idx=[1, 1])  # reading one row twice is fine
    with pytest.raises(ValueError, match=r"cache_batch_idx\[0\] = 2 is not a row"):
        call(cache_batch_idx=[2, 0])
    with pytest.raises(ValueError, match="B_cache = 1 rows for B = 2"):
        call(kc=k_cache[:1])
    with pytest.raises(ValueError, match="alibi_slopes"):
        call(alibi_slopes=np.ones(2))
    with pytest.raises(ValueError, match="not both"):
        call(window=(1, 0), window_size=(1, 0))
    with pytest.raises(ValueError, match="not both"):
        call(scale=0.5, softmax_scale=0.5)
    with pytest.raises(ValueError, match="window_size must be a pair"):
        call(window_size=3)
    with pytest.raises(ValueError, match="does not support bias"):
        call(bias=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="bottom_right aligned"):
        call(align="top_left")
    with pytest.raises(ValueError, match="k and v must be given together"):
        attention_with_kvcache(q, k_cache, k_cache, k, cache_seqlens=[2, 3])
    pages = rng.normal(size=(5, 2, 2, 4))
    with pytest.raises(ValueError, match="cache_batch_idx cannot be used with block_table"):
        call(kc=pages, block_table=[[0, 1], [2, 3]], cache_batch_idx=[0, 1])
    # a shared prefix page may be read, not written
    call(kc=pages, k=None, block_table=[[0, 1], [0, 3]])
    with pytest.raises(ValueError, match="appends into page 0, which sequences \\[1\\] also use"):
        call(kc=pages, block_table=[[0, 1], [0, 3]], cache_seqlens=[1, 3])
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 7 is not a page id"):
        call(kc=pages, block_table=[[0, 1], [2, 7]])
    with pytest.raises(ValueError, match=r"capacity max_blocks \* page_size = 4"):
        call(kc=pages, block_table=[[0, 1], [2, 3]], cache_seqlens=[2, 4])
    # FlashAttention's spellings: softcap 0 is off, num_splits is ignored, return_softmax_lse
    base = call(causal=True, return_lse=True)
    alias = call(causal=True, softcap=0.0, num_splits=3, return_softmax_lse=True)
    assert np.array_equal(base.out, alias.out) and np.array_equal(base.lse, alias.lse)
    fa = call(window_size=(1, -1), causal=True)
    assert np.array_equal(fa.out, call(window=(1, None), causal=True).out)


def test_kvcache_empty_sequence_and_sinks(rng):
    """No key at all (leftpad = cache_seqlens, no append): output 0 and lse -inf, or the sink."""
    q = rng.normal(size=(2, 2, 2, 4))
    k_cache = rng.normal(size=(2, 5, 1, 4))
    kw = {"cache_seqlens": [3, 2], "cache_leftpad": [3, 0], "return_lse": True}
    res = attention_with_kvcache(q, k_cache, k_cache, **kw)
    assert (res.out[0] == 0).all() and np.isneginf(res.lse[0]).all()
    assert np.isfinite(res.out[1]).all()
    sinks = np.array([0.5, -1.0])
    with_sinks = attention_with_kvcache(q, k_cache, k_cache, sinks=sinks, **kw)
    assert (with_sinks.out[0] == 0).all() and np.array_equal(
        with_sinks.lse[0], np.repeat(sinks[:, None], 2, 1)
    )
    with pytest.raises(ValueError, match="sequence 0 has no key to attend"):
        attention_with_kvcache(q, k_cache, k_cache, empty_rows="raise", **kw)


# ----------------------------------------------------------------------------- the guide


def test_guide_code_blocks_run():
    """The python blocks of docs/serving_layouts.md run top to bottom in one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "no python blocks found in docs/serving_layouts.md"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), namespace)
