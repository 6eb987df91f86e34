"""Stable softmax and logsumexp: scipy agreement, properties, extreme logits, backwards by FD."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special

import attention_ref as ar
from attention_ref.gradcheck import check_vjp

SCIPY_RTOL = 1e-14  # two max-shifted float64 evaluations of the same formula


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_and_logsumexp_agree_with_scipy(rng, axis):
    x = 5 * rng.normal(size=(3, 4, 5))
    np.testing.assert_allclose(
        ar.softmax(x, axis=axis), scipy.special.softmax(x, axis=axis), rtol=SCIPY_RTOL
    )
    np.testing.assert_allclose(
        ar.logsumexp(x, axis=axis), scipy.special.logsumexp(x, axis=axis), rtol=SCIPY_RTOL
    )
    np.testing.assert_allclose(
        ar.logsumexp(x, axis=axis, keepdims=True),
        scipy.special.logsumexp(x, axis=axis, keepdims=True),
        rtol=SCIPY_RTOL,
    )


def test_rows_sum_to_one_and_are_shift_invariant(rng):
    x = rng.normal(size=(4, 7))
    p = ar.softmax(x)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-15)
    shift = rng.normal(size=(4, 1)) * 100
    np.testing.assert_allclose(ar.softmax(x + shift), p, rtol=1e-13)
    np.testing.assert_allclose(ar.logsumexp(x + shift), ar.logsumexp(x) + shift[:, 0], rtol=1e-13)


def test_logits_scaled_to_1e4_neither_overflow_nor_nan(rng):
    x = 1e4 * rng.normal(size=(5, 6))
    p, lse = ar.softmax(x), ar.logsumexp(x)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(lse))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-15)
    np.testing.assert_array_equal(
        lse, x.max(axis=-1)
    )  # the other terms are below float64 resolution
    g = ar.softmax_backward(rng.normal(size=x.shape), p)
    assert np.all(np.isfinite(g))


def test_neg_inf_entries_get_zero_and_all_neg_inf_rows_follow_scipy():
    x = np.array([[0.0, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf]])
    with np.errstate(invalid="ignore"):
        expected = scipy.special.softmax(x, axis=-1)
    p = ar.softmax(x)
    np.testing.assert_array_equal(p[0], [0.5, 0.0, 0.5])
    assert np.all(np.isnan(p[1])) and np.all(np.isnan(expected[1]))
    np.testing.assert_array_equal(ar.logsumexp(x), [np.log(2.0), -np.inf])
    assert ar.logsumexp(np.array([1.0, np.inf])) == np.inf


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_backward_matches_finite_differences(rng, axis):
    x, c = 2 * rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    g = ar.softmax_backward(c, ar.softmax(x, axis=axis), axis=axis)
    assert check_vjp(lambda x: ar.softmax(x, axis=axis), {"x": x}, c, {"x": g}).passed


@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_backward_matches_finite_differences(rng, keepdims):
    x = 2 * rng.normal(size=(3, 5))
    c = rng.normal(size=(3, 1) if keepdims else (3,))
    g = ar.logsumexp_backward(c, x, axis=-1, keepdims=keepdims)
    assert check_vjp(
        lambda x: ar.logsumexp(x, axis=-1, keepdims=keepdims), {"x": x}, c, {"x": g}
    ).passed


def test_softmax_backward_equals_the_dense_jacobian_product(rng):
    """The compact form p * (dp - sum(dp * p)) is J^T dp with J = diag(p) - p p^T."""
    x, dp = rng.normal(size=6), rng.normal(size=6)
    p = ar.softmax(x)
    jacobian = np.diag(p) - np.outer(p, p)
    np.testing.assert_allclose(ar.softmax_backward(dp, p), jacobian.T @ dp, rtol=1e-13, atol=1e-16)
