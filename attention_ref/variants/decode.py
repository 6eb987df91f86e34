r"""Decoding with a key/value cache: attend new queries to every key seen so far.

A :class:`KVCache` holds the keys and values of the positions already processed; it is
immutable, and :meth:`KVCache.append` returns a new cache. :func:`decode_step` appends the new
block's keys and values and attends the new queries to the whole cache, causally, with
``align="bottom_right"``: query ``i`` of a block of ``T_new`` queries sits at position
``S_old + i`` of the key axis, so it sees the ``S_old`` cached keys and the new keys up to its
own. That is exactly the rows ``S_old : S_old + T_new`` of causal self-attention over the
whole sequence, which is what ``tests/test_decode.py`` checks, token by token and in chunks.

Layouts and alignment: ``docs/decoding_and_varlen.md``; conventions: ``docs/conventions.md``.
Decoding is inference, so there is no backward here; the forward is
:func:`~attention_ref.sdpa_forward` itself, called on the grown cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ..core._validate import (
    as_float,
    check_ndim,
    check_nonempty,
    check_positive_int,
    fresh,
    resolve_dtype,
)
from ..core.attention import sdpa_forward
from ..core.options import AttentionOptions

__all__ = ["DecodeLSEResult", "DecodeResult", "KVCache", "decode_step"]


def _read_only(x: np.ndarray) -> np.ndarray:
    """Mark one of our own arrays read-only: a cache never changes once built."""
    x.setflags(write=False)
    return x


@dataclass(frozen=True, eq=False)
class KVCache:
    r"""The keys and values of the positions processed so far; immutable.

    Parameters
    ----------
    k : array_like, shape (..., Hkv, S, Dk)
        Cached keys, position ``j`` of the sequence at ``k[..., j, :]``. ``S`` may be 0.
    v : array_like, shape (..., Hkv, S, Dv)
        Cached values.

    Attributes
    ----------
    k : ndarray, shape (..., Hkv, S, Dk)
        The cache's own read-only copy of the keys.
    v : ndarray, shape (..., Hkv, S, Dv)
        The cache's own read-only copy of the values.

    Notes
    -----
    The arrays are stored in float64 whatever the inputs' dtype (for another precision, start
    from ``KVCache.empty(..., dtype=...)`` and :meth:`append`). They are copied on construction
    and marked read-only, and :meth:`append` builds new ones, so a cache, once made, never
    changes: a step can be recomputed from the cache it started from, and two continuations of
    one prefix never see each other's tokens. (A production cache preallocates a capacity and
    writes in place, as FlashAttention's ``flash_attn_with_kvcache`` does; this one trades that
    speed for values that never change.)

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.decode import KVCache
    >>> rng = np.random.default_rng(0)
    >>> cache = KVCache.empty((2,), num_kv_heads=1, head_dim=4, v_head_dim=3)   # B = 2
    >>> cache.length
    0
    >>> longer = cache.append(rng.normal(size=(2, 1, 5, 4)), rng.normal(size=(2, 1, 5, 3)))
    >>> longer.length, longer.k.shape, longer.v.shape, cache.length
    (5, (2, 1, 5, 4), (2, 1, 5, 3), 0)
    """

    k: np.ndarray
    v: np.ndarray

    def __post_init__(self) -> None:
        dt = resolve_dtype(None, self.k, self.v)  # float64 (complex128 for the complex step)
        k = as_float("k", self.k, dt)
        v = as_float("v", self.v, dt)
        check_ndim("k", k, 3, "(..., Hkv, S, Dk)")
        check_ndim("v", v, 3, "(..., Hkv, S, Dv)")
        for name, x, layout in (("k", k, "(..., Hkv, S, Dk)"), ("v", v, "(..., Hkv, S, Dv)")):
            if x.shape[-3] < 1 or x.shape[-1] < 1:
                raise ValueError(
                    f"{name} must have Hkv >= 1 heads and a width >= 1 (layout {layout}); "
                    f"got shape {x.shape}"
                )
        if v.shape[:-1] != k.shape[:-1]:
            raise ValueError(
                f"v must have the same (..., Hkv, S) as k = {k.shape[:-1]}; got v.shape={v.shape}, "
                f"k.shape={k.shape}"
            )
        object.__setattr__(self, "k", _read_only(fresh(k, self.k)))
        object.__setattr__(self, "v", _read_only(fresh(v, self.v)))

    @classmethod
    def _from_owned(cls, k: np.ndarray, v: np.ndarray) -> KVCache:
        """A cache around arrays this module has just created and checked: no copy, no checks."""
        cache = cls.__new__(cls)
        object.__setattr__(cache, "k", _read_only(k))
        object.__setattr__(cache, "v", _read_only(v))
        return cache

    @classmethod
    def empty(
        cls,
        batch_shape: tuple[int, ...],
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        *,
        dtype: DTypeLike | None = None,
    ) -> KVCache:
        r"""A cache holding no position yet: ``k`` (..., Hkv, 0, Dk), ``v`` (..., Hkv, 0, Dv).

        Parameters
        ----------
        batch_shape : tuple of int
            The leading dims ``...`` (``()`` for none, ``(B,)`` for a batch).
        num_kv_heads : int
            Hkv.
        head_dim : int
            Dk.
        v_head_dim : int, optional
            Dv; ``head_dim`` when omitted.
        dtype : dtype, optional
            Storage and compute dtype; float64 when omitted.

        Returns
        -------
        KVCache

        Examples
        --------
        >>> from attention_ref.variants.decode import KVCache
        >>> KVCache.empty((3,), num_kv_heads=2, head_dim=8).k.shape
        (3, 2, 0, 8)
        """
        if not isinstance(batch_shape, tuple) or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) and n >= 1
            for n in batch_shape
        ):
            raise ValueError(
                f"batch_shape must be a tuple of positive ints (the dims ...); got {batch_shape!r}"
            )
        hkv = check_positive_int("num_kv_heads", num_kv_heads)
        dk = check_positive_int("head_dim", head_dim)
        dv = dk if v_head_dim is None else check_positive_int("v_head_dim", v_head_dim)
        dt = resolve_dtype(dtype)
        lead = tuple(int(n) for n in batch_shape)
        return cls._from_owned(
            np.zeros(lead + (hkv, 0, dk), dtype=dt), np.zeros(lead + (hkv, 0, dv), dtype=dt)
        )

    @property
    def length(self) -> int:
        """S, the number of cached positions."""
        return self.k.shape[-2]

    def append(self, k_new: ArrayLike, v_new: ArrayLike) -> KVCache:
        r"""A new cache holding these positions followed by ``k_new``, ``v_new``; ``self`` is
        unchanged.

        Parameters
        ----------
        k_new : array_like, shape (..., Hkv, T_new, Dk)
            Keys of the new positions, which become positions ``S : S + T_new``.
        v_new : array_like, shape (..., Hkv, T_new, Dv)
            Their values.

        Returns
        -------
        KVCache
            ``k`` (..., Hkv, S + T_new, Dk), ``v`` (..., Hkv, S + T_new, Dv), in this cache's dtype.

        Examples
        --------
        >>> import numpy as np
        >>> from attention_ref.variants.decode import KVCache
        >>> cache = KVCache(np.zeros((1, 2, 4)), np.zeros((1, 2, 3)))        # Hkv = 1, S = 2
        >>> cache.append(np.ones((1, 1, 4)), np.ones((1, 1, 3))).k[0, :, 0]
        array([0., 0., 1.])
        """
        dt = self.k.dtype
        k_new = as_float("k_new", k_new, dt)
        v_new = as_float("v_new", v_new, dt)
        check_ndim("k_new", k_new, 3, "(..., Hkv, T_new, Dk)")
        check_ndim("v_new", v_new, 3, "(..., Hkv, T_new, Dv)")
        lead, hkv, dk, dv = self.k.shape[:-3], self.k.shape[-3], self.k.shape[-1], self.v.shape[-1]
        for name, x, width, wname in (("k_new", k_new, dk, "Dk"), ("v_new", v_new, dv, "Dv")):
            want = lead + (hkv, x.shape[-2], width)
            if x.shape != want:
                raise ValueError(
                    f"{name} must have the cache's batch dims {lead}, Hkv={hkv} heads and "
                    f"{wname}={width}, i.e. shape {want}; got {name}.shape={x.shape}"
                )
        if v_new.shape[-2] != k_new.shape[-2]:
            raise ValueError(
                f"v_new must have as many new positions as k_new, T_new={k_new.shape[-2]}; "
                f"got v_new.shape={v_new.shape}, k_new.shape={k_new.shape}"
            )
        k = np.concatenate([self.k, k_new], axis=-2)  # (..., Hkv, S + T_new, Dk), a new array
        v = np.concatenate([self.v, v_new], axis=-2)  # (..., Hkv, S + T_new, Dv)
        return KVCache._from_owned(k, v)


class DecodeResult(NamedTuple):
    """What :func:`decode_step` returns: unpack as ``out, cache = decode_step(...)``."""

    out: np.ndarray  #: (..., H, T_new, Dv) attention output of the new queries
    cache: KVCache  #: the cache grown by the new keys and values (the old one is unchanged)


class DecodeLSEResult(NamedTuple):
    """What ``decode_step(..., return_lse=True)`` returns: unpack as ``out, lse, cache``."""

    out: np.ndarray  #: (..., H, T_new, Dv) attention output of the new queries
    lse: np.ndarray  #: (..., H, T_new) log-sum-exp of each new query's row (natural log)
    cache: KVCache  #: the cache grown by the new keys and values


def decode_step(
    q_new: ArrayLike,
    cache: KVCache,
    k_new: ArrayLike,
    v_new: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    return_lse: bool = False,
    **kwargs: Any,
) -> DecodeResult | DecodeLSEResult:
    r"""One decoding step: append ``k_new``, ``v_new`` to the cache and attend ``q_new`` to all of
    it.

    Parameters
    ----------
    q_new : array_like, shape (..., H, T_new, Dk)
        Queries of the ``T_new >= 1`` new positions (1 when generating token by token, more for a
        prompt or a chunk). ``H`` must be a multiple of the cache's Hkv (grouped-query attention:
        query head ``h`` reads key/value head ``h // (H // Hkv)``).
    cache : KVCache
        Keys and values of the ``S_old`` positions before these; not modified.
    k_new : array_like, shape (..., Hkv, T_new, Dk)
        Keys of the new positions.
    v_new : array_like, shape (..., Hkv, T_new, Dv)
        Values of the new positions.
    options : AttentionOptions, optional
        The attention options as one object.
    **kwargs
        Fields of :class:`~attention_ref.AttentionOptions` by name: ``window`` (a sliding window
        ``(left, right)`` on the key axis, aligned like the causal mask: query ``i`` sees keys
        ``S_old + i - left <= j <= S_old + i + right``; causality already hides the keys after
        ``S_old + i``), ``chunk_size``, ``sink_tokens``, ``sinks`` ((H,)), ``softcap`` and
        ``scale``. The step is always causal with
        ``align="bottom_right"`` in the cache's dtype; the other options (``mask``, ``bias``,
        ``causal``, ``align``, dropout, ``empty_rows``, ``dtype``) raise ``ValueError``.

    return_lse : bool, default False
        Also return the new rows' log-sum-exp (what a split-KV decode kernel merges).

    Returns
    -------
    DecodeResult or DecodeLSEResult
        ``out`` (..., H, T_new, Dv) and ``cache``, the new cache of ``S_old + T_new`` positions;
        with ``return_lse=True`` ``(out, lse, cache)``, ``lse`` (..., H, T_new).

    Notes
    -----
    With :math:`S = S_\text{old} + T_\text{new}` keys, query :math:`i` of the block sits at
    :math:`i' = i + S - T_\text{new} = S_\text{old} + i` (``align="bottom_right"``) and attends
    keys :math:`j \le i'`. The computation is

    ``sdpa_forward(q_new, new.k, new.v, causal=True, align="bottom_right", window=window, ...)``

    with ``new = cache.append(k_new, v_new)``, in the cache's dtype. Every query sees at least
    its own key, so no row is ever empty. It equals rows :math:`S_\text{old} : S` of causal
    self-attention over the whole sequence, under either alignment (they coincide when T = S).
    FlashAttention's ``flash_attn_with_kvcache(..., causal=True)`` uses the same alignment, in
    the layout ``(B, T, H, Dk)``, and writes the new keys into a preallocated cache in place.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.variants.decode import KVCache, decode_step
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(4, 6, 8)), rng.normal(size=(2, 6, 8)), rng.normal(size=(2, 6, 5))
    >>> cache, outs = KVCache.empty((), num_kv_heads=2, head_dim=8, v_head_dim=5), []
    >>> for t in range(6):                                 # one token at a time
    ...     out, cache = decode_step(q[:, t:t + 1], cache, k[:, t:t + 1], v[:, t:t + 1])
    ...     outs.append(out)
    >>> full = scaled_dot_product_attention(q, k, v, causal=True)
    >>> bool(np.allclose(np.concatenate(outs, axis=-2), full, rtol=1e-12, atol=0))
    True
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("decode_step")
    given.refuse(
        (
            "mask",
            "key_padding_mask",
            "bias",
            "causal",
            "align",
            "dropout_p",
            "dropout_mask",
            "empty_rows",
            "dtype",
            "rounding",
        ),
        "decode_step",
        "a step is causal, bottom_right aligned, in the cache's dtype, and no row is empty",
    )
    if not isinstance(cache, KVCache):
        raise TypeError(
            f"cache must be a KVCache (KVCache.empty(...) to start); got {type(cache).__name__}"
        )
    dt = cache.k.dtype
    q_in = q_new
    q_new = as_float("q_new", q_new, dt)
    check_ndim("q_new", q_new, 3, "(..., H, T_new, Dk)")
    check_nonempty("q_new", q_new, "(..., H, T_new, Dk)")
    lead, hkv, dk = cache.k.shape[:-3], cache.k.shape[-3], cache.k.shape[-1]
    if q_new.shape[:-3] != lead or q_new.shape[-1] != dk:
        raise ValueError(
            f"q_new must have shape (..., H, T_new, Dk) with the cache's batch dims (...) = {lead} "
            f"and Dk = {dk}; got q_new.shape={q_new.shape}"
        )
    if q_new.shape[-3] % hkv:
        raise ValueError(
            f"q_new's head count H={q_new.shape[-3]} must be a multiple of the cache's Hkv={hkv} "
            f"(grouped-query attention); got q_new.shape={q_new.shape}"
        )
    new_cache = cache.append(k_new, v_new)  # checks k_new and v_new against the cache
    t_new = new_cache.length - cache.length
    if t_new != q_new.shape[-2]:
        raise ValueError(
            f"k_new and v_new must hold one position per new query, T_new={q_new.shape[-2]} "
            f"(q_new.shape={q_new.shape}); got {t_new} new positions"
        )
    step = given.replace(causal=True, align="bottom_right", dtype=dt)
    trace = sdpa_forward(q_new, new_cache.k, new_cache.v, options=step)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    out = fresh(trace.out, q_in)
    if return_lse:
        return DecodeLSEResult(out=out, lse=trace.logsumexp, cache=new_cache)
    return DecodeResult(out=out, cache=new_cache)
