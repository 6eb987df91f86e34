r"""Finite-difference verification of hand-written backwards.

* :func:`numerical_vjp` -- central-difference vector-Jacobian product ``J^T c`` for any function
  of one array: two forward calls per input element.
* :func:`check_vjp` -- compares a backward's gradients with :func:`numerical_vjp`, input by input.
* :func:`check_directional` -- compares ``<J t, c>`` (one central difference along a random
  direction ``t``) with ``<t, J^T c>`` (from the backward): two forward calls per direction, so
  it works at sizes where a full numerical VJP is too slow.
* :func:`complex_step_vjp` and :func:`check_complex_step` -- the complex step
  ``Im f(x + i h t) / h``: a derivative with no subtraction, so no cancellation, exact to round-off
  (~1e-15 relative) where the finite difference gets ~1e-8. It needs a forward that is analytic
  and carries complex numbers; every forward of attention_ref is (complex inputs compute in
  complex128).
* :func:`error_report` -- the worst error of one array against another, and where it is: the
  comparison report of :func:`attention_ref.testing.compare`, :class:`ErrorReport` being another
  name for :class:`~attention_ref.testing.Comparison`.

All finite differences run in float64. Use a random cotangent ``c``: a cotangent that is constant
along a softmax row (all ones, or the gradient of ``.sum()``) has zero gradient through that
softmax, since its rows sum to 1, and a check then compares 0 with 0.
Derivation of the error bounds: ``docs/derivations/gradcheck.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from .compare import Comparison, compare

__all__ = [
    "CS_RTOL",
    "CS_STEP",
    "FD_EPS",
    "FD_NOISE_FACTOR",
    "FD_RTOL",
    "ErrorReport",
    "GradCheckResult",
    "check_complex_step",
    "check_directional",
    "check_vjp",
    "complex_step_vjp",
    "error_report",
    "fd_noise_floor",
    "numerical_vjp",
]

#: Default central-difference step. Truncation error is O(eps^2 |f'''|) ~ 1e-12 and round-off is
#: O(u |f| / eps) ~ 2e-10 for float64 (u = 2.2e-16) at unit-scale values, so round-off dominates;
#: the optimum, u^(1/3) ~ 6e-6, would gain less than a factor 10. Both stay far below FD_RTOL.
FD_EPS = 1e-6
#: Default pass threshold on the relative error of a finite-difference comparison: the FD error
#: above, summed over up to ~1e3 outputs, stays below ~2e-7 relative even with aligned signs;
#: a wrong backward is off by O(1).
FD_RTOL = 1e-6
#: Safety factor of the absolute noise floor. A central difference divides each output's round-off
#: by 2 eps, and the dot product with the cotangent adds it up, so
#: |<f(x+eps t) - f(x-eps t), c>| / (2 eps) is off by at most about u * ||f(x)|| * ||c|| / eps per
#: ulp of error in f (Cauchy-Schwarz, u = float64 epsilon). The bound is loose (it assumes every
#: rounding error aligned with c; the errors measured here are ~100x below it); the factor 10
#: covers outputs carrying a few ulps each.
#: The floor is what lets an exactly-zero gradient (a softmax over one key, the key projection's
#: bias b_k) pass, and it is far below the O(||grad||) error of a wrong backward.
FD_NOISE_FACTOR = 10.0
#: Default complex step h. The step's own error is O(h^2 |f'''|) ~ 1e-60 and it adds no round-off
#: (nothing is subtracted), so any h far below sqrt(u) works; 1e-30 keeps h * |x| well above the
#: smallest normal number (2.2e-308) for any sane x and far below every real part.
CS_STEP = 1e-30
#: Default pass threshold of the complex-step check, relative to the largest gradient of the check.
#: Both sides are exact up to round-off of a float64 forward or backward (a few ulps times the
#: condition of the sums involved, ~1e-15 measured); 1e-12 leaves 1000x room and is still ~1e6x
#: below the finite difference's threshold FD_RTOL.
CS_RTOL = 1e-12


def fd_noise_floor(f_value: ArrayLike, cotangent: ArrayLike, eps: float = FD_EPS) -> float:
    r"""Absolute round-off bound of a central-difference VJP entry: ``10 u ||f|| ||c|| / eps``,
    (G3).

    Parameters
    ----------
    f_value : array_like
        ``f(x)``, the function's value at the point.
    cotangent : array_like
        The cotangent ``c`` of the check.
    eps : float
        The central-difference step.

    Returns
    -------
    float
        The default ``atol`` of :func:`check_vjp` and :func:`check_directional`.

    Raises
    ------
    ValueError
        If the bound is not finite (an output holding inf, NaN or ~1e308 fills): an infinite
        ``atol`` would let any gradient pass, so the caller must choose one.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.gradcheck import fd_noise_floor
    >>> f_value, c = np.ones(100), np.ones(100)          # ||f|| = ||c|| = 10
    >>> f"{fd_noise_floor(f_value, c, eps=1e-6):.2e}"    # 10 * 2.2e-16 * 100 / 1e-6
    '2.22e-07'
    """
    u = np.finfo(np.float64).eps
    with np.errstate(over="ignore"):
        floor = float(FD_NOISE_FACTOR * u * _norm(f_value) * _norm(cotangent) / eps)
    if not np.isfinite(floor):
        # An infinite atol would pass any gradient: refuse instead.
        raise ValueError(
            "no finite round-off bound: f's value or the cotangent holds non-finite or huge "
            "entries (e.g. a masked-score fill of -1.8e308); pass atol explicitly"
        )
    return floor


def _norm(x: ArrayLike) -> float:
    """Euclidean norm, scaled by the largest magnitude so large finite entries do not overflow
    early."""
    a = np.abs(np.ravel(np.asarray(x, dtype=np.float64)))
    if a.size == 0:
        return 0.0
    top = float(a.max())
    if top == 0 or not np.isfinite(top):
        return top
    return top * float(np.linalg.norm(a / top))


#: The report of :func:`error_report`: another name for :class:`attention_ref.testing.Comparison`
#: (the one comparison report of attention_ref, defined in ``attention_ref.oracle.compare``),
#: kept so that code written against attention_ref 0.1 keeps working. Its ``name`` is ``""``;
#: ``passed(rtol, atol)`` is the pass rule of every gradient check.
ErrorReport = Comparison


def error_report(
    actual: ArrayLike, expected: ArrayLike, *, scale: float | None = None
) -> Comparison:
    r"""The worst error of ``actual`` against ``expected``, and where it is.

    The same report as :func:`attention_ref.testing.compare`, for arrays NumPy converts to
    float64.

    Parameters
    ----------
    actual, expected : array_like, same shape
    scale : float, optional
        What ``rel_error`` divides by; ``max|expected|`` when omitted. Pass the size of a related
        quantity when ``expected`` is 0 in exact arithmetic (e.g. ``max|dw_k|`` for ``db_k``),
        where round-off against round-off means nothing.

    Returns
    -------
    Comparison
        Max absolute error, relative error ``max|a - e| / max|e|``, the location of the worst
        element and both values there, and the counts of NaN and Inf mismatches (entries where
        the two sides are not both finite and not identical; ``nonfinite_mismatch`` is their
        sum). Non-finite entries are left out of the error, and counted instead.
        ``passed(rtol, atol)`` is ``max_abs_error <= atol + rtol * scale`` with no mismatch.

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> from attention_ref.gradcheck import error_report
    >>> r = error_report([1.0, 2.0, 4.0], [1.0, 2.0, 4.4])
    >>> round(r.rel_error, 6), r.location
    (0.090909, (2,))
    >>> r.passed(rtol=0.1), r.passed(rtol=0.01)
    (True, False)
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"actual and expected must have one shape; got {a.shape} and {e.shape}")
    return compare(a, e, scale=scale)


def _summary(r: Comparison) -> str:
    """One gradient's line in :class:`GradCheckResult`'s table: relative error first."""
    return (
        f"rel {r.rel_error:.2e} (abs {r.max_abs_error:.2e}, scale {r.scale:.2e}) "
        f"at {r.location}: actual {r.actual!r} vs expected {r.expected!r}"
        + (f"; {r.nonfinite_mismatch} NaN/inf mismatches" if r.nonfinite_mismatch else "")
    )


def numerical_vjp(
    f: Callable[[np.ndarray], ArrayLike], x: ArrayLike, cotangent: ArrayLike, *, eps: float = FD_EPS
) -> np.ndarray:
    r"""Central-difference vector-Jacobian product :math:`J^\top c` of ``f`` at ``x``.

    .. math::
        (J^\top c)_i \approx
        \Big\langle \frac{f(x + \epsilon e_i) - f(x - \epsilon e_i)}{2\epsilon},\ c \Big\rangle
        \qquad \text{(G1)}

    Parameters
    ----------
    f : callable
        A function of one array returning an array of ``cotangent``'s shape. Close over the
        other arguments (``lambda q: attention(q, k, v)``) to differentiate any input.
    x : array_like
        The point; copied to float64, never modified.
    cotangent : array_like
        ``c``, the upstream gradient. Use a random one.
    eps : float
        Step.

    Returns
    -------
    ndarray, shape of ``x``, float64

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.gradcheck import numerical_vjp
    >>> g = numerical_vjp(lambda x: x ** 3, np.array([1.0, 2.0]), np.array([1.0, -1.0]))
    >>> np.allclose(g, [3.0, -12.0])
    True
    """
    x = np.array(x, dtype=np.float64, copy=True)  # ours to perturb
    c = np.asarray(cotangent, dtype=np.float64)
    grad = np.empty_like(x)
    flat_x, flat_g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat_x.size):
        orig = flat_x[i]
        flat_x[i] = orig + eps
        f_plus = np.asarray(f(x), dtype=np.float64)
        flat_x[i] = orig - eps
        f_minus = np.asarray(f(x), dtype=np.float64)
        flat_x[i] = orig
        if f_plus.shape != c.shape:
            raise ValueError(f"f(x) must have cotangent's shape {c.shape}; got {f_plus.shape}")
        flat_g[i] = np.sum((f_plus - f_minus) * c) / (2 * eps)  # (G1)
    return grad


def _imag_part(value: Any, expected_shape: tuple[int, ...] | None) -> np.ndarray:
    """``Im f``, refusing a real result: that forward dropped the imaginary part (not
    complex-safe)."""
    arr = np.asarray(value)
    if arr.dtype.kind != "c":
        raise ValueError(
            "f returned a real array for a complex input: it is not complex-safe (it dropped the "
            "imaginary part), so the complex step cannot differentiate it; use numerical_vjp"
        )
    if expected_shape is not None and arr.shape != expected_shape:
        raise ValueError(f"f(x) must have cotangent's shape {expected_shape}; got {arr.shape}")
    return arr.imag.astype(np.float64, copy=False)


def complex_step_vjp(
    f: Callable[[np.ndarray], ArrayLike], x: ArrayLike, cotangent: ArrayLike, *, h: float = CS_STEP
) -> np.ndarray:
    r"""Complex-step vector-Jacobian product :math:`J^\top c` of ``f`` at ``x``, exact to round-off.

    .. math::
        (J^\top c)_i = \Big\langle \frac{\operatorname{Im} f(x + i h e_i)}{h},\ c \Big\rangle
        + O(h^2) \qquad \text{(G4)}

    No difference of two nearby values is taken, so there is no cancellation and ``h`` can be
    tiny (1e-30): the result is as accurate as ``f`` itself, ~1e-15 relative, where a central
    difference is limited to ~1e-8 (``docs/derivations/gradcheck.md``).

    Parameters
    ----------
    f : callable
        A function of one array, **complex-safe**: analytic in ``x`` (no ``abs``, no comparison
        that changes with ``x``'s imaginary part, no cast to real). Every forward of
        attention_ref qualifies: complex inputs compute in complex128.
    x : array_like
        The real point; never modified.
    cotangent : array_like
        ``c``, real, of ``f(x)``'s shape. Use a random one.
    h : float, default :data:`CS_STEP`
        The imaginary step.

    Returns
    -------
    ndarray, shape of ``x``, float64

    Raises
    ------
    ValueError
        If ``f`` returns a real array for a complex input (it is not complex-safe).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.gradcheck import complex_step_vjp
    >>> g = complex_step_vjp(lambda x: x ** 3, np.array([1.0, 2.0]), np.array([1.0, -1.0]))
    >>> g.tolist()                                   # 3 x^2 c, to the last bit
    [3.0, -12.0]
    """
    x = np.array(x, dtype=np.float64, copy=True)
    c = np.asarray(cotangent, dtype=np.float64)
    xc = x.astype(np.complex128)  # ours to perturb
    grad = np.empty_like(x)
    flat_xc, flat_g = xc.reshape(-1), grad.reshape(-1)
    for i in range(flat_xc.size):
        flat_xc[i] = complex(flat_xc[i].real, h)
        im = _imag_part(f(xc), c.shape)
        flat_xc[i] = complex(flat_xc[i].real, 0.0)
        flat_g[i] = np.sum(im * c) / h  # (G4)
    return grad


class GradCheckResult(NamedTuple):
    """Per-input comparison of a backward with finite differences."""

    reports: dict[str, Comparison]  #: input name -> worst error of its gradient
    rtol: float  #: relative pass threshold
    atol: float  #: absolute pass threshold (by default the round-off bound, (G3))

    @property
    def passed(self) -> bool:
        """Every input's gradient passes: ``max|analytic - numerical| <= atol + rtol * scale``."""
        return all(r.passed(self.rtol, self.atol) for r in self.reports.values())

    @property
    def worst(self) -> tuple[str, Comparison]:
        """The input with the largest relative error, and its report."""
        return max(self.reports.items(), key=lambda kv: kv[1].rel_error)

    def __str__(self) -> str:
        lines = []
        for name, r in self.reports.items():
            verdict = "ok  " if r.passed(self.rtol, self.atol) else "FAIL"
            if (
                r.scale <= self.atol
            ):  # the gradient is 0 within round-off: only the absolute error means anything
                lines.append(
                    f"{verdict} d{name}: gradient is 0 within round-off (atol {self.atol:.1e}); "
                    f"abs error {r.max_abs_error:.2e} at {r.location}"
                )
            else:
                lines.append(f"{verdict} d{name}: {_summary(r)}")
        return "\n".join(lines)


def _as_inputs(inputs: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(
            f"inputs must be a non-empty mapping of name -> array; got {type(inputs).__name__}"
        )
    return {name: np.array(x, dtype=np.float64, copy=True) for name, x in inputs.items()}


def _check_grads(inputs, grads, names):
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"wrt names {missing} are not among inputs {list(inputs)}")
    out = {}
    for n in names:
        if n not in grads or grads[n] is None:
            raise ValueError(f"grads must hold a gradient for {n!r}; got keys {list(grads)}")
        g = np.asarray(grads[n], dtype=np.float64)
        if g.shape != inputs[n].shape:
            raise ValueError(
                f"grads[{n!r}] must have the input's shape {inputs[n].shape}; got {g.shape}"
            )
        out[n] = g
    return out


def check_vjp(
    f: Callable[..., ArrayLike],
    inputs: Mapping[str, ArrayLike],
    cotangent: ArrayLike,
    grads: Mapping[str, ArrayLike | None],
    *,
    wrt: tuple[str, ...] | None = None,
    eps: float = FD_EPS,
    rtol: float = FD_RTOL,
    atol: float | None = None,
) -> GradCheckResult:
    r"""Compare hand-written gradients with a full central-difference VJP, input by input.

    Parameters
    ----------
    f : callable
        ``f(**inputs)`` returns an array of ``cotangent``'s shape.
    inputs : mapping of str to array_like
        The point, by keyword name.
    cotangent : array_like
        The random upstream gradient the backward was given.
    grads : mapping of str to array_like
        The backward's gradient for each name in ``wrt``.
    wrt : tuple of str, optional
        Inputs to check; all of ``inputs`` when omitted.
    eps, rtol : float
        Step and relative pass threshold (see :data:`FD_EPS`, :data:`FD_RTOL`).
    atol : float, optional
        Absolute pass threshold; by default the round-off bound :func:`fd_noise_floor` of
        ``f(**inputs)`` and ``cotangent``. A gradient passes when
        ``max|analytic - numerical| <= atol + rtol * max|numerical|``.

    Returns
    -------
    GradCheckResult
        ``.passed``, ``.worst`` and a report per input; ``str()`` prints a table.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import softmax, softmax_backward
    >>> from attention_ref.gradcheck import check_vjp
    >>> rng = np.random.default_rng(0)
    >>> x, c = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    >>> check_vjp(softmax, {"x": x}, c, {"x": softmax_backward(c, softmax(x))}).passed
    True
    """
    xs = _as_inputs(inputs)
    names = tuple(xs) if wrt is None else tuple(wrt)
    gs = _check_grads(xs, grads, names)
    if atol is None:
        atol = fd_noise_floor(f(**xs), cotangent, eps)  # (G3)
    reports = {}
    for n in names:

        def f_of(x, n=n):
            return f(**{**xs, n: x})

        reports[n] = error_report(gs[n], numerical_vjp(f_of, xs[n], cotangent, eps=eps))
    return GradCheckResult(reports, rtol, atol)


def check_directional(
    f: Callable[..., ArrayLike],
    inputs: Mapping[str, ArrayLike],
    cotangent: ArrayLike,
    grads: Mapping[str, ArrayLike | None],
    *,
    rng: np.random.Generator,
    num_directions: int = 3,
    wrt: tuple[str, ...] | None = None,
    eps: float = FD_EPS,
    rtol: float = FD_RTOL,
    atol: float | None = None,
) -> GradCheckResult:
    r"""Compare :math:`\langle J t, c\rangle` with :math:`\langle t, J^\top c\rangle` along random
    directions.

    .. math::
        \Big\langle \frac{f(x + \epsilon t) - f(x - \epsilon t)}{2\epsilon},\ c \Big\rangle
        \approx \langle t,\ \text{grad} \rangle \qquad \text{(G2)}

    Two forward calls per direction and input, whatever the size of ``x``. Each input is
    perturbed alone, so a failure names the input whose gradient is wrong.

    Parameters
    ----------
    f, inputs, cotangent, grads, wrt, eps, rtol, atol
        As in :func:`check_vjp`.
    rng : numpy.random.Generator
        Draws the unit-norm directions ``t``.
    num_directions : int, default 3
        Directions per input.

    Returns
    -------
    GradCheckResult
        Per input, a :class:`~attention_ref.testing.Comparison` over its directions: ``actual`` is
        :math:`\langle t, \text{grad}\rangle`, ``expected`` the finite difference, and
        ``location`` the worst direction.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import softmax, softmax_backward
    >>> from attention_ref.gradcheck import check_directional
    >>> rng = np.random.default_rng(0)
    >>> x, c = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    >>> r = check_directional(softmax, {"x": x}, c, {"x": softmax_backward(c, softmax(x))}, rng=rng)
    >>> r.passed
    True
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    xs = _as_inputs(inputs)
    names = tuple(xs) if wrt is None else tuple(wrt)
    gs = _check_grads(xs, grads, names)
    c = np.asarray(cotangent, dtype=np.float64)
    if atol is None:
        atol = fd_noise_floor(f(**xs), c, eps)  # (G3)
    reports = {}
    for n in names:
        analytic, numeric = [], []
        for _ in range(num_directions):
            t = rng.normal(size=xs[n].shape)
            t /= np.linalg.norm(t) or 1.0
            f_plus = np.asarray(f(**{**xs, n: xs[n] + eps * t}), dtype=np.float64)
            f_minus = np.asarray(f(**{**xs, n: xs[n] - eps * t}), dtype=np.float64)
            if f_plus.shape != c.shape:
                raise ValueError(
                    f"f(...) must have cotangent's shape {c.shape}; got {f_plus.shape}"
                )
            numeric.append(np.sum((f_plus - f_minus) * c) / (2 * eps))  # <J t, c>   (G2)
            analytic.append(np.sum(t * gs[n]))  # <t, J^T c>
        reports[n] = error_report(np.array(analytic), np.array(numeric))
    return GradCheckResult(reports, rtol, atol)


def _complex_step_directions(f, xs, n, c, grad, h, num_directions: int, rng: np.random.Generator):
    """``(<t, grad>, <Im f(x + i h t) / h, c>)`` over random unit directions ``t`` of input ``n``,
    (G5)."""
    analytic, numeric = [], []
    for _ in range(num_directions):
        t = rng.normal(size=xs[n].shape)
        t /= np.linalg.norm(t) or 1.0
        im = _imag_part(f(**{**xs, n: xs[n] + 1j * h * t}), c.shape)
        numeric.append(np.sum(im * c) / h)  # <J t, c>   (G5)
        analytic.append(np.sum(t * grad))  # <t, J^T c>
    return np.array(analytic), np.array(numeric)


def check_complex_step(
    f: Callable[..., ArrayLike],
    inputs: Mapping[str, ArrayLike],
    cotangent: ArrayLike,
    grads: Mapping[str, ArrayLike | None],
    *,
    wrt: tuple[str, ...] | None = None,
    h: float = CS_STEP,
    rtol: float = CS_RTOL,
    atol: float | None = None,
    num_directions: int | None = None,
    rng: np.random.Generator | None = None,
) -> GradCheckResult:
    r"""Compare hand-written gradients with the complex step, input by input, to ~1e-15.

    With ``num_directions=None`` every element gets its own step, (G4): one complex forward per
    element. With ``num_directions=n`` each input is checked along ``n`` random unit directions
    ``t``, one complex forward per direction whatever the size of ``x``:

    .. math::
        \Big\langle \frac{\operatorname{Im} f(x + i h t)}{h},\ c \Big\rangle
        = \langle t,\ J^\top c\rangle + O(h^2) \qquad \text{(G5)}

    Parameters
    ----------
    f : callable
        ``f(**inputs)``, complex-safe (see :func:`complex_step_vjp`).
    inputs, cotangent, grads, wrt
        As in :func:`check_vjp`.
    h : float, default :data:`CS_STEP`
        The imaginary step.
    rtol : float, default :data:`CS_RTOL`
        A gradient passes when ``max|analytic - complex step| <= atol + rtol * max|complex step|``.
    atol : float, optional
        By default ``rtol`` times the largest complex-step gradient entry of the whole check, (G6):
        round-off scales with the function's intermediates, not with one gradient, so an input
        whose true gradient is 0 (the key projection's bias) is judged on that scale.
    num_directions : int, optional
        Directional mode, (G5); needs ``rng``.
    rng : numpy.random.Generator, optional
        Draws the directions.

    Returns
    -------
    GradCheckResult

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention, sdpa_forward, sdpa_backward
    >>> from attention_ref.gradcheck import check_complex_step
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 6))
    >>> tr = sdpa_forward(q, k, v, causal=True)
    >>> c = rng.normal(size=tr.out.shape)
    >>> g = sdpa_backward(c, tr)
    >>> r = check_complex_step(lambda q, k, v: scaled_dot_product_attention(q, k, v, causal=True),
    ...                        {"q": q, "k": k, "v": v}, c, {"q": g.dq, "k": g.dk, "v": g.dv})
    >>> r.passed, r.worst[1].rel_error < 1e-13
    (True, True)
    """
    xs = _as_inputs(inputs)
    names = tuple(xs) if wrt is None else tuple(wrt)
    gs = _check_grads(xs, grads, names)
    c = np.asarray(cotangent, dtype=np.float64)
    if num_directions is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"num_directions needs rng, a numpy.random.Generator; got {type(rng).__name__}"
        )
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (analytic, complex step)
    for n in names:
        if num_directions is None or rng is None:

            def f_of(x, n=n):
                return f(**{**xs, n: x})

            pairs[n] = (gs[n], complex_step_vjp(f_of, xs[n], c, h=h))  # (G4)
        else:
            pairs[n] = _complex_step_directions(f, xs, n, c, gs[n], h, num_directions, rng)  # (G5)
    if atol is None:
        atol = rtol * max(float(np.max(np.abs(e), initial=0.0)) for _, e in pairs.values())  # (G6)
    reports = {n: error_report(a, e) for n, (a, e) in pairs.items()}
    return GradCheckResult(reports, rtol, atol)
