r"""FlexAttention's ``BlockMask``: which blocks of the (query, key) grid are empty, partial or full.

The score grid ``(Q_LEN, KV_LEN)`` is cut into blocks of ``BLOCK_SIZE = (Q_BLOCK, KV_BLOCK)``.
A block is **empty** when no pair in it may attend (a kernel skips it), **full** when every pair
may (a kernel computes it without calling ``mask_mod``), **partial** otherwise (a kernel calls
``mask_mod`` on it). The lists are stored as PyTorch stores them (``torch/nn/attention/
flex_attention.py``, ``BlockMask``):

=====================  ======================  ===========================================
field                  shape                   meaning
=====================  ======================  ===========================================
``kv_num_blocks``      (B, H, nq)              partial blocks of each query-block row
``kv_indices``         (B, H, nq, nk)          their key-block indices first, ascending
``full_kv_num_blocks`` (B, H, nq)              full blocks of each row (None: not separated)
``full_kv_indices``    (B, H, nq, nk)          their key-block indices first
``q_num_blocks``       (B, H, nk)              the transposes, for the backward: partial
``q_indices``          (B, H, nk, nq)          blocks of each key-block column
``full_q_num_blocks``  (B, H, nk)              full blocks of each column
``full_q_indices``     (B, H, nk, nq)
=====================  ======================  ===========================================

``B`` and ``H`` may be 1 (the mask is the same for every batch element or head). Entries of
``kv_indices`` past ``kv_num_blocks`` are defined by torch's construction (the rest of a stable
descending argsort: the other blocks in ascending order) and never read. Padding: when
``Q_LEN`` or ``KV_LEN`` is not a multiple of the block size, the positions past the end count
as masked, so a tail block is never full (``_convert_mask_to_block_mask`` pads with False).

A BlockMask is only a promise: a kernel trusts it, and a block wrongly marked full attends its
masked pairs silently. :func:`check_block_mask` compares a BlockMask with its ``mask_mod`` pair by
pair and reports each broken promise. Conventions: ``docs/flex.md``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._validate import check_positive_int
from .mods import evaluate_mask_mod, mod_indices

__all__ = ["BlockMask", "BlockMaskReport", "check_block_mask", "create_block_mask"]

#: FlexAttention's default block size, ``_DEFAULT_SPARSE_BLOCK_SIZE``.
DEFAULT_BLOCK_SIZE = 128


def _block_size(value: Any) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        n = check_positive_int("BLOCK_SIZE", value)
        return n, n
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (
            check_positive_int("BLOCK_SIZE[0] (Q_BLOCK)", value[0]),
            check_positive_int("BLOCK_SIZE[1] (KV_BLOCK)", value[1]),
        )
    raise TypeError(f"BLOCK_SIZE must be an int or a pair (Q_BLOCK, KV_BLOCK); got {value!r}")


def _ordered(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(num, indices) of a 0/1 block grid (..., rows, cols): torch's ``_dense_to_ordered`` (the
    count per row and a stable descending argsort, so the set blocks come first, ascending)."""
    dense = dense.astype(np.int32)
    num = dense.sum(axis=-1).astype(np.int32)
    indices = np.argsort(-dense, axis=-1, kind="stable").astype(np.int32)
    return num, indices


def _dense(num: np.ndarray, indices: np.ndarray, cols: int) -> np.ndarray:
    """The 0/1 grid (..., rows, cols) of ``(num, indices)``: torch's ``_ordered_to_dense``."""
    rows = indices.shape[-2]
    out = np.zeros(indices.shape[:-2] + (rows, cols + 1), dtype=np.int32)
    valid = np.arange(indices.shape[-1]) < num[..., None]  # (..., rows, max_entries)
    where = np.where(valid, indices, cols)  # invalid entries go to the spare column
    np.put_along_axis(out, where.astype(np.int64), 1, axis=-1)
    return out[..., :cols]


def _int_array(name: str, x: Any, ndim: int, layout: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu" or arr.ndim != ndim:
        raise TypeError(
            f"{name} must be an int array of shape {layout}; got {arr.dtype} {arr.shape}"
        )
    return arr.astype(np.int32)


@dataclass(frozen=True, eq=False)
class BlockMask:
    r"""A block-sparse mask in FlexAttention's layout (module docstring for the fields).

    Build it with :func:`create_block_mask` (from a mask mod) or :meth:`from_kv_blocks` (from
    the key-side lists, which it transposes); ``attention_ref.adapters.torch`` converts to and
    from ``torch.nn.attention.flex_attention.BlockMask``.

    Examples
    --------
    >>> from attention_ref import CausalMask, create_block_mask
    >>> bm = create_block_mask(CausalMask(), None, None, 6, 6, BLOCK_SIZE=2)
    >>> bm.to_dense()[0, 0]
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]], dtype=int32)
    >>> bm.kv_num_blocks[0, 0], bm.full_kv_num_blocks[0, 0]     # diagonal partial, below full
    (array([1, 1, 1], dtype=int32), array([0, 1, 2], dtype=int32))
    """

    seq_lengths: tuple[int, int]
    kv_num_blocks: np.ndarray
    kv_indices: np.ndarray
    full_kv_num_blocks: np.ndarray | None
    full_kv_indices: np.ndarray | None
    q_num_blocks: np.ndarray
    q_indices: np.ndarray
    full_q_num_blocks: np.ndarray | None
    full_q_indices: np.ndarray | None
    BLOCK_SIZE: tuple[int, int]
    mask_mod: Callable[..., Any] | None = field(default=None)

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: Any,
        kv_indices: Any,
        full_kv_num_blocks: Any = None,
        full_kv_indices: Any = None,
        BLOCK_SIZE: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
        mask_mod: Callable[..., Any] | None = None,
        seq_lengths: tuple[int, int] | None = None,
    ) -> BlockMask:
        r"""A BlockMask from its key-side lists; the query-side ones are their transposes.

        Parameters
        ----------
        kv_num_blocks : array_like of int, shape (B, H, nq)
        kv_indices : array_like of int, shape (B, H, nq, nk)
        full_kv_num_blocks, full_kv_indices : array_like of int, optional
            Both or neither; same shapes.
        BLOCK_SIZE : int or (int, int), default 128
        mask_mod : callable, optional
            The mask mod of the partial blocks.
        seq_lengths : (int, int), optional
            ``(Q_LEN, KV_LEN)``; ``(nq * Q_BLOCK, nk * KV_BLOCK)`` when omitted, as torch.

        Returns
        -------
        BlockMask
        """
        num = _int_array("kv_num_blocks", kv_num_blocks, 3, "(B, H, nq)")
        idx = _int_array("kv_indices", kv_indices, 4, "(B, H, nq, nk)")
        if idx.shape[:3] != num.shape:
            raise ValueError(
                f"kv_indices (B, H, nq, nk) = {idx.shape} must match kv_num_blocks (B, H, nq) = "
                f"{num.shape}"
            )
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError(
                "full_kv_num_blocks and full_kv_indices must be given together or not at all"
            )
        full_num = full_idx = None
        if full_kv_num_blocks is not None:
            full_num = _int_array("full_kv_num_blocks", full_kv_num_blocks, 3, "(B, H, nq)")
            full_idx = _int_array("full_kv_indices", full_kv_indices, 4, "(B, H, nq, nk)")
            if full_num.shape != num.shape or full_idx.shape != idx.shape:
                raise ValueError(
                    f"full_kv_num_blocks {full_num.shape} and full_kv_indices {full_idx.shape} "
                    f"must have kv_num_blocks' {num.shape} and kv_indices' {idx.shape} shapes"
                )
        nk = idx.shape[-1]
        for name, n, ix in (("kv", num, idx), ("full_kv", full_num, full_idx)):
            if n is None or ix is None:
                continue
            if (n < 0).any() or (n > nk).any():
                raise ValueError(
                    f"{name}_num_blocks must lie in [0, nk={nk}]; got {n.min()}..{n.max()}"
                )
            used = np.arange(nk) < n[..., None]
            if ((ix < 0) | (ix >= nk))[used].any():
                raise ValueError(f"{name}_indices must lie in [0, nk={nk}) where they are used")
        bs = _block_size(BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (idx.shape[-2] * bs[0], nk * bs[1])
        Q_LEN = check_positive_int("seq_lengths[0] (Q_LEN)", seq_lengths[0])
        KV_LEN = check_positive_int("seq_lengths[1] (KV_LEN)", seq_lengths[1])
        if -(-Q_LEN // bs[0]) != idx.shape[-2] or -(-KV_LEN // bs[1]) != nk:
            raise ValueError(
                f"seq_lengths {(Q_LEN, KV_LEN)} with BLOCK_SIZE {bs} make "
                f"{(-(-Q_LEN // bs[0]), -(-KV_LEN // bs[1]))} blocks; kv_indices has "
                f"(nq, nk) = {idx.shape[-2:]}"
            )
        if mask_mod is not None and not callable(mask_mod):
            raise TypeError(f"mask_mod must be callable or None; got {type(mask_mod).__name__}")
        q_num, q_idx = _ordered(_dense(num, idx, nk).swapaxes(-1, -2))  # torch's _transpose_ordered
        full_q_num = full_q_idx = None
        if full_num is not None and full_idx is not None:
            full_q_num, full_q_idx = _ordered(_dense(full_num, full_idx, nk).swapaxes(-1, -2))
        return cls(
            (Q_LEN, KV_LEN),
            num,
            idx,
            full_num,
            full_idx,
            q_num,
            q_idx,
            full_q_num,
            full_q_idx,
            bs,
            mask_mod,
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Q_LEN, KV_LEN)``, as torch's ``BlockMask.shape``."""
        B, H = self.kv_num_blocks.shape[:2]
        return (B, H) + tuple(self.seq_lengths)

    @property
    def num_blocks(self) -> tuple[int, int]:
        """``(nq, nk)``: query-block rows and key-block columns."""
        return self.kv_indices.shape[-2], self.kv_indices.shape[-1]

    def partial_blocks(self) -> np.ndarray:
        """(B, H, nq, nk) bool: the blocks marked partial."""
        return _dense(self.kv_num_blocks, self.kv_indices, self.num_blocks[1]).astype(bool)

    def full_blocks(self) -> np.ndarray:
        """(B, H, nq, nk) bool: the blocks marked full (all False when not separated)."""
        if self.full_kv_num_blocks is None or self.full_kv_indices is None:
            return np.zeros(self.kv_indices.shape, dtype=bool)
        return _dense(self.full_kv_num_blocks, self.full_kv_indices, self.num_blocks[1]).astype(
            bool
        )

    def to_dense(self) -> np.ndarray:
        """(B, H, nq, nk) int32: 1 where a block is partial or full, as torch's ``to_dense``."""
        return (self.partial_blocks() | self.full_blocks()).astype(np.int32)

    def sparsity(self) -> float:
        """The percentage of the grid's blocks skipped, as torch's ``sparsity`` (its block area
        counts the padding of tail blocks)."""
        computed = int(self.kv_num_blocks.sum())
        if self.full_kv_num_blocks is not None:
            computed += int(self.full_kv_num_blocks.sum())
        B, H, Q_LEN, KV_LEN = self.shape
        area = computed * self.BLOCK_SIZE[0] * self.BLOCK_SIZE[1]
        return 100.0 * (1.0 - area / (B * H * Q_LEN * KV_LEN))

    def kinds(self) -> np.ndarray:
        """(B, H, nq, nk) int8: 0 empty, 1 partial, 2 full (full wins if both are marked)."""
        return np.where(self.full_blocks(), 2, np.where(self.partial_blocks(), 1, 0)).astype(
            np.int8
        )

    def __repr__(self) -> str:
        return (
            f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
            f"sparsity={self.sparsity():.2f}%, mask_mod={self.mask_mod!r})"
        )


def create_block_mask(
    mask_mod: Callable[..., Any],
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    BLOCK_SIZE: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
    separate_full_blocks: bool = True,
) -> BlockMask:
    r"""The BlockMask of a mask mod, as ``torch.nn.attention.flex_attention.create_block_mask``.

    Parameters
    ----------
    mask_mod : callable
        ``mask_mod(b, h, q_idx, kv_idx) -> bool``, called once on the broadcasting index arrays
        (``attention_ref.core.mods``).
    B, H : int or None
        Batch size and query heads; None = 1 (the same mask for all).
    Q_LEN, KV_LEN : int
    BLOCK_SIZE : int or (int, int), default 128
        ``(Q_BLOCK, KV_BLOCK)``.
    separate_full_blocks : bool, default True
        Keep the full blocks apart (``full_kv_*``), so they are computed without ``mask_mod``;
        False lists every non-empty block as partial.

    Returns
    -------
    BlockMask

    Notes
    -----
    As torch's: the dense mask is padded with False to whole blocks, summed per block, and a
    block is partial when ``0 < count < Q_BLOCK * KV_BLOCK``, full at the whole area
    (``_convert_mask_to_block_mask``); the lists are a stable descending argsort
    (``_dense_to_ordered``) and the query side is their transpose (``_transpose_ordered``).
    The dense mask is built whole: ``B * H * Q_LEN * KV_LEN`` booleans.

    Examples
    --------
    >>> from attention_ref import DocumentMask, create_block_mask
    >>> bm = create_block_mask(DocumentMask([0, 0, 0, 0, 1, 1]), None, None, 6, 6, BLOCK_SIZE=2)
    >>> bm.kinds()[0, 0]                                 # 0 empty, 1 partial, 2 full
    array([[2, 2, 0],
           [2, 2, 0],
           [0, 0, 2]], dtype=int8)
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable; got {type(mask_mod).__name__}")
    B = 1 if B is None else check_positive_int("B", B)
    H = 1 if H is None else check_positive_int("H", H)
    Q_LEN = check_positive_int("Q_LEN", Q_LEN)
    KV_LEN = check_positive_int("KV_LEN", KV_LEN)
    qb, kb = _block_size(BLOCK_SIZE)
    if not isinstance(separate_full_blocks, (bool, np.bool_)):
        raise TypeError(f"separate_full_blocks must be a bool; got {separate_full_blocks!r}")
    shape = (B, H, Q_LEN, KV_LEN)
    mask = np.broadcast_to(
        evaluate_mask_mod(mask_mod, mod_indices(B, H, Q_LEN, KV_LEN), shape), shape
    )
    nq, nk = -(-Q_LEN // qb), -(-KV_LEN // kb)
    padded = np.zeros((B, H, nq * qb, nk * kb), dtype=bool)  # past the end: masked
    padded[..., :Q_LEN, :KV_LEN] = mask
    counts = padded.reshape(B, H, nq, qb, nk, kb).sum(axis=(3, 5))  # (B, H, nq, nk)
    if separate_full_blocks:
        full = counts == qb * kb
        partial = (counts > 0) & ~full
    else:
        full, partial = None, counts > 0
    num, idx = _ordered(partial)
    fnum = fidx = None
    if full is not None:
        fnum, fidx = _ordered(full)
    return BlockMask.from_kv_blocks(num, idx, fnum, fidx, (qb, kb), mask_mod, (Q_LEN, KV_LEN))


@dataclass(frozen=True)
class BlockMaskReport:
    r"""What :func:`check_block_mask` found: each block whose mark breaks its promise.

    Attributes
    ----------
    wrong_full : list of (b, h, q_block, kv_block, masked_pairs)
        Blocks marked full that hold ``masked_pairs`` pairs the mask mod masks (a kernel would
        attend them: wrong results).
    missed : list of (b, h, q_block, kv_block, allowed_pairs)
        Blocks marked empty (neither partial nor full) that hold ``allowed_pairs`` pairs the
        mask mod allows (a kernel would skip them: wrong results).
    partial_but_full, partial_but_empty : int
        Blocks marked partial that are in fact full or empty: correct results, wasted work. (A
        tail block is never counted as full: its positions past the end count as masked, (B15).)
    """

    wrong_full: list[tuple[int, int, int, int, int]]
    missed: list[tuple[int, int, int, int, int]]
    partial_but_full: int
    partial_but_empty: int

    @property
    def ok(self) -> bool:
        """True when no block's mark changes the result."""
        return not self.wrong_full and not self.missed

    def __str__(self) -> str:
        if self.ok:
            waste = self.partial_but_full + self.partial_but_empty
            return "BlockMask ok" + (
                f" ({waste} partial blocks could be skipped or full)" if waste else ""
            )
        lines = [
            f"BlockMask wrong: {len(self.wrong_full)} block(s) marked full hold masked pairs, "
            f"{len(self.missed)} marked empty hold allowed pairs"
        ]
        for what, items in (("full", self.wrong_full), ("empty", self.missed)):
            for b, h, i, j, n in items[:10]:
                noun = "masked" if what == "full" else "allowed"
                lines.append(
                    f"  (b={b}, h={h}, q_block={i}, kv_block={j}) marked {what}: {n} {noun} pair(s)"
                )
            if len(items) > 10:
                lines.append(f"  ... and {len(items) - 10} more marked {what}")
        return "\n".join(lines)


def check_block_mask(
    block_mask: BlockMask,
    mask_mod: Callable[..., Any] | None = None,
    *,
    B: int | None = None,
    H: int | None = None,
) -> BlockMaskReport:
    r"""Compare a BlockMask with a mask mod, pair by pair.

    Parameters
    ----------
    block_mask : BlockMask
    mask_mod : callable, optional
        The truth; ``block_mask.mask_mod`` when omitted.
    B, H : int, optional
        The batch size and heads to check when the BlockMask broadcasts over them (its ``B`` or
        ``H`` is 1); its own sizes by default.

    Returns
    -------
    BlockMaskReport
        ``.ok`` is False when a block marked full holds a masked pair or a block marked empty
        holds an allowed pair; ``str(report)`` lists them.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import BlockMask, CausalMask, check_block_mask, create_block_mask
    >>> bm = create_block_mask(CausalMask(), None, None, 4, 4, BLOCK_SIZE=2)
    >>> check_block_mask(bm).ok
    True
    >>> wrong = BlockMask.from_kv_blocks(                  # block (0, 1) marked full, wrongly
    ...     bm.kv_num_blocks, bm.kv_indices, np.array([[[1, 1]]]), np.array([[[[1, 0], [0, 1]]]]),
    ...     BLOCK_SIZE=2, mask_mod=CausalMask())
    >>> print(check_block_mask(wrong))
    BlockMask wrong: 1 block(s) marked full hold masked pairs, 0 marked empty hold allowed pairs
      (b=0, h=0, q_block=0, kv_block=1) marked full: 4 masked pair(s)
    """
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be an attention_ref BlockMask; got {type(block_mask).__name__} "
            "(attention_ref.adapters.torch.block_mask_from_torch converts torch's)"
        )
    mask_mod = block_mask.mask_mod if mask_mod is None else mask_mod
    if mask_mod is None or not callable(mask_mod):
        raise TypeError(
            "check_block_mask needs a mask_mod: the BlockMask has none and none was given"
        )
    Bm, Hm, Q_LEN, KV_LEN = block_mask.shape
    B = Bm if B is None else check_positive_int("B", B)
    H = Hm if H is None else check_positive_int("H", H)
    for name, n, m in (("B", B, Bm), ("H", H, Hm)):
        if m not in (1, n):
            raise ValueError(f"{name}={n} does not match the BlockMask's {name}={m} (1 or {n})")
    qb, kb = block_mask.BLOCK_SIZE
    nq, nk = block_mask.num_blocks
    shape = (B, H, Q_LEN, KV_LEN)
    truth = np.zeros((B, H, nq * qb, nk * kb), dtype=bool)
    truth[..., :Q_LEN, :KV_LEN] = evaluate_mask_mod(
        mask_mod, mod_indices(B, H, Q_LEN, KV_LEN), shape
    )
    allowed = truth.reshape(B, H, nq, qb, nk, kb).sum(axis=(3, 5))  # (B, H, nq, nk)
    valid = np.zeros((nq * qb, nk * kb), dtype=bool)
    valid[:Q_LEN, :KV_LEN] = True
    area = valid.reshape(nq, qb, nk, kb).sum(axis=(1, 3))  # (nq, nk) real pairs per block
    masked = area - allowed
    full = np.broadcast_to(block_mask.full_blocks(), allowed.shape)
    partial = np.broadcast_to(block_mask.partial_blocks(), allowed.shape) & ~full
    empty = ~full & ~partial

    def where(sel: np.ndarray, count: np.ndarray) -> list[tuple[int, int, int, int, int]]:
        return [
            (int(b), int(h), int(i), int(j), int(count[b, h, i, j]))
            for b, h, i, j in np.argwhere(sel)
        ]

    wrong_full = where(full & (masked > 0), masked)
    missed = where(empty & (allowed > 0), allowed)
    return BlockMaskReport(
        wrong_full=wrong_full,
        missed=missed,
        # a tail block (area < Q_BLOCK * KV_BLOCK) with every real pair allowed is partial by
        # torch's padding rule: not wasted work
        partial_but_full=int((partial & (masked == 0) & (area == qb * kb)).sum()),
        partial_but_empty=int((partial & (allowed == 0)).sum()),
    )
