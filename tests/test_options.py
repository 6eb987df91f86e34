"""The one options type and the one allowed-pairs builder.

* :class:`AttentionOptions` is the only definition of the options: every path takes it, as one
  object or as keywords, with the same result; an unknown keyword is a ``TypeError`` naming it.
* :class:`AllowedPairs` is the only builder of the pairs a row may attend; its dense form equals
  the definitions written as loops (``tests/test_masks.py`` does the same for the public
  builders), its tiles put side by side give the dense form, and sequence lengths match masks
  built by hand.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import attention_ref as ar
from attention_ref import AllowedPairs, AttentionOptions
from attention_ref.oracle import exact
from attention_ref.oracle.testing import sdpa_baseline
from attention_ref.variants import decode, flash, varlen

B, H, HKV, T, S, DK, DV = 2, 4, 2, 3, 5, 4, 6


@pytest.fixture
def qkv(rng):
    return (
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
        rng.normal(size=(B, H, T, DV)),
    )


def test_fields_are_the_options_every_path_documents():
    assert AttentionOptions.names() == (
        "mask",
        "key_padding_mask",
        "bias",
        "causal",
        "align",
        "window",
        "chunk_size",
        "sink_tokens",
        "sinks",
        "softcap",
        "scale",
        "dropout_p",
        "dropout_mask",
        "empty_rows",
        "dtype",
        "rounding",
        "score_mod",
        "mask_mod",
    )
    # golden files record every scalar option, taken from the one definition
    from attention_ref.oracle.golden import _scalar_defaults

    assert set(_scalar_defaults("sdpa")) == {
        "causal",
        "align",
        "window",
        "softcap",
        "scale",
        "dropout_p",
        "empty_rows",
    }
    assert set(_scalar_defaults("mha")) == set(_scalar_defaults("sdpa")) | {
        "num_heads",
        "num_kv_heads",
    }


def test_one_object_equals_keywords_on_every_path(qkv, rng):
    q, k, v, dout = qkv
    bias = rng.normal(size=(1, H, T, S))
    kw = dict(
        causal=True, align="bottom_right", window=(3, None), softcap=2.5, scale=0.4, bias=bias
    )
    opts = AttentionOptions(**kw)
    same = np.testing.assert_array_equal
    same(
        ar.scaled_dot_product_attention(q, k, v, options=opts),
        ar.scaled_dot_product_attention(q, k, v, **kw),
    )
    g1 = ar.scaled_dot_product_attention_backward(dout, q, k, v, options=opts)
    g2 = ar.scaled_dot_product_attention_backward(dout, q, k, v, **kw)
    for a, b in zip(g1, g2, strict=True):
        same(a, b)
    f1 = flash.flash_attention_forward(q, k, v, options=opts, block_q=2, block_k=2)
    f2 = flash.flash_attention_forward(q, k, v, block_q=2, block_k=2, **kw)
    same(f1.out, f2.out)
    same(
        flash.flash_attention_backward(dout, q, k, v, f1.out, f1.logsumexp, options=opts).dq,
        flash.flash_attention_backward(dout, q, k, v, f1.out, f1.logsumexp, **kw).dq,
    )
    base1 = sdpa_baseline(q, k, v, dout, precision="bfloat16", options=opts)
    base2 = sdpa_baseline(q, k, v, dout, precision="bfloat16", **kw)
    same(base1.out, base2.out)
    small = dict(causal=True, align="bottom_right", softcap=2.5)
    e1 = exact.exact_sdpa(q[:1, :2], k[:1, :1], v[:1, :1], options=AttentionOptions(**small))
    e2 = exact.exact_sdpa(q[:1, :2], k[:1, :1], v[:1, :1], **small)
    same(e1.out, e2.out)
    packed = dict(causal=True, align="bottom_right", softcap=2.5)
    qp, kp, vp = q[0].swapaxes(0, 1), k[0].swapaxes(0, 1), v[0].swapaxes(0, 1)  # (T, H, Dk) ...
    same(
        varlen.varlen_attention(qp, kp, vp, [0, T], [0, S], options=AttentionOptions(**packed)),
        varlen.varlen_attention(qp, kp, vp, [0, T], [0, S], **packed),
    )
    cache = decode.KVCache.empty((B,), num_kv_heads=HKV, head_dim=DK, v_head_dim=DV)
    d1 = decode.decode_step(
        q, cache, k[:, :, :T], v[:, :, :T], options=AttentionOptions(softcap=2.5)
    )
    d2 = decode.decode_step(q, cache, k[:, :, :T], v[:, :, :T], softcap=2.5)
    same(d1.out, d2.out)


def test_a_keyword_overrides_the_object(qkv):
    q, k, v, _ = qkv
    opts = AttentionOptions(causal=True, scale=0.1)
    np.testing.assert_array_equal(
        ar.scaled_dot_product_attention(q, k, v, options=opts, scale=0.7),
        ar.scaled_dot_product_attention(q, k, v, causal=True, scale=0.7),
    )
    assert opts.scale == 0.1  # the object is unchanged (frozen)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.causal = False  # type: ignore[misc]


@pytest.mark.parametrize(
    "call",
    [
        lambda q, k, v: ar.scaled_dot_product_attention(q, k, v, is_causal=True),
        lambda q, k, v: flash.flash_attention_forward(q, k, v, is_causal=True),
        lambda q, k, v: exact.exact_sdpa(q[:1], k[:1], v[:1], is_causal=True),
        lambda q, k, v: ar.scaled_dot_product_attention(q, k, v, options={"causal": True}),
    ],
    ids=["plain", "tiled", "exact", "options-dict"],
)
def test_unknown_option_is_a_type_error_naming_it(qkv, call):
    q, k, v, _ = qkv
    with pytest.raises(TypeError, match="is_causal|options must be an AttentionOptions"):
        call(q, k, v)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda q, k, v: flash.flash_attention_forward(
                q, k, v, dropout_p=0.1, dropout_mask=np.ones((B, H, T, S), bool)
            ),
            "tiled path does not support dropout",
        ),
        (
            lambda q, k, v: varlen.varlen_attention(
                q[0].swapaxes(0, 1),
                k[0].swapaxes(0, 1),
                v[0].swapaxes(0, 1),
                [0, T],
                [0, S],
                mask=np.ones((T, S), bool),
            ),
            "varlen attention does not support mask",
        ),
        (
            lambda q, k, v: decode.decode_step(
                q,
                decode.KVCache.empty((B,), HKV, DK, DV),
                k[:, :, :T],
                v[:, :, :T],
                mask=np.ones((T, T), bool),
            ),
            "decode_step does not support mask",
        ),
        (
            lambda q, k, v: exact.exact_sdpa(q[:1], k[:1], v[:1], dtype=np.float32),
            "exact reference does not support dtype",
        ),
    ],
)
def test_a_path_refuses_what_it_cannot_compute_by_name(qkv, call, match):
    q, k, v, _ = qkv
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


def test_check_resolves_the_scale_and_converts():
    q, k = np.zeros((2, 3, 16)), np.zeros((2, 5, 16))
    c = AttentionOptions(mask=[[True] * 5] * 3, bias=np.zeros((3, 5), np.float32)).check(q, k)
    assert isinstance(c, ar.core.options.CheckedOptions)
    assert c.score_scale == 0.25 and c.dtype == np.float64
    assert c.mask.dtype == bool and c.bias.dtype == np.float64
    assert AttentionOptions(scale=0.5).check(q, k).score_scale == 0.5


# ----------------------------------------------------------------------------- allowed pairs


def loops(T_, S_, mask, causal, align, window, bias):
    """The definition of docs/conventions.md, one pair at a time."""
    off = S_ - T_ if align == "bottom_right" else 0
    out = np.zeros((T_, S_), dtype=bool)
    for i in range(T_):
        for j in range(S_):
            ok = mask is None or bool(mask[i, j])
            ok &= not causal or j <= i + off
            if window is not None:
                left, right = window
                ok &= left is None or j >= i + off - left
                ok &= right is None or j <= i + off + right
            ok &= bias is None or bias[i, j] != -np.inf
            out[i, j] = ok
    return out


@pytest.mark.parametrize("T_, S_", [(4, 7), (7, 4), (5, 5)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_dense_and_tiles_equal_the_definition(rng, T_, S_, align):
    for trial in range(6):
        mask = rng.random((T_, S_)) > 0.3 if trial % 2 else None
        bias = (
            np.where(rng.random((T_, S_)) > 0.8, -np.inf, rng.normal(size=(T_, S_)))
            if trial % 3 == 0
            else None
        )
        causal = bool(trial % 2)
        window = [(1, None), (None, 2), (2, 1), None, (0, 0), (3, None)][trial]
        pairs = AllowedPairs.build(
            T_, S_, mask=mask, causal=causal, align=align, window=window, bias=bias
        )
        want = loops(T_, S_, mask, causal, align, window, bias)
        dense = pairs.dense()
        got = np.ones((T_, S_), bool) if dense is None else np.broadcast_to(dense, (T_, S_))
        np.testing.assert_array_equal(got, want)
        tiled = np.zeros((T_, S_), dtype=bool)
        for i0 in range(0, T_, 2):
            for j0 in range(0, S_, 3):
                i1, j1 = min(i0 + 2, T_), min(j0 + 3, S_)
                kind, block = pairs.block(i0, i1, j0, j1)
                part = want[i0:i1, j0:j1]
                assert kind == ("full" if part.all() else "partial" if part.any() else "empty")
                tiled[i0:i1, j0:j1] = True if block is None else np.broadcast_to(block, part.shape)
        np.testing.assert_array_equal(tiled, want)


def test_sequence_lengths_are_masks_built_by_hand():
    klen, qlen = np.array([5, 2]), np.array([3, 1])
    pairs = AllowedPairs.build(3, 5, key_lengths=klen, query_lengths=qlen)
    want = np.zeros((2, 1, 3, 5), dtype=bool)
    for b in range(2):
        want[b, 0, : qlen[b], : klen[b]] = True
    np.testing.assert_array_equal(np.broadcast_to(pairs.dense(), want.shape), want)
    with pytest.raises(ValueError, match="key_lengths must be in"):
        AllowedPairs.build(3, 5, key_lengths=np.array([6]))


def test_the_tile_check_can_fail():
    """A tile wrongly reported full would attend masked pairs: the kind check above sees it."""
    pairs = AllowedPairs.build(4, 4, causal=True)
    kind, block = pairs.block(0, 2, 0, 2)
    assert kind == "partial" and block is not None and not block.all()
    assert pairs.block(2, 4, 0, 2) == ("full", None)
    assert pairs.block(0, 2, 2, 4)[0] == "empty"


def test_the_builder_never_returns_the_callers_mask():
    mask = np.ones((3, 5), dtype=bool)
    dense = AllowedPairs.build(3, 5, mask=mask).dense()
    assert dense is not None and not np.shares_memory(dense, mask)


def test_readme_options_example_runs_and_equals_the_keyword_calls():
    """The README's block on AttentionOptions runs after its ten lines, and means what it says."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = text.split("## Ten lines", 1)[1].split("## API", 1)[0].split("```python")[1:]
    assert len(blocks) == 2, "the README's Ten lines section should hold two python blocks"
    scope: dict = {}
    for block in blocks:
        exec(compile(block.split("```", 1)[0], "README.md", "exec"), scope)
    q, k, v, dout = scope["q"], scope["k"], scope["v"], scope["dout"]
    kw = dict(causal=True, align="bottom_right", window=(2, None))
    want = ar.scaled_dot_product_attention_backward(dout, q, k, v, **kw)
    for got, ref in zip(scope["grads"], want, strict=True):
        if ref is not None:
            np.testing.assert_array_equal(got, ref)
