"""Tiled (FlashAttention-2) attention against the plain path: forward, backward, every option,
block sizes that do not divide the lengths, skipped blocks, empty rows, memory that grows linearly,
and the checks failing on a planted bug."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import attention_ref.variants.flash as flash
from attention_ref import attention_mask, sdpa_backward, sdpa_forward, softmax
from attention_ref.cases import cases
from attention_ref.gradcheck import error_report
from attention_ref.variants.flash import (
    FlashOutput,
    OnlineSoftmaxState,
    flash_attention_backward,
    flash_attention_forward,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_update,
)

#: Tiled vs plain: both float64, the same terms summed in a different order (per block, then
#: rescaled), so they differ by a few ulps times the number of terms; 1e-12 relative to the
#: largest entry is the float64 tolerance used throughout (``DEFAULT_TOLERANCES["float64"]``;
#: the measured worst case over these cases is ~1e-15).
RTOL = 1e-12

B, H, HKV, T, S, DK, DV = 2, 4, 2, 13, 17, 5, 3
#: Block sizes that divide neither T = 13 nor S = 17.
BQ, BK = 4, 5


def make_qkv(rng, B=B, H=H, Hkv=HKV, T=T, S=S, Dk=DK, Dv=DV, lead=None):
    lead = (B,) if lead is None else lead
    return (
        rng.normal(size=lead + (H, T, Dk)),
        rng.normal(size=lead + (Hkv, S, Dk)),
        rng.normal(size=lead + (Hkv, S, Dv)),
    )


def key_padding(rng, B=B, S=S):
    """(B, 1, 1, S): batch 0 keeps every key, batch 1 masks its last 4."""
    m = np.ones((B, 1, 1, S), dtype=bool)
    m[1, ..., S - 4 :] = False
    return m


def sparse_mask(rng, B=B, H=H, T=T, S=S):
    """(B, H, T, S) keeping ~20% of pairs, so that some rows are empty."""
    m = rng.random((B, H, T, S)) < 0.2
    m[0, 0, 2] = False  # at least one empty row
    return m


def neginf_bias(rng, T=T, S=S):
    """(T, S) with ~30% -inf entries and row 3 all -inf (an empty row)."""
    b = np.where(rng.random((T, S)) < 0.3, -np.inf, rng.normal(size=(T, S)))
    b[3] = -np.inf
    return b


# (id, shape overrides, options builder, (block_q, block_k)). T != S, H > 1, Hkv < H, Dk != Dv and
# B > 1 unless the case is about an edge on purpose.
CASES = [
    ("plain GQA", {}, lambda rng: {}, (BQ, BK)),
    ("MHA Hkv=H", {"Hkv": 4}, lambda rng: {}, (BQ, BK)),
    ("MQA Hkv=1", {"Hkv": 1}, lambda rng: {}, (3, 7)),
    ("T>S", {"T": 17, "S": 11}, lambda rng: {}, (BQ, BK)),
    ("block 1x1", {}, lambda rng: {}, (1, 1)),
    ("blocks larger than T and S", {}, lambda rng: {}, (64, 100)),
    ("block_q 1, block_k > S", {}, lambda rng: {"causal": True}, (1, 40)),
    ("extra batch dims (2, 3)", {"lead": (2, 3)}, lambda rng: {"causal": True}, (BQ, BK)),
    ("causal top_left T<S", {}, lambda rng: {"causal": True}, (BQ, BK)),
    (
        "causal bottom_right T<S",
        {},
        lambda rng: {"causal": True, "align": "bottom_right"},
        (BQ, BK),
    ),
    ("causal top_left T>S", {"T": 17, "S": 11}, lambda rng: {"causal": True}, (BQ, BK)),
    (
        "causal bottom_right T>S, empty rows zero",
        {"T": 17, "S": 11},
        lambda rng: {"causal": True, "align": "bottom_right"},
        (BQ, BK),
    ),
    (
        "causal bottom_right T>S, empty rows uniform",
        {"T": 17, "S": 11},
        lambda rng: {"causal": True, "align": "bottom_right", "empty_rows": "uniform"},
        (BQ, BK),
    ),
    (
        "causal bottom_right T>S, empty rows nan",
        {"T": 17, "S": 11},
        lambda rng: {"causal": True, "align": "bottom_right", "empty_rows": "nan"},
        (BQ, BK),
    ),
    ("window (2,1) top_left", {}, lambda rng: {"window": (2, 1)}, (BQ, BK)),
    (
        "window (3,0) bottom_right",
        {},
        lambda rng: {"window": (3, 0), "align": "bottom_right"},
        (BQ, BK),
    ),
    ("window (None,1) + causal", {}, lambda rng: {"window": (None, 1), "causal": True}, (BQ, BK)),
    (
        "window (0,None) bottom_right T>S, uniform",
        {"T": 17, "S": 11},
        lambda rng: {"window": (0, None), "align": "bottom_right", "empty_rows": "uniform"},
        (BQ, BK),
    ),
    ("window (1,1), one row", {"T": 1}, lambda rng: {"window": (1, 1)}, (BQ, BK)),
    ("key padding (B,1,1,S)", {}, lambda rng: {"mask": key_padding(rng)}, (BQ, BK)),
    ("key mask (S,)", {}, lambda rng: {"mask": rng.random(S) < 0.6}, (BQ, BK)),
    ("sparse mask, empty rows zero", {}, lambda rng: {"mask": sparse_mask(rng)}, (BQ, BK)),
    (
        "sparse mask, empty rows uniform",
        {},
        lambda rng: {"mask": sparse_mask(rng), "empty_rows": "uniform"},
        (BQ, BK),
    ),
    (
        "sparse mask, empty rows nan",
        {},
        lambda rng: {"mask": sparse_mask(rng), "empty_rows": "nan"},
        (BQ, BK),
    ),
    (
        "mask (H,T,1) whole rows",
        {},
        lambda rng: {"mask": rng.random((H, T, 1)) < 0.7, "empty_rows": "uniform"},
        (BQ, BK),
    ),
    ("bias full (B,H,T,S)", {}, lambda rng: {"bias": rng.normal(size=(B, H, T, S))}, (BQ, BK)),
    ("bias (H,1,S)", {}, lambda rng: {"bias": rng.normal(size=(H, 1, S))}, (BQ, BK)),
    ("bias (B,1,1,S)", {}, lambda rng: {"bias": rng.normal(size=(B, 1, 1, S))}, (BQ, BK)),
    ("bias (T,1)", {}, lambda rng: {"bias": rng.normal(size=(T, 1))}, (BQ, BK)),
    (
        "bias (1,H,T,S) MQA",
        {"Hkv": 1},
        lambda rng: {"bias": rng.normal(size=(1, H, T, S))},
        (BQ, BK),
    ),
    ("bias with -inf, zero", {}, lambda rng: {"bias": neginf_bias(rng)}, (BQ, BK)),
    (
        "bias with -inf, uniform",
        {},
        lambda rng: {"bias": neginf_bias(rng), "empty_rows": "uniform"},
        (BQ, BK),
    ),
    (
        "bias with -inf, nan",
        {},
        lambda rng: {"bias": neginf_bias(rng), "empty_rows": "nan"},
        (BQ, BK),
    ),
    ("softcap + scale", {}, lambda rng: {"softcap": 1.5, "scale": 2.0}, (BQ, BK)),
    (
        "softcap + bias + causal bottom_right",
        {},
        lambda rng: {
            "softcap": 2.0,
            "bias": rng.normal(size=(T, S)),
            "causal": True,
            "align": "bottom_right",
        },
        (BQ, BK),
    ),
    (
        "everything",
        {"T": 17, "S": 11},
        lambda rng: {
            "softcap": 1.2,
            "bias": neginf_bias(rng, 17, 11)[None],
            "mask": rng.random((B, 1, 17, 11)) < 0.8,
            "window": (4, 2),
            "align": "bottom_right",
            "scale": 0.7,
            "empty_rows": "uniform",
        },
        (3, 4),
    ),
    ("edge T=S=1", {"T": 1, "S": 1}, lambda rng: {}, (BQ, BK)),
    (
        "edge H=1 Dk=Dv=1",
        {"H": 1, "Hkv": 1, "Dk": 1, "Dv": 1},
        lambda rng: {"causal": True},
        (BQ, BK),
    ),
]
IDS = [c[0] for c in CASES]


def build(rng, overrides, make_opts):
    q, k, v = make_qkv(rng, **overrides)
    return q, k, v, make_opts(rng)


def assert_close(name, actual, expected, rtol=RTOL, floor=0.0):
    """Same NaN/inf entries (empty rows), and max|diff| / max(max|expected|, floor) <= rtol on the
    rest."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(
        actual[~finite], expected[~finite], err_msg=name
    )  # NaN == NaN here
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), floor)
    rep = error_report(actual[finite], expected[finite], scale=scale)
    assert rep.nonfinite_mismatch == 0 and rep.rel_error <= rtol, f"{name}: {rep}"


@pytest.mark.parametrize("_id, overrides, make_opts, blocks", CASES, ids=IDS)
def test_forward_matches_plain(rng, _id, overrides, make_opts, blocks):
    q, k, v, opts = build(rng, overrides, make_opts)
    res = flash_attention_forward(q, k, v, block_q=blocks[0], block_k=blocks[1], **opts)
    tr = sdpa_forward(q, k, v, **opts)
    assert isinstance(res, FlashOutput)
    assert res.out.dtype == np.float64 and res.out.shape == tr.out.shape
    assert_close("out", res.out, tr.out)
    assert_close("logsumexp", res.logsumexp, tr.logsumexp)  # -inf on the same (empty) rows


@pytest.mark.parametrize("_id, overrides, make_opts, blocks", CASES, ids=IDS)
def test_backward_matches_plain(rng, _id, overrides, make_opts, blocks):
    q, k, v, opts = build(rng, overrides, make_opts)
    bq, bk = blocks
    res = flash_attention_forward(q, k, v, block_q=bq, block_k=bk, **opts)
    dout = rng.normal(size=res.out.shape)  # random cotangent
    g = flash_attention_backward(
        dout, q, k, v, res.out, res.logsumexp, block_q=bq, block_k=bk, **opts
    )
    ref = sdpa_backward(dout, sdpa_forward(q, k, v, **opts))
    # Where a gradient is 0 in exact arithmetic (S = 1; a bias constant along the keys), the two
    # paths' round-off is measured against max|dout| max|v|, the size of dP = dout v^T, (A8).
    floor = float(np.abs(dout).max() * np.abs(v).max())
    for name in ("dq", "dk", "dv"):
        assert_close(name, getattr(g, name), getattr(ref, name), floor=floor)
    if "bias" in opts:
        assert g.dbias.shape == np.shape(opts["bias"])
        assert_close("dbias", g.dbias, ref.dbias, floor=floor)
    else:
        assert g.dbias is None


#: The package's canonical SDPA cases, but dropout (which the tiled path refuses).
CANONICAL = [c for c in cases("sdpa") if "dropout_p" not in c.options]


@pytest.mark.parametrize("case", CANONICAL, ids=str)
def test_canonical_cases_match_the_reference(case):
    """In blocks of 2 queries x 3 keys, so that every case but the 1-element one spans several."""
    data = case.build()
    ref = data.reference()
    inputs = dict(data.inputs)
    q, k, v = inputs.pop("q"), inputs.pop("k"), inputs.pop("v")
    opts = {**inputs, **data.options, "block_q": 2, "block_k": 3}  # bias (if any) and the options
    res = flash_attention_forward(q, k, v, **opts)
    g = flash_attention_backward(data.cotangent, q, k, v, res.out, res.logsumexp, **opts)
    assert_close("out", res.out, ref.out)
    assert_close("logsumexp", res.logsumexp, ref.intermediates["logsumexp"])
    floor = float(np.abs(data.cotangent).max() * np.abs(v).max())
    for name, grad in (("q", g.dq), ("k", g.dk), ("v", g.dv), ("bias", g.dbias)):
        if name in ref.grads:
            assert_close(f"d{name}", grad, ref.grads[name], floor=floor)
    assert len(CANONICAL) >= 15


def test_cases_have_empty_rows_under_every_policy(rng):
    """The table above really exercises each policy on rows that are empty."""
    seen = set()
    for _id, overrides, make_opts, _ in CASES:
        q, k, v, opts = build(rng, overrides, make_opts)
        if sdpa_forward(q, k, v, **opts).row_is_empty.any():
            seen.add(opts.get("empty_rows", "zero"))
    assert seen == {"zero", "uniform", "nan"}


def test_backward_takes_the_plain_trace_and_other_block_sizes(rng):
    """out and logsumexp from sdpa_forward work as well; the backward's blocks need not be the
    forward's."""
    q, k, v = make_qkv(rng)
    opts = dict(causal=True, align="bottom_right", bias=rng.normal(size=(H, T, S)), softcap=3.0)
    tr = sdpa_forward(q, k, v, **opts)
    dout = rng.normal(size=tr.out.shape)
    ref = sdpa_backward(dout, tr)
    g = flash_attention_backward(dout, q, k, v, tr.out, tr.logsumexp, block_q=6, block_k=2, **opts)
    for name in ("dq", "dk", "dv", "dbias"):
        assert_close(name, getattr(g, name), getattr(ref, name))


def test_default_blocks_and_dtype(rng):
    q, k, v = make_qkv(rng, T=300, S=280)  # more than one default block along each axis
    res = flash_attention_forward(q, k, v, causal=True)
    assert_close("out", res.out, sdpa_forward(q, k, v, causal=True).out)
    assert flash.BLOCK_Q < 300 and flash.BLOCK_K < 280
    res32 = flash_attention_forward(q, k, v, causal=True, dtype=np.float32)
    assert res32.out.dtype == np.float32 and res32.logsumexp.dtype == np.float32
    plain32 = sdpa_forward(q, k, v, causal=True, dtype=np.float32).out
    assert_close("out float32", res32.out, plain32, rtol=1e-5)  # float32 round-off, ~S eps
    res_from_32 = flash_attention_forward(q.astype(np.float32), k, v)
    assert res_from_32.out.dtype == np.float64  # float64 whatever the input dtype


def test_fully_masked_blocks_are_skipped(rng, monkeypatch):
    """Causal T = S = 8 in 2 x 2 blocks: the 6 blocks above the diagonal are never computed."""
    computed = []
    real = flash._block_logits

    def counting(tp, i0, i1, j0, j1):
        computed.append((i0 // 2, j0 // 2))
        return real(tp, i0, i1, j0, j1)

    monkeypatch.setattr(flash, "_block_logits", counting)
    q, k, v = make_qkv(rng, T=8, S=8)
    res = flash_attention_forward(q, k, v, causal=True, block_q=2, block_k=2)
    assert sorted(computed) == [(i, j) for i in range(4) for j in range(i + 1)]
    computed.clear()
    flash_attention_backward(
        rng.normal(size=res.out.shape),
        q,
        k,
        v,
        res.out,
        res.logsumexp,
        causal=True,
        block_q=2,
        block_k=2,
    )
    assert sorted(computed) == [(i, j) for i in range(4) for j in range(i + 1)]


@pytest.mark.parametrize(
    "opts",
    [
        dict(causal=True, align="bottom_right"),
        dict(window=(2, 0)),
        dict(window=(1, 3), align="bottom_right"),
        dict(causal=True, window=(None, 2), mask=np.arange(9) % 4 != 1),
    ],
    ids=["causal br", "window tl", "window br", "causal+window+mask"],
)
@pytest.mark.parametrize("T_, S_", [(5, 9), (9, 5)])
def test_block_patterns_tile_the_full_mask(rng, opts, T_, S_):
    """The per-block patterns built from positions, put side by side, are attention_mask's (T, S).

    The tiled path asks :class:`AllowedPairs` for each tile; every tile's kind (empty, full,
    partial) must match its contents.
    """
    opts = dict(opts)
    if "mask" in opts:
        opts["mask"] = opts["mask"][:S_]
    q, k, v = make_qkv(rng, T=T_, S=S_)
    tp = flash._prepare(q, k, v, None, opts, 2, 3)
    tiled = np.zeros((T_, S_), dtype=bool)
    for i0 in range(0, T_, 2):
        for j0 in range(0, S_, 3):
            kind, allowed = tp.pairs.block(i0, min(i0 + 2, T_), j0, min(j0 + 3, S_))
            block = (
                np.ones(1, dtype=bool) if allowed is None else allowed.reshape(allowed.shape[-2:])
            )
            assert kind == ("full" if block.all() else "partial" if block.any() else "empty")
            tiled[i0 : i0 + 2, j0 : j0 + 3] = block
    expected = attention_mask(T_, S_, **opts)
    np.testing.assert_array_equal(tiled, np.broadcast_to(expected, (T_, S_)))


# ----------------------------------------------------------------------------- the online softmax


@pytest.mark.parametrize("block", [1, 3, 7, 20])
def test_online_softmax_equals_softmax_in_any_block_order(rng, block):
    """v = I makes acc / l the weights themselves. Visiting the blocks backwards makes the max fall
    instead of rise: (F3)'s rescale factor is then exercised on both sides."""
    x = rng.normal(scale=30.0, size=(4, 20))  # large logits: the max moves by a lot between blocks
    allowed = rng.random((4, 20)) < 0.7
    allowed[0] = False  # an empty row
    eye = np.eye(20)
    starts = list(range(0, 20, block))
    for order in (starts, starts[::-1]):
        st = online_softmax_init((4,), 20)
        for j0 in order:
            st = online_softmax_update(
                st, x[:, j0 : j0 + block], eye[j0 : j0 + block], allowed[:, j0 : j0 + block]
            )
        probs, lse, empty = online_softmax_finish(st)
        expected = softmax(np.where(allowed, x, -np.inf)[1:])
        assert_close("weights", probs[1:], expected)
        assert_close(
            "lse", lse[1:], np.log(np.exp(x[1:] - 60).sum(axis=-1, where=allowed[1:])) + 60
        )
        assert (
            empty.tolist() == [True, False, False, False]
            and lse[0] == -np.inf
            and not probs[0].any()
        )


def test_online_softmax_update_leaves_its_inputs_alone(rng):
    st = online_softmax_init((2, 3), 4)
    logits, values = rng.normal(size=(2, 3, 5)), rng.normal(size=(5, 4))
    copies = [a.copy() for a in (*st, logits, values)]
    new = online_softmax_update(st, logits, values, rng.random((2, 3, 5)) < 0.5)
    assert isinstance(new, OnlineSoftmaxState)
    for before, after in zip(copies, (*st, logits, values), strict=True):
        np.testing.assert_array_equal(before, after)


def test_D_is_rowsum_dout_out(rng):
    """(F7): sum_j P_ij dP_ij = sum_e dout_ie out_ie, on the plain path's trace."""
    q, k, v = make_qkv(rng, Hkv=H)
    tr = sdpa_forward(q, k, v, causal=True, bias=rng.normal(size=(T, S)))
    dout = rng.normal(size=tr.out.shape)
    dP = dout @ np.swapaxes(tr.v, -1, -2)  # (B, H, T, Dv) @ (B, H, Dv, S) -> (B, H, T, S)   (A8)
    assert_close("D", (dout * tr.out).sum(axis=-1), (tr.probs * dP).sum(axis=-1))


# ----------------------------------------------------------------------------- the checks can fail


def test_a_wrong_rescaling_is_caught(rng, monkeypatch):
    """Forgetting to rescale acc by e^{m_old - m_new}, (F4), breaks the forward as soon as a row
    sees two key blocks, and goes unnoticed with one: hence the cases' block_k < S."""
    q, k, v = make_qkv(rng)
    plain = sdpa_forward(q, k, v).out
    right = online_softmax_update

    def no_rescale(state, logits, values, allowed=None):
        new = right(state, logits, values, allowed)
        return new._replace(
            acc=state.acc + (new.acc - np.exp(state.row_max - new.row_max) * state.acc)
        )

    monkeypatch.setattr(flash, "online_softmax_update", no_rescale)
    wrong = flash_attention_forward(q, k, v, block_q=BQ, block_k=BK).out
    assert error_report(wrong, plain).rel_error > 1e-3
    one_block = flash_attention_forward(q, k, v, block_q=BQ, block_k=S).out
    assert error_report(one_block, plain).rel_error <= RTOL


def test_a_wrong_logsumexp_is_caught(rng):
    """The backward rebuilds P from the logsumexp, (F6): off by 0.1, every gradient is off."""
    q, k, v = make_qkv(rng)
    res = flash_attention_forward(q, k, v, causal=True, block_q=BQ, block_k=BK)
    dout = rng.normal(size=res.out.shape)
    ref = sdpa_backward(dout, sdpa_forward(q, k, v, causal=True))
    g = flash_attention_backward(
        dout, q, k, v, res.out, res.logsumexp + 0.1, causal=True, block_q=BQ, block_k=BK
    )
    for name in ("dq", "dk", "dv"):
        assert error_report(getattr(g, name), getattr(ref, name)).rel_error > 1e-3, name


# ----------------------------------------------------------------------------- memory


def _peak_bytes(T_, H_=1, D_=16):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, H_, T_, D_)) for _ in range(3))
    dout = rng.normal(size=q.shape)
    tracemalloc.start()
    try:
        res = flash_attention_forward(q, k, v, causal=True)
        flash_attention_backward(dout, q, k, v, res.out, res.logsumexp, causal=True)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_grows_linearly_and_stays_below_one_score_matrix():
    """tracemalloc sees NumPy's buffers. Doubling T = S doubles the O(T) part of the peak (q, k, v,
    out, the gradients); a (T, S) array would quadruple it. At T = S = 4096 the peak is below an
    eighth of one head's (T, S) float64 scores, which the plain path holds several of per head."""
    p1, p2, p4 = (_peak_bytes(n) for n in (1024, 2048, 4096))
    growth = (p4 - p2) / (p2 - p1)
    assert 1.5 < growth < 2.5, (p1, p2, p4)  # linear: 2; quadratic: 4
    assert p4 < 4096 * 4096 * 8 / 8, p4


# -------------------------------------------------------------------------- conventions, validation


def test_inputs_are_not_modified_and_outputs_are_fresh(rng):
    q, k, v = make_qkv(rng)
    bias, mask = rng.normal(size=(H, T, S)), key_padding(rng)
    inputs = (q, k, v, bias, mask)
    copies = [a.copy() for a in inputs]
    res = flash_attention_forward(
        q, k, v, bias=bias, mask=mask, softcap=2.0, block_q=BQ, block_k=BK
    )
    dout = rng.normal(size=res.out.shape)
    saved = (dout.copy(), res.out.copy(), res.logsumexp.copy())
    g = flash_attention_backward(
        dout,
        q,
        k,
        v,
        res.out,
        res.logsumexp,
        bias=bias,
        mask=mask,
        softcap=2.0,
        block_q=BQ,
        block_k=BK,
    )
    for before, after in zip(
        copies + list(saved), inputs + (dout, res.out, res.logsumexp), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    for out in (*res, *g):
        assert not any(np.shares_memory(out, x) for x in inputs + (dout,))


def test_empty_rows_raise_like_the_plain_path(rng):
    q, k, v = make_qkv(rng, T=17, S=11)
    opts = dict(causal=True, align="bottom_right", empty_rows="raise")
    with pytest.raises(ValueError) as plain:
        sdpa_forward(q, k, v, **opts)
    with pytest.raises(ValueError) as tiled:
        flash_attention_forward(q, k, v, block_q=BQ, block_k=BK, **opts)
    assert str(tiled.value) == str(plain.value)
    res = flash_attention_forward(q, k, v, causal=True, align="bottom_right")
    with pytest.raises(ValueError, match="empty_rows='raise'"):
        flash_attention_backward(
            rng.normal(size=res.out.shape), q, k, v, res.out, res.logsumexp, **opts
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"block_q": 0}, ValueError, "block_q must be a positive int; got 0"),
        ({"block_k": 2.5}, TypeError, "block_k must be a positive int; got 2.5"),
        ({"dropout_p": 0.1}, ValueError, "does not support dropout.*dropout_p=0.1"),
        ({"dropout_mask": np.ones((B, H, T, S), bool)}, ValueError, "does not support dropout"),
        ({"empty_rows": "skip"}, ValueError, "empty_rows must be one of"),
        ({"align": "center"}, ValueError, "align must be one of"),
        ({"bias": np.full((T, S), np.nan)}, ValueError, "bias must be finite or -inf"),
        ({"mask": np.ones((T, S + 1), bool)}, ValueError, "mask must be broadcastable"),
    ],
)
def test_forward_validates_options(rng, kwargs, error, match):
    q, k, v = make_qkv(rng)
    with pytest.raises(error, match=match):
        flash_attention_forward(q, k, v, **kwargs)


def test_forward_validates_shapes(rng):
    q, k, v = make_qkv(rng)
    with pytest.raises(ValueError, match="k must have Dk=5"):
        flash_attention_forward(q, k[..., :2], v)
    with pytest.raises(ValueError, match="multiple of k's Hkv=3"):
        flash_attention_forward(q, *make_qkv(rng, Hkv=3)[1:])


def test_backward_validates_saved_arrays(rng):
    q, k, v = make_qkv(rng)
    res = flash_attention_forward(q, k, v)
    dout = rng.normal(size=res.out.shape)
    with pytest.raises(
        ValueError,
        match=r"dout must have shape \(\.\.\., H, T, Dv\) = \(2, 4, 13, 3\); got \(2, 4, 13, 4\)",
    ):
        flash_attention_backward(rng.normal(size=(B, H, T, 4)), q, k, v, res.out, res.logsumexp)
    with pytest.raises(ValueError, match=r"logsumexp must have shape \(\.\.\., H, T\)"):
        flash_attention_backward(dout, q, k, v, res.out, res.logsumexp[..., None])
    with pytest.raises(
        ValueError,
        match=(
            r"logsumexp must be finite, or -inf on an empty row .*; "
            r"got logsumexp\[\(0, 0, 1\)\] = nan"
        ),
    ):
        bad = res.logsumexp.copy()
        bad[0, 0, 1] = np.nan
        flash_attention_backward(dout, q, k, v, res.out, bad)
    with pytest.raises(ValueError, match="does not support dropout"):
        flash_attention_backward(dout, q, k, v, res.out, res.logsumexp, dropout_p=0.2)


def test_flash_backward_against_finite_differences_directly():
    """The tiled backward checked on its own against central differences (random cotangent,
    GQA, T != S, Dk != Dv, bias, softcap, causal bottom_right, blocks that do not divide T or S),
    not only through its agreement with the plain path."""
    from attention_ref.gradcheck import check_vjp
    from attention_ref.variants.flash import flash_attention_backward, flash_attention_forward

    rng = np.random.default_rng(7)
    q, k, v = (
        rng.normal(size=(2, 4, 5, 3)),
        rng.normal(size=(2, 2, 7, 3)),
        rng.normal(size=(2, 2, 7, 2)),
    )
    bias = rng.normal(size=(1, 4, 5, 7))
    opts = dict(causal=True, align="bottom_right", softcap=1.5, block_q=2, block_k=3)

    def f(q, k, v, bias):
        return flash_attention_forward(q, k, v, bias=bias, **opts).out

    fwd = flash_attention_forward(q, k, v, bias=bias, **opts)
    c = rng.normal(size=fwd.out.shape)
    g = flash_attention_backward(c, q, k, v, fwd.out, fwd.logsumexp, bias=bias, **opts)
    grads = {"q": g.dq, "k": g.dk, "v": g.dv, "bias": g.dbias}
    result = check_vjp(f, {"q": q, "k": k, "v": v, "bias": bias}, c, grads)
    assert result.passed, f"\n{result}"
    wrong = check_vjp(f, {"q": q, "k": k, "v": v, "bias": bias}, c, {**grads, "k": 1.01 * g.dk})
    assert not wrong.passed and wrong.worst[0] == "k"
