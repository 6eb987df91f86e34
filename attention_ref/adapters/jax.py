r"""JAX adapters: the ``(B, T, H, Dk)`` layout, the option mapping, and runners.

* Layout: ``jax.nn.dot_product_attention`` takes ``(B, T, H, Dk)``, the reference
  ``(B, H, T, Dk)``: :func:`bthd_from_bhtd` and :func:`bhtd_from_bthd` convert (they swap the
  head and position axes, for queries, keys, values and outputs alike).
* Options: :func:`jax_dpa_kwargs` maps the reference's options to ``jax.nn.dot_product_attention``'s
  keyword arguments; :func:`options_from_jax_kwargs` maps a JAX call's arguments (sequence
  lengths included) back to the reference's options; :func:`mask_from_seq_lengths` builds the
  mask that ``query_seq_lengths`` / ``key_value_seq_lengths`` stand for. What JAX cannot express
  raises :class:`~attention_ref.adapters.UnsupportedOption`.
* Runners: :func:`run_jax_sdpa` (``jax.nn.dot_product_attention``) and :func:`run_jax_mha`
  (projections as ``jnp`` matmuls around ``jax.nn.dot_product_attention``: JAX itself has no
  multi-head attention module) return the output and, through ``jax.vjp``, the gradients, as
  NumPy arrays in the types the reference's backwards return.

Precision: the runners jit their call and compute in float64 inside ``jax.enable_x64(True)``, a
context manager that switches 64-bit types on for the calls it encloses and restores the
caller's setting on exit (``jax.config.jax_enable_x64`` is never changed for good). Even so,
``jax.nn.dot_product_attention`` casts the masked logits to float32 for its softmax and the
weights back (``JAX_SOFTMAX_DTYPE``): its results carry float32 round-off, and a comparison with
the reference is an error-budget comparison (see ``docs/adapters.md``), not a 1e-12 one.

Importing this module does not import jax. Behaviour measured with jax 0.10.2 (CPU, the XLA
implementation): ``docs/adapters.md``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..core._validate import as_float, check_positive_int
from ..core.attention import AttentionGrads
from ..core.masks import attention_mask, causal_mask, window_mask
from ..core.mha import MultiHeadGrads, MultiHeadParams
from ..core.options import AttentionOptions
from . import (
    FrameworkRun,
    UnsupportedOption,
    _bool_array,
    _check_full_shape,
    _dtype,
    _head_arrays,
    _numpy,
    _prepare,
)

__all__ = [
    "JAX_VERSION_CHECKED",
    "JAX_EMPTY_ROWS",
    "JAX_QUERY_PADDING_ROWS",
    "JAX_ALIGN",
    "JAX_SOFTMAX_DTYPE",
    "bthd_from_bhtd",
    "bhtd_from_bthd",
    "mask_from_seq_lengths",
    "jax_dpa_kwargs",
    "options_from_jax_kwargs",
    "run_jax_sdpa",
    "run_jax_mha",
]

#: The jax version whose behaviour the constants below and ``docs/adapters.md`` record.
JAX_VERSION_CHECKED = "0.10.2"
#: What ``jax.nn.dot_product_attention`` (XLA implementation) gives a query row with no key to
#: attend, as an ``empty_rows`` policy: every masked logit becomes the same finite
#: ``-0.7 * finfo(float32).max``, so the row's softmax is flat, weights ``1/S`` over all S keys
#: and the output the mean of v. The gradient reaches v only, as under the reference's
#: ``"uniform"``. Measured with jax 0.10.2.
JAX_EMPTY_ROWS = "uniform"
#: What it gives the query rows beyond ``query_seq_lengths``: their output is multiplied by 0
#: after the attention, so those rows are 0 and pass no gradient (the reference's ``"zero"``).
JAX_QUERY_PADDING_ROWS = "zero"
#: Alignment of ``is_causal`` and ``local_window_size`` when T != S: ``tril(ones(T, S))`` and
#: ``i - left <= j <= i + right``, both anchored at the top-left corner.
JAX_ALIGN = "top_left"
#: The dtype of its softmax whatever the input dtype: float64 logits (scores, bias, mask fill)
#: are cast to float32, the softmax taken, and the weights cast back before ``@ v``.
JAX_SOFTMAX_DTYPE = "float32"

_DPA = "jax.nn.dot_product_attention"


def _jax() -> Any:
    """The jax module, imported on first use; ImportError says what to install."""
    try:
        jax = importlib.import_module("jax")
        importlib.import_module("jax.numpy")
    except ImportError as exc:
        raise ImportError(
            "this function of attention_ref.adapters.jax needs JAX, which is not installed: "
            "pip install jax (the CPU build is enough)"
        ) from exc
    return jax


def _x64(jax: Any) -> Any:
    """A context manager enabling 64-bit types for its block only (the caller's setting is
    restored)."""
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is not None:
        return enable_x64(True)
    return importlib.import_module("jax.experimental").enable_x64()  # older jax


def _own(x: Any) -> np.ndarray:
    """A JAX array's values as a NumPy array of its own (writeable)."""
    return np.array(x, copy=True)


_STATIC = ("scale", "is_causal", "local_window_size", "implementation")


@functools.lru_cache(maxsize=None)
def _compiled() -> dict[str, Any]:
    """The runners' jitted functions, built once; jit then compiles once per shapes and options.

    A forward and a forward-with-VJP for attention and for multi-head attention. Each takes a
    dict of arrays (its differentiable inputs), the boolean mask (or None) and, for the VJP, the
    cotangent; the options of :func:`jax_dpa_kwargs` are static arguments.
    """
    jax = _jax()

    def sdpa(
        a: dict[str, Any],
        mask: Any,
        scale: Any,
        is_causal: bool,
        local_window_size: Any,
        implementation: str,
    ) -> Any:
        return jax.nn.dot_product_attention(  # (B, T, H, Dv)
            a["q"],
            a["k"],
            a["v"],
            bias=a.get("bias"),
            mask=mask,
            scale=scale,
            is_causal=is_causal,
            local_window_size=local_window_size,
            implementation=implementation,
        )

    def mha(
        a: dict[str, Any],
        mask: Any,
        scale: Any,
        is_causal: bool,
        local_window_size: Any,
        implementation: str,
        num_heads: int,
        num_kv_heads: int,
    ) -> Any:
        B, T, _ = a["query"].shape
        S = a["key"].shape[1]
        Dk, Dv = a["w_q"].shape[1] // num_heads, a["w_v"].shape[1] // num_kv_heads

        def project(x: Any, w: str, b: str) -> Any:
            y = x @ a[w]  # (B, n, in) @ (in, out) -> (B, n, out)
            return y + a[b] if b in a else y

        q = project(a["query"], "w_q", "b_q").reshape(
            B, T, num_heads, Dk
        )  # (M1) in JAX's layout (B, T, H, Dk)
        k = project(a["key"], "w_k", "b_k").reshape(B, S, num_kv_heads, Dk)  # (M2) (B, S, Hkv, Dk)
        v = project(a["value"], "w_v", "b_v").reshape(
            B, S, num_kv_heads, Dv
        )  # (M3) (B, S, Hkv, Dv)
        context = sdpa(
            {"q": q, "k": k, "v": v, **({"bias": a["bias"]} if "bias" in a else {})},
            mask,
            scale,
            is_causal,
            local_window_size,
            implementation,
        )  # (B, T, H, Dv)   (M4)
        return project(
            context.reshape(B, T, num_heads * Dv), "w_o", "b_o"
        )  # (M5), (M6): (B, T, H*Dv) -> (B, T, D_out)

    def with_vjp(f: Any) -> Any:
        def f_vjp(a: dict[str, Any], mask: Any, cotangent: Any, **static: Any) -> Any:
            out, vjp = jax.vjp(lambda a: f(a, mask, **static), a)
            return out, vjp(cotangent)[0]

        return f_vjp

    mha_static = _STATIC + ("num_heads", "num_kv_heads")
    return {
        "sdpa": jax.jit(sdpa, static_argnames=_STATIC),
        "sdpa_vjp": jax.jit(with_vjp(sdpa), static_argnames=_STATIC),
        "mha": jax.jit(mha, static_argnames=mha_static),
        "mha_vjp": jax.jit(with_vjp(mha), static_argnames=mha_static),
    }


def _call(
    jax: Any,
    name: str,
    arrays: dict[str, np.ndarray],
    kwargs: dict[str, Any],
    cotangent: np.ndarray | None,
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """Run a compiled function inside ``enable_x64``; NumPy copies of the output and the
    gradients."""
    static = {n: v for n, v in kwargs.items() if n not in ("mask", "bias")}
    with _x64(jax):
        jnp = jax.numpy
        leaves = {n: jnp.asarray(a) for n, a in arrays.items()}
        mask = None if kwargs["mask"] is None else jnp.asarray(kwargs["mask"])
        if cotangent is None:
            return _own(_compiled()[name](leaves, mask, **static)), None
        out, grads = _compiled()[name + "_vjp"](leaves, mask, jnp.asarray(cotangent), **static)
        return _own(out), {n: _own(g) for n, g in grads.items()}


# ---------------------------------------------------------------------------------------------
# Layout and sequence lengths
# ---------------------------------------------------------------------------------------------


def bthd_from_bhtd(x: ArrayLike) -> np.ndarray:
    r"""The reference's head layout ``(..., H, T, D)`` as JAX's ``(..., T, H, D)``.

    Parameters
    ----------
    x : array_like, shape (..., H, T, D)
        Queries, keys (H = Hkv, T = S), values or outputs; D is Dk or Dv.

    Returns
    -------
    ndarray, shape (..., T, H, D)
        A C-contiguous copy, of ``x``'s dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.adapters.jax import bthd_from_bhtd, bhtd_from_bthd
    >>> q = np.arange(2 * 4 * 3 * 5).reshape(2, 4, 3, 5)       # (B, H, T, Dk)
    >>> bthd_from_bhtd(q).shape
    (2, 3, 4, 5)
    >>> bool((bthd_from_bhtd(q)[1, 2, 3] == q[1, 3, 2]).all())   # [b, t, h] == [b, h, t]
    True
    >>> bool((bhtd_from_bthd(bthd_from_bhtd(q)) == q).all())
    True
    """
    arr = np.asarray(x)
    if arr.ndim < 3:
        raise ValueError(
            f"x must have shape (..., H, T, D) (3 or more dims); got shape {arr.shape}"
        )
    return arr.swapaxes(-3, -2).copy()  # (..., H, T, D) -> (..., T, H, D)


def bhtd_from_bthd(x: ArrayLike) -> np.ndarray:
    r"""JAX's head layout ``(..., T, H, D)`` as the reference's ``(..., H, T, D)``.

    Parameters
    ----------
    x : array_like, shape (..., T, H, D)

    Returns
    -------
    ndarray, shape (..., H, T, D)
        A C-contiguous copy, of ``x``'s dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.adapters.jax import bhtd_from_bthd
    >>> bhtd_from_bthd(np.zeros((2, 3, 4, 5))).shape            # (B, T, H, Dk) -> (B, H, T, Dk)
    (2, 4, 3, 5)
    """
    arr = np.asarray(x)
    if arr.ndim < 3:
        raise ValueError(
            f"x must have shape (..., T, H, D) (3 or more dims); got shape {arr.shape}"
        )
    return arr.swapaxes(-3, -2).copy()  # (..., T, H, D) -> (..., H, T, D)


def _lengths(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(_numpy(x))
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise TypeError(
            f"{name} must be a 1-D integer array of shape (B,); got dtype {arr.dtype}, shape "
            f"{arr.shape}"
        )
    return arr


def mask_from_seq_lengths(
    T: int,
    S: int,
    *,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
) -> np.ndarray:
    r"""The boolean mask that JAX's ``query_seq_lengths`` / ``key_value_seq_lengths`` stand for.

    Query ``i`` of batch element ``b`` may attend key ``j`` when ``i < query_seq_lengths[b]``
    and ``j < key_value_seq_lengths[b]``.

    Parameters
    ----------
    T, S : int
        Query and key lengths.
    query_seq_lengths, key_value_seq_lengths : array_like of int, shape (B,), optional
        At least one of them.

    Returns
    -------
    mask : ndarray of bool, shape (B, 1, T, S)
        True = may attend.

    Notes
    -----
    JAX does more than mask the rows beyond ``query_seq_lengths``: it sets their output to 0
    (``JAX_QUERY_PADDING_ROWS``), where a masked row would otherwise get uniform weights
    (``JAX_EMPTY_ROWS``). :func:`options_from_jax_kwargs` picks the ``empty_rows`` that matches.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.adapters.jax import mask_from_seq_lengths
    >>> m = mask_from_seq_lengths(
    ...     3, 4, query_seq_lengths=np.array([2]), key_value_seq_lengths=np.array([3])
    ... )
    >>> m.shape
    (1, 1, 3, 4)
    >>> m[0, 0].astype(int)
    array([[1, 1, 1, 0],
           [1, 1, 1, 0],
           [0, 0, 0, 0]])
    """
    T = check_positive_int("T", T)
    S = check_positive_int("S", S)
    if query_seq_lengths is None and key_value_seq_lengths is None:
        raise ValueError(
            "mask_from_seq_lengths needs query_seq_lengths, key_value_seq_lengths or both; got "
            "neither"
        )
    ql = None if query_seq_lengths is None else _lengths("query_seq_lengths", query_seq_lengths)
    kl = (
        None
        if key_value_seq_lengths is None
        else _lengths("key_value_seq_lengths", key_value_seq_lengths)
    )
    if ql is not None and kl is not None and ql.shape != kl.shape:
        raise ValueError(
            f"query_seq_lengths and key_value_seq_lengths must have the same shape (B,); got "
            f"{ql.shape} and {kl.shape}"
        )
    B = [x for x in (ql, kl) if x is not None][0].shape[0]
    allowed = np.ones((B, T, S), dtype=bool)
    if ql is not None:
        allowed &= (
            np.arange(T)[None, :, None] < ql[:, None, None]
        )  # (B, T, 1): query i < its length
    if kl is not None:
        allowed &= np.arange(S)[None, None, :] < kl[:, None, None]  # (B, 1, S): key j < its length
    return allowed[:, None, :, :]  # (B, T, S) -> (B, 1, T, S)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def _four_d(name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` with leading 1s up to 4 dims, as JAX wants masks and biases."""
    if arr.ndim > 4:
        raise UnsupportedOption(
            name, _DPA, f"it takes 4-D (B, H, T, S) masks and biases; got shape {arr.shape}"
        )
    return arr.reshape((1,) * (4 - arr.ndim) + arr.shape)


def jax_dpa_kwargs(
    T: int,
    S: int,
    *,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    r"""The keyword arguments of ``jax.nn.dot_product_attention`` for the reference's options.

    ``jax.nn.dot_product_attention(bthd_from_bhtd(q), bthd_from_bhtd(k), bthd_from_bhtd(v),
    **jax_dpa_kwargs(T, S, **options))`` computes ``scaled_dot_product_attention(q, k, v,
    **options)`` in the ``(B, T, H, Dv)`` layout, up to JAX's float32 softmax:

    =================================================  =========================================
    reference                                          jax
    =================================================  =========================================
    ``mask`` (True = may attend)                       ``mask``, 4-D
    ``bias``                                           ``bias``, 4-D; its ``-inf`` entries move
                                                       into ``mask`` (a row of ``-inf`` would be
                                                       NaN in JAX's softmax)
    ``causal``, ``top_left`` (or T = S)                ``is_causal=True``
    ``window=(l, r)``, ``top_left`` (or T = S)         ``local_window_size=(l, r)``; a None side
                                                       becomes ``max(T, S)`` (unbounded)
    ``causal``/``window``, ``bottom_right``, T != S    folded into ``mask``
    ``scale``                                          ``scale``
    =================================================  =========================================

    and ``implementation="xla"``, the implementation whose semantics were measured.

    Parameters
    ----------
    T, S : int
        Query and key lengths.
    options, **kwargs
        The attention options (an AttentionOptions and/or its fields by name: mask, bias,
        causal, align, window, softcap, scale, dropout_p, dropout_mask, empty_rows, dtype),
        as for :func:`~attention_ref.scaled_dot_product_attention`; ``mask`` and ``bias`` of
        at most 4 dims, broadcastable to (B, H, T, S).

    Returns
    -------
    dict
        ``bias`` (float64, 4-D, or None), ``mask`` (bool, 4-D, or None), ``scale``,
        ``is_causal``, ``local_window_size`` and ``implementation``; NumPy arrays, which JAX
        accepts.

    Raises
    ------
    UnsupportedOption
        For ``softcap``; ``dropout_p > 0`` (JAX's function has no dropout); an ``empty_rows``
        other than ``"uniform"`` (``JAX_EMPTY_ROWS``) when some query row has no key to attend;
        masks or biases of more than 4 dims.

    Examples
    --------
    >>> from attention_ref.adapters.jax import jax_dpa_kwargs
    >>> kw = jax_dpa_kwargs(3, 5, causal=True, window=(2, None))
    >>> kw["is_causal"], kw["local_window_size"], kw["mask"]
    (True, (2, 5), None)
    >>> kw = jax_dpa_kwargs(2, 3, causal=True, align="bottom_right")   # no JAX argument for it
    >>> kw["is_causal"], kw["mask"].shape, kw["mask"][0, 0].astype(int).tolist()
    (False, (1, 1, 2, 3), [[1, 1, 0], [1, 1, 1]])
    """
    opts = AttentionOptions.of(options, **kwargs)
    p = _prepare(_DPA, JAX_EMPTY_ROWS, "it has no dropout", T, S, opts)
    native = p.align == JAX_ALIGN or T == S  # JAX's own causal/window arguments apply
    explicit = p.mask
    jbias = None
    if p.bias is not None:
        jbias = p.bias
        if np.isneginf(p.bias).any():
            finite = ~np.isneginf(p.bias)  # -inf masks: into the mask, and 0 in the bias
            explicit = finite if explicit is None else explicit & finite
            jbias = np.where(finite, p.bias, 0.0)
        jbias = _four_d("bias", np.array(jbias, dtype=np.float64, copy=True))
    if not native and p.causal:
        c = causal_mask(T, S, align=p.align)  # (T, S)
        explicit = c if explicit is None else explicit & c
    if not native and p.window is not None:
        w = window_mask(T, S, p.window, align=p.align)  # (T, S)
        explicit = w if explicit is None else explicit & w
    local_window_size = None
    if native and p.window is not None and p.window != (None, None):
        unbounded = max(T, S)  # i - max(T, S) <= 0 <= j and j <= S - 1 <= i + max(T, S)
        local_window_size = tuple(unbounded if side is None else side for side in p.window)
    return {
        "bias": jbias,
        "mask": None if explicit is None else _four_d("mask", np.array(explicit, copy=True)),
        "scale": p.scale,
        "is_causal": p.causal and native,
        "local_window_size": local_window_size,
        "implementation": "xla",
    }


def options_from_jax_kwargs(
    T: int,
    S: int,
    *,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    r"""The reference's options for a ``jax.nn.dot_product_attention`` call's arguments.

    ``scaled_dot_product_attention(q, k, v, **options_from_jax_kwargs(T, S, **jax_kwargs))``
    computes ``jax.nn.dot_product_attention(...)`` (up to JAX's float32 softmax, in the
    reference's layout), sequence lengths included:

    * ``mask``, ``bias``, ``scale`` carry over; ``is_causal`` and ``local_window_size`` become
      ``causal`` and ``window`` with ``align="top_left"`` (``JAX_ALIGN``).
    * ``query_seq_lengths`` and ``key_value_seq_lengths`` become part of ``mask``
      (:func:`mask_from_seq_lengths`).
    * ``empty_rows`` is ``"uniform"`` (``JAX_EMPTY_ROWS``), or ``"zero"`` when query rows are
      padded away by ``query_seq_lengths`` (JAX zeroes them, ``JAX_QUERY_PADDING_ROWS``) and no
      other row is fully masked.

    Parameters
    ----------
    T, S : int
        Query and key lengths.
    bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size
        As passed to ``jax.nn.dot_product_attention``.

    Returns
    -------
    dict
        ``mask``, ``bias``, ``causal``, ``align``, ``window``, ``scale``, ``empty_rows``: keyword
        arguments of :func:`~attention_ref.scaled_dot_product_attention`.

    Raises
    ------
    UnsupportedOption
        When JAX's result has no single ``empty_rows`` policy: rows padded by
        ``query_seq_lengths`` (zero) together with other fully masked rows (uniform); or a row
        whose allowed keys all have a ``-inf`` bias (NaN in JAX, a masked row here).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.adapters.jax import options_from_jax_kwargs
    >>> opts = options_from_jax_kwargs(3, 4, is_causal=True, local_window_size=1,
    ...                                query_seq_lengths=np.array([3, 2], dtype=np.int32))
    >>> opts["causal"], opts["align"], opts["window"], opts["empty_rows"], opts["mask"].shape
    (True, 'top_left', (1, 1), 'zero', (2, 1, 3, 4))
    """
    T = check_positive_int("T", T)
    S = check_positive_int("S", S)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool; got {is_causal!r}")
    window: tuple[int, int] | None = None
    if local_window_size is not None:
        sides = (
            (local_window_size, local_window_size)
            if isinstance(local_window_size, (int, np.integer))
            else local_window_size
        )
        if (
            not isinstance(sides, (tuple, list))
            or len(sides) != 2
            or not all(
                isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0
                for n in sides
            )
        ):
            raise ValueError(
                "local_window_size must be a non-negative int or a pair (left, right) of them; "
                f"got {local_window_size!r}"
            )
        window = (int(sides[0]), int(sides[1]))
    m = None if mask is None else _four_d("mask", _bool_array("mask", mask, "True = takes part"))
    b = None
    if bias is not None:
        b = _four_d(
            "bias", np.array(as_float("bias", _numpy(bias), np.dtype(np.float64)), copy=True)
        )
        if (np.isnan(b) | np.isposinf(b)).any():
            raise ValueError("bias must be finite or -inf; got NaN or +inf entries")
    padded = None
    if query_seq_lengths is not None or key_value_seq_lengths is not None:
        lengths = mask_from_seq_lengths(
            T, S, query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths
        )  # (B, 1, T, S)
        m = lengths if m is None else m & lengths
        if query_seq_lengths is not None:
            q_len = _lengths("query_seq_lengths", query_seq_lengths)
            padded = np.arange(T)[None, None, :] >= q_len[:, None, None]  # (B, 1, T)

    structural = attention_mask(
        T, S, mask=m, causal=bool(is_causal), window=window
    )  # JAX's combined mask
    if b is not None and np.isneginf(b).any():
        taking_part = np.ones((T, S), dtype=bool) if structural is None else structural
        nan_rows = taking_part.any(axis=-1) & ~(taking_part & ~np.isneginf(b)).any(
            axis=-1
        )  # (..., T)
        if nan_rows.any():
            raise UnsupportedOption(
                "bias",
                "attention_ref",
                "a query row whose allowed keys all have a -inf bias is NaN in JAX's softmax; "
                "the reference treats -inf as masked and applies an empty_rows policy",
            )
    empty_rows = JAX_EMPTY_ROWS
    if structural is not None:
        empty = ~structural.any(axis=-1)  # (..., T)
        if padded is not None and padded.any():
            if (empty & ~padded).any():
                raise UnsupportedOption(
                    "query_seq_lengths",
                    "attention_ref",
                    "JAX zeroes the query rows beyond query_seq_lengths but gives other fully "
                    "masked rows uniform weights; one empty_rows policy cannot express both",
                )
            empty_rows = JAX_QUERY_PADDING_ROWS
    return {
        "mask": m,
        "bias": b,
        "causal": bool(is_causal),
        "align": JAX_ALIGN,
        "window": window,
        "scale": scale,
        "empty_rows": empty_rows,
    }


# ---------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------


def run_jax_sdpa(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    dout: ArrayLike | None = None,
    *,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> FrameworkRun:
    r"""Run ``jax.nn.dot_product_attention`` on the reference's inputs and options.

    The inputs go to JAX's ``(B, T, H, Dk)`` layout and the output comes back; the options are
    mapped by :func:`jax_dpa_kwargs`; the gradients for ``dout`` come from ``jax.vjp``. The call
    is jitted (compiled once per shapes and options, then cached) and runs inside
    ``jax.enable_x64(True)``, in float64 unless ``dtype`` says otherwise; its softmax is float32
    all the same (``JAX_SOFTMAX_DTYPE``).

    Parameters
    ----------
    q : array_like, shape (B, H, T, Dk)
    k : array_like, shape (B, Hkv, S, Dk)
    v : array_like, shape (B, Hkv, S, Dv)
        JAX requires Dv = Dk (value of the key's shape).
    dout : array_like, shape (B, H, T, Dv), optional
        Cotangent of the output; without it no gradient is computed.
    options, **kwargs
        The attention options (an AttentionOptions and/or its fields by name: mask, bias,
        causal, align, window, softcap, scale, dropout_p, dropout_mask, empty_rows, dtype),
        as for :func:`~attention_ref.scaled_dot_product_attention`.
    dtype : dtype, optional
        The dtype of JAX's arrays; float64 when omitted.

    Returns
    -------
    FrameworkRun
        ``out`` (B, H, T, Dv) and ``grads``, an :class:`~attention_ref.AttentionGrads` (``dq``,
        ``dk``, ``dv``, ``dbias`` of the bias's shape or None), or None without ``dout``.

    Raises
    ------
    UnsupportedOption
        For Dv != Dk, and see :func:`jax_dpa_kwargs`.

    Examples
    --------
    >>> import pytest; jax = pytest.importorskip("jax")   # the example needs JAX
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.adapters.jax import run_jax_sdpa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (
    ...     rng.normal(size=(2, 4, 3, 8)),
    ...     rng.normal(size=(2, 2, 5, 8)),
    ...     rng.normal(size=(2, 2, 5, 8)),
    ... )
    >>> run = run_jax_sdpa(
    ...     q, k, v, rng.normal(size=(2, 4, 3, 8)), causal=True, empty_rows="uniform"
    ... )
    >>> err = np.abs(run.out - scaled_dot_product_attention(q, k, v, causal=True)).max()
    >>> bool(1e-12 < err < 1e-5)       # float32 softmax: not float64 round-off, not a wrong answer
    True
    >>> run.out.dtype, run.grads.dk.shape
    (dtype('float64'), (2, 2, 5, 8))
    """
    opts = AttentionOptions.of(options, **kwargs)
    mask, bias = opts.mask, opts.bias
    jax = _jax()
    dt = _dtype(opts.dtype)
    q, k, v = _head_arrays(q, k, v, dt, ndim=4)
    if v.shape[-1] != q.shape[-1]:
        raise UnsupportedOption(
            "Dv != Dk",
            _DPA,
            f"it requires value to have the key's shape (B, S, Hkv, Dk); got Dk={q.shape[-1]}, "
            f"Dv={v.shape[-1]}",
        )
    T, S = q.shape[-2], k.shape[-2]
    scores_shape = q.shape[:-1] + (S,)  # (B, H, T, S)
    mask_np = None if mask is None else _bool_array("mask", mask, "True = may attend")
    bias_np = None if bias is None else as_float("bias", _numpy(bias), dt)
    _check_full_shape("mask", mask_np, scores_shape)
    _check_full_shape("bias", bias_np, scores_shape)
    dout_arr = None if dout is None else as_float("dout", _numpy(dout), dt)
    if dout_arr is not None and dout_arr.shape != q.shape:
        raise ValueError(
            f"dout must have the output's shape (B, H, T, Dv) = {q.shape}; got {dout_arr.shape}"
        )
    kwargs = jax_dpa_kwargs(
        T,
        S,
        mask=mask_np,
        bias=bias_np,
        options=opts,
    )
    leaves = {
        "q": bthd_from_bhtd(q),
        "k": bthd_from_bhtd(k),
        "v": bthd_from_bhtd(v),
    }  # (B, T, H, Dk), (B, S, Hkv, Dk), (B, S, Hkv, Dv)
    if kwargs["bias"] is not None:
        leaves["bias"] = kwargs["bias"].astype(dt)  # (B, H, T, S), broadcastable
    out, g = _call(
        jax, "sdpa", leaves, kwargs, None if dout_arr is None else bthd_from_bhtd(dout_arr)
    )
    out = bhtd_from_bthd(out)  # (B, T, H, Dv) -> (B, H, T, Dv)
    if g is None:
        return FrameworkRun(out=out, grads=None)
    dq, dk, dv = (bhtd_from_bthd(g[name]) for name in "qkv")  # (B, T, H, D) -> (B, H, T, D)
    dbias = None if bias_np is None else g["bias"].reshape(bias_np.shape)  # 4-D -> the bias's shape
    return FrameworkRun(out=out, grads=AttentionGrads(dq=dq, dk=dk, dv=dv, dbias=dbias))


def run_jax_mha(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    dout: ArrayLike | None = None,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> FrameworkRun:
    r"""Multi-head attention in JAX: ``jnp`` projections around ``jax.nn.dot_product_attention``.

    JAX has no multi-head attention module (Flax has one; it is not a dependency). This runner
    composes the reference's (M1)-(M6) in ``jnp``: ``query @ w_q + b_q`` reshaped to
    ``(B, T, H, Dk)`` (head ``h`` owns columns ``h*Dk:(h+1)*Dk``), the same for keys and values
    with Hkv heads, ``jax.nn.dot_product_attention`` with the options of :func:`jax_dpa_kwargs`,
    the heads merged to ``(B, T, H*Dv)`` and ``@ w_o + b_o``. Gradients for every input, weight
    and the attention bias come from one ``jax.vjp``. What it checks is the attention call
    and its gradients in context; the projections are plain matmuls.

    Parameters
    ----------
    query : array_like, shape (B, T, D)
    key : array_like, shape (B, S, Dk_in)
    value : array_like, shape (B, S, Dv_in)
    params : MultiHeadParams
        ``(in, out)`` layout; Dv must equal Dk (JAX's requirement).
    dout : array_like, shape (B, T, D_out), optional
        Cotangent of the output.
    num_heads, num_kv_heads : int
        H and Hkv (H when omitted).
    options, **kwargs
        The attention options (an AttentionOptions and/or its fields by name: mask, bias,
        causal, align, window, softcap, scale, dropout_p, dropout_mask, empty_rows, dtype),
        as for :func:`~attention_ref.multi_head_attention`.
    dtype : dtype, optional
        The dtype of JAX's arrays; float64 when omitted.

    Returns
    -------
    FrameworkRun
        ``out`` (B, T, D_out) and ``grads``, a :class:`~attention_ref.MultiHeadGrads`, or None.

    Raises
    ------
    UnsupportedOption
        For Dv != Dk, and see :func:`jax_dpa_kwargs`.

    Examples
    --------
    >>> import pytest; jax = pytest.importorskip("jax")   # the example needs JAX
    >>> import numpy as np
    >>> from attention_ref import init_params
    >>> from attention_ref.adapters.jax import run_jax_mha
    >>> rng = np.random.default_rng(0)
    >>> p = init_params(rng, d_model=8, num_heads=4, num_kv_heads=2, kdim=6, vdim=5)
    >>> x, mem_k, mem_v = (
    ...     rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 7, 6)), rng.normal(size=(2, 7, 5))
    ... )
    >>> run = run_jax_mha(
    ...     x, mem_k, mem_v, p, rng.normal(size=(2, 3, 8)), num_heads=4, num_kv_heads=2
    ... )
    >>> run.out.shape, run.grads.dvalue.shape, run.grads.dparams.w_k.shape
    ((2, 3, 8), (2, 7, 5), (6, 4))
    """
    opts = AttentionOptions.of(options, **kwargs)
    mask, bias = opts.mask, opts.bias
    jax = _jax()
    dt = _dtype(opts.dtype)
    H = check_positive_int("num_heads", num_heads)
    Hkv = H if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
    if H % Hkv:
        raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={Hkv}")
    if not isinstance(params, MultiHeadParams):
        raise TypeError(f"params must be a MultiHeadParams; got {type(params).__name__}")
    arrays = {
        name: as_float(f"params.{name}", value, dt) for name, value in params.as_dict().items()
    }
    for name in ("w_q", "w_k", "w_v", "w_o"):
        if name not in arrays or arrays[name].ndim != 2:
            raise ValueError(
                f"params.{name} must be an array of shape (in, out); got "
                f"{getattr(params, name)!r:.60}"
            )
    w_q, w_k, w_v, w_o = arrays["w_q"], arrays["w_k"], arrays["w_v"], arrays["w_o"]
    if w_q.shape[1] % H or w_v.shape[1] % Hkv:
        raise ValueError(
            f"params.w_q's columns must split into H={H} heads and w_v's into Hkv={Hkv}; got "
            f"{w_q.shape}, {w_v.shape}"
        )
    Dk, Dv = w_q.shape[1] // H, w_v.shape[1] // Hkv
    if w_k.shape[1] != Hkv * Dk:
        raise ValueError(f"params.w_k must have Hkv*Dk = {Hkv * Dk} columns; got shape {w_k.shape}")
    if w_o.shape[0] != H * Dv:
        raise ValueError(f"params.w_o must have H*Dv = {H * Dv} rows; got shape {w_o.shape}")
    if Dv != Dk:
        raise UnsupportedOption(
            "Dv != Dk", _DPA, f"it requires value heads of the key's width; got Dk={Dk}, Dv={Dv}"
        )
    for b, w in (("b_q", w_q), ("b_k", w_k), ("b_v", w_v), ("b_o", w_o)):
        if b in arrays and arrays[b].shape != (w.shape[1],):
            raise ValueError(f"params.{b} must have shape ({w.shape[1]},); got {arrays[b].shape}")
    for name, x, w in (("query", query, w_q), ("key", key, w_k), ("value", value, w_v)):
        arr = as_float(name, _numpy(x), dt)
        if arr.ndim != 3 or arr.size == 0 or arr.shape[-1] != w.shape[0]:
            raise ValueError(
                f"{name} must have shape (B, positions, {w.shape[0]}) (from params.w_{name[0]}); "
                f"got shape {arr.shape}"
            )
        arrays[name] = arr
    B, T, S = arrays["query"].shape[0], arrays["query"].shape[1], arrays["key"].shape[1]
    if arrays["key"].shape[:2] != (B, S) or arrays["value"].shape[:2] != (B, S):
        raise ValueError(
            "query, key and value must share B and key, value S; got "
            f"query.shape={arrays['query'].shape}, key.shape={arrays['key'].shape}, "
            f"value.shape={arrays['value'].shape}"
        )
    mask_np = None if mask is None else _bool_array("mask", mask, "True = may attend")
    _check_full_shape("mask", mask_np, (B, H, T, S))
    bias_shape = None
    if bias is not None:
        bias_np = as_float("bias", _numpy(bias), dt)
        _check_full_shape("bias", bias_np, (B, H, T, S))
        bias_shape = bias_np.shape
    else:
        bias_np = None
    dout_arr = None if dout is None else as_float("dout", _numpy(dout), dt)
    if dout_arr is not None and dout_arr.shape != (B, T, w_o.shape[1]):
        raise ValueError(
            f"dout must have the output's shape (B, T, D_out) = {(B, T, w_o.shape[1])}; got "
            f"{dout_arr.shape}"
        )
    kwargs = jax_dpa_kwargs(
        T,
        S,
        mask=mask_np,
        bias=bias_np,
        options=opts,
    )
    if kwargs["bias"] is not None:
        arrays["bias"] = kwargs["bias"].astype(dt)
    out, g = _call(jax, "mha", arrays, {**kwargs, "num_heads": H, "num_kv_heads": Hkv}, dout_arr)
    if g is None:
        return FrameworkRun(out=out, grads=None)
    dparams = MultiHeadParams(
        w_q=g["w_q"],
        w_k=g["w_k"],
        w_v=g["w_v"],
        w_o=g["w_o"],
        b_q=g.get("b_q"),
        b_k=g.get("b_k"),
        b_v=g.get("b_v"),
        b_o=g.get("b_o"),
    )
    dbias = None if bias_shape is None else g["bias"].reshape(bias_shape)
    return FrameworkRun(
        out=out,
        grads=MultiHeadGrads(
            dquery=g["query"], dkey=g["key"], dvalue=g["value"], dparams=dparams, dbias=dbias
        ),
    )
