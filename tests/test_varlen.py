"""Packed variable-length attention: equal to each sequence alone (forward and backward), to
dense attention with the block-diagonal mask, to an independent loop implementation and to
finite differences; empty sequences; errors for malformed offsets. Also runs the code blocks of
docs/decoding_and_varlen.md."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from naive import naive_attention
from scipy.special import logsumexp as scipy_logsumexp

import attention_ref as ar
from attention_ref.gradcheck import check_complex_step, check_vjp, error_report
from attention_ref.variants.varlen import (
    block_diagonal_mask,
    cu_seqlens_from_lengths,
    varlen_attention,
    varlen_attention_backward,
    varlen_backward,
    varlen_forward,
)

#: Agreement with per-sequence runs, the dense block-diagonal call and the naive loops: float64
#: evaluations of one formula, summed in different orders (or with extra exact zeros), so they
#: differ by a few ulps times the number of terms, far below this (the brief's 1e-12).
RTOL = 1e-12
#: A wrong variant (causal over the packed axis) is off by O(1) relative; anything above this
#: is a clear failure, far above RTOL.
WRONG_MIN = 1e-3

DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "decoding_and_varlen.md"

# (id, query lengths T_b, key lengths S_b, H, Hkv, Dk, Dv, options). Shapes keep T_b != S_b,
# H > 1, Hkv < H, Dk != Dv and several sequences, unless an edge case is the point.
CASES = [
    ("self-attention causal", [3, 1, 4], [3, 1, 4], 4, 2, 5, 3, {"causal": True}),
    (
        "T_b != S_b causal bottom_right",
        [2, 1, 3],
        [4, 2, 3],
        4,
        2,
        5,
        3,
        {"causal": True, "align": "bottom_right"},
    ),
    ("T_b != S_b causal top_left", [2, 3, 1], [4, 2, 3], 4, 2, 5, 3, {"causal": True}),
    (
        "T_b > S_b bottom_right: empty rows",
        [3, 2],
        [1, 4],
        2,
        1,
        3,
        4,
        {"causal": True, "align": "bottom_right"},
    ),
    (
        "window bottom_right",
        [3, 2, 4],
        [5, 2, 6],
        4,
        2,
        5,
        3,
        {"window": (1, 0), "align": "bottom_right"},
    ),
    (
        "window + causal top_left, MQA",
        [4, 3],
        [5, 3],
        3,
        1,
        4,
        2,
        {"window": (2, None), "causal": True},
    ),
    ("softcap and scale, no mask", [2, 3], [4, 1], 4, 2, 5, 3, {"softcap": 1.5, "scale": 0.7}),
    (
        "empty sequences in the middle",
        [2, 0, 3, 1, 2],
        [3, 2, 4, 0, 2],
        4,
        2,
        5,
        3,
        {"causal": True, "align": "bottom_right"},
    ),
    ("length-1 sequences", [1, 1, 1], [1, 1, 1], 2, 2, 3, 2, {"causal": True}),
    ("MHA Hkv = H", [2, 3], [3, 2], 3, 3, 2, 4, {}),
]
IDS = [c[0] for c in CASES]


def make_packed(rng, lengths_q, lengths_k, H, Hkv, Dk, Dv):
    cu_q, cu_k = cu_seqlens_from_lengths(lengths_q), cu_seqlens_from_lengths(lengths_k)
    q = rng.normal(size=(int(cu_q[-1]), H, Dk))
    k = rng.normal(size=(int(cu_k[-1]), Hkv, Dk))
    v = rng.normal(size=(int(cu_k[-1]), Hkv, Dv))
    return q, k, v, cu_q, cu_k


def heads_first(x):
    """(rows, heads, width) -> (heads, rows, width)."""
    return x.swapaxes(0, 1)


def per_sequence(q, k, v, cu_q, cu_k, opts, dout=None):
    """The definition: each sequence alone through the library's attention; packed results.

    A sequence without keys gets the "zero" policy's output 0 and no gradient."""
    out = np.zeros(q.shape[:2] + (v.shape[2],))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if cu_q[b] == cu_q[b + 1] or cu_k[b] == cu_k[b + 1]:
            continue
        args = (heads_first(q[rows]), heads_first(k[keys]), heads_first(v[keys]))
        out[rows] = heads_first(ar.scaled_dot_product_attention(*args, **opts))
        if dout is not None:
            g = ar.scaled_dot_product_attention_backward(heads_first(dout[rows]), *args, **opts)
            dq[rows], dk[keys], dv[keys] = heads_first(g.dq), heads_first(g.dk), heads_first(g.dv)
    return out, (dq, dk, dv)


def assert_close(actual, expected, what):
    rep = error_report(actual, expected)
    assert rep.rel_error <= RTOL and rep.nonfinite_mismatch == 0, f"{what}: {rep}"


@pytest.mark.parametrize("_id, lq, lk, H, Hkv, Dk, Dv, opts", CASES, ids=IDS)
def test_forward_equals_each_sequence_alone(rng, _id, lq, lk, H, Hkv, Dk, Dv, opts):
    q, k, v, cu_q, cu_k = make_packed(rng, lq, lk, H, Hkv, Dk, Dv)
    out = varlen_attention(q, k, v, cu_q, cu_k, **opts)
    assert out.shape == (q.shape[0], H, Dv)
    assert_close(out, per_sequence(q, k, v, cu_q, cu_k, opts)[0], "per-sequence")


@pytest.mark.parametrize("_id, lq, lk, H, Hkv, Dk, Dv, opts", CASES, ids=IDS)
def test_forward_equals_naive_loops(rng, _id, lq, lk, H, Hkv, Dk, Dv, opts):
    """Independent of the library: the loop reference of tests/naive.py, one sequence at a time."""
    q, k, v, cu_q, cu_k = make_packed(rng, lq, lk, H, Hkv, Dk, Dv)
    out = varlen_attention(q, k, v, cu_q, cu_k, **opts)
    expected = np.zeros_like(out)  # rows of sequences without keys: 0 ("zero")
    for b in range(len(lq)):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lq[b] and lk[b]:
            one = naive_attention(
                heads_first(q[rows])[None],
                heads_first(k[keys])[None],
                heads_first(v[keys])[None],
                **opts,
            )  # (1, H, T_b, Dv)
            expected[rows] = heads_first(one[0])
    assert_close(out, expected, "naive loops")


@pytest.mark.parametrize("_id, lq, lk, H, Hkv, Dk, Dv, opts", CASES, ids=IDS)
def test_backward_equals_each_sequence_alone(rng, _id, lq, lk, H, Hkv, Dk, Dv, opts):
    q, k, v, cu_q, cu_k = make_packed(rng, lq, lk, H, Hkv, Dk, Dv)
    dout = rng.normal(size=(q.shape[0], H, Dv))  # random cotangent
    g = varlen_attention_backward(dout, q, k, v, cu_q, cu_k, **opts)
    _, (dq, dk, dv) = per_sequence(q, k, v, cu_q, cu_k, opts, dout)
    for name, actual, expected in (("dq", g.dq, dq), ("dk", g.dk, dk), ("dv", g.dv, dv)):
        assert actual.shape == expected.shape, name
        assert_close(actual, expected, name)
    # the trace pair gives the same gradients as the recomputing backward
    g2 = varlen_backward(dout, varlen_forward(q, k, v, cu_q, cu_k, **opts))
    for a, b in zip(g, g2, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("_id, lq, lk, H, Hkv, Dk, Dv, opts", CASES, ids=IDS)
def test_equals_dense_attention_with_block_diagonal_mask(rng, _id, lq, lk, H, Hkv, Dk, Dv, opts):
    """(V3): one dense call over the packed axis with the mask, forward and backward ("zero")."""
    q, k, v, cu_q, cu_k = make_packed(rng, lq, lk, H, Hkv, Dk, Dv)
    dout = rng.normal(size=(q.shape[0], H, Dv))
    mask_opts = {key: val for key, val in opts.items() if key in ("causal", "align", "window")}
    rest = {key: val for key, val in opts.items() if key not in mask_opts}
    mask = block_diagonal_mask(cu_q, cu_k, **mask_opts)
    assert mask.shape == (q.shape[0], k.shape[0])
    dense_args = (heads_first(q), heads_first(k), heads_first(v))
    dense = ar.scaled_dot_product_attention(*dense_args, mask=mask, **rest)
    assert_close(varlen_attention(q, k, v, cu_q, cu_k, **opts), heads_first(dense), "dense out")
    gd = ar.scaled_dot_product_attention_backward(heads_first(dout), *dense_args, mask=mask, **rest)
    g = varlen_attention_backward(dout, q, k, v, cu_q, cu_k, **opts)
    for name, actual, expected in (("dq", g.dq, gd.dq), ("dk", g.dk, gd.dk), ("dv", g.dv, gd.dv)):
        assert_close(actual, heads_first(expected), f"dense {name}")


def test_causal_over_the_packed_axis_is_caught(rng):
    """A plausible bug: block-diagonal & one causal mask over the packed axis. It is right when
    every T_b == S_b, and wrong otherwise; the comparison above must see it."""
    lq, lk = [2, 3, 1], [4, 2, 3]
    q, k, v, cu_q, cu_k = make_packed(rng, lq, lk, 4, 2, 5, 3)
    wrong_mask = block_diagonal_mask(cu_q, cu_k) & ar.causal_mask(q.shape[0], k.shape[0])
    wrong = ar.scaled_dot_product_attention(
        heads_first(q), heads_first(k), heads_first(v), mask=wrong_mask
    )
    out = varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    assert error_report(heads_first(wrong), out).rel_error > WRONG_MIN
    # with T_b == S_b the same trick is right: the test is not rejecting it for the wrong reason
    q, k, v, cu_q, cu_k = make_packed(rng, lq, lq, 4, 2, 5, 3)
    same_mask = block_diagonal_mask(cu_q, cu_k) & ar.causal_mask(q.shape[0], k.shape[0])
    same = ar.scaled_dot_product_attention(
        heads_first(q), heads_first(k), heads_first(v), mask=same_mask
    )
    assert_close(
        heads_first(same), varlen_attention(q, k, v, cu_q, cu_k, causal=True), "T_b == S_b"
    )


def tiny_case(rng):
    """5 queries, 6 keys: lengths (T_b, S_b) = (2, 3), (0, 1), (1, 2), (2, 0);
    GQA H = 2, Hkv = 1."""
    return make_packed(rng, [2, 0, 1, 2], [3, 1, 2, 0], 2, 1, 2, 3)


@pytest.mark.parametrize(
    "opts",
    [{"causal": True, "align": "bottom_right"}, {"softcap": 2.0, "window": (0, 1)}],
    ids=["causal bottom_right", "softcap window"],
)
def test_packed_backward_matches_finite_differences(rng, opts):
    q, k, v, cu_q, cu_k = tiny_case(rng)
    c = rng.normal(size=(q.shape[0], 2, 3))  # random cotangent
    g = varlen_attention_backward(c, q, k, v, cu_q, cu_k, **opts)
    f = lambda q, k, v: varlen_attention(q, k, v, cu_q, cu_k, **opts)  # noqa: E731
    result = check_vjp(f, {"q": q, "k": k, "v": v}, c, {"q": g.dq, "k": g.dk, "v": g.dv})
    assert result.passed, f"\n{result}"
    # the check can fail: a key gradient shifted by one packed row (an off-by-one offset) is
    # rejected
    shifted = check_vjp(
        f,
        {"q": q, "k": k, "v": v},
        c,
        {"q": g.dq, "k": np.roll(g.dk, 1, axis=0), "v": g.dv},
        wrt=("k",),
    )
    assert not shifted.passed


@pytest.mark.parametrize(
    "opts",
    [{"causal": True, "align": "bottom_right"}, {"softcap": 2.0, "window": (0, 1)}],
    ids=["causal bottom_right", "softcap window"],
)
def test_packed_backward_matches_the_complex_step(rng, opts):
    """The complex step (G4) takes no difference, so it holds the backward to ~1e-15, not ~1e-8."""
    q, k, v, cu_q, cu_k = tiny_case(rng)
    c = rng.normal(size=(q.shape[0], 2, 3))
    g = varlen_attention_backward(c, q, k, v, cu_q, cu_k, **opts)
    f = lambda q, k, v: varlen_attention(q, k, v, cu_q, cu_k, **opts)  # noqa: E731
    result = check_complex_step(f, {"q": q, "k": k, "v": v}, c, {"q": g.dq, "k": g.dk, "v": g.dv})
    assert result.passed, f"\n{result}"


def test_empty_sequences(rng):
    """(V5): T_b = 0 gives no rows and zero key gradients; S_b = 0 < T_b gives empty rows."""
    q, k, v, cu_q, cu_k = tiny_case(rng)
    dout = rng.normal(size=(q.shape[0], 2, 3))
    tr = varlen_forward(q, k, v, cu_q, cu_k)
    assert tr.traces[1] is None and tr.traces[3] is None
    assert not tr.out[3:5].any() and np.all(tr.logsumexp[:, 3:5] == -np.inf)
    g = varlen_backward(dout, tr)
    assert not g.dq[3:5].any()  # sequence 3: queries without keys
    assert not g.dk[3].any() and not g.dv[3].any()  # sequence 1: a key without a query
    assert g.dk[:3].any() and g.dk[4:].any()

    nan = varlen_forward(q, k, v, cu_q, cu_k, empty_rows="nan")
    assert np.isnan(nan.out[3:5]).all() and np.isfinite(nan.out[:3]).all()
    assert not varlen_backward(dout, nan).dq[3:5].any()
    with pytest.raises(
        ValueError, match=r"empty_rows='raise': sequence 3 \(query rows 3:5, key rows 6:6\)"
    ):
        varlen_attention(q, k, v, cu_q, cu_k, empty_rows="raise")
    with pytest.raises(ValueError, match=r"empty_rows='uniform'.*sequence 3.*no key"):
        varlen_attention(q, k, v, cu_q, cu_k, empty_rows="uniform")


def test_a_batch_of_empty_sequences_only(rng):
    q, k, v = rng.normal(size=(0, 2, 3)), rng.normal(size=(4, 1, 3)), rng.normal(size=(4, 1, 5))
    tr = varlen_forward(q, k, v, [0, 0, 0], [0, 1, 4])
    assert tr.out.shape == (0, 2, 5) and tr.logsumexp.shape == (2, 0)
    g = varlen_backward(np.zeros((0, 2, 5)), tr)
    assert g.dq.shape == (0, 2, 3) and not g.dk.any() and not g.dv.any()


def test_empty_row_policies_inside_a_sequence(rng):
    """Rows emptied by bottom_right alignment (T_b > S_b) follow the policy inside their sequence;
    the dense block-diagonal call differs under "uniform" (all S_total keys) and "nan" (dv)."""
    q, k, v, cu_q, cu_k = make_packed(
        rng, [3, 2], [1, 4], 2, 1, 3, 4
    )  # sequence 0: rows 0, 1 empty
    opts = {"causal": True, "align": "bottom_right"}
    uniform = varlen_attention(q, k, v, cu_q, cu_k, empty_rows="uniform", **opts)
    np.testing.assert_allclose(uniform[0], np.broadcast_to(v[0:1].mean(axis=0), (2, 4)), rtol=RTOL)
    mask = block_diagonal_mask(cu_q, cu_k, **opts)
    dense = heads_first(
        ar.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v), mask=mask, empty_rows="uniform"
        )
    )
    np.testing.assert_allclose(dense[0], np.broadcast_to(v.mean(axis=0), (2, 4)), rtol=RTOL)
    assert error_report(dense[0], uniform[0]).rel_error > WRONG_MIN  # the documented difference
    assert_close(dense[2:], uniform[2:], "rows with keys agree")

    dout = rng.normal(size=(5, 2, 4))
    g = varlen_attention_backward(dout, q, k, v, cu_q, cu_k, empty_rows="nan", **opts)
    assert np.isnan(g.dv[0]).all() and np.isfinite(g.dv[1:]).all()  # only sequence 0's keys
    assert np.isfinite(g.dq).all() and np.isfinite(g.dk).all()
    gd = ar.scaled_dot_product_attention_backward(
        heads_first(dout),
        heads_first(q),
        heads_first(k),
        heads_first(v),
        mask=mask,
        empty_rows="nan",
    )
    assert np.isnan(gd.dv).all()  # dense: every key of the head
    with pytest.raises(
        ValueError, match=r"^sequence 0 \(query rows 0:3, key rows 0:1\): empty_rows='raise'"
    ):
        varlen_attention(q, k, v, cu_q, cu_k, empty_rows="raise", **opts)


def test_logsumexp_matches_scipy_per_sequence(rng):
    q, k, v, cu_q, cu_k = make_packed(rng, [2, 0, 3], [4, 2, 3], 4, 2, 5, 3)
    tr = varlen_forward(q, k, v, cu_q, cu_k, causal=True, align="bottom_right", scale=0.5)
    assert tr.logsumexp.shape == (4, 5)  # (H, T_total): FlashAttention's softmax_lse layout
    for b in (0, 2):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        T, S = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        kh = np.repeat(heads_first(k[keys]), 2, axis=0)  # GQA: kv head h // 2
        s = 0.5 * heads_first(q[rows]) @ kh.swapaxes(-1, -2)  # (H, T, S)
        allowed = np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T
        expected = scipy_logsumexp(np.where(allowed, s, -np.inf), axis=-1)  # (H, T)
        assert_close(tr.logsumexp[:, rows], expected, f"lse of sequence {b}")


def test_dtype_layout_and_no_aliasing(rng):
    q, k, v, cu_q, cu_k = make_packed(rng, [2, 3], [3, 3], 2, 1, 3, 4)
    copies = [x.copy() for x in (q, k, v, cu_q, cu_k)]
    dout = rng.normal(size=(5, 2, 4))
    tr = varlen_forward(q.astype(np.float32), k, v, list(cu_q), cu_k.astype(np.int32))
    assert tr.out.dtype == np.float64 and tr.q.dtype == np.float64
    g = varlen_attention_backward(dout, q, k, v, cu_q.astype(np.uint32), cu_k)
    for x, c in zip((q, k, v, cu_q, cu_k), copies, strict=True):
        np.testing.assert_array_equal(x, c)  # inputs untouched
    tr = varlen_forward(q, k, v, cu_q, cu_k)
    for out in (tr.out, tr.q, tr.k, tr.v, tr.cu_seqlens_q, tr.cu_seqlens_k, g.dq, g.dk, g.dv):
        assert not any(np.shares_memory(out, x) for x in (q, k, v, cu_q, cu_k, dout))
    assert varlen_forward(q, k, v, cu_q, cu_k, dtype=np.float32).out.dtype == np.float32


def test_block_diagonal_mask_matches_xformers_semantics():
    """Expected masks written by hand from xformers' definitions (BlockDiagonalMask,
    BlockDiagonalCausalMask, BlockDiagonalCausalFromBottomRightMask), not from the code."""
    cu_q, cu_k = [0, 2, 2, 3], [0, 3, 4, 6]  # (T_b, S_b) = (2, 3), (0, 1), (1, 2)
    plain = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=bool)
    top_left = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=bool)
    bottom_right = np.array(
        [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=bool
    )
    np.testing.assert_array_equal(block_diagonal_mask(cu_q, cu_k), plain)
    np.testing.assert_array_equal(block_diagonal_mask(cu_q, cu_k, causal=True), top_left)
    np.testing.assert_array_equal(
        block_diagonal_mask(cu_q, cu_k, causal=True, align="bottom_right"), bottom_right
    )
    window = block_diagonal_mask(cu_q, cu_k, window=(0, 1), align="bottom_right")
    np.testing.assert_array_equal(
        window, np.array([[0, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=bool)
    )


def test_cu_seqlens_from_lengths():
    np.testing.assert_array_equal(cu_seqlens_from_lengths([3, 0, 2]), [0, 3, 3, 5])
    assert cu_seqlens_from_lengths(np.array([4], dtype=np.int32)).dtype == np.int64
    with pytest.raises(ValueError, match=r"lengths must be >= 0; got lengths\[1\] = -1"):
        cu_seqlens_from_lengths([2, -1])
    with pytest.raises(TypeError, match="lengths must hold integers; got dtype float64"):
        cu_seqlens_from_lengths([2.0, 1.0])
    with pytest.raises(
        ValueError, match=r"lengths must be 1-D with B >= 1 entries, shape \(B,\); got shape \(\)"
    ):
        cu_seqlens_from_lengths(3)


# Each: (id, cu_seqlens_q, cu_seqlens_k, error, message regex). Packed: T_total = 5, S_total = 6.
OFFSET_ERRORS = [
    (
        "q not from 0",
        [1, 2, 5],
        [0, 3, 6],
        ValueError,
        r"cu_seqlens_q\[0\] must be 0 .*got cu_seqlens_q\[0\] = 1",
    ),
    (
        "k not from 0",
        [0, 2, 5],
        [2, 3, 6],
        ValueError,
        r"cu_seqlens_k\[0\] must be 0 .*got cu_seqlens_k\[0\] = 2",
    ),
    (
        "q decreasing",
        [0, 4, 2, 5],
        [0, 2, 3, 6],
        ValueError,
        r"cu_seqlens_q must be non-decreasing .*got cu_seqlens_q\[2\] = 2 < cu_seqlens_q\[1\] = 4",
    ),
    (
        "k decreasing (uint)",
        [0, 2, 5],
        np.array([0, 4, 3, 6][:3], dtype=np.uint8),
        ValueError,
        r"cu_seqlens_k must be non-decreasing .*got cu_seqlens_k\[2\] = 3 < cu_seqlens_k\[1\] = 4",
    ),
    (
        "q last != T_total",
        [0, 2, 4],
        [0, 3, 6],
        ValueError,
        (
            r"cu_seqlens_q\[-1\] must equal the packed length q.shape\[0\] \(T_total\) = 5; "
            r"got cu_seqlens_q\[-1\] = 4"
        ),
    ),
    (
        "k last != S_total",
        [0, 2, 5],
        [0, 3, 7],
        ValueError,
        (
            r"cu_seqlens_k\[-1\] must equal the packed length k.shape\[0\] \(S_total\) = 6; "
            r"got cu_seqlens_k\[-1\] = 7"
        ),
    ),
    (
        "different B",
        [0, 2, 5],
        [0, 1, 3, 6],
        ValueError,
        (
            r"same number of sequences B; got B = 2 \(cu_seqlens_q has 3 entries\) and "
            r"B = 3 \(cu_seqlens_k has 4 entries\)"
        ),
    ),
    (
        "float offsets",
        [0.0, 2.0, 5.0],
        [0, 3, 6],
        TypeError,
        r"cu_seqlens_q must hold integers .*got dtype float64",
    ),
    (
        "bool offsets",
        [0, 2, 5],
        np.array([False, True]),
        TypeError,
        r"cu_seqlens_k must hold integers .*got dtype bool",
    ),
    (
        "2-D offsets",
        [[0, 2, 5]],
        [0, 3, 6],
        ValueError,
        r"cu_seqlens_q must be 1-D, shape \(B \+ 1,\); got shape \(1, 3\)",
    ),
    (
        "one entry",
        [0, 2, 5],
        [6],
        ValueError,
        r"cu_seqlens_k must have B \+ 1 >= 2 entries .*got 1 entries: \[6\]",
    ),
]


@pytest.mark.parametrize(
    "_id, cu_q, cu_k, error, message", OFFSET_ERRORS, ids=[e[0] for e in OFFSET_ERRORS]
)
def test_malformed_offsets_are_refused(rng, _id, cu_q, cu_k, error, message):
    q, k, v = rng.normal(size=(5, 2, 3)), rng.normal(size=(6, 1, 3)), rng.normal(size=(6, 1, 4))
    with pytest.raises(error, match=message):
        varlen_attention(q, k, v, cu_q, cu_k)
    with pytest.raises(error, match=message):
        varlen_attention_backward(rng.normal(size=(5, 2, 4)), q, k, v, cu_q, cu_k)


SHAPE_ERRORS = [
    (
        "q 4-D",
        (1, 5, 2, 3),
        (6, 1, 3),
        (6, 1, 4),
        (
            r"q must be packed as \(T_total, H, Dk\) \(3 dims, no batch axis\); "
            r"got shape \(1, 5, 2, 3\)"
        ),
    ),
    ("k Dk", (5, 2, 3), (6, 1, 2), (6, 1, 4), r"k must have Dk=3 like q; got k.shape=\(6, 1, 2\)"),
    (
        "v rows",
        (5, 2, 3),
        (6, 1, 3),
        (5, 1, 4),
        r"v must have the same \(S_total, Hkv\) as k = \(6, 1\); got v.shape=\(5, 1, 4\)",
    ),
    (
        "H % Hkv",
        (5, 3, 3),
        (6, 2, 3),
        (6, 2, 4),
        r"q's head count H=3 must be a multiple of k's Hkv=2",
    ),
    (
        "no heads",
        (5, 0, 3),
        (6, 1, 3),
        (6, 1, 4),
        r"q must have at least one head and a width >= 1",
    ),
]


@pytest.mark.parametrize("_id, qs, ks, vs, message", SHAPE_ERRORS, ids=[e[0] for e in SHAPE_ERRORS])
def test_mismatched_shapes_are_refused(rng, _id, qs, ks, vs, message):
    with pytest.raises(ValueError, match=message):
        varlen_attention(
            rng.normal(size=qs), rng.normal(size=ks), rng.normal(size=vs), [0, 5], [0, 6]
        )


def test_options_and_dout_are_checked(rng):
    q, k, v = rng.normal(size=(0, 2, 3)), rng.normal(size=(2, 1, 3)), rng.normal(size=(2, 1, 4))
    # checked even when no sequence reaches the attention call
    with pytest.raises(ValueError, match=r"align must be one of"):
        varlen_attention(q, k, v, [0, 0], [0, 2], align="bottom-right")
    with pytest.raises(ValueError, match=r"empty_rows must be one of"):
        varlen_attention(q, k, v, [0, 0], [0, 2], empty_rows="skip")
    with pytest.raises(TypeError, match=r"causal must be a bool; got 1"):
        varlen_attention(q, k, v, [0, 0], [0, 2], causal=1)
    with pytest.raises(ValueError, match=r"softcap must be > 0; got 0.0"):
        varlen_attention(q, k, v, [0, 0], [0, 2], softcap=0.0)
    tr = varlen_forward(rng.normal(size=(3, 2, 3)), k, v, [0, 3], [0, 2])
    with pytest.raises(
        ValueError,
        match=(
            r"dout must have the packed output's shape \(T_total, H, Dv\) = \(3, 2, 4\); "
            r"got \(2, 3, 4\)"
        ),
    ):
        varlen_backward(rng.normal(size=(2, 3, 4)), tr)
    with pytest.raises(TypeError, match="trace must be the VarlenTrace"):
        varlen_backward(rng.normal(size=(3, 2, 4)), tr.traces[0])


def test_guide_page_examples_run():
    """The ```python blocks of docs/decoding_and_varlen.md, top to bottom in one namespace."""
    blocks = re.findall(
        r"^```python\n(.*?)^```", DOCS_PAGE.read_text(encoding="utf-8"), flags=re.S | re.M
    )
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "docs_decoding_and_varlen"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/decoding_and_varlen.md (python block {i})", "exec"), namespace)
