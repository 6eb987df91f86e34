"""Scaled dot-product attention: forward against a naive loop reference, every option's gradient
against finite differences (random cotangents), properties, GQA, empty rows, precision."""

from __future__ import annotations

import numpy as np
import pytest
from naive import naive_attention
from scipy.special import logsumexp as scipy_logsumexp

import attention_ref as ar
from attention_ref.gradcheck import check_vjp, error_report

#: Forward agreement with the naive loops: both are float64 evaluations of the same formula in
#: different orders, so they differ by a few ulps times the number of terms (< 1e-13 here).
FORWARD_RTOL = 1e-12

B, H, HKV, T, S, DK, DV = 2, 4, 2, 3, 5, 4, 3


def make_qkv(rng, B=B, H=H, Hkv=HKV, T=T, S=S, Dk=DK, Dv=DV):
    return (
        rng.normal(size=(B, H, T, Dk)),
        rng.normal(size=(B, Hkv, S, Dk)),
        rng.normal(size=(B, Hkv, S, Dv)),
    )


def padding_mask(B=B, T=T, S=S):
    """Batch 1 has two padding keys; batch 0's query row 1 sees no key (an empty row)."""
    m = np.ones((B, 1, T, S), dtype=bool)
    m[1, :, :, S - 2 :] = False
    m[0, :, 1, :] = False
    return m


# Each case: (id, shape overrides, options builder). Shapes keep T != S, H > 1, Hkv < H,
# Dk != Dv, B > 1 unless the case is an edge case on purpose.
CASES = [
    ("plain GQA", {}, lambda rng, sh: {}),
    ("MHA Hkv=H", {"Hkv": 4}, lambda rng, sh: {}),
    ("MQA Hkv=1", {"Hkv": 1}, lambda rng, sh: {}),
    ("T>S", {"T": 6, "S": 4}, lambda rng, sh: {}),
    ("causal top_left T<S", {}, lambda rng, sh: {"causal": True}),
    ("causal bottom_right T<S", {}, lambda rng, sh: {"causal": True, "align": "bottom_right"}),
    ("causal top_left T>S", {"T": 6, "S": 4}, lambda rng, sh: {"causal": True}),
    (
        "causal bottom_right T>S (empty rows)",
        {"T": 6, "S": 4},
        lambda rng, sh: {"causal": True, "align": "bottom_right"},
    ),
    ("window (1,0) top_left", {"T": 5, "S": 7}, lambda rng, sh: {"window": (1, 0)}),
    (
        "window (2,1) bottom_right",
        {"T": 4, "S": 7},
        lambda rng, sh: {"window": (2, 1), "align": "bottom_right"},
    ),
    (
        "window (None,1) + causal",
        {"T": 5, "S": 5},
        lambda rng, sh: {"window": (None, 1), "causal": True},
    ),
    ("padding mask, empty row zero", {}, lambda rng, sh: {"mask": padding_mask()}),
    (
        "padding mask, empty row uniform",
        {},
        lambda rng, sh: {"mask": padding_mask(), "empty_rows": "uniform"},
    ),
    ("key mask (S,)", {}, lambda rng, sh: {"mask": np.array([True, False, True, True, False])}),
    ("bias full", {}, lambda rng, sh: {"bias": rng.normal(size=(B, H, T, S))}),
    ("bias (H,1,S) broadcast", {}, lambda rng, sh: {"bias": rng.normal(size=(H, 1, S))}),
    (
        "bias with -inf",
        {},
        lambda rng, sh: {
            "bias": np.where(rng.random((T, S)) < 0.3, -np.inf, rng.normal(size=(T, S)))
        },
    ),
    ("softcap", {}, lambda rng, sh: {"softcap": 1.5, "scale": 2.0}),
    (
        "softcap + bias + causal",
        {},
        lambda rng, sh: {
            "softcap": 2.0,
            "bias": rng.normal(size=(T, S)),
            "causal": True,
            "align": "bottom_right",
        },
    ),
    ("scale 0.3", {}, lambda rng, sh: {"scale": 0.3}),
    (
        "dropout",
        {},
        lambda rng, sh: {"dropout_p": 0.3, "dropout_mask": rng.random((B, H, T, S)) >= 0.3},
    ),
    (
        "dropout + mask + bias",
        {},
        lambda rng, sh: {
            "dropout_p": 0.5,
            "dropout_mask": rng.random((B, H, T, S)) >= 0.5,
            "mask": padding_mask(),
            "bias": rng.normal(size=(B, 1, T, S)),
        },
    ),
    ("edge T=S=1", {"T": 1, "S": 1}, lambda rng, sh: {}),
    ("edge Dk=Dv=1 H=1", {"H": 1, "Hkv": 1, "Dk": 1, "Dv": 1}, lambda rng, sh: {}),
    ("edge B=1 T=1", {"B": 1, "T": 1}, lambda rng, sh: {"causal": True, "align": "bottom_right"}),
]
IDS = [c[0] for c in CASES]


def build(rng, overrides, make_opts):
    sh = {**dict(B=B, H=H, Hkv=HKV, T=T, S=S, Dk=DK, Dv=DV), **overrides}
    q, k, v = make_qkv(rng, **sh)
    return q, k, v, make_opts(rng, sh)


def naive_options(opts):
    out = {key: val for key, val in opts.items() if key != "dropout_mask"}
    if "dropout_mask" in opts:
        out["keep"] = opts["dropout_mask"]
    if "mask" in opts:
        out["mask"] = np.asarray(opts["mask"])
    return out


@pytest.mark.parametrize("_id, overrides, make_opts", CASES, ids=IDS)
def test_forward_matches_naive_loops(rng, _id, overrides, make_opts):
    q, k, v, opts = build(rng, overrides, make_opts)
    out = ar.scaled_dot_product_attention(q, k, v, **opts)
    expected = naive_attention(q, k, v, **naive_options(opts))
    rep = error_report(out, expected)
    assert rep.rel_error <= FORWARD_RTOL, rep


@pytest.mark.parametrize("_id, overrides, make_opts", CASES, ids=IDS)
def test_gradients_match_finite_differences(rng, _id, overrides, make_opts):
    q, k, v, opts = build(rng, overrides, make_opts)
    c = rng.normal(size=q.shape[:-1] + (v.shape[-1],))  # random cotangent
    g = ar.scaled_dot_product_attention_backward(c, q, k, v, **opts)
    inputs = {"q": q, "k": k, "v": v}
    grads = {"q": g.dq, "k": g.dk, "v": g.dv}
    rest = dict(opts)
    if "bias" in opts:
        inputs["bias"] = rest.pop("bias")
        grads["bias"] = g.dbias
    else:
        assert g.dbias is None
    result = check_vjp(lambda **kw: ar.scaled_dot_product_attention(**kw, **rest), inputs, c, grads)
    assert result.passed, f"\n{result}"


def test_trace_backward_equals_recompute_backward(rng):
    q, k, v = make_qkv(rng)
    opts = dict(
        causal=True,
        align="bottom_right",
        bias=rng.normal(size=(H, T, S)),
        softcap=3.0,
        dropout_p=0.2,
        dropout_mask=rng.random((B, H, T, S)) >= 0.2,
    )
    c = rng.normal(size=(B, H, T, DV))
    g1 = ar.scaled_dot_product_attention_backward(c, q, k, v, **opts)
    g2 = ar.sdpa_backward(c, ar.sdpa_forward(q, k, v, **opts))
    for name in ("dq", "dk", "dv", "dbias"):
        np.testing.assert_array_equal(getattr(g1, name), getattr(g2, name))


def test_trace_intermediates_are_consistent(rng):
    q, k, v = make_qkv(rng)
    mask = padding_mask()
    bias = rng.normal(size=(T, S))
    tr = ar.sdpa_forward(q, k, v, mask=mask, bias=bias, softcap=2.0)
    assert tr.scale == pytest.approx(1 / np.sqrt(DK))
    # raw scores per head, from the definition with explicit GQA head mapping
    for h in range(H):
        np.testing.assert_allclose(
            tr.scores[:, h], q[:, h] @ k[:, h // 2].swapaxes(-1, -2) * tr.scale, rtol=1e-14
        )
    np.testing.assert_allclose(tr.capped_scores, 2.0 * np.tanh(tr.scores / 2.0), rtol=1e-14)
    allowed = np.broadcast_to(mask, tr.probs.shape)
    logits = tr.capped_scores + bias
    # logsumexp and row max over the allowed keys only; -inf for an empty row
    expected_lse = scipy_logsumexp(np.where(allowed, logits, -np.inf), axis=-1)
    expected_max = np.where(allowed, logits, -np.inf).max(axis=-1)
    np.testing.assert_allclose(tr.logsumexp, expected_lse, rtol=1e-14)
    np.testing.assert_array_equal(tr.row_max, expected_max)
    np.testing.assert_array_equal(tr.row_is_empty, ~allowed.any(axis=-1))
    assert tr.row_is_empty[0, :, 1].all() and tr.row_is_empty.sum() == H
    # weights = exp(logits - lse) on allowed entries
    p_expected = np.where(
        allowed,
        np.exp(logits - np.where(np.isfinite(expected_lse), expected_lse, 0)[..., None]),
        0.0,
    )
    np.testing.assert_allclose(tr.probs, p_expected, rtol=1e-13, atol=1e-300)
    assert np.all(np.isfinite(tr.masked_logits))  # finite fill, never -inf
    np.testing.assert_array_equal(tr.masked_logits[allowed], logits[allowed])


def test_gqa_equals_repeated_kv_heads(rng):
    """GQA is MHA with each kv head repeated H // Hkv times (repeat_interleave), and the kv
    gradients are the sums over each group of the repeated heads' gradients."""
    q, k, v = make_qkv(rng, H=6, Hkv=2)
    c = rng.normal(size=(B, 6, T, DV))
    k_rep, v_rep = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    opts = dict(causal=True, align="bottom_right")
    np.testing.assert_allclose(
        ar.scaled_dot_product_attention(q, k, v, **opts),
        ar.scaled_dot_product_attention(q, k_rep, v_rep, **opts),
        rtol=1e-14,
    )
    g = ar.scaled_dot_product_attention_backward(c, q, k, v, **opts)
    g_rep = ar.scaled_dot_product_attention_backward(c, q, k_rep, v_rep, **opts)
    np.testing.assert_allclose(g.dq, g_rep.dq, rtol=1e-13)
    np.testing.assert_allclose(g.dk, g_rep.dk.reshape(B, 2, 3, S, DK).sum(axis=2), rtol=1e-13)
    np.testing.assert_allclose(g.dv, g_rep.dv.reshape(B, 2, 3, S, DV).sum(axis=2), rtol=1e-13)


def test_permutation_equivariance_without_masks(rng):
    q, k, v = make_qkv(rng)
    out = ar.scaled_dot_product_attention(q, k, v)
    perm_s, perm_t = rng.permutation(S), rng.permutation(T)
    # permuting keys and values together leaves the output unchanged
    np.testing.assert_allclose(
        ar.scaled_dot_product_attention(q, k[:, :, perm_s], v[:, :, perm_s]), out, rtol=1e-13
    )
    # permuting queries permutes the output rows
    np.testing.assert_allclose(
        ar.scaled_dot_product_attention(q[:, :, perm_t], k, v), out[:, :, perm_t], rtol=1e-13
    )


def test_empty_row_policies(rng):
    q, k, v = make_qkv(rng)
    mask = padding_mask()
    c = rng.normal(size=(B, H, T, DV))
    zero = ar.sdpa_forward(q, k, v, mask=mask)
    uniform = ar.sdpa_forward(q, k, v, mask=mask, empty_rows="uniform")
    nan = ar.sdpa_forward(q, k, v, mask=mask, empty_rows="nan")
    empty = np.zeros((B, H, T), dtype=bool)
    empty[0, :, 1] = True
    # zero: output and weights 0, logsumexp and row max -inf
    assert np.all(zero.out[empty] == 0) and np.all(zero.probs[empty] == 0)
    assert np.all(zero.logsumexp[empty] == -np.inf) and np.all(zero.row_max[empty] == -np.inf)
    # uniform: weights 1/S, output the mean of the kv head's values
    np.testing.assert_allclose(uniform.probs[empty], 1.0 / S)
    for h in range(H):
        np.testing.assert_allclose(uniform.out[0, h, 1], v[0, h // 2].mean(axis=0), rtol=1e-14)
    # nan: NaN rows; every other row as under "zero"
    assert np.all(np.isnan(nan.out[empty]))
    np.testing.assert_array_equal(nan.out[~empty], zero.out[~empty])
    np.testing.assert_array_equal(uniform.out[~empty], zero.out[~empty])
    # gradients: no gradient reaches an empty row's query under zero and uniform
    for tr in (zero, uniform):
        g = ar.sdpa_backward(c, tr)
        assert np.all(g.dq[empty] == 0)
    # nan: dv is NaN for the heads with an empty row (autograd of the naive -inf softmax), dq finite
    g_nan = ar.sdpa_backward(c, nan)
    assert np.all(np.isnan(g_nan.dv[0])) and np.all(np.isfinite(g_nan.dv[1]))
    assert np.all(np.isfinite(g_nan.dq))
    with pytest.raises(ValueError, match=r"empty_rows='raise'.*index \(0, 0, 1\)"):
        ar.scaled_dot_product_attention(q, k, v, mask=mask, empty_rows="raise")


def test_bottom_right_with_more_queries_than_keys_leaves_first_rows_empty(rng):
    """With T > S, bottom_right causal query i sees keys j <= i + S - T: the first T - S rows see
    nothing (FlashAttention's convention), top_left rows all see key 0."""
    q, k, v = make_qkv(rng, T=6, S=4)
    tr = ar.sdpa_forward(q, k, v, causal=True, align="bottom_right")
    assert tr.row_is_empty[..., :2].all() and not tr.row_is_empty[..., 2:].any()
    assert not ar.sdpa_forward(q, k, v, causal=True).row_is_empty.any()


def test_neg_inf_bias_is_a_mask(rng):
    q, k, v = make_qkv(rng)
    keep = rng.random((T, S)) < 0.7
    keep[:, 0] = True
    out_bias = ar.scaled_dot_product_attention(q, k, v, bias=np.where(keep, 0.0, -np.inf))
    out_mask = ar.scaled_dot_product_attention(q, k, v, mask=keep)
    np.testing.assert_allclose(out_bias, out_mask, rtol=1e-15)


def test_huge_logits_do_not_overflow(rng):
    """Logits far past exp's range (it overflows above 709.8) give the right values, not just finite
    ones. (1) Shift invariance: a constant c_i of size 5e3-1e4, either sign, added to every logit
    of row i changes neither the output (also equal to the naive loops) nor any gradient; the rows'
    constants are up to 2e4 apart, so only a shift by each row's own max survives. (2) With q and
    k scaled by 1e4, each allowed row attends to its best key alone: the output is that key's value,
    dv routes dout there, dq = dk = 0 -- all from products and masks computed here."""
    q, k, v = make_qkv(rng)
    mask, dout = padding_mask(), rng.normal(size=(B, H, T, DV))
    # (1) a random bias under the constants keeps the weights far from one-hot
    bias = rng.normal(size=(B, H, T, S))
    c = rng.choice([-1.0, 1.0], size=(B, H, T, 1)) * rng.uniform(5e3, 1e4, size=(B, H, T, 1))
    assert np.ptp(c) > 1e4 and np.abs(c).min() > 709.8
    plain = ar.sdpa_forward(q, k, v, mask=mask, bias=bias, causal=True)
    huge = ar.sdpa_forward(q, k, v, mask=mask, bias=bias + c, causal=True)
    # bias + c is rounded to ulp(1e4) / 2 = 9e-13: the weights move by about that (measured:
    # 9e-13 on out, 5e-13 of each gradient's largest entry); a wrong shift gives NaN or O(1)
    naive = naive_attention(q, k, v, mask=mask, bias=bias + c, causal=True)
    g_huge, g_plain = ar.sdpa_backward(dout, huge), ar.sdpa_backward(dout, plain)
    pairs = {
        "out": (huge.out, plain.out),
        "out vs naive": (huge.out, naive),
        **{n: (getattr(g_huge, n), getattr(g_plain, n)) for n in ("dq", "dk", "dv", "dbias")},
    }
    for name, (a, e) in pairs.items():
        assert np.abs(e).max() > 0.1, name  # real values, not round-off
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-10 * np.abs(e).max(), err_msg=name)
    assert np.all(huge.out[0, :, 1] == 0)  # the empty row stays empty
    # (2) one-hot rows: logits 1e8 q.k / sqrt(Dk), the best allowed key by more than 50 (e^-50)
    qh, kh = 1e4 * q, 1e4 * k
    G = H // HKV
    logits = np.einsum("bhtd,bhsd->bhts", qh, np.repeat(kh, G, axis=1)) / np.sqrt(DK)
    allowed = mask & np.tri(T, S, dtype=bool)  # padding and causal top_left, j <= i
    ranked = np.sort(np.where(allowed, logits, -np.inf), axis=-1)
    has_key = allowed.any(-1) & np.ones((B, H, T), dtype=bool)
    assert np.all(ranked[..., -1][has_key] - ranked[..., -2][has_key] > 50)
    best = np.argmax(np.where(allowed, logits, -np.inf), axis=-1)  # (B, H, T)
    out = ar.scaled_dot_product_attention(qh, kh, v, mask=mask, causal=True)
    g = ar.scaled_dot_product_attention_backward(dout, qh, kh, v, mask=mask, causal=True)
    expected_dv = np.zeros_like(v)
    for b, h, i in zip(*np.nonzero(has_key), strict=True):
        np.testing.assert_array_equal(out[b, h, i], v[b, h // G, best[b, h, i]])
        expected_dv[b, h // G, best[b, h, i]] += dout[b, h, i]
    assert np.all(out[~has_key] == 0)
    np.testing.assert_allclose(g.dv, expected_dv, rtol=1e-14, atol=1e-15)
    assert np.abs(g.dq).max() < 1e-12 and np.abs(g.dk).max() < 1e-12


def test_single_key_returns_its_value(rng):
    q, k, v = make_qkv(rng, S=1)
    out = ar.scaled_dot_product_attention(q, k, v)
    np.testing.assert_array_equal(out, np.repeat(v, H // HKV, axis=1).repeat(T, axis=2))


def test_scale_zero_gives_uniform_weights(rng):
    q, k, v = make_qkv(rng)
    tr = ar.sdpa_forward(q, k, v, scale=0.0)
    np.testing.assert_allclose(tr.probs, 1.0 / S, rtol=1e-15)


def test_dropout_from_generator_is_reproducible_and_recorded(rng):
    q, k, v = make_qkv(rng)
    a = ar.sdpa_forward(q, k, v, dropout_p=0.4, dropout_mask=np.random.default_rng(7))
    b = ar.sdpa_forward(q, k, v, dropout_p=0.4, dropout_mask=np.random.default_rng(7))
    np.testing.assert_array_equal(a.dropout_mask, b.dropout_mask)
    np.testing.assert_array_equal(
        a.dropout_mask, ar.dropout_keep_mask((B, H, T, S), 0.4, np.random.default_rng(7))
    )
    np.testing.assert_allclose(a.dropped_probs, a.probs * a.dropout_mask / 0.6, rtol=1e-15)
    # the backward of the trace uses the recorded mask: equal to passing that mask explicitly
    c = rng.normal(size=a.out.shape)
    g1 = ar.sdpa_backward(c, a)
    g2 = ar.scaled_dot_product_attention_backward(
        c, q, k, v, dropout_p=0.4, dropout_mask=a.dropout_mask
    )
    np.testing.assert_array_equal(g1.dq, g2.dq)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_lower_precision_on_request(rng, dtype):
    q, k, v = make_qkv(rng)
    tr = ar.sdpa_forward(q, k, v, causal=True, mask=padding_mask(), dtype=dtype)
    assert tr.out.dtype == dtype and tr.probs.dtype == dtype and tr.scores.dtype == dtype
    g = ar.sdpa_backward(rng.normal(size=tr.out.shape), tr)
    assert g.dq.dtype == dtype and g.dk.dtype == dtype and g.dv.dtype == dtype
    ref = ar.scaled_dot_product_attention(q, k, v, causal=True, mask=padding_mask())
    # a few units of the dtype's epsilon, times the few terms of each sum
    assert error_report(tr.out, ref).rel_error < 50 * np.finfo(dtype).eps


def test_leading_batch_dims_any_number(rng):
    q = rng.normal(size=(2, 3, H, T, DK))
    k = rng.normal(size=(2, 3, HKV, S, DK))
    v = rng.normal(size=(2, 3, HKV, S, DV))
    out = ar.scaled_dot_product_attention(q, k, v, causal=True)
    flat = ar.scaled_dot_product_attention(
        q.reshape(6, H, T, DK), k.reshape(6, HKV, S, DK), v.reshape(6, HKV, S, DV), causal=True
    )
    np.testing.assert_array_equal(out.reshape(flat.shape), flat)
    q3, k3, v3 = q[0, 0], k[0, 0], v[0, 0]  # no batch dim at all: (H, T, Dk)
    np.testing.assert_allclose(
        ar.scaled_dot_product_attention(q3, k3, v3, causal=True), out[0, 0], rtol=1e-15
    )
