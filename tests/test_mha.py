"""Multi-head attention: forward against a per-head loop composition, every input and parameter
gradient against finite differences, init_params, traces, self-attention's summed gradient."""

from __future__ import annotations

import numpy as np
import pytest
from naive import naive_attention

import attention_ref as ar
from attention_ref.gradcheck import check_directional, check_vjp, error_report

FORWARD_RTOL = 1e-12  # two float64 evaluations of one formula in different orders


def naive_mha(query, key, value, p, H, Hkv, **opts):
    """Per-head slices of the projections (head h owns columns h*Dk:(h+1)*Dk), the naive loop
    attention, concatenation and the output projection; no attention_ref code."""
    Dk = p.w_q.shape[1] // H
    Dv = p.w_v.shape[1] // Hkv

    def proj(x, w, b):
        return x @ w + (0 if b is None else b)

    qp, kp, vp = proj(query, p.w_q, p.b_q), proj(key, p.w_k, p.b_k), proj(value, p.w_v, p.b_v)
    q = np.stack([qp[..., h * Dk : (h + 1) * Dk] for h in range(H)], axis=1)
    k = np.stack([kp[..., h * Dk : (h + 1) * Dk] for h in range(Hkv)], axis=1)
    v = np.stack([vp[..., h * Dv : (h + 1) * Dv] for h in range(Hkv)], axis=1)
    ctx = naive_attention(q, k, v, **opts)  # (B, H, T, Dv)
    concat = np.concatenate([ctx[:, h] for h in range(H)], axis=-1)  # (B, T, H*Dv)
    return proj(concat, p.w_o, p.b_o)


# (id, init_params kwargs, H, Hkv, (T, S), widths of (query, key, value), options builder)
CASES = [
    ("self-attention", dict(d_model=8, num_heads=2), 2, None, (5, 5), (8, 8, 8), lambda rng: {}),
    (
        "self-attention GQA causal",
        dict(d_model=8, num_heads=4, num_kv_heads=2, head_dim=3, v_head_dim=5),
        4,
        2,
        (5, 5),
        (8, 8, 8),
        lambda rng: {"causal": True},
    ),
    (
        "cross kdim/vdim T<S",
        dict(d_model=6, num_heads=3, kdim=5, vdim=7),
        3,
        None,
        (3, 7),
        (6, 5, 7),
        lambda rng: {},
    ),
    (
        "cross T>S bottom_right",
        dict(d_model=6, num_heads=2, kdim=4, vdim=4, head_dim=4, v_head_dim=2),
        2,
        None,
        (6, 4),
        (6, 4, 4),
        lambda rng: {"causal": True, "align": "bottom_right"},
    ),
    (
        "MQA no bias out_dim",
        dict(d_model=6, num_heads=3, num_kv_heads=1, bias=False, out_dim=4),
        3,
        1,
        (4, 6),
        (6, 6, 6),
        lambda rng: {"window": (1, 2)},
    ),
    (
        "key padding + attn bias",
        dict(d_model=8, num_heads=2, kdim=3, vdim=3),
        2,
        None,
        (3, 5),
        (8, 3, 3),
        lambda rng: {
            "mask": np.array([[True] * 5, [True, True, False, False, False]])[:, None, None, :],
            "bias": rng.normal(size=(2, 3, 5)),
        },
    ),
    (
        "softcap + dropout",
        dict(d_model=4, num_heads=2, num_kv_heads=1),
        2,
        1,
        (3, 4),
        (4, 4, 4),
        lambda rng: {
            "softcap": 1.0,
            "dropout_p": 0.3,
            "dropout_mask": rng.random((2, 2, 3, 4)) >= 0.3,
        },
    ),
    ("edge T=S=1 H=1", dict(d_model=3, num_heads=1), 1, None, (1, 1), (3, 3, 3), lambda rng: {}),
]
IDS = [c[0] for c in CASES]


def build(rng, init, T_S, widths, make_opts):
    p = ar.init_params(rng, **init)
    T, S = T_S
    B = 2
    query = rng.normal(size=(B, T, widths[0]))
    if T == S and widths[0] == widths[1] == widths[2]:
        key = value = query  # self-attention: one array, three times
    else:
        key, value = rng.normal(size=(B, S, widths[1])), rng.normal(size=(B, S, widths[2]))
    return p, query, key, value, make_opts(rng)


@pytest.mark.parametrize("_id, init, H, Hkv, T_S, widths, make_opts", CASES, ids=IDS)
def test_forward_matches_per_head_composition(rng, _id, init, H, Hkv, T_S, widths, make_opts):
    p, query, key, value, opts = build(rng, init, T_S, widths, make_opts)
    out = ar.multi_head_attention(query, key, value, p, num_heads=H, num_kv_heads=Hkv, **opts)
    naive_opts = {k: v for k, v in opts.items() if k != "dropout_mask"}
    if "dropout_mask" in opts:
        naive_opts["keep"] = opts["dropout_mask"]
    expected = naive_mha(query, key, value, p, H, Hkv or H, **naive_opts)
    rep = error_report(out, expected)
    assert rep.rel_error <= FORWARD_RTOL, rep


@pytest.mark.parametrize("_id, init, H, Hkv, T_S, widths, make_opts", CASES, ids=IDS)
def test_every_gradient_matches_finite_differences(rng, _id, init, H, Hkv, T_S, widths, make_opts):
    p, query, key, value, opts = build(rng, init, T_S, widths, make_opts)
    tr = ar.mha_forward(query, key, value, p, num_heads=H, num_kv_heads=Hkv, **opts)
    c = rng.normal(size=tr.out.shape)  # random cotangent
    g = ar.mha_backward(c, tr)
    attn_bias = opts.get("bias")
    rest = {k: v for k, v in opts.items() if k != "bias"}
    self_attention = query is key is value

    def f(x=None, query=None, key=None, value=None, bias=None, **weights):
        if x is not None:
            query = key = value = x
        return ar.multi_head_attention(
            query,
            key,
            value,
            ar.MultiHeadParams(**weights),
            num_heads=H,
            num_kv_heads=Hkv,
            bias=bias,
            **rest,
        )

    grads = g.as_dict()
    if self_attention:
        # the layer sees x three times: its gradient is the sum of the three (the caller sums)
        inputs = {"x": query}
        grads["x"] = grads.pop("query") + grads.pop("key") + grads.pop("value")
    else:
        inputs = {"query": query, "key": key, "value": value}
    inputs.update(p.as_dict())
    if attn_bias is not None:
        inputs["bias"] = attn_bias
    assert set(grads) == set(inputs)
    result = check_vjp(f, inputs, c, grads)
    assert result.passed, f"\n{result}"


def test_directional_check_at_a_realistic_size(rng):
    p = ar.init_params(rng, d_model=64, num_heads=8, num_kv_heads=2, kdim=48, vdim=40)
    query, key, value = (
        rng.normal(size=(2, 32, 64)),
        rng.normal(size=(2, 48, 48)),
        rng.normal(size=(2, 48, 40)),
    )
    opts = dict(num_heads=8, num_kv_heads=2, causal=True, align="bottom_right")
    tr = ar.mha_forward(query, key, value, p, **opts)
    c = rng.normal(size=tr.out.shape)
    g = ar.mha_backward(c, tr)

    def f(query, key, value, **w):
        return ar.multi_head_attention(query, key, value, ar.MultiHeadParams(**w), **opts)

    result = check_directional(
        f,
        {"query": query, "key": key, "value": value, **p.as_dict()},
        c,
        g.as_dict(),
        rng=rng,
        num_directions=2,
    )
    assert result.passed, f"\n{result}"


def test_trace_exposes_named_intermediates(rng):
    p = ar.init_params(
        rng, d_model=8, num_heads=4, num_kv_heads=2, head_dim=3, v_head_dim=5, kdim=6, vdim=7
    )
    query, key, value = (
        rng.normal(size=(2, 3, 8)),
        rng.normal(size=(2, 5, 6)),
        rng.normal(size=(2, 5, 7)),
    )
    tr = ar.mha_forward(query, key, value, p, num_heads=4, num_kv_heads=2, causal=True)
    assert tr.q.shape == (2, 4, 3, 3) and tr.k.shape == (2, 2, 5, 3) and tr.v.shape == (2, 2, 5, 5)
    assert (
        tr.attention.scores.shape
        == tr.attention.masked_logits.shape
        == tr.attention.probs.shape
        == (2, 4, 3, 5)
    )
    assert tr.attention.row_max.shape == tr.attention.logsumexp.shape == (2, 4, 3)
    assert (
        tr.context.shape == (2, 4, 3, 5)
        and tr.concat.shape == (2, 3, 20)
        and tr.out.shape == (2, 3, 8)
    )
    np.testing.assert_allclose(tr.q, ar.split_heads(query @ p.w_q + p.b_q, 4), rtol=1e-15)
    np.testing.assert_allclose(tr.out, tr.concat @ p.w_o + p.b_o, rtol=1e-14)
    c = rng.normal(size=tr.out.shape)
    g1 = ar.mha_backward(c, tr)
    g2 = ar.multi_head_attention_backward(
        c, query, key, value, p, num_heads=4, num_kv_heads=2, causal=True
    )
    for name, arr in g1.as_dict().items():
        np.testing.assert_array_equal(arr, g2.as_dict()[name])


def test_init_params_shapes_and_reproducibility():
    p = ar.init_params(
        np.random.default_rng(3),
        d_model=12,
        num_heads=4,
        num_kv_heads=2,
        head_dim=5,
        v_head_dim=7,
        kdim=6,
        vdim=9,
        out_dim=10,
    )
    assert (p.w_q.shape, p.w_k.shape, p.w_v.shape, p.w_o.shape) == (
        (12, 20),
        (6, 10),
        (9, 14),
        (28, 10),
    )
    assert (p.b_q.shape, p.b_k.shape, p.b_v.shape, p.b_o.shape) == ((20,), (10,), (14,), (10,))
    again = ar.init_params(
        np.random.default_rng(3),
        d_model=12,
        num_heads=4,
        num_kv_heads=2,
        head_dim=5,
        v_head_dim=7,
        kdim=6,
        vdim=9,
        out_dim=10,
    )
    for name, arr in p.as_dict().items():
        np.testing.assert_array_equal(arr, again.as_dict()[name])
    # Glorot bound sqrt(6 / (in + out))
    assert np.abs(p.w_q).max() <= np.sqrt(6 / 32)
    nobias = ar.init_params(np.random.default_rng(3), d_model=8, num_heads=2, bias=False)
    assert (
        nobias.b_q is None
        and nobias.b_o is None
        and set(nobias.as_dict()) == {"w_q", "w_k", "w_v", "w_o"}
    )
    assert nobias.w_q.shape == (8, 8)  # default head_dim = D / H


def test_no_bias_gives_no_bias_gradients(rng):
    p = ar.init_params(rng, d_model=4, num_heads=2, bias=False)
    x = rng.normal(size=(2, 3, 4))
    g = ar.multi_head_attention_backward(rng.normal(size=(2, 3, 4)), x, x, x, p, num_heads=2)
    assert g.dparams.b_q is None and g.dparams.b_o is None and g.dbias is None


def test_unbatched_inputs(rng):
    p = ar.init_params(rng, d_model=4, num_heads=2)
    x, mem = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    out = ar.multi_head_attention(x, mem, mem, p, num_heads=2)
    batched = ar.multi_head_attention(x[None], mem[None], mem[None], p, num_heads=2)
    np.testing.assert_allclose(out, batched[0], rtol=1e-15)
