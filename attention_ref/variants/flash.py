r"""Tiled scaled dot-product attention: the FlashAttention-2 algorithm, forward and backward.

The same function as :func:`~attention_ref.scaled_dot_product_attention`, computed block by
block so that no ``(T, S)`` array is ever held: the forward visits the keys ``block_k`` at a
time and keeps, per query row, a running max ``m``, a running sum ``l`` and an unnormalised
output ``acc``, rescaled whenever the max grows (the online softmax, (F1)-(F5)); it returns the
output and the per-row logsumexp. The backward recomputes each block's weights from q, k and the
logsumexp, (F6), and replaces the softmax's row reduction by ``D = rowsum(dout * out)``, (F7).
Memory is O((T + S) x (Dk + Dv)) per head plus one ``(block_q, block_k)`` block.

Every option of the plain path but dropout: mask, bias, causal/window with both alignments,
chunks and sink tokens, learnable sinks, softcap, scale, GQA, the ``empty_rows`` policies;
blocks with no allowed pair are skipped (a chunked or windowed problem visits only the tiles
near its diagonal). Dropout is refused: its keep-mask would be the ``(..., H, T, S)`` array that
tiling avoids. ``num_splits`` computes the keys in chunks whose partial states are merged
(split-KV, flash-decoding), forward and backward; the backward takes the log-sum-exp's
cotangent ``dlse``.

Derivation: ``docs/derivations/flash.md``, (F1)-(F9); the stages it shares with the plain path
cite (A1)-(A16) of ``docs/derivations/attention.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ..core._validate import as_float, check_positive_int, resolve_dtype, sum_to_shape
from ..core.attention import AttentionGrads, check_dlse, check_qkv, sinks_backward
from ..core.block_mask import BlockMask, check_block_mask
from ..core.masks import AllowedPairs, _and, _kind, _tile
from ..core.merge import (
    AttentionState,
    add_sinks,
    add_sinks_backward,
    merge_attention_states,
    merge_attention_states_backward,
)
from ..core.mods import ScoreMod, mod_indices, score_mod_backward, score_mod_forward
from ..core.options import AttentionOptions
from ..core.primitives import row_dot
from ..core.scores import group_heads, masked_fill_value, ungroup_heads

#: Default query rows per block. Large blocks amortise NumPy's per-call overhead; at 256 x 256 the
#: tiled forward+backward took 0.6-0.75x the plain path's time at T = S = 1024..4096
#: (single-threaded BLAS; benchmarks/README.md), and each of a block's arrays is 0.5 MiB per head in
#: float64.
BLOCK_Q = 256
#: Default keys per block (see ``BLOCK_Q``).
BLOCK_K = 256


class FlashOutput(NamedTuple):
    """What :func:`flash_attention_forward` returns: all that its backward needs besides q, k, v."""

    out: np.ndarray  #: (..., H, T, Dv) attention output, (F5)
    logsumexp: (
        np.ndarray
    )  #: (..., H, T) logsumexp of each row's allowed logits, (F5); -inf for an empty row


class OnlineSoftmaxState(NamedTuple):
    """The running state of the online softmax of a block of query rows, (F1).

    After the keys seen so far, for each row: ``row_max`` is the largest allowed logit (the
    finite fill while none was allowed), ``row_sum`` the sum of ``exp(logit - row_max)`` over the
    allowed keys, ``acc`` the same sum weighted by the keys' values. ``acc / row_sum`` is the
    softmax-weighted mean of the values seen.
    """

    row_max: np.ndarray  #: (..., T, 1) m, running max of the allowed logits
    row_sum: np.ndarray  #: (..., T, 1) l, running sum of exp(logit - m)
    acc: np.ndarray  #: (..., T, Dv) running sum of exp(logit - m) v


def online_softmax_init(
    rows: tuple[int, ...], dv: int, dtype: DTypeLike = np.float64
) -> OnlineSoftmaxState:
    r"""The state before any key: ``m`` the finite fill, ``l = 0``, ``acc = 0``, (F1) with no key.

    Parameters
    ----------
    rows : tuple of int
        Shape of the block of rows, e.g. ``(..., H, T)`` (a GQA view ``(..., Hkv, G, T)`` works
        too).
    dv : int
        Width of the values, Dv.
    dtype : dtype, default float64

    Returns
    -------
    OnlineSoftmaxState
        ``row_max`` and ``row_sum`` of shape ``rows + (1,)``, ``acc`` of shape ``rows + (Dv,)``.

    Examples
    --------
    >>> from attention_ref.variants.flash import online_softmax_init
    >>> st = online_softmax_init((2, 3), 4)
    >>> st.row_max.shape, st.row_sum.shape, st.acc.shape, float(st.row_sum.sum())
    ((2, 3, 1), (2, 3, 1), (2, 3, 4), 0.0)
    """
    dt = resolve_dtype(dtype)
    # The max starts at the finite fill f, not -inf: (F2)'s m_old - m_new is then never inf - inf.
    return OnlineSoftmaxState(
        row_max=np.full(rows + (1,), masked_fill_value(dt), dtype=dt),  # (..., T, 1)
        row_sum=np.zeros(rows + (1,), dtype=dt),  # (..., T, 1)
        acc=np.zeros(rows + (dv,), dtype=dt),  # (..., T, Dv)
    )


def online_softmax_update(
    state: OnlineSoftmaxState,
    logits: np.ndarray,
    values: np.ndarray,
    allowed: np.ndarray | None = None,
) -> OnlineSoftmaxState:
    r"""Take one block of keys into the online softmax: (F2)-(F4) of ``docs/derivations/flash.md``.

    Parameters
    ----------
    state : OnlineSoftmaxState
        The state after the previous blocks (:func:`online_softmax_init` before the first).
    logits : ndarray, shape (..., T, Sb)
        This block's logits (scores after softcap and bias), one column per key of the block.
        Disallowed entries may hold anything finite or ``-inf``: they are replaced by the fill.
    values : ndarray, shape (..., Sb, Dv)
        The block's values; broadcast against ``logits`` by ``@`` (a GQA view works).
    allowed : ndarray of bool, optional
        Broadcastable to ``logits``; True = may attend. None = every key of the block is allowed.

    Returns
    -------
    OnlineSoftmaxState
        A new state; ``state`` is not modified.

    Notes
    -----
    With :math:`m` the running max, :math:`l` the running sum and :math:`a` the accumulator,

    .. math::
        m' = \max(m, \max_j \tilde\ell_j) \ \text{(F2)},\quad
        l' = e^{m - m'}\, l + \sum_j A_j\, e^{\tilde\ell_j - m'} \ \text{(F3)},\quad
        a' = e^{m - m'}\, a + \sum_j A_j\, e^{\tilde\ell_j - m'}\, v_j \ \text{(F4)}.

    The factor :math:`e^{m - m'} \le 1` re-expresses the old sums relative to the new max.

    References
    ----------
    Milakov & Gimelshein (2018), "Online normalizer calculation for softmax";
    Dao (2023), "FlashAttention-2".

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import softmax
    >>> from attention_ref.variants.flash import online_softmax_init, online_softmax_update
    >>> x = np.array([[1.0, 5.0, 2.0, 0.5]])                 # one row, S = 4
    >>> eye = np.eye(4)                                      # v = I: the output is the weights
    >>> st = online_softmax_init((1,), 4)
    >>> for j0 in (0, 2):                                    # two blocks of 2 keys
    ...     st = online_softmax_update(st, x[:, j0:j0 + 2], eye[j0:j0 + 2])
    >>> bool(np.allclose(st.acc / st.row_sum, softmax(x), rtol=1e-15, atol=0))
    True
    """
    fill = masked_fill_value(logits.dtype)
    if allowed is not None:
        logits = np.where(allowed, logits, fill)  # (A4) disallowed -> the finite fill
    m_new = np.maximum(state.row_max, logits.max(axis=-1, keepdims=True))  # (..., T, 1)   (F2)
    rescale = np.exp(state.row_max - m_new)  # (..., T, 1) e^{m - m'} <= 1   (F3)
    p = logits - m_new
    np.exp(p, out=p)  # (..., T, Sb) e^{l~ - m'}   (F3)
    if allowed is not None:
        # a row with nothing allowed yet has m' = fill and exp(fill - fill) = 1: zero it
        p *= allowed
    row_sum = rescale * state.row_sum + p.sum(axis=-1, keepdims=True)  # (..., T, 1)   (F3)
    acc = rescale * state.acc  # (..., T, Dv)   (F4)
    acc += p @ values  # (..., T, Sb) @ (..., Sb, Dv) -> (..., T, Dv)   (F4)
    return OnlineSoftmaxState(row_max=m_new, row_sum=row_sum, acc=acc)


def online_softmax_finish(state: OnlineSoftmaxState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""``(out, logsumexp, row_is_empty)`` from the final state, (F5).

    ``out = acc / l`` and ``logsumexp = m + log l`` on rows that saw an allowed key; a row that saw
    none has ``l = 0`` (every row that saw one has ``l >= 1``): its ``out`` is 0 and its logsumexp
    ``-inf``, for the caller's empty-row policy to act on.

    Parameters
    ----------
    state : OnlineSoftmaxState
        The state after the last block.

    Returns
    -------
    out : ndarray, shape (..., T, Dv)
    logsumexp : ndarray, shape (..., T)
    row_is_empty : ndarray of bool, shape (..., T)

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.flash import (
    ...     online_softmax_finish,
    ...     online_softmax_init,
    ...     online_softmax_update,
    ... )
    >>> st = online_softmax_update(online_softmax_init((2,), 1), np.zeros((2, 3)), np.ones((3, 1)),
    ...                            allowed=np.array([[True], [False]]))
    >>> out, lse, empty = online_softmax_finish(st)
    >>> out[:, 0].tolist(), bool(np.isclose(lse[0], np.log(3))), float(lse[1]), empty.tolist()
    ([1.0, 0.0], True, -inf, [False, True])
    """
    row_sum = state.row_sum[..., 0]  # (..., T)
    # row_sum >= 1 once a row has seen an allowed key: its max contributes e^0
    row_is_empty = row_sum == 0
    safe_l = np.where(row_is_empty, 1.0, row_sum)[..., None]  # (..., T, 1)
    out = state.acc / safe_l  # (..., T, Dv)   (F5)
    lse = state.row_max[..., 0] + np.log(safe_l[..., 0])  # (..., T)   (F5)
    lse[row_is_empty] = -np.inf
    return out, lse, row_is_empty


# ----------------------------------------------------------------------------- the tiled problem


class _Tiled(NamedTuple):
    """The validated inputs, in GQA views: query head h = kv * G + g."""

    qs: np.ndarray  # (..., Hkv, G, T, Dk) queries times scale, (A1)
    k: np.ndarray  # (..., Hkv, 1, S, Dk)
    v: np.ndarray  # (..., Hkv, 1, S, Dv)
    softcap: float | None
    bias: np.ndarray | None  # (..., Hkv|1, G|1, T|1, S|1): the bias in a GQA view
    bias_shape: tuple[int, ...]  # the bias's own shape, for dbias
    pairs: AllowedPairs  # which pairs may attend, in the same GQA view, tile by tile (A4)
    empty_rows: str
    scale: float
    block_q: int
    block_k: int
    sinks: np.ndarray | None  # (H,) the sink logits, or None
    num_splits: int  # key chunks computed as separate partials and merged, (C1)-(C3)
    score_mod: ScoreMod | None  # applied per block on the (B, H, Tb, Sb) view, (A20)
    heads: tuple[int, int]  # (B, H) for the mods' index arrays
    #: (B|1, H|1, nq, nk) int8 block kinds of a BlockMask (0 empty, 1 partial, 2 full), or None
    block_kinds: np.ndarray | None
    #: the mask mod of a BlockMask's partial blocks, as pairs (B, H, Tb, Sb), or None
    block_mod: AllowedPairs | None


def _grouped_view(x: np.ndarray, ndim: int, num_kv_heads: int) -> np.ndarray:
    """An array broadcastable to (..., H, T, S), as (..., Hkv|1, G|1, T|1, S|1): ``ndim + 1``
    dims."""
    shape = (1,) * (ndim - x.ndim) + tuple(x.shape)  # (..., H|1, T|1, S|1)
    heads = shape[-3]
    split = (1, 1) if heads == 1 else (num_kv_heads, heads // num_kv_heads)
    return x.reshape(shape[:-3] + split + shape[-2:])


def _prepare(
    q, k, v, options, kwargs, block_q, block_k, num_splits=1, block_mask=None, check=False
) -> _Tiled:
    given = AttentionOptions.of(options, **kwargs)
    given.refuse(
        ("dropout_p", "dropout_mask"),
        "the tiled path",
        "its keep-mask would be a (..., H, T, S) array, the one thing tiling avoids; use "
        "sdpa_forward/sdpa_backward for dropout",
        what="dropout",
    )
    given.refuse(
        ("rounding",),
        "the tiled path",
        "the rounding policy of the baselines is the plain path's (sdpa_forward)",
    )
    dt = resolve_dtype(given.dtype)
    q, k, v = check_qkv(q, k, v, dt)
    opt = given.check(q, k, mods=True)
    block_q = check_positive_int("block_q", block_q)
    block_k = check_positive_int("block_k", block_k)
    num_splits = check_positive_int("num_splits", num_splits)
    T, S, Hkv, ndim = q.shape[-2], k.shape[-2], k.shape[-3], q.ndim
    bias = None if opt.bias is None else _grouped_view(opt.bias, ndim, Hkv)
    mask = None if opt.mask is None else _grouped_view(opt.mask, ndim, Hkv)
    heads = (q.shape[0], q.shape[1]) if ndim == 4 else (1, 1)
    block_kinds = block_mod = None
    if block_mask is not None:
        block_q, block_k = _check_block_mask(block_mask, q.shape, S, block_q, block_k, num_splits)
        mod = opt.mask_mod if opt.mask_mod is not None else block_mask.mask_mod
        if check:
            report = check_block_mask(block_mask, mod, B=heads[0], H=heads[1])
            if not report.ok:
                raise ValueError(f"check=True: the block_mask is wrong: {report}")
        block_kinds = block_mask.kinds()  # (B|1, H|1, nq, nk)
        if mod is not None:
            block_mod = AllowedPairs(T, S, mask_mod=mod, heads=heads)
        # the block mask decides where the mask_mod is called
        opt = dataclasses.replace(opt, mask_mod=None)
    elif check:
        raise ValueError("check=True verifies a block_mask; got block_mask=None")
    return _Tiled(
        qs=group_heads(
            q * opt.score_scale, Hkv
        ),  # (..., Hkv, G, T, Dk)   (A1): scale folded into q
        k=k[..., :, None, :, :],  # (..., Hkv, 1, S, Dk)
        v=v[..., :, None, :, :],  # (..., Hkv, 1, S, Dv)
        softcap=opt.softcap,
        bias=bias,
        bias_shape=() if opt.bias is None else opt.bias.shape,
        pairs=AllowedPairs.from_options(
            opt, T, S, mask=mask, bias=bias, heads=heads, num_kv_heads=Hkv
        ),
        empty_rows=opt.empty_rows,
        scale=opt.score_scale,
        block_q=block_q,
        block_k=block_k,
        sinks=opt.sinks,
        num_splits=num_splits,
        score_mod=opt.score_mod,
        heads=heads,
        block_kinds=block_kinds,
        block_mod=block_mod,
    )


def _check_block_mask(
    bm: Any, q_shape: tuple[int, ...], S: int, block_q: int, block_k: int, num_splits: int
) -> tuple[int, int]:
    """The tile sizes of a BlockMask, checked against the inputs."""
    if not isinstance(bm, BlockMask):
        raise TypeError(
            f"block_mask must be an attention_ref BlockMask; got {type(bm).__name__} "
            "(attention_ref.adapters.torch.block_mask_from_torch converts torch's)"
        )
    if len(q_shape) != 4:
        raise ValueError(f"block_mask needs 4-D inputs q (B, H, T, Dk); got q.shape={q_shape}")
    B, H, T = q_shape[0], q_shape[1], q_shape[2]
    Bm, Hm, Q_LEN, KV_LEN = bm.shape
    if (Q_LEN, KV_LEN) != (T, S):
        raise ValueError(
            f"block_mask was made for (Q_LEN, KV_LEN) = {(Q_LEN, KV_LEN)}; got T={T}, S={S}"
        )
    if Bm not in (1, B) or Hm not in (1, H):
        raise ValueError(
            f"block_mask's (B, H) = {(Bm, Hm)} must be 1 or the inputs' (B, H) = {(B, H)}"
        )
    qb, kb = bm.BLOCK_SIZE
    if (block_q, block_k) not in ((BLOCK_Q, BLOCK_K), (qb, kb)):
        raise ValueError(
            f"with a block_mask the tiles are its BLOCK_SIZE {(qb, kb)}; got block_q={block_q}, "
            f"block_k={block_k}"
        )
    if num_splits != 1 and -(-S // num_splits) % kb:
        raise ValueError(
            f"num_splits={num_splits} cuts the keys in chunks of {-(-S // num_splits)}, not a "
            f"multiple of the block_mask's KV_BLOCK {kb}"
        )
    return qb, kb


def _tile_pairs(tp: _Tiled, i0: int, i1: int, j0: int, j1: int) -> tuple[str, np.ndarray | None]:
    """``(kind, allowed)`` of one tile, (A4): the allowed pairs' block and, with a BlockMask, its
    marks as a kernel reads them: an empty block is skipped, a full one is computed without the
    mask mod, a partial one with it."""
    kind, allowed = tp.pairs.block(i0, i1, j0, j1)
    if tp.block_kinds is None or kind == "empty":
        return kind, allowed
    marks = tp.block_kinds[:, :, i0 // tp.block_q, j0 // tp.block_k]  # (B|1, H|1)
    if not marks.any():
        return "empty", None  # skipped for every batch element and head
    grid = (marks == 2)[..., None, None]  # (B|1, H|1, 1, 1) full blocks: every pair
    partial = marks == 1
    if partial.any():
        mod = (
            np.ones((1, 1, 1, 1), dtype=bool)  # no mask mod: torch's noop_mask
            if tp.block_mod is None
            else tp.block_mod.block(i0, i1, j0, j1)[1]
        )
        mod = np.ones((1, 1, 1, 1), dtype=bool) if mod is None else mod
        grid = grid | (partial[..., None, None] & mod)  # (B|1, H|1, Tb|1, Sb|1)
    grid = _grouped_view(grid, 4, tp.k.shape[-4])  # (B|1, Hkv|1, G|1, Tb|1, Sb|1)
    return _kind(_and(allowed, grid))


def _splits(S: int, num_splits: int) -> list[tuple[int, int]]:
    """The key ranges of ``num_splits`` contiguous chunks of ``ceil(S / num_splits)`` keys (the
    last ones may be shorter, or empty when ``num_splits > S``), as flash-decoding splits them."""
    size = -(-S // num_splits)
    return [(min(n * size, S), min((n + 1) * size, S)) for n in range(num_splits)]


def _block_logits(
    tp: _Tiled, i0: int, i1: int, j0: int, j1: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(capped, mod_input, logits)`` of one block, (A1)-(A3) and the score mod (A20), each
    (..., Hkv, G, Tb, Sb); ``mod_input`` is ``logits`` without a score mod."""
    kt = tp.k[..., j0:j1, :].swapaxes(-1, -2)  # (..., Hkv, 1, Dk, Sb)
    scores = (
        tp.qs[..., i0:i1, :] @ kt
    )  # (..., Hkv, G, Tb, Dk) @ (..., Hkv, 1, Dk, Sb) -> (..., Hkv, G, Tb, Sb)   (A1)
    capped = scores
    if tp.softcap is not None:
        capped /= tp.softcap
        np.tanh(capped, out=capped)
        capped *= tp.softcap  # (A2) cap * tanh(s / cap), in place
    logits = capped if tp.bias is None else capped + _tile(tp.bias, i0, i1, j0, j1)  # (A3)
    if tp.score_mod is None:
        return capped, logits, logits
    shape = logits.shape  # (B, Hkv, G, Tb, Sb), viewed as (B, H, Tb, Sb) for the mod
    flat = logits.reshape(tp.heads + shape[-2:])
    idx = mod_indices(*tp.heads, np.arange(i0, i1), np.arange(j0, j1))
    return capped, logits, score_mod_forward(tp.score_mod, flat, idx).reshape(shape)  # (A20)


def _mod_masks(allowed: np.ndarray | None, logits: np.ndarray) -> np.ndarray | None:
    """``allowed`` with the pairs a score mod sent to ``-inf`` masked, (A20)."""
    neg = np.isneginf(logits.real)
    return _and(allowed, ~neg) if neg.any() else allowed


def _raise_if_empty(row_is_empty: np.ndarray) -> None:
    where = np.argwhere(row_is_empty)
    raise ValueError(
        f"empty_rows='raise': {len(where)} query row(s) have no key to attend; the first at "
        f"index {tuple(int(i) for i in where[0])} of (..., H, T)"
    )


# ----------------------------------------------------------------------------- forward


def flash_attention_forward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    num_splits: int = 1,
    return_lse: bool = True,
    block_mask: BlockMask | None = None,
    check: bool = False,
    **kwargs: Any,
) -> FlashOutput | np.ndarray:
    r"""Scaled dot-product attention computed block by block with the online softmax.

    The same result as :func:`~attention_ref.scaled_dot_product_attention` (to round-off) without
    ever holding a ``(T, S)`` array: for each block of ``block_q`` query rows, the keys are
    visited ``block_k`` at a time and folded into a running max, sum and output, (F2)-(F4).

    Parameters
    ----------
    q : array_like, shape (..., H, T, Dk)
        Queries.
    k : array_like, shape (..., Hkv, S, Dk)
        Keys; query head ``h`` uses key/value head ``h // (H // Hkv)``.
    v : array_like, shape (..., Hkv, S, Dv)
        Values.
    options : AttentionOptions, optional
        The attention options as one object.
    block_q, block_k : int, default 256
        Query rows and keys per block; any positive size (a block may overhang the sequence end).
    num_splits : int, default 1
        Split-KV (flash-decoding): the keys are cut into ``num_splits`` contiguous chunks of
        ``ceil(S / num_splits)``, each chunk's partial state ``(out, lse)`` is computed on its own
        and the partials are merged by :func:`~attention_ref.merge_attention_states`, (C1)-(C3)
        of ``docs/derivations/merge.md``. A chunk with no allowed key for a row is a ``-inf``
        partial; with ``sinks`` the sink is added once, after the merge.
    return_lse : bool, default True
        Return ``(out, logsumexp)`` (a :class:`~attention_ref.variants.flash.FlashOutput`);
        False returns ``out`` alone.
    **kwargs
        Any field of :class:`~attention_ref.AttentionOptions` by name, with the plain path's
        meaning, except dropout (``dropout_p`` and ``dropout_mask`` raise ``ValueError``: the
        keep-mask would be a (..., H, T, S) array; use :func:`~attention_ref.sdpa_forward`). The
        mask and bias are sliced per block, never broadcast whole; causal and window are built
        per block from positions. Under ``empty_rows="raise"`` the error comes after the pass
        that finds the empty row; an empty row's logsumexp is ``-inf`` under every policy.

    Returns
    -------
    FlashOutput
        ``out`` (..., H, T, Dv) and ``logsumexp`` (..., H, T), new arrays: the natural-log
        log-sum-exp of the row's allowed logits (with the sink's term when ``sinks`` is given),
        ``-inf`` on a row with nothing to attend. ``out`` alone when ``return_lse=False``.

    Notes
    -----
    Per query row, with the key blocks visited in order and :math:`\tilde\ell` the masked logits
    (A1)-(A4):

    .. math::
        m \leftarrow \max(m, \max_j \tilde\ell_j),\quad
        l \leftarrow e^{m_\text{old} - m} l + \textstyle\sum_j e^{\tilde\ell_j - m},\quad
        a \leftarrow e^{m_\text{old} - m} a + \textstyle\sum_j e^{\tilde\ell_j - m} v_j,

    then :math:`\text{out} = a / l` and :math:`\text{logsumexp} = m + \log l`, (F2)-(F5) of
    ``docs/derivations/flash.md``. A block with no allowed pair is skipped. Dropout is not
    supported here (its keep-mask would be a (..., H, T, S) array); use the plain path.

    References
    ----------
    Milakov & Gimelshein (2018), "Online normalizer calculation for softmax";
    Dao et al. (2022), "FlashAttention"; Dao (2023), "FlashAttention-2".

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.variants.flash import flash_attention_forward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(4, 7, 8)), rng.normal(size=(2, 9, 8)), rng.normal(size=(2, 9, 5))
    >>> res = flash_attention_forward(
    ...     q, k, v, causal=True, align="bottom_right", block_q=3, block_k=4
    ... )
    >>> res.out.shape, res.logsumexp.shape
    ((4, 7, 5), (4, 7))
    >>> plain = scaled_dot_product_attention(q, k, v, causal=True, align="bottom_right")
    >>> bool(np.abs(res.out - plain).max() <= 1e-12 * np.abs(plain).max())
    True
    """
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    tp = _prepare(q, k, v, options, kwargs, block_q, block_k, num_splits, block_mask, check)
    S = tp.k.shape[-2]
    # (C1)-(C3) split-KV: each key chunk's partial state, then their merge; one chunk is the
    # plain tiled pass
    partials = [_partial_forward(tp, j_lo, j_hi) for j_lo, j_hi in _splits(S, tp.num_splits)]
    if len(partials) == 1:
        out, lse = partials[0]
    else:
        out, lse = merge_attention_states(
            np.stack([p.out for p in partials]), np.stack([p.lse for p in partials])
        )
    if tp.sinks is not None:
        out, lse = add_sinks(out, lse, tp.sinks)  # (C6) once, after the merge: no row is empty
    else:
        out = _empty_rows_forward(out, lse, tp.v[..., 0, :, :], tp.empty_rows)
    result = FlashOutput(out=out, logsumexp=lse)
    return result if return_lse else result.out


def _partial_forward(tp: _Tiled, j_lo: int, j_hi: int) -> AttentionState:
    """Attention of every query row over the keys ``j_lo:j_hi`` only, without sinks, (F1)-(F5).

    Shapes (..., H, T, Dv) and (..., H, T); out 0 and lse ``-inf`` on a row with no allowed key
    among them.
    """
    dt = tp.qs.dtype
    rows, T, Dv = tp.qs.shape[:-2], tp.qs.shape[-2], tp.v.shape[-1]
    out = np.empty(rows + (T, Dv), dtype=dt)  # (..., Hkv, G, T, Dv)
    lse = np.empty(rows + (T,), dtype=dt)  # (..., Hkv, G, T)
    for i0 in range(0, T, tp.block_q):
        i1 = min(i0 + tp.block_q, T)
        state = online_softmax_init(rows + (i1 - i0,), Dv, dt)  # (F1) before any key
        for j0 in range(j_lo, j_hi, tp.block_k):
            j1 = min(j0 + tp.block_k, j_hi)
            kind, allowed = _tile_pairs(tp, i0, i1, j0, j1)  # (A4) for this tile
            if kind == "empty":
                continue  # skipped, exactly: its max is the fill, so (F2)-(F4) would change nothing
            _, _, logits = _block_logits(tp, i0, i1, j0, j1)  # (..., Hkv, G, Tb, Sb) (A1)-(A3)
            if tp.score_mod is not None:
                allowed = _mod_masks(allowed, logits)
            state = online_softmax_update(
                state, logits, tp.v[..., j0:j1, :], allowed
            )  # (A4), (F2)-(F4)
        out[..., i0:i1, :], lse[..., i0:i1], _ = online_softmax_finish(state)  # (F5)
    return AttentionState(out=ungroup_heads(out), lse=ungroup_heads(lse[..., None])[..., 0])


def _empty_rows_forward(out: np.ndarray, lse: np.ndarray, v: np.ndarray, policy: str) -> np.ndarray:
    """(A5)'s policy on the rows with no allowed key (lse = -inf), whose ``out`` is 0 ("zero").

    ``out`` (..., H, T, Dv) is overwritten where a policy applies, and returned; ``v`` is
    (..., Hkv, S, Dv).
    """
    row_is_empty = np.isneginf(lse)  # (..., H, T)
    if not row_is_empty.any():
        return out
    if policy == "raise":
        _raise_if_empty(row_is_empty)
    if policy == "uniform":
        group = out.shape[-3] // v.shape[-3]
        mean_v = np.repeat(v.mean(axis=-2), group, axis=-2)[..., None, :]  # (..., H, 1, Dv)
        out[row_is_empty] = np.broadcast_to(mean_v, out.shape)[row_is_empty]
    elif policy == "nan":
        out[row_is_empty] = np.nan
    return out


def _empty_rows_backward(dv: np.ndarray, dout: np.ndarray, lse: np.ndarray, policy: str) -> None:
    """Add to ``dv`` (..., Hkv, S, Dv) what the empty rows (lse = -inf) of ``dout`` (..., H, T, Dv)
    send it under ``policy``: nothing ("zero"), ``dout / S`` to every key ("uniform"), NaN ("nan").
    """
    row_is_empty = np.isneginf(lse)  # (..., H, T)
    if not row_is_empty.any():
        return
    Hkv, S = dv.shape[-3], dv.shape[-2]
    empty = group_heads(row_is_empty[..., None], Hkv)  # (..., Hkv, G, T, 1)
    if policy == "uniform":
        # (A9) with P = 1/S on the row: every key of the row's kv head gets dout / S
        dv += (np.where(empty, group_heads(dout, Hkv), 0.0).sum(axis=(-3, -2)) / S)[
            ..., None, :
        ]  # (..., Hkv, 1, Dv)
    elif policy == "nan":
        # (A9) with P = NaN on the row: its kv head's dv is NaN
        dv[empty.any(axis=(-3, -2, -1))] = np.nan


# ----------------------------------------------------------------------------- backward


def _check_saved(dout, out, lse, q_shape, v_shape, dt):
    """dout, out (..., H, T, Dv) and logsumexp (..., H, T) as float arrays of the right shapes."""
    expected = q_shape[:-1] + (v_shape[-1],)  # (..., H, T, Dv)
    dout = as_float("dout", dout, dt)
    out = as_float("out", out, dt)
    lse = as_float("logsumexp", lse, dt)
    for name, x, shape, layout in (
        ("dout", dout, expected, "(..., H, T, Dv)"),
        ("out", out, expected, "(..., H, T, Dv)"),
        ("logsumexp", lse, expected[:-1], "(..., H, T)"),
    ):
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {layout} = {shape}; got {x.shape}")
    bad = np.isnan(lse) | np.isposinf(lse)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"logsumexp must be finite, or -inf on an empty row (what flash_attention_forward "
            f"returns); got logsumexp[{first}] = {lse[first]}"
        )
    return dout, out, lse


def flash_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    logsumexp: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    num_splits: int = 1,
    dlse: ArrayLike | None = None,
    block_mask: BlockMask | None = None,
    check: bool = False,
    **kwargs: Any,
) -> AttentionGrads:
    r"""Gradients of scaled dot-product attention, block by block, from the output and logsumexp.

    The FlashAttention-2 backward: for each block of keys, visit the query blocks, recompute the
    weights from q, k and the forward's logsumexp, (F6), and accumulate ``dv``, ``dk`` (this key
    block) and ``dq`` (all rows), (F9). The softmax backward's row sum is
    ``D = rowsum(dout * out)``, (F7), so no row of weights is ever held whole. Derivation:
    ``docs/derivations/flash.md`` (F6)-(F9), with the stages of ``docs/derivations/attention.md``
    (A8)-(A16).

    Parameters
    ----------
    dout : array_like, shape (..., H, T, Dv)
        Gradient of the loss with respect to the output.
    q, k, v : array_like
        The forward's inputs, (..., H, T, Dk), (..., Hkv, S, Dk), (..., Hkv, S, Dv).
    out : array_like, shape (..., H, T, Dv)
        The forward's output (``FlashOutput.out``, or ``AttentionTrace.out``).
    logsumexp : array_like, shape (..., H, T)
        The forward's logsumexp, ``-inf`` on empty rows (``FlashOutput.logsumexp``, or
        ``AttentionTrace.logsumexp``): it marks the empty rows for the ``empty_rows`` policy.
    options, block_q, block_k, **kwargs
        As in :func:`flash_attention_forward`; the options must be the forward's (the block
        sizes need not be).
    num_splits : int, default 1
        1: the FlashAttention-2 backward from the final ``out`` and ``logsumexp``. More: the
        split-KV backward: the partial states of the key chunks are recomputed, the gradient
        goes back through their merge, (C4)-(C5) of ``docs/derivations/merge.md``, and each
        chunk's keys get the backward of their own partial with its log-sum-exp cotangent. The
        two agree to round-off.
    dlse : array_like, shape (..., H, T), optional
        Gradient with respect to the log-sum-exp the forward returned: ``D`` becomes
        ``rowsum(dout * out) - dlse``, (A17) of ``docs/derivations/attention.md``.

    Returns
    -------
    AttentionGrads
        ``dq`` (..., H, T, Dk), ``dk`` (..., Hkv, S, Dk), ``dv`` (..., Hkv, S, Dv) (summed over the
        query heads of each group), ``dbias`` (the bias's shape, or None) and ``dsinks`` ((H,),
        or None), as :func:`~attention_ref.sdpa_backward` returns.

    Notes
    -----
    .. math::
        P_{ij} = e^{\tilde\ell_{ij} - \text{lse}_i}\ \text{(F6)},\quad
        D_i = \textstyle\sum_e d\text{out}_{ie}\, \text{out}_{ie}
        = \sum_j P_{ij}\, dP_{ij}\ \text{(F7)},\quad
        d\ell_{ij} = P_{ij}\,(dP_{ij} - D_i)\ \text{(F8)}.

    Empty rows follow the policy as :func:`~attention_ref.sdpa_backward` does: no gradient from
    the row's scores; ``"uniform"`` adds ``dout / S`` to every key of ``dv``; ``"nan"`` makes ``dv``
    NaN for each key/value head whose group holds an empty row.

    References
    ----------
    Dao (2023), "FlashAttention-2: faster attention with better parallelism and work partitioning".

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention_backward
    >>> from attention_ref.variants.flash import flash_attention_backward, flash_attention_forward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(4, 7, 8)), rng.normal(size=(2, 9, 8)), rng.normal(size=(2, 9, 5))
    >>> bias = rng.normal(size=(7, 9))
    >>> res = flash_attention_forward(q, k, v, bias=bias, block_q=4, block_k=4)
    >>> dout = rng.normal(size=res.out.shape)
    >>> g = flash_attention_backward(
    ...     dout, q, k, v, res.out, res.logsumexp, bias=bias, block_q=4, block_k=4
    ... )
    >>> g.dq.shape, g.dk.shape, g.dv.shape, g.dbias.shape
    ((4, 7, 8), (2, 9, 8), (2, 9, 5), (7, 9))
    >>> ref = scaled_dot_product_attention_backward(dout, q, k, v, bias=bias)
    >>> bool(np.abs(g.dk - ref.dk).max() <= 1e-12 * np.abs(ref.dk).max())
    True
    """
    tp = _prepare(q, k, v, options, kwargs, block_q, block_k, num_splits, block_mask, check)
    dt = tp.qs.dtype
    Hkv, S = tp.k.shape[-4], tp.k.shape[-2]
    dout, out, lse = _check_saved(dout, out, logsumexp, ungroup_heads(tp.qs).shape, tp.v.shape, dt)
    if dlse is not None:
        dlse = check_dlse(dlse, lse.shape, dt)
    row_is_empty = np.isneginf(lse)  # (..., H, T): the forward found nothing to attend
    if tp.empty_rows == "raise" and row_is_empty.any():
        _raise_if_empty(row_is_empty)

    dq = np.zeros(tp.qs.shape, dtype=dt)  # (..., Hkv, G, T, Dk)
    dk = np.zeros(tp.k.shape[:-4] + (Hkv, S, tp.k.shape[-1]), dtype=dt)  # (..., Hkv, S, Dk)
    dv = np.zeros(tp.v.shape[:-4] + (Hkv, S, tp.v.shape[-1]), dtype=dt)  # (..., Hkv, S, Dv)
    dbias = (
        None if tp.bias is None else np.zeros(tp.bias.shape, dtype=dt)
    )  # (..., Hkv|1, G|1, T|1, S|1)
    dmod: dict | None = None if tp.score_mod is None else {}
    grads = (dq, dk, dv, dbias, dmod)
    dsinks = None
    if tp.num_splits == 1:
        # (F7) D_i = sum_e dout_ie out_ie = sum_j P_ij dP_ij; (A17) minus the lse's cotangent
        D = row_dot(dout, out)[..., 0]  # (..., H, T)
        if dlse is not None:
            D -= dlse
        if tp.sinks is not None:
            # (A19) with p_sink = exp(sigma - lse), (A18)
            dsinks = sinks_backward(np.exp(tp.sinks[:, None] - lse), D)
        _partial_backward(tp, dout, lse, D, 0, S, grads)
    else:
        # Split-KV: back through the merge, (C4)-(C5), then each chunk's backward with its own
        # partial state and log-sum-exp cotangent
        splits = _splits(S, tp.num_splits)
        partials = [_partial_forward(tp, j_lo, j_hi) for j_lo, j_hi in splits]
        outs = np.stack([p.out for p in partials])  # (N, ..., H, T, Dv)
        lses = np.stack([p.lse for p in partials])  # (N, ..., H, T)
        dout_m, dlse_m = dout, dlse
        if tp.sinks is not None:
            merged = merge_attention_states(outs, lses)
            sg = add_sinks_backward(dout, dlse, merged.out, merged.lse, tp.sinks)  # (C7)
            dout_m, dlse_m, dsinks = sg.dout, sg.dlse, sg.dsinks
        mg = merge_attention_states_backward(dout_m, dlse_m, outs, lses)  # (C4), (C5)
        for n, (j_lo, j_hi) in enumerate(splits):
            D = row_dot(mg.douts[n], outs[n])[..., 0] - mg.dlses[n]  # (F7), (A17)
            _partial_backward(tp, mg.douts[n], lses[n], D, j_lo, j_hi, grads)
    dq *= tp.scale  # (A15)

    if tp.sinks is None:
        _empty_rows_backward(dv, dout, lse, tp.empty_rows)
    if dbias is not None:
        dbias = dbias.reshape(tp.bias_shape)  # back from the GQA view to the bias's own shape
    if dmod is not None and tp.score_mod is not None:  # every parameter; 0 if no tile computed
        dmod = {n: dmod.get(n, np.zeros_like(p)) for n, p in tp.score_mod.params.items()}
    return AttentionGrads(
        dq=ungroup_heads(dq), dk=dk, dv=dv, dbias=dbias, dsinks=dsinks, dscore_mod=dmod
    )


def _partial_backward(
    tp: _Tiled,
    dout: np.ndarray,
    lse: np.ndarray,
    D: np.ndarray,
    j_lo: int,
    j_hi: int,
    grads: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, dict | None],
) -> None:
    """Add the gradients from the keys ``j_lo:j_hi`` into ``grads = (dq, dk, dv, dbias, dmod)``,
    (F6)-(F9), given the rows' ``lse`` (..., H, T) and ``D`` (..., H, T) of those keys' softmax
    (dq without the scale). A row with ``lse = -inf`` had no key there: it adds nothing."""
    dq, dk, dv, dbias, dmod = grads
    dt = tp.qs.dtype
    Hkv, T = tp.k.shape[-4], tp.qs.shape[-2]
    dout = group_heads(dout, Hkv)  # (..., Hkv, G, T, Dv)
    lse = group_heads(lse[..., None], Hkv)  # (..., Hkv, G, T, 1)
    none = np.isneginf(lse)  # (..., Hkv, G, T, 1): no allowed key among these
    lse = np.where(none, 0.0, lse)  # a finite shift: the row's entries are all masked anyway
    D = np.where(none, 0.0, group_heads(D[..., None], Hkv))  # (..., Hkv, G, T, 1)
    for j0 in range(j_lo, j_hi, tp.block_k):
        j1 = min(j0 + tp.block_k, j_hi)
        k_j, v_j = (
            tp.k[..., j0:j1, :],
            tp.v[..., j0:j1, :],
        )  # (..., Hkv, 1, Sb, Dk), (..., Hkv, 1, Sb, Dv)
        for i0 in range(0, T, tp.block_q):
            i1 = min(i0 + tp.block_q, T)
            kind, allowed = _tile_pairs(tp, i0, i1, j0, j1)  # (A4) for this tile
            if kind == "empty":
                continue  # skipped: P = 0 on the whole block, (F6), so no gradient comes from it
            capped, mod_input, logits = _block_logits(tp, i0, i1, j0, j1)  # (A1)-(A3), (A20)
            if tp.score_mod is not None:
                allowed = _mod_masks(allowed, logits)
            if allowed is not None:
                logits = np.where(allowed, logits, masked_fill_value(dt))  # (A4)
            p = logits - lse[..., i0:i1, :]
            np.exp(
                p, out=p
            )  # (..., Hkv, G, Tb, Sb)   (F6) P = exp(l~ - lse): exp(fill - lse) = 0 where masked
            dout_i = dout[..., i0:i1, :]  # (..., Hkv, G, Tb, Dv)
            # (A9), (F9) dv_J += sum over the group's heads of P^T dout
            dv[..., j0:j1, :] += (p.swapaxes(-1, -2) @ dout_i).sum(
                axis=-3
            )  # (..., Hkv, G, Sb, Tb) @ (..., Hkv, G, Tb, Dv) -> (..., Hkv, Sb, Dv)
            # (A8) dP = dout v^T; ds holds dP, then dl (F8), then ds (A14), in place
            ds = dout_i @ v_j.swapaxes(
                -1, -2
            )  # (..., Hkv, G, Tb, Dv) @ (..., Hkv, 1, Dv, Sb) -> (..., Hkv, G, Tb, Sb)
            # (F8) = (A11) with (F7): dl = P (dP - D); (A12) it is 0 where masked, as P is
            ds -= D[..., i0:i1, :]
            ds *= p
            if tp.score_mod is not None and dmod is not None:
                # (A21), (A22) back through the score mod, on the (B, H, Tb, Sb) view
                shape = ds.shape
                idx = mod_indices(*tp.heads, np.arange(i0, i1), np.arange(j0, j1))
                flat_in = mod_input.reshape(tp.heads + shape[-2:])
                ds, dparams = score_mod_backward(
                    tp.score_mod, ds.reshape(flat_in.shape), flat_in, idx
                )
                ds = ds.reshape(shape)
                for name, d in dparams.items():
                    dmod[name] = dmod[name] + d if name in dmod else d
            if dbias is not None:
                # (A13) dbias: dl summed over the axes the bias was broadcast along
                block = _tile(dbias, i0, i1, j0, j1)
                block += sum_to_shape(ds, block.shape)
            if tp.softcap is not None:
                # (A14) ds = dl (1 - (c / cap)^2), with the block's capped scores c
                capped /= tp.softcap
                np.square(capped, out=capped)
                ds *= 1.0 - capped
            # (A15), (F9) dq_I += dl k_J (the scale is applied once, by the caller)
            dq[..., i0:i1, :] += (
                ds @ k_j
            )  # (..., Hkv, G, Tb, Sb) @ (..., Hkv, 1, Sb, Dk) -> (..., Hkv, G, Tb, Dk)
            # (A16), (F9) dk_J += sum over the group's heads of dl^T (scale q)
            dk[..., j0:j1, :] += (ds.swapaxes(-1, -2) @ tp.qs[..., i0:i1, :]).sum(
                axis=-3
            )  # (..., Hkv, G, Sb, Tb) @ (..., Hkv, G, Tb, Dk) -> (..., Hkv, Sb, Dk)
