r"""The attention options, defined once: :class:`AttentionOptions`.

Every path of attention_ref -- the plain stages, multi-head attention, the tiled, varlen and
decode variants, the low-precision baselines, the mpmath reference, golden files, the adapters,
the conformance runner and the command line -- takes its options through this one type, so
adding an option is one field and one validation block here, plus its math where it acts.

The public functions accept the options either as keywords
(``scaled_dot_product_attention(q, k, v, causal=True)``) or as an object
(``scaled_dot_product_attention(q, k, v, options=opts)``), or both: a keyword overrides the
object's field. One object serves a forward and its backward, so the options are written once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from ._validate import (
    ALIGNS,
    EMPTY_ROW_POLICIES,
    as_bool_mask,
    as_float,
    check_broadcastable,
    check_choice,
    check_count,
    check_positive_int,
    check_real_scalar,
    check_window,
)
from .mods import ScoreMod, as_score_mod
from .precision import Rounding

__all__ = [
    "MOD_OPTIONS",
    "Align",
    "AttentionOptions",
    "CheckedOptions",
    "EmptyRows",
    "SCORES_LAYOUT",
    "Window",
]

#: ``"top_left"``: query ``i`` sits at key position ``i``; ``"bottom_right"``: at ``i + S - T``.
Align = Literal["top_left", "bottom_right"]
#: What a query row with no key to attend gives (``docs/conventions.md``, "Fully masked rows").
EmptyRows = Literal["zero", "uniform", "nan", "raise"]
#: ``(left, right)``: keys ``i' - left <= j <= i' + right``; None leaves a side unbounded.
Window = tuple[int | None, int | None]

SCORES_LAYOUT = "(..., H, T, S)"
#: The programmable options: computed by the plain path (``sdpa_forward``), the tiled path
#: (``flash_attention_forward``) and ``flex_attention``; every other path refuses them.
MOD_OPTIONS = ("score_mod", "mask_mod")
MOD_PATHS = (
    "the plain path (scaled_dot_product_attention, sdpa_forward), the tiled path "
    "(flash_attention_forward) and flex_attention"
)


@dataclass(frozen=True, eq=False)
class AttentionOptions:
    r"""The options of scaled dot-product attention, with their defaults.

    Parameters
    ----------
    mask : array_like of bool, optional
        True = may attend; broadcastable to (..., H, T, S) by numpy's rule, so a 2-D mask is
        (T, S), never (B, S). PyTorch SDPA and JAX polarity (``nn.MultiheadAttention``'s masks
        use the opposite one).
    key_padding_mask : array_like of bool, shape (..., S), optional
        Per batch element, which keys exist: True = may attend (this library's polarity;
        PyTorch's ``key_padding_mask`` is True = *ignore*: pass its negation). Its shape must be
        the scores' batch dims plus S exactly, ``(B, S)`` for ``(B, H, T, S)``: the one way to
        give a key-padding mask without its shape being read as ``(T, S)``. ANDed with ``mask``.
    bias : array_like, optional
        Additive bias on the scores, broadcastable to (..., H, T, S); ``-inf`` entries mask
        their pair; NaN and ``+inf`` are rejected. Differentiable: its gradient is returned.
    causal : bool, default False
        Query ``i`` may attend key ``j`` only when ``j <= i'`` (see ``align``).
    align : {"top_left", "bottom_right"}, default "top_left"
        ``i' = i`` (PyTorch ``is_causal``, JAX) or ``i' = i + S - T`` (FlashAttention, PyTorch
        ``causal_lower_right``, decoding with a cache). Applies to ``causal`` and ``window``.
    window : (int or None, int or None), optional
        Sliding window ``(left, right)``: keys ``i' - left <= j <= i' + right``; None on a side
        leaves it unbounded.
    chunk_size : int, optional
        Chunked attention: query ``i`` may attend key ``j`` only when ``i' // chunk_size ==
        j // chunk_size`` (the same chunk of positions; with ``causal=True``, Llama 4's local
        attention).
    sink_tokens : int, default 0
        The first ``sink_tokens`` keys are exempt from ``window`` and ``chunk_size`` (StreamingLLM's
        attention sinks); ``causal``, ``mask`` and ``bias`` still apply to them.
    sinks : array_like, shape (H,), optional
        Learnable sink logits, one per query head (gpt-oss): every row's softmax gets one more
        term ``exp(sinks[h])`` whose value is zero. Differentiable (``dsinks``); a row with no
        allowed key then gives output 0 and log-sum-exp ``sinks[h]`` (it is not empty).
    softcap : float, optional
        Soft-capping ``cap * tanh(s / cap)`` of the scaled scores, before the bias (Gemma 2).
    scale : float, optional
        Score scale, ``>= 0``; ``1 / sqrt(Dk)`` when omitted.
    dropout_p : float, default 0.0
        Dropout probability on the attention weights, in [0, 1).
    dropout_mask : array_like of bool or numpy.random.Generator, optional
        Required when ``dropout_p > 0``: a keep-mask of shape (..., H, T, S) (True = keep), or a
        Generator to draw one (forwards only: a backward that recomputes its forward needs the
        forward's mask). Kept weights are scaled by ``1 / (1 - dropout_p)``.
    empty_rows : {"zero", "uniform", "nan", "raise"}, default "zero"
        A query row with no key to attend: output and weights 0 (PyTorch SDPA, FlashAttention);
        weights 1/S (JAX, the ``-1e9`` fill idiom); NaN (a naive softmax); or ``ValueError``.
    dtype : dtype, optional
        Compute dtype; float64 when omitted (complex128 for complex inputs, the complex step).
        Lower precision only for baselines.
    score_mod : callable or ScoreMod, optional
        FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)``, applied to the logits (after
        the scale, the softcap and the bias, before the mask), called once on broadcasting index
        arrays (``attention_ref.core.mods``); a ``-inf`` result masks its pair. Its parameters'
        gradients come back in ``dscore_mod``. Needs 4-D inputs (B, H, T, D).
    mask_mod : callable, optional
        FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend), ANDed with
        the other masks; raw indices (``align`` does not apply to it). Needs 4-D inputs.
    rounding : Rounding, optional
        Where a low-precision baseline rounds (:class:`~attention_ref.core.precision.Rounding`):
        every stage's output rounded to bfloat16, float16 or float32, products accumulated in
        float32 (the compute dtype is then float32). None, the reference, rounds nowhere.
        :func:`attention_ref.testing.sdpa_baseline` is attention under this policy.

    Notes
    -----
    The order of operations on the scores is fixed (``docs/conventions.md``):
    ``q k^T * scale`` -> softcap -> ``+ bias`` -> ``score_mod`` -> mask (boolean, causal,
    window, ``-inf`` bias, ``mask_mod``, ``-inf`` from the ``score_mod``) -> softmax (with the
    ``sinks`` column, when given) -> dropout -> ``@ v``.

    An ``AttentionOptions`` holds what the caller gave, unconverted; :meth:`check` validates it
    against the inputs and returns a ``CheckedOptions``. Construction validates nothing, so
    that one object can be built before the inputs exist.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import AttentionOptions, sdpa_forward, sdpa_backward
    >>> from attention_ref import scaled_dot_product_attention_backward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 6))
    >>> opts = AttentionOptions(causal=True, align="bottom_right", softcap=5.0)
    >>> tr = sdpa_forward(q, k, v, options=opts)
    >>> g = scaled_dot_product_attention_backward(np.ones((2, 3, 6)), q, k, v, options=opts)
    >>> bool(np.array_equal(g.dq, sdpa_backward(np.ones((2, 3, 6)), tr).dq))
    True
    >>> opts.replace(causal=False).causal
    False
    """

    mask: Any = None
    key_padding_mask: Any = None
    bias: Any = None
    causal: bool = False
    align: Align = "top_left"
    window: Window | None = None
    chunk_size: int | None = None
    sink_tokens: int = 0
    sinks: Any = None
    softcap: float | None = None
    scale: float | None = None
    dropout_p: float = 0.0
    dropout_mask: Any = None
    empty_rows: EmptyRows = "zero"
    dtype: Any = None
    rounding: Rounding | None = None
    score_mod: Any = None
    mask_mod: Any = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in definition order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option with its default."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def of(cls, options: AttentionOptions | None = None, /, **kwargs: Any) -> AttentionOptions:
        """``options`` (or the defaults) with the keyword options applied on top.

        Raises ``TypeError`` for a keyword that is not an option, or an ``options`` that is not
        an :class:`AttentionOptions`.

        Examples
        --------
        >>> from attention_ref import AttentionOptions
        >>> AttentionOptions.of(AttentionOptions(causal=True), window=(2, 0)).window
        (2, 0)
        >>> AttentionOptions.of(casual=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: unknown attention option(s) ['casual']; the options are mask, ...
        """
        if options is None:
            base = cls()
        elif isinstance(options, AttentionOptions):
            base = options
        else:
            raise TypeError(
                f"options must be an AttentionOptions (or None); got {type(options).__name__}"
            )
        if not kwargs:
            return base
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"unknown attention option(s) {unknown}; the options are {', '.join(cls.names())}"
            )
        return dataclasses.replace(base, **kwargs)

    def replace(self, **changes: Any) -> AttentionOptions:
        """A copy with some options changed (an unknown name is a ``TypeError``)."""
        return AttentionOptions.of(self, **changes)

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults (by identity for arrays), by name."""
        return {
            n: getattr(self, n)
            for n, d in self.defaults().items()
            if not (getattr(self, n) is d or (d is not None and _same_scalar(getattr(self, n), d)))
        }

    def refuse(
        self, names: tuple[str, ...], where: str, reason: str, *, what: str | None = None
    ) -> None:
        """Raise ``ValueError`` if any of ``names`` is given (not at its default) for ``where``.

        The message reads ``"<where> does not support <what>: <reason>; got <name>=<value>"``,
        ``what`` defaulting to the names given.
        """
        given = [n for n in names if n in self.given()]
        if given:
            shown = ", ".join(f"{n}={_short(getattr(self, n))}" for n in given)
            raise ValueError(
                f"{where} does not support {what or ', '.join(given)}: {reason}; got {shown}"
            )

    def refuse_mods(self, where: str) -> None:
        """Raise ``ValueError`` if ``score_mod`` or ``mask_mod`` is given to ``where``, a path
        that does not compute them (``MOD_OPTIONS``)."""
        self.refuse(
            MOD_OPTIONS, where, f"they are computed by {MOD_PATHS}", what="score_mod/mask_mod"
        )

    def compute_dtype(self, *inputs: Any) -> np.dtype:
        """The dtype to compute in: ``dtype``; else float32 under a low-precision ``rounding``;
        else float64 (complex128 for complex inputs)."""
        from ._validate import resolve_dtype

        if self.dtype is None and isinstance(self.rounding, Rounding) and not self.rounding.exact:
            return self.rounding.compute_dtype
        return resolve_dtype(self.dtype, *inputs, self.bias, self.sinks)

    def check(self, q: np.ndarray, k: np.ndarray, *, mods: bool = False) -> CheckedOptions:
        r"""Validate every option against converted queries and keys; resolve the scale.

        Parameters
        ----------
        q : ndarray, shape (..., H, T, Dk)
            Queries, already converted to the compute dtype (whose dtype the bias takes).
        k : ndarray, shape (..., Hkv, S, Dk)
            Keys.

        Returns
        -------
        CheckedOptions
            ``mask`` a bool array, ``bias`` an array of ``q``'s dtype, ``causal`` a bool,
            ``window`` a tuple, ``softcap``/``scale``/``dropout_p`` floats (``scale`` resolved to
            ``1 / sqrt(Dk)`` when omitted), ``dropout_mask`` a bool array or a Generator,
            ``dtype`` the compute dtype. The arrays may be the caller's (never written).

        mods : bool, default False
            Whether the caller computes ``score_mod`` and ``mask_mod`` (``MOD_OPTIONS``); a
            caller that does not gets a ``ValueError`` naming the paths that do.

        Raises
        ------
        TypeError, ValueError
            Naming the option, what was expected and what was given.
        """
        return self.validate(
            q.shape[:-1] + (k.shape[-2],), q.dtype, head_dim=q.shape[-1], mods=mods
        )

    def validate(
        self,
        scores_shape: tuple[int, ...],
        dtype: Any = np.float64,
        *,
        head_dim: int | None = None,
        mods: bool = False,
    ) -> CheckedOptions:
        """:meth:`check` from shapes: the scores' ``(..., H, T, S)`` and the head width Dk.

        Without ``head_dim`` an omitted ``scale`` stays None (an adapter leaves it to the
        framework's own default). ``dtype`` is the compute dtype the bias is converted to.
        """
        dt = np.dtype(dtype)
        scores_shape = tuple(scores_shape)
        mask = self.mask
        if mask is not None:
            mask = as_bool_mask("mask", mask, scores_shape, SCORES_LAYOUT)
        kpm = self.key_padding_mask
        if kpm is not None:
            want = scores_shape[:-3] + scores_shape[-1:]  # (..., S)
            kpm = as_bool_mask("key_padding_mask", kpm, want, "(..., S)")
            if kpm.shape != want:
                raise ValueError(
                    f"key_padding_mask must have the scores' batch dims and S exactly, (..., S) = "
                    f"{want}; got shape {kpm.shape} (a (T, S) pattern goes in mask=)"
                )
            keys = kpm[..., None, None, :]  # (..., 1, 1, S)
            mask = keys if mask is None else mask & keys  # the one mask the builders read
        bias = self.bias
        if bias is not None:
            bias = as_float("bias", bias, dt)
            check_broadcastable("bias", bias, scores_shape, SCORES_LAYOUT)
            bad = np.isnan(bias) | np.isposinf(bias.real)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"bias must be finite or -inf (-inf masks that entry); got {int(bad.sum())} "
                    f"NaN/+inf entries, the first bias[{first}] = {bias[first]}"
                )
        if not isinstance(self.causal, (bool, np.bool_)):
            raise TypeError(f"causal must be a bool; got {self.causal!r}")
        align = check_choice("align", self.align, ALIGNS)
        window = check_window(self.window)
        chunk_size = None
        if self.chunk_size is not None:
            chunk_size = check_count(
                "chunk_size", check_positive_int("chunk_size", self.chunk_size)
            )
        sink_tokens = check_count("sink_tokens", self.sink_tokens)
        sinks = self.sinks
        if sinks is not None:
            sinks = as_float("sinks", sinks, dt)
            heads = scores_shape[-3] if len(scores_shape) >= 3 else 1
            if sinks.shape != (heads,):
                raise ValueError(
                    f"sinks must have shape (H,) = ({heads},), one logit per query head; got "
                    f"shape {sinks.shape}"
                )
            if not np.isfinite(sinks).all():
                raise ValueError(f"sinks must be finite; got {sinks.tolist()}")
        softcap = self.softcap
        if softcap is not None:
            softcap = check_real_scalar("softcap", softcap, positive=True)
        if self.scale is not None:
            scale: float | None = check_real_scalar("scale", self.scale, positive=False)
        else:
            scale = None if head_dim is None else 1.0 / math.sqrt(head_dim)
        dropout_p = check_real_scalar("dropout_p", self.dropout_p, positive=False)
        if dropout_p >= 1:
            raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
        keep = self.dropout_mask
        if dropout_p == 0 and keep is not None:
            raise ValueError(
                "dropout_mask was given but dropout_p is 0; pass dropout_p > 0 or no mask"
            )
        if dropout_p > 0:
            if keep is None:
                raise ValueError(
                    "dropout_p > 0 needs dropout_mask: a boolean keep-mask of shape "
                    f"{SCORES_LAYOUT} = {scores_shape} or a numpy.random.Generator; got None"
                )
            if not isinstance(keep, np.random.Generator):
                keep = _as_keep_mask(keep, scores_shape)
        empty_rows = check_choice("empty_rows", self.empty_rows, EMPTY_ROW_POLICIES)
        score_mod, mask_mod = self._mods(scores_shape, mods)
        rounding = self.rounding
        if rounding is not None:
            if not isinstance(rounding, Rounding):
                raise TypeError(
                    "rounding must be None or an attention_ref.core.precision.Rounding; got "
                    f"{type(rounding).__name__}"
                )
            if dt != rounding.compute_dtype:
                raise ValueError(
                    f"rounding={rounding!r} computes in {rounding.compute_dtype}; got the compute "
                    f"dtype {dt} (leave dtype unset)"
                )
        return CheckedOptions(
            mask=mask,
            key_padding_mask=kpm,
            bias=bias,
            causal=bool(self.causal),
            align=cast(Align, align),
            window=window,
            chunk_size=chunk_size,
            sink_tokens=sink_tokens,
            sinks=sinks,
            softcap=softcap,
            scale=scale,
            dropout_p=dropout_p,
            dropout_mask=keep,
            empty_rows=cast(EmptyRows, empty_rows),
            dtype=dt,
            rounding=rounding,
            score_mod=score_mod,
            mask_mod=mask_mod,
        )

    def _mods(self, scores_shape: tuple[int, ...], mods: bool) -> tuple[ScoreMod | None, Any]:
        """``score_mod`` as a ScoreMod and ``mask_mod`` checked callable, for a caller that
        computes them (``mods``); refused, with the paths that do, otherwise."""
        if self.score_mod is None and self.mask_mod is None:
            return None, None
        if not mods:
            self.refuse_mods("this path")
        if len(scores_shape) != 4:
            raise ValueError(
                "score_mod and mask_mod need 4-D inputs q (B, H, T, Dk), k (B, Hkv, S, Dk), as "
                f"FlexAttention's; got scores of shape {tuple(scores_shape)}"
            )
        if self.mask_mod is not None and not callable(self.mask_mod):
            raise TypeError(
                "mask_mod must be None or a callable (b, h, q_idx, kv_idx) -> bool; got "
                f"{type(self.mask_mod).__name__}"
            )
        return as_score_mod(self.score_mod), self.mask_mod


@dataclass(frozen=True, eq=False)
class CheckedOptions(AttentionOptions):
    """:class:`AttentionOptions` after :meth:`AttentionOptions.check`: validated, converted, the
    scale resolved. The stages below the public entry points take this form and trust it."""

    @property
    def score_scale(self) -> float:
        """The scale applied to the scores (``check`` resolved an omitted one to 1/sqrt(Dk))."""
        if self.scale is None:
            raise ValueError("the scale is unresolved: validate() was given no head_dim")
        return float(self.scale)


def _as_keep_mask(keep: Any, scores_shape: tuple[int, ...]) -> np.ndarray:
    try:
        keep = np.asarray(keep)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"dropout_mask could not be converted to a numpy array: {exc}") from None
    if keep.dtype != np.bool_:
        raise TypeError(
            f"dropout_mask must be a boolean keep-mask (True = keep); got dtype {keep.dtype}"
        )
    if keep.shape != scores_shape:
        raise ValueError(
            f"dropout_mask must have the attention weights' shape {SCORES_LAYOUT} = "
            f"{scores_shape}; got shape {keep.shape}"
        )
    return keep


def _same_scalar(value: Any, default: Any) -> bool:
    """``value == default`` for scalar options (False for arrays and anything else)."""
    try:
        return type(value) in (bool, int, float, str, np.bool_, np.float64) and bool(
            value == default
        )
    except (TypeError, ValueError):
        return False


def _short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    if isinstance(value, np.random.Generator):
        return "a numpy.random.Generator"
    return repr(value)
