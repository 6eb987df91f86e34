r"""The one comparison report: the worst error of an array against its reference, and where it is.

* :class:`Comparison` -- the report: max absolute error, relative error, the scale it is relative
  to, the index of the worst element and both values there, and the NaN and Inf mismatches.
  Every judge of attention_ref returns it: :func:`compare` and :func:`assert_close`,
  :func:`attention_ref.gradcheck.error_report` (and so every gradient check), and the error-budget
  rule (:class:`attention_ref.testing.BudgetReport` holds two).
* :func:`compare` -- builds it from two arrays (NumPy, anything ``numpy.asarray`` accepts, torch
  tensors); :func:`assert_close` raises an ``AssertionError`` whose message is the report, with
  per-precision default tolerances (:data:`DEFAULT_TOLERANCES`).

The numbers, for ``a = actual`` and ``e = expected`` of one shape:

* ``max_abs_error = max |a - e|`` over the entries finite on both sides; ``location`` is the first
  index (C order) where it is reached, ``actual``/``expected`` the two values there;
* ``scale = max |e|`` over the same entries (unless given), ``rel_error = max_abs_error / scale``
  (0 when both are 0, inf when only the scale is);
* ``nan_mismatch``: entries where exactly one side is NaN; ``inf_mismatch``: entries with no NaN,
  an infinity on at least one side and not the same infinity on both. Their sum,
  ``nonfinite_mismatch``, counts every entry that is not finite on both sides and not identical
  (NaN facing NaN counts as identical).

Layer 4 (oracle); imports numpy only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..core.precision import PRECISIONS, check_precision

__all__ = [
    "PRECISIONS",
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "Comparison",
    "compare",
    "assert_close",
    "to_numpy",
]


class Tolerance(NamedTuple):
    """Element-wise rule ``|actual - expected| <= atol + rtol * |expected|``, and its source."""

    rtol: float
    atol: float
    source: str


#: Default tolerances of :func:`assert_close` per precision of the *actual* array. They are
#: ``torch.testing.assert_close``'s defaults for float32, float16 and bfloat16 (PyTorch's
#: documentation, "torch.testing"): about 10 ulps relative (rtol 1.3e-6 = 11 u for float32,
#: 1e-3 = 2 u for float16, 1.6e-2 = 4 u for bfloat16). For float64 PyTorch allows 1e-7; an
#: oracle can ask for much more, and the float64 paths of attention_ref agree with PyTorch's to
#: 7.8e-15 relative (docs/stability.md), so float64 gets 1e-12 relative: ~5000 ulps, room for
#: different summation orders over long rows, and 1e10 times smaller than a real bug.
DEFAULT_TOLERANCES = {
    "float64": Tolerance(
        1e-12, 1e-14, "attention_ref: float64 implementations agree to ~1e-14 (measured vs PyTorch)"
    ),
    "float32": Tolerance(1.3e-6, 1e-5, "torch.testing.assert_close default for float32"),
    "float16": Tolerance(1e-3, 1e-5, "torch.testing.assert_close default for float16"),
    "bfloat16": Tolerance(1.6e-2, 1e-5, "torch.testing.assert_close default for bfloat16"),
    # torch.testing has no float8 default: two units in the last place at 1 (the rule of its
    # bfloat16 default, 0.016 ~ 2 * 2^-7), absolute at the smallest subnormal
    "float8_e4m3fn": Tolerance(
        0.25, 2.0**-9, "attention_ref: 2 ulp(1) of e4m3 (torch.testing has no float8 default)"
    ),
    "float8_e5m2": Tolerance(
        0.5, 2.0**-16, "attention_ref: 2 ulp(1) of e5m2 (torch.testing has no float8 default)"
    ),
}


# ----------------------------------------------------------------------------- conversion


def to_numpy(x: Any) -> tuple[np.ndarray, str | None]:
    """``(array, precision)``: a NumPy copy-free view where possible, and its precision.

    Torch tensors are detached and moved to the CPU; bfloat16 arrays (torch or ml_dtypes/JAX) are
    widened to float32, which is exact. ``precision`` is None for non-float inputs.

    Parameters
    ----------
    x : array_like or torch tensor
        Real values: float, int or bool.

    Returns
    -------
    array : ndarray
    precision : str or None
        One of :data:`PRECISIONS`, or None for an int or bool array.

    Raises
    ------
    TypeError
        For a complex, string or object array, or anything NumPy cannot convert.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.testing import to_numpy
    >>> arr, precision = to_numpy(np.ones(3, dtype=np.float32))
    >>> arr.dtype, precision
    (dtype('float32'), 'float32')
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            return x.float().numpy(), "bfloat16"
        x = x.numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"could not convert {type(x).__name__} to a numpy array: {exc}") from None
    if arr.dtype.name == "bfloat16":
        return arr.astype(np.float32), "bfloat16"
    if arr.dtype.kind == "f" and arr.dtype.name in PRECISIONS:
        return arr, arr.dtype.name
    if arr.dtype.kind in "biu":
        return arr, None
    raise TypeError(f"expected a real array (float, int or bool); got dtype {arr.dtype}")


# ----------------------------------------------------------------------------- the report


class Comparison(NamedTuple):
    """The worst disagreement of an array with its reference, readable without a debugger.

    Returned by :func:`compare`, :func:`assert_close` and
    :func:`attention_ref.gradcheck.error_report` (``ErrorReport`` is another name for it), and
    held by :class:`attention_ref.testing.BudgetReport`. ``str()`` of it is a one-line report.
    """

    name: str  #: what was compared ("out", "dq", ...; "" when unnamed)
    shape: tuple[int, ...]  #: both arrays' shape
    max_abs_error: float  #: max |actual - reference| over entries finite on both sides
    rel_error: float  #: max_abs_error / scale (0 when both are 0, inf when only the scale is 0)
    scale: float  #: max |reference| over entries finite on both sides, unless given
    location: tuple[int, ...]  #: index of the worst absolute error (the first, in C order)
    actual: float  #: actual at ``location``
    expected: float  #: reference at ``location``
    nan_mismatch: int  #: entries where exactly one side is NaN
    inf_mismatch: int  #: entries with no NaN where one side is +-inf, not the other's infinity

    @property
    def nonfinite_mismatch(self) -> int:
        """NaN and Inf mismatches together: entries not finite on both sides and not identical."""
        return self.nan_mismatch + self.inf_mismatch

    def passed(self, rtol: float, atol: float = 0.0) -> bool:
        """``max_abs_error <= atol + rtol * scale`` and no NaN/Inf mismatch.

        The rule of the gradient checks (:mod:`attention_ref.gradcheck`): one bound for the whole
        array, relative to its largest reference value.

        Parameters
        ----------
        rtol : float
            Allowed error relative to :attr:`scale`.
        atol : float, default 0
            Absolute allowance.

        Returns
        -------
        bool

        Examples
        --------
        >>> from attention_ref.testing import compare
        >>> c = compare([1.0, 2.0, 4.0], [1.0, 2.0, 4.4])   # error 0.4, scale 4.4
        >>> c.passed(0.1), c.passed(0.05), c.passed(0.05, atol=0.2)
        (True, False, True)
        """
        return self.nonfinite_mismatch == 0 and self.max_abs_error <= atol + rtol * self.scale

    def __str__(self) -> str:
        head = f"{self.name or 'array'} {self.shape}: " if self.shape != () or self.name else ""
        text = (
            f"{head}max abs error {self.max_abs_error:.3e} at index {self.location} "
            f"(actual {self.actual!r}, reference {self.expected!r}); "
            f"relative {self.rel_error:.3e} of max|reference| = {self.scale:.3e}"
        )
        if self.nan_mismatch or self.inf_mismatch:
            text += f"; {self.nan_mismatch} NaN and {self.inf_mismatch} Inf mismatches"
        return text


def compare(
    actual: Any, reference: Any, *, name: str = "", scale: float | None = None
) -> Comparison:
    """The worst error of ``actual`` against ``reference``, where it is, and NaN/Inf mismatches.

    Parameters
    ----------
    actual : array_like or torch tensor
        The candidate's values.
    reference : array_like
        The reference values, same shape.
    name : str
        A label for the report ("out", "dq", ...).
    scale : float, optional
        What the relative error divides by; ``max|reference|`` when omitted. Pass the size of a
        related quantity when ``reference`` is 0 in exact arithmetic (e.g. ``max|dw_k|`` for
        ``db_k``), where round-off against round-off means nothing.

    Returns
    -------
    Comparison
        Non-finite entries are left out of the error and counted instead; ``str()`` of it is a
        one-line report.

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.testing import compare
    >>> c = compare(np.array([1.0, 2.0, np.nan]), np.array([1.0, 2.5, 3.0]), name="out")
    >>> c.max_abs_error, c.location, c.nan_mismatch
    (0.5, (1,), 1)
    >>> print(c)
    out (3,): max abs error 5.000e-01 at index (1,) (actual 2.0, reference 2.5); \
relative 2.000e-01 of max|reference| = 2.500e+00; 1 NaN and 0 Inf mismatches
    """
    a = to_numpy(actual)[0].astype(np.float64)
    e = to_numpy(reference)[0].astype(np.float64)
    if a.shape != e.shape:
        raise ValueError(
            f"{name or 'actual'} must have the reference's shape {e.shape}; got {a.shape}"
        )
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    inf_a, inf_e = np.isinf(a), np.isinf(e)
    finite = ~(nan_a | nan_e | inf_a | inf_e)
    nan_mismatch = int(np.count_nonzero(nan_a != nan_e))
    # No NaN on either side and an infinity on one: a mismatch unless both hold the same one.
    inf_mismatch = int(np.count_nonzero((inf_a | inf_e) & ~nan_a & ~nan_e & (a != e)))
    if a.size == 0:
        return Comparison(
            name, a.shape, 0.0, 0.0, 0.0, (), float("nan"), float("nan"), nan_mismatch, inf_mismatch
        )
    with np.errstate(invalid="ignore"):  # inf - inf where both sides hold the same infinity
        diff = np.where(finite, np.abs(a - e), 0.0)
    flat = int(np.argmax(diff))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    max_abs = float(diff.reshape(-1)[flat])
    if scale is None:
        scale = float(np.max(np.where(finite, np.abs(e), 0.0)))
    else:
        scale = float(scale)
    rel = 0.0 if max_abs == 0 else (max_abs / scale if scale > 0 else float("inf"))
    return Comparison(
        name,
        a.shape,
        max_abs,
        rel,
        scale,
        index,
        float(a[index]),
        float(e[index]),
        nan_mismatch,
        inf_mismatch,
    )


def assert_close(
    actual: Any,
    reference: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    precision: str | None = None,
    name: str = "",
) -> Comparison:
    """Raise ``AssertionError`` unless ``|actual - reference| <= atol + rtol * |reference|``.

    The rule holds element by element; NaN must face NaN and an infinity the same infinity. The
    message is the :class:`Comparison` report plus the rule, the count of entries that break it
    and the worst of them.

    Parameters
    ----------
    actual, reference
        As in :func:`compare`.
    rtol, atol : float, optional
        Default: :data:`DEFAULT_TOLERANCES` of ``precision``.
    precision : {"float64", "float32", "float16", "bfloat16"}, optional
        The candidate's precision; by default ``actual``'s own dtype.
    name : str
        Label for the message.

    Returns
    -------
    Comparison
        The report, when the assertion holds.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.testing import assert_close
    >>> _ = assert_close(np.float32([1.0, 2.0]), np.array([1.0, 2.0 + 1e-7]))
    >>> try:
    ...     assert_close(np.array([1.0, 2.0]), np.array([1.0, 2.1]), name="out")
    ... except AssertionError as err:
    ...     print(str(err).splitlines()[0])
    out (2,): max abs error 1.000e-01 at index (1,) (actual 2.0, reference 2.1); \
relative 4.762e-02 of max|reference| = 2.100e+00
    """
    a, own = to_numpy(actual)
    precision = check_precision(precision if precision is not None else (own or "float64"))
    tol = DEFAULT_TOLERANCES[precision]
    rtol = tol.rtol if rtol is None else float(rtol)
    atol = tol.atol if atol is None else float(atol)
    try:
        report = compare(a, reference, name=name)
    except ValueError as exc:
        raise AssertionError(str(exc)) from None
    e = to_numpy(reference)[0].astype(np.float64)
    a64 = a.astype(np.float64)
    with np.errstate(invalid="ignore"):
        excess = np.abs(a64 - e) - (atol + rtol * np.abs(e))
    finite = np.isfinite(a64) & np.isfinite(e)
    bad = finite & (excess > 0)
    if bad.any() or report.nonfinite_mismatch:
        source = "" if (rtol, atol) != (tol.rtol, tol.atol) else ": " + tol.source
        lines = [
            str(report),
            f"rule: |actual - reference| <= atol + rtol * |reference| with rtol = {rtol:g}, "
            f"atol = {atol:g} ({precision}{source})",
        ]
        if bad.any():
            flat = int(np.argmax(np.where(bad, excess, -np.inf)))
            i = tuple(int(j) for j in np.unravel_index(flat, e.shape))
            lines.append(
                f"{int(bad.sum())} of {e.size} entries break it; the furthest at index "
                f"{i}: actual {float(a64[i])!r}, reference {float(e[i])!r}, allowed "
                f"{atol + rtol * abs(float(e[i])):.3e}"
            )
        raise AssertionError("\n".join(lines))
    return report
