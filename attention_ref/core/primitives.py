r"""The speed layer: the few fused or in-place operations the stages use, each with its plain form.

Every function here computes one named sub-expression of an equation of
``docs/derivations/attention.md`` or ``softmax.md``, faster than the expression as written; its
docstring gives that plain expression, and ``tests/test_primitives.py`` checks the two agree
(bitwise where the operations are the same, to round-off where only the order of a sum
differs). The stages cite the equations and call these; a reader who wants the mathematics can
read every call as its plain form. Why each is faster was measured in ``benchmarks/README.md``.

The ``*_into`` functions overwrite their first argument, which the caller owns and gives up
(``sdpa_backward`` on its own ``(..., H, T, S)`` gradient, never on a trace or an input).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "dropout_backward_into",
    "masked_softmax",
    "row_dot",
    "softmax_backward_into",
    "transposed_product",
    "zero_masked_into",
]


def transposed_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""``a^T @ b`` over the last two axes, computed as ``(b^T @ a)^T``.

    Plain form: ``a.swapaxes(-1, -2) @ b`` (the same sums, to round-off).

    ``a`` (..., N, S), ``b`` (..., N, D) -> (..., S, D), returned as a view of a (..., D, S)
    array: not C-contiguous. When S >> D OpenBLAS computes the second form (the large (N, S)
    operand untransposed) about 1.4x faster: 10.7 ms -> 7.6 ms at (2, 8, 512, 512).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.primitives import transposed_product
    >>> a, b = np.arange(6.0).reshape(3, 2), np.arange(12.0).reshape(3, 4)
    >>> bool(np.array_equal(transposed_product(a, b), a.T @ b))
    True
    """
    # (..., D, N) @ (..., N, S) -> (..., D, S), viewed as (..., S, D)
    return (b.swapaxes(-1, -2) @ a).swapaxes(-1, -2)


def row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""``sum_j a_j b_j`` over the last axis, kept as an axis of length 1.

    Plain form: ``(a * b).sum(axis=-1, keepdims=True)`` (the same sum, to round-off).

    A batch of ``(1, S) @ (S, 1)`` products, so no ``a * b`` temporary of the inputs' size is
    made. Unlike :func:`numpy.vdot` a complex ``a`` is not conjugated: the complex step needs
    the formula of the real case.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.primitives import row_dot
    >>> row_dot(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 1.0], [0.5, 2.0]]))
    array([[3. ],
           [9.5]])
    """
    # (..., 1, S) @ (..., S, 1) -> (..., 1, 1) -> (..., 1)
    return (a[..., None, :] @ b[..., :, None])[..., 0]


def masked_softmax(
    logits: np.ndarray,
    shift: np.ndarray,
    allowed: np.ndarray | None,
    extra: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(probs, row_sum)``: (S2)-(S3) over the allowed keys, given the row max ``shift`` (S1).

    Plain form: ``softmax(masked)`` along the last axis, with ``masked`` the logits where
    allowed and the finite fill elsewhere, and ``shift`` its row max (bitwise equal on every row
    with an allowed key).

    The exponential is taken of ``logits - shift`` and the masked weights are then set to 0,
    instead of exponentiating the fill: ``exp(fill - max)`` is exactly 0 anyway, but NumPy's
    ``exp`` leaves its SIMD path below about -708 (23 ms against 3.6 ms for 4M values). A masked
    logit that overflows ``exp`` is discarded with the rest. On a row with no allowed key the
    weights are 0/0 = NaN and ``row_sum`` is 0: the caller applies its empty-row policy.

    ``extra`` (..., 1), when given, is one more term of each row's denominator that has no
    column: ``exp(sink - shift)`` of a learnable sink. Plain form: the softmax of the row with
    that column appended, without the column.

    Returns
    -------
    probs : ndarray, the logits' shape, a new array
    row_sum : ndarray, shape (..., 1)
        ``sum_j exp(logit_j - shift)`` over the allowed keys; 0 on an empty row.
    """
    probs = logits - shift  # the one new array: exponentiated and normalised in place
    with np.errstate(over="ignore", invalid="ignore"):
        np.exp(probs, out=probs)  # (S2)
    if allowed is not None:
        np.copyto(probs, 0.0, where=~allowed)  # masked weights: exp(fill - max) = 0   (A4)
    row_sum = probs.sum(axis=-1, keepdims=True)  # (..., 1); 0 on an empty row
    if extra is not None:
        row_sum += extra  # the sink's term of the denominator
    with np.errstate(divide="ignore", invalid="ignore"):
        probs /= row_sum  # (S3)
    return probs, row_sum


def softmax_backward_into(
    dprobs: np.ndarray, probs: np.ndarray, dot: np.ndarray | None = None
) -> np.ndarray:
    r"""(S4) along the last axis, written into ``dprobs``: ``p * (dp - sum_j dp_j p_j)``.

    Plain form: ``attention_ref.core.softmax.softmax_grad(dprobs, probs)``, (S4) (bitwise).
    ``dot`` (..., 1), when given, replaces the row sum ``sum_j dp_j p_j`` (the caller computed
    it, and may have subtracted the log-sum-exp's cotangent: (A17) of
    ``docs/derivations/attention.md``). Returns ``dprobs``, overwritten.
    """
    if dot is None:
        dot = row_dot(dprobs, probs)  # (..., 1) sum_j dp_j p_j
    np.subtract(dprobs, dot, out=dprobs)
    dprobs *= probs  # (S4)
    return dprobs


def dropout_backward_into(
    ddropped: np.ndarray, dropout_mask: np.ndarray, dropout_p: float
) -> np.ndarray:
    r"""(A10) written into ``ddropped``: ``d * keep / (1 - p)``.

    Plain form: :func:`attention_ref.core.attention.dropout_backward` (bitwise). Returns
    ``ddropped``, overwritten.
    """
    np.multiply(ddropped, dropout_mask, out=ddropped)
    ddropped *= 1.0 / (1.0 - dropout_p)  # (A10)
    return ddropped


def zero_masked_into(d: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    r"""(A12) written into ``d``: 0 where a pair may not attend.

    Plain form: ``np.where(allowed, d, 0)`` (bitwise). Returns ``d``, overwritten.
    """
    np.copyto(d, 0, where=~allowed)  # (A12)
    return d
