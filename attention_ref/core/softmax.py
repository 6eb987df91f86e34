r"""Numerically stable softmax and logsumexp, and their backwards.

The max shift :math:`m = \max_j x_j` makes every exponent :math:`\le 0`, so nothing overflows; a
row whose max is not finite (all ``-inf``) is shifted by 0 instead, so ``inf - inf`` never occurs.
Derivation: ``docs/derivations/softmax.md``.
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._validate import as_float, resolve_dtype
from .primitives import row_dot


def _check_axis(axis, ndim: int) -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int; got {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis must be in [{-ndim}, {ndim}) for an input of {ndim} dims; got {axis}"
        )
    return axis


def _prepare(name: str, x, axis, dtype) -> tuple[np.ndarray, int]:
    x = as_float(name, x, resolve_dtype(dtype, x))
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least 1 dim; got a scalar")
    axis = _check_axis(axis, x.ndim)
    if x.shape[axis] == 0:
        raise ValueError(
            f"{name} has length 0 along axis {axis} (shape {x.shape}): a softmax needs at least "
            "one entry"
        )
    return x, axis


def _check_keepdims(keepdims) -> bool:
    if not isinstance(keepdims, (bool, np.bool_)):
        raise TypeError(f"keepdims must be a bool; got {keepdims!r}")
    return bool(keepdims)


def stable_shift(x: np.ndarray, axis: int) -> np.ndarray:
    """Row max used as the shift, (S1); 0 where the max is not finite so ``inf - inf`` cannot occur.

    For complex ``x`` (the complex step) the shift is the max of the real parts: any constant
    shift leaves the softmax unchanged, so it need not be analytic in ``x``.
    """
    m = np.max(x.real, axis=axis, keepdims=True)  # (S1)
    return np.where(np.isfinite(m), m, 0.0).astype(x.real.dtype, copy=False)


def softmax_of(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Internal: the softmax (S1)-(S3) of an already validated float array."""
    raw = np.max(x.real, axis=axis, keepdims=True)  # (..., 1, ...) the row max, maybe inf/NaN
    m = np.where(np.isfinite(raw), raw, 0.0).astype(x.real.dtype, copy=False)  # (S1)
    e = x - m  # x's shape; the one new array, exponentiated and normalised in place
    with np.errstate(over="ignore", invalid="ignore"):
        np.exp(e, out=e)  # (S2)
    with np.errstate(invalid="ignore", divide="ignore"):
        # (S3); a row of all -inf gives 0/0 = NaN, as scipy does
        e /= e.sum(axis=axis, keepdims=True)
    undefined = np.isnan(raw) | np.isposinf(raw)  # a +inf or NaN entry: NaN everywhere, as scipy
    if undefined.any():
        np.copyto(e, np.nan, where=np.broadcast_to(undefined, e.shape))
    return e


def softmax_grad(dprobs: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Internal: (S4) along the last axis of validated arrays of the same shape, a new array."""
    dot = row_dot(dprobs, probs)  # (..., 1) sum_j dp_j p_j
    return (dprobs - dot) * probs  # (S4)


def softmax(x: ArrayLike, axis: int = -1, *, dtype: DTypeLike | None = None) -> np.ndarray:
    r"""Softmax along ``axis``, shifted by the row max so that nothing overflows.

    Parameters
    ----------
    x : array_like, shape (..., S)
        Logits. ``-inf`` entries get probability 0.
    axis : int, default -1
        The axis that sums to 1.
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    ndarray, same shape as ``x``
        Probabilities. A slice whose entries are all ``-inf`` (or that holds ``+inf`` or NaN)
        has no defined softmax and comes out NaN, as with :func:`scipy.special.softmax`;
        :func:`~attention_ref.scaled_dot_product_attention` handles fully masked rows by policy
        instead.

    Notes
    -----
    .. math::
        m = \max_j x_j \ \text{(S1)},\qquad
        e_j = \exp(x_j - m) \ \text{(S2)},\qquad
        p_j = e_j / \textstyle\sum_k e_k \ \text{(S3)}

    References
    ----------
    Milakov & Gimelshein (2018), "Online normalizer calculation for softmax".

    Examples
    --------
    >>> from attention_ref import softmax
    >>> softmax([1000.0, 1000.0, -float("inf")])
    array([0.5, 0.5, 0. ])
    """
    x, axis = _prepare("x", x, axis, dtype)
    return softmax_of(x, axis)


def softmax_backward(
    dprobs: ArrayLike, probs: ArrayLike, axis: int = -1, *, dtype: DTypeLike | None = None
) -> np.ndarray:
    r"""Gradient of :func:`softmax` from its output: ``p * (dp - sum(dp * p))``, (S4).

    Never forms the dense Jacobian :math:`\operatorname{diag}(p) - p p^\top`; its product with
    ``dp`` collapses to one row reduction. See ``docs/derivations/softmax.md`` (S4).

    Parameters
    ----------
    dprobs : array_like, same shape as ``probs``
        Gradient of the loss with respect to the probabilities.
    probs : array_like
        The forward's output (all the backward needs).
    axis : int, default -1
        The forward's axis.
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    ndarray, same shape as ``probs``
        Gradient with respect to the logits.

    Notes
    -----
    .. math::
        \frac{\partial L}{\partial x_i} = p_i \Big(dp_i - \sum_j dp_j\, p_j\Big) \qquad \text{(S4)}

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import softmax, softmax_backward
    >>> p = softmax(np.array([0.0, 0.0]))
    >>> softmax_backward(np.array([1.0, 0.0]), p)
    array([ 0.25, -0.25])
    """
    probs, axis = _prepare("probs", probs, axis, dtype)
    dprobs = as_float("dprobs", dprobs, probs.dtype)
    if dprobs.shape != probs.shape:
        raise ValueError(f"dprobs must have probs' shape {probs.shape}; got {dprobs.shape}")
    # (S4) on the last axis
    dx = softmax_grad(np.moveaxis(dprobs, axis, -1), np.moveaxis(probs, axis, -1))
    return np.moveaxis(dx, -1, axis)


def logsumexp(
    x: ArrayLike, axis: int = -1, *, keepdims: bool = False, dtype: DTypeLike | None = None
) -> np.ndarray:
    r"""``log(sum(exp(x)))`` along ``axis``, computed as ``m + log(sum(exp(x - m)))``, (S5).

    Parameters
    ----------
    x : array_like, shape (..., S)
    axis : int, default -1
    keepdims : bool, default False
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    ndarray
        ``x``'s shape without ``axis`` (or with it as 1 when ``keepdims``). A slice of all
        ``-inf`` gives ``-inf`` (the log of an empty sum), one holding ``+inf`` gives ``+inf``.

    Notes
    -----
    .. math:: \operatorname{lse}(x) = m + \log \sum_j \exp(x_j - m) \qquad \text{(S5)}

    Examples
    --------
    >>> from attention_ref import logsumexp
    >>> round(float(logsumexp([1000.0, 1000.0]) - 1000.0), 10)  # log 2, no overflow
    0.6931471806
    """
    x, axis = _prepare("x", x, axis, dtype)
    keepdims = _check_keepdims(keepdims)
    m = stable_shift(x, axis)  # (S1)
    with np.errstate(divide="ignore"):
        lse = m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))  # (S5)
    return lse if keepdims else np.squeeze(lse, axis=axis)


def logsumexp_backward(
    dlse: ArrayLike,
    x: ArrayLike,
    axis: int = -1,
    *,
    keepdims: bool = False,
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    r"""Gradient of :func:`logsumexp`: ``dlse * softmax(x)``, (S6).

    See ``docs/derivations/softmax.md`` (S6).

    Parameters
    ----------
    dlse : array_like
        Gradient with respect to the forward's output (shape as the forward returned it).
    x, axis, keepdims
        The forward's inputs.
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    ndarray, same shape as ``x``

    Examples
    --------
    >>> from attention_ref import logsumexp_backward
    >>> logsumexp_backward(2.0, [0.0, 0.0])
    array([1., 1.])
    """
    x, axis = _prepare("x", x, axis, dtype)
    keepdims = _check_keepdims(keepdims)
    dlse = as_float("dlse", dlse, x.dtype)
    out_shape = list(x.shape)
    out_shape[axis] = 1
    if not keepdims:
        del out_shape[axis]
    if dlse.shape != tuple(out_shape):
        raise ValueError(
            f"dlse must have logsumexp's output shape {tuple(out_shape)}; got {dlse.shape}"
        )
    if not keepdims:
        dlse = np.expand_dims(dlse, axis)
    return dlse * softmax_of(x, axis)  # (S6)
