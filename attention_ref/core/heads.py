r"""Head split and merge: reshapes between the model width and per-head widths.

``split_heads`` takes ``(..., T, H*Dh)`` to ``(..., H, T, Dh)``: head ``h`` owns the columns
``h*Dh : (h+1)*Dh`` (the layout PyTorch and JAX use). ``merge_heads`` is its inverse. Each is the
other's backward, since a permutation's adjoint is its inverse. Derivation:
``docs/derivations/heads.md``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._validate import as_float, check_ndim, check_positive_int, fresh, resolve_dtype


def split_heads(x: ArrayLike, num_heads: int, *, dtype: DTypeLike | None = None) -> np.ndarray:
    r"""Split the last axis into heads: ``(..., T, H*Dh) -> (..., H, T, Dh)``.

    Parameters
    ----------
    x : array_like, shape (..., T, H*Dh)
    num_heads : int
        H; must divide the last axis.
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    ndarray, shape (..., H, T, Dh)
        A new array: ``out[..., h, t, d] = x[..., t, h*Dh + d]``  (H1).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import split_heads
    >>> split_heads(np.arange(6).reshape(1, 6), num_heads=2)
    array([[[0., 1., 2.]],
    <BLANKLINE>
           [[3., 4., 5.]]])
    """
    num_heads = check_positive_int("num_heads", num_heads)
    x_in = x
    x = as_float("x", x, resolve_dtype(dtype, x))
    check_ndim("x", x, 2, "(..., T, H*Dh)")
    *lead, t, width = x.shape
    if width % num_heads:
        raise ValueError(
            f"x's last axis (H*Dh = {width}) must be divisible by num_heads={num_heads}; "
            f"got x.shape={x.shape}"
        )
    y = x.reshape(*lead, t, num_heads, width // num_heads)  # (..., T, H, Dh)
    y = np.swapaxes(y, -3, -2)  # (..., H, T, Dh)   (H1)
    return fresh(np.ascontiguousarray(y), x_in)


def merge_heads(x: ArrayLike, *, dtype: DTypeLike | None = None) -> np.ndarray:
    r"""Concatenate heads: ``(..., H, T, Dh) -> (..., T, H*Dh)``, the inverse of
    :func:`split_heads`.

    Parameters
    ----------
    x : array_like, shape (..., H, T, Dh)
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    ndarray, shape (..., T, H*Dh)
        A new array: ``out[..., t, h*Dh + d] = x[..., h, t, d]``  (H2).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import merge_heads, split_heads
    >>> x = np.arange(12.0).reshape(2, 6)
    >>> bool(np.array_equal(merge_heads(split_heads(x, 3)), x))
    True
    """
    x_in = x
    x = as_float("x", x, resolve_dtype(dtype, x))
    check_ndim("x", x, 3, "(..., H, T, Dh)")
    *lead, h, t, dh = x.shape
    y = np.swapaxes(x, -3, -2)  # (..., T, H, Dh)
    y = y.reshape(*lead, t, h * dh)  # (..., T, H*Dh)   (H2)
    return fresh(np.ascontiguousarray(y), x_in)


def split_heads_backward(dout: ArrayLike, *, dtype: DTypeLike | None = None) -> np.ndarray:
    r"""Gradient of :func:`split_heads`: merge the per-head gradient back, (H3).

    ``dout`` has shape (..., H, T, Dh); the result has shape (..., T, H*Dh). A permutation's
    adjoint is its inverse, so this is :func:`merge_heads`. See ``docs/derivations/heads.md``
    (H3).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import split_heads_backward
    >>> split_heads_backward(np.ones((2, 3, 4))).shape
    (3, 8)
    """
    return merge_heads(dout, dtype=dtype)


def merge_heads_backward(
    dout: ArrayLike, num_heads: int, *, dtype: DTypeLike | None = None
) -> np.ndarray:
    r"""Gradient of :func:`merge_heads`: split the gradient into heads, (H4).

    ``dout`` has shape (..., T, H*Dh); the result has shape (..., H, T, Dh). This is
    :func:`split_heads`. See ``docs/derivations/heads.md`` (H4).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import merge_heads_backward
    >>> merge_heads_backward(np.ones((3, 8)), num_heads=2).shape
    (2, 3, 4)
    """
    return split_heads(dout, num_heads, dtype=dtype)
