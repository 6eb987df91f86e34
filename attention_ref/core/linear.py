r"""Projection: the affine map :math:`y = x W + b` and its backward.

Weights follow the math, ``weight`` of shape ``(in, out)``; PyTorch's ``nn.Linear`` stores the
transpose. Derivation: ``docs/derivations/linear.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._validate import as_float, check_ndim, resolve_dtype


class LinearGrads(NamedTuple):
    """Gradients of :func:`linear` with respect to each of its inputs."""

    dx: np.ndarray  #: (..., in)
    dweight: np.ndarray  #: (in, out)
    dbias: np.ndarray | None  #: (out,), or None when the forward had no bias


def _check_linear(x, weight, bias, dtype):
    dt = resolve_dtype(dtype, x, weight, bias)
    x = as_float("x", x, dt)
    weight = as_float("weight", weight, dt)
    check_ndim("x", x, 1, "(..., in)")
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape (in, out) (2 dims); got shape {weight.shape}")
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"x must have in={weight.shape[0]} features like weight (in, out) = {weight.shape}; "
            f"got x.shape={x.shape}"
        )
    if bias is not None:
        bias = as_float("bias", bias, dt)
        if bias.shape != (weight.shape[1],):
            raise ValueError(
                f"bias must have shape (out,) = ({weight.shape[1]},); got shape {bias.shape}"
            )
    return x, weight, bias, dt


def linear(
    x: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    r"""Affine projection ``x @ weight + bias``.

    Parameters
    ----------
    x : array_like, shape (..., in)
        Inputs; any number of leading dims.
    weight : array_like, shape (in, out)
        Weight in math layout (the transpose of PyTorch's ``nn.Linear.weight``).
    bias : array_like, shape (out,), optional
        Added to every output row.
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    y : ndarray, shape (..., out)

    Notes
    -----
    .. math:: y = x W + b \qquad \text{(L1)}

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import linear
    >>> linear(np.ones((2, 3)), np.ones((3, 4)), np.arange(4.0))
    array([[3., 4., 5., 6.],
           [3., 4., 5., 6.]])
    """
    x, weight, bias, _ = _check_linear(x, weight, bias, dtype)
    y = x @ weight  # (..., in) @ (in, out) -> (..., out)   (L1)
    if bias is not None:
        y += bias  # y is a fresh array we own
    return y


def linear_backward(
    dy: ArrayLike,
    x: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    dtype: DTypeLike | None = None,
) -> LinearGrads:
    r"""Gradients of :func:`linear`, given the upstream gradient ``dy``.

    Implements equations (L2)-(L4) of ``docs/derivations/linear.md``.

    Parameters
    ----------
    dy : array_like, shape (..., out)
        Gradient of the loss with respect to the output ``y``.
    x, weight, bias
        The forward's inputs.
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    LinearGrads
        ``dx`` (..., in), ``dweight`` (in, out), ``dbias`` (out,) or None without a bias.

    Notes
    -----
    .. math::
        dx = dy\,W^\top \quad\text{(L2)},\qquad
        dW = \sum_n x_n^\top dy_n \quad\text{(L3)},\qquad
        db = \sum_n dy_n \quad\text{(L4)}

    where :math:`n` runs over every leading (batch and position) index.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import linear_backward
    >>> g = linear_backward(np.ones((2, 4)), np.ones((2, 3)), np.ones((3, 4)), np.zeros(4))
    >>> g.dx.shape, g.dweight.shape, g.dbias
    ((2, 3), (3, 4), array([2., 2., 2., 2.]))
    """
    x, weight, bias, dt = _check_linear(x, weight, bias, dtype)
    dy = as_float("dy", dy, dt)
    expected = x.shape[:-1] + (weight.shape[1],)
    if dy.shape != expected:
        raise ValueError(f"dy must have the output's shape (..., out) = {expected}; got {dy.shape}")
    d_in, d_out = weight.shape
    dx = dy @ weight.T  # (..., out) @ (out, in) -> (..., in)   (L2)
    x2 = x.reshape(-1, d_in)  # (N, in), N = all leading dims
    dy2 = dy.reshape(-1, d_out)  # (N, out)
    dweight = x2.T @ dy2  # (in, N) @ (N, out) -> (in, out)   (L3)
    dbias = dy2.sum(axis=0) if bias is not None else None  # (out,)   (L4)
    return LinearGrads(dx=dx, dweight=dweight, dbias=dbias)
