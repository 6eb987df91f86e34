r"""Packed variable-length batches: sequences of different lengths along one axis, with offsets.

The layout is FlashAttention's ``flash_attn_varlen_func``: the B sequences of a batch are
concatenated along the first axis, with no padding,

* ``q`` (T_total, H, Dk), ``k`` (S_total, Hkv, Dk), ``v`` (S_total, Hkv, Dv), ``out``
  (T_total, H, Dv);
* ``cu_seqlens_q`` (B + 1,) and ``cu_seqlens_k`` (B + 1,): cumulative lengths, integers starting
  at 0, non-decreasing, ending at T_total and S_total. Sequence ``b`` owns query rows
  ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` (T_b of them) and key rows
  ``cu_seqlens_k[b] : cu_seqlens_k[b + 1]`` (S_b), (V1).

Each sequence attends only to itself: the output rows of sequence b are attention of its own
queries to its own keys, (V2), with ``causal`` and ``window`` applied inside the sequence using
its own T_b and S_b (so ``align`` matters when T_b != S_b). That is the readable definition, and
the code is written that way: it slices each sequence and calls
:func:`~attention_ref.sdpa_forward` / :func:`~attention_ref.sdpa_backward` on its
``(H, T_b, Dk)`` view. The same result is one dense call over the whole packed axis with the
block-diagonal mask of :func:`block_diagonal_mask` (xformers' ``BlockDiagonalMask``), (V3).

Derivation: ``docs/derivations/varlen.md``; guide: ``docs/decoding_and_varlen.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ..core._validate import (
    ALIGNS,
    as_float,
    check_choice,
    check_window,
    fresh,
)
from ..core.attention import AttentionTrace, check_dlse, sdpa_backward, sdpa_forward
from ..core.masks import AllowedPairs, query_offset
from ..core.options import AttentionOptions

__all__ = [
    "VarlenGrads",
    "VarlenTrace",
    "block_diagonal_mask",
    "cu_seqlens_from_lengths",
    "varlen_attention",
    "varlen_attention_backward",
    "varlen_backward",
    "varlen_forward",
]

Q_LAYOUT, K_LAYOUT, V_LAYOUT = "(T_total, H, Dk)", "(S_total, Hkv, Dk)", "(S_total, Hkv, Dv)"


# ----------------------------------------------------------------------------- offsets


def cu_seqlens_from_lengths(lengths: ArrayLike) -> np.ndarray:
    r"""Cumulative offsets ``[0, L_0, L_0 + L_1, ...]`` from per-sequence lengths.

    Parameters
    ----------
    lengths : array_like of int, shape (B,)
        Length of each sequence, ``>= 0`` (xformers' ``BlockDiagonalMask.from_seqlens`` takes the
        same list).

    Returns
    -------
    ndarray of int64, shape (B + 1,)
        ``cu_seqlens``: sequence ``b`` owns rows ``cu_seqlens[b] : cu_seqlens[b + 1]``.

    Examples
    --------
    >>> from attention_ref.variants.varlen import cu_seqlens_from_lengths
    >>> cu_seqlens_from_lengths([3, 0, 2])
    array([0, 3, 3, 5])
    """
    try:
        arr = np.asarray(lengths)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"lengths could not be converted to a numpy array: {exc}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"lengths must be 1-D with B >= 1 entries, shape (B,); got shape {arr.shape}"
        )
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must hold integers; got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if (arr < 0).any():
        b = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"lengths must be >= 0; got lengths[{b}] = {arr[b]}")
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(arr)])  # (B + 1,)


def _check_cu_seqlens(
    name: str, cu: Any, total: int | None = None, total_name: str = ""
) -> np.ndarray:
    """``cu`` as a fresh int64 array (B + 1,): 1-D, integer, from 0, non-decreasing, ending at
    ``total``."""
    if isinstance(cu, np.random.Generator):
        raise TypeError(f"{name} must be an array of integer offsets; got a numpy.random.Generator")
    try:
        arr = np.asarray(cu)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} could not be converted to a numpy array: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, shape (B + 1,); got shape {arr.shape}")
    if arr.size < 2:
        raise ValueError(
            f"{name} must have B + 1 >= 2 entries (at least one sequence), e.g. [0, T_total]; "
            f"got {arr.size} entries: {arr.tolist()}"
        )
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must hold integers (cumulative sequence lengths); got dtype {arr.dtype}"
        )
    arr = arr.astype(np.int64)  # a copy, never the caller's array; signed, so differences are exact
    if arr[0] != 0:
        raise ValueError(
            f"{name}[0] must be 0 (the first sequence starts at row 0); got {name}[0] = {arr[0]}"
        )
    drops = np.flatnonzero(np.diff(arr) < 0)
    if drops.size:
        i = int(drops[0]) + 1
        raise ValueError(
            f"{name} must be non-decreasing (lengths >= 0); got {name}[{i}] = {arr[i]} < "
            f"{name}[{i - 1}] = {arr[i - 1]}"
        )
    if total is not None and arr[-1] != total:
        raise ValueError(
            f"{name}[-1] must equal the packed length {total_name} = {total}; got {name}[-1] = "
            f"{arr[-1]}"
        )
    return arr


def _check_same_count(cu_q: np.ndarray, cu_k: np.ndarray) -> None:
    if cu_q.size != cu_k.size:
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences B; got "
            f"B = {cu_q.size - 1} (cu_seqlens_q has {cu_q.size} entries) and B = {cu_k.size - 1} "
            f"(cu_seqlens_k has {cu_k.size} entries)"
        )


def _check_causal(causal: Any) -> bool:
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r}")
    return bool(causal)


# ----------------------------------------------------------------------------- block-diagonal mask


def block_diagonal_mask(
    cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike,
    *,
    causal: bool = False,
    align: str = "top_left",
    window: tuple[int | None, int | None] | None = None,
) -> np.ndarray:
    r"""The boolean ``(T_total, S_total)`` mask under which dense attention equals varlen attention.

    Query row ``r`` of sequence ``b`` may attend key row ``c`` when ``c`` belongs to the same
    sequence and the per-sequence causal/window mask of a ``T_b x S_b`` problem allows it, (V3).

    Parameters
    ----------
    cu_seqlens_q, cu_seqlens_k : array_like of int, shape (B + 1,)
        Cumulative query and key lengths, as for :func:`varlen_attention`.
    causal : bool, default False
        Causal inside each block.
    align : {"top_left", "bottom_right"}, default "top_left"
        Alignment of ``causal`` and ``window`` inside each block (``i' = i`` or
        ``i' = i + S_b - T_b``, both counted from the block's first row and column).
    window : (int or None, int or None), optional
        Sliding window ``(left, right)`` inside each block.

    Returns
    -------
    ndarray of bool, shape (T_total, S_total)
        True = may attend (this library's polarity).

    Notes
    -----
    xformers' ``BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen)`` is ``causal=False``; its
    ``BlockDiagonalCausalMask`` is ``causal=True, align="top_left"`` and
    ``BlockDiagonalCausalFromBottomRightMask`` is ``causal=True, align="bottom_right"``. Those
    are additive biases (0 where allowed, ``-inf`` elsewhere) over ``(1, T_total, H, Dk)``
    inputs; ``~mask`` is where they hold ``-inf``.

    Passing this mask to :func:`~attention_ref.scaled_dot_product_attention` with the packed
    arrays viewed as ``(H, T_total, Dk)`` gives :func:`varlen_attention`'s output and
    gradients, except on empty rows under ``empty_rows="uniform"``: there the dense call spreads
    the weight over all ``S_total`` keys, varlen over the sequence's own ``S_b``.

    Examples
    --------
    >>> from attention_ref.variants.varlen import block_diagonal_mask
    >>> block_diagonal_mask([0, 2, 3], [0, 3, 5], causal=True, align="bottom_right").astype(int)
    array([[1, 1, 0, 0, 0],
           [1, 1, 1, 0, 0],
           [0, 0, 0, 1, 1]])
    """
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    _check_same_count(cu_q, cu_k)
    causal = _check_causal(causal)
    align = check_choice("align", align, ALIGNS)
    window = check_window(window)
    allowed = np.zeros((int(cu_q[-1]), int(cu_k[-1])), dtype=bool)  # (T_total, S_total)
    for b in range(cu_q.size - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 == q0 or k1 == k0:
            continue  # an empty block: nothing to allow
        T_b, S_b = q1 - q0, k1 - k0
        pairs = AllowedPairs(
            T_b, S_b, causal=causal, window=window, offset=query_offset(T_b, S_b, align)
        )
        block = pairs.dense()  # (T_b, S_b), or None when the whole block may attend
        allowed[q0:q1, k0:k1] = True if block is None else block  # (V3)
    return allowed


# ----------------------------------------------------------------------------- attention


class VarlenTrace(NamedTuple):
    """One :func:`varlen_forward` call: the packed inputs and output, and each sequence's trace."""

    q: np.ndarray  #: (T_total, H, Dk) packed queries (compute dtype, the trace's own copy)
    k: np.ndarray  #: (S_total, Hkv, Dk) packed keys
    v: np.ndarray  #: (S_total, Hkv, Dv) packed values
    cu_seqlens_q: np.ndarray  #: (B + 1,) int64 query offsets
    cu_seqlens_k: np.ndarray  #: (B + 1,) int64 key offsets
    traces: tuple[
        AttentionTrace | None, ...
    ]  #: per sequence, the AttentionTrace of its (H, T_b, Dk) problem; None when T_b = 0 or S_b = 0
    out: np.ndarray  #: (T_total, H, Dv) packed output, (V2)
    #: (H, T_total) per-row logsumexp of the allowed scores (and the sink), -inf on empty rows
    #: (FlashAttention's ``softmax_lse`` layout), (V6)
    logsumexp: np.ndarray
    sinks: np.ndarray | None = None  #: (H,) the sink logits, or None


class VarlenGrads(NamedTuple):
    """Gradients of varlen attention, in the packed layout."""

    dq: np.ndarray  #: (T_total, H, Dk)
    dk: np.ndarray  #: (S_total, Hkv, Dk), summed over the query heads of each group
    dv: np.ndarray  #: (S_total, Hkv, Dv), summed over the query heads of each group
    dsinks: np.ndarray | None = None  #: (H,) summed over every sequence's rows; None without sinks


def _check_packed(q, k, v, dt):
    q, k, v = as_float("q", q, dt), as_float("k", k, dt), as_float("v", v, dt)
    for name, x, layout in (("q", q, Q_LAYOUT), ("k", k, K_LAYOUT), ("v", v, V_LAYOUT)):
        if x.ndim != 3:
            raise ValueError(
                f"{name} must be packed as {layout} (3 dims, no batch axis); got shape {x.shape}"
            )
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise ValueError(
                f"{name} must have at least one head and a width >= 1 (layout {layout}); got shape "
                f"{x.shape}"
            )
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k must have Dk={q.shape[2]} like q; got k.shape={k.shape}, q.shape={q.shape}"
        )
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"v must have the same (S_total, Hkv) as k = {k.shape[:2]}; got v.shape={v.shape}, "
            f"k.shape={k.shape}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q's head count H={q.shape[1]} must be a multiple of k's Hkv={k.shape[1]} "
            f"(grouped-query attention); got q.shape={q.shape}, k.shape={k.shape}"
        )
    return q, k, v


def varlen_forward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> VarlenTrace:
    r"""Varlen attention, returning a :class:`VarlenTrace` for :func:`varlen_backward`.

    Takes the same arguments as :func:`varlen_attention`.

    Returns
    -------
    VarlenTrace

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.varlen import varlen_forward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(5, 2, 4)), rng.normal(size=(7, 1, 4)), rng.normal(size=(7, 1, 3))
    >>> tr = varlen_forward(q, k, v, [0, 2, 5], [0, 4, 7], causal=True, align="bottom_right")
    >>> tr.out.shape, tr.logsumexp.shape, [t.probs.shape for t in tr.traces]
    ((5, 2, 3), (2, 5), [(2, 2, 4), (2, 3, 3)])
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse(
        ("mask", "key_padding_mask", "bias", "dropout_p", "dropout_mask", "rounding"),
        "varlen attention",
        "the packed layout has no (..., H, T, S) axes for them; use block_diagonal_mask "
        "with scaled_dot_product_attention",
    )
    dt = given.compute_dtype(q, k, v)
    q_in, k_in, v_in = q, k, v
    q, k, v = _check_packed(q, k, v, dt)
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q.shape[0] (T_total)")
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k.shape[0] (S_total)")
    _check_same_count(cu_q, cu_k)
    # Checked here once on the packed arrays: a batch whose sequences are all empty never
    # reaches sdpa_forward, which checks them again per sequence.
    opt = given.check(q.swapaxes(0, 1), k.swapaxes(0, 1))
    empty_rows = opt.empty_rows
    per_sequence = given.replace(dtype=dt)
    sinks = opt.sinks  # (H,) or None

    H, Dv = q.shape[1], v.shape[2]
    out = np.zeros((q.shape[0], H, Dv), dtype=dt)  # (T_total, H, Dv)
    lse = np.full((H, q.shape[0]), -np.inf, dtype=dt)  # (H, T_total)
    traces: list[AttentionTrace | None] = []
    for b in range(cu_q.size - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        where = f"sequence {b} (query rows {q0}:{q1}, key rows {k0}:{k1})"
        if q1 == q0:
            traces.append(None)  # (V5) no query: nothing to compute, its keys receive no gradient
            continue
        if k1 == k0:
            traces.append(None)
            if sinks is not None:
                # (V5), (A18) queries but no key: each row attends its sink only, out 0, lse sigma
                lse[:, q0:q1] = sinks[:, None]
                continue
            # (V5) queries but no key: every row is empty; "zero" leaves out = 0, lse = -inf.
            if empty_rows == "raise":
                raise ValueError(
                    f"empty_rows='raise': {where} has {q1 - q0} queries and no key to attend"
                )
            if empty_rows == "uniform":
                raise ValueError(
                    f"empty_rows='uniform' averages the sequence's values, but {where} has no key; "
                    "use 'zero' or 'nan', or give every sequence with queries at least one key"
                )
            if empty_rows == "nan":
                out[q0:q1] = np.nan
            continue
        # (V1) the sequence's own rows, heads first: (T_b, H, Dk) -> (H, T_b, Dk), a view.
        try:
            tr = sdpa_forward(
                q[q0:q1].swapaxes(0, 1),
                k[k0:k1].swapaxes(0, 1),
                v[k0:k1].swapaxes(0, 1),
                options=per_sequence,
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        out[q0:q1] = tr.out.swapaxes(0, 1)  # (H, T_b, Dv) -> (T_b, H, Dv)   (V2)
        lse[:, q0:q1] = tr.logsumexp  # (H, T_b)   (V6)
        traces.append(tr)
    return VarlenTrace(
        q=fresh(q, q_in),
        k=fresh(k, k_in),
        v=fresh(v, v_in),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        traces=tuple(traces),
        out=out,
        logsumexp=lse,
        sinks=None if sinks is None else fresh(sinks, given.sinks),
    )


def varlen_backward(
    dout: ArrayLike, trace: VarlenTrace, dlse: ArrayLike | None = None
) -> VarlenGrads:
    r"""Gradients of varlen attention from a forward :class:`VarlenTrace`, in the packed layout.

    Implements (V4) of ``docs/derivations/varlen.md``: each sequence's rows of ``dout`` go
    through :func:`~attention_ref.sdpa_backward` of that sequence alone, (A8)-(A16) of
    ``docs/derivations/attention.md``, and its gradients land in its own rows; sequences with no
    query or no key contribute zeros, (V5).

    Parameters
    ----------
    dout : array_like, shape (T_total, H, Dv)
        Gradient of the loss with respect to the packed output.
    trace : VarlenTrace
        What :func:`varlen_forward` returned.
    dlse : array_like, shape (H, T_total), optional
        Gradient with respect to the log-sum-exp (``trace.logsumexp``), (A17) of
        ``docs/derivations/attention.md``, sequence by sequence.

    Returns
    -------
    VarlenGrads
        ``dq`` (T_total, H, Dk), ``dk`` (S_total, Hkv, Dk), ``dv`` (S_total, Hkv, Dv), ``dsinks``
        ((H,), or None without sinks).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.varlen import varlen_forward, varlen_backward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(5, 2, 4)), rng.normal(size=(7, 1, 4)), rng.normal(size=(7, 1, 3))
    >>> tr = varlen_forward(q, k, v, [0, 2, 5], [0, 4, 7])
    >>> g = varlen_backward(rng.normal(size=tr.out.shape), tr)
    >>> g.dq.shape, g.dk.shape, g.dv.shape
    ((5, 2, 4), (7, 1, 4), (7, 1, 3))
    """
    if not isinstance(trace, VarlenTrace):
        raise TypeError(
            f"trace must be the VarlenTrace returned by varlen_forward; got {type(trace).__name__}"
        )
    dout = as_float("dout", dout, trace.out.dtype)
    if dout.shape != trace.out.shape:
        raise ValueError(
            f"dout must have the packed output's shape (T_total, H, Dv) = {trace.out.shape}; got "
            f"{dout.shape}"
        )
    if dlse is not None:
        dlse = check_dlse(dlse, trace.logsumexp.shape, trace.out.dtype, "(H, T_total)")
    cu_q, cu_k = trace.cu_seqlens_q, trace.cu_seqlens_k
    dsinks = None if trace.sinks is None else np.zeros_like(trace.sinks)  # (H,)
    dq = np.zeros_like(trace.q)  # (T_total, H, Dk); rows of sequences without keys stay 0   (V5)
    dk = np.zeros_like(trace.k)  # (S_total, Hkv, Dk); rows of sequences without queries stay 0
    dv = np.zeros_like(trace.v)  # (S_total, Hkv, Dv)
    for b, tr in enumerate(trace.traces):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        dlse_b = None if dlse is None else dlse[:, q0:q1]  # (H, T_b)
        if tr is None:
            if dsinks is not None and dlse_b is not None:
                dsinks += dlse_b.sum(axis=1)  # (A19) rows with only the sink: p_sink = 1, D = 0
            continue
        # (V4) the sequence's own backward, (A8)-(A19), on its (H, T_b, Dv) rows of dout
        g = sdpa_backward(dout[q0:q1].swapaxes(0, 1), tr, dlse_b)
        if dsinks is not None:
            dsinks += g.dsinks
        dq[q0:q1] = g.dq.swapaxes(0, 1)  # (H, T_b, Dk) -> (T_b, H, Dk)
        dk[k0:k1] = g.dk.swapaxes(0, 1)  # (Hkv, S_b, Dk) -> (S_b, Hkv, Dk)
        dv[k0:k1] = g.dv.swapaxes(0, 1)  # (Hkv, S_b, Dv) -> (S_b, Hkv, Dv)
    return VarlenGrads(dq=dq, dk=dk, dv=dv, dsinks=dsinks)


def varlen_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    return_lse: bool = False,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Attention over a packed batch of variable-length sequences, each attending only to itself.

    Parameters
    ----------
    q : array_like, shape (T_total, H, Dk)
        Queries of all sequences, packed along the first axis (FlashAttention's ``(total_q,
        nheads, headdim)``).
    k : array_like, shape (S_total, Hkv, Dk)
        Keys, packed. ``Hkv`` must divide ``H``; query head ``h`` uses key/value head
        ``h // (H // Hkv)``.
    v : array_like, shape (S_total, Hkv, Dv)
        Values, packed like ``k``.
    cu_seqlens_q : array_like of int, shape (B + 1,)
        Query offsets: 0, non-decreasing, last entry T_total. Sequence ``b`` owns rows
        ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]``; equal neighbours make an empty sequence.
    cu_seqlens_k : array_like of int, shape (B + 1,)
        Key/value offsets, the same for ``k`` and ``v``, last entry S_total; as many sequences as
        ``cu_seqlens_q``. (FlashAttention's ``max_seqlen_q``/``max_seqlen_k`` are not needed:
        the lengths are read from the offsets.)
    options : AttentionOptions, optional
        The attention options as one object.
    **kwargs
        Fields of :class:`~attention_ref.AttentionOptions` by name, applied inside each
        sequence: ``causal``, ``window``, ``chunk_size`` and ``sink_tokens`` (with ``align``:
        ``i' = i`` or ``i' = i + S_b - T_b``, counted inside the sequence; FlashAttention's varlen
        functions use ``"bottom_right"``, the default here is the library's ``"top_left"``),
        ``sinks`` ((H,), every row of every sequence; a sequence with queries and no key then
        gives out 0, lse ``sinks[h]``), ``softcap``, ``scale``, ``dtype`` and
        ``empty_rows`` (``"uniform"`` averages the values of the row's own sequence; a sequence
        with queries but no key, S_b = 0, has only empty rows: 0 under ``"zero"``, NaN under
        ``"nan"``, a ``ValueError`` under ``"raise"`` and ``"uniform"``). ``mask``, ``bias`` and
        dropout are refused (``ValueError``): the packed layout has no (..., H, T, S) axes for
        them; use :func:`block_diagonal_mask` with the plain path.

    return_lse : bool, default False
        Also return the log-sum-exp, in FlashAttention's ``softmax_lse`` layout (H, T_total).

    Returns
    -------
    out : ndarray, shape (T_total, H, Dv)
        Packed like ``q``; rows of sequence ``b`` are attention of its queries to its keys, (V2).
    lse : ndarray, shape (H, T_total)
        Only with ``return_lse=True``; ``-inf`` on a row with nothing to attend.

    Notes
    -----
    .. math::
        \text{out}[c^q_b + i] = \operatorname{attention}\big(q[c^q_b : c^q_{b+1}],\
        k[c^k_b : c^k_{b+1}],\ v[c^k_b : c^k_{b+1}]\big)_i

    with :math:`c^q = ` ``cu_seqlens_q``, :math:`c^k = ` ``cu_seqlens_k`` (heads moved first
    for the call), see ``docs/derivations/varlen.md``. Equivalently, dense attention over the
    packed axis with :func:`block_diagonal_mask`. :func:`varlen_forward` also returns the
    per-row logsumexp, in FlashAttention's ``softmax_lse`` layout ``(H, T_total)``.

    References
    ----------
    Dao (2023), "FlashAttention-2" (``flash_attn_varlen_func``); xformers
    ``xformers.ops.fmha.attn_bias.BlockDiagonalMask``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.variants.varlen import varlen_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(5, 2, 4)), rng.normal(size=(5, 2, 4)), rng.normal(size=(5, 2, 3))
    >>> out = varlen_attention(q, k, v, [0, 3, 5], [0, 3, 5], causal=True)   # lengths 3 and 2
    >>> second = scaled_dot_product_attention(q[3:].swapaxes(0, 1), k[3:].swapaxes(0, 1),
    ...                                       v[3:].swapaxes(0, 1), causal=True)   # (H, T_1, Dv)
    >>> bool(np.allclose(out[3:], second.swapaxes(0, 1), rtol=1e-12, atol=0))
    True
    """
    trace = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, options=options, **kwargs)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    return (trace.out, trace.logsumexp) if return_lse else trace.out


def varlen_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    dlse: ArrayLike | None = None,
    **kwargs: Any,
) -> VarlenGrads:
    r"""Gradients of :func:`varlen_attention`, in the packed layout.

    Recomputes the forward, then applies (V4) of ``docs/derivations/varlen.md``: per sequence,
    (A8)-(A16) of ``docs/derivations/attention.md`` (see :func:`varlen_backward`, which skips
    the recompute).

    Parameters
    ----------
    dout : array_like, shape (T_total, H, Dv)
        Gradient of the loss with respect to the packed output.
    q, k, v, cu_seqlens_q, cu_seqlens_k, options, **kwargs
        The forward's inputs and options, as for :func:`varlen_attention`.
    dlse : array_like, shape (H, T_total), optional
        Gradient with respect to the log-sum-exp ``return_lse=True`` returned.

    Returns
    -------
    VarlenGrads
        ``dq`` (T_total, H, Dk), ``dk`` (S_total, Hkv, Dk), ``dv`` (S_total, Hkv, Dv). A row of
        ``dk``/``dv`` gets gradient only from the queries of its own sequence; sequences with no
        query or no key contribute zeros, (V5). ``dsinks`` (H,) with sinks, else None.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.varlen import varlen_attention_backward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(4, 2, 3)), rng.normal(size=(6, 2, 3)), rng.normal(size=(6, 2, 5))
    >>> g = varlen_attention_backward(
    ...     rng.normal(size=(4, 2, 5)), q, k, v, [0, 1, 1, 4], [0, 2, 3, 6]
    ... )
    >>> g.dq.shape, g.dk.shape, bool((g.dk[2] == 0).all())    # key row 2: a sequence with no query
    ((4, 2, 3), (6, 2, 3), True)
    """
    trace = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, options=options, **kwargs)
    return varlen_backward(dout, trace, dlse)
