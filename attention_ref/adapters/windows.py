r"""Local, sliding and chunked windows as frameworks write them, converted to attention_ref options.

Every framework spells a local attention pattern its own way -- a ``(left, right)`` pair with -1
for "unbounded", one ``window_size`` that does or does not count the query's own key, a mask
function of raw indices, a chunk size, sink tokens kept in a KV cache -- and anchors it at the
top-left or the bottom-right corner when there are more keys than queries. Each converter here
reads one framework's spelling and returns the attention_ref options that allow exactly the same
(query, key) pairs, as a ``dict`` usable as ``scaled_dot_product_attention(q, k, v, **options)``
or ``AllowedPairs.build(T, S, **options)``.

The options (``attention_ref.core.masks``): with ``i' = i + offset`` the query's position on the
key axis (offset 0 for ``align="top_left"``, ``S - T`` for ``"bottom_right"``), key ``j`` is
allowed when ``causal_ok and (j < sink_tokens or (window_ok and chunk_ok))``, where
``causal_ok = j <= i'``, ``window_ok = i' - left <= j <= i' + right`` (None: that side
unbounded) and ``chunk_ok = i' // chunk_size == j // chunk_size``.

Every converter returns all five keys -- ``causal``, ``align``, ``window``, ``chunk_size``,
``sink_tokens`` -- written the same way: ``window`` is None when both sides are unbounded, and
under ``causal=True`` its right side, which the causal rule already bounds, is written 0.

==========================================  ====================================================
converter                                   framework spelling
==========================================  ====================================================
:func:`window_from_flash_attn`              FlashAttention ``window_size=(left, right)``, -1
:func:`window_from_xformers`                xformers' local-attention ``attn_bias`` classes
:func:`window_from_sliding_window`          Hugging Face / gpt-oss ``sliding_window=W``
:func:`window_from_jax`                     ``jax.nn.dot_product_attention(local_window_size=)``
:func:`window_from_flex_sliding_window`     FlexAttention's sliding-window ``mask_mod``
:func:`window_from_chunked`                 Llama 4 ``attention_chunk_size``
:func:`window_from_streaming_llm`           StreamingLLM ``start_size`` + ``recent_size``
==========================================  ====================================================

The conventions table, with each framework's own formula and source: ``docs/windows.md``.

Layer 3 of attention_ref. May import: numpy, the standard library and ``attention_ref.core``;
no framework is imported (the converters read the frameworks' arguments, not their objects).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..core._validate import ALIGNS, check_choice

__all__ = [
    "XFORMERS_LOCAL_BIASES",
    "window_from_chunked",
    "window_from_flash_attn",
    "window_from_flex_sliding_window",
    "window_from_jax",
    "window_from_sliding_window",
    "window_from_streaming_llm",
    "window_from_xformers",
]

#: The xformers (now MSLK) local-attention bias classes :func:`window_from_xformers` reads: class
#: name -> (its window arguments, causal, alignment within a block). ``"window_size"`` classes
#: take one ``window_size`` that counts the query's own key; ``"left_right"`` classes take
#: ``window_left`` and ``window_right``, which do not.
XFORMERS_LOCAL_BIASES: dict[str, tuple[str, bool, str]] = {
    "LocalAttentionFromBottomRightMask": ("left_right", False, "bottom_right"),
    "BlockDiagonalLocalAttentionPaddedKeysMask": ("left_right", False, "bottom_right"),
    "BlockDiagonalLocalAttentionFromBottomRightGappyKeysMask": (
        "left_right",
        False,
        "bottom_right",
    ),
    "LowerTriangularFromBottomRightLocalAttentionMask": ("window_size", True, "bottom_right"),
    "BlockDiagonalCausalLocalAttentionMask": ("window_size", True, "top_left"),
    "BlockDiagonalCausalLocalAttentionFromBottomRightMask": ("window_size", True, "bottom_right"),
    "BlockDiagonalCausalLocalAttentionPaddedKeysMask": ("window_size", True, "bottom_right"),
    "PagedBlockDiagonalCausalLocalPaddedKeysMask": ("window_size", True, "bottom_right"),
}


# ---------------------------------------------------------------------------------------------
# Validation and the common output form
# ---------------------------------------------------------------------------------------------


def _int(name: str, value: Any, minimum: int, what: str | None = None) -> int:
    """``value`` as an int ``>= minimum`` (``bool`` refused); the errors name ``name``."""
    expected = what or f"an int >= {minimum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {expected}; got {int(value)}")
    return int(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {value!r} ({type(value).__name__})")
    return bool(value)


def _pair(name: str, value: Any, expected: str) -> tuple[Any, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be {expected}; got {value!r}")
    return value[0], value[1]


def _options(
    *,
    causal: bool,
    align: str,
    window: tuple[int | None, int | None] | None = None,
    chunk_size: int | None = None,
    sink_tokens: int = 0,
) -> dict[str, Any]:
    """The five option keywords, in the one written form: a fully unbounded window is None, and
    under ``causal`` the window's right side (bounded by the causal rule already) is 0."""
    if window is not None:
        left, right = window
        if causal:
            right = None if left is None else 0
        window = None if left is None and right is None else (left, right)
    return {
        "causal": causal,
        "align": align,
        "window": window,
        "chunk_size": chunk_size,
        "sink_tokens": sink_tokens,
    }


# ---------------------------------------------------------------------------------------------
# The converters
# ---------------------------------------------------------------------------------------------


def window_from_flash_attn(
    window_size: Any = (-1, -1), causal: bool = False, *, seqlen_k: int | None = None
) -> dict[str, Any]:
    r"""FlashAttention's ``window_size=(left, right)`` and ``causal`` as attention_ref options.

    Parameters
    ----------
    window_size : (int, int), default (-1, -1)
        ``(left, right)`` as ``flash_attn_func`` takes it: the keys at most ``left`` positions
        before and ``right`` positions after the query's position on the key axis; -1 leaves
        that side unbounded.
    causal : bool, default False
        FlashAttention's ``causal``, aligned to the bottom-right corner like the window.
    seqlen_k : int, optional
        When given, reproduce what the FlashAttention-2 CUDA kernels do for this key length
        rather than the docstring's formula (see Notes). The two differ only when
        ``seqlen_q > seqlen_k``.

    Returns
    -------
    dict
        ``causal``; ``align`` ``"bottom_right"``; ``window`` with each -1 as None (None when
        both sides are unbounded; right side 0 under ``causal``); ``chunk_size`` None;
        ``sink_tokens`` 0.

    Raises
    ------
    TypeError, ValueError
        ``window_size`` not a pair of ints or a side below -1; ``causal`` not a bool;
        ``seqlen_k`` not a positive int.

    Notes
    -----
    Source: Dao-AILab/flash-attention, ``flash_attn/flash_attn_interface.py``, the docstring of
    ``flash_attn_func`` (also ``flash_attn_varlen_func``, ``flash_attn_with_kvcache``): "If
    window_size != (-1, -1), implements sliding window local attention. Query at position i will
    only attend to keys between [i + seqlen_k - seqlen_q - window_size[0], i + seqlen_k -
    seqlen_q + window_size[1]] inclusive", and "If causal=True, the causal mask is aligned to
    the bottom right corner of the attention matrix". With ``i' = i + seqlen_k - seqlen_q`` that
    is ``window=(left, right), align="bottom_right"`` here, whether or not ``causal`` is set.
    ``left`` does not count the query's own key: ``window_size=(w, 0)`` sees ``w + 1`` keys.

    The CUDA kernels normalise the pair first (``csrc/flash_attn/flash_api.cpp``, ``mha_fwd``
    then ``set_params_fprop``): a side ``>= seqlen_k`` becomes -1; ``causal`` sets the right
    side to 0; then a -1 side opposite a bounded one becomes ``seqlen_k``; and the mask is
    ``max(0, i' - left) <= j < min(seqlen_k, i' + 1 + right)`` (``csrc/flash_attn/src/mask.h``,
    ``Mask::apply_mask`` and ``apply_mask_local``; no left bound on the causal path). A right
    side of ``seqlen_k`` is unbounded only while ``i' >= -1``: with ``seqlen_q > seqlen_k + 1``,
    ``causal=False`` and ``window_size=(left, -1)``, the kernel's first rows lose their last
    keys (and attend none once ``seqlen_q > 2 seqlen_k``) where the docstring's formula lets
    them attend every key from ``i' - left`` on; and a bounded side ``>= seqlen_k`` is dropped
    where the formula keeps it. ``seqlen_k`` (``max_seqlen_k`` for the varlen functions, whose
    kernels clip against it) selects the kernel's reading.

    Examples
    --------
    >>> from attention_ref.adapters.windows import window_from_flash_attn
    >>> from attention_ref.core.masks import AllowedPairs
    >>> opts = window_from_flash_attn((1, 0))
    >>> opts
    {'causal': False, 'align': 'bottom_right', 'window': (1, 0),
     'chunk_size': None, 'sink_tokens': 0}
    >>> AllowedPairs.build(2, 4, **opts).dense().astype(int)
    array([[0, 1, 1, 0],
           [0, 0, 1, 1]])
    >>> window_from_flash_attn((-1, -1), causal=True)["window"] is None
    True

    The kernel's reading when there are more queries than keys (T = 4, S = 2):

    >>> doc = window_from_flash_attn((1, -1))
    >>> kernel = window_from_flash_attn((1, -1), seqlen_k=2)
    >>> doc["window"], kernel["window"]
    ((1, None), (1, 2))
    >>> AllowedPairs.build(4, 2, **doc).dense().astype(int)
    array([[1, 1],
           [1, 1],
           [1, 1],
           [1, 1]])
    >>> AllowedPairs.build(4, 2, **kernel).dense().astype(int)
    array([[1, 0],
           [1, 1],
           [1, 1],
           [1, 1]])
    >>> window_from_flash_attn((3, -2))
    Traceback (most recent call last):
    ...
    ValueError: window_size[1] (right) must be -1 (unbounded) or an int >= 0; got -2
    """
    left, right = _pair("window_size", window_size, "a pair (left, right) of ints, -1 = unbounded")
    left = _flash_side("window_size[0] (left)", left)
    right = _flash_side("window_size[1] (right)", right)
    causal = _bool("causal", causal)
    if seqlen_k is None:  # the docstring's formula
        return _options(
            causal=causal,
            align="bottom_right",
            window=(None if left < 0 else left, None if right < 0 else right),
        )
    seqlen_k = _int("seqlen_k", seqlen_k, 1, "a positive int")
    # flash_api.cpp, mha_fwd: clip to the key length, then causal is a right side of 0
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if causal:
        right = 0
    # set_params_fprop: an unbounded side opposite a bounded one becomes seqlen_k
    if left < 0 and right < 0:
        return _options(causal=causal, align="bottom_right")
    return _options(
        causal=causal,
        align="bottom_right",
        window=(seqlen_k if left < 0 else left, seqlen_k if right < 0 else right),
    )


def _flash_side(name: str, value: Any) -> int:
    return _int(name, value, -1, "-1 (unbounded) or an int >= 0")


def window_from_xformers(
    bias: Any,
    *,
    window_size: int | None = None,
    window_left: int | None = None,
    window_right: int | None = None,
) -> dict[str, Any]:
    r"""An xformers local-attention ``attn_bias`` as attention_ref options (one block's window).

    Parameters
    ----------
    bias : str, type or bias object
        The class name (``"LowerTriangularFromBottomRightLocalAttentionMask"``), the class, or an
        instance of one of :data:`XFORMERS_LOCAL_BIASES` (a subclass counts as its nearest
        listed base). An instance is read by attribute (``_window_size`` or ``window_left`` and
        ``window_right``), without importing xformers.
    window_size : int, optional
        For the ``*CausalLocalAttention*`` and ``LowerTriangularFromBottomRightLocalAttention``
        classes: how many keys a query sees, its own included (``> 0``).
    window_left, window_right : int, optional
        For ``LocalAttentionFromBottomRightMask`` and the non-causal block-diagonal local
        classes: keys at most ``window_left`` before and ``window_right`` after the query's
        position (``>= 0``; the query's own key is not counted).

    Returns
    -------
    dict
        The options of one block: ``window_size=W`` classes give ``causal=True, window=(W - 1,
        0)``; ``window_left``/``window_right`` classes give ``causal=False, window=(window_left,
        window_right)``. ``align`` is ``"bottom_right"`` but for
        ``BlockDiagonalCausalLocalAttentionMask``, which is ``"top_left"``.

    Raises
    ------
    TypeError, ValueError
        ``bias`` not a local-attention bias; the wrong window arguments for its class (or window
        arguments given with an instance); a value out of range.

    Notes
    -----
    Sources: facebookresearch/xformers, ``xformers/ops/fmha/attn_bias.py`` (commit 29163217, the
    last with the code; the module now re-exports meta-pytorch/MSLK's
    ``mslk/attention/fmha/attn_bias.py``, whose formulas are the same). The ``window_size``
    classes materialise ``_materialize_causal_mask(shape, window_size=W, from_bottomright=...)``:
    ``torch.tril(ones, diagonal=shift)`` then ``torch.triu(mask, diagonal=shift - W + 1)``, with
    ``shift = num_keys - num_queries`` from the bottom right and 0 otherwise, i.e.
    ``i' - (W - 1) <= j <= i'``: W keys, the query's own among them -- as their docstrings say,
    "greater than i - window_size and less than or equal to i", and as xformers hands them to
    FlashAttention (``xformers/ops/fmha/flash.py``, ``_window_size``: ``win_left =
    attn_bias._window_size - 1``). ``LocalAttentionFromBottomRightMask.materialize`` (MSLK:
    ``_apply_locality_on_mask``) is ``torch.triu(mask, diagonal=shift - window_left)`` then
    ``torch.tril(mask, diagonal=shift + window_right)``: ``i' - window_left <= j <= i' +
    window_right``, "window_left + 1 + window_right" keys; the block-diagonal non-causal classes
    apply it per block. (Their docstrings' "at most window_left + window_right - 1 keys" does not
    match that formula; the formula is used here.)

    The block-diagonal classes apply the window inside each (query block, key block) pair and
    mask every pair across blocks: that part is the varlen layout's, not the window's.

    Examples
    --------
    >>> from attention_ref.adapters.windows import window_from_xformers
    >>> from attention_ref.core.masks import AllowedPairs
    >>> opts = window_from_xformers("LowerTriangularFromBottomRightLocalAttentionMask",
    ...                             window_size=2)
    >>> opts["causal"], opts["align"], opts["window"]
    (True, 'bottom_right', (1, 0))
    >>> AllowedPairs.build(3, 5, **opts).dense().astype(int)
    array([[0, 1, 1, 0, 0],
           [0, 0, 1, 1, 0],
           [0, 0, 0, 1, 1]])

    ``LocalAttentionFromBottomRightMask``'s own example, ``window_left=1, window_right=2`` on a
    ``(4, 5)`` shape:

    >>> opts = window_from_xformers("LocalAttentionFromBottomRightMask",
    ...                             window_left=1, window_right=2)
    >>> AllowedPairs.build(4, 5, **opts).dense().astype(int)
    array([[1, 1, 1, 1, 0],
           [0, 1, 1, 1, 1],
           [0, 0, 1, 1, 1],
           [0, 0, 0, 1, 1]])
    >>> window_from_xformers("BlockDiagonalCausalLocalAttentionMask", window_left=2)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: BlockDiagonalCausalLocalAttentionMask takes window_size (...), not ['window_left']
    """
    name, instance = _xformers_class(bias)
    kind, causal, align = XFORMERS_LOCAL_BIASES[name]
    given = {
        n: v
        for n, v in (
            ("window_size", window_size),
            ("window_left", window_left),
            ("window_right", window_right),
        )
        if v is not None
    }
    if instance is not None:
        if given:
            raise TypeError(
                f"the window of a {name} instance is read from the instance; pass no "
                f"{', '.join(sorted(given))} with it"
            )
        if kind == "window_size":
            given = {"window_size": getattr(instance, "_window_size", None)}
        else:
            given = {n: getattr(instance, n, None) for n in ("window_left", "window_right")}
        given = {n: v for n, v in given.items() if v is not None}
    if kind == "window_size":
        extra = sorted(set(given) - {"window_size"})
        if extra:
            raise TypeError(
                f"{name} takes window_size (the keys a query sees, its own included), not {extra}"
            )
        if "window_size" not in given:
            raise TypeError(f"{name} needs window_size (a positive int); got none")
        w = _int("window_size", given["window_size"], 1, "a positive int (xformers: > 0)")
        return _options(causal=causal, align=align, window=(w - 1, 0))
    extra = sorted(set(given) - {"window_left", "window_right"})
    if extra:
        raise TypeError(f"{name} takes window_left and window_right, not {extra}")
    missing = [n for n in ("window_left", "window_right") if n not in given]
    if missing:
        raise TypeError(f"{name} needs window_left and window_right (ints >= 0); {missing} missing")
    left = _int("window_left", given["window_left"], 0)
    right = _int("window_right", given["window_right"], 0)
    return _options(causal=causal, align=align, window=(left, right))


def _xformers_class(bias: Any) -> tuple[str, Any]:
    """The listed class ``bias`` names (a name, a class or an instance), and the instance."""
    if isinstance(bias, str):
        if bias not in XFORMERS_LOCAL_BIASES:
            raise ValueError(
                f"bias must name an xformers local-attention bias class, one of "
                f"{sorted(XFORMERS_LOCAL_BIASES)}; got {bias!r}"
            )
        return bias, None
    klass, instance = (bias, None) if isinstance(bias, type) else (type(bias), bias)
    for base in klass.__mro__:
        if base.__name__ in XFORMERS_LOCAL_BIASES:
            return base.__name__, instance
    raise TypeError(
        f"bias must be an xformers local-attention bias (its class name, the class or an "
        f"instance), one of {sorted(XFORMERS_LOCAL_BIASES)}; got {klass.__name__} ({bias!r})"
    )


def window_from_sliding_window(
    sliding_window: int | None,
    *,
    bidirectional: bool = False,
    align: str = "bottom_right",
) -> dict[str, Any]:
    r"""Hugging Face transformers' and gpt-oss's ``sliding_window=W`` as attention_ref options.

    Parameters
    ----------
    sliding_window : int or None
        ``config.sliding_window``: the number of keys a query sees, **its own included** (``W >=
        1``). None: no window (a ``"full_attention"`` layer, causal). 0 is refused (see Notes).
    bidirectional : bool, default False
        Hugging Face's bidirectional sliding window (``create_bidirectional_sliding_window_mask``,
        for encoders, ``config.is_causal=False``): ``|q_idx - kv_idx| <= W``, not causal.
    align : {"bottom_right", "top_left"}, default "bottom_right"
        Hugging Face compares absolute positions, ``q_idx = q_offset + i`` and ``kv_idx =
        kv_offset + j``. With a KV cache the queries are the last ``T`` of the ``S`` positions
        (``q_offset - kv_offset = S - T``): ``"bottom_right"``. ``"top_left"`` when ``q_offset ==
        kv_offset`` (cross-attention to an encoder, no cache). They agree when ``T == S``.

    Returns
    -------
    dict
        ``causal=True, window=(W - 1, 0)`` (``bidirectional``: ``causal=False, window=(W, W)``),
        ``align`` as given, ``chunk_size`` None, ``sink_tokens`` 0.

    Raises
    ------
    TypeError, ValueError
        ``sliding_window`` not an int (or None) or out of range; a bad ``align``.

    Notes
    -----
    Source: huggingface/transformers, ``src/transformers/masking_utils.py``:
    ``sliding_window_causal_mask_function(W)`` is ``and_masks(sliding_window_overlay(W),
    causal_mask_function)`` with the overlay ``kv_idx > q_idx - sliding_window`` and the causal
    rule ``kv_idx <= q_idx``: ``q_idx - (W - 1) <= kv_idx <= q_idx``, W keys with the query's
    own. ``sdpa_mask`` evaluates it on ``q_arange = arange(q_length) + q_offset`` and
    ``kv_arange = arange(kv_length) + kv_offset``, the offsets from ``_preprocess_mask_arguments``
    (``q_offset = past_key_values.get_seq_length()``). Its FlashAttention path agrees:
    ``src/transformers/modeling_flash_attention_utils.py`` passes ``window_size=(sliding_window
    - 1, sliding_window - 1)`` with ``causal``. The bidirectional overlay
    ``sliding_window_bidirectional_overlay`` is ``abs(q_idx - kv_idx) <= sliding_window``: there
    ``W`` is a distance, ``2 W + 1`` keys, one more on the left than the causal reading.

    openai/gpt-oss agrees with the causal reading: ``gpt_oss/torch/model.py``, ``sdpa``, adds
    ``torch.tril(-inf, diagonal=-sliding_window)`` to the causal mask, masking ``kv <= q - W``;
    ``gpt_oss/triton/attention.py``, ``attention_ref``, masks ``pos_keys < pos_queries -
    sliding_window + 1`` with ``pos_queries = arange(num_queries) + start_q`` (bottom-right when
    ``start_q = num_keys - num_queries``). There ``sliding_window=0`` means no window, while
    Hugging Face's overlay with 0 allows no key at all: 0 is refused here; pass None for no
    window.

    Examples
    --------
    >>> from attention_ref.adapters.windows import window_from_sliding_window
    >>> from attention_ref.core.masks import AllowedPairs
    >>> opts = window_from_sliding_window(3)
    >>> opts["causal"], opts["align"], opts["window"]
    (True, 'bottom_right', (2, 0))

    Two new tokens after four cached ones (T = 2, S = 6), each seeing 3 keys:

    >>> AllowedPairs.build(2, 6, **opts).dense().astype(int)
    array([[0, 0, 1, 1, 1, 0],
           [0, 0, 0, 1, 1, 1]])
    >>> window_from_sliding_window(1, bidirectional=True)["window"]
    (1, 1)
    >>> window_from_sliding_window(0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: sliding_window must be a positive int (...) or None; got 0 (gpt-oss reads 0 ...
    """
    bidirectional = _bool("bidirectional", bidirectional)
    align = check_choice("align", align, ALIGNS)
    if sliding_window is None:
        return _options(causal=not bidirectional, align=align)
    if bidirectional:
        w = _int("sliding_window", sliding_window, 0, "an int >= 0 (a distance) or None")
        return _options(causal=False, align=align, window=(w, w))
    expected = "a positive int (the keys a query sees, its own included) or None"
    if isinstance(sliding_window, numbers.Integral) and not isinstance(sliding_window, bool):
        if sliding_window == 0:
            raise ValueError(
                f"sliding_window must be {expected}; got 0 (gpt-oss reads 0 as no window: pass "
                "None for that; Hugging Face's sliding_window_overlay(0) allows no key)"
            )
    w = _int("sliding_window", sliding_window, 1, expected)
    return _options(causal=True, align=align, window=(w - 1, 0))


def window_from_jax(local_window_size: Any, is_causal: bool = False) -> dict[str, Any]:
    r"""``jax.nn.dot_product_attention``'s ``local_window_size`` and ``is_causal`` as options.

    Parameters
    ----------
    local_window_size : int, (int, int) or None
        ``(left_window_size, right_window_size)``: keys at most ``left`` before and ``right``
        after query ``i`` (the query's own key not counted); an int ``w`` is ``(w, w)``; None, no
        window.
    is_causal : bool, default False
        JAX's ``is_causal``.

    Returns
    -------
    dict
        ``causal=is_causal``, ``align="top_left"``, ``window=(left, right)`` (right side 0 under
        ``is_causal``; None without a window), ``chunk_size`` None, ``sink_tokens`` 0.

    Raises
    ------
    TypeError, ValueError
        ``local_window_size`` not an int or a pair of ints, or a negative side (JAX accepts one,
        ``j >= i + 1`` for a left side of -1, but this reference's window cannot express it: use
        a ``mask``); ``is_causal`` not a bool.

    Notes
    -----
    Source: jax-ml/jax, ``jax/_src/nn/functions.py`` (jax 0.10.2): ``dot_product_attention``
    turns an int into ``(w, w)`` ("E.g., if local_window_size == (3, 2) and the sequence is [0,
    1, 2, 3, 4, 5, c, 7, 8, 9], token `c` can attend to [3, 4, 5, c, 7, 8]"), and the XLA path's
    ``_get_window_mask(T, S, local_window_size)`` builds ``query_pos <= key_pos + left`` and
    ``query_pos >= key_pos - right`` on ``query_pos = range(T)``, ``key_pos = range(S)``:
    ``i - left <= j <= i + right``, anchored at the top-left corner for any ``T, S``, like
    ``_get_causal_mask`` (``jnp.tril(ones((T, S)))``). Measured on jax 0.10.2 (CPU) in
    ``tests/test_windows.py``. The cuDNN path (``implementation="cudnn"``) supports only a left
    window, passed as ``sliding_window_length = left + 1`` (its length counts the query's own
    key). JAX accepts only a Python ``int`` for the scalar form; a NumPy integer is accepted
    here as well.

    Examples
    --------
    >>> from attention_ref.adapters.windows import window_from_jax
    >>> from attention_ref.core.masks import AllowedPairs
    >>> opts = window_from_jax((1, 0))
    >>> opts["causal"], opts["align"], opts["window"]
    (False, 'top_left', (1, 0))
    >>> AllowedPairs.build(3, 5, **opts).dense().astype(int)
    array([[1, 0, 0, 0, 0],
           [1, 1, 0, 0, 0],
           [0, 1, 1, 0, 0]])
    >>> window_from_jax(2, is_causal=True)["window"]
    (2, 0)
    """
    is_causal = _bool("is_causal", is_causal)
    if local_window_size is None:
        return _options(causal=is_causal, align="top_left")
    if isinstance(local_window_size, (tuple, list)):
        left, right = _pair(
            "local_window_size", local_window_size, "an int or a pair (left, right) of ints"
        )
        what = "an int >= 0 (attention_ref's window has no negative side; use a mask)"
        left = _int("local_window_size[0] (left)", left, 0, what)
        right = _int("local_window_size[1] (right)", right, 0, what)
    else:
        left = right = _int(
            "local_window_size",
            local_window_size,
            0,
            "an int >= 0, a pair (left, right) of them, or None",
        )
    return _options(causal=is_causal, align="top_left", window=(left, right))


def window_from_flex_sliding_window(window: int, causal: bool = True) -> dict[str, Any]:
    r"""FlexAttention's sliding-window ``mask_mod`` (``SLIDING_WINDOW``) as attention_ref options.

    Parameters
    ----------
    window : int
        ``SLIDING_WINDOW`` of ``q_idx - kv_idx <= SLIDING_WINDOW`` (``>= 0``): how far back a
        query may look, its own key not counted (``window + 1`` keys under ``causal``).
    causal : bool, default True
        Whether the ``mask_mod`` is combined with ``q_idx >= kv_idx`` (the tutorial's
        ``sliding_window_causal``); False leaves only the look-back bound.

    Returns
    -------
    dict
        ``causal``, ``align="top_left"``, ``window=(window, 0)`` (``causal=False``: ``(window,
        None)``), ``chunk_size`` None, ``sink_tokens`` 0.

    Raises
    ------
    TypeError, ValueError
        ``window`` not an int ``>= 0``; ``causal`` not a bool.

    Notes
    -----
    Sources: the FlexAttention blog post (pytorch/pytorch.github.io,
    ``_posts/2024-08-07-flexattention.md``, "Sliding Window + Causal"): ``causal_mask = q_idx >=
    kv_idx``, ``window_mask = q_idx - kv_idx <= SLIDING_WINDOW``, ``return causal_mask &
    window_mask``; and meta-pytorch/attention-gym, ``attn_gym/masks/sliding_window.py``,
    ``generate_sliding_window(window_size)``: ``q_idx - kv_idx <= window_size`` under
    ``and_masks(sliding_window, causal_mask)``. A ``mask_mod`` receives the raw indices
    ``q_idx in range(Q_LEN)``, ``kv_idx in range(KV_LEN)`` (``torch/nn/attention/
    flex_attention.py``, ``create_mask``): top-left for ``Q_LEN != KV_LEN`` unless the
    ``mask_mod`` adds an offset itself (as Hugging Face's ``add_offsets_to_mask_function``
    does). The blog says the window lets a query attend "the 1024 most recent tokens" for
    ``SLIDING_WINDOW = 1024``; the formula allows 1025 keys, the query's own included -- one
    more than Hugging Face's ``sliding_window=1024``. (The same section's "If you want to be
    cute" variant first composed the two with ``or_masks``, which allows every pair; commit
    67fc54c of the post replaced it with ``and_masks``.)

    Examples
    --------
    >>> from attention_ref.adapters.windows import window_from_flex_sliding_window
    >>> from attention_ref.core.masks import AllowedPairs
    >>> opts = window_from_flex_sliding_window(1)
    >>> opts["causal"], opts["align"], opts["window"]
    (True, 'top_left', (1, 0))
    >>> AllowedPairs.build(3, 5, **opts).dense().astype(int)
    array([[1, 0, 0, 0, 0],
           [1, 1, 0, 0, 0],
           [0, 1, 1, 0, 0]])
    >>> window_from_flex_sliding_window(1, causal=False)["window"]
    (1, None)
    """
    w = _int("window", window, 0, "an int >= 0 (SLIDING_WINDOW)")
    causal = _bool("causal", causal)
    return _options(causal=causal, align="top_left", window=(w, 0 if causal else None))


def window_from_chunked(
    attention_chunk_size: int, *, align: str = "bottom_right"
) -> dict[str, Any]:
    r"""Llama 4's chunked local attention (``attention_chunk_size=C``) as attention_ref options.

    Parameters
    ----------
    attention_chunk_size : int
        ``config.attention_chunk_size`` (``>= 1``): positions ``[0, C)``, ``[C, 2C)``, ... form
        the chunks; a query attends the keys of its own chunk up to itself.
    align : {"bottom_right", "top_left"}, default "bottom_right"
        Hugging Face compares absolute positions; with a KV cache whose keys start at position 0
        the queries are the last ``T`` of ``S``: ``"bottom_right"`` (see
        :func:`window_from_sliding_window`). They agree when ``T == S``.

    Returns
    -------
    dict
        ``causal=True``, ``align``, ``window`` None, ``chunk_size=C``, ``sink_tokens`` 0.

    Raises
    ------
    TypeError, ValueError
        ``attention_chunk_size`` not a positive int; a bad ``align``.

    Notes
    -----
    Sources: huggingface/transformers, ``src/transformers/masking_utils.py``:
    ``chunked_causal_mask_function(chunk_size, left_padding)`` is ``and_masks(chunked_overlay,
    causal_mask_function)`` with ``(kv_idx - left_padding[b]) // chunk_size == (q_idx -
    left_padding[b]) // chunk_size`` and ``kv_idx <= q_idx``, built by
    ``create_chunked_causal_mask`` from ``config.attention_chunk_size``
    (``src/transformers/models/llama4/configuration_llama4.py``: default 8192, layer type
    ``"chunked_attention"`` for the RoPE layers). meta-llama/llama-models,
    ``models/llama4/model.py``, ``create_chunked_attention_mask(seq_len, attention_chunk_size)``:
    ``(block_pos == 0) & (token_pos <= 0)`` with ``block_pos = |j // C - i // C|``, ``token_pos
    = j - i`` -- the same rule for ``T == S``.

    This matches when the keys are the sequence from position 0 (Hugging Face's ``kv_offset =
    0``) and there is no left padding: Hugging Face shifts every chunk by a batch element's left
    padding, and a cache that drops old keys (``kv_offset > 0``) moves the chunk boundaries off
    multiples of C on the key axis; neither is expressible with ``chunk_size``. Meta's reference
    builds the chunked mask only when ``seqlen > 1``, as ``(seqlen, seqlen)``; a one-token decode
    step gets ``mask=None`` and attends the whole cache.

    Examples
    --------
    >>> from attention_ref.adapters.windows import window_from_chunked
    >>> from attention_ref.core.masks import AllowedPairs
    >>> opts = window_from_chunked(3)
    >>> opts["causal"], opts["align"], opts["chunk_size"]
    (True, 'bottom_right', 3)

    Two new tokens at positions 4 and 5 (T = 2, S = 6): chunk ``[3, 6)``:

    >>> AllowedPairs.build(2, 6, **opts).dense().astype(int)
    array([[0, 0, 0, 1, 1, 0],
           [0, 0, 0, 1, 1, 1]])
    """
    c = _int("attention_chunk_size", attention_chunk_size, 1, "a positive int")
    align = check_choice("align", align, ALIGNS)
    return _options(causal=True, align=align, chunk_size=c)


def window_from_streaming_llm(start_size: int, recent_size: int) -> dict[str, Any]:
    r"""StreamingLLM's attention sinks plus recent window as attention_ref options.

    Parameters
    ----------
    start_size : int
        ``StartRecentKVCache(start_size=...)``: the first ``start_size`` tokens stay in the
        cache for good (the attention sinks), ``>= 0``.
    recent_size : int
        ``StartRecentKVCache(recent_size=...)``: how many of the most recent *earlier* tokens
        the cache keeps, ``>= 0``. The query's own key comes on top: it is appended to the cache
        during its own forward step, so a query sees ``recent_size + 1`` recent keys.

    Returns
    -------
    dict
        ``causal=True``, ``align="bottom_right"``, ``window=(recent_size, 0)``, ``chunk_size``
        None, ``sink_tokens=start_size``: key ``j`` of query ``i'`` is allowed when ``j <= i'``
        and (``j < start_size`` or ``j >= i' - recent_size``), on the key axis of every token
        seen so far (the cache before eviction), queries last.

    Raises
    ------
    TypeError, ValueError
        ``start_size`` or ``recent_size`` not an int ``>= 0``.

    Notes
    -----
    Source: mit-han-lab/streaming-llm, ``streaming_llm/kv_cache.py``,
    ``StartRecentKVCache.__call__``: when the cache holds more than ``start_size +
    recent_size`` keys it keeps ``k[:, :, 0:start_size]`` and ``k[:, :, seq_len -
    recent_size:seq_len]``. ``examples/eval_long_ppl.py`` feeds one token at a time and calls it
    after each step, so the cache a query at position ``p`` attends is the sinks, the
    ``recent_size`` keys before ``p``, and ``p``'s own key, appended by the model's forward. (The
    chat demo, ``examples/run_streaming_llama.py``, evicts with ``evict_for_space`` before each
    prompt instead, so within one answer the window grows; this converter describes the
    per-token eviction.) The pattern is over the positions of the whole stream; StreamingLLM
    re-assigns positions within the cache for its position encoding (``streaming_llm/pos_shift``),
    which changes the scores, not which keys are attended.

    Examples
    --------
    >>> from attention_ref.adapters.windows import window_from_streaming_llm
    >>> from attention_ref.core.masks import AllowedPairs
    >>> opts = window_from_streaming_llm(start_size=1, recent_size=2)
    >>> opts["causal"], opts["window"], opts["sink_tokens"]
    (True, (2, 0), 1)

    The tokens at positions 6 and 7 of eight: the sink (key 0), two recent keys and their own:

    >>> AllowedPairs.build(2, 8, **opts).dense().astype(int)
    array([[1, 0, 0, 0, 1, 1, 1, 0],
           [1, 0, 0, 0, 0, 1, 1, 1]])
    """
    n = _int("start_size", start_size, 0)
    r = _int("recent_size", recent_size, 0)
    return _options(causal=True, align="bottom_right", window=(r, 0), sink_tokens=n)
