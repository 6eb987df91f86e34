r"""Which (query, key) pairs may attend: the one builder, dense and per block.

A pair ``(i, j)`` of a row may attend when every one of these allows it (``docs/conventions.md``):

* the boolean ``mask`` (True = may attend), broadcastable to (..., H, T, S);
* ``causal``: ``j <= i'``, with ``i' = i + offset`` the query's position on the key axis
  (``offset`` 0 for ``align="top_left"``, ``S - T`` for ``"bottom_right"``);
* ``window=(left, right)``: ``i' - left <= j <= i' + right`` (None: that side unbounded);
* ``chunk_size=C``: ``i' // C == j // C``, query and key in the same chunk of C positions;
* ``sink_tokens=n``: keys ``j < n`` are exempt from the window and the chunks (not from
  ``causal``, the mask or the bias);
* the ``bias``: a ``-inf`` entry masks its pair;
* sequence lengths: key ``j`` of batch element ``b`` exists when ``j < key_lengths[b]``, query
  ``i`` when ``i < query_lengths[b]`` (JAX's ``key_value_seq_lengths``/``query_seq_lengths``);
* a ``mask_mod(b, h, q_idx, kv_idx)`` (FlexAttention's), on raw indices, evaluated for the
  rows and keys asked for only (one tile at a time on the tiled path).

:class:`AllowedPairs` holds them; :meth:`AllowedPairs.dense` gives the whole boolean array (the
plain path, the mpmath path, the adapters), :meth:`AllowedPairs.block` one tile of it and whether
that tile is empty, full or partial (the tiled path skips empty tiles and masks nothing in full
ones). Causal and window are built from positions, so a tile never needs the whole array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from ._validate import (
    ALIGNS,
    as_bool_mask,
    check_choice,
    check_count,
    check_positive_int,
    check_window,
    fresh,
)
from .mods import evaluate_mask_mod, mod_indices
from .options import CheckedOptions, Window

__all__ = ["AllowedPairs", "BlockKind", "attention_mask", "causal_mask", "window_mask"]

#: What a tile of the allowed pairs holds: no pair, every pair, or some.
BlockKind = Literal["empty", "full", "partial"]


def query_offset(T: int, S: int, align: str) -> int:
    """``i' - i``: 0 under top_left, ``S - T`` under bottom_right."""
    return 0 if align == "top_left" else S - T


def _positional(
    rows: np.ndarray,
    cols: np.ndarray,
    causal: bool,
    window: Window | None,
    offset: int,
    chunk_size: int | None = None,
    sink_tokens: int = 0,
) -> np.ndarray | None:
    """The positional rules for query rows ``rows`` and keys ``cols``: (len(rows), len(cols)) or
    None (every pair allowed).

    ``causal AND (j < sink_tokens OR (window AND same chunk))``.
    """
    local = window is not None or chunk_size is not None
    if not causal and not local:
        return None
    i = rows[:, None] + offset  # (Tb, 1) i', the query's position on the key axis
    j = cols[None, :]  # (1, Sb)
    allowed = np.ones((rows.size, cols.size), dtype=bool)  # (Tb, Sb)
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
    if chunk_size is not None:
        allowed &= (j // chunk_size) == (i // chunk_size)  # floor division: i' may be negative
    if sink_tokens and local:
        allowed |= j < sink_tokens  # the sink tokens are outside the window and the chunks
    if causal:
        allowed &= j <= i
    return allowed


def _tile(x: np.ndarray, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
    """Rows i0:i1 and columns j0:j1 of an array broadcast along its size-1 last two axes."""
    rows = slice(i0, i1) if x.shape[-2] != 1 else slice(None)
    cols = slice(j0, j1) if x.shape[-1] != 1 else slice(None)
    return x[..., rows, cols]


def _and(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


@dataclass(frozen=True, eq=False)
class AllowedPairs:
    r"""The (query, key) pairs a row may attend, for queries ``0..T-1`` and keys ``0..S-1``.

    Build it with :meth:`from_options` (checked attention options) or :meth:`build` (loose
    arguments, validated). The arrays it holds are broadcastable to ``(..., T, S)`` -- a GQA view
    ``(..., Hkv|1, G|1, T|1, S|1)`` works too, since only the last two axes are ever sliced.

    Attributes
    ----------
    T, S : int
        Query and key lengths.
    mask : ndarray of bool or None
        The boolean mask (with any sequence lengths folded in); None = no mask.
    causal : bool
    window : (int or None, int or None) or None
    offset : int
        The query's position on the key axis is ``i + offset``.
    bias : ndarray or None
        The additive bias, kept only when it has ``-inf`` entries (they mask their pairs).
    chunk_size : int or None
        Query and key must lie in the same chunk of ``chunk_size`` positions.
    sink_tokens : int
        The first ``sink_tokens`` keys are exempt from ``window`` and ``chunk_size``.
    mask_mod : callable or None
        FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool`` on raw indices.
    heads : (int, int)
        ``(B, H)``, the batch size and query heads the ``mask_mod`` is called with.
    num_kv_heads : int or None
        When set, the ``mask_mod``'s ``(B, H, Tb, Sb)`` result is given in the GQA view
        ``(B, Hkv, G, Tb, Sb)`` of the tiled path.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.masks import AllowedPairs
    >>> pairs = AllowedPairs.build(4, 6, causal=True, align="bottom_right", window=(1, None))
    >>> pairs.dense().astype(int)
    array([[0, 1, 1, 0, 0, 0],
           [0, 0, 1, 1, 0, 0],
           [0, 0, 0, 1, 1, 0],
           [0, 0, 0, 0, 1, 1]])
    >>> [pairs.block(0, 2, j, j + 2)[0] for j in (0, 2, 4)]
    ['partial', 'partial', 'empty']
    >>> pairs.block(2, 4, 4, 6)[0], pairs.block(0, 1, 1, 3)[0]
    ('partial', 'full')
    """

    T: int
    S: int
    mask: np.ndarray | None = None
    causal: bool = False
    window: Window | None = None
    offset: int = 0
    bias: np.ndarray | None = None
    chunk_size: int | None = None
    sink_tokens: int = 0
    mask_mod: Any = None
    heads: tuple[int, int] = (1, 1)
    num_kv_heads: int | None = None

    @classmethod
    def from_options(
        cls,
        opt: CheckedOptions,
        T: int,
        S: int,
        *,
        mask: np.ndarray | None = None,
        bias: np.ndarray | None = None,
        heads: tuple[int, int] = (1, 1),
        num_kv_heads: int | None = None,
    ) -> AllowedPairs:
        """The allowed pairs of checked options for a ``T x S`` problem.

        ``mask`` and ``bias`` replace ``opt.mask`` and ``opt.bias`` when given (the tiled path
        passes them in its GQA view, and ``num_kv_heads`` for the ``mask_mod``'s); ``heads`` is
        ``(B, H)`` for the ``mask_mod``.
        """
        mask = opt.mask if mask is None else mask
        bias = opt.bias if bias is None else bias
        neg_inf = bias is not None and bool(np.isneginf(bias.real).any())
        return cls(
            T,
            S,
            mask,
            opt.causal,
            opt.window,
            query_offset(T, S, opt.align),
            bias if neg_inf else None,
            opt.chunk_size,
            opt.sink_tokens,
            opt.mask_mod,
            heads,
            num_kv_heads,
        )

    @classmethod
    def build(
        cls,
        T: int,
        S: int,
        *,
        mask: ArrayLike | None = None,
        causal: bool = False,
        align: str = "top_left",
        window: Window | None = None,
        bias: ArrayLike | None = None,
        key_lengths: ArrayLike | None = None,
        query_lengths: ArrayLike | None = None,
        chunk_size: int | None = None,
        sink_tokens: int = 0,
    ) -> AllowedPairs:
        r"""Validate loose arguments and build the allowed pairs.

        Parameters
        ----------
        T, S : int
            Query and key lengths.
        mask : array_like of bool, optional
            True = may attend; broadcastable to ``(..., T, S)``.
        causal : bool, default False
        align : {"top_left", "bottom_right"}, default "top_left"
        window : (int or None, int or None), optional
        bias : array_like, optional
            Only its ``-inf`` entries matter here; broadcastable to ``(..., T, S)``.
        key_lengths, query_lengths : array_like of int, shape (B,), optional
            Valid keys (queries) per batch element, counted from position 0; they apply to the
            first axis of ``(B, H, T, S)``. A query past its length has no key: an empty row.
        chunk_size : int, optional
            Query and key in the same chunk of ``chunk_size`` positions (``i' // C == j // C``).
        sink_tokens : int, default 0
            The first ``sink_tokens`` keys are exempt from ``window`` and ``chunk_size``.

        Returns
        -------
        AllowedPairs
        """
        T = check_positive_int("T", T)
        S = check_positive_int("S", S)
        align = check_choice("align", align, ALIGNS)
        window = check_window(window)
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"causal must be a bool; got {causal!r}")
        if chunk_size is not None:
            chunk_size = check_positive_int("chunk_size", chunk_size)
            check_count("chunk_size", chunk_size)  # at most MAX_POSITION
        sink_tokens = check_count("sink_tokens", sink_tokens)
        m = None
        if mask is not None:
            arr = np.asarray(mask)
            lead = arr.shape[:-2] if arr.ndim > 2 else ()
            m = fresh(as_bool_mask("mask", arr, lead + (T, S), "(..., T, S)"), mask)
        if key_lengths is not None:
            m = _and(
                m, _lengths("key_lengths", key_lengths, S)[:, None, None, None] > np.arange(S)
            )  # (B, 1, 1, S)
        if query_lengths is not None:
            m = _and(
                m,
                _lengths("query_lengths", query_lengths, T)[:, None, None, None]
                > np.arange(T)[:, None],
            )  # (B, 1, T, 1)
        b = None
        if bias is not None:
            b = np.asarray(bias, dtype=float)
            if not np.isneginf(b).any():
                b = None
        return cls(
            T, S, m, bool(causal), window, query_offset(T, S, align), b, chunk_size, sink_tokens
        )

    @property
    def trivial(self) -> bool:
        """True when every pair may attend (no mask, causal, window or ``-inf`` bias)."""
        return (
            self.mask is None
            and not self.causal
            and self.window is None
            and self.chunk_size is None
            and self.bias is None
            and self.mask_mod is None
        )

    def dense(self) -> np.ndarray | None:
        r"""The whole "may attend" array, broadcastable to ``(..., T, S)``; None when every pair
        may.

        The array is this call's own (never a caller's mask).
        """
        allowed = _and(
            self._positions(np.arange(self.T), np.arange(self.S)),
            self._mod(np.arange(self.T), np.arange(self.S)),
        )
        if self.mask is not None:
            allowed = self.mask.copy() if allowed is None else self.mask & allowed
        if self.bias is not None:
            allowed = _and(allowed, ~np.isneginf(self.bias.real))  # a -inf bias entry masks
        return allowed

    def _positions(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
        return _positional(
            rows, cols, self.causal, self.window, self.offset, self.chunk_size, self.sink_tokens
        )

    def _mod(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
        """The ``mask_mod`` on these rows and keys: (B|1, H|1, Tb|1, Sb|1), or its GQA view."""
        if self.mask_mod is None:
            return None
        B, H = self.heads
        shape = (B, H, len(rows), len(cols))
        out = evaluate_mask_mod(self.mask_mod, mod_indices(B, H, rows, cols), shape)
        full: tuple[int, ...] = (1,) * (4 - out.ndim) + tuple(out.shape)  # (B|1, H|1, Tb, Sb)
        out = out.reshape(full)
        if self.num_kv_heads is not None:
            Hkv = self.num_kv_heads
            split = (1, 1) if full[1] == 1 else (Hkv, full[1] // Hkv)
            out = out.reshape(full[:1] + split + full[2:])  # (B|1, Hkv|1, G|1, Tb|1, Sb|1)
        return out

    def block(self, i0: int, i1: int, j0: int, j1: int) -> tuple[BlockKind, np.ndarray | None]:
        r"""``(kind, allowed)`` of the tile of query rows ``i0:i1`` and keys ``j0:j1``.

        ``kind`` is ``"empty"`` (no pair may attend: skip the tile), ``"full"`` (every pair may:
        ``allowed`` is None) or ``"partial"`` (``allowed`` is a bool array broadcastable to the
        tile's ``(..., i1 - i0, j1 - j0)``).
        """
        rows, cols = np.arange(i0, i1), np.arange(j0, j1)
        allowed = _and(self._positions(rows, cols), self._mod(rows, cols))
        if self.mask is not None:
            allowed = _and(allowed, _tile(self.mask, i0, i1, j0, j1))
        if self.bias is not None:
            allowed = _and(allowed, ~np.isneginf(_tile(self.bias, i0, i1, j0, j1).real))
        return _kind(allowed)

    def take(self, rows: ArrayLike, cols: ArrayLike) -> tuple[BlockKind, np.ndarray | None]:
        r"""``(kind, allowed)`` of the query rows ``rows`` and keys ``cols``, any index arrays.

        :meth:`block` for sets of positions that need not be contiguous (a context-parallel
        rank's queries under the zigzag schedule); ``allowed`` is broadcastable to
        ``(..., len(rows), len(cols))``.
        """
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        allowed = _and(self._positions(rows, cols), self._mod(rows, cols))
        for x, negate in ((self.mask, False), (self.bias, True)):
            if x is None:
                continue
            sub = x[..., rows, :] if x.shape[-2] != 1 else x
            sub = sub[..., cols] if x.shape[-1] != 1 else sub
            allowed = _and(allowed, ~np.isneginf(sub.real) if negate else sub)
        return _kind(allowed)


def _kind(allowed: np.ndarray | None) -> tuple[BlockKind, np.ndarray | None]:
    if allowed is None or allowed.all():
        return "full", None
    return ("partial" if allowed.any() else "empty"), allowed


def _lengths(name: str, x: Any, most: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must be a 1-D array of ints, shape (B,); got {arr.dtype} {arr.shape}"
        )
    if ((arr < 0) | (arr > most)).any():
        raise ValueError(f"{name} must be in [0, {most}]; got {arr.tolist()}")
    return arr.astype(np.int64)


# ----------------------------------------------------------------------------- public builders


def causal_mask(T: int, S: int, *, align: str = "top_left") -> np.ndarray:
    r"""Boolean ``(T, S)`` mask, True where query ``i`` may attend key ``j``: ``j <= i'``.

    Parameters
    ----------
    T, S : int
        Query and key lengths.
    align : {"top_left", "bottom_right"}
        ``i' = i`` (PyTorch ``is_causal``, JAX) or ``i' = i + S - T`` (FlashAttention, PyTorch
        ``causal_lower_right``). The two differ only when T != S.

    Returns
    -------
    ndarray of bool, shape (T, S)

    Examples
    --------
    >>> from attention_ref import causal_mask
    >>> causal_mask(2, 3).astype(int)
    array([[1, 0, 0],
           [1, 1, 0]])
    >>> causal_mask(2, 3, align="bottom_right").astype(int)
    array([[1, 1, 0],
           [1, 1, 1]])
    """
    pairs = AllowedPairs.build(T, S, causal=True, align=align)
    return pairs.dense()  # type: ignore[return-value]


def window_mask(T: int, S: int, window: Window, *, align: str = "top_left") -> np.ndarray:
    r"""Boolean ``(T, S)`` sliding-window mask: True where ``i' - left <= j <= i' + right``.

    Parameters
    ----------
    T, S : int
        Query and key lengths.
    window : (int or None, int or None)
        ``(left, right)``: how many keys before and after the query's own position it may see;
        None leaves that side unbounded.
    align : {"top_left", "bottom_right"}
        Where query ``i`` sits on the key axis, as in :func:`causal_mask`.

    Returns
    -------
    ndarray of bool, shape (T, S)

    Examples
    --------
    >>> from attention_ref import window_mask
    >>> window_mask(3, 3, (1, 0)).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [0, 1, 1]])
    """
    pairs = AllowedPairs.build(T, S, align=align, window=window or (None, None))
    return pairs.dense()  # type: ignore[return-value]


def attention_mask(
    T: int,
    S: int,
    *,
    mask: ArrayLike | None = None,
    causal: bool = False,
    align: str = "top_left",
    window: Window | None = None,
) -> np.ndarray | None:
    r"""Combine a boolean ``mask``, ``causal`` and ``window`` into one "may attend" mask.

    Parameters
    ----------
    T, S : int
        Query and key lengths.
    mask : array_like of bool, optional
        True = may attend; broadcastable to ``(..., T, S)``.
    causal : bool, default False
        Intersect with :func:`causal_mask`.
    align : {"top_left", "bottom_right"}
        Alignment of ``causal`` and ``window`` when T != S.
    window : (int or None, int or None), optional
        Intersect with :func:`window_mask`.

    Returns
    -------
    ndarray of bool or None
        Broadcastable to ``(..., T, S)``; None when nothing is masked. Never the caller's array.

    See Also
    --------
    AllowedPairs : the builder behind it, with ``-inf`` biases, sequence lengths and tiles.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import attention_mask
    >>> keep = np.array([True, True, False])          # key padding: the last key is padding
    >>> attention_mask(2, 3, mask=keep, causal=True, align="bottom_right").astype(int)
    array([[1, 1, 0],
           [1, 1, 0]])
    """
    return AllowedPairs.build(T, S, mask=mask, causal=causal, align=align, window=window).dense()
