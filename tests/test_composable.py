"""Composable attention: the log-sum-exp as an output, merging partial states, split-KV, context
parallelism, learnable sinks, chunked windows and sink tokens, forward and backward.

Independent references: the log-sum-exp is scipy's over the allowed logits written out here
(with the sink as one more column); gradients are central differences (``check_vjp``) with random
cotangents for both outputs; the allowed pairs of chunks and sink tokens are double loops over
their definitions. Every comparison is shown to fail on a planted error.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special

import attention_ref as ar
from attention_ref import AllowedPairs
from attention_ref.core.merge import LN2
from attention_ref.gradcheck import check_vjp
from attention_ref.variants import context_parallel as cp
from attention_ref.variants import decode, flash, varlen

B, H, HKV, T, S, DK, DV = 2, 4, 2, 6, 10, 5, 3


@pytest.fixture
def qkv(rng):
    return (
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
    )


def _logits(q, k, scale=None, bias=None):
    """(B, H, T, S) logits written out: each query head against its kv head (GQA), no library."""
    G = q.shape[-3] // k.shape[-3]
    kk = np.repeat(k, G, axis=-3)  # (B, H, S, Dk)
    s = np.einsum("bhtd,bhsd->bhts", q, kk) * (scale or 1 / np.sqrt(q.shape[-1]))
    return s if bias is None else s + bias


def _scipy_lse(q, k, allowed, sinks=None, bias=None):
    """scipy's logsumexp over the allowed logits (and the sink column)."""
    s = _logits(q, k, bias=bias)
    s = np.where(np.broadcast_to(allowed, s.shape), s, -np.inf)
    if sinks is not None:
        s = np.concatenate(
            [s, np.broadcast_to(sinks[None, :, None, None], s.shape[:-1] + (1,))], -1
        )
    with np.errstate(invalid="ignore"):
        return scipy.special.logsumexp(s, axis=-1)


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


OPTION_SETS = {
    "plain": {},
    "causal_bottom_right": dict(causal=True, align="bottom_right"),
    "window_chunk_sink_tokens": dict(causal=True, window=(2, 0), chunk_size=4, sink_tokens=2),
    "padding_empty_rows": dict(mask=np.array([True] * 3 + [False] * 7)[None, None, None]),
    "softcap_bias_sinks": dict(softcap=3.0, sinks=np.array([0.3, -1.2, 2.0, 0.0])),
}


def _allowed(name):
    o = OPTION_SETS[name]
    mask = o.get("mask")
    dense = AllowedPairs.build(
        T,
        S,
        mask=mask,
        causal=o.get("causal", False),
        align=o.get("align", "top_left"),
        window=o.get("window"),
        chunk_size=o.get("chunk_size"),
        sink_tokens=o.get("sink_tokens", 0),
    ).dense()
    return np.ones((T, S), bool) if dense is None else dense


# ----------------------------------------------------------------------------- 1. the lse


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_lse_is_scipys_over_the_allowed_logits_on_every_path(qkv, name):
    q, k, v = qkv
    o = dict(OPTION_SETS[name])
    softcap = o.get("softcap")
    if softcap:  # the independent logits: softcap applied by hand
        s = _logits(q, k)
        bias_free = softcap * np.tanh(s / softcap)
        want = scipy.special.logsumexp(
            np.concatenate(
                [bias_free, np.broadcast_to(o["sinks"][None, :, None, None], (B, H, T, 1))], -1
            ),
            axis=-1,
        )
    else:
        want = _scipy_lse(q, k, _allowed(name), o.get("sinks"))
    empty = np.isneginf(want)
    _, lse = ar.scaled_dot_product_attention(q, k, v, return_lse=True, **o)
    assert lse.shape == (B, H, T)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_allclose(lse[~empty], want[~empty], rtol=1e-14, atol=1e-14)
    for num_splits in (1, 3, 12):  # 12 > S: some splits hold no key
        got = flash.flash_attention_forward(
            q, k, v, block_q=4, block_k=3, num_splits=num_splits, **o
        )
        np.testing.assert_allclose(got.logsumexp[~empty], want[~empty], rtol=1e-14, atol=1e-14)
        assert np.isneginf(got.logsumexp[empty]).all()
    # context parallelism over 2 ranks (T = 6, S = 10: ring only)
    _, cp_lse = ar.context_parallel_attention(q, k, v, 2, return_lse=True, **o)
    np.testing.assert_allclose(cp_lse[~empty], want[~empty], rtol=1e-14, atol=1e-14)


def test_lse_of_varlen_and_decode(rng):
    q, k, v = (
        rng.normal(size=(7, H, DK)),
        rng.normal(size=(9, HKV, DK)),
        rng.normal(size=(9, HKV, DV)),
    )
    cu_q, cu_k = [0, 3, 3, 7], [0, 4, 9, 9]  # the last sequence has queries and no key
    sinks = rng.normal(size=H)
    out, lse = varlen.varlen_attention(
        q, k, v, cu_q, cu_k, return_lse=True, causal=True, sinks=sinks
    )
    assert lse.shape == (H, 7)
    seq0 = _scipy_lse(
        q[None, :3].swapaxes(1, 2),
        k[None, :4].swapaxes(1, 2),
        np.tril(np.ones((3, 4), bool)),
        sinks,
    )[0]
    np.testing.assert_allclose(lse[:, :3], seq0, rtol=1e-14)
    np.testing.assert_array_equal(lse[:, 3:], np.broadcast_to(sinks[:, None], (H, 4)))  # sink only
    np.testing.assert_array_equal(out[3:], 0.0)
    _, lse_no_sinks = varlen.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
    assert np.isneginf(lse_no_sinks[:, 3:]).all()
    # decode: the new rows of a causal bottom-right problem
    qd, kd, vd = (
        rng.normal(size=(B, H, 2, DK)),
        rng.normal(size=(B, HKV, 5, DK)),
        rng.normal(size=(B, HKV, 5, DV)),
    )
    cache = decode.KVCache(kd[..., :3, :], vd[..., :3, :])
    out, lse, new = decode.decode_step(
        qd, cache, kd[..., 3:, :], vd[..., 3:, :], return_lse=True, sinks=sinks
    )
    want = _scipy_lse(qd, kd, ar.causal_mask(2, 5, align="bottom_right"), sinks)
    np.testing.assert_allclose(lse, want, rtol=1e-14)
    assert new.length == 5


def test_lse_check_fails_on_a_base_2_lse(qkv):
    """The comparison above is not vacuous: base 2 (FlashInfer's internal convention) differs."""
    q, k, v = qkv
    _, lse = ar.scaled_dot_product_attention(q, k, v, return_lse=True)
    want = _scipy_lse(q, k, np.ones((T, S), bool))
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(lse / LN2, want, rtol=1e-14)


def test_lse_converters_round_trip_and_match_the_kernel_conventions():
    lse = np.array([np.log(8.0), -np.inf, 0.0])
    k2 = ar.lse_to_convention(lse, base=2, empty="+inf")
    np.testing.assert_allclose(k2, [3.0, np.inf, 0.0], rtol=1e-15)
    np.testing.assert_array_equal(ar.lse_from_convention(k2, base=2, empty="+inf"), lse)
    with pytest.raises(ValueError, match="empty='\\+inf'"):
        ar.lse_from_convention([np.inf])
    with pytest.raises(ValueError, match="base must be 'e' or 2"):
        ar.lse_to_convention(lse, base=10)


# ----------------------------------------------------------------------------- 2. gradients


def _joint(f_out_lse):
    """f -> g(**inputs) = concat(out, lse) with -inf (constant) rows of lse read as 0."""

    def g(**inputs):
        out, lse = f_out_lse(**inputs)
        return np.concatenate([out.ravel(), np.where(np.isneginf(lse), 0.0, lse).ravel()])

    return g


def _grad_case(rng, o):
    q, k, v = (
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
    )
    inputs = {"q": q, "k": k, "v": v}
    if "sinks" in o:
        inputs["sinks"] = o.pop("sinks")
    dout, dlse = rng.normal(size=(B, H, T, DV)), rng.normal(size=(B, H, T))
    return inputs, o, dout, dlse


GRAD_OPTIONS = {
    "sinks_causal": dict(causal=True, align="bottom_right", sinks=True),
    "sinks_with_empty_rows": dict(
        mask=np.array([True] * 2 + [False] * 8)[None, None, None]
        & (np.arange(T) % 2 == 0)[:, None],
        sinks=True,
    ),
    "dlse_only_window_bias": dict(window=(3, 1), bias=True),
    "chunk_sink_tokens_softcap": dict(
        causal=True, chunk_size=3, sink_tokens=1, softcap=2.0, sinks=True
    ),
}


def _materialise(rng, o):
    o = dict(o)
    if o.get("sinks") is True:
        o["sinks"] = rng.normal(size=H)
    if o.get("bias") is True:
        o["bias"] = rng.normal(size=(1, H, T, S))
    return o


def _split(x):
    """q, k, v and the differentiable options (sinks, bias) of an inputs dict."""
    return x["q"], x["k"], x["v"], {n: x[n] for n in ("sinks", "bias") if n in x}


def _paths():
    """path -> make(**options) -> (forward(**inputs) -> (out, lse),
    backward(dout, dlse, **inputs))."""

    def plain(**kw):
        def fwd(**x):
            return ar.scaled_dot_product_attention(**x, return_lse=True, **kw)

        def bwd(dout, dlse, **x):
            return ar.scaled_dot_product_attention_backward(dout, **x, dlse=dlse, **kw)

        return fwd, bwd

    def tiled(num_splits):
        def make(**kw):
            kw = dict(kw, block_q=4, block_k=3, num_splits=num_splits)

            def fwd(**x):
                return tuple(flash.flash_attention_forward(**x, **kw))

            def bwd(dout, dlse, **x):
                q, k, v, extra = _split(x)
                out, lse = fwd(**x)
                return flash.flash_attention_backward(
                    dout, q, k, v, out, lse, dlse=dlse, **extra, **kw
                )

            return fwd, bwd

        return make

    def ring(schedule):
        def make(**kw):
            def fwd(**x):
                q, k, v, extra = _split(x)
                return ar.context_parallel_attention(
                    q, k, v, 2, schedule, return_lse=True, **extra, **kw
                )

            def bwd(dout, dlse, **x):
                q, k, v, extra = _split(x)
                return ar.context_parallel_attention_backward(
                    dout, q, k, v, 2, schedule, dlse=dlse, **extra, **kw
                )

            return fwd, bwd

        return make

    return {"plain": plain, "tiled": tiled(1), "split_kv": tiled(3), "ring": ring("ring")}


@pytest.mark.parametrize("path", list(_paths()))
@pytest.mark.parametrize("name", list(GRAD_OPTIONS))
def test_dlse_and_dsinks_match_finite_differences(rng, path, name):
    o = _materialise(rng, GRAD_OPTIONS[name])
    inputs, kw, dout, dlse = _grad_case(rng, o)
    if "bias" in kw:
        inputs["bias"] = kw.pop("bias")
    fwd, bwd = _paths()[path](**kw)
    cot = np.concatenate([dout.ravel(), dlse.ravel()])
    g = bwd(dout, dlse, **inputs)
    grads = {"q": g.dq, "k": g.dk, "v": g.dv}
    if "sinks" in inputs:
        grads["sinks"] = g.dsinks
    if "bias" in inputs:
        grads["bias"] = g.dbias
    result = check_vjp(_joint(fwd), inputs, cot, grads)
    assert result.passed, str(result)


def test_gradient_check_fails_when_dlse_or_dsinks_is_wrong(rng):
    o = _materialise(rng, GRAD_OPTIONS["sinks_causal"])
    inputs, kw, dout, dlse = _grad_case(rng, o)
    fwd = lambda **x: ar.scaled_dot_product_attention(**x, return_lse=True, **kw)  # noqa: E731
    cot = np.concatenate([dout.ravel(), dlse.ravel()])
    ignored = ar.scaled_dot_product_attention_backward(dout, **inputs, **kw)  # dlse forgotten
    g = ar.scaled_dot_product_attention_backward(dout, **inputs, dlse=dlse, **kw)
    bad = {"q": ignored.dq, "k": ignored.dk, "v": ignored.dv, "sinks": ignored.dsinks}
    assert not check_vjp(_joint(fwd), inputs, cot, bad).passed
    flipped = {"q": g.dq, "k": g.dk, "v": g.dv, "sinks": -g.dsinks}  # the sign of (A19)
    assert not check_vjp(_joint(fwd), inputs, cot, flipped).passed


def test_varlen_dlse_and_dsinks_match_finite_differences(rng):
    q, k, v = (
        rng.normal(size=(7, H, DK)),
        rng.normal(size=(9, HKV, DK)),
        rng.normal(size=(9, HKV, DV)),
    )
    cu_q, cu_k = [0, 3, 5, 7], [0, 4, 9, 9]
    inputs = {"q": q, "k": k, "v": v, "sinks": rng.normal(size=H)}
    dout, dlse = rng.normal(size=(7, H, DV)), rng.normal(size=(H, 7))

    def f(q, k, v, sinks):
        return varlen.varlen_attention(
            q, k, v, cu_q, cu_k, return_lse=True, causal=True, align="bottom_right", sinks=sinks
        )

    g = varlen.varlen_attention_backward(
        dout,
        q,
        k,
        v,
        cu_q,
        cu_k,
        dlse=dlse,
        causal=True,
        align="bottom_right",
        sinks=inputs["sinks"],
    )
    cot = np.concatenate([dout.ravel(), dlse.ravel()])
    res = check_vjp(_joint(f), inputs, cot, {"q": g.dq, "k": g.dk, "v": g.dv, "sinks": g.dsinks})
    assert res.passed, str(res)


# ----------------------------------------------------------------------------- 3. merging


def test_merging_key_chunks_computed_separately_equals_full_attention(qkv, rng):
    q, k, v = qkv
    bias = rng.normal(size=(B, 1, T, S))
    cuts = [0, 2, 7, 7, 10]  # one chunk holds no key: a -inf partial
    outs, lses = [], []
    for j0, j1 in zip(cuts[:-1], cuts[1:], strict=True):
        if j1 == j0:
            outs.append(np.full((B, H, T, DV), np.nan))  # never read: its weight is exactly 0
            lses.append(np.full((B, H, T), -np.inf))
            continue
        o, lse = ar.scaled_dot_product_attention(
            q, k[..., j0:j1, :], v[..., j0:j1, :], bias=bias[..., j0:j1], return_lse=True
        )
        outs.append(o)
        lses.append(lse)
    out, lse = ar.merge_attention_states(outs, lses)
    full, full_lse = ar.scaled_dot_product_attention(q, k, v, bias=bias, return_lse=True)
    assert not np.isnan(out).any()
    assert _rel(out, full) <= 1e-13 and _rel(lse, full_lse) <= 1e-13
    # base 2 in, base 2 out
    out2, lse2 = ar.merge_attention_states(outs, [x / LN2 for x in lses], base2=True)
    assert _rel(out2, full) <= 1e-13 and _rel(lse2 * LN2, full_lse) <= 1e-13
    # reading base-2 inputs as natural logs is caught by the same comparison
    wrong, _ = ar.merge_attention_states(outs, [x / LN2 for x in lses])
    assert _rel(wrong, full) > 1e-6


def test_all_empty_partials_merge_to_zero_and_minus_inf():
    outs = np.full((3, 2, 4, 5), np.nan)
    lses = np.full((3, 2, 4), -np.inf)
    out, lse = ar.merge_attention_states(outs, lses)
    np.testing.assert_array_equal(out, 0.0)
    assert np.isneginf(lse).all()
    g = ar.merge_attention_states_backward(np.ones((2, 4, 5)), np.ones((2, 4)), outs, lses)
    np.testing.assert_array_equal(g.douts, 0.0)
    np.testing.assert_array_equal(g.dlses, 0.0)


@pytest.mark.parametrize("base2", [False, True])
def test_merge_backward_matches_finite_differences(rng, base2):
    N = 3
    outs, lses = rng.normal(size=(N, B, H, T, DV)), rng.normal(size=(N, B, H, T)) * 3
    lses[1, 0, 1] = -np.inf  # an empty partial on some rows: constant, not differentiated
    dout, dlse = rng.normal(size=(B, H, T, DV)), rng.normal(size=(B, H, T))
    g = ar.merge_attention_states_backward(dout, dlse, outs, lses, base2=base2)
    finite = np.isfinite(lses)

    def f(outs, lses_finite):
        full = np.where(finite, 0.0, -np.inf)
        full[finite] = lses_finite
        return _joint(lambda **x: ar.merge_attention_states(x["o"], x["l"], base2=base2))(
            o=outs, l=full
        )

    cot = np.concatenate([dout.ravel(), dlse.ravel()])
    res = check_vjp(
        f,
        {"outs": outs, "lses_finite": lses[finite]},
        cot,
        {"outs": g.douts, "lses_finite": g.dlses[finite]},
    )
    assert res.passed, str(res)
    np.testing.assert_array_equal(g.dlses[~finite], 0.0)
    np.testing.assert_array_equal(g.douts[1, 0, 1], 0.0)
    # a merge backward missing the dout term of (C5) is caught
    ln = LN2 if base2 else 1.0
    a = np.exp(lses * ln - ar.merge_attention_states(outs, lses, base2=base2).lse * ln)  # (C2)
    no_out_term = {"outs": g.douts, "lses_finite": (a * dlse)[finite]}
    assert not check_vjp(f, {"outs": outs, "lses_finite": lses[finite]}, cot, no_out_term).passed


# ----------------------------------------------------------------------------- 4. sinks


def test_sinks_added_once_after_the_merge_equal_attention_with_sinks(qkv, rng):
    q, k, v = qkv
    sinks = rng.normal(size=H) * 2
    parts = [
        ar.scaled_dot_product_attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True)
        for a, b in ((0, 4), (4, 10))
    ]
    merged = ar.merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
    out, lse = ar.add_sinks(merged.out, merged.lse, sinks)
    want, want_lse = ar.scaled_dot_product_attention(q, k, v, sinks=sinks, return_lse=True)
    assert _rel(out, want) <= 1e-13 and _rel(lse, want_lse) <= 1e-13
    # the bug the helper exists for: the sink applied in every partial, then merged
    each = [ar.add_sinks(p[0], p[1], sinks) for p in parts]
    twice, twice_lse = ar.merge_attention_states([e.out for e in each], [e.lse for e in each])
    assert _rel(twice, want) > 1e-3 and _rel(twice_lse, want_lse) > 1e-3


def test_a_row_with_no_key_and_a_sink_gives_zero_and_the_sink(qkv, rng):
    q, k, v = qkv
    sinks = rng.normal(size=H)
    mask = np.ones((T, S), bool)
    mask[2] = False
    for empty_rows in ("zero", "raise", "nan", "uniform"):  # no row is empty: no policy applies
        out, lse = ar.scaled_dot_product_attention(
            q, k, v, mask=mask, sinks=sinks, empty_rows=empty_rows, return_lse=True
        )
        np.testing.assert_array_equal(out[:, :, 2], 0.0)
        np.testing.assert_array_equal(lse[:, :, 2], np.broadcast_to(sinks, (B, H)))
        fo = flash.flash_attention_forward(
            q, k, v, mask=mask, sinks=sinks, empty_rows=empty_rows, num_splits=2, block_k=3
        )
        np.testing.assert_array_equal(fo.out[:, :, 2], 0.0)
        np.testing.assert_allclose(
            fo.logsumexp[:, :, 2], np.broadcast_to(sinks, (B, H)), rtol=1e-15
        )


def test_sinks_are_validated(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"sinks must have shape \(H,\) = \(4,\)"):
        ar.scaled_dot_product_attention(q, k, v, sinks=np.zeros(2))
    with pytest.raises(ValueError, match="sinks must be finite"):
        ar.scaled_dot_product_attention(q, k, v, sinks=np.array([0, 0, np.inf, 0]))
    with pytest.raises(ValueError, match="dlse must have the log-sum-exp's shape"):
        ar.scaled_dot_product_attention_backward(
            np.zeros((B, H, T, DV)), q, k, v, dlse=np.zeros((B, H))
        )


# ----------------------------------------------------------------------------- 5. split-KV


@pytest.mark.parametrize("num_splits", [2, 3, 7, 25])
def test_split_kv_equals_unsplit_forward_and_backward(rng, num_splits):
    q, k, v = (
        rng.normal(size=(B, H, 9, DK)),
        rng.normal(size=(B, HKV, 21, DK)),
        rng.normal(size=(B, HKV, 21, DV)),
    )
    kw = dict(
        causal=True,
        align="bottom_right",
        window=(8, None),
        sinks=rng.normal(size=H),
        block_q=4,
        block_k=5,
    )
    one = flash.flash_attention_forward(q, k, v, **kw)
    many = flash.flash_attention_forward(q, k, v, num_splits=num_splits, **kw)
    assert _rel(many.out, one.out) <= 1e-13 and _rel(many.logsumexp, one.logsumexp) <= 1e-13
    dout, dlse = rng.normal(size=one.out.shape), rng.normal(size=one.logsumexp.shape)
    g1 = flash.flash_attention_backward(dout, q, k, v, *one, dlse=dlse, **kw)
    gn = flash.flash_attention_backward(dout, q, k, v, *one, dlse=dlse, num_splits=num_splits, **kw)
    assert gn.dbias is None and g1.dbias is None
    for a, b in zip(
        (gn.dq, gn.dk, gn.dv, gn.dsinks), (g1.dq, g1.dk, g1.dv, g1.dsinks), strict=True
    ):
        assert _rel(a, b) <= 1e-13


def test_split_kv_applies_the_empty_row_policy_once(rng):
    q, k, v = (
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
    )
    mask = rng.random((B, 1, T, S)) > 0.6
    mask[0, 0, 1] = False
    for policy in ("zero", "uniform", "nan"):
        ref = ar.scaled_dot_product_attention(q, k, v, mask=mask, empty_rows=policy)
        got = flash.flash_attention_forward(
            q, k, v, mask=mask, empty_rows=policy, num_splits=4, block_k=2
        )
        np.testing.assert_allclose(got.out, ref, rtol=1e-13, atol=1e-15)  # NaN where NaN
        dout = rng.normal(size=ref.shape)
        gr = ar.scaled_dot_product_attention_backward(dout, q, k, v, mask=mask, empty_rows=policy)
        gs = flash.flash_attention_backward(
            dout, q, k, v, *got, mask=mask, empty_rows=policy, num_splits=4, block_k=2
        )
        for a, b in zip(gs[:3], gr[:3], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_chunked_tiles_are_skipped(rng, monkeypatch):
    """Block skipping: with chunk_size = block size, only the diagonal tiles are computed."""
    q, k, v = (
        rng.normal(size=(1, 2, 32, 4)),
        rng.normal(size=(1, 2, 32, 4)),
        rng.normal(size=(1, 2, 32, 3)),
    )
    calls = []
    real = flash._block_logits
    monkeypatch.setattr(
        flash,
        "_block_logits",
        lambda tp, i0, i1, j0, j1: calls.append((i0, j0)) or real(tp, i0, i1, j0, j1),
    )
    out = flash.flash_attention_forward(
        q, k, v, causal=True, chunk_size=8, block_q=8, block_k=8, return_lse=False
    )
    assert sorted(calls) == [(0, 0), (8, 8), (16, 16), (24, 24)]  # 4 of 16 tiles
    calls.clear()
    flash.flash_attention_forward(
        q, k, v, causal=True, chunk_size=8, sink_tokens=1, block_q=8, block_k=8
    )
    assert sorted(calls) == [(0, 0), (8, 0), (8, 8), (16, 0), (16, 16), (24, 0), (24, 24)]
    assert _rel(out, ar.scaled_dot_product_attention(q, k, v, causal=True, chunk_size=8)) <= 1e-13


# ----------------------------------------------------------------------------- 6. context parallel


@pytest.mark.parametrize("schedule", ["ring", "zigzag"])
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_context_parallel_equals_full_attention_forward_and_backward(
    rng, schedule, world_size, causal
):
    t = 16
    q, k, v = (
        rng.normal(size=(B, H, t, DK)),
        rng.normal(size=(B, HKV, t, DK)),
        rng.normal(size=(B, HKV, t, DV)),
    )
    kw = dict(causal=causal, sinks=rng.normal(size=H), bias=rng.normal(size=(1, H, t, t)))
    out, lse = ar.context_parallel_attention(q, k, v, world_size, schedule, return_lse=True, **kw)
    ref, ref_lse = ar.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    assert _rel(out, ref) <= 1e-12 and _rel(lse, ref_lse) <= 1e-12
    dout, dlse = rng.normal(size=out.shape), rng.normal(size=lse.shape)
    g = ar.context_parallel_attention_backward(dout, q, k, v, world_size, schedule, dlse=dlse, **kw)
    r = ar.scaled_dot_product_attention_backward(dout, q, k, v, dlse=dlse, **kw)
    for name in ("dq", "dk", "dv", "dbias", "dsinks"):
        assert _rel(getattr(g, name), getattr(r, name)) <= 1e-12, name


def test_context_parallel_trace_shows_each_step(rng):
    t, W = 8, 2
    q, k, v = (
        rng.normal(size=(H, t, DK)),
        rng.normal(size=(HKV, t, DK)),
        rng.normal(size=(HKV, t, DV)),
    )
    tr = cp.context_parallel_forward(q, k, v, W, "zigzag", causal=True)
    assert [p.tolist() for p in tr.query_positions] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    causal = ar.causal_mask(t, t)
    for steps in tr.steps:
        for st in steps:
            rows, cols = tr.query_positions[st.rank], tr.key_positions[st.source]
            assert st.source == (st.rank - st.step) % W
            # each partial is plain attention of the rank's queries over the block's keys
            want, want_lse = ar.scaled_dot_product_attention(
                q[:, rows], k[:, cols], v[:, cols], mask=causal[np.ix_(rows, cols)], return_lse=True
            )
            np.testing.assert_allclose(st.out, want, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(st.lse, want_lse, rtol=1e-13)
        np.testing.assert_allclose(
            steps[-1].merged_out, tr.out[:, tr.query_positions[steps[0].rank]], rtol=1e-15
        )


def test_context_parallel_refuses_what_it_cannot_split(rng):
    q = rng.normal(size=(2, 6, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        ar.context_parallel_attention(q, q, q, 2, "zigzag")
    with pytest.raises(ValueError, match="schedule"):
        ar.context_parallel_attention(q, q, q, 2, "spiral")
    with pytest.raises(ValueError, match="does not support dropout"):
        ar.context_parallel_attention(
            q, q, q, 2, dropout_p=0.1, dropout_mask=np.ones((2, 6, 6), bool)
        )


# ------------------------------------------------------------------------ 7. chunks, sink tokens


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("t,s", [(5, 11), (11, 5), (8, 8)])
def test_chunk_and_sink_tokens_follow_their_definition(align, t, s):
    for causal, window, chunk, sinks in [
        (True, None, 3, 0),
        (False, None, 4, 2),
        (True, (2, 0), None, 1),
        (True, (1, 1), 3, 2),
        (False, (0, 2), 5, 3),
    ]:
        got = AllowedPairs.build(
            t, s, causal=causal, align=align, window=window, chunk_size=chunk, sink_tokens=sinks
        ).dense()
        off = 0 if align == "top_left" else s - t
        want = np.zeros((t, s), bool)
        for i in range(t):
            for j in range(s):
                ip = i + off
                local = True
                if window is not None:
                    local = (window[0] is None or j >= ip - window[0]) and (
                        window[1] is None or j <= ip + window[1]
                    )
                if chunk is not None:
                    local = local and (ip // chunk == j // chunk)
                want[i, j] = (j < sinks or local) and (not causal or j <= ip)
        np.testing.assert_array_equal(got, want)


def test_chunk_and_sink_tokens_are_validated():
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        AllowedPairs.build(3, 3, chunk_size=0)
    with pytest.raises(ValueError, match="sink_tokens must be >= 0"):
        ar.scaled_dot_product_attention(
            np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), sink_tokens=-1
        )
    with pytest.raises(TypeError, match="chunk_size must be a positive int"):
        ar.scaled_dot_product_attention(
            np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), chunk_size=2.0
        )


def test_inputs_are_never_mutated(qkv, rng):
    q, k, v = qkv
    sinks = rng.normal(size=H)
    outs, lses = rng.normal(size=(2, B, H, T, DV)), rng.normal(size=(2, B, H, T))
    copies = [x.copy() for x in (q, k, v, sinks, outs, lses)]
    out, lse = ar.scaled_dot_product_attention(q, k, v, sinks=sinks, return_lse=True)
    ar.scaled_dot_product_attention_backward(out, q, k, v, sinks=sinks, dlse=lse)
    ar.merge_attention_states(outs, lses)
    ar.merge_attention_states_backward(outs[0], lses[0], outs, lses)
    ar.context_parallel_attention_backward(
        out[..., :4, :], q[..., :4, :], k[..., :8, :], v[..., :8, :], 2, sinks=sinks
    )
    for a, b in zip((q, k, v, sinks, outs, lses), copies, strict=True):
        np.testing.assert_array_equal(a, b)


def test_readme_composable_example_equals_attention_with_sinks():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("**Composable attention.**", 1)[1].split("```python", 1)[1].split("```")[0]
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    want = ar.scaled_dot_product_attention(ns["q"], ns["k"], ns["v"], sinks=np.zeros(8))
    assert _rel(ns["out"], want) <= 1e-13


def test_multi_head_attention_with_sinks_matches_finite_differences(rng):
    params = ar.init_params(rng, d_model=8, num_heads=4, num_kv_heads=2)
    x, y = rng.normal(size=(B, 5, 8)), rng.normal(size=(B, 7, 8))
    sinks = rng.normal(size=4)
    dout = rng.normal(size=(B, 5, 8))
    kw = dict(num_heads=4, num_kv_heads=2, causal=True, align="bottom_right")
    g = ar.multi_head_attention_backward(dout, x, y, y, params, sinks=sinks, **kw)

    def f(query, key, sinks):
        return ar.multi_head_attention(query, key, key, params, sinks=sinks, **kw)

    grads = {"query": g.dquery, "key": g.dkey + g.dvalue, "sinks": g.dsinks}
    res = check_vjp(f, {"query": x, "key": y, "sinks": sinks}, dout, grads)
    assert res.passed, str(res)
    assert g.as_dict()["sinks"] is g.dsinks


def test_sinks_and_dlse_agree_with_the_exact_reference(rng):
    """The mpmath path writes the sink column and the dlse term as loops over rows: an independent
    implementation of (A17)-(A19); the float64 path agrees to a few eps."""
    pytest.importorskip("mpmath")
    from attention_ref.oracle.exact import exact_sdpa

    q, k, v = (
        rng.normal(size=(2, 4, 3, 3)),
        rng.normal(size=(2, 2, 5, 3)),
        rng.normal(size=(2, 2, 5, 2)),
    )
    dout, dlse = rng.normal(size=(2, 4, 3, 2)), rng.normal(size=(2, 4, 3))
    mask = rng.random((2, 1, 3, 5)) > 0.5
    mask[0, 0, 1] = False  # a row with only its sink
    kw = dict(sinks=rng.normal(size=4), mask=mask, causal=True, align="bottom_right")
    ex = exact_sdpa(q, k, v, dout, dlse=dlse, **kw)
    out, lse = ar.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    g = ar.scaled_dot_product_attention_backward(dout, q, k, v, dlse=dlse, **kw)
    eps = np.finfo(np.float64).eps
    for ours, exact in (
        (out, ex.out),
        (lse, ex.logsumexp),
        (g.dq, ex.dq),
        (g.dk, ex.dk),
        (g.dv, ex.dv),
        (g.dsinks, ex.dsinks),
    ):
        assert np.abs(ours - exact).max() <= 16 * eps * np.abs(exact).max()
    # the exact reference sees a forgotten dlse term
    assert (
        np.abs(ar.scaled_dot_product_attention_backward(dout, q, k, v, **kw).dq - ex.dq).max()
        > 1e-3
    )
    with pytest.raises(ValueError, match="exact_mha does not support sinks"):
        from attention_ref.oracle.exact import exact_mha

        p = ar.init_params(rng, d_model=4, num_heads=2)
        x = rng.normal(size=(1, 2, 4))
        exact_mha(x, x, x, p, num_heads=2, sinks=np.zeros(2))


def test_composable_benchmark_quick_prints_its_table():
    """benchmarks/composable.py runs (checks its features, then times them); nothing is timed
    here."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "composable.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [
        line for line in run.stdout.splitlines() if line.startswith(("| recomputing", "| trace"))
    ]
    assert len(rows) == 4 and all(line.count("(med") == 3 for line in rows), run.stdout


@pytest.mark.parametrize("option", [{"sinks": np.zeros(2)}, {"chunk_size": 2}, {"sink_tokens": 1}])
def test_framework_adapters_refuse_what_the_frameworks_cannot_express(option):
    from attention_ref.adapters import UnsupportedOption
    from attention_ref.adapters import jax as adapter_jax
    from attention_ref.adapters import torch as adapter_torch

    (name,) = option
    for mapping in (adapter_torch.torch_sdpa_kwargs, adapter_jax.jax_dpa_kwargs):
        with pytest.raises(UnsupportedOption, match=f"cannot express {name}"):
            mapping(3, 5, window=(1, 0), **option)


def test_add_sinks_backward_matches_finite_differences(rng):
    out, lse, sinks = rng.normal(size=(B, H, T, DV)), rng.normal(size=(B, H, T)), rng.normal(size=H)
    lse[0, 1, 2] = -np.inf  # a row with no key: only the sink
    dout, dlse = rng.normal(size=out.shape), rng.normal(size=lse.shape)
    g = ar.add_sinks_backward(dout, dlse, out, lse, sinks)
    finite = np.isfinite(lse)

    def f(out, lse_finite, sinks):
        full = np.where(finite, 0.0, -np.inf)
        full[finite] = lse_finite
        return _joint(lambda **x: ar.add_sinks(x["o"], x["l"], x["s"]))(o=out, l=full, s=sinks)

    cot = np.concatenate([dout.ravel(), dlse.ravel()])
    inputs = {"out": out, "lse_finite": lse[finite], "sinks": sinks}
    grads = {"out": g.dout, "lse_finite": g.dlse[finite], "sinks": g.dsinks}
    assert check_vjp(f, inputs, cot, grads).passed
    assert not check_vjp(f, inputs, cot, {**grads, "sinks": 2 * g.dsinks}).passed
