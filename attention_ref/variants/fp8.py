r"""FP8 attention as FlashAttention 3 computes it: quantization with scales, the descaled forward.

A kernel in FP8 stores q, k and v as ``float8_e4m3fn`` values with one descale factor per
(batch, key/value head) (FlashAttention 3's ``q_descale``, ``k_descale``, ``v_descale``, shape
``(batch, num_heads_k)``), or per block of rows (SageAttention's per-block quantization).
:func:`quantize_fp8` makes such an array and its scales from float values (scale = amax /
fmt_max, saturating); :func:`fp8_attention` is the forward those kernels are tested against,
FlashAttention 3's own reference (``hopper/test_util.py``, ``attention_ref`` with
``q_descale``/``k_descale``/``v_descale`` and ``intermediate_dtype=torch.float8_e4m3fn``, as
``hopper/test_flash_attn.py`` calls it):

.. code-block:: text

    q = float32(q8) * q_descale      (repeated over the query heads of each kv head)
    k = float32(k8) * k_descale,  v = float32(v8) * v_descale
    P = softmax(scale * q k^T)       float32 accumulation, float32 softmax
    out = bf16( e4m3(P) @ v )        the weights rounded to e4m3 before P V, float32 sums

It is the core's ``sdpa_forward`` under the rounding policy ``PRESETS["flash_attention_3_fp8"]``
(``attention_ref/core/precision.py``); ``docs/precision.md`` has the rounding points, the
sources and the measured error budget.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ..core._validate import check_choice, check_positive_int
from ..core.attention import sdpa_forward
from ..core.options import AttentionOptions
from ..core.precision import FP8_FORMATS, PRESETS, ml_dtypes_module, round_to

__all__ = ["FP8_GRANULARITIES", "QuantizedFP8", "fp8_attention", "quantize_fp8"]

#: ``"tensor"``: one scale; ``"head"``: one per (batch, head), FlashAttention 3's descale layout;
#: ``"block"``: one per (batch, head, block of ``block`` rows), as SageAttention quantizes.
FP8_GRANULARITIES = ("tensor", "head", "block")


class QuantizedFP8(NamedTuple):
    """An FP8 array and the scales that dequantize it: ``x ~ float(data) * scale``."""

    data: np.ndarray  #: the input's shape, an ml_dtypes FP8 dtype
    #: () for "tensor", (B, H) for "head", (B, H, ceil(T / block)) for "block"; float32
    scale: np.ndarray
    fmt: str  #: "float8_e4m3fn" or "float8_e5m2"
    granularity: str
    block: int | None  #: rows per scale for "block", else None

    def dequantize(self) -> np.ndarray:
        """``float64(data) * scale``, the scales broadcast back over the rows they cover."""
        return self.data.astype(np.float64) * _expand(
            self.scale, self.data.shape, self.block, "scale"
        )


def _fmt_max(fmt: str) -> float:
    return float(ml_dtypes_module().finfo(getattr(ml_dtypes_module(), fmt)).max)


def _expand(scale: np.ndarray, shape: tuple[int, ...], block: int | None, name: str) -> np.ndarray:
    """A scale of shape (), (B, H) or (B, H, nblocks) as an array broadcastable to ``shape``
    (B, H, T, D)."""
    if scale.ndim == 0:
        return scale
    if scale.ndim == 2:
        return scale[:, :, None, None]  # (B, H, 1, 1)
    if block is None:
        raise ValueError(f"{name} of shape {scale.shape} is per block: give its block size")
    rows = np.repeat(scale, block, axis=-1)[..., : shape[-2]]  # (B, H, T)
    return rows[..., None]


def quantize_fp8(
    x: ArrayLike, fmt: str = "float8_e4m3fn", granularity: str = "head", *, block: int | None = None
) -> QuantizedFP8:
    r"""Quantize ``x`` (B, H, T, D) to FP8 with scales: ``scale = amax / fmt_max``, saturating.

    Parameters
    ----------
    x : array_like, shape (B, H, T, D)
    fmt : {"float8_e4m3fn", "float8_e5m2"}, default "float8_e4m3fn"
    granularity : {"tensor", "head", "block"}, default "head"
        Where one scale is shared: the whole tensor; each (batch, head), FlashAttention 3's
        descale layout ``(batch, num_heads)``; each block of ``block`` rows of a (batch, head).
    block : int, optional
        Rows per block, for ``"block"``.

    Returns
    -------
    QuantizedFP8
        ``data = fmt(clip(x / scale, -fmt_max, fmt_max))`` (round to nearest even) and ``scale``
        (float32; 1 where the amax is 0), so that ``x ~ float(data) * scale``, the descale
        factor a kernel multiplies back.

    Notes
    -----
    ``fmt_max`` is 448 for e4m3fn and 57344 for e5m2 (``ml_dtypes.finfo``). The largest
    ``|x|`` maps to ``fmt_max`` exactly; the rest round to the format's 4 (e4m3) or 3 (e5m2)
    significant bits, so the relative error of a quantized entry is at most ``2^-4`` (``2^-3``)
    above the smallest normal, larger for the subnormals near 0. The clip is the saturation:
    without it, a value that rounds past ``fmt_max`` would be NaN in e4m3fn (no infinity).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import quantize_fp8
    >>> x = np.arange(8.0).reshape(1, 2, 2, 2)
    >>> qx = quantize_fp8(x)
    >>> (qx.scale * 448).round(5).tolist()      # scale = amax / 448 per (batch, head)
    [[3.0, 7.0]]
    >>> qx.dequantize()[0, 1].tolist()
    [[4.0, 5.0], [6.0, 7.0]]
    """
    fmt = check_choice("fmt", fmt, FP8_FORMATS)
    granularity = check_choice("granularity", granularity, FP8_GRANULARITIES)
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 4:
        raise ValueError(f"x must be 4-D (B, H, T, D); got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("x must be finite to be quantized")
    if granularity == "block":
        if block is None:
            raise ValueError('granularity="block" needs block=, the rows per scale')
        block = check_positive_int("block", block)
    elif block is not None:
        raise ValueError(f"block is only for granularity='block'; got granularity={granularity!r}")
    B, H, T, D = arr.shape
    a = np.abs(arr)
    if granularity == "tensor":
        amax = np.asarray(a.max())
    elif granularity == "head":
        amax = a.max(axis=(2, 3))  # (B, H)
    else:
        assert block is not None
        nb = -(-T // block)
        padded = np.zeros((B, H, nb * block, D))
        padded[:, :, :T] = a
        amax = padded.reshape(B, H, nb, block, D).max(axis=(3, 4))  # (B, H, nblocks)
    top = _fmt_max(fmt)
    scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)  # the descale factors
    scaled = arr / _expand(scale.astype(np.float64), arr.shape, block, "scale")
    clipped = np.clip(scaled, -top, top)  # saturate
    data = clipped.astype(np.float32).astype(getattr(ml_dtypes_module(), fmt))
    return QuantizedFP8(data, scale, fmt, granularity, block)


def _fp8_values(name: str, x: Any, fmt: str | None) -> tuple[np.ndarray, str]:
    arr = np.asarray(x)
    if arr.dtype.name in FP8_FORMATS:
        return arr.astype(np.float32), arr.dtype.name
    fmt = fmt or "float8_e4m3fn"
    f = np.asarray(arr, dtype=np.float32)
    if not np.array_equal(round_to(f, fmt), f, equal_nan=False):
        bad = int((round_to(f, fmt) != f).sum())
        raise ValueError(
            f"{name} must hold {fmt} values (an ml_dtypes FP8 array, or floats that are "
            f"{fmt} values); {bad} entries are not: quantize with quantize_fp8 first"
        )
    return f, fmt


def _descale(
    name: str, d: Any, heads: int, kv_heads: int, shape: tuple[int, ...], block: int | None
) -> np.ndarray:
    """A descale factor as a float32 array broadcastable to ``shape`` (B, H_x, T_x, D)."""
    arr = np.asarray(d, dtype=np.float32)
    B, Hx, Tx = shape[0], shape[1], shape[2]
    if arr.ndim == 0:
        return arr
    if arr.ndim == 2:
        if arr.shape == (B, Hx):
            return arr[:, :, None, None]
        if arr.shape == (B, kv_heads) and Hx == heads:  # FlashAttention 3: q_descale per kv head
            return np.repeat(arr, heads // kv_heads, axis=1)[:, :, None, None]
        raise ValueError(
            f"{name} of shape (B, H) must be {(B, Hx)}"
            + (f" or {(B, kv_heads)}" if Hx == heads else "")
            + f"; got {arr.shape}"
        )
    if arr.ndim == 3:
        if block is None:
            raise ValueError(
                f"{name} of shape {arr.shape} is per block of rows: give descale_block"
            )
        if arr.shape != (B, Hx, -(-Tx // block)):
            raise ValueError(
                f"{name} per block must have shape (B, H, ceil(T / {block})) = "
                f"{(B, Hx, -(-Tx // block))}; got {arr.shape}"
            )
        return np.repeat(arr, block, axis=-1)[..., :Tx, None]
    raise ValueError(f"{name} must be a scalar, (B, H) or (B, H, nblocks); got shape {arr.shape}")


def fp8_attention(
    q8: ArrayLike,
    k8: ArrayLike,
    v8: ArrayLike,
    *,
    q_descale: ArrayLike = 1.0,
    k_descale: ArrayLike = 1.0,
    v_descale: ArrayLike = 1.0,
    descale_block: int | None = None,
    fmt: str | None = None,
    return_lse: bool = False,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""FP8 attention with descale factors, rounded where FlashAttention 3's FP8 forward rounds.

    Parameters
    ----------
    q8 : array_like, shape (B, H, T, Dk)
        FP8 values: an ml_dtypes ``float8_e4m3fn``/``float8_e5m2`` array, or floats that are all
        values of ``fmt`` (:func:`quantize_fp8` makes them).
    k8 : array_like, shape (B, Hkv, S, Dk)
    v8 : array_like, shape (B, Hkv, S, Dv)
    q_descale, k_descale, v_descale : float or array_like
        A scalar, ``(B, Hkv)`` (FlashAttention 3's ``(batch, num_heads_k)``; ``q_descale`` is then
        repeated over the query heads of each key/value head), ``(B, H_x)`` per head of that
        input, or ``(B, H_x, nblocks)`` per block of ``descale_block`` rows.
    descale_block : int, optional
        Rows per block of block-wise descales.
    fmt : {"float8_e4m3fn", "float8_e5m2"}, optional
        The format of float inputs (an ml_dtypes array says its own); e4m3fn by default.
    return_lse : bool, default False
    options, **kwargs
        Attention options (``causal``, ``mask``, ``scale``, ``window``, ...), as for
        :func:`~attention_ref.scaled_dot_product_attention`; ``rounding`` and ``dtype`` are set
        here and refused.

    Returns
    -------
    out : ndarray of float32, shape (B, H, T, Dv)
        bfloat16 values (FlashAttention 3's FP8 output dtype).
    lse : ndarray of float32, shape (B, H, T)
        With ``return_lse=True``, of the float32 scores.

    Notes
    -----
    ``q = float32(q8) * q_descale`` (and k, v alike) in float32, then attention with float32
    scores and softmax, the normalised weights rounded to e4m3 before ``P V``, ``P V`` summed in
    float32 and rounded to bfloat16: the rounding points of ``PRESETS["flash_attention_3_fp8"]``,
    as in FlashAttention 3's reference (``hopper/test_util.py`` ``attention_ref``:
    ``q = (q.float() * q_descale)``, ``intermediate_dtype`` applied to ``attention_drop`` before
    the last einsum). The error budget an FP8 kernel must reach: ``docs/precision.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import fp8_attention, quantize_fp8, scaled_dot_product_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.normal(size=(1, 2, 16, 32)) for _ in range(3))
    >>> q8, k8, v8 = (quantize_fp8(x) for x in (q, k, v))
    >>> out = fp8_attention(q8.data, k8.data, v8.data, q_descale=q8.scale, k_descale=k8.scale,
    ...                     v_descale=v8.scale, causal=True)
    >>> err = np.abs(out - scaled_dot_product_attention(q, k, v, causal=True)).max()
    >>> bool(0.005 < err < 0.2)           # e4m3 has 4 significant bits
    True
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse(("rounding", "dtype"), "fp8_attention", "its FP8 rounding policy sets both")
    given.refuse_mods("fp8_attention")
    if fmt is not None:
        fmt = check_choice("fmt", fmt, FP8_FORMATS)
    if descale_block is not None:
        descale_block = check_positive_int("descale_block", descale_block)
    qf, _ = _fp8_values("q8", q8, fmt)  # the formats only validate the inputs
    kf, _ = _fp8_values("k8", k8, fmt)
    vf, _ = _fp8_values("v8", v8, fmt)
    for name, x, layout in (
        ("q8", qf, "(B, H, T, Dk)"),
        ("k8", kf, "(B, Hkv, S, Dk)"),
        ("v8", vf, "(B, Hkv, S, Dv)"),
    ):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D {layout}; got shape {x.shape}")
    H, Hkv = qf.shape[1], kf.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q8's H={H} must be a multiple of k8's Hkv={Hkv}")
    # (FA3 reference) q = (q.float() * q_descale), in float32, the descale repeated over the group
    q = qf * _descale("q_descale", q_descale, H, Hkv, qf.shape, descale_block)
    k = kf * _descale("k_descale", k_descale, Hkv, Hkv, kf.shape, descale_block)
    v = vf * _descale("v_descale", v_descale, Hkv, Hkv, vf.shape, descale_block)
    trace = sdpa_forward(q, k, v, options=given.replace(rounding=PRESETS["flash_attention_3_fp8"]))
    return (trace.out, trace.logsumexp) if return_lse else trace.out
