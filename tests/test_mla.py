"""Multi-head latent attention (attention_ref.variants.mla): the naive form against an independent
einsum implementation written here, the absorbed form against the naive one (and the wrong
scale caught), every backward against finite differences and the complex step with random
cotangents (and a planted wrong backward rejected), the options passed through, the chain of
absorbed backwards equal to the naive backward, weight conversion from the PyTorch layout, bad
inputs, no mutation.

Framework conventions cited (docs/derivations/mla.md has the quotes):

* FlashMLA (deepseek-ai/FlashMLA, ``flash_mla/flash_mla_interface.py``,
  ``flash_mla_with_kvcache``): absorbed q ``(batch, seq_len_q, num_heads_q, 576)``, a cache with
  one kv head, ``head_dim_v = 512``, value ``kv[..., :dv]`` (``reference_torch`` in
  ``tests/test_flash_mla_dense_decoding.py``), default ``softmax_scale = q.shape[-1] ** (-0.5)``;
* Hugging Face ``DeepseekV3Attention`` (``src/transformers/models/deepseek_v3/
  modeling_deepseek_v3.py``): ``kv_b_proj`` ``nn.Linear(d_c, H * (d_nope + Dv))``, output viewed
  ``(B, S, H, d_nope + Dv)`` and split ``[k_pass, value_states]``; ``scaling = qk_head_dim **
  (-0.5)``;
* vLLM (``vllm/v1/attention/backends/mla/common.py``,
  ``MLACommonBaseImpl.process_weights_after_loading``): ``W_UK_T`` ``(N, P, L)``, ``W_UV``
  ``(N, L, V)``; DeepSeek-V3 ``inference/model.py`` ``MLA.forward``, ``attn_impl="absorb"``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.gradcheck import check_complex_step, check_vjp, error_report
from attention_ref.variants.mla import (
    MLAAbsorbedGrads,
    MLAGrads,
    mla_absorb,
    mla_absorb_backward,
    mla_attention_absorbed,
    mla_attention_absorbed_backward,
    mla_attention_naive,
    mla_attention_naive_backward,
    mla_split_kv_b_proj,
    mla_unabsorb,
    mla_unabsorb_backward,
)

#: Two float64 evaluations of the same function, associated differently (the naive form's
#: decompressed keys vs the absorbed query; a concatenation vs a sum of two products): a few ulps
#: times the number of terms apart, far below this (the issue's 1e-12).
RTOL = 1e-12
#: The wrong scale or a planted bug changes the result at O(1) relative; anything above this is
#: a clear failure, far above RTOL.
WRONG_MIN = 1e-3

NAIVE_NAMES = ("q_nope", "q_pe", "c_kv", "k_pe", "w_uk", "w_uv")


def make(rng, B=2, H=3, T=3, S=5, d_nope=4, d_rope=2, d_c=6, Dv=5):
    """Random naive-form inputs: B, H > 1, T != S, and d_nope, d_rope, d_c, Dv all different."""
    return {
        "q_nope": rng.normal(size=(B, H, T, d_nope)),
        "q_pe": rng.normal(size=(B, H, T, d_rope)),
        "c_kv": rng.normal(size=(B, S, d_c)),
        "k_pe": rng.normal(size=(B, S, d_rope)),
        "w_uk": rng.normal(size=(H, d_c, d_nope)) / math.sqrt(d_c),
        "w_uv": rng.normal(size=(H, d_c, Dv)) / math.sqrt(d_c),
    }


def naive_scale(x):
    return 1.0 / math.sqrt(x["q_nope"].shape[-1] + x["q_pe"].shape[-1])


def latent(x):
    return np.concatenate([x["c_kv"], x["k_pe"]], axis=-1)  # (B, S, d_c + d_rope)


def reference_softmax(logits, allowed, sinks=None):
    """Weights and log-sum-exp of logits (B, H, T, S) over the allowed keys, written out; with
    sinks (H,), one more term exp(sinks[h]) in each row's normalisation (gpt-oss)."""
    masked = np.where(allowed, logits, -np.inf)
    m = masked.max(axis=-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, sinks[None, :, None, None])
    e = np.where(allowed, np.exp(masked - m), 0.0)
    z = e.sum(axis=-1, keepdims=True)
    if sinks is not None:
        z = z + np.exp(sinks[None, :, None, None] - m)
    return e / z, (m + np.log(z))[..., 0]


def reference_allowed(T, S, causal, align):
    offset = S - T if align == "bottom_right" else 0
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    return (j <= i + offset) if causal else np.ones((T, S), dtype=bool)


def reference_naive(x, *, scale=None, causal=False, align="top_left", sinks=None, bias=None):
    """MLA from the DeepSeek-V2 definition with einsum: per-head decompression, the scores as the
    no-rope part plus the rope part (no concatenation), the softmax written out."""
    scale = naive_scale(x) if scale is None else scale
    k_nope = np.einsum("bsc,hcn->bhsn", x["c_kv"], x["w_uk"])  # per-head keys
    v = np.einsum("bsc,hcv->bhsv", x["c_kv"], x["w_uv"])  # per-head values
    logits = scale * (
        np.einsum("bhtn,bhsn->bhts", x["q_nope"], k_nope)
        + np.einsum("bhtr,bsr->bhts", x["q_pe"], x["k_pe"])  # one rotary key for all heads
    )
    if bias is not None:
        logits = logits + bias
    T, S = logits.shape[-2:]
    p, lse = reference_softmax(logits, reference_allowed(T, S, causal, align), sinks)
    return np.einsum("bhts,bhsv->bhtv", p, v), lse


def reference_absorbed(q_abs, kv_latent, d_v, scale, *, causal=False, align="top_left"):
    """Multi-query attention of every head to the one latent head, value kv[..., :d_v]
    (FlashMLA's reference_torch), with einsum."""
    logits = scale * np.einsum("bhtd,bsd->bhts", q_abs, kv_latent)
    T, S = logits.shape[-2:]
    p, lse = reference_softmax(logits, reference_allowed(T, S, causal, align))
    return np.einsum("bhts,bsv->bhtv", p, kv_latent[..., :d_v]), lse


def absorbed_chain(x, scale=None, **opts):
    """absorb -> absorbed attention -> unabsorb, with the naive scale."""
    scale = naive_scale(x) if scale is None else scale
    q_abs = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"])
    d_c = x["c_kv"].shape[-1]
    o_lat = mla_attention_absorbed(q_abs, latent(x), d_c, scale=scale, **opts)
    return mla_unabsorb(o_lat, x["w_uv"])


def rel_error(actual, expected):
    return error_report(actual, expected).rel_error


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"causal": True, "align": "bottom_right"},
        {"causal": True, "align": "top_left"},
        {"scale": 0.3, "causal": True, "align": "bottom_right"},
    ],
    ids=["full", "causal bottom_right", "causal top_left", "custom scale"],
)
def test_naive_matches_the_einsum_reference(rng, opts):
    """T = 3 < S = 5: bottom_right lines the last query up with the last key (FlashMLA's causal
    decoding, tril(diagonal=s_k - s_q) in its reference_torch)."""
    x = make(rng)
    out, lse = mla_attention_naive(*x.values(), return_lse=True, **opts)
    ref, ref_lse = reference_naive(x, **opts)
    assert out.shape == (2, 3, 3, 5) and lse.shape == (2, 3, 3)
    assert rel_error(out, ref) <= RTOL
    assert rel_error(lse, ref_lse) <= RTOL
    # the comparison can fail: the other alignment is a different function
    if opts.get("causal"):
        other = "top_left" if opts["align"] == "bottom_right" else "bottom_right"
        assert rel_error(reference_naive(x, **{**opts, "align": other})[0], out) > WRONG_MIN


SHAPES = [
    # (B, H, T, S, d_nope, d_rope, d_c, Dv)
    (2, 3, 3, 5, 4, 2, 6, 5),  # T < S
    (1, 4, 4, 4, 3, 2, 7, 3),  # T == S
    (2, 2, 6, 3, 5, 4, 3, 6),  # T > S, d_c < d_nope
    (3, 2, 1, 7, 2, 3, 8, 2),  # decoding: one query
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize(
    "opts",
    [{}, {"causal": True, "align": "bottom_right"}, {"window": (2, 0), "softcap": 1.5}],
    ids=["full", "causal bottom_right", "window softcap"],
)
def test_absorbed_equals_naive(rng, shape, opts):
    """(D4)-(D6): the same output and log-sum-exp with d_v = d_c and the naive scale."""
    B, H, T, S, d_nope, d_rope, d_c, Dv = shape
    x = make(rng, B, H, T, S, d_nope, d_rope, d_c, Dv)
    naive, naive_lse = mla_attention_naive(*x.values(), return_lse=True, **opts)
    q_abs = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"])
    assert q_abs.shape == (B, H, T, d_c + d_rope)
    o_lat, lse = mla_attention_absorbed(
        q_abs, latent(x), d_c, scale=naive_scale(x), return_lse=True, **opts
    )
    assert o_lat.shape == (B, H, T, d_c)
    assert rel_error(mla_unabsorb(o_lat, x["w_uv"]), naive) <= RTOL
    assert rel_error(lse, naive_lse) <= RTOL


def test_absorb_identity_of_the_logits(rng):
    """(D4): q_abs . [c_kv, k_pe] = q_h . k_h, entry by entry, before any scale."""
    x = make(rng)
    q_abs = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"])
    k_h = np.concatenate(
        [
            np.einsum("bsc,hcn->bhsn", x["c_kv"], x["w_uk"]),
            np.broadcast_to(x["k_pe"][:, None], (2, 3, 5, 2)),
        ],
        axis=-1,
    )
    q_h = np.concatenate([x["q_nope"], x["q_pe"]], axis=-1)
    absorbed = np.einsum("bhtd,bsd->bhts", q_abs, latent(x))
    assert rel_error(absorbed, np.einsum("bhtd,bhsd->bhts", q_h, k_h)) <= RTOL


@pytest.mark.parametrize("d_v", [1, 3, 8], ids=["d_v=1", "d_v<d_c", "d_v=d_c+d_rope"])
def test_absorbed_is_multi_query_attention_to_the_latent(rng, d_v):
    """The kernel's own semantics for any d_v: the value is kv_latent[..., :d_v]."""
    q_abs, kv = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 6, 8))
    opts = {"causal": True, "align": "bottom_right"}
    out, lse = mla_attention_absorbed(q_abs, kv, d_v, scale=0.37, return_lse=True, **opts)
    ref, ref_lse = reference_absorbed(q_abs, kv, d_v, 0.37, **opts)
    assert out.shape == (2, 3, 4, d_v)
    assert rel_error(out, ref) <= RTOL and rel_error(lse, ref_lse) <= RTOL


def test_the_wrong_scale_is_caught(rng):
    """(D7): 1/sqrt(d_c + d_rope), the default of a kernel reading the absorbed width (FlashMLA's
    q.shape[-1] ** -0.5), gives another function; the naive 1/sqrt(d_nope + d_rope) does not."""
    x = make(rng, d_nope=4, d_rope=2, d_c=16)
    x["q_nope"] *= 3.0  # logits of size O(1), so that the scale matters visibly
    naive, naive_lse = mla_attention_naive(*x.values(), return_lse=True)
    q_abs = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"])
    d_c = x["c_kv"].shape[-1]
    wrong_scale = 1.0 / math.sqrt(q_abs.shape[-1])
    assert wrong_scale != naive_scale(x)
    o_wrong, lse_wrong = mla_attention_absorbed(
        q_abs, latent(x), d_c, scale=wrong_scale, return_lse=True
    )
    assert rel_error(mla_unabsorb(o_wrong, x["w_uv"]), naive) > WRONG_MIN
    assert rel_error(lse_wrong, naive_lse) > WRONG_MIN
    # the right scale, also when given through the options object
    right = mla_attention_absorbed(
        q_abs, latent(x), d_c, options=ar.AttentionOptions(scale=naive_scale(x))
    )
    assert rel_error(mla_unabsorb(right, x["w_uv"]), naive) <= RTOL


def test_missing_scale_is_a_type_error(rng):
    x = make(rng)
    q_abs = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"])
    for call in (
        lambda: mla_attention_absorbed(q_abs, latent(x), 6),
        lambda: mla_attention_absorbed(q_abs, latent(x), 6, scale=None),
        lambda: mla_attention_absorbed_backward(
            np.ones((2, 3, 3, 6)), q_abs, latent(x), 6, causal=True
        ),
    ):
        with pytest.raises(TypeError, match=r"requires scale= \(keyword-only, no default\)") as e:
            call()
        assert "width d_c + d_rope = 8" in str(e.value)
        assert "1/sqrt(d_nope + d_rope)" in str(e.value)


def test_options_pass_through_mask_bias_dropout(rng):
    """Every option acts on the same (B, H, T, S) scores in both forms: boolean mask, bias,
    dropout with one keep-mask; the bias gradient agrees too."""
    x = make(rng)
    shape = (2, 3, 3, 5)
    opts = {
        "mask": rng.random(shape) < 0.8,
        "bias": rng.normal(size=(3, 3, 5)),
        "dropout_p": 0.25,
        "dropout_mask": rng.random(shape) >= 0.25,
    }
    naive = mla_attention_naive(*x.values(), **opts)
    assert rel_error(absorbed_chain(x, **opts), naive) <= RTOL
    no_bias = {k: v for k, v in opts.items() if k != "bias"}
    assert rel_error(mla_attention_naive(*x.values(), **no_bias), naive) > WRONG_MIN

    dout = rng.normal(size=(2, 3, 3, 5))
    g = mla_attention_naive_backward(dout, *x.values(), **opts)
    assert g.dbias.shape == (3, 3, 5) and g.dsinks is None
    q_abs = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"])
    o_lat = mla_attention_absorbed(q_abs, latent(x), 6, scale=naive_scale(x), **opts)
    do_lat = mla_unabsorb_backward(dout, o_lat, x["w_uv"]).do_lat
    ga = mla_attention_absorbed_backward(do_lat, q_abs, latent(x), 6, scale=naive_scale(x), **opts)
    assert rel_error(ga.dbias, g.dbias) <= RTOL
    # a recomputing backward needs the forward's keep-mask, not a Generator
    with pytest.raises(ValueError, match="keep-mask the forward used"):
        mla_attention_naive_backward(
            dout, *x.values(), dropout_p=0.25, dropout_mask=np.random.default_rng(0)
        )


# ----------------------------------------------------------------------------- backward


def naive_grads(g):
    return dict(zip(NAIVE_NAMES, g, strict=True))


@pytest.mark.parametrize(
    "opts",
    [{"causal": True, "align": "bottom_right"}, {"softcap": 2.0, "window": (1, 1)}],
    ids=["causal bottom_right", "softcap window"],
)
def test_naive_backward_matches_finite_differences(rng, opts):
    x = make(rng)
    c = rng.normal(size=(2, 3, 3, 5))  # random cotangent
    g = mla_attention_naive_backward(c, *x.values(), **opts)
    assert isinstance(g, MLAGrads) and len(g) == 6
    for name, grad in naive_grads(g).items():
        assert grad.shape == x[name].shape, name

    def f(**kw):
        return mla_attention_naive(**kw, **opts)

    result = check_vjp(f, x, c, naive_grads(g))
    assert result.passed, f"\n{result}"
    cs = check_complex_step(f, x, c, naive_grads(g))
    assert cs.passed, f"\n{cs}"


def wrong_naive_backward(dout, x):
    """A plausible bug: dc_kv from the keys only, the values' share of (D10) forgotten."""
    d_nope = x["q_nope"].shape[-1]
    k = np.concatenate(
        [
            np.einsum("bsc,hcn->bhsn", x["c_kv"], x["w_uk"]),
            np.broadcast_to(x["k_pe"][:, None], (*x["q_nope"].shape[:2], *x["k_pe"].shape[1:])),
        ],
        axis=-1,
    )
    v = np.einsum("bsc,hcv->bhsv", x["c_kv"], x["w_uv"])
    q = np.concatenate([x["q_nope"], x["q_pe"]], axis=-1)
    g = ar.scaled_dot_product_attention_backward(dout, q, k, v, scale=naive_scale(x))
    return np.einsum("bhsn,hcn->bsc", g.dk[..., :d_nope], x["w_uk"])


def test_a_planted_wrong_naive_backward_fails(rng):
    x = make(rng)
    c = rng.normal(size=(2, 3, 3, 5))
    result = check_vjp(
        lambda **kw: mla_attention_naive(**kw),
        x,
        c,
        {"c_kv": wrong_naive_backward(c, x)},
        wrt=("c_kv",),
    )
    assert not result.passed, f"\n{result}"


def test_absorbed_backward_matches_finite_differences(rng):
    """(D12): the latent's gradient as key plus as value; a backward without the value part
    (only dk) is rejected."""
    q_abs, kv = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 5, 8))
    opts = {"scale": 0.4, "causal": True, "align": "bottom_right"}
    c = rng.normal(size=(2, 3, 4, 6))
    g = mla_attention_absorbed_backward(c, q_abs, kv, 6, **opts)
    assert isinstance(g, MLAAbsorbedGrads)
    dq_abs, dkv_latent = g  # a 2-tuple
    assert dq_abs.shape == q_abs.shape and dkv_latent.shape == kv.shape

    def f(q_abs, kv_latent):
        return mla_attention_absorbed(q_abs, kv_latent, 6, **opts)

    inputs = {"q_abs": q_abs, "kv_latent": kv}
    result = check_vjp(f, inputs, c, {"q_abs": dq_abs, "kv_latent": dkv_latent})
    assert result.passed, f"\n{result}"
    cs = check_complex_step(f, inputs, c, {"q_abs": dq_abs, "kv_latent": dkv_latent})
    assert cs.passed, f"\n{cs}"

    # the planted bug: dense MQA backward, keeping only dk (the value's share forgotten)
    dense = ar.scaled_dot_product_attention_backward(
        c, q_abs, kv[:, None], kv[:, None, :, :6], **opts
    )
    wrong = check_vjp(f, inputs, c, {"kv_latent": dense.dk[:, 0]}, wrt=("kv_latent",))
    assert not wrong.passed, f"\n{wrong}"
    right = dense.dk[:, 0].copy()
    right[..., :6] += dense.dv[:, 0]
    assert rel_error(dkv_latent, right) <= RTOL


def test_absorb_and_unabsorb_backwards_match_finite_differences(rng):
    """(D13), (D14); a weight gradient from the first batch element only is rejected."""
    x = make(rng)
    q_inputs = {k: x[k] for k in ("q_nope", "q_pe", "w_uk")}
    c = rng.normal(size=(2, 3, 3, 8))
    ga = mla_absorb_backward(c, **q_inputs)
    grads = {"q_nope": ga.dq_nope, "q_pe": ga.dq_pe, "w_uk": ga.dw_uk}
    result = check_vjp(mla_absorb, q_inputs, c, grads)
    assert result.passed, f"\n{result}"
    assert check_complex_step(mla_absorb, q_inputs, c, grads).passed
    first_only = np.einsum("htc,htn->hcn", c[0, ..., :6], x["q_nope"][0])
    assert not check_vjp(mla_absorb, q_inputs, c, {"w_uk": first_only}, wrt=("w_uk",)).passed

    o_lat = rng.normal(size=(2, 3, 3, 6))
    u_inputs = {"o_lat": o_lat, "w_uv": x["w_uv"]}
    cu = rng.normal(size=(2, 3, 3, 5))
    gu = mla_unabsorb_backward(cu, o_lat, x["w_uv"])
    do_lat, dw_uv = gu  # a 2-tuple
    grads = {"o_lat": do_lat, "w_uv": dw_uv}
    result = check_vjp(mla_unabsorb, u_inputs, cu, grads)
    assert result.passed, f"\n{result}"
    assert check_complex_step(mla_unabsorb, u_inputs, cu, grads).passed
    first_only = np.einsum("htc,htv->hcv", o_lat[0], cu[0])
    assert not check_vjp(mla_unabsorb, u_inputs, cu, {"w_uv": first_only}, wrt=("w_uv",)).passed


def chain_backward(dout, x, **opts):
    """The absorbed form's backward, stage by stage in reverse, (D12)-(D15)."""
    scale = naive_scale(x)
    d_c = x["c_kv"].shape[-1]
    q_abs = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"])
    o_lat = mla_attention_absorbed(q_abs, latent(x), d_c, scale=scale, **opts)
    gu = mla_unabsorb_backward(dout, o_lat, x["w_uv"])
    gl = mla_attention_absorbed_backward(gu.do_lat, q_abs, latent(x), d_c, scale=scale, **opts)
    gq = mla_absorb_backward(gl.dq_abs, x["q_nope"], x["q_pe"], x["w_uk"])
    return {
        "q_nope": gq.dq_nope,
        "q_pe": gq.dq_pe,
        "c_kv": gl.dkv_latent[..., :d_c],  # (D15)
        "k_pe": gl.dkv_latent[..., d_c:],
        "w_uk": gq.dw_uk,
        "w_uv": gu.dw_uv,
    }


@pytest.mark.parametrize("shape", SHAPES[:3], ids=[str(s) for s in SHAPES[:3]])
def test_absorbed_chain_backward_equals_the_naive_backward(rng, shape):
    B, H, T, S, d_nope, d_rope, d_c, Dv = shape
    x = make(rng, B, H, T, S, d_nope, d_rope, d_c, Dv)
    opts = {"causal": True, "align": "bottom_right", "softcap": 3.0}
    dout = rng.normal(size=(B, H, T, Dv))
    naive = naive_grads(mla_attention_naive_backward(dout, *x.values(), **opts))
    chain = chain_backward(dout, x, **opts)
    for name in NAIVE_NAMES:
        assert rel_error(chain[name], naive[name]) <= RTOL, name


def test_lse_and_dlse_pass_through(rng):
    """return_lse and dlse, (A17), in both forms: the log-sum-exp is a second output whose
    cotangent the backward takes; checked against finite differences of (out, lse) together."""
    x = make(rng)
    opts = {"causal": True, "align": "bottom_right"}
    dout, dlse = rng.normal(size=(2, 3, 3, 5)), rng.normal(size=(2, 3, 3))

    def f(**kw):
        out, lse = mla_attention_naive(**kw, return_lse=True, **opts)
        return np.concatenate([out.ravel(), lse.ravel()])

    g = mla_attention_naive_backward(dout, *x.values(), dlse=dlse, **opts)
    c = np.concatenate([dout.ravel(), dlse.ravel()])
    result = check_vjp(f, x, c, naive_grads(g))
    assert result.passed, f"\n{result}"
    without = mla_attention_naive_backward(dout, *x.values(), **opts)
    assert rel_error(without.dq_nope, g.dq_nope) > WRONG_MIN  # dlse did reach the gradient

    q_abs, kv = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"]), latent(x)
    do_lat = rng.normal(size=(2, 3, 3, 6))

    def fa(q_abs, kv_latent):
        o, lse = mla_attention_absorbed(
            q_abs, kv_latent, 6, scale=naive_scale(x), return_lse=True, **opts
        )
        return np.concatenate([o.ravel(), lse.ravel()])

    ga = mla_attention_absorbed_backward(
        do_lat, q_abs, kv, 6, scale=naive_scale(x), dlse=dlse, **opts
    )
    ca = np.concatenate([do_lat.ravel(), dlse.ravel()])
    grads = {"q_abs": ga.dq_abs, "kv_latent": ga.dkv_latent}
    result = check_vjp(fa, {"q_abs": q_abs, "kv_latent": kv}, ca, grads)
    assert result.passed, f"\n{result}"


def test_sinks_pass_through(rng):
    """Learnable sinks (H,), (A18)-(A19): the naive form against the einsum reference with the
    sink term, the absorbed form equal to it, dsinks checked and equal in both forms."""
    x = make(rng)
    sinks = rng.normal(size=3)
    opts = {"causal": True, "align": "bottom_right"}
    out, lse = mla_attention_naive(*x.values(), sinks=sinks, return_lse=True, **opts)
    ref, ref_lse = reference_naive(x, sinks=sinks, **opts)
    assert rel_error(out, ref) <= RTOL and rel_error(lse, ref_lse) <= RTOL
    assert rel_error(absorbed_chain(x, sinks=sinks, **opts), out) <= RTOL
    assert rel_error(reference_naive(x, **opts)[0], out) > WRONG_MIN  # the sinks matter

    dout = rng.normal(size=out.shape)
    g = mla_attention_naive_backward(dout, *x.values(), sinks=sinks, **opts)
    assert g.dsinks.shape == (3,)

    def f(sinks, **kw):
        return mla_attention_naive(**kw, sinks=sinks, **opts)

    result = check_vjp(f, {**x, "sinks": sinks}, dout, {**naive_grads(g), "sinks": g.dsinks})
    assert result.passed, f"\n{result}"

    q_abs = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"])
    o_lat = mla_attention_absorbed(q_abs, latent(x), 6, scale=naive_scale(x), sinks=sinks, **opts)
    do_lat = mla_unabsorb_backward(dout, o_lat, x["w_uv"]).do_lat
    ga = mla_attention_absorbed_backward(
        do_lat, q_abs, latent(x), 6, scale=naive_scale(x), sinks=sinks, **opts
    )
    assert rel_error(ga.dsinks, g.dsinks) <= RTOL
    assert "dsinks=<array (3,) float64>" in repr(ga)


# ----------------------------------------------------------------------------- weights


def test_split_kv_b_proj_matches_the_pytorch_layout(rng):
    """Hugging Face's DeepseekV3Attention: k_pass = kv_b_proj(c_kv).view(B, S, H, d_nope + Dv),
    split into [k_pass, value_states]; nn.Linear computes c_kv @ weight.T."""
    B, S, H, d_c, d_nope, Dv = 2, 4, 3, 6, 4, 5
    weight = rng.normal(size=(H * (d_nope + Dv), d_c))  # nn.Linear(d_c, H*(d_nope+Dv)).weight
    c_kv = rng.normal(size=(B, S, d_c))
    kv = (c_kv @ weight.T).reshape(B, S, H, d_nope + Dv)
    k_pass, value_states = kv[..., :d_nope], kv[..., d_nope:]
    w_uk, w_uv = mla_split_kv_b_proj(weight, H, d_nope, Dv)
    assert w_uk.shape == (H, d_c, d_nope) and w_uv.shape == (H, d_c, Dv)
    assert rel_error(np.einsum("bsc,hcn->bshn", c_kv, w_uk), k_pass) <= RTOL
    assert rel_error(np.einsum("bsc,hcv->bshv", c_kv, w_uv), value_states) <= RTOL
    # vLLM: kv_b_proj.weight.T viewed (L, N, P + V), split, W_UK_T = W_UK.permute(1, 2, 0)
    W_UK = weight.T.reshape(d_c, H, d_nope + Dv)[..., :d_nope]
    assert np.array_equal(W_UK.transpose(1, 2, 0), w_uk.swapaxes(1, 2))
    with pytest.raises(ValueError, match=r"weight must have shape \(H \* \(d_nope \+ Dv\), d_c\)"):
        mla_split_kv_b_proj(weight, H, d_nope + 1, Dv)


# ----------------------------------------------------------------------------- errors, mutation


@pytest.mark.parametrize(
    "change, match",
    [
        ({"w_uk": (3, 7, 4)}, r"w_uk must have d_c = 6 like c_kv.*got w_uk.shape = \(3, 7, 4\)"),
        ({"w_uv": (3, 7, 5)}, r"w_uv must have d_c = 6 like q_nope \(H\) and c_kv \(d_c\)"),
        ({"k_pe": (2, 5, 3)}, r"k_pe must have d_rope = 2 like q_pe.*got k_pe.shape = \(2, 5, 3\)"),
        ({"q_pe": (2, 3, 3, 3)}, r"k_pe must have d_rope = 3 like q_pe"),
        ({"w_uk": (2, 6, 4)}, r"w_uk must have H = 3 like q_nope"),
        ({"w_uv": (4, 6, 5)}, r"w_uv must have H = 3 like"),
        ({"w_uk": (3, 6, 5)}, r"w_uk must have d_nope = 4 like q_nope"),
        ({"c_kv": (1, 5, 6)}, r"c_kv must have B = 2 like q_nope"),
        ({"k_pe": (2, 4, 2)}, r"k_pe must have the same \(B, S\) as c_kv = \(2, 5\)"),
        ({"q_pe": (2, 3, 4, 2)}, r"q_pe must have the same \(B, H, T\) as q_nope = \(2, 3, 3\)"),
        ({"c_kv": (2, 5)}, r"c_kv must have shape \(B, S, d_c\) \(3 dims\); got shape \(2, 5\)"),
        ({"q_nope": (3, 3, 4)}, r"q_nope must have shape \(B, H, T, d_nope\) \(4 dims\)"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else None,
)
def test_bad_naive_inputs(rng, change, match):
    x = make(rng)
    x.update({k: rng.normal(size=shape) for k, shape in change.items()})
    with pytest.raises(ValueError, match=match):
        mla_attention_naive(*x.values())
    with pytest.raises(ValueError, match=match):
        mla_attention_naive_backward(np.zeros((2, 3, 3, 5)), *x.values())


def test_bad_absorbed_inputs(rng):
    x = make(rng)
    q_abs, kv = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"]), latent(x)
    s = naive_scale(x)
    with pytest.raises(ValueError, match=r"kv_latent must have d_c \+ d_rope = 8 like q_abs"):
        mla_attention_absorbed(q_abs, kv[..., :7], 6, scale=s)
    with pytest.raises(ValueError, match=r"kv_latent must have B = 2 like q_abs"):
        mla_attention_absorbed(q_abs, kv[:1], 6, scale=s)
    with pytest.raises(ValueError, match=r"d_v must be <= kv_latent's width d_c \+ d_rope = 8"):
        mla_attention_absorbed(q_abs, kv, 9, scale=s)
    with pytest.raises(ValueError, match="d_v must be a positive int; got 0"):
        mla_attention_absorbed(q_abs, kv, 0, scale=s)
    with pytest.raises(TypeError, match="d_v must be a positive int; got True"):
        mla_attention_absorbed(q_abs, kv, True, scale=s)
    with pytest.raises(ValueError, match="scale must be >= 0"):
        mla_attention_absorbed(q_abs, kv, 6, scale=-1.0)
    with pytest.raises(TypeError, match=r"unknown attention option\(s\) \['casual'\]"):
        mla_attention_absorbed(q_abs, kv, 6, scale=s, casual=True)
    with pytest.raises(ValueError, match=r"w_uk must have d_nope = 4 like q_nope"):
        mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"][..., :3])
    with pytest.raises(ValueError, match=r"dout must have the output's shape .* = \(2, 3, 3, 8\)"):
        mla_absorb_backward(np.zeros((2, 3, 3, 7)), x["q_nope"], x["q_pe"], x["w_uk"])
    o_lat = rng.normal(size=(2, 3, 3, 6))
    with pytest.raises(ValueError, match=r"w_uv must have d_c = 5 like o_lat"):
        mla_unabsorb(o_lat[..., :5], x["w_uv"])  # d_v != d_c: the wrong latent width
    with pytest.raises(ValueError, match=r"dout must have the output's shape .* = \(2, 3, 3, 5\)"):
        mla_unabsorb_backward(np.zeros((2, 3, 3, 4)), o_lat, x["w_uv"])
    with pytest.raises(ValueError, match=r"dout must have the output's shape"):
        mla_attention_absorbed_backward(np.zeros((2, 3, 3, 5)), q_abs, kv, 6, scale=s)


def test_inputs_are_not_mutated_and_outputs_are_fresh(rng):
    x = make(rng)
    sinks, bias = rng.normal(size=3), rng.normal(size=(2, 3, 3, 5))
    opts = {"sinks": sinks, "bias": bias, "causal": True, "align": "bottom_right"}
    q_abs, kv = mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"]), latent(x)
    o_lat = rng.normal(size=(2, 3, 3, 6))
    dout, dlat, dq = (rng.normal(size=s) for s in ((2, 3, 3, 5), (2, 3, 3, 6), (2, 3, 3, 8)))
    dlse = rng.normal(size=(2, 3, 3))
    arrays = [*x.values(), sinks, bias, q_abs, kv, o_lat, dout, dlat, dq, dlse]
    before = [a.copy() for a in arrays]
    s = naive_scale(x)
    results = [
        mla_attention_naive(*x.values(), return_lse=True, **opts),
        mla_attention_naive_backward(dout, *x.values(), dlse=dlse, **opts),
        mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"]),
        mla_absorb_backward(dq, x["q_nope"], x["q_pe"], x["w_uk"]),
        mla_attention_absorbed(q_abs, kv, 6, scale=s, return_lse=True, **opts),
        mla_attention_absorbed_backward(dlat, q_abs, kv, 6, scale=s, dlse=dlse, **opts),
        mla_unabsorb(o_lat, x["w_uv"]),
        mla_unabsorb_backward(dout, o_lat, x["w_uv"]),
        mla_split_kv_b_proj(np.ones((3 * 9, 6)), 3, 4, 5),
    ]
    for a, b in zip(arrays, before, strict=True):
        assert np.array_equal(a, b)
    outputs = []
    for r in results:
        outputs += list(r) if isinstance(r, tuple) else [r]
        outputs += [getattr(r, n) for n in ("dbias", "dsinks") if getattr(r, n, None) is not None]
    for out in outputs:
        assert not any(np.shares_memory(out, a) for a in arrays)


def test_grads_replace_and_asdict_keep_the_option_gradients():
    """The option gradients live outside the tuple; _replace and _asdict must not drop them."""
    from attention_ref.variants.mla import MLAAbsorbedGrads, MLAGrads

    g = MLAGrads(*[np.zeros(1)] * 6, dbias=np.ones(2), dsinks=np.full(3, 2.0))
    r = g._replace(dq_nope=np.ones(1))
    assert r.dbias is g.dbias and r.dsinks is g.dsinks and r.dq_nope[0] == 1
    assert list(g._asdict())[-2:] == ["dbias", "dsinks"]
    h = MLAAbsorbedGrads(np.zeros(1), np.zeros(1), dsinks=np.ones(1))._replace(dbias=np.ones(4))
    assert h.dsinks[0] == 1 and h.dbias.shape == (4,)
    dq_abs, dkv_latent = h  # still a 2-tuple
    with pytest.raises(ValueError, match="unexpected field names"):
        g._replace(dq=np.ones(1))
