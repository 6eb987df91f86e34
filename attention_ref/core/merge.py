r"""Partial attention states and their merge: the log-sum-exp contract, forward and backward.

Attention over a set of keys is determined by two numbers per query row: its output ``out``
(..., T, Dv) and the log-sum-exp ``lse`` (..., T) of its allowed logits (natural log). Attention
over the union of N disjoint key sets is the merge of the N partial states (C1)-(C3) of
``docs/derivations/merge.md``:

.. math::
    \text{lse} = \log \textstyle\sum_n e^{\text{lse}_n},\qquad
    \text{out} = \textstyle\sum_n a_n\, \text{out}_n,\quad a_n = e^{\text{lse}_n - \text{lse}}.

That is how flash-decoding (split-KV), context parallelism (ring attention), cascade and
prefix-sharing kernels combine their pieces. A partial with no key has ``lse_n = -inf`` and weight
``a_n = 0``: it contributes nothing (its ``out_n`` is never read, so a NaN there does no harm),
and a row whose partials are all empty merges to ``out = 0``, ``lse = -inf``.

A learnable sink (gpt-oss) is one more partial: output 0, log-sum-exp ``sinks[h]``
(:func:`add_sinks`). It belongs in the softmax once, so it is added after the merge, never to each
partial.

Conventions of the log-sum-exp (``docs/conventions.md``): natural log; ``-inf`` on a row with no
key. Kernels differ: FlashInfer's states are in base 2 (``lse / ln 2``; FlashAttention 3 also
computes in base 2 inside its kernels, but returns the natural log), and FlashAttention 2 stores
``+inf`` on an empty row; :func:`lse_to_convention` and :func:`lse_from_convention` convert.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ._validate import as_float, resolve_dtype, sum_to_shape
from .primitives import row_dot

__all__ = [
    "AttentionState",
    "MergeGrads",
    "SinkGrads",
    "add_sinks",
    "add_sinks_backward",
    "lse_from_convention",
    "lse_to_convention",
    "merge_attention_states",
    "merge_attention_states_backward",
]

LN2 = math.log(2.0)


class AttentionState(NamedTuple):
    """Attention over some set of keys, as a merge needs it: unpack as ``out, lse = state``."""

    out: np.ndarray  #: (..., T, Dv) the output over those keys
    lse: np.ndarray  #: (..., T) log-sum-exp of the row's logits over those keys; -inf: no key


class MergeGrads(NamedTuple):
    """Gradients of :func:`merge_attention_states`: unpack as ``douts, dlses = grads``."""

    douts: np.ndarray  #: (N, ..., T, Dv)
    dlses: np.ndarray  #: (N, ..., T)


class SinkGrads(NamedTuple):
    """Gradients of :func:`add_sinks` with respect to its three inputs."""

    dout: np.ndarray  #: (..., H, T, Dv) for the state's output before the sink
    dlse: np.ndarray  #: (..., H, T) for its log-sum-exp before the sink
    dsinks: np.ndarray  #: (H,)


def _check_lse(name: str, lse: np.ndarray) -> None:
    bad = np.isnan(lse) | np.isposinf(lse)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must be finite, or -inf for a partial with no key; got {name}[{first}] = "
            f"{lse[first]} (a kernel that stores +inf on empty rows: convert with "
            "lse_from_convention(lse, empty='+inf'))"
        )


def _check_states(outs: Any, lses: Any, dt: np.dtype | None = None):
    """``outs`` (N, ..., T, Dv) and ``lses`` (N, ..., T) as float arrays, checked together."""
    if dt is None:
        dt = resolve_dtype(None, outs, lses)
    outs = as_float("outs", outs, dt)
    lses = as_float("lses", lses, dt)
    if outs.ndim < 3:
        raise ValueError(
            f"outs must have shape (N, ..., T, Dv) (3 or more dims); got shape {outs.shape}"
        )
    if lses.shape != outs.shape[:-1]:
        raise ValueError(
            f"lses must have shape (N, ..., T) = {outs.shape[:-1]} to match outs "
            f"{outs.shape}; got {lses.shape}"
        )
    if outs.shape[0] < 1:
        raise ValueError("outs must hold N >= 1 partial states; got N = 0")
    _check_lse("lses", lses.real)
    return outs, lses


def _check_base2(base2: Any) -> bool:
    if not isinstance(base2, (bool, np.bool_)):
        raise TypeError(f"base2 must be a bool; got {base2!r}")
    return bool(base2)


def _weights(lses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(a, lse)``: each partial's weight a_n = exp(lse_n - lse), (C2), and the merged lse, (C1).

    ``lses`` (N, ..., T) in natural log. Rows with every partial empty get a = 0, lse = -inf.
    """
    m = lses.real.max(axis=0)  # (..., T) the largest partial lse: the shift
    m = np.where(np.isfinite(m), m, 0.0)  # an all-empty row: shift 0, so no -inf - -inf
    with np.errstate(under="ignore"):
        w = np.exp(lses - m)  # (N, ..., T) exactly 0 for an empty partial
    total = w.sum(axis=0)  # (..., T); 0 when every partial is empty
    with np.errstate(divide="ignore"):
        lse = m + np.log(total)  # (C1); -inf when total = 0
    safe = np.where(total == 0, 1.0, total)
    return w / safe, lse  # (C2)


def merge_attention_states(
    outs: ArrayLike, lses: ArrayLike, *, base2: bool = False
) -> AttentionState:
    r"""Merge N partial attention states into attention over the union of their keys.

    Parameters
    ----------
    outs : array_like, shape (N, ..., T, Dv)
        Each partial's output: attention of the rows over its own set of keys (disjoint sets).
        A sequence of N arrays of shape (..., T, Dv) is stacked.
    lses : array_like, shape (N, ..., T)
        Each partial's log-sum-exp of the allowed logits; ``-inf`` for a row with no key in that
        partial (its output is then ignored, whatever it holds).
    base2 : bool, default False
        The ``lses`` are in base 2 (``lse / ln 2``, as FlashInfer's ``merge_state`` takes them);
        the returned ``lse`` is then base 2 too.

    Returns
    -------
    AttentionState
        ``out`` (..., T, Dv) and ``lse`` (..., T): attention over the union, (C1)-(C3). A row
        whose partials are all empty gives ``out = 0`` and ``lse = -inf``.

    Notes
    -----
    .. math::
        \text{lse} = \log \textstyle\sum_n e^{\text{lse}_n}\ \text{(C1)},\quad
        a_n = e^{\text{lse}_n - \text{lse}}\ \text{(C2)},\quad
        \text{out} = \textstyle\sum_n a_n\, \text{out}_n\ \text{(C3)},

    computed with the largest ``lse_n`` as the shift (``docs/derivations/merge.md``). The order
    of the sum over n is fixed (first to last).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention, merge_attention_states
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 7, 4)), rng.normal(size=(2, 7, 5))
    >>> parts = [scaled_dot_product_attention(q, k[:, j:j + 4], v[:, j:j + 4], return_lse=True)
    ...          for j in (0, 4)]                         # keys 0..3 and 4..6, separately
    >>> out, lse = merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
    >>> full, full_lse = scaled_dot_product_attention(q, k, v, return_lse=True)
    >>> bool(np.allclose(out, full, rtol=1e-13, atol=0)), bool(np.allclose(lse, full_lse))
    (True, True)
    """
    base2 = _check_base2(base2)
    outs, lses = _check_states(outs, lses)
    nat = lses * LN2 if base2 else lses  # (N, ..., T) natural log
    a, lse = _weights(nat)  # (N, ..., T), (..., T)   (C1), (C2)
    # (C3) with explicit selection: an empty partial's out (maybe NaN) is never multiplied
    terms = np.where((a != 0)[..., None], a[..., None] * outs, 0.0)  # (N, ..., T, Dv)
    out = terms.sum(axis=0)  # (..., T, Dv)
    return AttentionState(out=out, lse=lse / LN2 if base2 else lse)


def merge_attention_states_backward(
    dout: ArrayLike | None,
    dlse: ArrayLike | None,
    outs: ArrayLike,
    lses: ArrayLike,
    *,
    base2: bool = False,
) -> MergeGrads:
    r"""Gradients of :func:`merge_attention_states` for each partial's output and log-sum-exp.

    Parameters
    ----------
    dout : array_like, shape (..., T, Dv), or None
        Gradient of the loss with respect to the merged output (None: zero).
    dlse : array_like, shape (..., T), or None
        Gradient with respect to the merged log-sum-exp (None: zero).
    outs, lses, base2
        The forward's inputs.

    Returns
    -------
    MergeGrads
        ``douts`` (N, ..., T, Dv) and ``dlses`` (N, ..., T); both 0 for an empty partial.

    Notes
    -----
    With :math:`a_n = e^{\text{lse}_n - \text{lse}}`, (C4)-(C5) of ``docs/derivations/merge.md``:

    .. math::
        d\text{out}_n = a_n\, d\text{out}\ \text{(C4)},\qquad
        d\text{lse}_n = a_n \big(d\text{out}\cdot(\text{out}_n - \text{out}) + d\text{lse}\big)
        \ \text{(C5)}.

    In base 2 the first term of (C5) is multiplied by :math:`\ln 2`.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import merge_attention_states_backward
    >>> outs = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])          # N = 2, T = 1, Dv = 2
    >>> lses = np.array([[0.0], [-np.inf]])                    # the second partial is empty
    >>> g = merge_attention_states_backward(np.ones((1, 2)), np.ones(1), outs, lses)
    >>> g.douts[:, 0].tolist(), g.dlses[:, 0].tolist()
    ([[1.0, 1.0], [0.0, 0.0]], [1.0, 0.0])
    """
    base2 = _check_base2(base2)
    outs, lses = _check_states(outs, lses)
    dt = outs.dtype
    shape = outs.shape[1:]  # (..., T, Dv)
    dout = np.zeros(shape, dt) if dout is None else as_float("dout", dout, dt)
    dlse = np.zeros(shape[:-1], dt) if dlse is None else as_float("dlse", dlse, dt)
    if dout.shape != shape:
        raise ValueError(f"dout must have the merged output's shape {shape}; got {dout.shape}")
    if dlse.shape != shape[:-1]:
        raise ValueError(f"dlse must have the merged lse's shape {shape[:-1]}; got {dlse.shape}")
    nat = lses * LN2 if base2 else lses
    a, _ = _weights(nat)  # (N, ..., T)   (C2)
    live = (a != 0)[..., None]  # (N, ..., T, 1): partials that have a key
    safe_outs = np.where(live, outs, 0.0)  # an empty partial's out is never read
    out = (a[..., None] * safe_outs).sum(axis=0)  # (..., T, Dv) the merged output   (C3)
    douts = a[..., None] * dout  # (N, ..., T, Dv)   (C4)
    through_out = row_dot(dout, safe_outs - out)[..., 0]  # (N, ..., T) dout . (out_n - out)
    if base2:
        through_out = through_out * LN2  # d lse_nat / d lse_2 = ln 2
    dlses = a * (through_out + dlse)  # (C5)
    return MergeGrads(douts=douts, dlses=dlses)


def _sink_partial(lse: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """The sink as a partial's lse: sinks[h] on every row, (..., H, T)."""
    return np.broadcast_to(sinks[:, None], lse.shape)


def _check_sinks(out: Any, lse: Any, sinks: Any):
    dt = resolve_dtype(None, out, lse, sinks)
    out = as_float("out", out, dt)
    lse = as_float("lse", lse, dt)
    sinks = as_float("sinks", sinks, dt)
    if out.ndim < 3 or lse.shape != out.shape[:-1]:
        raise ValueError(
            "out must have shape (..., H, T, Dv) and lse (..., H, T); got out.shape="
            f"{out.shape}, lse.shape={lse.shape}"
        )
    if sinks.shape != (out.shape[-3],):
        raise ValueError(
            f"sinks must have shape (H,) = ({out.shape[-3]},), one logit per query head; got "
            f"shape {sinks.shape}"
        )
    if not np.isfinite(sinks).all():
        raise ValueError(f"sinks must be finite; got {sinks.tolist()}")
    _check_lse("lse", lse.real)
    return out, lse, sinks


def add_sinks(out: ArrayLike, lse: ArrayLike, sinks: ArrayLike) -> AttentionState:
    r"""Add learnable sinks to an attention state computed without them, once.

    The sink of head ``h`` is one more softmax term with logit ``sinks[h]`` and value zero, so it
    is the merge of the state with the partial ``(out = 0, lse = sinks[h])``, (C6).

    Parameters
    ----------
    out : array_like, shape (..., H, T, Dv)
        Output of attention without sinks (e.g. the merge of split-KV partials).
    lse : array_like, shape (..., H, T)
        Its log-sum-exp (natural log); ``-inf`` on a row with no key.
    sinks : array_like, shape (H,)
        One sink logit per query head.

    Returns
    -------
    AttentionState
        ``out`` scaled by ``exp(lse - lse')`` and ``lse' = log(exp(lse) + exp(sinks[h]))``: what
        attention with ``sinks=`` gives. A row with no key gets ``out = 0``, ``lse' = sinks[h]``.

    Notes
    -----
    Applying the sink to each of N partials before merging counts it N times; this is why it
    is a separate step.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.core.merge import add_sinks
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 6))
    >>> sinks = np.array([0.5, -1.0])
    >>> out, lse = add_sinks(*scaled_dot_product_attention(q, k, v, return_lse=True), sinks)
    >>> ref = scaled_dot_product_attention(q, k, v, sinks=sinks)
    >>> bool(np.allclose(out, ref, rtol=1e-14, atol=0))
    True
    """
    out, lse, sinks = _check_sinks(out, lse, sinks)
    outs = np.stack([out, np.zeros_like(out)])  # (2, ..., H, T, Dv): the sink's value is zero
    lses = np.stack([lse, _sink_partial(lse, sinks)])  # (2, ..., H, T)
    return merge_attention_states(outs, lses)  # (C6)


def add_sinks_backward(
    dout: ArrayLike | None,
    dlse: ArrayLike | None,
    out: ArrayLike,
    lse: ArrayLike,
    sinks: ArrayLike,
) -> SinkGrads:
    r"""Gradients of :func:`add_sinks`: (C4)-(C5) with the sink as the second partial.

    ``dsinks[h]`` sums that partial's ``dlse`` over every row of head ``h``, (C7) of
    ``docs/derivations/merge.md``: :math:`d\sigma_h = \sum_\text{rows} p_\text{sink}
    (d\text{lse}' - d\text{out}\cdot\text{out}')`.

    Returns
    -------
    SinkGrads
        ``dout`` (..., H, T, Dv), ``dlse`` (..., H, T) and ``dsinks`` (H,).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.merge import add_sinks_backward
    >>> g = add_sinks_backward(None, np.ones((1, 1)), np.zeros((1, 1, 2)), np.zeros((1, 1)),
    ...                        np.zeros(1))                 # lse' = log 2: half of it each
    >>> float(g.dlse[0, 0]), g.dsinks.tolist()
    (0.5, [0.5])
    """
    out, lse, sinks = _check_sinks(out, lse, sinks)
    outs = np.stack([out, np.zeros_like(out)])
    lses = np.stack([lse, _sink_partial(lse, sinks)])
    g = merge_attention_states_backward(dout, dlse, outs, lses)
    dsinks = sum_to_shape(g.dlses[1][..., None], (sinks.shape[0], 1, 1))  # (C7) over the rows
    return SinkGrads(dout=g.douts[0], dlse=g.dlses[0], dsinks=dsinks.reshape(sinks.shape).copy())


Base = Literal["e", 2]
EmptyLse = Literal["-inf", "+inf"]


def _check_convention(base: Any, empty: Any) -> None:
    if base not in ("e", 2) or isinstance(base, bool):
        raise ValueError(f"base must be 'e' or 2; got {base!r}")
    if empty not in ("-inf", "+inf"):
        raise ValueError(f"empty must be '-inf' or '+inf'; got {empty!r}")


def lse_to_convention(lse: ArrayLike, *, base: Base = "e", empty: EmptyLse = "-inf") -> np.ndarray:
    r"""Convert a log-sum-exp from this library's convention to a kernel's.

    Parameters
    ----------
    lse : array_like
        Natural log; ``-inf`` on a row with no key (what attention_ref returns).
    base : {"e", 2}, default "e"
        2: divide by :math:`\ln 2` (FlashInfer's kernels keep :math:`\log_2`; FlashAttention 3
        computes in base 2 internally but returns the natural log).
    empty : {"-inf", "+inf"}, default "-inf"
        The value an empty row gets (FlashAttention 2's ``softmax_lse`` holds ``+inf`` there).

    Returns
    -------
    ndarray, a new array of ``lse``'s shape

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.merge import lse_to_convention
    >>> lse_to_convention([np.log(8.0), -np.inf], base=2, empty="+inf").tolist()
    [3.0, inf]
    """
    _check_convention(base, empty)
    x = as_float("lse", lse, np.dtype(np.float64))
    _check_lse("lse", x)
    y = x / LN2 if base == 2 else x.copy()
    if empty == "+inf":
        y[np.isneginf(x)] = np.inf
    return y


def lse_from_convention(
    lse: ArrayLike, *, base: Base = "e", empty: EmptyLse = "-inf"
) -> np.ndarray:
    r"""Convert a kernel's log-sum-exp to this library's convention (natural log, ``-inf`` empty).

    The inverse of :func:`lse_to_convention`, with the same ``base`` and ``empty``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.merge import lse_from_convention
    >>> lse_from_convention([3.0, np.inf], base=2, empty="+inf").tolist() == [np.log(8.0), -np.inf]
    True
    """
    _check_convention(base, empty)
    x = as_float("lse", lse, np.dtype(np.float64))
    if np.isnan(x).any():
        raise ValueError("lse must not hold NaN")
    if empty == "+inf":
        x = np.where(np.isposinf(x), -np.inf, x)
    elif np.isposinf(x).any():
        raise ValueError("lse holds +inf but empty='-inf'; pass empty='+inf' for that convention")
    return x * LN2 if base == 2 else x.copy()
