r"""Top-k sparse attention (DeepSeek sparse attention, DSA) and its lightning indexer.

DeepSeek-V3.2's sparse attention lets each query row attend only the ``topk`` keys an index list
names. Here that is what it is mathematically: dense attention under one more boolean mask,

* :func:`sparse_mask` turns ``indices`` (..., Hkv or 1, T, topk) -- key positions in [0, S),
  ``-1`` for an unused slot -- into the "selected" mask (..., H or 1, T, S), (X1)-(X2);
* :func:`sparse_attention` / :func:`sparse_attention_backward` AND it with the options' own mask
  and call the core (:func:`~attention_ref.sdpa_forward`,
  :func:`~attention_ref.scaled_dot_product_attention_backward`), (X3)-(X4), so every option
  (causal, window, bias, softcap, sinks, dropout, ``empty_rows``, ``return_lse``, ``dlse``) acts
  as on the plain path and the softmax stays in one place;
* :func:`lightning_indexer` computes DSA's index scores ``sum_j w[t, j] relu(q[t, j] . k[s])``
  and selects each row's top-k keys with a documented, deterministic tie rule, (X8)-(X10),
  returning indices ready for :func:`sparse_attention`.

A kernel gathers the ``topk`` keys instead and takes the softmax over them, (X5); the two forms
are equal when a row names each key at most once, which is why a repeated index is an error, and
their backward is the gather's scatter-add, (X6)-(X7): a key no row selected gets exactly zero
gradient.

Derivation: ``docs/derivations/sparse.md``, (X1)-(X10); the attention itself is (A1)-(A19) of
``docs/derivations/attention.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ..core._validate import (
    ALIGNS,
    as_bool_mask,
    as_float,
    check_choice,
    check_ndim,
    check_nonempty,
    check_positive_int,
    check_real_scalar,
)
from ..core.attention import (
    AttentionGrads,
    AttentionTrace,
    check_qkv,
    require_forward_dropout_mask,
    scaled_dot_product_attention_backward,
    sdpa_forward,
)
from ..core.masks import AllowedPairs
from ..core.options import SCORES_LAYOUT, AttentionOptions

__all__ = [
    "IndexerResult",
    "lightning_indexer",
    "sparse_attention",
    "sparse_attention_backward",
    "sparse_forward",
    "sparse_mask",
]

INDICES_LAYOUT = "(..., Hkv or 1, T, topk)"


# ----------------------------------------------------------------------------- indices -> mask


def _as_indices(indices: Any) -> np.ndarray:
    """``indices`` as a fresh int64 array with 3 or more dims and ``topk >= 1``."""
    if isinstance(indices, np.random.Generator):
        raise TypeError("indices must be an integer array of key positions; got a Generator")
    try:
        arr = np.asarray(indices)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"indices could not be converted to a numpy array: {exc}") from None
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"indices must hold integers (key positions, -1 = unused); got dtype {arr.dtype}"
        )
    check_ndim("indices", arr, 3, INDICES_LAYOUT)
    if arr.shape[-1] < 1:
        raise ValueError(
            f"indices must have topk >= 1 slots on its last axis {INDICES_LAYOUT}; got shape "
            f"{arr.shape}"
        )
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"indices must be < 2**63; got the value {int(arr.max())}")
    return arr.astype(np.int64)  # a copy: never the caller's array


def _check_values(idx: np.ndarray, S: int) -> None:
    """Every entry in [-1, S); no key twice in one row (-1 may repeat)."""
    bad = (idx < -1) | (idx >= S)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"indices must be key positions in [0, S) = [0, {S}) or -1 (unused); got "
            f"{int(bad.sum())} out-of-range entries, the first indices[{where}] = {idx[where]}"
        )
    ordered = np.sort(idx, axis=-1)  # (..., Hkv|1, T, topk)
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] != -1)
    if repeated.any():
        where = tuple(int(i) for i in np.argwhere(repeated)[0])
        row, key = where[:-1], int(ordered[where])
        count = int((idx[row] == key).sum())
        raise ValueError(
            "indices must name each key at most once per row (a repeated key would be counted "
            f"twice by a gathered softmax, docs/derivations/sparse.md); key {key} appears {count} "
            f"times in row indices[{row}] of (..., Hkv or 1, T)"
        )


def _selected(idx: np.ndarray, S: int, num_heads: int | None) -> np.ndarray:
    """The selected mask of checked indices: (..., Hkv|1, T, S), or (..., H|1, T, S)."""
    # (X2) scatter True at each listed key. -1 goes to a spare column S, dropped after: numpy
    # would read -1 as the last key S - 1 (negative indices count from the end).
    sel = np.zeros(idx.shape[:-1] + (S + 1,), dtype=bool)  # (..., Hkv|1, T, S + 1)
    np.put_along_axis(sel, np.where(idx == -1, S, idx), True, axis=-1)
    sel = sel[..., :S]  # (..., Hkv|1, T, S)
    hkv = sel.shape[-3]
    if num_heads is None or hkv == 1:
        return np.ascontiguousarray(sel)  # (X1) one list for every kv head broadcasts over H
    # (X1) GQA: query head h = kv * G + g reads kv head h // G, so its row is kv's row.
    group = num_heads // hkv
    lead, T = sel.shape[:-3], sel.shape[-2]
    grouped = np.broadcast_to(sel[..., :, None, :, :], lead + (hkv, group, T, S))
    return grouped.reshape(lead + (num_heads, T, S))  # (..., H, T, S), a copy


def sparse_mask(indices: ArrayLike, S: int, *, num_heads: int | None = None) -> np.ndarray:
    r"""The boolean "selected" mask of a top-k index list: True where a row names the key.

    Parameters
    ----------
    indices : array_like of int, shape (..., Hkv or 1, T, topk)
        Key positions in [0, S); ``-1`` marks an unused slot. A key may appear at most once per
        row (``-1`` any number of times).
    S : int
        Number of keys.
    num_heads : int, optional
        The query head count H. Given, a ``(..., Hkv, T, topk)`` list is expanded to query heads:
        head ``h`` gets kv head ``h // (H // Hkv)``'s rows, (X1). A ``(..., 1, T, topk)`` list
        stays ``(..., 1, T, S)``, which broadcasts over H.

    Returns
    -------
    ndarray of bool, shape (..., Hkv or 1, T, S), or (..., H or 1, T, S) with ``num_heads``
        ``mask[..., g, t, s]`` is True when ``s`` is in ``indices[..., g, t, :]``, (X2).

    Raises
    ------
    ValueError
        An entry outside [-1, S) or a key repeated in a row (naming the first), or ``num_heads``
        not a multiple of the list's head axis.

    Notes
    -----
    ``-1`` is never read as key ``S - 1`` (numpy's negative indexing): it selects nothing. See
    ``docs/derivations/sparse.md``.

    Examples
    --------
    >>> from attention_ref.variants.sparse import sparse_mask
    >>> sparse_mask([[[2, 0], [1, -1]]], 3).astype(int)      # (1, T=2, topk=2) -> (1, 2, 3)
    array([[[1, 0, 1],
            [0, 1, 0]]])
    """
    S = check_positive_int("S", S)
    idx = _as_indices(indices)
    _check_values(idx, S)
    if num_heads is not None:
        num_heads = check_positive_int("num_heads", num_heads)
        if num_heads % idx.shape[-3]:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of the indices' head axis "
                f"(Hkv or 1) = {idx.shape[-3]}; got indices.shape={idx.shape}"
            )
    return _selected(idx, S, num_heads)


def _sparse_options(
    q: Any, k: Any, v: Any, indices: Any, given: AttentionOptions
) -> AttentionOptions:
    """``given`` with its mask replaced by ``selected AND mask``, (X3), checked at the door."""
    dt = given.compute_dtype(q, k, v)
    qc, kc, _ = check_qkv(q, k, v, dt)  # the core checks them again; here for the shapes
    H, T = qc.shape[-3], qc.shape[-2]
    Hkv, S = kc.shape[-3], kc.shape[-2]
    idx = _as_indices(indices)
    if idx.shape[-3] not in (Hkv, 1) or idx.shape[-2] != T:
        raise ValueError(
            f"indices must have shape {INDICES_LAYOUT} with Hkv = {Hkv} (or 1) and T = {T}; got "
            f"indices.shape={idx.shape} for q.shape={qc.shape}, k.shape={kc.shape}"
        )
    batch = qc.shape[:-3]
    try:
        fits = np.broadcast_shapes(idx.shape[:-3], batch) == batch
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"indices' batch dims (...) must broadcast to q's {batch}; got indices.shape="
            f"{idx.shape} for q.shape={qc.shape}"
        )
    _check_values(idx, S)
    selected = _selected(idx, S, H)  # (..., H|1, T, S)   (X1)-(X2)
    mask = given.mask
    if mask is not None:
        mask = as_bool_mask("mask", mask, qc.shape[:-1] + (S,), SCORES_LAYOUT)
        selected = selected & mask  # (X3) a new array; the caller's mask is only read
    return given.replace(mask=selected)


# ----------------------------------------------------------------------------- attention


def sparse_forward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    indices: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> AttentionTrace:
    r"""Sparse attention returning the core's :class:`~attention_ref.AttentionTrace`.

    Takes the arguments of :func:`sparse_attention`. The trace's ``allowed`` is the selected
    mask AND the options' pairs, (X3); pass the trace to :func:`~attention_ref.sdpa_backward`
    for the gradients without a recompute.

    Returns
    -------
    AttentionTrace

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import sdpa_backward
    >>> from attention_ref.variants.sparse import sparse_forward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(1, 5, 4)), rng.normal(size=(1, 5, 2))
    >>> tr = sparse_forward(q, k, v, [[[0, 4], [1, -1], [3, 2]]])
    >>> tr.allowed.shape, sdpa_backward(np.ones((2, 3, 2)), tr).dk.shape
    ((1, 3, 5), (1, 5, 4))
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("sparse_forward")
    return sdpa_forward(q, k, v, options=_sparse_options(q, k, v, indices, given))  # (X4)


def sparse_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    indices: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    return_lse: bool = False,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Top-k sparse attention: each query row attends only the keys its index list names.

    Parameters
    ----------
    q : array_like, shape (..., H, T, Dk)
        Queries.
    k : array_like, shape (..., Hkv, S, Dk)
        Keys; ``Hkv`` divides ``H`` and query head ``h`` uses kv head ``h // (H // Hkv)``.
    v : array_like, shape (..., Hkv, S, Dv)
        Values.
    indices : array_like of int, shape (..., Hkv or 1, T, topk)
        Row ``t`` of query head ``h`` attends the keys ``indices[..., h // (H // Hkv), t, :]``
        (Hkv axis) or ``indices[..., 0, t, :]`` (axis of 1: one list for every kv head), (X1).
        Entries are key positions in [0, S) or ``-1`` (an unused slot, never key ``S - 1``); a
        key may appear at most once per row; order within a row does not matter. Batch dims
        broadcast to q's.
    options : AttentionOptions, optional
        The attention options as one object.
    **kwargs
        Any field of :class:`~attention_ref.AttentionOptions` by name, acting on top of the
        index list: the allowed pairs are the selected keys AND the options' pairs (``mask``,
        ``causal`` with ``align``, ``window``, ``chunk_size``, a ``-inf`` ``bias``), (X3). So an
        index to a future key is dropped under ``causal=True``. ``bias``, ``softcap``,
        ``scale``, ``sinks``, dropout and ``dtype`` act as on the plain path.
    return_lse : bool, default False
        Also return the log-sum-exp of each row (natural log, ``-inf`` on an empty row).

    Returns
    -------
    out : ndarray, shape (..., H, T, Dv)
    lse : ndarray, shape (..., H, T)
        Only with ``return_lse=True``.

    Raises
    ------
    ValueError
        ``indices`` of the wrong shape, an entry outside [-1, S), or a key repeated in a row
        (naming the first such key and row); and the core's errors for the options.
    TypeError
        ``indices`` not integers.

    Notes
    -----
    .. math::
        A_{hts} = [s \in \mathcal{S}_{g(h), t}] \wedge A^{\text{opt}}_{hts}\ \text{(X3)},\qquad
        \text{out} = \text{attention}(q, k, v;\ \text{mask} = A)\ \text{(X4)}

    equal to the gathered softmax over the row's listed keys, (X5). A row whose list is all
    ``-1`` (or whose listed keys the options all exclude) is an *empty row*: ``empty_rows``
    decides, as on the plain path; under ``"uniform"`` it averages all S values (the core's
    policy), not only listed ones. See ``docs/derivations/sparse.md``.

    FlashMLA's ``flash_mla_sparse_fwd`` (``flash_mla/flash_mla_interface.py``) takes
    ``indices`` as ``[s_q, h_kv, topk]`` (this layout with the head axis first) and also treats
    entries ``>= s_kv`` as unused; here they are an error. Its reference
    (``tests/ref.py``, ``ref_sparse_attn_fwd``) gives an empty row out 0 and lse ``+inf``:
    :func:`~attention_ref.lse_to_convention` with ``empty="+inf"`` converts this lse.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.variants.sparse import sparse_attention
    >>> rng = np.random.default_rng(0)
    >>> q = rng.normal(size=(2, 4, 3, 8))          # (B, H, T, Dk)
    >>> k = rng.normal(size=(2, 2, 6, 8))          # (B, Hkv, S, Dk)
    >>> v = rng.normal(size=(2, 2, 6, 5))          # (B, Hkv, S, Dv)
    >>> idx = np.array([[0, 5], [1, -1], [2, 0]])  # (T, topk): one list per row, -1 unused
    >>> out = sparse_attention(q, k, v, idx[None, None], causal=True)
    >>> keep = np.zeros((3, 6), bool); keep[[0, 0, 1, 2, 2], [0, 5, 1, 2, 0]] = True
    >>> dense = scaled_dot_product_attention(q, k, v, mask=keep, causal=True)
    >>> bool(np.array_equal(out, dense)), out.shape     # key 5 is in row 0's future: dropped
    (True, (2, 4, 3, 5))
    """
    trace = sparse_forward(q, k, v, indices, options=options, **kwargs)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    return (trace.out, trace.logsumexp) if return_lse else trace.out


def sparse_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    indices: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    dlse: ArrayLike | None = None,
    **kwargs: Any,
) -> AttentionGrads:
    r"""Gradients of :func:`sparse_attention`: the core's backward under the same mask.

    Builds the forward's mask, (X3), and calls
    :func:`~attention_ref.scaled_dot_product_attention_backward` with it: (A8)-(A19) of
    ``docs/derivations/attention.md``, which is the gathered form's scatter-add, (X6) of
    ``docs/derivations/sparse.md``.

    Parameters
    ----------
    dout : array_like, shape (..., H, T, Dv)
        Gradient of the loss with respect to the output.
    q, k, v, indices, options, **kwargs
        The forward's inputs and options, as for :func:`sparse_attention`. A dropout
        ``dropout_mask`` must be the forward's keep-mask, not a Generator.
    dlse : array_like, shape (..., H, T), optional
        Gradient with respect to the log-sum-exp ``return_lse=True`` returned, (A17).

    Returns
    -------
    AttentionGrads
        ``dq`` (..., H, T, Dk), ``dk`` (..., Hkv, S, Dk) and ``dv`` (..., Hkv, S, Dv), summed
        over every (head, row) that selected each key; ``dbias`` (the bias's shape, or None);
        ``dsinks`` ((H,), or None).

    Notes
    -----
    A key that no row of its kv head selects (or that the options exclude wherever it is
    selected) gets exactly zero ``dk`` and ``dv``, (X7): its weight is exactly 0 in every row.
    The exception is the core's empty-row policy: under ``"uniform"`` an empty row sends
    ``dout / S`` to every key's ``dv``, and under ``"nan"`` it makes its kv head's ``dv`` NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.sparse import sparse_attention_backward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(1, 5, 4)), rng.normal(size=(1, 5, 2))
    >>> g = sparse_attention_backward(rng.normal(size=(2, 3, 2)), q, k, v,
    ...                               [[[0, 4], [1, -1], [4, 1]]])
    >>> g.dq.shape, g.dk.shape, g.dv.shape
    ((2, 3, 4), (1, 5, 4), (1, 5, 2))
    >>> bool((g.dk[0, [2, 3]] == 0).all() and (g.dv[0, [2, 3]] == 0).all())  # never selected
    True
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("sparse_attention_backward")
    require_forward_dropout_mask(given.dropout_mask, "sparse_forward/sdpa_backward")
    opts = _sparse_options(q, k, v, indices, given)  # (X3), the forward's mask
    return scaled_dot_product_attention_backward(dout, q, k, v, options=opts, dlse=dlse)  # (X6)


# ----------------------------------------------------------------------------- lightning indexer


class IndexerResult(NamedTuple):
    """What :func:`lightning_indexer` returns."""

    #: (..., 1, T, topk) int64: each row's selected keys, best first by (X10), then -1 padding;
    #: one list shared by every kv head, ready for :func:`sparse_attention`
    indices: np.ndarray
    #: (..., T, S) the index scores I[t, s], (X8); -inf where the key is not allowed, (X9)
    scores: np.ndarray
    #: (..., 1, T, topk) the score of each selected key; -inf in the -1 slots
    topk_scores: np.ndarray


def lightning_indexer(
    q_idx: ArrayLike,
    k_idx: ArrayLike,
    weights: ArrayLike,
    topk: int,
    *,
    causal: bool = True,
    align: str = "bottom_right",
    mask: ArrayLike | None = None,
    scale: float = 1.0,
) -> IndexerResult:
    r"""DeepSeek sparse attention's lightning indexer: index scores and top-k key selection.

    Inference only: there is no backward (the selected indices are piecewise constant in the
    inputs; training the indexer is outside this reference, as it is outside DeepSeek's
    inference code).

    Parameters
    ----------
    q_idx : array_like, shape (..., T, H_I, D_I)
        The indexer's queries, ``H_I`` indexer heads per query token (DeepSeek's ``q``
        ``(b, s, h, d)`` after RoPE and ``rotate_activation``, a Hadamard transform).
    k_idx : array_like, shape (..., S, D_I)
        The indexer's keys, one per key token, shared by the indexer heads.
    weights : array_like, shape (..., T, H_I)
        Per-token head weights ``w[t, j]`` (any sign).
    topk : int
        Keys to select per row, ``>= 1``. May exceed the number of allowed keys: the list is then
        padded with ``-1``.
    causal : bool, default True
        Row ``t`` may select key ``s`` only when ``s <= t'``, (X9).
    align : {"top_left", "bottom_right"}, default "bottom_right"
        ``t' = t + S - T`` (``"bottom_right"``: the T queries are the last T positions of the S
        keys, as in prefill after a cache and in decoding) or ``t' = t``.
    mask : array_like of bool, optional
        More allowed pairs, True = may select; broadcastable to (..., T, S).
    scale : float, default 1.0
        A positive factor on the scores (DeepSeek-V3.2 uses ``D_I ** -0.5 * H_I ** -0.5``,
        folded into its weights; a positive factor does not change the selection).

    Returns
    -------
    IndexerResult
        ``indices`` (..., 1, T, topk) int64, ``scores`` (..., T, S) and ``topk_scores``
        (..., 1, T, topk).

    Notes
    -----
    .. math::
        I_{ts} = c \sum_j w_{tj}\, \max(0,\ q_{tj} \cdot k_s)\ \text{(X8)}

    over the allowed keys, (X9); ``-inf`` elsewhere. Row ``t`` selects its allowed keys in the
    order *larger score first, and among equal scores the smaller key index first*, keeps the
    first ``min(topk, #allowed)`` and pads with ``-1``, (X10): a disallowed key is never
    selected. The rule is implemented as a stable sort, ``np.argsort(-scores, kind="stable")``.
    See ``docs/derivations/sparse.md``.

    What differs from DeepSeek's reference, ``Indexer.forward`` in
    ``inference/model.py`` of deepseek-ai/DeepSeek-V3.2-Exp:

    * it quantises q and k to FP8 (``act_quant``) and computes ``fp8_index``
      (``inference/kernel.py``): ``sum_j relu(q_fp8 . k_fp8) * (w * q_scale)`` times
      ``k_scale``, with ``weights = weights_proj(x) * n_heads ** -0.5 * q_scale *
      softmax_scale`` (``softmax_scale = head_dim ** -0.5``). Here: the float64 formula, their
      ``n_heads ** -0.5 * softmax_scale`` being ``scale`` (or folded into ``weights``), without
      FP8 rounding (``q_scale``, ``k_scale`` = 1);
    * it selects ``index_score.topk(min(index_topk, end_pos))`` after adding the causal mask,
      so a row with fewer allowed keys than ``topk`` also lists ``-inf`` (future) keys, harmless
      only because the attention adds the causal mask again; here they are ``-1``;
    * ``torch.topk`` does not specify the order of tied elements (its documentation: "the
      indices of tied elements are not guaranteed to be stable"); here the tie rule is fixed;
    * layout: the same ``(..., T, H_I, D_I)``, ``(..., S, D_I)``, ``(..., T, H_I)``; the indices
      get a kv-head axis of 1, ``(..., 1, T, topk)``, for :func:`sparse_attention` (the model's
      ``(b, s, topk)``, FlashMLA's ``[s_q, h_kv, topk]``).

    Causal alignment: the model's prefill mask is ``triu(1)`` on ``(seqlen, seqlen)`` and its
    decode step (one query at position ``end_pos - 1``) has no mask: both are
    ``align="bottom_right"``, as is DeepGEMM's ``test_mqa_logits`` (``tests/test_attention.py``:
    ``ke = arange(seq_len) + (seq_len_kv - seq_len)``, key ``s`` allowed when ``s < ke[t]``).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.sparse import lightning_indexer
    >>> q_idx = np.array([[[1.0], [2.0]], [[1.0], [-1.0]], [[1.0], [0.0]]])  # (T=3, H_I=2, D_I=1)
    >>> k_idx = np.array([[1.0], [3.0], [2.0], [3.0]])                      # (S=4, D_I=1)
    >>> w = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])                  # (T, H_I)
    >>> r = lightning_indexer(q_idx, k_idx, w, topk=3)      # causal, bottom_right: t' = t + 1
    >>> r.scores
    array([[ 3.,  9., -inf, -inf],
           [ 1.,  3.,  2., -inf],
           [ 1.,  3.,  2.,  3.]])
    >>> r.indices    # ties (keys 1 and 3 in row 2): the smaller key first; row 0 padded
    array([[[ 1,  0, -1],
            [ 1,  2,  0],
            [ 1,  3,  2]]])
    """
    dt = np.dtype(np.float64)
    q = as_float("q_idx", q_idx, dt)
    k = as_float("k_idx", k_idx, dt)
    w = as_float("weights", weights, dt)
    check_ndim("q_idx", q, 3, "(..., T, H_I, D_I)")
    check_ndim("k_idx", k, 2, "(..., S, D_I)")
    check_ndim("weights", w, 2, "(..., T, H_I)")
    for name, x, layout in (
        ("q_idx", q, "(..., T, H_I, D_I)"),
        ("k_idx", k, "(..., S, D_I)"),
        ("weights", w, "(..., T, H_I)"),
    ):
        check_nonempty(name, x, layout)
        if not np.isfinite(x).all():
            raise ValueError(f"{name} must be finite; got {int((~np.isfinite(x)).sum())} entries")
    batch, (T, _, D) = q.shape[:-3], q.shape[-3:]
    if k.shape[:-2] != batch or k.shape[-1] != D:
        raise ValueError(
            f"k_idx must have shape (..., S, D_I) with the batch dims {batch} and D_I = {D} of "
            f"q_idx; got k_idx.shape={k.shape}, q_idx.shape={q.shape}"
        )
    if w.shape != q.shape[:-1]:
        raise ValueError(
            f"weights must have shape (..., T, H_I) = {q.shape[:-1]} (q_idx's without D_I); got "
            f"weights.shape={w.shape}"
        )
    topk = check_positive_int("topk", topk)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r}")
    align = check_choice("align", align, ALIGNS)
    scale = check_real_scalar("scale", scale, positive=True)
    S = k.shape[-2]
    if mask is not None:
        mask = as_bool_mask("mask", mask, batch + (T, S), "(..., T, S)")

    # (X8) per indexer head: (..., T, H_I, D_I) @ (..., 1, D_I, S) -> (..., T, H_I, S)
    logits = q @ np.swapaxes(k, -1, -2)[..., None, :, :]
    np.maximum(logits, 0.0, out=logits)  # relu, on this function's own array
    # (X8) the weighted sum over the heads: (..., T, 1, H_I) @ (..., T, H_I, S) -> (..., T, 1, S)
    scores = (w[..., None, :] @ logits)[..., 0, :]  # (..., T, S)
    scores *= scale

    # (X9) the allowed keys: causal (with align) AND mask
    allowed = AllowedPairs.build(T, S, mask=mask, causal=bool(causal), align=align).dense()
    allowed = np.broadcast_to(True if allowed is None else allowed, scores.shape)  # (..., T, S)
    scores = np.where(allowed, scores, -np.inf)  # (..., T, S)

    # (X10) larger score first, then the smaller key: a stable sort of -score keeps equal scores
    # in key order; the disallowed keys (-score = +inf) sort last.
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :topk]  # (..., T, min(topk, S))
    chosen = np.take_along_axis(allowed, order, axis=-1)  # (..., T, min(topk, S))
    idx = np.where(chosen, order, -1)
    if topk > S:
        idx = np.concatenate([idx, np.full(idx.shape[:-1] + (topk - S,), -1)], axis=-1)
    idx = idx.astype(np.int64)  # (..., T, topk)
    picked = np.take_along_axis(scores, np.maximum(idx, 0), axis=-1)
    topk_scores = np.where(idx >= 0, picked, -np.inf)  # (..., T, topk)
    return IndexerResult(
        indices=idx[..., None, :, :],  # (..., 1, T, topk): one list for every kv head
        scores=scores,
        topk_scores=topk_scores[..., None, :, :],
    )
