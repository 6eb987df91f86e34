"""Top-k sparse attention and the lightning indexer (attention_ref/variants/sparse.py).

Sparse attention is checked against an independent gathered implementation written here (per
row: gather the listed keys, softmax of their scores, weighted sum of their values; FlashMLA's
``tests/ref.py`` formulation), (X5) of docs/derivations/sparse.md, for GQA, both index layouts,
T != S, batches, Dk != Dv, causal with both alignments, -1 padding and all -1 rows; its backward
against central differences with random cotangents. The indexer's scores are checked against an
explicit loop and its selection against a brute-force sort with the documented tie rule. Each
checker is shown to fail on a planted bug: the ``indices % S`` bug (-1 read as key S - 1), a
backward that ignores the index list, a selector with the opposite tie rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.gradcheck import check_vjp, error_report
from attention_ref.variants.sparse import (
    IndexerResult,
    lightning_indexer,
    sparse_attention,
    sparse_attention_backward,
    sparse_forward,
    sparse_mask,
)

#: The library and the gathered loops evaluate one formula in float64, summing in different
#: orders (and the library over extra exact zeros): a few ulps times the number of terms.
RTOL = 1e-12
#: A planted bug changes some rows' outputs by O(1) relative; anything above this is a failure.
WRONG_MIN = 1e-3


# ----------------------------------------------------------------------------- references


def allowed_pair(t, s, T, S, causal, align, window=None):
    """The positional rule of docs/conventions.md for one (query, key) pair."""
    tp = t + (S - T if align == "bottom_right" else 0)
    ok = True
    if causal:
        ok = ok and s <= tp
    if window is not None:
        left, right = window
        ok = ok and (left is None or s >= tp - left) and (right is None or s <= tp + right)
    return ok


def gathered_attention(
    q,
    k,
    v,
    indices,
    *,
    causal=False,
    align="top_left",
    window=None,
    scale=None,
    softcap=None,
    bias=None,
    sinks=None,
    empty_rows="zero",
):
    """(X5) with loops: q (B, H, T, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv),
    indices (B, Hkv or 1, T, topk) -> out (B, H, T, Dv), lse (B, H, T)."""
    B, H, T, Dk = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    out, lse = np.zeros((B, H, T, Dv)), np.full((B, H, T), -np.inf)
    for b in range(B):
        for h in range(H):
            kv = h // G
            g = kv if indices.shape[1] == Hkv else 0
            for t in range(T):
                keys = [
                    int(j)
                    for j in indices[b, g, t]
                    if j != -1 and allowed_pair(t, int(j), T, S, causal, align, window)
                ]
                logits = []
                for j in keys:
                    x = scale * float(np.dot(q[b, h, t], k[b, kv, j]))
                    if softcap is not None:
                        x = softcap * math.tanh(x / softcap)
                    if bias is not None:
                        x += bias[b, h, t, j]
                    logits.append(x)
                keys = [j for j, x in zip(keys, logits, strict=True) if x != -np.inf]
                logits = [x for x in logits if x != -np.inf]
                terms = logits + ([sinks[h]] if sinks is not None else [])
                if not terms:  # an empty row: the core's policies
                    if empty_rows == "uniform":
                        out[b, h, t] = v[b, kv].mean(axis=0)
                    elif empty_rows == "nan":
                        out[b, h, t] = np.nan
                    continue
                m = max(terms)
                denom = sum(math.exp(x - m) for x in terms)
                lse[b, h, t] = m + math.log(denom)
                for j, x in zip(keys, logits, strict=True):
                    out[b, h, t] += math.exp(x - m) / denom * v[b, kv, j]
    return out, lse


def loop_selected(indices, S, H):
    """The selected mask (B, H, T, S) by loops, as (X1)-(X2) define it."""
    B, Hl, T, _ = indices.shape
    sel = np.zeros((B, H, T, S), dtype=bool)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hl) if Hl > 1 else 0
            for t in range(T):
                for j in indices[b, g, t]:
                    if j != -1:
                        sel[b, h, t, j] = True
    return sel


def random_indices(rng, shape, S, *, pad=0.3, empty_row=None):
    """(..., Hl, T, topk) distinct keys per row, some slots -1; ``empty_row``: a row all -1."""
    *lead, topk = shape
    rows = int(np.prod(lead))
    idx = np.stack([rng.permutation(S)[:topk] for _ in range(rows)]).reshape(shape)
    idx = np.where(rng.random(shape) < pad, -1, idx)
    if empty_row is not None:
        idx[empty_row] = -1
    return idx


def make_case(rng, B, H, Hkv, T, S, Dk, Dv):
    return (
        rng.normal(size=(B, H, T, Dk)),
        rng.normal(size=(B, Hkv, S, Dk)),
        rng.normal(size=(B, Hkv, S, Dv)),
    )


def assert_close(actual, expected, what):
    rep = error_report(actual, expected)
    assert rep.rel_error <= RTOL and rep.nonfinite_mismatch == 0, f"{what}: {rep}"


# ----------------------------------------------------------------------------- forward

# (id, B, H, Hkv, T, S, Dk, Dv, layout, topk, options). T != S, B > 1, Dk != Dv, GQA unless
# the case is about something else.
CASES = [
    ("GQA kv-head lists", 2, 4, 2, 3, 7, 5, 3, "kv", 4, {}),
    ("GQA shared list", 2, 4, 2, 3, 7, 5, 3, "shared", 4, {}),
    ("causal top_left: future keys dropped", 2, 4, 2, 5, 7, 5, 3, "kv", 4, {"causal": True}),
    (
        "causal bottom_right",
        2,
        4,
        2,
        3,
        7,
        5,
        3,
        "shared",
        5,
        {"causal": True, "align": "bottom_right"},
    ),
    ("MQA, T > S", 2, 3, 1, 6, 4, 2, 5, "kv", 3, {"causal": True}),
    ("MHA, topk = S", 2, 2, 2, 3, 4, 3, 2, "kv", 4, {"scale": 0.7}),
    ("window", 2, 4, 2, 4, 8, 3, 2, "kv", 5, {"window": (2, 1), "align": "bottom_right"}),
]
IDS = [c[0] for c in CASES]


def case_inputs(rng, B, H, Hkv, T, S, Dk, Dv, layout, topk):
    q, k, v = make_case(rng, B, H, Hkv, T, S, Dk, Dv)
    Hl = Hkv if layout == "kv" else 1
    idx = random_indices(rng, (B, Hl, T, topk), S, empty_row=(1, 0, T - 1))
    return q, k, v, idx


@pytest.mark.parametrize("_id, B, H, Hkv, T, S, Dk, Dv, layout, topk, opts", CASES, ids=IDS)
def test_forward_equals_gathered_loops(rng, _id, B, H, Hkv, T, S, Dk, Dv, layout, topk, opts):
    q, k, v, idx = case_inputs(rng, B, H, Hkv, T, S, Dk, Dv, layout, topk)
    out, lse = sparse_attention(q, k, v, idx, return_lse=True, **opts)
    assert out.shape == (B, H, T, Dv) and lse.shape == (B, H, T)
    ref_out, ref_lse = gathered_attention(q, k, v, idx, **opts)
    assert_close(out, ref_out, "out")
    assert_close(lse, ref_lse, "lse")
    assert np.isneginf(lse[1, : H // Hkv if layout == "kv" else H, T - 1]).all()  # all -1 rows


@pytest.mark.parametrize("_id, B, H, Hkv, T, S, Dk, Dv, layout, topk, opts", CASES, ids=IDS)
def test_forward_equals_dense_attention_with_the_loop_mask(
    rng, _id, B, H, Hkv, T, S, Dk, Dv, layout, topk, opts
):
    """(X3)-(X4): the core's dense attention under (selected mask by loops) AND the options."""
    q, k, v, idx = case_inputs(rng, B, H, Hkv, T, S, Dk, Dv, layout, topk)
    sel = loop_selected(idx, S, H)
    np.testing.assert_array_equal(sparse_mask(idx, S, num_heads=H) & np.ones_like(sel), sel)
    dense = ar.scaled_dot_product_attention(q, k, v, mask=sel, **opts)
    np.testing.assert_array_equal(sparse_attention(q, k, v, idx, **opts), dense)


def test_future_indices_are_masked_by_causal(rng):
    """An index list that names only future keys under causal gives an empty row; listing the
    future keys or not gives the same output on every other row."""
    q, k, v = make_case(rng, 2, 4, 2, 4, 6, 3, 2)
    past = np.array([[0, 1], [1, 0], [2, 1], [3, 0]])  # (T, 2), all <= t
    future = np.array([[5, 4], [5, 3], [5, 4], [5, 4]])  # (T, 2), all > t
    both = np.concatenate([past, future], axis=-1)[None, None]  # (1, 1, T, 4)
    np.testing.assert_allclose(
        sparse_attention(q, k, v, both, causal=True),
        sparse_attention(q, k, v, past[None, None], causal=True),
        rtol=RTOL,
        atol=0,
    )
    out, lse = sparse_attention(q, k, v, future[None, None], causal=True, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()  # every row empty under "zero"
    # without causal the future keys count
    assert error_report(sparse_attention(q, k, v, both), out).rel_error > WRONG_MIN


def test_the_two_layouts_agree(rng):
    """A shared list (axis 1) equals the same list repeated for every kv head (axis Hkv)."""
    q, k, v = make_case(rng, 2, 6, 3, 4, 7, 3, 2)
    shared = random_indices(rng, (2, 1, 4, 3), 7)
    repeated = np.repeat(shared, 3, axis=1)  # (2, Hkv, T, topk)
    np.testing.assert_array_equal(
        sparse_attention(q, k, v, shared), sparse_attention(q, k, v, repeated)
    )
    # per-kv-head lists differ from each other: head h must use list h // G, not h % Hkv
    per_kv = random_indices(rng, (2, 3, 4, 3), 7, pad=0.0)
    ref, _ = gathered_attention(q, k, v, per_kv)
    assert_close(sparse_attention(q, k, v, per_kv), ref, "per kv head")
    sel = sparse_mask(per_kv, 7)  # (2, Hkv, T, S)
    wrong = ar.scaled_dot_product_attention(q, k, v, mask=np.tile(sel, (1, 2, 1, 1)))  # h % Hkv
    assert error_report(wrong, ref).rel_error > WRONG_MIN


def test_order_within_a_row_does_not_matter(rng):
    q, k, v = make_case(rng, 2, 4, 2, 3, 6, 3, 2)
    idx = random_indices(rng, (2, 2, 3, 4), 6)
    shuffled = np.take_along_axis(
        idx, rng.permuted(np.tile(np.arange(4), (2, 2, 3, 1)), axis=-1), -1
    )
    assert_close(sparse_attention(q, k, v, shuffled), sparse_attention(q, k, v, idx), "order")


@pytest.mark.parametrize("policy", ["zero", "uniform", "nan"])
def test_all_minus_one_rows_follow_the_empty_row_policy(rng, policy):
    q, k, v = make_case(rng, 2, 4, 2, 3, 5, 3, 2)
    idx = random_indices(rng, (2, 2, 3, 3), 5, pad=0.0)
    idx[0, 1, 2] = -1  # batch 0, kv head 1, row 2: query heads 2 and 3 have nothing to attend
    out, lse = sparse_attention(q, k, v, idx, empty_rows=policy, return_lse=True)
    ref_out, ref_lse = gathered_attention(q, k, v, idx, empty_rows=policy)
    assert np.isneginf(lse[0, 2:, 2]).all()
    if policy == "nan":
        assert np.isnan(out[0, 2:, 2]).all()
        out, ref_out = np.nan_to_num(out), np.nan_to_num(ref_out)
    assert_close(out, ref_out, policy)
    assert_close(lse, ref_lse, "lse")
    # the core under the equivalent dense mask does the same
    dense = ar.scaled_dot_product_attention(
        q, k, v, mask=loop_selected(idx, 5, 4), empty_rows=policy
    )
    np.testing.assert_array_equal(sparse_attention(q, k, v, idx, empty_rows=policy), dense)
    if policy == "uniform":
        np.testing.assert_allclose(out[0, 2:, 2], np.broadcast_to(v[0, 1].mean(0), (2, 2)))
    with pytest.raises(ValueError, match="empty_rows='raise'"):
        sparse_attention(q, k, v, idx, empty_rows="raise")


def test_options_apply_on_top(rng):
    """bias (with a -inf entry), softcap, scale, sinks, and a boolean mask ANDed in."""
    B, H, Hkv, T, S = 2, 4, 2, 3, 6
    q, k, v = make_case(rng, B, H, Hkv, T, S, 5, 3)
    idx = random_indices(rng, (B, Hkv, T, 4), S)
    bias = rng.normal(size=(B, H, T, S))
    bias[0, 1, 0, :] = -np.inf  # a whole row masked by the bias: empty
    mask = rng.random((T, S)) < 0.7
    sinks = rng.normal(size=H)
    opts = {"softcap": 2.0, "scale": 0.6, "causal": True, "align": "bottom_right"}
    out, lse = sparse_attention(
        q, k, v, idx, bias=bias, sinks=sinks, mask=mask, return_lse=True, **opts
    )
    ref_bias = np.where(mask, bias, -np.inf)  # the mask as -inf bias for the loops
    ref_out, ref_lse = gathered_attention(q, k, v, idx, bias=ref_bias, sinks=sinks, **opts)
    assert_close(out, ref_out, "out")
    assert_close(lse, ref_lse, "lse")
    assert lse[0, 1, 0] == sinks[1]  # a row with only its sink: lse = sink, out = 0
    assert (out[0, 1, 0] == 0).all()


def test_dropout_uses_the_same_keep_mask(rng):
    q, k, v = make_case(rng, 2, 4, 2, 3, 5, 3, 2)
    idx = random_indices(rng, (2, 1, 3, 3), 5)
    keep = rng.random((2, 4, 3, 5)) >= 0.3
    opts = {"dropout_p": 0.3, "dropout_mask": keep}
    dense = ar.scaled_dot_product_attention(q, k, v, mask=loop_selected(idx, 5, 4), **opts)
    np.testing.assert_array_equal(sparse_attention(q, k, v, idx, **opts), dense)
    with pytest.raises(ValueError, match="Generator"):
        sparse_attention_backward(
            np.ones((2, 4, 3, 2)), q, k, v, idx, dropout_p=0.3, dropout_mask=rng
        )


# ----------------------------------------------------------------------------- the % S bug


def buggy_sparse_attention(q, k, v, indices, **opts):
    """The classic bug: scatter ``indices % S`` (so -1 becomes S - 1, the last key)."""
    S, H = k.shape[-2], q.shape[-3]
    sel = np.zeros(indices.shape[:-1] + (S,), dtype=bool)
    np.put_along_axis(sel, indices % S, True, axis=-1)
    sel = np.repeat(sel, H // sel.shape[-3], axis=-3) if sel.shape[-3] > 1 else sel
    return ar.scaled_dot_product_attention(q, k, v, mask=sel, **opts)


def test_minus_one_read_as_the_last_key_is_caught(rng):
    B, H, Hkv, T, S = 2, 4, 2, 3, 6
    q, k, v = make_case(rng, B, H, Hkv, T, S, 3, 2)
    idx = random_indices(rng, (B, Hkv, T, 3), S - 1, pad=0.4)  # keys < S - 1, so S - 1 unlisted
    idx[0, 0, 0] = [-1, 2, -1]
    ref, _ = gathered_attention(q, k, v, idx)
    assert_close(sparse_attention(q, k, v, idx), ref, "sparse_attention")
    assert error_report(buggy_sparse_attention(q, k, v, idx), ref).rel_error > WRONG_MIN
    # and in the mask itself: -1 selects nothing, in particular not key S - 1
    m = sparse_mask(idx, S)
    assert not m[..., S - 1].any()
    np.testing.assert_array_equal(m[0, 0, 0], [False, False, True, False, False, False])
    # an all -1 row is empty, not a row attending key S - 1
    idx[1, 1, 2] = -1
    out = sparse_attention(q, k, v, idx)
    assert (out[1, 2:, 2] == 0).all()
    assert not np.allclose(buggy_sparse_attention(q, k, v, idx)[1, 2:, 2], 0)


# ----------------------------------------------------------------------------- backward


def test_backward_matches_finite_differences(rng):
    B, H, Hkv, T, S, Dk, Dv = 2, 4, 2, 3, 5, 3, 2
    q, k, v = make_case(rng, B, H, Hkv, T, S, Dk, Dv)
    idx = random_indices(rng, (B, Hkv, T, 3), S, empty_row=(0, 1, 1))
    opts = {"causal": True, "align": "bottom_right", "softcap": 3.0}
    dout = rng.normal(size=(B, H, T, Dv))  # random cotangent
    g = sparse_attention_backward(dout, q, k, v, idx, **opts)

    def f(q, k, v):
        return sparse_attention(q, k, v, idx, **opts)

    res = check_vjp(f, {"q": q, "k": k, "v": v}, dout, {"q": g.dq, "k": g.dk, "v": g.dv})
    assert res.passed, str(res)
    # the trace pair gives the same gradients
    g2 = ar.sdpa_backward(dout, sparse_forward(q, k, v, idx, **opts))
    for a, b in zip(g[:3], g2[:3], strict=True):
        np.testing.assert_array_equal(a, b)


def test_backward_bias_sinks_and_dlse(rng):
    B, H, Hkv, T, S = 2, 4, 2, 3, 5
    q, k, v = make_case(rng, B, H, Hkv, T, S, 3, 2)
    idx = random_indices(rng, (B, 1, T, 3), S)
    bias, sinks = rng.normal(size=(H, T, S)), rng.normal(size=H)
    dout, dlse = rng.normal(size=(B, H, T, 2)), rng.normal(size=(B, H, T))
    g = sparse_attention_backward(dout, q, k, v, idx, bias=bias, sinks=sinks, dlse=dlse)

    def f(q, k, v, bias, sinks):  # out and lse as one array, for one cotangent
        out, lse = sparse_attention(q, k, v, idx, bias=bias, sinks=sinks, return_lse=True)
        return np.concatenate([out, lse[..., None]], axis=-1)

    cot = np.concatenate([dout, dlse[..., None]], axis=-1)
    inputs = {"q": q, "k": k, "v": v, "bias": bias, "sinks": sinks}
    grads = {"q": g.dq, "k": g.dk, "v": g.dv, "bias": g.dbias, "sinks": g.dsinks}
    res = check_vjp(f, inputs, cot, grads)
    assert res.passed, str(res)


def test_a_backward_that_ignores_the_indices_fails(rng):
    """The checker can fail: the dense backward (no index mask) and the % S backward."""
    B, H, Hkv, T, S = 2, 4, 2, 3, 5
    q, k, v = make_case(rng, B, H, Hkv, T, S, 3, 2)
    idx = random_indices(rng, (B, Hkv, T, 2), S - 1)
    dout = rng.normal(size=(B, H, T, 2))

    def f(q, k, v):
        return sparse_attention(q, k, v, idx)

    dense = ar.scaled_dot_product_attention_backward(dout, q, k, v)
    res = check_vjp(
        f, {"q": q, "k": k, "v": v}, dout, {"q": dense.dq, "k": dense.dk, "v": dense.dv}
    )
    assert not res.passed
    sel = np.zeros((B, Hkv, T, S), bool)
    np.put_along_axis(sel, idx % S, True, axis=-1)  # -1 read as key S - 1
    wrong = ar.scaled_dot_product_attention_backward(
        dout, q, k, v, mask=np.repeat(sel, H // Hkv, axis=1)
    )
    res = check_vjp(
        f, {"q": q, "k": k, "v": v}, dout, {"q": wrong.dq, "k": wrong.dk, "v": wrong.dv}
    )
    assert not res.passed


def test_keys_never_selected_get_exactly_zero_gradient(rng):
    B, H, Hkv, T, S = 2, 4, 2, 4, 8
    q, k, v = make_case(rng, B, H, Hkv, T, S, 3, 2)
    idx = random_indices(rng, (B, Hkv, T, 3), 5, pad=0.2)  # keys 5, 6, 7 never listed
    idx[1, 0, :, 0] = 7  # kv head 0 of batch 1 lists key 7, but only in the future of each row
    dout = rng.normal(size=(B, H, T, 2))
    g = sparse_attention_backward(dout, q, k, v, idx, causal=True)
    sel = loop_selected(idx, S, H) & ar.causal_mask(T, S)  # (B, H, T, S)
    used = sel.reshape(B, Hkv, H // Hkv, T, S).any(axis=(2, 3))  # (B, Hkv, S)
    assert not used[..., 5:].any() and (~used).sum() > 6
    assert (g.dk[~used] == 0).all() and (g.dv[~used] == 0).all()
    assert (g.dv[used] != 0).all()  # (dk of a row's only key is 0 too: its weight is 1)
    # "uniform" empty rows are the documented exception for dv; dk stays zero
    idx[0, 0, 1] = -1
    gu = sparse_attention_backward(dout, q, k, v, idx, causal=True, empty_rows="uniform")
    assert (gu.dk[0, 0, 5:] == 0).all() and (gu.dv[0, 0, 5:] != 0).all()


# ----------------------------------------------------------------------------- errors, mutation


def test_repeated_keys_are_an_error_naming_the_first(rng):
    q, k, v = make_case(rng, 2, 4, 2, 3, 6, 3, 2)
    idx = random_indices(rng, (2, 2, 3, 4), 6, pad=0.0)
    idx[1, 0, 2] = [3, -1, 3, -1]  # -1 may repeat; 3 may not
    idx[1, 1, 0] = [2, 2, 2, 1]
    with pytest.raises(ValueError, match=r"key 3 appears 2 times in row indices\[\(1, 0, 2\)\]"):
        sparse_attention(q, k, v, idx)
    with pytest.raises(ValueError, match=r"key 3 appears 2 times"):
        sparse_attention_backward(np.ones((2, 4, 3, 2)), q, k, v, idx)
    idx[1, 0, 2] = [3, -1, 0, -1]
    with pytest.raises(ValueError, match=r"key 2 appears 3 times in row indices\[\(1, 1, 0\)\]"):
        sparse_mask(idx, 6)


@pytest.mark.parametrize(
    "bad, where", [(6, r"indices\[\(0, 1, 2, 3\)\] = 6"), (-2, r"indices\[\(0, 1, 2, 3\)\] = -2")]
)
def test_out_of_range_indices_are_an_error(rng, bad, where):
    q, k, v = make_case(rng, 2, 4, 2, 3, 6, 3, 2)
    idx = random_indices(rng, (2, 2, 3, 4), 5, pad=0.0)
    idx[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"\[0, S\) = \[0, 6\) or -1 .*" + where):
        sparse_attention(q, k, v, idx)


def test_bad_indices_shapes_and_types(rng):
    q, k, v = make_case(rng, 2, 4, 2, 3, 6, 3, 2)
    idx = random_indices(rng, (2, 2, 3, 2), 6)
    with pytest.raises(TypeError, match="indices must hold integers.*float64"):
        sparse_attention(q, k, v, idx.astype(float))
    with pytest.raises(TypeError, match="indices must hold integers.*bool"):
        sparse_attention(q, k, v, idx > 0)
    with pytest.raises(ValueError, match=r"Hkv = 2 \(or 1\) and T = 3.*\(2, 4, 3, 2\)"):
        sparse_attention(q, k, v, np.zeros((2, 4, 3, 2), int))  # H lists instead of Hkv
    with pytest.raises(ValueError, match=r"and T = 3; got indices.shape=\(2, 2, 4, 2\)"):
        sparse_attention(q, k, v, np.zeros((2, 2, 4, 2), int))
    with pytest.raises(ValueError, match=r"batch dims .* must broadcast to q's \(2,\)"):
        sparse_attention(q, k, v, np.zeros((3, 2, 3, 2), int))
    with pytest.raises(ValueError, match=r"3 or more dims"):
        sparse_attention(q, k, v, np.zeros((3, 2), int))
    with pytest.raises(ValueError, match=r"topk >= 1"):
        sparse_attention(q, k, v, np.zeros((2, 2, 3, 0), int))
    with pytest.raises(ValueError, match=r"mask must be broadcastable"):
        sparse_attention(q, k, v, idx, mask=np.ones((4, 6), bool))
    with pytest.raises(ValueError, match=r"num_heads=3 must be a multiple"):
        sparse_mask(idx, 6, num_heads=3)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        sparse_attention(q, k, v, idx, return_lse=1)
    # batch dims broadcast: one list for every batch element
    one = idx[:1]
    np.testing.assert_array_equal(
        sparse_attention(q, k, v, one), sparse_attention(q, k, v, np.repeat(one, 2, axis=0))
    )


def test_inputs_are_not_mutated(rng):
    q, k, v = make_case(rng, 2, 4, 2, 3, 6, 3, 2)
    idx = random_indices(rng, (2, 2, 3, 4), 6)
    mask, dout = rng.random((3, 6)) < 0.8, rng.normal(size=(2, 4, 3, 2))
    before = [x.copy() for x in (q, k, v, idx, mask, dout)]
    out = sparse_attention(q, k, v, idx, mask=mask, causal=True)
    g = sparse_attention_backward(dout, q, k, v, idx, mask=mask, causal=True)
    sparse_mask(idx, 6, num_heads=4)
    for x, y in zip((q, k, v, idx, mask, dout), before, strict=True):
        np.testing.assert_array_equal(x, y)
    for r in (out, g.dq, g.dk, g.dv):
        assert not any(np.may_share_memory(r, x) for x in (q, k, v, dout))
    qi, ki, w = rng.normal(size=(3, 2, 4)), rng.normal(size=(5, 4)), rng.normal(size=(3, 2))
    before = [x.copy() for x in (qi, ki, w)]
    lightning_indexer(qi, ki, w, 3)
    for x, y in zip((qi, ki, w), before, strict=True):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- lightning indexer


def loop_index_scores(q_idx, k_idx, w, scale=1.0):
    """(X8) with loops: q_idx (B, T, HI, DI), k_idx (B, S, DI), w (B, T, HI) -> (B, T, S)."""
    B, T, HI, _ = q_idx.shape
    S = k_idx.shape[1]
    out = np.zeros((B, T, S))
    for b in range(B):
        for t in range(T):
            for s in range(S):
                out[b, t, s] = scale * sum(
                    w[b, t, j] * max(0.0, float(np.dot(q_idx[b, t, j], k_idx[b, s])))
                    for j in range(HI)
                )
    return out


def brute_force_topk(scores, allowed, topk):
    """(X10): per row, allowed keys sorted by (-score, key), the first topk, -1 padding."""
    *lead, T, S = scores.shape
    out = np.full(tuple(lead) + (T, topk), -1)
    for pos in np.ndindex(*lead, T):
        keys = sorted((s for s in range(S) if allowed[pos][s]), key=lambda s: (-scores[pos][s], s))
        out[pos][: min(topk, len(keys))] = keys[:topk]
    return out


@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize("causal", [True, False])
def test_indexer_scores_and_selection(rng, causal, align):
    B, T, S, HI, DI, topk = 2, 4, 7, 3, 5, 3
    q_idx, k_idx = rng.normal(size=(B, T, HI, DI)), rng.normal(size=(B, S, DI))
    w = rng.normal(size=(B, T, HI))
    r = lightning_indexer(q_idx, k_idx, w, topk, causal=causal, align=align, scale=0.3)
    assert isinstance(r, IndexerResult)
    assert r.indices.shape == (B, 1, T, topk) and r.indices.dtype == np.int64
    allowed = np.array(
        [[[allowed_pair(t, s, T, S, causal, align) for s in range(S)] for t in range(T)]] * B
    )
    ref = loop_index_scores(q_idx, k_idx, w, 0.3)
    assert_close(np.where(allowed, r.scores, 0), np.where(allowed, ref, 0), "scores")
    assert np.isneginf(r.scores[~allowed]).all() and np.isfinite(r.scores[allowed]).all()
    np.testing.assert_array_equal(r.indices[:, 0], brute_force_topk(ref, allowed, topk))
    picked = np.take_along_axis(ref, np.maximum(r.indices[:, 0], 0), -1)
    assert_close(r.topk_scores[:, 0], np.where(r.indices[:, 0] >= 0, picked, -np.inf), "topk")


def test_indexer_tie_rule_with_exact_ties(rng):
    """Integer inputs make every score exact, so ties are exact: the smaller key comes first."""
    B, T, S, HI, DI, topk = 2, 5, 9, 2, 3, 4
    q_idx = rng.integers(-2, 3, size=(B, T, HI, DI)).astype(float)
    k_base = rng.integers(-2, 3, size=(B, 3, DI)).astype(float)
    k_idx = k_base[:, rng.integers(0, 3, size=S)]  # (B, S, DI): every key repeated: exact ties
    w = rng.integers(1, 3, size=(B, T, HI)).astype(float)
    r = lightning_indexer(q_idx, k_idx, w, topk, causal=False)
    ref = loop_index_scores(q_idx, k_idx, w)
    assert (np.diff(np.sort(ref, -1), axis=-1) == 0).any()  # ties present
    allowed = np.ones_like(ref, dtype=bool)
    expected = brute_force_topk(ref, allowed, topk)
    np.testing.assert_array_equal(r.indices[:, 0], expected)
    # a selector with the opposite tie rule (larger key first among equals) is caught
    opposite = np.argsort(ref, axis=-1, kind="stable")[..., ::-1][..., :topk]
    assert not np.array_equal(opposite, expected)
    # all scores equal (here all 0: every dot product <= 0 under a negative query): keys in order
    zero = lightning_indexer(-np.abs(q_idx) - 1, np.abs(k_idx) + 1, w, topk, causal=True)
    assert (zero.scores[np.isfinite(zero.scores)] == 0).all()
    np.testing.assert_array_equal(zero.indices[:, 0], np.broadcast_to(np.arange(topk), (B, T, 4)))


def test_indexer_pads_with_minus_one_and_never_selects_disallowed_keys(rng):
    B, T, S, HI, DI = 2, 4, 4, 2, 3
    q_idx, k_idx = rng.normal(size=(B, T, HI, DI)), rng.normal(size=(B, S, DI))
    w = rng.normal(size=(B, T, HI))
    mask = np.ones((T, S), bool)
    mask[3, 1] = False
    for topk in (3, 6):  # 6 > S: more slots than keys
        r = lightning_indexer(q_idx, k_idx, w, topk, causal=True, align="top_left", mask=mask)
        idx = r.indices[:, 0]  # (B, T, topk)
        for t in range(T):
            n_allowed = t + 1 - (t == 3)
            row = idx[:, t]
            assert (row[:, : min(topk, n_allowed)] >= 0).all()
            assert (row[:, min(topk, n_allowed) :] == -1).all()
            assert (row[row >= 0] <= t).all()  # causal
        assert not (idx[:, 3] == 1).any()  # masked
        assert np.isneginf(r.topk_scores[:, 0][idx == -1]).all()


def test_indexer_indices_feed_sparse_attention(rng):
    B, H, Hkv, T, S = 2, 4, 2, 4, 6
    q, k, v = make_case(rng, B, H, Hkv, T, S, 3, 2)
    r = lightning_indexer(
        rng.normal(size=(B, T, 2, 3)), rng.normal(size=(B, S, 3)), rng.normal(size=(B, T, 2)), 3
    )
    opts = {"causal": True, "align": "bottom_right"}
    ref, _ = gathered_attention(q, k, v, r.indices, **opts)
    assert_close(sparse_attention(q, k, v, r.indices, **opts), ref, "indexer -> attention")


def test_indexer_errors(rng):
    qi, ki, w = rng.normal(size=(3, 2, 4)), rng.normal(size=(5, 4)), rng.normal(size=(3, 2))
    with pytest.raises(ValueError, match=r"k_idx must have shape \(\.\.\., S, D_I\)"):
        lightning_indexer(qi, rng.normal(size=(5, 3)), w, 2)
    with pytest.raises(ValueError, match=r"k_idx must have .* batch dims"):
        lightning_indexer(qi, rng.normal(size=(2, 5, 4)), w, 2)
    with pytest.raises(ValueError, match=r"weights must have shape \(\.\.\., T, H_I\) = \(3, 2\)"):
        lightning_indexer(qi, ki, w.T, 2)
    with pytest.raises(ValueError, match=r"q_idx must have shape \(\.\.\., T, H_I, D_I\)"):
        lightning_indexer(qi[0], ki, w, 2)
    with pytest.raises(ValueError, match="topk must be a positive int; got 0"):
        lightning_indexer(qi, ki, w, 0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        lightning_indexer(qi, ki, w, 2, scale=0.0)
    with pytest.raises(ValueError, match="align must be one of"):
        lightning_indexer(qi, ki, w, 2, align="bottom")
    with pytest.raises(TypeError, match="causal must be a bool"):
        lightning_indexer(qi, ki, w, 2, causal=1)
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="weights must be finite"):
        lightning_indexer(qi, ki, bad, 2)
    with pytest.raises(ValueError, match=r"mask must be broadcastable to \(\.\.\., T, S\)"):
        lightning_indexer(qi, ki, w, 2, mask=np.ones((3, 4), bool))
