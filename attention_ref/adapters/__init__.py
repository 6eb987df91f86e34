r"""Adapters between attention_ref and the frameworks it is compared with.

* :mod:`attention_ref.adapters.torch` -- PyTorch: ``nn.MultiheadAttention`` weights to and from
  :class:`~attention_ref.MultiHeadParams`, mask polarity converters, the option mapping to
  ``torch.nn.functional.scaled_dot_product_attention`` and ``nn.MultiheadAttention``, and runners
  that return the framework's output and autograd gradients as NumPy arrays.
* :mod:`attention_ref.adapters.jax` -- JAX: the ``(B, T, H, Dk)`` layout, the option mapping to
  ``jax.nn.dot_product_attention`` (both ways, sequence lengths included), and runners through
  ``jax.vjp`` in float64 without changing the caller's global JAX configuration.

Neither module imports its framework when it is imported: the NumPy converters work without it,
and the first function that needs the framework raises ImportError naming the package to install.

An option of this reference that a framework cannot express (a soft-cap, an explicit dropout
keep-mask, an empty-row policy the framework does not follow) raises :class:`UnsupportedOption`,
whose message names the option and the reason, so that a conformance runner can report
``skipped: <reason>`` instead of a disagreement. Options with an exact equivalent are translated
(a bottom-right causal mask or a sliding window becomes an explicit boolean mask).

Mapping tables and the framework behaviours measured: ``docs/adapters.md``.

Layer 3 of attention_ref. May import: numpy and ``attention_ref.core`` (and each framework,
lazily); the oracle tools above drive the adapters, never the other way round.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..core._validate import (
    as_float,
    check_broadcastable,
    check_ndim,
    check_nonempty,
    resolve_dtype,
)
from ..core.attention import AttentionGrads
from ..core.masks import AllowedPairs, query_offset
from ..core.mha import MultiHeadGrads
from ..core.options import AttentionOptions

__all__ = ["UnsupportedOption", "FrameworkRun"]


class UnsupportedOption(ValueError):
    """An option of attention_ref that a framework cannot express.

    Raised by the option mappings and runners of :mod:`attention_ref.adapters.torch` and
    :mod:`attention_ref.adapters.jax` before anything runs. ``str(exc)`` reads
    ``"<framework> cannot express <option>: <reason>"``, ready for a conformance table's
    ``skipped: ...`` cell.

    Parameters
    ----------
    option : str
        The attention_ref argument that cannot be mapped (``"softcap"``, ``"empty_rows"``, ...).
    framework : str
        The framework entry point (``"torch F.scaled_dot_product_attention"``, ...).
    reason : str
        Why, in a sentence.

    Examples
    --------
    >>> from attention_ref.adapters import UnsupportedOption
    >>> exc = UnsupportedOption(
    ...     "softcap", "jax.nn.dot_product_attention", "it has no soft-cap argument"
    ... )
    >>> str(exc)
    'jax.nn.dot_product_attention cannot express softcap: it has no soft-cap argument'
    >>> isinstance(exc, ValueError), exc.option
    (True, 'softcap')
    """

    def __init__(self, option: str, framework: str, reason: str):
        super().__init__(f"{framework} cannot express {option}: {reason}")
        self.option = option  #: the attention_ref argument
        self.framework = framework  #: the framework entry point
        self.reason = reason  #: why it cannot be expressed


class FrameworkRun(NamedTuple):
    """What a runner returns: the framework's output and, given a cotangent, its gradients.

    ``grads`` has the type the reference's own backward returns, so the two compare field by
    field: :class:`~attention_ref.AttentionGrads` from the scaled dot-product attention runners,
    :class:`~attention_ref.MultiHeadGrads` from the multi-head attention runners. Every array is
    a NumPy array of its own (no memory shared with the inputs or the framework).
    """

    out: (
        np.ndarray
    )  #: (B, H, T, Dv) from the attention runners, (B, T, D_out) from the multi-head runners
    grads: (
        AttentionGrads | MultiHeadGrads | None
    )  #: gradients for the cotangent ``dout``; None without one


# ---------------------------------------------------------------------------------------------
# Internal helpers shared by the torch and jax adapters
# ---------------------------------------------------------------------------------------------


def _numpy(x: Any) -> Any:
    """A torch tensor as a NumPy array (detached, on the CPU); anything else unchanged."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return x


def _bool_array(name: str, x: Any, polarity: str) -> np.ndarray:
    """``x`` (NumPy or torch) as a NumPy bool array; a TypeError names the polarity expected."""
    try:
        arr = np.asarray(_numpy(x))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} could not be converted to a numpy array: {exc}") from None
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array ({polarity}); got dtype {arr.dtype}")
    return arr


class _Options(NamedTuple):
    """Validated attention_ref options, and the masks they imply."""

    mask: np.ndarray | None  # bool, True = may attend
    bias: np.ndarray | None  # float64, -inf entries included
    causal: bool
    align: str
    window: tuple[int | None, int | None] | None
    scale: float | None
    structural: (
        np.ndarray | None
    )  # mask & causal & window, broadcastable to (..., T, S); None = all
    allowed: np.ndarray | None  # structural & (bias != -inf)


def _prepare(
    framework: str, policy: str, no_dropout: str, T: int, S: int, options: AttentionOptions
) -> _Options:
    """Validate the options, refuse what ``framework`` cannot express, and build the masks.

    ``policy`` is what the framework does with a fully masked row; a different ``empty_rows`` is
    refused only when such a row exists (otherwise the policy does not matter). ``no_dropout``
    says why the framework cannot take the reference's explicit dropout keep-mask.
    """
    options.refuse(("rounding",), framework, "it rounds as it computes; compare it with a baseline")
    for name, reason in (
        ("sinks", "it has no learnable sink logits (an extra softmax column with value 0)"),
        (
            "chunk_size",
            "it has no chunked window; pass AllowedPairs.build(T, S, chunk_size=...).dense() as "
            "the mask",
        ),
        (
            "sink_tokens",
            "it has no sink tokens; pass AllowedPairs.build(T, S, sink_tokens=...).dense() as the "
            "mask",
        ),
    ):
        if name in options.given():
            raise UnsupportedOption(name, framework, reason)
    mask, bias = options.mask, options.bias
    if mask is not None:
        mask = _bool_array("mask", mask, "True = may attend")
    if options.key_padding_mask is not None:  # (B, S) -> (B, 1, 1, S), ANDed with the mask
        keys = _bool_array("key_padding_mask", options.key_padding_mask, "True = may attend")
        if keys.ndim < 1 or keys.shape[-1] != S:
            raise ValueError(
                f"key_padding_mask must have shape (..., S) with S = {S}; got shape {keys.shape}"
            )
        keys = keys[..., None, None, :]
        mask = keys if mask is None else mask & keys
        options = options.replace(key_padding_mask=None)
    if bias is not None:
        bias = as_float("bias", _numpy(bias), np.dtype(np.float64))
        if bias.ndim < 2:
            raise ValueError(
                f"bias must have shape (..., T, S) (2 or more dims); got shape {bias.shape}"
            )
    keep = options.dropout_mask
    keep = (
        None if keep is None or isinstance(keep, np.random.Generator) else np.asarray(_numpy(keep))
    )
    lead = [x.shape[:-2] for x in (mask, bias, keep) if x is not None and x.ndim >= 2]
    try:
        scores_shape = np.broadcast_shapes(*lead) + (T, S) if lead else (T, S)
    except ValueError:
        scores_shape = (T, S)  # the mask and bias disagree: validate reports it
    opt = options.replace(mask=mask, bias=bias).validate(scores_shape)
    mask, bias, causal, align, window, empty_rows = (
        opt.mask,
        opt.bias,
        opt.causal,
        opt.align,
        opt.window,
        opt.empty_rows,
    )
    if opt.softcap is not None:
        raise UnsupportedOption(
            "softcap", framework, "it has no soft-cap (cap * tanh(s / cap)) of the scores"
        )
    if opt.dropout_p > 0:
        raise UnsupportedOption("dropout_p", framework, no_dropout)

    pairs = AllowedPairs(T, S, mask, causal, window, query_offset(T, S, align))
    structural = pairs.dense()
    allowed = structural
    if bias is not None and np.isneginf(bias).any():
        finite = ~np.isneginf(bias)
        allowed = finite if allowed is None else allowed & finite
    if allowed is not None and empty_rows != policy:
        empty = ~allowed.any(axis=-1)  # (..., T) over the mask's own leading dims
        if empty.any():
            first = tuple(int(i) for i in np.argwhere(empty)[0])
            raise UnsupportedOption(
                "empty_rows",
                framework,
                f"{int(empty.sum())} query row(s) have no key to attend (the first at index "
                f"{first} of the combined mask's (..., T) rows); it gives such a row {policy!r}, "
                f"not {empty_rows!r} (pass empty_rows={policy!r} to compare with it)",
            )
    return _Options(mask, bias, bool(causal), align, window, opt.scale, structural, allowed)


def _head_arrays(q: Any, k: Any, v: Any, dt: np.dtype, ndim: int | None = None):
    """q (..., H, T, Dk), k (..., Hkv, S, Dk), v (..., Hkv, S, Dv) as arrays of ``dt``, checked."""
    layouts = {"q": "(..., H, T, Dk)", "k": "(..., Hkv, S, Dk)", "v": "(..., Hkv, S, Dv)"}
    arrays = {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        arr = as_float(name, _numpy(x), dt)
        layout = layouts[name]
        if ndim is not None:
            layout = layout.replace("...", "B")
            if arr.ndim != ndim:
                raise ValueError(
                    f"{name} must have shape {layout} ({ndim} dims); got shape {arr.shape}"
                )
        check_ndim(name, arr, 3, layout)
        check_nonempty(name, arr, layout)
        arrays[name] = arr
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    if k.shape[:-3] != q.shape[:-3] or v.shape[:-3] != q.shape[:-3]:
        raise ValueError(
            f"q, k and v must have the same batch dims; got q.shape={q.shape}, k.shape={k.shape}, "
            f"v.shape={v.shape}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k must have Dk={q.shape[-1]} like q; got k.shape={k.shape}, q.shape={q.shape}"
        )
    if v.shape[-3:-1] != k.shape[-3:-1]:
        raise ValueError(f"v must have k's (Hkv, S) = {k.shape[-3:-1]}; got v.shape={v.shape}")
    if q.shape[-3] % k.shape[-3]:
        raise ValueError(
            f"q's head count H={q.shape[-3]} must be a multiple of k's Hkv={k.shape[-3]}; "
            f"got q.shape={q.shape}, k.shape={k.shape}"
        )
    return q, k, v


def _check_full_shape(name: str, arr: np.ndarray | None, scores_shape: tuple[int, ...]) -> None:
    """A mask or bias of a runner must broadcast to the scores (..., H, T, S) of its inputs."""
    if arr is not None:
        check_broadcastable(name, arr, scores_shape, "(..., H, T, S)")


def _dtype(dtype: Any) -> np.dtype:
    """The runners' compute dtype: float64 unless another real floating dtype is asked for."""
    return resolve_dtype(dtype)
