"""Each internal stage of attention has its own finite-difference check (random cotangents,
GQA with Hkv < H, T != S, Dk != Dv, batch > 1), not only through the composite."""

from __future__ import annotations

import numpy as np

from attention_ref.core.attention import dropout_backward, dropout_forward
from attention_ref.core.masks import causal_mask
from attention_ref.core.scores import (
    add_bias_backward,
    apply_mask,
    apply_mask_backward,
    scaled_scores,
    scaled_scores_backward,
    softcap_backward,
    softcap_forward,
    weighted_values,
    weighted_values_backward,
)
from attention_ref.gradcheck import check_vjp

B, H, HKV, T, S, DK, DV = 2, 4, 2, 3, 5, 4, 6
SCALE = 0.7


def test_scaled_scores_backward(rng):
    q, k = rng.normal(size=(B, H, T, DK)), rng.normal(size=(B, HKV, S, DK))
    c = rng.normal(size=(B, H, T, S))
    dq, dk = scaled_scores_backward(c, q, k, SCALE)
    result = check_vjp(
        lambda q, k: scaled_scores(q, k, SCALE), {"q": q, "k": k}, c, {"q": dq, "k": dk}
    )
    assert result.passed, f"\n{result}"


def test_weighted_values_backward(rng):
    w, v = rng.random(size=(B, H, T, S)), rng.normal(size=(B, HKV, S, DV))
    c = rng.normal(size=(B, H, T, DV))
    dw, dv = weighted_values_backward(c, w, v)
    result = check_vjp(weighted_values, {"weights": w, "v": v}, c, {"weights": dw, "v": dv})
    assert result.passed, f"\n{result}"


def test_softcap_backward(rng):
    s, c = 3 * rng.normal(size=(B, H, T, S)), rng.normal(size=(B, H, T, S))
    g = softcap_backward(c, softcap_forward(s, 2.0), 2.0)
    assert check_vjp(lambda s: softcap_forward(s, 2.0), {"s": s}, c, {"s": g}).passed


def test_apply_mask_backward(rng):
    logits, c = rng.normal(size=(B, H, T, S)), rng.normal(size=(B, H, T, S))
    allowed = causal_mask(T, S, align="bottom_right")
    g = apply_mask_backward(c, allowed)
    assert np.all(g[..., ~allowed] == 0)
    # The output holds the -1.8e308 fill, so there is no round-off bound from ||f||: atol is given.
    # The fill is constant, so its entries cancel exactly in the central difference.
    f = lambda x: apply_mask(x, allowed)  # noqa: E731
    assert check_vjp(f, {"x": logits}, c, {"x": g}, atol=1e-8).passed
    assert not check_vjp(f, {"x": logits}, c, {"x": c}, atol=1e-8).passed  # ignoring the mask fails


def test_add_bias_backward_sums_over_broadcast_axes(rng):
    capped, bias = rng.normal(size=(B, H, T, S)), rng.normal(size=(H, 1, S))
    c = rng.normal(size=(B, H, T, S))
    g = add_bias_backward(c, bias.shape)
    assert g.shape == bias.shape
    assert check_vjp(lambda bias: capped + bias, {"bias": bias}, c, {"bias": g}).passed


def test_dropout_backward(rng):
    p, keep = rng.random(size=(B, H, T, S)), rng.random(size=(B, H, T, S)) >= 0.3
    c = rng.normal(size=(B, H, T, S))
    g = dropout_backward(c, keep, 0.3)
    assert check_vjp(lambda p: dropout_forward(p, keep, 0.3), {"p": p}, c, {"p": g}).passed
