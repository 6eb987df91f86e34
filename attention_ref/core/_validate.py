"""Conversion and validation shared by the public entry points (internal).

Public functions call these at the door; the math below them trusts its callers.
Every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

ALIGNS = ("top_left", "bottom_right")
#: The largest window side, chunk size or token count: positions are int64 arithmetic, and a
#: bound past any sequence is what None (unbounded) says.
MAX_POSITION = 2**40
EMPTY_ROW_POLICIES = ("zero", "uniform", "nan", "raise")


def _is_complex(x: Any) -> bool:
    """Whether ``x`` holds complex numbers; anything unconvertible is left for as_float to
    report."""
    if x is None or isinstance(x, np.random.Generator):
        return False
    try:
        return bool(np.iscomplexobj(x))
    except (TypeError, ValueError, RuntimeError):
        return False


def resolve_dtype(dtype: Any, *inputs: Any) -> np.dtype:
    """The compute dtype: float64 unless a real floating dtype is asked for.

    Complex inputs (the complex-step check, (G4) of ``docs/derivations/gradcheck.md``) compute in
    complex128 when ``dtype`` is omitted; ``dtype=numpy.complex128`` may also be asked for.
    """
    if dtype is None:
        return np.dtype(np.complex128 if any(_is_complex(x) for x in inputs) else np.float64)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"dtype must be a real floating dtype such as numpy.float64 (or numpy.complex128 for "
            f"the complex step); got {dtype!r}"
        ) from None
    if dt.kind != "f" and dt != np.complex128:
        raise TypeError(
            f"dtype must be a real floating dtype such as numpy.float64 (or numpy.complex128 for "
            f"the complex step); got {dt}"
        )
    return dt


def as_float(name: str, x: Any, dtype: np.dtype) -> np.ndarray:
    """``x`` as an array of ``dtype``; bool/int/float inputs (complex ones for a complex ``dtype``),
    never modified."""
    if isinstance(x, np.random.Generator):
        raise TypeError(f"{name} must be an array of real numbers; got a numpy.random.Generator")
    refuse_masked_array(name, x)
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} could not be converted to a numpy array: {exc}") from None
    if _is_ml_dtype(arr.dtype):  # bfloat16, float8_*: exact in float64
        return arr.astype(dtype)
    if arr.dtype.kind == "c" and dtype.kind != "c":
        raise TypeError(
            f"{name} is complex ({arr.dtype}) but the compute dtype is {dtype}; complex inputs are "
            "for the complex-step check and compute in complex128 (omit dtype)"
        )
    if arr.dtype.kind not in "biufc":
        raise TypeError(
            f"{name} must hold real numbers (bool, int or float); got dtype {arr.dtype}"
        )
    return arr.astype(dtype, copy=False)


def check_ndim(name: str, arr: np.ndarray, min_ndim: int, layout: str) -> None:
    if arr.ndim < min_ndim:
        raise ValueError(
            f"{name} must have shape {layout} ({min_ndim} or more dims); got shape {arr.shape}"
        )


def check_nonempty(name: str, arr: np.ndarray, layout: str) -> None:
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty (layout {layout}); got shape {arr.shape}")


def check_broadcastable(name: str, arr: np.ndarray, target: tuple[int, ...], layout: str) -> None:
    """``arr`` must broadcast to ``target`` without enlarging it."""
    try:
        ok = np.broadcast_shapes(arr.shape, target) == tuple(target)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must be broadcastable to {layout} = {tuple(target)}; got shape {arr.shape}"
        )


def _is_ml_dtype(dt: np.dtype) -> bool:
    """A floating type of the ``ml_dtypes`` package (bfloat16, the float8 formats)."""
    return dt.kind == "V" and getattr(dt.type, "__module__", "").startswith("ml_dtypes")


def refuse_masked_array(name: str, x: Any) -> None:
    """A ``numpy.ma`` array's mask would be dropped by ``np.asarray``: refuse it."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma masked array, whose mask numpy.asarray would silently drop; "
            f"pass {name}.filled(value) and, to mask attention, a boolean mask= (True = may "
            "attend)"
        )


def as_bool_mask(name: str, mask: Any, target: tuple[int, ...], layout: str) -> np.ndarray:
    refuse_masked_array(name, mask)
    try:
        arr = np.asarray(mask)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} could not be converted to a numpy array: {exc}") from None
    if arr.dtype != np.bool_:
        raise TypeError(
            f"{name} must be a boolean array (True = may attend); got dtype {arr.dtype}"
        )
    check_broadcastable(name, arr, target, layout)
    return arr


def check_real_scalar(name: str, value: Any, *, positive: bool) -> float:
    """A finite real number, > 0 when ``positive`` else >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number; got {value!r} of type {type(value).__name__}"
        )
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def check_window(window: Any) -> tuple[int | None, int | None] | None:
    """``None`` or ``(left, right)`` with each side a non-negative int or None (unbounded)."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(
            "window must be None or a pair (left, right) of non-negative ints or None; got "
            f"{window!r}"
        )
    sides: list[int | None] = []
    for side_name, side in zip(("window[0] (left)", "window[1] (right)"), window, strict=True):
        if side is None:
            sides.append(None)
            continue
        if isinstance(side, (bool, np.bool_)) or not isinstance(side, numbers.Integral):
            raise TypeError(f"{side_name} must be a non-negative int or None; got {side!r}")
        n = int(side)
        if n < 0:
            raise ValueError(f"{side_name} must be >= 0 (use None for unbounded); got {n}")
        if n > MAX_POSITION:
            raise ValueError(
                f"{side_name} must be at most {MAX_POSITION} (use None for unbounded); got {n}"
            )
        sides.append(n)
    return sides[0], sides[1]


def check_count(name: str, value: Any, most: int = MAX_POSITION) -> int:
    """A non-negative int, at most ``most`` (``bool`` refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int; got {value!r}")
    n = int(value)
    if n < 0:
        raise ValueError(f"{name} must be >= 0; got {n}")
    if n > most:
        raise ValueError(f"{name} must be at most {most}; got {n}")
    return n


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {int(value)}")
    return int(value)


def fresh(out: np.ndarray, *inputs: Any) -> np.ndarray:
    """``out``, copied if it could share memory with any of ``inputs`` (outputs never alias)."""
    for x in inputs:
        if isinstance(x, np.ndarray) and np.may_share_memory(out, x):
            return out.copy()
    return out


def sum_to_shape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``x`` over the axes that broadcasting expanded from ``shape`` (a broadcast's
    backward)."""
    extra = x.ndim - len(shape)
    if extra:
        x = x.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if axes:
        x = x.sum(axis=axes, keepdims=True)
    return x
