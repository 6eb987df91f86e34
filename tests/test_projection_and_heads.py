"""Projection (linear) and head split/merge: definitions, round trips, backwards by FD."""

from __future__ import annotations

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.gradcheck import check_vjp


def test_linear_is_x_times_w_plus_b(rng):
    x, w, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5)), rng.normal(size=5)
    expected = np.einsum("bti,io->bto", x, w, optimize=True) + b  # independent of the @ path
    np.testing.assert_allclose(ar.linear(x, w, b), expected, rtol=1e-14)
    np.testing.assert_allclose(ar.linear(x, w), expected - b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("x_shape", [(4,), (3, 4), (2, 3, 4)], ids=["1-D", "2-D", "3-D"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_backward_matches_finite_differences(rng, x_shape, with_bias):
    x, w = rng.normal(size=x_shape), rng.normal(size=(4, 5))
    b = rng.normal(size=5) if with_bias else None
    c = rng.normal(size=x_shape[:-1] + (5,))
    g = ar.linear_backward(c, x, w, b)
    inputs, grads = {"x": x, "weight": w}, {"x": g.dx, "weight": g.dweight}
    if with_bias:
        inputs["bias"], grads["bias"] = b, g.dbias
    else:
        assert g.dbias is None
    result = check_vjp(lambda **kw: ar.linear(**{"bias": None, **kw}), inputs, c, grads)
    assert result.passed, f"\n{result}"


def test_split_heads_layout(rng):
    x = rng.normal(size=(2, 3, 12))
    y = ar.split_heads(x, 4)
    assert y.shape == (2, 4, 3, 3)
    for h in range(4):  # head h owns columns h*Dh:(h+1)*Dh
        np.testing.assert_array_equal(y[:, h], x[..., h * 3 : (h + 1) * 3])


@pytest.mark.parametrize("num_heads", [1, 2, 6])
def test_merge_inverts_split_and_split_inverts_merge(rng, num_heads):
    x = rng.normal(size=(2, 5, 6))
    np.testing.assert_array_equal(ar.merge_heads(ar.split_heads(x, num_heads)), x)
    z = rng.normal(size=(2, num_heads, 5, 3))
    np.testing.assert_array_equal(ar.split_heads(ar.merge_heads(z), num_heads), z)


def test_head_backwards_match_finite_differences(rng):
    x, c = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 3, 2))
    assert check_vjp(
        lambda x: ar.split_heads(x, 3), {"x": x}, c, {"x": ar.split_heads_backward(c)}
    ).passed
    z, c2 = rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(2, 4, 6))
    assert check_vjp(ar.merge_heads, {"x": z}, c2, {"x": ar.merge_heads_backward(c2, 3)}).passed
