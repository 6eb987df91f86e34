r"""Paged KV caches: the layouts kernels use, poisoned padding, and attention with a KV cache.

The canonical layout is FlashAttention's paged cache (``flash_attn_with_kvcache`` with a
``block_table``, ``flash_attn/flash_attn_interface.py``), (P1):

* ``k_pages`` (num_blocks, page_size, Hkv, Dk), ``v_pages`` (num_blocks, page_size, Hkv, Dv);
* ``block_table`` (B, max_blocks) int: sequence ``b``'s logical page ``j`` is physical page
  ``block_table[b, j]``;
* ``seqlens`` (B,) int: position ``p < seqlens[b]`` of sequence ``b`` lives in page
  ``block_table[b, p // page_size]``, slot ``p % page_size``.

Converters go to and from FlashInfer's page tensors (NHD and HND) with their CSR description
(:func:`to_flashinfer`, :func:`from_flashinfer`), vLLM's ``paged_attention`` v1/v2 key and value
caches (:func:`to_vllm`, :func:`from_vllm`) and vLLM's FlashAttention-backend cache
(:func:`to_vllm_flash`, :func:`from_vllm_flash`). :func:`gather_pages` reads each sequence's
keys back into a dense ``(B, Hkv, S_max, D)`` array and :func:`make_paged_cache` writes dense
keys into pages.

:func:`paged_attention` is attention of this library's queries ``(B, H, T, Dk)`` to a paged
cache: each sequence's keys gathered, then :func:`~attention_ref.sdpa_forward` with
``align="bottom_right"`` (the T queries are the last T positions of the sequence), (P3);
:func:`paged_attention_backward` scatter-adds each sequence's ``dk``, ``dv`` into the pages,
(P4)-(P5). :func:`poison_unused` fills every slot no sequence owns with NaN and every unused table
entry with an out-of-range page id, so that a kernel reading past a sequence's end shows it, (P10).
:func:`attention_with_kvcache` is ``flash_attn_with_kvcache`` point by point, in FlashAttention's
layouts: append (rotated) keys into new copies of the caches, rotary positions as FA documents,
``cache_batch_idx``, ``cache_leftpad``, paged caches, (P12)-(P14).

Derivation: ``docs/derivations/paged.md``; guide, with the layout table and the parameter table
of ``flash_attn_with_kvcache``: ``docs/serving_layouts.md``.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ..core._validate import as_float, check_count, resolve_dtype
from ..core.attention import AttentionTrace, check_dlse, sdpa_backward, sdpa_forward
from ..core.options import AttentionOptions
from ..core.rotary import apply_rotary

__all__ = [
    "FlashInferPagedKV",
    "GatheredPages",
    "KVCacheLSEResult",
    "KVCacheResult",
    "PagedGrads",
    "PagedKV",
    "attention_with_kvcache",
    "from_flashinfer",
    "from_vllm",
    "from_vllm_flash",
    "gather_pages",
    "make_paged_cache",
    "paged_attention",
    "paged_attention_backward",
    "poison_unused",
    "to_flashinfer",
    "to_vllm",
    "to_vllm_flash",
    "vllm_x",
]

K_PAGES = "(num_blocks, page_size, Hkv, Dk)"
V_PAGES = "(num_blocks, page_size, Hkv, Dv)"
KV_LAYOUTS = ("NHD", "HND")
#: Options paged attention cannot take: a dense mask or bias has one key axis S for the whole
#: batch, but each sequence has its own length; dropout and rounding are not reference outputs.
PAGED_REFUSED = (
    "mask",
    "key_padding_mask",
    "bias",
    "dropout_p",
    "dropout_mask",
    "rounding",
)


# ----------------------------------------------------------------------------- results


class PagedKV(NamedTuple):
    """A paged KV cache in FlashAttention's layout, (P1)."""

    k_pages: np.ndarray  #: (num_blocks, page_size, Hkv, Dk)
    v_pages: np.ndarray  #: (num_blocks, page_size, Hkv, Dv)
    block_table: np.ndarray  #: (B, max_blocks) int64
    seqlens: np.ndarray  #: (B,) int64


class FlashInferPagedKV(NamedTuple):
    """A paged KV cache in FlashInfer's layout: page tensors and the CSR page table, (P6)."""

    k_data: (
        np.ndarray
    )  #: (num_pages, page_size, Hkv, Dk) NHD or (num_pages, Hkv, page_size, Dk) HND
    v_data: np.ndarray  #: the same for the values, with Dv
    kv_indptr: np.ndarray  #: (B + 1,) int64: request b owns kv_indices[kv_indptr[b]:kv_indptr[b+1]]
    kv_indices: np.ndarray  #: (nnz_pages,) int64 physical page ids, request by request
    kv_last_page_len: np.ndarray  #: (B,) int64 entries in each request's last page, 1..page_size
    kv_layout: str  #: "NHD" or "HND"


class GatheredPages(NamedTuple):
    """What :func:`gather_pages` returns: the sequences' rows, dense, and their lengths."""

    dense: np.ndarray  #: (B, Hkv, S_max, D): position p of sequence b at [b, :, p]; fill past it
    lengths: np.ndarray  #: (B,) int64, the sequence lengths (``seqlens``)


class PagedGrads(NamedTuple):
    """Gradients of :func:`paged_attention`, in the layouts of its inputs, (P4)-(P5)."""

    dq: np.ndarray  #: (B, H, T, Dk)
    #: (num_blocks, page_size, Hkv, Dk): each slot the sum over the sequences reading it; 0 where
    #: no sequence reads
    dk_pages: np.ndarray
    dv_pages: np.ndarray  #: (num_blocks, page_size, Hkv, Dv), the same for the values
    dsinks: np.ndarray | None = None  #: (H,) summed over every sequence; None without sinks


class KVCacheResult(NamedTuple):
    """What :func:`attention_with_kvcache` returns: unpack as ``out, k_cache, v_cache``."""

    out: np.ndarray  #: (B, T, H, Dv), FlashAttention's layout
    k_cache: np.ndarray  #: the new key cache (the input's shape), the new keys appended
    v_cache: np.ndarray  #: the new value cache, the new values appended


class KVCacheLSEResult(NamedTuple):
    """``attention_with_kvcache(..., return_lse=True)``: ``out, lse, k_cache, v_cache``."""

    out: np.ndarray  #: (B, T, H, Dv)
    lse: np.ndarray  #: (B, H, T), FlashAttention's ``softmax_lse`` layout (natural log)
    k_cache: np.ndarray  #: the new key cache
    v_cache: np.ndarray  #: the new value cache


# ----------------------------------------------------------------------------- validation


def _ints(name: str, x: Any, ndim: int, layout: str) -> np.ndarray:
    """``x`` as a fresh int64 array of ``ndim`` dims (bool and float refused)."""
    if isinstance(x, np.random.Generator):
        raise TypeError(f"{name} must be an array of integers; got a numpy.random.Generator")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} could not be converted to a numpy array: {exc}") from None
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, shape {layout}; got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims); got shape {arr.shape}")
    return arr.astype(np.int64)  # a copy: never the caller's array


def _numeric(name: str, x: Any, layout: str, ndim: int) -> np.ndarray:
    """``x`` as an array of numbers with ``ndim`` dims, dtype kept (a converter's input)."""
    if isinstance(x, np.random.Generator):
        raise TypeError(f"{name} must be an array of numbers; got a numpy.random.Generator")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} could not be converted to a numpy array: {exc}") from None
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"{name} must hold numbers; got dtype {arr.dtype}")
    if arr.ndim != ndim or arr.size == 0:
        raise ValueError(
            f"{name} must have shape {layout} ({ndim} dims, none empty); got shape {arr.shape}"
        )
    return arr


def _check_page_shapes(k: np.ndarray, v: np.ndarray, kname: str, vname: str) -> None:
    """k (N, ps, Hkv, Dk) and v (N, ps, Hkv, Dv): the same pages, slots and heads."""
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{vname} must have the same (num_blocks, page_size, Hkv) = {k.shape[:3]} as {kname}; "
            f"got {vname}.shape={v.shape}, {kname}.shape={k.shape}"
        )


def _pages(name: str, x: Any, dt: np.dtype, layout: str) -> np.ndarray:
    arr = as_float(name, x, dt)
    if arr.ndim != 4 or arr.size == 0:
        raise ValueError(
            f"{name} must have shape {layout} (4 dims, none empty); got shape {arr.shape}"
        )
    return arr


def _check_table(
    block_table: Any,
    seqlens: Any,
    num_blocks: int,
    page_size: int,
    *,
    batch: int | None = None,
    min_len: int = 0,
    min_len_name: str = "",
    start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(block_table, seqlens)`` as fresh int64 arrays, checked against the pages, (P1).

    Every page a sequence uses -- those holding its positions ``start[b] <= p < seqlens[b]`` --
    must be an id in ``[0, num_blocks)`` and appear once in its row. Entries past a sequence's
    last page are never read, so they may hold anything.
    """
    table = _ints("block_table", block_table, 2, "(B, max_blocks)")
    lens = _ints("seqlens", seqlens, 1, "(B,)")
    B, max_blocks = table.shape
    if B < 1 or max_blocks < 1:
        raise ValueError(
            f"block_table must have shape (B, max_blocks) with B >= 1 and max_blocks >= 1; got "
            f"shape {table.shape}"
        )
    if batch is not None and B != batch:
        raise ValueError(
            f"block_table must have one row per sequence, B = {batch}; got shape {table.shape}"
        )
    if lens.shape != (B,):
        raise ValueError(
            f"seqlens must have one length per row of block_table, shape (B,) = ({B},); got shape "
            f"{lens.shape}"
        )
    capacity = max_blocks * page_size
    for b in range(B):
        if lens[b] < 0:
            raise ValueError(f"seqlens[{b}] must be >= 0; got {lens[b]}")
        if lens[b] > capacity:
            raise ValueError(
                f"seqlens[{b}] = {lens[b]} exceeds the table's capacity max_blocks * page_size = "
                f"{max_blocks} * {page_size} = {capacity}"
            )
        if lens[b] < min_len:
            raise ValueError(
                f"seqlens[{b}] = {lens[b]} must be >= {min_len_name} = {min_len} (the queries are "
                "the last positions of their sequence)"
            )
        first, end = _page_range(0 if start is None else int(start[b]), int(lens[b]), page_size)
        used = table[b, first:end]  # the pages of positions [start, len)
        bad = np.flatnonzero((used < 0) | (used >= num_blocks))
        if bad.size:
            j = first + int(bad[0])
            raise ValueError(
                f"block_table[{b}, {j}] = {table[b, j]} is not a page id in [0, num_blocks) = "
                f"[0, {num_blocks}) (sequence {b} of length {lens[b]} uses entries {first} to "
                f"{end - 1})"
            )
        ids, first_at, counts = np.unique(used, return_index=True, return_counts=True)
        if (counts > 1).any():
            page = int(ids[counts > 1][0])
            where = [first + int(j) for j in np.flatnonzero(used == page)]
            raise ValueError(
                f"block_table[{b}] uses page {page} twice, at entries {where}: two positions of "
                "one sequence cannot share a slot"
            )
    return table, lens


def _page_range(start: int, stop: int, page_size: int) -> tuple[int, int]:
    """The table entries ``[first, end)`` holding positions ``start <= p < stop`` (none when
    ``stop <= start``)."""
    first = start // page_size
    return (first, -(-stop // page_size)) if stop > start else (first, first)


def _addresses(
    table: np.ndarray, b: int, stop: int, page_size: int, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(P1): the page and slot of positions ``start <= p < stop`` of sequence ``b``."""
    p = np.arange(start, stop)  # (S_b,)
    return table[b, p // page_size], p % page_size


def _readers(
    table: np.ndarray, lens: np.ndarray, page_size: int, start: np.ndarray | None = None
) -> dict[int, list[int]]:
    """page id -> the sequences whose positions ``[start[b], lens[b])`` lie in it."""
    readers: dict[int, list[int]] = {}
    for b in range(table.shape[0]):
        first, end = _page_range(0 if start is None else int(start[b]), int(lens[b]), page_size)
        for page in table[b, first:end]:
            readers.setdefault(int(page), []).append(b)
    return readers


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {value!r}")
    return bool(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {int(value)}")
    return int(value)


# ----------------------------------------------------------------------------- gather and write


def gather_pages(
    pages: ArrayLike,
    block_table: ArrayLike,
    seqlens: ArrayLike,
    *,
    fill: float = 0.0,
    dtype: DTypeLike | None = None,
) -> GatheredPages:
    r"""Each sequence's rows of a paged cache, read into a dense ``(B, Hkv, S_max, D)`` array, (P2).

    Parameters
    ----------
    pages : array_like, shape (num_blocks, page_size, Hkv, D)
        ``k_pages`` or ``v_pages`` in FlashAttention's layout.
    block_table : array_like of int, shape (B, max_blocks)
        Physical page of each sequence's logical page; entries past a sequence's last page are
        not read.
    seqlens : array_like of int, shape (B,)
        Sequence lengths, ``0 <= seqlens[b] <= max_blocks * page_size``.
    fill : float, default 0.0
        Value of the padding positions ``p >= seqlens[b]`` of the dense array.
    dtype : dtype, optional
        Output dtype; float64 when omitted.

    Returns
    -------
    GatheredPages
        ``dense`` (B, Hkv, S_max, D) with ``S_max = max(seqlens)`` (this library's head-first
        layout), and ``lengths`` (B,). Only the slots the sequences own are read.

    Raises
    ------
    ValueError
        Page ids out of range or repeated among a sequence's pages, lengths beyond the table's
        capacity, malformed shapes.

    Notes
    -----
    ``dense[b, h, p] = pages[block_table[b, p // page_size], p % page_size, h]`` for
    ``p < seqlens[b]``, (P1)-(P2) of ``docs/derivations/paged.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import gather_pages
    >>> pages = np.arange(3 * 2).reshape(3, 2, 1, 1).astype(float)   # 3 pages of 2 slots
    >>> g = gather_pages(pages, [[2, 0], [1, 9]], [3, 1])             # 9: never read
    >>> g.dense[:, 0, :, 0]
    array([[4., 5., 0.],
           [2., 0., 0.]])
    """
    dt = resolve_dtype(dtype, pages)
    pages = _pages("pages", pages, dt, "(num_blocks, page_size, Hkv, D)")
    N, ps, Hkv, D = pages.shape
    table, lens = _check_table(block_table, seqlens, N, ps)
    B = table.shape[0]
    dense = np.full((B, Hkv, int(lens.max()), D), fill, dtype=dt)  # (B, Hkv, S_max, D)
    for b in range(B):
        page, slot = _addresses(table, b, int(lens[b]), ps)  # (P1)
        dense[b, :, : lens[b]] = pages[page, slot].swapaxes(0, 1)  # (S_b, Hkv, D) -> (Hkv, S_b, D)
    return GatheredPages(dense=dense, lengths=lens)


def make_paged_cache(
    k: ArrayLike,
    v: ArrayLike,
    seqlens: ArrayLike,
    page_size: int,
    *,
    block_table: ArrayLike | None = None,
    num_blocks: int | None = None,
    fill: float = 0.0,
    dtype: DTypeLike | None = None,
) -> PagedKV:
    r"""Write dense per-sequence keys and values into pages: the inverse of :func:`gather_pages`.

    Parameters
    ----------
    k : array_like, shape (B, Hkv, S_max, Dk)
        Keys in this library's layout; positions ``p >= seqlens[b]`` are ignored.
    v : array_like, shape (B, Hkv, S_max, Dv)
        Values.
    seqlens : array_like of int, shape (B,)
        Sequence lengths, ``<= S_max``.
    page_size : int
        Slots per page.
    block_table : array_like of int, shape (B, max_blocks), optional
        Where to put each sequence (e.g. a shuffled table). No page may be used by two
        sequences (each slot is written once). When omitted, the sequences take consecutive
        pages in order, and entries past a sequence's last page hold 0.
    num_blocks : int, optional
        Pages to allocate; the largest used id + 1 (with a table) or the number of used pages
        when omitted.
    fill : float, default 0.0
        Value of every slot no sequence owns (``numpy.nan`` gives :func:`poison_unused`'s pages).
    dtype : dtype, optional
        Page dtype; float64 when omitted.

    Returns
    -------
    PagedKV
        ``k_pages`` (num_blocks, page_size, Hkv, Dk), ``v_pages``, ``block_table``, ``seqlens``.

    Notes
    -----
    The writes of (P1): ``k_pages[block_table[b, p // page_size], p % page_size] = k[b, :, p]``
    (``docs/derivations/paged.md``).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import gather_pages, make_paged_cache
    >>> k = np.arange(2 * 1 * 3 * 1, dtype=float).reshape(2, 1, 3, 1)    # B=2, S_max=3
    >>> cache = make_paged_cache(k, k, [3, 2], page_size=2)
    >>> cache.block_table, cache.k_pages.shape
    (array([[0, 1],
           [2, 0]]), (3, 2, 1, 1))
    >>> bool(np.array_equal(gather_pages(cache.k_pages, cache.block_table, [3, 2]).dense[0], k[0]))
    True
    """
    dt = resolve_dtype(dtype, k, v)
    k = as_float("k", k, dt)
    v = as_float("v", v, dt)
    for name, x, layout in (("k", k, "(B, Hkv, S_max, Dk)"), ("v", v, "(B, Hkv, S_max, Dv)")):
        if x.ndim != 4 or x.size == 0:
            raise ValueError(
                f"{name} must have shape {layout} (4 dims, none empty); got shape {x.shape}"
            )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must have the same (B, Hkv, S_max) = {k.shape[:3]} as k; got v.shape={v.shape}"
        )
    ps = _positive_int("page_size", page_size)
    B, Hkv, S_max, Dk = k.shape
    lens = _ints("seqlens", seqlens, 1, "(B,)")
    if lens.shape != (B,):
        raise ValueError(f"seqlens must have shape (B,) = ({B},); got shape {lens.shape}")
    for b in range(B):
        if not 0 <= lens[b] <= S_max:
            raise ValueError(f"seqlens[{b}] must be in [0, S_max] = [0, {S_max}]; got {lens[b]}")
    n_pages = -(-lens // ps)  # (B,) pages per sequence
    if block_table is None:
        table = np.zeros((B, max(1, int(n_pages.max()))), dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(n_pages)])
        for b in range(B):
            table[b, : n_pages[b]] = np.arange(offsets[b], offsets[b + 1])
        used_max = int(offsets[-1]) - 1
    else:
        table = _ints("block_table", block_table, 2, "(B, max_blocks)")
        used = [table[b, : n_pages[b]] for b in range(B)]
        used_max = max((int(u.max()) for u in used if u.size), default=-1)
    N = max(1, used_max + 1) if num_blocks is None else _positive_int("num_blocks", num_blocks)
    table, lens = _check_table(table, lens, N, ps, batch=B)
    shared = {p: r for p, r in _readers(table, lens, ps).items() if len(set(r)) > 1}
    if shared:
        page, who = next(iter(shared.items()))
        raise ValueError(
            f"block_table gives page {page} to sequences {sorted(set(who))}: each slot is written "
            "once, so make_paged_cache needs distinct pages per sequence"
        )
    k_pages = np.full((N, ps, Hkv, Dk), fill, dtype=dt)  # (N, ps, Hkv, Dk)
    v_pages = np.full((N, ps, Hkv, v.shape[3]), fill, dtype=dt)
    for b in range(B):
        page, slot = _addresses(table, b, int(lens[b]), ps)  # (P1)
        k_pages[page, slot] = k[b, :, : lens[b]].swapaxes(0, 1)  # (S_b, Hkv, Dk)
        v_pages[page, slot] = v[b, :, : lens[b]].swapaxes(0, 1)
    return PagedKV(k_pages=k_pages, v_pages=v_pages, block_table=table, seqlens=lens)


# ----------------------------------------------------------------------------- FlashInfer


def to_flashinfer(
    k_pages: ArrayLike,
    v_pages: ArrayLike,
    block_table: ArrayLike,
    seqlens: ArrayLike,
    kv_layout: str = "NHD",
) -> FlashInferPagedKV:
    r"""FlashAttention's paged cache as FlashInfer's page tensors and CSR page table, (P6)-(P7).

    Parameters
    ----------
    k_pages, v_pages : array_like, shape (num_blocks, page_size, Hkv, Dk) and (..., Dv)
        The pages in FlashAttention's layout (dtype kept).
    block_table : array_like of int, shape (B, max_blocks)
    seqlens : array_like of int, shape (B,)
        Each ``>= 1``: FlashInfer requires ``1 <= kv_last_page_len <= page_size``, so it has no
        way to write an empty request (leave it out of the batch).
    kv_layout : {"NHD", "HND"}, default "NHD"
        FlashInfer's page layout: ``(num_pages, page_size, Hkv, D)`` (the same as
        FlashAttention's) or ``(num_pages, Hkv, page_size, D)``.

    Returns
    -------
    FlashInferPagedKV
        ``k_data``, ``v_data`` (new arrays in ``kv_layout``; page ids unchanged), ``kv_indptr``
        (B + 1,), ``kv_indices`` (nnz_pages,), ``kv_last_page_len`` (B,), ``kv_layout``.

    Notes
    -----
    Request ``b`` owns ``n_b = ceil(seqlens[b] / page_size)`` pages, ``kv_indices[kv_indptr[b]:
    kv_indptr[b + 1]] = block_table[b, :n_b]``, and ``kv_last_page_len[b] = seqlens[b] -
    page_size (n_b - 1)``, (P6)-(P7) of ``docs/derivations/paged.md``. Source: flashinfer-ai/
    flashinfer ``docs/tutorials/kv_layout.rst`` ("Page Table Layout"): "The KV sequence length of
    request i is page_size * (len(page_indices[i]) - 1) + last_page_len[i]", and "The
    last_page_len of each request must be greater than zero, and less than or equal to
    page_size"; ``flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper`` and
    ``flashinfer.page.append_paged_kv_cache`` take these arrays.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import to_flashinfer
    >>> pages = np.zeros((4, 2, 1, 3))                       # 4 pages of 2 slots
    >>> fi = to_flashinfer(pages, pages, [[3, 1, 0], [2, 0, 0]], [3, 2], kv_layout="HND")
    >>> fi.kv_indptr, fi.kv_indices, fi.kv_last_page_len, fi.k_data.shape
    (array([0, 2, 3]), array([3, 1, 2]), array([1, 2]), (4, 1, 2, 3))
    """
    layout = _check_kv_layout(kv_layout)
    k = _numeric("k_pages", k_pages, K_PAGES, 4)
    v = _numeric("v_pages", v_pages, V_PAGES, 4)
    _check_page_shapes(k, v, "k_pages", "v_pages")
    N, ps = k.shape[:2]
    table, lens = _check_table(block_table, seqlens, N, ps)
    empty = np.flatnonzero(lens == 0)
    if empty.size:
        raise ValueError(
            f"seqlens[{int(empty[0])}] = 0: FlashInfer's page table cannot describe an empty "
            "request (kv_last_page_len must be in [1, page_size]); drop it from the batch"
        )
    n_pages = -(-lens // ps)  # (B,)   (P6)
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int64)  # (B + 1,)
    indices = np.concatenate([table[b, : n_pages[b]] for b in range(table.shape[0])])
    last = lens - ps * (n_pages - 1)  # (B,) in [1, page_size]   (P7)
    if layout == "HND":  # (N, ps, Hkv, D) -> (N, Hkv, ps, D)
        k_data, v_data = (
            k.swapaxes(1, 2).copy(),  # copy(): C order, never a view
            v.swapaxes(1, 2).copy(),
        )
    else:
        k_data, v_data = k.copy(), v.copy()
    return FlashInferPagedKV(
        k_data=k_data,
        v_data=v_data,
        kv_indptr=indptr,
        kv_indices=indices.astype(np.int64),
        kv_last_page_len=last.astype(np.int64),
        kv_layout=layout,
    )


def _check_kv_layout(kv_layout: Any) -> str:
    if not isinstance(kv_layout, str) or kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}; got {kv_layout!r}")
    return kv_layout


def from_flashinfer(
    k_data: ArrayLike,
    v_data: ArrayLike,
    kv_indptr: ArrayLike,
    kv_indices: ArrayLike,
    kv_last_page_len: ArrayLike,
    kv_layout: str = "NHD",
    *,
    max_blocks: int | None = None,
    pad_id: int = 0,
) -> PagedKV:
    r"""FlashInfer's page tensors and CSR page table as FlashAttention's paged cache, (P6)-(P7).

    Parameters
    ----------
    k_data, v_data : array_like
        ``(num_pages, page_size, Hkv, D)`` (NHD) or ``(num_pages, Hkv, page_size, D)`` (HND).
    kv_indptr : array_like of int, shape (B + 1,)
        From 0, non-decreasing, ending at ``len(kv_indices)``; every request has >= 1 page.
    kv_indices : array_like of int, shape (nnz_pages,)
        Page ids in ``[0, num_pages)``.
    kv_last_page_len : array_like of int, shape (B,)
        In ``[1, page_size]``.
    kv_layout : {"NHD", "HND"}, default "NHD"
    max_blocks : int, optional
        Columns of the block table; the most pages of any request when omitted.
    pad_id : int, default 0
        The table entries past a request's last page (never read; :func:`poison_unused` sets
        them to an out-of-range id).

    Returns
    -------
    PagedKV
        ``k_pages``, ``v_pages`` (new arrays, FlashAttention's layout, dtype kept),
        ``block_table`` (B, max_blocks), ``seqlens`` (B,) = ``page_size (n_b - 1) +
        kv_last_page_len[b]``.

    Notes
    -----
    The inverse of :func:`to_flashinfer` on every entry a request uses, (P6)-(P7) of
    ``docs/derivations/paged.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import from_flashinfer
    >>> pages = np.zeros((4, 2, 1, 3))
    >>> fa = from_flashinfer(pages, pages, [0, 2, 3], [3, 1, 2], [1, 2])
    >>> fa.block_table, fa.seqlens
    (array([[3, 1],
           [2, 0]]), array([3, 2]))
    """
    layout = _check_kv_layout(kv_layout)
    k = _numeric("k_data", k_data, "(num_pages, page_size, Hkv, Dk) or HND", 4)
    v = _numeric("v_data", v_data, "(num_pages, page_size, Hkv, Dv) or HND", 4)
    if layout == "HND":  # (N, Hkv, ps, D) -> (N, ps, Hkv, D)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    _check_page_shapes(k, v, "k_data", "v_data")
    N, ps = k.shape[:2]
    indptr = _ints("kv_indptr", kv_indptr, 1, "(B + 1,)")
    indices = _ints("kv_indices", kv_indices, 1, "(nnz_pages,)")
    last = _ints("kv_last_page_len", kv_last_page_len, 1, "(B,)")
    if indptr.size < 2 or indptr[0] != 0:
        raise ValueError(
            f"kv_indptr must have B + 1 >= 2 entries starting at 0; got {indptr.tolist()}"
        )
    B = indptr.size - 1
    n_pages = np.diff(indptr)  # (B,)
    if (n_pages < 1).any():
        b = int(np.flatnonzero(n_pages < 1)[0])
        raise ValueError(
            f"kv_indptr must increase by >= 1 per request (every request has a page); got "
            f"kv_indptr[{b}] = {indptr[b]}, kv_indptr[{b + 1}] = {indptr[b + 1]}"
        )
    if indptr[-1] != indices.size:
        raise ValueError(
            f"kv_indptr[-1] must equal len(kv_indices) = {indices.size}; got {indptr[-1]}"
        )
    if last.shape != (B,):
        raise ValueError(f"kv_last_page_len must have shape (B,) = ({B},); got {last.shape}")
    bad = np.flatnonzero((last < 1) | (last > ps))
    if bad.size:
        b = int(bad[0])
        raise ValueError(
            f"kv_last_page_len[{b}] must be in [1, page_size] = [1, {ps}]; got {last[b]}"
        )
    M = int(n_pages.max()) if max_blocks is None else _positive_int("max_blocks", max_blocks)
    if M < n_pages.max():
        raise ValueError(
            f"max_blocks = {M} is less than the {int(n_pages.max())} pages of the longest request"
        )
    if isinstance(pad_id, (bool, np.bool_)) or not isinstance(pad_id, numbers.Integral):
        raise TypeError(f"pad_id must be an int; got {pad_id!r}")
    table = np.full((B, M), int(pad_id), dtype=np.int64)
    for b in range(B):
        table[b, : n_pages[b]] = indices[indptr[b] : indptr[b + 1]]  # (P6)
    lens = ps * (n_pages - 1) + last  # (P7)
    table, lens = _check_table(table, lens, N, ps)
    return PagedKV(k_pages=k.copy(), v_pages=v.copy(), block_table=table, seqlens=lens)


# ----------------------------------------------------------------------------- vLLM


def vllm_x(dtype: DTypeLike) -> int:
    """vLLM's ``x``: the elements in 16 bytes, ``16 // itemsize`` (8 for float16 and bfloat16).

    Source: vllm-project/vllm ``vllm/attention/ops/paged_attn.py`` (``PagedAttention.
    split_kv_cache``: ``x = 16 // kv_cache.element_size()``) and ``csrc/attention/
    attention_kernels.cu`` (``constexpr int x = 16 / sizeof(cache_t)``).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import vllm_x
    >>> vllm_x(np.float16), vllm_x(np.float32), vllm_x(np.uint8)
    (8, 4, 16)
    """
    size = np.dtype(dtype).itemsize
    if size < 1 or 16 % size:
        raise ValueError(f"vllm_x needs an element size dividing 16 bytes; got {size} bytes")
    return 16 // size


def to_vllm(
    k_pages: ArrayLike, v_pages: ArrayLike, *, x: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""FlashAttention's pages as vLLM's ``paged_attention`` v1/v2 key and value caches, (P8)-(P9).

    Parameters
    ----------
    k_pages : array_like, shape (num_blocks, block_size, Hkv, Dk)
    v_pages : array_like, shape (num_blocks, block_size, Hkv, Dv)
    x : int, optional
        Elements per 16 bytes of the kernel's cache dtype; ``Dk`` must be a multiple. When
        omitted, :func:`vllm_x` of ``k_pages``' dtype (2 for float64): cast to the kernel's dtype
        first, or pass ``x=8`` for a float16/bfloat16 kernel.

    Returns
    -------
    key_cache : ndarray, shape (num_blocks, Hkv, Dk // x, block_size, x)
    value_cache : ndarray, shape (num_blocks, Hkv, Dv, block_size)
        New arrays, dtype kept. vLLM's ``block_tables`` and ``seq_lens`` are this library's
        ``block_table`` and ``seqlens`` unchanged.

    Notes
    -----
    ``key_cache[n, h, d // x, s, d % x] = k_pages[n, s, h, d]`` and ``value_cache[n, h, d, s] =
    v_pages[n, s, h, d]``, (P8)-(P9) of ``docs/derivations/paged.md``. Source: vllm-project/vllm
    ``csrc/attention/attention_kernels.cu`` (``paged_attention_kernel``: ``k_cache //
    [num_blocks, num_kv_heads, head_size/x, block_size, x]``, ``v_cache // [num_blocks,
    num_kv_heads, head_size, block_size]``) and ``csrc/cache_kernels.cu``
    (``reshape_and_cache_kernel``).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import to_vllm
    >>> key_cache, value_cache = to_vllm(np.zeros((5, 16, 2, 64)), np.zeros((5, 16, 2, 32)), x=8)
    >>> key_cache.shape, value_cache.shape
    ((5, 2, 8, 16, 8), (5, 2, 32, 16))
    """
    k = _numeric("k_pages", k_pages, K_PAGES, 4)
    v = _numeric("v_pages", v_pages, V_PAGES, 4)
    _check_page_shapes(k, v, "k_pages", "v_pages")
    x = vllm_x(k.dtype) if x is None else _positive_int("x", x)
    N, bs, Hkv, Dk = k.shape
    if Dk % x:
        raise ValueError(f"k_pages' head width Dk = {Dk} must be a multiple of x = {x}")
    # (N, bs, Hkv, Dk) -> (N, bs, Hkv, Dk/x, x) -> (N, Hkv, Dk/x, bs, x)   (P8)
    key_cache = k.reshape(N, bs, Hkv, Dk // x, x).transpose(0, 2, 3, 1, 4).copy()
    value_cache = v.transpose(0, 2, 3, 1).copy()  # (N, Hkv, Dv, bs)   (P9)
    return key_cache, value_cache


def from_vllm(key_cache: ArrayLike, value_cache: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    r"""vLLM's ``paged_attention`` key and value caches as FlashAttention's pages, (P8)-(P9).

    Parameters
    ----------
    key_cache : array_like, shape (num_blocks, Hkv, Dk // x, block_size, x)
        ``x`` is read from the last axis.
    value_cache : array_like, shape (num_blocks, Hkv, Dv, block_size)

    Returns
    -------
    k_pages : ndarray, shape (num_blocks, block_size, Hkv, Dk)
    v_pages : ndarray, shape (num_blocks, block_size, Hkv, Dv)
        New arrays, dtype kept; the inverse of :func:`to_vllm`.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import from_vllm, to_vllm
    >>> k, v = np.random.default_rng(0).normal(size=(2, 3, 4, 2, 8)), np.zeros((3, 4, 2, 5))
    >>> back = from_vllm(*to_vllm(k[0], v, x=4))
    >>> bool(np.array_equal(back[0], k[0]))
    True
    """
    kc = _numeric("key_cache", key_cache, "(num_blocks, Hkv, Dk // x, block_size, x)", 5)
    vc = _numeric("value_cache", value_cache, "(num_blocks, Hkv, Dv, block_size)", 4)
    N, Hkv, dx, bs, x = kc.shape
    if (vc.shape[0], vc.shape[1], vc.shape[3]) != (N, Hkv, bs):
        raise ValueError(
            f"value_cache must have (num_blocks, Hkv, ., block_size) = ({N}, {Hkv}, ., {bs}) like "
            f"key_cache; got value_cache.shape={vc.shape}, key_cache.shape={kc.shape}"
        )
    k_pages = kc.transpose(0, 3, 1, 2, 4).copy().reshape(N, bs, Hkv, dx * x)  # (P8)
    v_pages = vc.transpose(0, 3, 1, 2).copy()  # (N, bs, Hkv, Dv)   (P9)
    return k_pages, v_pages


def to_vllm_flash(k_pages: ArrayLike, v_pages: ArrayLike) -> np.ndarray:
    r"""FlashAttention's pages as vLLM's FlashAttention-backend cache ``(2, num_blocks, block_size,
    Hkv, D)``.

    Parameters
    ----------
    k_pages, v_pages : array_like, shape (num_blocks, block_size, Hkv, D)
        One head width D for keys and values (the backend stacks them).

    Returns
    -------
    ndarray, shape (2, num_blocks, block_size, Hkv, D)
        ``kv_cache[0]`` the keys, ``kv_cache[1]`` the values (a new array, dtype kept).

    Notes
    -----
    Source: vllm-project/vllm ``vllm/v1/attention/backends/flash_attn.py``,
    ``FlashAttentionBackend.get_kv_cache_shape``: ``(2, num_blocks, block_size, num_kv_heads,
    head_size)``, with "Block size must be a multiple of 16"; ``kv_cache.unbind(0)`` gives
    FlashAttention's ``k_cache``, ``v_cache`` directly (its ``get_kv_cache_stride_order`` can
    store the HND order in memory under the same logical shape).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import to_vllm_flash
    >>> to_vllm_flash(np.zeros((3, 16, 2, 8)), np.ones((3, 16, 2, 8))).shape
    (2, 3, 16, 2, 8)
    """
    k = _numeric("k_pages", k_pages, K_PAGES, 4)
    v = _numeric("v_pages", v_pages, V_PAGES, 4)
    if v.shape != k.shape:
        raise ValueError(
            f"v_pages must have k_pages' shape {k.shape} (the backend stacks keys and values, so "
            f"Dv = Dk); got v_pages.shape={v.shape}"
        )
    return np.stack([k, v])


def from_vllm_flash(kv_cache: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's FlashAttention-backend ``kv_cache`` ``(2, num_blocks, block_size, Hkv, D)`` as
    ``(k_pages, v_pages)`` (new arrays, dtype kept); the inverse of :func:`to_vllm_flash`.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import from_vllm_flash
    >>> k_pages, v_pages = from_vllm_flash(np.zeros((2, 3, 16, 2, 8)))
    >>> k_pages.shape
    (3, 16, 2, 8)
    """
    kv = _numeric("kv_cache", kv_cache, "(2, num_blocks, block_size, Hkv, D)", 5)
    if kv.shape[0] != 2:
        raise ValueError(
            f"kv_cache must have shape (2, num_blocks, block_size, Hkv, D); got {kv.shape}"
        )
    return kv[0].copy(), kv[1].copy()


# ----------------------------------------------------------------------------- poisoning


def poison_unused(
    k_pages: ArrayLike,
    v_pages: ArrayLike,
    block_table: ArrayLike,
    seqlens: ArrayLike,
    *,
    cache_leftpad: ArrayLike | None = None,
    bad_page: int | None = None,
    dtype: DTypeLike | None = None,
) -> PagedKV:
    r"""A copy of a paged cache in which everything no sequence owns is poison, (P10).

    Every slot that no sequence owns -- past ``seqlens[b]`` in a last page, in pages no sequence
    uses, and (with ``cache_leftpad``) before ``cache_leftpad[b]`` -- becomes NaN, and every
    ``block_table`` entry no sequence needs -- past its last page, or wholly in its left padding
    -- becomes ``bad_page``, an id outside ``[0, num_blocks)``. A kernel that reads past the end of
    a sequence then gives NaN or an index error instead of a plausible number; the reference never
    reads them, so its results on the poisoned cache are the clean cache's, bit for bit, (P11).

    Parameters
    ----------
    k_pages : array_like, shape (num_blocks, page_size, Hkv, Dk)
    v_pages : array_like, shape (num_blocks, page_size, Hkv, Dv)
    block_table : array_like of int, shape (B, max_blocks)
    seqlens : array_like of int, shape (B,)
        Sequence ``b`` owns positions ``cache_leftpad[b] <= p < seqlens[b]``. Pages may be shared
        by several sequences (prefix caching): a slot is owned when any sequence owns it.
    cache_leftpad : array_like of int, shape (B,), optional
        FlashAttention's ``cache_leftpad``: the first position each sequence owns, ``0 <=
        cache_leftpad[b] <= seqlens[b]``; 0 when omitted.
    bad_page : int, optional
        The id written into unused table entries; ``num_blocks`` when omitted (NumPy and PyTorch
        indexing raise IndexError on it). Not -1: Python indexing wraps -1 to the last page, and
        vLLM's cache writes skip a slot of -1 as padding. A GPU kernel reading ``num_blocks`` reads
        just past the buffer, often without faulting: run it under ``compute-sanitizer``, or pass a
        huge id such as ``2**31 - 1`` to make the read fault.
    dtype : dtype, optional
        Page dtype; the input's when it is a floating dtype, float64 otherwise.

    Returns
    -------
    PagedKV
        New ``k_pages``, ``v_pages``, ``block_table``, ``seqlens``; the inputs are unchanged.

    Notes
    -----
    A dense FlashAttention cache ``(B, S_cache, Hkv, D)`` is a paged cache of B pages of
    ``S_cache`` slots with ``block_table = arange(B)[:, None]``: ``poison_unused(k_cache,
    v_cache, np.arange(B)[:, None], cache_seqlens, cache_leftpad=...)`` poisons it (ignore the
    returned table). See (P10)-(P11) of ``docs/derivations/paged.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import poison_unused
    >>> pages = np.ones((3, 2, 1, 1))                           # 3 pages of 2 slots
    >>> p = poison_unused(pages, pages, [[2, 0], [1, 1]], [1, 2])
    >>> p.k_pages[:, :, 0, 0]                                   # page 0 is used by no sequence
    array([[nan, nan],
           [ 1.,  1.],
           [ 1., nan]])
    >>> p.block_table                                           # 3 = num_blocks: out of range
    array([[2, 3],
           [1, 3]])
    """
    if dtype is None:
        arr = np.asarray(k_pages)
        dt = arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)
    else:
        dt = resolve_dtype(dtype)
    k = _pages("k_pages", k_pages, dt, K_PAGES)
    v = _pages("v_pages", v_pages, dt, V_PAGES)
    _check_page_shapes(k, v, "k_pages", "v_pages")
    N, ps = k.shape[:2]
    lens = _ints("seqlens", seqlens, 1, "(B,)")
    lp = None
    if cache_leftpad is not None:
        lp = _ints("cache_leftpad", cache_leftpad, 1, "(B,)")
        if lp.shape != lens.shape:
            raise ValueError(
                f"cache_leftpad must have seqlens' shape (B,) = {lens.shape}; got {lp.shape}"
            )
        for b in range(lp.size):
            if not 0 <= lp[b] <= lens[b]:
                raise ValueError(
                    f"cache_leftpad[{b}] must be in [0, seqlens[{b}]] = [0, {lens[b]}]; got {lp[b]}"
                )
    table, lens = _check_table(block_table, lens, N, ps, start=lp)
    if bad_page is None:
        bad = N
    else:
        if isinstance(bad_page, (bool, np.bool_)) or not isinstance(bad_page, numbers.Integral):
            raise TypeError(f"bad_page must be an int outside [0, num_blocks); got {bad_page!r}")
        bad = int(bad_page)
        if 0 <= bad < N:
            raise ValueError(
                f"bad_page must be outside [0, num_blocks) = [0, {N}) (a real page would not "
                f"show a stray read); got {bad}"
            )
    owned = np.zeros((N, ps), dtype=bool)  # (N, ps)   (P10)
    new_table = np.full_like(table, bad)  # (B, max_blocks)
    for b in range(table.shape[0]):
        start = 0 if lp is None else int(lp[b])
        page, slot = _addresses(table, b, int(lens[b]), ps, start)
        owned[page, slot] = True
        first, end = _page_range(start, int(lens[b]), ps)
        new_table[b, first:end] = table[b, first:end]
    k_out = np.array(k, dtype=dt, copy=True)
    v_out = np.array(v, dtype=dt, copy=True)
    k_out[~owned] = np.nan  # every (page, slot) no sequence owns, all heads and features
    v_out[~owned] = np.nan
    return PagedKV(k_pages=k_out, v_pages=v_out, block_table=new_table, seqlens=lens)


# ----------------------------------------------------------------------------- paged attention


class _PagedForward(NamedTuple):
    """Per-sequence traces and addresses of one paged forward (internal)."""

    traces: tuple[AttentionTrace, ...]
    addresses: tuple[tuple[np.ndarray, np.ndarray], ...]  # per sequence: (pages, slots) (S_b,)
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dtype: np.dtype


def _paged_options(given: AttentionOptions, where: str, kwargs: dict) -> AttentionOptions:
    """Refuse what a paged problem cannot take; the alignment is always bottom right (an
    ``align=`` keyword other than ``"bottom_right"`` raises; an options object's default
    ``"top_left"`` is overridden)."""
    given.refuse(
        PAGED_REFUSED,
        where,
        "a dense (..., T, S) mask or bias has one key length S for the whole batch, but each "
        "sequence has its own; dropout and rounding are not part of the reference (gather the "
        "keys with gather_pages and call scaled_dot_product_attention per sequence instead)",
    )
    explicit = kwargs.get("align", given.align if "align" in given.given() else "bottom_right")
    if explicit != "bottom_right":
        raise ValueError(
            f"{where} is bottom_right aligned (the T queries are the last T positions of each "
            f"sequence); got align={explicit!r}"
        )
    return given


def _paged_forward(q, k_pages, v_pages, block_table, seqlens, given, where) -> _PagedForward:
    dt = given.compute_dtype(q, k_pages, v_pages)
    q = as_float("q", q, dt)
    k = _pages("k_pages", k_pages, dt, K_PAGES)
    v = _pages("v_pages", v_pages, dt, V_PAGES)
    if q.ndim != 4 or q.size == 0:
        raise ValueError(
            f"q must have shape (B, H, T, Dk) (4 dims, none empty); got shape {q.shape}"
        )
    _check_page_shapes(k, v, "k_pages", "v_pages")
    B, H, T, Dk = q.shape
    N, ps, Hkv = k.shape[:3]
    if k.shape[3] != Dk:
        raise ValueError(
            f"k_pages must have Dk = {Dk} like q; got k_pages.shape={k.shape}, q.shape={q.shape}"
        )
    if H % Hkv:
        raise ValueError(
            f"q's head count H={H} must be a multiple of the pages' Hkv={Hkv} (grouped-query "
            f"attention); got q.shape={q.shape}, k_pages.shape={k.shape}"
        )
    table, lens = _check_table(
        block_table, seqlens, N, ps, batch=B, min_len=T, min_len_name="q's T"
    )
    per_sequence = given.replace(align="bottom_right", dtype=dt)
    traces, addresses = [], []
    for b in range(B):
        page, slot = _addresses(table, b, int(lens[b]), ps)  # (P1)
        kb = k[page, slot].swapaxes(0, 1)  # (S_b, Hkv, Dk) -> (Hkv, S_b, Dk)   (P2)
        vb = v[page, slot].swapaxes(0, 1)  # (Hkv, S_b, Dv)
        try:
            tr = sdpa_forward(q[b], kb, vb, options=per_sequence)  # (P3)
        except ValueError as exc:
            raise ValueError(f"{where}, sequence {b}: {exc}") from None
        traces.append(tr)
        addresses.append((page, slot))
    return _PagedForward(tuple(traces), tuple(addresses), k.shape, v.shape, np.dtype(dt))


def paged_attention(
    q: ArrayLike,
    k_pages: ArrayLike,
    v_pages: ArrayLike,
    block_table: ArrayLike,
    seqlens: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    return_lse: bool = False,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Attention of each sequence's T queries to its keys in a paged cache, (P1)-(P3).

    Parameters
    ----------
    q : array_like, shape (B, H, T, Dk)
        Queries in this library's layout: the T queries of sequence ``b`` are its last T
        positions, ``seqlens[b] - T .. seqlens[b] - 1``.
    k_pages : array_like, shape (num_blocks, page_size, Hkv, Dk)
        FlashAttention's paged key cache. ``Hkv`` divides ``H``: query head ``h`` reads key/value
        head ``h // (H // Hkv)``.
    v_pages : array_like, shape (num_blocks, page_size, Hkv, Dv)
    block_table : array_like of int, shape (B, max_blocks)
        Sequence ``b``'s pages; the entries past its last page are not read. A page may be
        shared by several sequences (a prefix cache), not used twice by one sequence.
    seqlens : array_like of int, shape (B,)
        ``T <= seqlens[b] <= max_blocks * page_size``.
    options : AttentionOptions, optional
        The attention options as one object.
    return_lse : bool, default False
        Also return the log-sum-exp of each row, (B, H, T).
    **kwargs
        Fields of :class:`~attention_ref.AttentionOptions`, applied within each sequence with
        its own length ``S_b = seqlens[b]``: ``causal``, ``window``, ``chunk_size``,
        ``sink_tokens`` (all aligned bottom right: query ``i`` at position ``i + S_b - T``),
        ``sinks`` (H,), ``softcap``, ``scale``, ``empty_rows`` (no row is ever empty: each query
        sees its own position) and ``dtype``; ``align`` may only be ``"bottom_right"``.
        ``mask``, ``bias``, dropout and ``rounding`` raise ValueError: a dense ``(..., T, S)``
        mask has one S for the batch while each sequence has its own (use
        :func:`~attention_ref.variants.paged.gather_pages` and
        :func:`~attention_ref.scaled_dot_product_attention` per sequence).

    Returns
    -------
    out : ndarray, shape (B, H, T, Dv)
    lse : ndarray, shape (B, H, T)
        Only with ``return_lse=True``; natural log (with ``sinks``, their term included).

    Raises
    ------
    ValueError
        Naming the entry: a page id out of ``[0, num_blocks)`` or repeated among the pages a
        sequence uses (``block_table[b, j]``), ``seqlens[b]`` negative, beyond the table's
        capacity or below T, mismatched shapes, a refused option.

    Notes
    -----
    With ``P`` the page size and
    :math:`K^{(b)}_p = k_\text{pages}[\beta_b(\lfloor p/P \rfloor),\ p \bmod P]`, (P1)-(P2),

    .. math::
        \text{out}_b = \operatorname{attention}\big(q_b, K^{(b)}, V^{(b)}\big),\quad
        i' = i + S_b - T \qquad \text{(P3)}

    computed as :func:`~attention_ref.sdpa_forward` on each sequence's gathered keys with
    ``align="bottom_right"`` (``docs/derivations/paged.md``). Slots no sequence owns are never
    read, so the result is the same, bit for bit, on a cache from :func:`poison_unused`.

    References
    ----------
    Kwon et al. (2023), "Efficient Memory Management for Large Language Model Serving with
    PagedAttention"; FlashAttention ``flash_attn_with_kvcache(..., block_table=...)``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.variants.paged import gather_pages, paged_attention
    >>> rng = np.random.default_rng(0)
    >>> k_pages, v_pages = rng.normal(size=(6, 4, 2, 8)), rng.normal(size=(6, 4, 2, 5))
    >>> table, seqlens = [[4, 1, 0], [2, 5, 3]], [7, 10]          # 7 and 10 positions
    >>> q = rng.normal(size=(2, 4, 3, 8))                         # (B, H, T, Dk): GQA 4 / 2
    >>> out = paged_attention(q, k_pages, v_pages, table, seqlens, causal=True)
    >>> keys = gather_pages(k_pages, table, seqlens).dense        # (B, Hkv, 10, Dk)
    >>> vals = gather_pages(v_pages, table, seqlens).dense
    >>> first = scaled_dot_product_attention(q[0], keys[0, :, :7], vals[0, :, :7], causal=True,
    ...                                      align="bottom_right")
    >>> out.shape, bool(np.allclose(out[0], first, rtol=1e-13, atol=0))
    ((2, 4, 3, 5), True)
    """
    given = _paged_options(AttentionOptions.of(options, **kwargs), "paged_attention", kwargs)
    given.refuse_mods("paged_attention")
    fwd = _paged_forward(q, k_pages, v_pages, block_table, seqlens, given, "paged_attention")
    return_lse = _bool("return_lse", return_lse)
    out = np.stack([tr.out for tr in fwd.traces])  # (B, H, T, Dv)
    if return_lse:
        return out, np.stack([tr.logsumexp for tr in fwd.traces])  # (B, H, T)
    return out


def paged_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k_pages: ArrayLike,
    v_pages: ArrayLike,
    block_table: ArrayLike,
    seqlens: ArrayLike,
    *,
    dlse: ArrayLike | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> PagedGrads:
    r"""Gradients of :func:`paged_attention`: ``dq`` and the pages' gradients, scatter-added.

    Recomputes the forward, runs :func:`~attention_ref.sdpa_backward` on each sequence
    ((A8)-(A19) of ``docs/derivations/attention.md``), and adds each sequence's ``dk``, ``dv``
    into the slots its keys were read from: the transpose of the gather, (P4)-(P5) of
    ``docs/derivations/paged.md``.

    Parameters
    ----------
    dout : array_like, shape (B, H, T, Dv)
        Gradient of the loss with respect to the output.
    q, k_pages, v_pages, block_table, seqlens, options, **kwargs
        The forward's inputs and options, as for :func:`paged_attention`.
    dlse : array_like, shape (B, H, T), optional
        Gradient with respect to the log-sum-exp ``return_lse=True`` returned, (A17).

    Returns
    -------
    PagedGrads
        ``dq`` (B, H, T, Dk); ``dk_pages`` (num_blocks, page_size, Hkv, Dk) and ``dv_pages``
        (num_blocks, page_size, Hkv, Dv) in the pages' layout; ``dsinks`` (H,) with sinks, else
        None. A slot no sequence reads gets exactly 0. A slot read by several sequences (a
        shared prefix page) gets the sum of their gradients: the derivative of the forward,
        which reads it once per sequence, (P5).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.paged import paged_attention_backward
    >>> rng = np.random.default_rng(0)
    >>> k_pages, v_pages = rng.normal(size=(6, 4, 2, 8)), rng.normal(size=(6, 4, 2, 5))
    >>> q, dout = rng.normal(size=(2, 4, 3, 8)), rng.normal(size=(2, 4, 3, 5))
    >>> g = paged_attention_backward(dout, q, k_pages, v_pages, [[4, 1], [2, 5]], [7, 6])
    >>> g.dk_pages.shape, bool((g.dk_pages[[0, 3]] == 0).all())    # pages 0, 3: nobody's
    ((6, 4, 2, 8), True)
    """
    given = _paged_options(
        AttentionOptions.of(options, **kwargs), "paged_attention_backward", kwargs
    )
    given.refuse_mods("paged_attention_backward")
    fwd = _paged_forward(
        q, k_pages, v_pages, block_table, seqlens, given, "paged_attention_backward"
    )
    dt = fwd.dtype
    out_shape = (len(fwd.traces),) + fwd.traces[0].out.shape  # (B, H, T, Dv)
    dout = as_float("dout", dout, dt)
    if dout.shape != out_shape:
        raise ValueError(
            f"dout must have the output's shape (B, H, T, Dv) = {out_shape}; got {dout.shape}"
        )
    if dlse is not None:
        dlse = check_dlse(dlse, out_shape[:-1], dt, "(B, H, T)")
    dk_pages = np.zeros(fwd.k_shape, dtype=dt)  # (N, ps, Hkv, Dk); unread slots stay 0   (P4)
    dv_pages = np.zeros(fwd.v_shape, dtype=dt)  # (N, ps, Hkv, Dv)
    dq = np.zeros(out_shape[:-1] + (fwd.k_shape[-1],), dtype=dt)  # (B, H, T, Dk)
    dsinks = None
    for b, (tr, (page, slot)) in enumerate(zip(fwd.traces, fwd.addresses, strict=True)):
        g = sdpa_backward(dout[b], tr, None if dlse is None else dlse[b])  # (A8)-(A19)
        dq[b] = g.dq
        # (P5) the gather's transpose: add, since a shared page is read by several sequences
        np.add.at(dk_pages, (page, slot), g.dk.swapaxes(0, 1))  # (S_b, Hkv, Dk)
        np.add.at(dv_pages, (page, slot), g.dv.swapaxes(0, 1))  # (S_b, Hkv, Dv)
        if g.dsinks is not None:
            dsinks = g.dsinks if dsinks is None else dsinks + g.dsinks
    return PagedGrads(dq=dq, dk_pages=dk_pages, dv_pages=dv_pages, dsinks=dsinks)


# ----------------------------------------------------------------------------- FA's kvcache


def _check_capacity(ends, cs, T_new, capacity, what) -> None:
    """FlashAttention: "you must make sure that the cache is large enough to hold the new
    values"."""
    for b in range(ends.size):
        if ends[b] > capacity:
            raise ValueError(
                f"cache_seqlens[{b}] + T_new = {cs[b]} + {T_new} = {ends[b]} exceeds the cache's "
                f"capacity {what} = {capacity}"
            )


def _fa_window(window_size: Any) -> tuple[int | None, int | None] | None:
    """FlashAttention's ``window_size=(left, right)``, -1 unbounded, as this library's window."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(
            f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), as "
            f"FlashAttention takes it; got {window_size!r}"
        )
    sides: list[int | None] = []
    for name, side in zip(("window_size[0]", "window_size[1]"), window_size, strict=True):
        if isinstance(side, (bool, np.bool_)) or not isinstance(side, numbers.Integral):
            raise TypeError(f"{name} must be an int >= -1; got {side!r}")
        if side < -1:
            raise ValueError(f"{name} must be >= -1 (-1: unbounded); got {int(side)}")
        sides.append(None if side == -1 else int(side))
    return None if sides == [None, None] else (sides[0], sides[1])


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: np.ndarray, interleaved: bool):
    """x (heads, T, D) rotated at positions ``pos`` (T,) of the tables, (P13)."""
    return apply_rotary(x, cos[pos], sin[pos], interleaved, dtype=x.dtype)  # (R3)


def attention_with_kvcache(
    q: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    k: ArrayLike | None = None,
    v: ArrayLike | None = None,
    *,
    cache_seqlens: ArrayLike | int,
    rotary_cos: ArrayLike | None = None,
    rotary_sin: ArrayLike | None = None,
    rotary_interleaved: bool = False,
    cache_batch_idx: ArrayLike | None = None,
    cache_leftpad: ArrayLike | None = None,
    block_table: ArrayLike | None = None,
    return_lse: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: Any = None,
    num_splits: int = 0,
    return_softmax_lse: bool | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> KVCacheResult | KVCacheLSEResult:
    r"""FlashAttention's ``flash_attn_with_kvcache``, point by point, on new copies of the caches.

    Appends ``k``, ``v`` (``k`` rotated) at ``cache_seqlens`` into copies of the caches, rotates
    ``q``, and attends each sequence's queries to its keys ``cache_leftpad[b] <= j <
    cache_seqlens[b] + T_new`` with the bottom-right alignment, (P12)-(P14). Nothing passed in
    is modified (FlashAttention updates the caches in place).

    Parameters
    ----------
    q : array_like, shape (B, T, H, Dk)
        Queries, FlashAttention's layout (not this library's ``(B, H, T, Dk)``).
    k_cache : array_like
        ``(B_cache, S_cache, Hkv, Dk)``, or ``(num_blocks, page_size, Hkv, Dk)`` with a
        ``block_table``. Without ``cache_batch_idx``, sequence ``b`` uses row ``b``
        (``B_cache >= B``).
    v_cache : array_like
        The same with ``Dv``.
    k : array_like, shape (B, T_new, Hkv, Dk), optional
        New keys, written at positions ``cache_seqlens[b] .. cache_seqlens[b] + T_new - 1``
        (rotated first when ``rotary_cos`` is given); with ``v``.
    v : array_like, shape (B, T_new, Hkv, Dv), optional
        New values.
    cache_seqlens : int or array_like of int, shape (B,)
        The cache's length per sequence before the append (an int: the same for all). With
        ``cache_leftpad`` it is the end position, not the count of valid keys.
    rotary_cos, rotary_sin : array_like, shape (seqlen_ro, rotary_dim / 2), optional
        RoPE tables (e.g. ``attention_ref.core.rotary.rotary_cos_sin``); only with ``k``.
        ``k`` is rotated at positions ``cache_seqlens[b] + i``; ``q`` at ``cache_seqlens[b] +
        i`` when causal or local (a finite ``window``/``window_size``, or ``chunk_size``), and
        all at ``cache_seqlens[b]`` otherwise, (P13). ``seqlen_ro`` must cover those positions.
        The first ``rotary_dim`` features rotate, the rest pass through.
    rotary_interleaved : bool, default False
        True pairs features ``(2i, 2i+1)`` (GPT-J), False ``(i, i + rotary_dim / 2)`` (GPT-NeoX).
        FlashAttention's own default is True: pass it explicitly when porting a call.
    cache_batch_idx : array_like of int, shape (B,), optional
        Row of the dense cache each sequence uses, in ``[0, B_cache)``; not with
        ``block_table`` (FlashAttention refuses it too). With ``k``, the rows must be distinct
        (FlashAttention leaves duplicate writes unspecified).
    cache_leftpad : array_like of int, shape (B,), optional
        First valid position of each sequence, ``0 <= cache_leftpad[b] <= cache_seqlens[b]``.
        Allowed with ``block_table`` here (FlashAttention-2 refuses that pair).
    block_table : array_like of int, shape (B, max_blocks), optional
        A paged cache (:func:`paged_attention`'s layout). Pages may be shared between sequences
        for reading (a prefix cache); a page the append writes into must belong to its sequence
        alone, and no sequence may use a page twice.
    return_lse : bool, default False
        Also return the log-sum-exp, (B, H, T) (FlashAttention's ``return_softmax_lse``, also
        accepted by that name).
    softmax_scale : float, optional
        FlashAttention's name for ``scale``; ``1 / sqrt(Dk)`` when both are omitted.
    window_size : (int, int), optional
        FlashAttention's ``(left, right)`` with -1 for unbounded; or give ``window`` (None for
        unbounded), not both.
    alibi_slopes : None
        Not supported: anything but None raises ValueError.
    num_splits : int, default 0
        Accepted and ignored: splitting the keys changes FlashAttention's round-off, not the
        function (:mod:`attention_ref.variants.flash` computes split-KV itself).
    return_softmax_lse : bool, optional
        FlashAttention's name for ``return_lse``.
    options : AttentionOptions, optional
        The attention options as one object.
    **kwargs
        Fields of :class:`~attention_ref.AttentionOptions`: ``causal`` (bottom right, as in
        FlashAttention), ``window``, ``chunk_size``, ``sink_tokens``, ``sinks`` (H,),
        ``softcap`` (0 means off, as in FlashAttention), ``scale``, ``empty_rows`` ("zero" is
        FlashAttention's "If the row of the mask is all zero, the output will be zero") and
        ``dtype``. The positions of ``chunk_size`` and ``sink_tokens`` count from the
        sequence's first visible key (``cache_leftpad[b]``). ``align`` may only be
        ``"bottom_right"``; ``mask``, ``bias``, dropout and ``rounding`` raise ValueError.

    Returns
    -------
    KVCacheResult or KVCacheLSEResult
        ``out`` (B, T, H, Dv); with ``return_lse``, ``lse`` (B, H, T); then ``k_cache`` and
        ``v_cache``, new arrays of the inputs' shapes (compute dtype) holding the appended
        (rotated) keys and values.

    Raises
    ------
    ValueError
        The capacity exceeded (``cache_seqlens[b] + T_new`` beyond ``S_cache`` or ``max_blocks *
        page_size``), rotary tables without ``k`` or too short, ``cache_batch_idx`` with a
        ``block_table`` or duplicated with ``k``, a page written that another sequence uses, page
        ids out of range, ``cache_leftpad`` out of range, ``window`` and ``window_size`` (or
        ``scale`` and ``softmax_scale``) both given, ``alibi_slopes``, refused options.

    Notes
    -----
    For sequence ``b`` with cache row (or pages) ``c_b``, ``s_b = cache_seqlens[b]`` and ``l_b =
    cache_leftpad[b]``: the cache after the append holds ``R(k_{b,i}; s_b + i)`` at position
    ``s_b + i``, (P12); the visible keys are positions ``l_b .. s_b + T_new - 1``, ``S_b = s_b +
    T_new - l_b`` of them, and query ``i`` sits at key index ``i + S_b - T`` of them (bottom
    right), (P14). See ``docs/derivations/paged.md`` and the parameter table of
    ``docs/serving_layouts.md``. Source: Dao-AILab/flash-attention
    ``flash_attn/flash_attn_interface.py`` (``flash_attn_with_kvcache``'s docstring),
    ``csrc/flash_attn/flash_api.cpp`` (``mha_fwd_kvcache``'s checks) and
    ``csrc/flash_attn/src/block_info.h`` (``leftpad_k``).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.rotary import rotary_cos_sin
    >>> from attention_ref.variants.paged import attention_with_kvcache
    >>> rng = np.random.default_rng(0)
    >>> k_cache, v_cache = rng.normal(size=(2, 8, 1, 4)), rng.normal(size=(2, 8, 1, 4))
    >>> q, k = rng.normal(size=(2, 1, 2, 4)), rng.normal(size=(2, 1, 1, 4))   # T = T_new = 1
    >>> v = np.ones((2, 1, 1, 4))
    >>> cos, sin = rotary_cos_sin(np.arange(8), rotary_dim=4)
    >>> out, k_new, v_new = attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=[3, 5],
    ...                                            rotary_cos=cos, rotary_sin=sin, causal=True)
    >>> out.shape, v_new[0, 3, 0], bool(np.array_equal(k_new[0, :3], k_cache[0, :3]))
    ((2, 1, 2, 4), array([1., 1., 1., 1.]), True)
    """
    where = "attention_with_kvcache"
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("attention_with_kvcache")
    if softmax_scale is not None:
        if "scale" in given.given():
            raise ValueError("give scale or softmax_scale (FlashAttention's name), not both")
        given = given.replace(scale=softmax_scale)
    if window_size is not None:
        if "window" in given.given():
            raise ValueError(
                "give window (None: unbounded) or window_size (FlashAttention's, -1: unbounded), "
                f"not both; got window={given.window!r}, window_size={window_size!r}"
            )
        given = given.replace(window=_fa_window(window_size))
    if isinstance(given.softcap, numbers.Real) and not isinstance(given.softcap, bool):
        if given.softcap == 0:  # FlashAttention: "Anything > 0 activates softcapping"
            given = given.replace(softcap=None)
    if alibi_slopes is not None:
        raise ValueError(
            f"{where} does not support alibi_slopes (FlashAttention's ALiBi bias); got an "
            f"argument of type {type(alibi_slopes).__name__}"
        )
    check_count("num_splits", num_splits)  # ignored: it changes the round-off only
    if return_softmax_lse is not None:
        if return_lse:
            raise ValueError("give return_lse or return_softmax_lse, not both")
        return_lse = return_softmax_lse
    return_lse = _bool("return_lse", return_lse)
    interleaved = _bool("rotary_interleaved", rotary_interleaved)
    given = _paged_options(given, where, kwargs)

    paged = block_table is not None
    dt = given.compute_dtype(q, k_cache, v_cache, k, v)
    q = as_float("q", q, dt)
    if q.ndim != 4 or q.size == 0:
        raise ValueError(
            f"q must have shape (B, T, H, Dk) (FlashAttention's layout; 4 dims, none empty); got "
            f"shape {q.shape}"
        )
    B, T, H, Dk = q.shape
    klay = K_PAGES if paged else "(B_cache, S_cache, Hkv, Dk)"
    kc = np.array(_pages("k_cache", k_cache, dt, klay), dtype=dt, copy=True)  # the new caches
    vc = np.array(_pages("v_cache", v_cache, dt, klay.replace("Dk", "Dv")), dtype=dt, copy=True)
    _check_page_shapes(kc, vc, "k_cache", "v_cache")
    rows, length, Hkv = kc.shape[:3]  # dense: (B_cache, S_cache); paged: (num_blocks, page_size)
    if kc.shape[3] != Dk:
        raise ValueError(f"k_cache must have Dk = {Dk} like q; got k_cache.shape={kc.shape}")
    if H % Hkv:
        raise ValueError(
            f"q's head count H={H} must be a multiple of the cache's Hkv={Hkv} (grouped-query "
            f"attention); got q.shape={q.shape}, k_cache.shape={kc.shape}"
        )
    Dv = vc.shape[3]

    # ---- the new keys and values
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and their values)")
    T_new = 0
    if k is not None:
        k = as_float("k", k, dt)
        v = as_float("v", v, dt)
        if k.ndim != 4 or k.shape[0] != B or k.shape[2:] != (Hkv, Dk) or k.shape[1] < 1:
            raise ValueError(
                f"k must have shape (B, T_new, Hkv, Dk) = ({B}, T_new >= 1, {Hkv}, {Dk}); got "
                f"shape {k.shape}"
            )
        T_new = k.shape[1]
        if v.shape != (B, T_new, Hkv, Dv):
            raise ValueError(
                f"v must have shape (B, T_new, Hkv, Dv) = {(B, T_new, Hkv, Dv)}; got {v.shape}"
            )

    # ---- lengths, rows, left padding
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        cs = np.full(B, int(cache_seqlens), dtype=np.int64)  # FA: torch.full((q.shape[0],), ...)
    else:
        cs = _ints("cache_seqlens", cache_seqlens, 1, "(B,)")
        if cs.shape != (B,):
            raise ValueError(f"cache_seqlens must have shape (B,) = ({B},); got {cs.shape}")
    lp = np.zeros(B, dtype=np.int64)
    if cache_leftpad is not None:
        lp = _ints("cache_leftpad", cache_leftpad, 1, "(B,)")
        if lp.shape != (B,):
            raise ValueError(f"cache_leftpad must have shape (B,) = ({B},); got {lp.shape}")
    for b in range(B):
        if cs[b] < 0:
            raise ValueError(f"cache_seqlens[{b}] must be >= 0; got {cs[b]}")
        if not 0 <= lp[b] <= cs[b]:
            raise ValueError(
                f"cache_leftpad[{b}] must be in [0, cache_seqlens[{b}]] = [0, {cs[b]}]; got {lp[b]}"
            )
    ends = cs + T_new  # (B,) the sequences' lengths after the append
    if paged:
        if cache_batch_idx is not None:
            raise ValueError(
                "cache_batch_idx cannot be used with block_table: the table already maps each "
                "sequence to its pages (FlashAttention: 'Paged KVcache does not support "
                "cache_batch_idx')"
            )
        capacity = _ints("block_table", block_table, 2, "(B, max_blocks)").shape[1] * length
        _check_capacity(ends, cs, T_new, capacity, "max_blocks * page_size")
        table, _ = _check_table(block_table, ends, rows, length, batch=B, start=lp)
        readers = _readers(table, ends, length, lp)
        for b in range(B):
            for page in _addresses(table, b, int(ends[b]), length, int(cs[b]))[0]:
                if set(readers[int(page)]) != {b}:
                    raise ValueError(
                        f"sequence {b} appends into page {int(page)}, which sequences "
                        f"{sorted(set(readers[int(page)]) - {b})} also use: a shared page is "
                        "read-only (give the new tokens a page of their own)"
                    )
    else:
        _check_capacity(ends, cs, T_new, length, "S_cache")
        if cache_batch_idx is None:
            if rows < B:
                raise ValueError(
                    f"k_cache has B_cache = {rows} rows for B = {B} sequences; give "
                    "cache_batch_idx or one row per sequence"
                )
            cbi = np.arange(B)
        else:
            cbi = _ints("cache_batch_idx", cache_batch_idx, 1, "(B,)")
            if cbi.shape != (B,):
                raise ValueError(f"cache_batch_idx must have shape (B,) = ({B},); got {cbi.shape}")
            bad = np.flatnonzero((cbi < 0) | (cbi >= rows))
            if bad.size:
                b = int(bad[0])
                raise ValueError(
                    f"cache_batch_idx[{b}] = {cbi[b]} is not a row of k_cache, [0, B_cache) = "
                    f"[0, {rows})"
                )
            if k is not None and np.unique(cbi).size != B:
                raise ValueError(
                    f"cache_batch_idx repeats a row ({cbi.tolist()}) while k and v are appended: "
                    "two sequences would write the same cache row (FlashAttention: the values "
                    "'might come from any of the duplicate indices')"
                )

    # every option validated once, also when no sequence has a key to attend
    per_sequence = given.replace(align="bottom_right", dtype=dt)
    checked = per_sequence.validate((H, T, 1), dt, head_dim=Dk)

    # ---- rotary: FlashAttention's positions, (P13)
    local = (checked.window is not None and checked.window != (None, None)) or (
        checked.chunk_size is not None
    )
    per_position = checked.causal or local
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        if rotary_cos is None or rotary_sin is None:
            raise ValueError("rotary_cos and rotary_sin must be given together")
        if k is None:
            raise ValueError(
                "rotary_cos/rotary_sin need the new k and v: FlashAttention rotates only when it "
                "appends ('If rotary cos/sin are provided, new key / value to be appended to KV "
                "cache must also be provided')"
            )
        cos = as_float("rotary_cos", rotary_cos, dt)
        sin = as_float("rotary_sin", rotary_sin, dt)
        if cos.ndim != 2 or cos.shape != sin.shape or cos.shape[1] < 1:
            raise ValueError(
                "rotary_cos and rotary_sin must have one shape (seqlen_ro, rotary_dim / 2); got "
                f"{cos.shape} and {sin.shape}"
            )
        if 2 * cos.shape[1] > Dk:
            raise ValueError(
                f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * cos.shape[1]} exceeds Dk = {Dk}"
            )
        need = int(max((ends - 1).max(), (cs + (T - 1 if per_position else 0)).max())) + 1
        if cos.shape[0] < need:
            raise ValueError(
                f"rotary_cos has seqlen_ro = {cos.shape[0]} rows; the positions rotated here reach "
                f"{need - 1}, so it needs >= {need}"
            )

    # ---- append (P12), then attend (P14)
    sinks = checked.sinks  # (H,) or None
    out = np.zeros((B, T, H, Dv), dtype=dt)  # (B, T, H, Dv)
    lse = np.full((B, H, T), -np.inf, dtype=dt)  # (B, H, T)
    for b in range(B):
        if k is None or v is None:
            continue
        kb = k[b].swapaxes(0, 1)  # (Hkv, T_new, Dk)
        if rotary:
            kb = _rotate(kb, cos, sin, cs[b] + np.arange(T_new), interleaved)  # (P13)
        if paged:
            page, slot = _addresses(table, b, int(ends[b]), length, int(cs[b]))
            kc[page, slot] = kb.swapaxes(0, 1)  # (T_new, Hkv, Dk)   (P12)
            vc[page, slot] = np.asarray(v)[b]
        else:
            kc[cbi[b], cs[b] : ends[b]] = kb.swapaxes(0, 1)  # (P12)
            vc[cbi[b], cs[b] : ends[b]] = np.asarray(v)[b]
    for b in range(B):
        if paged:
            page, slot = _addresses(table, b, int(ends[b]), length, int(lp[b]))
            kb, vb = kc[page, slot], vc[page, slot]  # (S_b, Hkv, Dk), (S_b, Hkv, Dv)
        else:
            kb, vb = kc[cbi[b], lp[b] : ends[b]], vc[cbi[b], lp[b] : ends[b]]
        qb = q[b].swapaxes(0, 1)  # (H, T, Dk)
        if rotary:
            pos = cs[b] + (np.arange(T) if per_position else np.zeros(T, dtype=np.int64))
            qb = _rotate(qb, cos, sin, pos, interleaved)  # (P13)
        if kb.shape[0] == 0:  # no key at all: every row is empty (or attends its sink only)
            if sinks is not None:
                lse[b] = sinks[:, None]
            elif given.empty_rows == "nan":
                out[b] = np.nan
            elif given.empty_rows in ("raise", "uniform"):
                raise ValueError(
                    f"empty_rows={given.empty_rows!r}: sequence {b} has no key to attend "
                    f"(cache_leftpad[{b}] = cache_seqlens[{b}] = {cs[b]} and nothing appended)"
                )
            continue
        try:
            tr = sdpa_forward(qb, kb.swapaxes(0, 1), vb.swapaxes(0, 1), options=per_sequence)
        except ValueError as exc:
            raise ValueError(f"{where}, sequence {b}: {exc}") from None
        out[b] = tr.out.swapaxes(0, 1)  # (H, T, Dv) -> (T, H, Dv)   (P14)
        lse[b] = tr.logsumexp  # (H, T)
    if return_lse:
        return KVCacheLSEResult(out=out, lse=lse, k_cache=kc, v_cache=vc)
    return KVCacheResult(out=out, k_cache=kc, v_cache=vc)
