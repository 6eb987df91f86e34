"""The speed layer (``attention_ref/core/primitives.py``): each primitive against its plain form.

The plain form is the expression written in the primitive's docstring. Where the operations are
the same the two must be bitwise equal; where only a sum's order differs (a matrix product for
an elementwise sum) they agree to a few ulps of the sum's magnitude. An ``*_into`` primitive must
return the very array it was given, overwritten, and the plain stage must leave its input alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from attention_ref import causal_mask
from attention_ref.core import primitives
from attention_ref.core.attention import dropout_backward
from attention_ref.core.scores import apply_mask, apply_mask_backward
from attention_ref.core.softmax import softmax_grad, softmax_of, stable_shift

B, H, T, S, D = 2, 3, 5, 7, 4
#: Agreement of two summation orders over at most S terms of size ~1: a few ulps per term.
SUM_RTOL = 8 * S * np.finfo(np.float64).eps


def _close_in_ulps(got, want):
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= SUM_RTOL * scale


def test_transposed_product_is_a_transpose_times_b(rng):
    a, b = rng.normal(size=(B, H, T, S)), rng.normal(size=(B, H, T, D))
    got = primitives.transposed_product(a, b)
    assert got.shape == (B, H, S, D)
    _close_in_ulps(got, a.swapaxes(-1, -2) @ b)
    # the check can fail: one ulp-scale term off by 1% is far outside it
    off = got.copy()
    off[0, 0, 0, 0] *= 1.01
    with pytest.raises(AssertionError):
        _close_in_ulps(off, a.swapaxes(-1, -2) @ b)


def test_row_dot_is_the_row_sum_of_products(rng):
    a, b = rng.normal(size=(B, H, T, S)), rng.normal(size=(B, H, T, S))
    got = primitives.row_dot(a, b)
    assert got.shape == (B, H, T, 1)
    _close_in_ulps(got, (a * b).sum(axis=-1, keepdims=True))
    z = a + 1j * b  # not conjugated: the complex step needs the real formula
    np.testing.assert_allclose(primitives.row_dot(z, b), (z * b).sum(-1, keepdims=True), rtol=1e-14)


def test_masked_softmax_is_the_softmax_of_the_masked_logits(rng):
    logits = 20 * rng.normal(size=(B, H, T, S))
    allowed = np.broadcast_to(causal_mask(T, S, align="bottom_right"), logits.shape)
    logits[0, 0, 0, -1] = 1e6  # a masked logit that overflows exp
    masked = apply_mask(logits, allowed)
    shift = stable_shift(masked, axis=-1)
    probs, row_sum = primitives.masked_softmax(logits, shift, allowed)
    np.testing.assert_array_equal(probs, softmax_of(masked))  # bitwise
    np.testing.assert_array_equal(row_sum[..., 0], np.exp(masked - shift).sum(-1))
    assert not np.shares_memory(probs, logits)


@pytest.mark.parametrize("name", ["softmax", "dropout", "mask"])
def test_into_primitives_equal_their_stage_bitwise_and_write_only_what_they_are_given(rng, name):
    d = rng.normal(size=(B, H, T, S))
    probs = rng.random(size=(B, H, T, S))
    keep = rng.random((B, H, T, S)) >= 0.3
    allowed = causal_mask(T, S)
    plain, into = {
        "softmax": (
            lambda x: softmax_grad(x, probs),
            lambda x: primitives.softmax_backward_into(x, probs),
        ),
        "dropout": (
            lambda x: dropout_backward(x, keep, 0.3),
            lambda x: primitives.dropout_backward_into(x, keep, 0.3),
        ),
        "mask": (
            lambda x: apply_mask_backward(x, allowed),
            lambda x: primitives.zero_masked_into(x, allowed),
        ),
    }[name]
    before = d.copy()
    want = plain(d)
    np.testing.assert_array_equal(d, before, err_msg=f"the plain {name} stage wrote its input")
    assert not np.shares_memory(want, d)
    owned = d.copy()
    got = into(owned)
    assert got is owned, f"{name}: the _into primitive did not return the array it was given"
    np.testing.assert_array_equal(got, want)  # bitwise


def test_the_bitwise_check_can_fail(rng):
    """A primitive one rounding away from its stage (dividing by 1 - p instead of multiplying by
    its reciprocal) is caught by the bitwise comparison above."""
    d = rng.normal(size=(B, H, T, S))
    keep = rng.random(d.shape) >= 0.3
    wrong = d * keep / (1.0 - 0.3)
    assert not np.array_equal(wrong, dropout_backward(d, keep, 0.3))
