r"""Multi-head latent attention (MLA, DeepSeek-V2/V3): the naive and the absorbed forms.

Each position stores one compressed latent ``c_kv`` (width ``d_c``) and one decoupled rotary key
``k_pe`` (width ``d_rope``) shared by all heads. Head ``h`` decompresses them with its own
up-projections ``w_uk[h]`` and ``w_uv[h]``:

* **naive** (:func:`mla_attention_naive`, "compute friendly", prefill): build the dense keys
  ``k_h = [c_kv @ w_uk[h], k_pe]`` and values ``v_h = c_kv @ w_uv[h]``, then ordinary multi-head
  attention with ``H = Hkv``, (D1)-(D3);
* **absorbed** (:func:`mla_absorb`, :func:`mla_attention_absorbed`, :func:`mla_unabsorb`,
  "data-movement friendly", decode): fold ``w_uk[h]`` into the query, attend the latent cache
  ``kv_latent = [c_kv, k_pe]`` directly as one key/value head (multi-query attention, FlashMLA's
  layout), and apply ``w_uv[h]`` to the latent output, (D4)-(D6).

The two give the same output, with the same scale, which in both is the pre-absorption
``1 / sqrt(d_nope + d_rope)``: the absorbed query is wider (``d_c + d_rope``), and a kernel's
default ``1 / sqrt(q.shape[-1])`` would then be wrong, (D7). So :func:`mla_attention_absorbed`
has no default scale.

Everything attention-like is :func:`~attention_ref.sdpa_forward` /
:func:`~attention_ref.sdpa_backward` on the dense per-head (naive) or shared (absorbed) q, k, v,
with every
:class:`~attention_ref.AttentionOptions` passed through (causal, align, window, softcap, mask,
bias, sinks, dropout, ...). The MLA-specific backward is the chain rule through the
up-projections and the concatenations, (D8)-(D15). The up-projections are plain float products
(a ``rounding`` policy applies to the attention core only).

Layouts follow this library (heads before positions). Converting from the frameworks:

* ``q`` of Hugging Face ``DeepseekV3Attention.forward`` (``modeling_deepseek_v3.py``) is
  ``(B, H, T, d_nope + d_rope)``, split into ``q_pass, q_rot`` = ``q_nope, q_pe`` here;
* ``kv_b_proj.weight`` (``nn.Linear(d_c, H * (d_nope + Dv))``, weight ``(H * (d_nope + Dv),
  d_c)``) gives ``w_uk`` and ``w_uv`` with :func:`mla_split_kv_b_proj`; vLLM's ``W_UK_T``
  ``(H, d_nope, d_c)`` is ``w_uk.swapaxes(1, 2)`` and its ``W_UV`` ``(H, d_c, Dv)`` is ``w_uv``;
* FlashMLA's ``flash_mla_with_kvcache`` takes ``q`` ``(B, T, H, 576)`` (``q_abs.swapaxes(1, 2)``)
  and a cache with ``num_heads_k = 1`` and ``head_dim_v = 512`` (``kv_latent`` and ``d_v``).

Derivation: ``docs/derivations/mla.md``, (D1)-(D15); attention itself:
``docs/derivations/attention.md``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ..core._validate import as_float, check_positive_int, resolve_dtype
from ..core.attention import (
    AttentionTrace,
    require_forward_dropout_mask,
    sdpa_backward,
    sdpa_forward,
)
from ..core.options import AttentionOptions

__all__ = [
    "MLAAbsorbGrads",
    "MLAAbsorbedGrads",
    "MLAGrads",
    "MLAUnabsorbGrads",
    "mla_absorb",
    "mla_absorb_backward",
    "mla_attention_absorbed",
    "mla_attention_absorbed_backward",
    "mla_attention_naive",
    "mla_attention_naive_backward",
    "mla_split_kv_b_proj",
    "mla_unabsorb",
    "mla_unabsorb_backward",
]

Q_NOPE, Q_PE = "(B, H, T, d_nope)", "(B, H, T, d_rope)"
C_KV, K_PE = "(B, S, d_c)", "(B, S, d_rope)"
W_UK, W_UV = "(H, d_c, d_nope)", "(H, d_c, Dv)"
Q_ABS, KV_LATENT = "(B, H, T, d_c + d_rope)", "(B, S, d_c + d_rope)"
O_LAT = "(B, H, T, d_c)"


class _Required:
    """The default of an argument that must be given (shown as ``<required>`` in signatures)."""

    def __repr__(self) -> str:
        return "<required>"


#: ``scale`` of the absorbed form: no default, see (D7) of ``docs/derivations/mla.md``.
REQUIRED: Any = _Required()


# ----------------------------------------------------------------------------- gradients


def _replace_with_options(self: Any, **changes: Any) -> Any:
    """``_replace`` that keeps (or changes) the ``dbias``/``dsinks`` attributes."""
    extra = {n: changes.pop(n, getattr(self, n)) for n in ("dbias", "dsinks")}
    fields = {n: changes.pop(n, getattr(self, n)) for n in self._fields}
    if changes:
        raise ValueError(f"got unexpected field names: {sorted(changes)}")
    return type(self)(**fields, **extra)


def _asdict_with_options(self: Any) -> dict[str, Any]:
    """``_asdict`` with the ``dbias``/``dsinks`` attributes after the tuple's fields."""
    return {
        **{n: getattr(self, n) for n in self._fields},
        "dbias": self.dbias,
        "dsinks": self.dsinks,
    }


class _MLAFields(NamedTuple):
    dq_nope: np.ndarray  #: (B, H, T, d_nope)
    dq_pe: np.ndarray  #: (B, H, T, d_rope)
    dc_kv: np.ndarray  #: (B, S, d_c), summed over the heads, (D10)
    dk_pe: np.ndarray  #: (B, S, d_rope), summed over the heads (one rotary key for all), (D9)
    dw_uk: np.ndarray  #: (H, d_c, d_nope), summed over the batch, (D11)
    dw_uv: np.ndarray  #: (H, d_c, Dv), summed over the batch, (D11)


class MLAGrads(_MLAFields):
    """Gradients of :func:`mla_attention_naive` with respect to every input and weight.

    A 6-tuple ``(dq_nope, dq_pe, dc_kv, dk_pe, dw_uk, dw_uv)``, in the forward's argument order,
    so it unpacks like the inputs. The gradients of the options, ``dbias`` (the bias's shape) and
    ``dsinks`` ((H,)), are attributes outside the tuple, None when the forward had no bias or no
    sinks. Every array is the backward's own (C-contiguous, sharing memory with no input).
    """

    #: the bias's own shape, or None without a bias, (A13)
    dbias: np.ndarray | None
    #: (H,) for the sink logits, or None without sinks, (A19)
    dsinks: np.ndarray | None

    def __new__(
        cls,
        dq_nope: np.ndarray,
        dq_pe: np.ndarray,
        dc_kv: np.ndarray,
        dk_pe: np.ndarray,
        dw_uk: np.ndarray,
        dw_uv: np.ndarray,
        *,
        dbias: np.ndarray | None = None,
        dsinks: np.ndarray | None = None,
    ) -> MLAGrads:
        self = super().__new__(cls, dq_nope, dq_pe, dc_kv, dk_pe, dw_uk, dw_uv)
        self.dbias = dbias
        self.dsinks = dsinks
        return self

    def __repr__(self) -> str:
        return _repr(self, ("dbias", "dsinks"))

    _replace = _replace_with_options
    _asdict = _asdict_with_options


class _MLAAbsorbedFields(NamedTuple):
    dq_abs: np.ndarray  #: (B, H, T, d_c + d_rope)
    #: (B, S, d_c + d_rope): the key's gradient plus the value's in its first d_v columns, (D12)
    dkv_latent: np.ndarray


class MLAAbsorbedGrads(_MLAAbsorbedFields):
    """Gradients of :func:`mla_attention_absorbed`: the 2-tuple ``(dq_abs, dkv_latent)``.

    ``dkv_latent`` is one array for the latent's two roles: the gradient as the key (all
    ``d_c + d_rope`` columns) plus the gradient as the value (its first ``d_v`` columns), each
    summed over the ``H`` query heads, (D12). ``dbias`` and ``dsinks`` are attributes, as for
    :class:`MLAGrads`.
    """

    #: the bias's own shape, or None without a bias, (A13)
    dbias: np.ndarray | None
    #: (H,) for the sink logits, or None without sinks, (A19)
    dsinks: np.ndarray | None

    def __new__(
        cls,
        dq_abs: np.ndarray,
        dkv_latent: np.ndarray,
        *,
        dbias: np.ndarray | None = None,
        dsinks: np.ndarray | None = None,
    ) -> MLAAbsorbedGrads:
        self = super().__new__(cls, dq_abs, dkv_latent)
        self.dbias = dbias
        self.dsinks = dsinks
        return self

    def __repr__(self) -> str:
        return _repr(self, ("dbias", "dsinks"))

    _replace = _replace_with_options
    _asdict = _asdict_with_options


class MLAAbsorbGrads(NamedTuple):
    """Gradients of :func:`mla_absorb`, (D13)."""

    dq_nope: np.ndarray  #: (B, H, T, d_nope)
    dq_pe: np.ndarray  #: (B, H, T, d_rope)
    dw_uk: np.ndarray  #: (H, d_c, d_nope), summed over the batch


class MLAUnabsorbGrads(NamedTuple):
    """Gradients of :func:`mla_unabsorb`, (D14)."""

    do_lat: np.ndarray  #: (B, H, T, d_c)
    dw_uv: np.ndarray  #: (H, d_c, Dv), summed over the batch


def _repr(grads: Any, extra: tuple[str, ...]) -> str:
    """The fields and the extra attributes, arrays shown by shape and dtype only."""

    def short(x: Any) -> str:
        return f"<array {x.shape} {x.dtype}>" if isinstance(x, np.ndarray) else repr(x)

    fields = [f"{n}={short(x)}" for n, x in zip(grads._fields, grads, strict=True)]
    fields += [f"{n}={short(getattr(grads, n))}" for n in extra]
    return f"{type(grads).__name__}({', '.join(fields)})"


# ----------------------------------------------------------------------------- validation


def _check_ndim(name: str, x: np.ndarray, ndim: int, layout: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims); got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} must not be empty (layout {layout}); got shape {x.shape}")


def _check_dim(
    name: str, x: np.ndarray, axis: int, layout: str, expected: int, what: str, other: str
) -> None:
    """``x.shape[axis]`` must be ``expected`` (what ``other`` has); the message names both."""
    if x.shape[axis] != expected:
        raise ValueError(
            f"{name} must have {what} = {expected} like {other} (layout {layout}); got "
            f"{name}.shape = {x.shape}"
        )


def _check_q_pair(q_nope: np.ndarray, q_pe: np.ndarray) -> None:
    _check_ndim("q_nope", q_nope, 4, Q_NOPE)
    _check_ndim("q_pe", q_pe, 4, Q_PE)
    if q_pe.shape[:3] != q_nope.shape[:3]:
        raise ValueError(
            f"q_pe must have the same (B, H, T) as q_nope = {q_nope.shape[:3]} (layout {Q_PE}); "
            f"got q_pe.shape = {q_pe.shape}"
        )


def _check_w_uk(w_uk: np.ndarray, q_nope: np.ndarray) -> None:
    _check_ndim("w_uk", w_uk, 3, W_UK)
    _check_dim("w_uk", w_uk, 0, W_UK, q_nope.shape[1], "H", "q_nope")
    _check_dim("w_uk", w_uk, 2, W_UK, q_nope.shape[3], "d_nope", "q_nope")


def _check_w_uv(w_uv: np.ndarray, heads: int, d_c: int, other: str) -> None:
    _check_ndim("w_uv", w_uv, 3, W_UV)
    _check_dim("w_uv", w_uv, 0, W_UV, heads, "H", other)
    _check_dim("w_uv", w_uv, 1, W_UV, d_c, "d_c", other)


def _naive_inputs(
    q_nope: Any, q_pe: Any, c_kv: Any, k_pe: Any, w_uk: Any, w_uv: Any, dt: np.dtype
) -> tuple[np.ndarray, ...]:
    """The six inputs of the naive form, converted to ``dt`` and checked against each other."""
    q_nope, q_pe = as_float("q_nope", q_nope, dt), as_float("q_pe", q_pe, dt)
    c_kv, k_pe = as_float("c_kv", c_kv, dt), as_float("k_pe", k_pe, dt)
    w_uk, w_uv = as_float("w_uk", w_uk, dt), as_float("w_uv", w_uv, dt)
    _check_q_pair(q_nope, q_pe)
    _check_ndim("c_kv", c_kv, 3, C_KV)
    _check_dim("c_kv", c_kv, 0, C_KV, q_nope.shape[0], "B", "q_nope")
    _check_ndim("k_pe", k_pe, 3, K_PE)
    if k_pe.shape[:2] != c_kv.shape[:2]:
        raise ValueError(
            f"k_pe must have the same (B, S) as c_kv = {c_kv.shape[:2]} (layout {K_PE}); got "
            f"k_pe.shape = {k_pe.shape}"
        )
    _check_dim("k_pe", k_pe, 2, K_PE, q_pe.shape[3], "d_rope", "q_pe")
    _check_w_uk(w_uk, q_nope)
    _check_dim("w_uk", w_uk, 1, W_UK, c_kv.shape[2], "d_c", "c_kv")
    _check_w_uv(w_uv, q_nope.shape[1], c_kv.shape[2], "q_nope (H) and c_kv (d_c)")
    return q_nope, q_pe, c_kv, k_pe, w_uk, w_uv


def _absorbed_inputs(q_abs: Any, kv_latent: Any, d_v: Any, dt: np.dtype):
    q_abs, kv_latent = as_float("q_abs", q_abs, dt), as_float("kv_latent", kv_latent, dt)
    _check_ndim("q_abs", q_abs, 4, Q_ABS)
    _check_ndim("kv_latent", kv_latent, 3, KV_LATENT)
    _check_dim("kv_latent", kv_latent, 0, KV_LATENT, q_abs.shape[0], "B", "q_abs")
    _check_dim("kv_latent", kv_latent, 2, KV_LATENT, q_abs.shape[3], "d_c + d_rope", "q_abs")
    d_v = check_positive_int("d_v", d_v)
    if d_v > kv_latent.shape[2]:
        raise ValueError(
            f"d_v must be <= kv_latent's width d_c + d_rope = {kv_latent.shape[2]} (the value is "
            f"kv_latent[..., :d_v], normally d_v = d_c); got d_v = {d_v}"
        )
    return q_abs, kv_latent, d_v


def _naive_scale(scale: Any, given: AttentionOptions, d_qk: int) -> Any:
    """``scale``, else the options' scale, else the naive form's 1 / sqrt(d_nope + d_rope), (D3)."""
    if scale is None:
        scale = given.scale
    return 1.0 / math.sqrt(d_qk) if scale is None else scale


def _absorbed_scale(scale: Any, given: AttentionOptions, where: str, width: int) -> Any:
    """The absorbed form's scale: given by the caller, never defaulted, (D7)."""
    if scale is REQUIRED or scale is None:
        if given.scale is not None:
            return given.scale
        raise TypeError(
            f"{where} requires scale= (keyword-only, no default): q_abs has width d_c + d_rope = "
            f"{width}, but the logits equal the naive form's only with the naive scale "
            "1/sqrt(d_nope + d_rope) (DeepSeek-V3: 1/sqrt(128 + 64), not 1/sqrt(512 + 64)), "
            "times YaRN's mscale**2 when the model uses it; pass e.g. "
            "scale=1/math.sqrt(d_nope + d_rope) (docs/derivations/mla.md, (D7))"
        )
    return scale


def _check_return_lse(return_lse: Any) -> None:
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")


# ----------------------------------------------------------------------------- naive form


def _naive_forward(
    q_nope: Any,
    q_pe: Any,
    c_kv: Any,
    k_pe: Any,
    w_uk: Any,
    w_uv: Any,
    scale: Any,
    given: AttentionOptions,
) -> tuple[tuple[np.ndarray, ...], AttentionTrace]:
    """The checked inputs and the trace of attention over the decompressed q, k, v, (D1)-(D3)."""
    dt = given.compute_dtype(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv)
    inputs = _naive_inputs(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, dt)
    q_nope, q_pe, c_kv, k_pe, w_uk, w_uv = inputs
    B, H, T, d_nope = q_nope.shape
    S, d_rope = k_pe.shape[1], k_pe.shape[2]
    latent = c_kv[:, None]  # (B, 1, S, d_c), broadcast over the heads
    k_nope = latent @ w_uk  # (B, 1, S, d_c) @ (H, d_c, d_nope) -> (B, H, S, d_nope)   (D1)
    v = latent @ w_uv  # (B, 1, S, d_c) @ (H, d_c, Dv) -> (B, H, S, Dv)   (D1)
    k_rot = np.broadcast_to(k_pe[:, None], (B, H, S, d_rope))  # one rotary key for all heads
    k = np.concatenate([k_nope, k_rot], axis=-1)  # (B, H, S, d_nope + d_rope)   (D1)
    q = np.concatenate([q_nope, q_pe], axis=-1)  # (B, H, T, d_nope + d_rope)   (D2)
    opts = given.replace(scale=_naive_scale(scale, given, d_nope + d_rope))
    return inputs, sdpa_forward(q, k, v, options=opts)  # (D3) = (A1)-(A7), Hkv = H


def mla_attention_naive(
    q_nope: ArrayLike,
    q_pe: ArrayLike,
    c_kv: ArrayLike,
    k_pe: ArrayLike,
    w_uk: ArrayLike,
    w_uv: ArrayLike,
    *,
    scale: float | None = None,
    options: AttentionOptions | None = None,
    return_lse: bool = False,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Multi-head latent attention, naive form: decompress per head, then attention.

    Parameters
    ----------
    q_nope : array_like, shape (B, H, T, d_nope)
        The queries' non-rotary part (Hugging Face's ``q_pass``, vLLM's ``q_nope``).
    q_pe : array_like, shape (B, H, T, d_rope)
        The queries' rotary part, RoPE already applied (``q_rot``, ``q_pe``).
    c_kv : array_like, shape (B, S, d_c)
        The compressed latent of each position (after ``kv_a_layernorm``), shared by all heads.
    k_pe : array_like, shape (B, S, d_rope)
        The decoupled rotary key, RoPE applied, shared by all heads.
    w_uk : array_like, shape (H, d_c, d_nope)
        Key up-projections: head ``h``'s keys are ``c_kv @ w_uk[h]``.
    w_uv : array_like, shape (H, d_c, Dv)
        Value up-projections: head ``h``'s values are ``c_kv @ w_uv[h]``.
    scale : float, optional
        Score scale; ``1 / sqrt(d_nope + d_rope)`` by default (before a YaRN ``mscale**2``,
        which a YaRN model's caller multiplies in). ``options.scale`` is used when this is None.
    options : AttentionOptions, optional
        The attention options as one object.
    return_lse : bool, default False
        Also return the log-sum-exp of each row, (B, H, T).
    **kwargs
        Any other field of :class:`~attention_ref.AttentionOptions` (``causal``, ``align``,
        ``window``, ``softcap``, ``mask``, ``bias``, ``sinks``, ``dropout_p``, ...), applied to
        the (B, H, T, S) scores as in :func:`~attention_ref.scaled_dot_product_attention`.

    Returns
    -------
    out : ndarray, shape (B, H, T, Dv)
    lse : ndarray, shape (B, H, T)
        Only with ``return_lse=True``.

    Notes
    -----
    Per head (D1)-(D3) of ``docs/derivations/mla.md``:

    .. math::
        k_h = [C W^K_h,\ R],\quad v_h = C W^V_h,\quad q_h = [q^N_h,\ q^R_h],\quad
        o_h = \operatorname{attention}_\sigma(q_h, k_h, v_h)

    (:math:`C` = ``c_kv[b]``, :math:`R` = ``k_pe[b]``, :math:`W^K_h` = ``w_uk[h]``, ...),

    with the dense keys and values of all H heads (``Hkv = H``), as Hugging Face's
    ``DeepseekV3Attention.forward``, DeepSeek-V3's ``MLA.forward`` with ``attn_impl="naive"``
    and vLLM's MLA prefill compute them. The default scale is theirs: ``qk_head_dim ** -0.5``
    with ``qk_head_dim = d_nope + d_rope``. :func:`mla_attention_absorbed` computes the same
    output from the latent cache.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.mla import mla_attention_naive
    >>> rng = np.random.default_rng(0)
    >>> B, H, T, S, d_nope, d_rope, d_c, Dv = 2, 3, 2, 5, 4, 2, 6, 3
    >>> q_nope, q_pe = rng.normal(size=(B, H, T, d_nope)), rng.normal(size=(B, H, T, d_rope))
    >>> c_kv, k_pe = rng.normal(size=(B, S, d_c)), rng.normal(size=(B, S, d_rope))
    >>> w_uk, w_uv = rng.normal(size=(H, d_c, d_nope)), rng.normal(size=(H, d_c, Dv))
    >>> out = mla_attention_naive(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv,
    ...                           causal=True, align="bottom_right")
    >>> out.shape
    (2, 3, 2, 3)
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("mla_attention_naive")
    _, trace = _naive_forward(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale, given)
    _check_return_lse(return_lse)
    return (trace.out, trace.logsumexp) if return_lse else trace.out


def mla_attention_naive_backward(
    dout: ArrayLike,
    q_nope: ArrayLike,
    q_pe: ArrayLike,
    c_kv: ArrayLike,
    k_pe: ArrayLike,
    w_uk: ArrayLike,
    w_uv: ArrayLike,
    *,
    scale: float | None = None,
    options: AttentionOptions | None = None,
    dlse: ArrayLike | None = None,
    **kwargs: Any,
) -> MLAGrads:
    r"""Gradients of :func:`mla_attention_naive` with respect to every input and weight.

    Recomputes the forward, runs :func:`~attention_ref.sdpa_backward` on the dense per-head
    q, k, v ((A8)-(A19) of ``docs/derivations/attention.md``), then the chain rule through the
    concatenations and the up-projections, (D8)-(D11) of ``docs/derivations/mla.md``.

    Parameters
    ----------
    dout : array_like, shape (B, H, T, Dv)
        Gradient of the loss with respect to the output.
    q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale, options, **kwargs
        The forward's inputs and options, as for :func:`mla_attention_naive`. A dropout
        ``dropout_mask`` must be the forward's keep-mask (a Generator would draw another).
    dlse : array_like, shape (B, H, T), optional
        Gradient with respect to the log-sum-exp ``return_lse=True`` returned, (A17).

    Returns
    -------
    MLAGrads
        ``(dq_nope, dq_pe, dc_kv, dk_pe, dw_uk, dw_uv)``, each of its input's shape; ``dc_kv``
        and ``dk_pe`` sum over the heads, ``dw_uk`` and ``dw_uv`` over the batch. ``.dbias``
        and ``.dsinks`` are the options' gradients (None without them).

    Notes
    -----
    With :math:`dq_h, dk_h, dv_h` the dense gradients of head :math:`h`:

    .. math::
        dq^N_h, dq^R_h = \text{split}(dq_h)\ \text{(D8)},\qquad
        dR = \textstyle\sum_h (dk_h)_{:, d_{nope}:}\ \text{(D9)},

        dC = \textstyle\sum_h (dk_h)_{:, :d_{nope}} W^{K\top}_h + dv_h W^{V\top}_h\ \text{(D10)},
        \qquad dW^K_h = \textstyle\sum_b C^\top (dk_h)_{:, :d_{nope}},\
        dW^V_h = \textstyle\sum_b C^\top dv_h\ \text{(D11)}.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.mla import mla_attention_naive_backward
    >>> rng = np.random.default_rng(0)
    >>> B, H, T, S, d_nope, d_rope, d_c, Dv = 2, 3, 2, 5, 4, 2, 6, 3
    >>> q_nope, q_pe = rng.normal(size=(B, H, T, d_nope)), rng.normal(size=(B, H, T, d_rope))
    >>> c_kv, k_pe = rng.normal(size=(B, S, d_c)), rng.normal(size=(B, S, d_rope))
    >>> w_uk, w_uv = rng.normal(size=(H, d_c, d_nope)), rng.normal(size=(H, d_c, Dv))
    >>> g = mla_attention_naive_backward(rng.normal(size=(B, H, T, Dv)), q_nope, q_pe, c_kv,
    ...                                  k_pe, w_uk, w_uv, causal=True, align="bottom_right")
    >>> g.dc_kv.shape, g.dk_pe.shape, g.dw_uk.shape, g.dw_uv.shape, g.dsinks
    ((2, 5, 6), (2, 5, 2), (3, 6, 4), (3, 6, 3), None)
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("mla_attention_naive_backward")
    require_forward_dropout_mask(given.dropout_mask, "the same keep-mask in both calls")
    (q_nope, q_pe, c_kv, k_pe, w_uk, w_uv), trace = _naive_forward(
        q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale, given
    )
    d_nope = q_nope.shape[3]
    g = sdpa_backward(
        dout, trace, dlse
    )  # (A8)-(A19): dq (B,H,T,Dqk), dk (B,H,S,Dqk), dv (B,H,S,Dv)
    dq_nope = np.ascontiguousarray(g.dq[..., :d_nope])  # (B, H, T, d_nope)   (D8)
    dq_pe = np.ascontiguousarray(g.dq[..., d_nope:])  # (B, H, T, d_rope)   (D8)
    dk_nope = g.dk[..., :d_nope]  # (B, H, S, d_nope)
    dk_pe = g.dk[..., d_nope:].sum(axis=1)  # (B, S, d_rope): the broadcast over heads   (D9)
    # (D10): (B, H, S, d_nope) @ (H, d_nope, d_c) + (B, H, S, Dv) @ (H, Dv, d_c), summed over H
    dc_kv = (dk_nope @ w_uk.swapaxes(1, 2) + g.dv @ w_uv.swapaxes(1, 2)).sum(axis=1)
    latent_t = c_kv.swapaxes(1, 2)[:, None]  # (B, 1, d_c, S)
    dw_uk = (latent_t @ dk_nope).sum(axis=0)  # (B, H, d_c, d_nope) summed over B   (D11)
    dw_uv = (latent_t @ g.dv).sum(axis=0)  # (B, H, d_c, Dv) summed over B   (D11)
    return MLAGrads(dq_nope, dq_pe, dc_kv, dk_pe, dw_uk, dw_uv, dbias=g.dbias, dsinks=g.dsinks)


# ----------------------------------------------------------------------------- absorbed form


def _check_cotangent(name: str, d: np.ndarray, shape: tuple[int, ...], layout: str) -> None:
    if d.shape != shape:
        raise ValueError(f"{name} must have the output's shape {layout} = {shape}; got {d.shape}")


def mla_absorb(
    q_nope: ArrayLike, q_pe: ArrayLike, w_uk: ArrayLike, *, dtype: DTypeLike | None = None
) -> np.ndarray:
    r"""Fold the key up-projection into the query: ``q_abs = [q_nope @ w_uk[h]^T, q_pe]``.

    Parameters
    ----------
    q_nope : array_like, shape (B, H, T, d_nope)
    q_pe : array_like, shape (B, H, T, d_rope)
    w_uk : array_like, shape (H, d_c, d_nope)
    dtype : dtype, optional
        Compute dtype; float64 when omitted (complex128 for complex inputs).

    Returns
    -------
    ndarray, shape (B, H, T, d_c + d_rope)
        ``q_abs``, with ``q_abs[b, h] @ [c_kv[b], k_pe[b]]^T == q_h @ k_h^T`` of the naive form,
        (D4)-(D5) of ``docs/derivations/mla.md``.

    Notes
    -----
    vLLM's MLA decode computes the same product as ``torch.bmm(q_nope, W_UK_T)`` with
    ``W_UK_T = w_uk.swapaxes(1, 2)`` ``(H, d_nope, d_c)`` (``MLACommonImpl.forward`` in
    ``vllm/v1/attention/backends/mla/common.py``), DeepSeek-V3's ``MLA.forward``
    (``attn_impl="absorb"``, ``inference/model.py``) as
    ``einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :d_nope])``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.mla import mla_absorb
    >>> rng = np.random.default_rng(0)
    >>> q_abs = mla_absorb(rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 2)),
    ...                    rng.normal(size=(3, 7, 5)))
    >>> q_abs.shape
    (2, 3, 4, 9)
    """
    dt = resolve_dtype(dtype, q_nope, q_pe, w_uk)
    q_nope, q_pe, w_uk = (
        as_float("q_nope", q_nope, dt),
        as_float("q_pe", q_pe, dt),
        as_float("w_uk", w_uk, dt),
    )
    _check_q_pair(q_nope, q_pe)
    _check_w_uk(w_uk, q_nope)
    q_lat = q_nope @ w_uk.swapaxes(1, 2)  # (B, H, T, d_nope) @ (H, d_nope, d_c) -> (B, H, T, d_c)
    return np.concatenate([q_lat, q_pe], axis=-1)  # (B, H, T, d_c + d_rope)   (D5)


def mla_absorb_backward(
    dout: ArrayLike,
    q_nope: ArrayLike,
    q_pe: ArrayLike,
    w_uk: ArrayLike,
    *,
    dtype: DTypeLike | None = None,
) -> MLAAbsorbGrads:
    r"""Gradients of :func:`mla_absorb`, (D13) of ``docs/derivations/mla.md``.

    Parameters
    ----------
    dout : array_like, shape (B, H, T, d_c + d_rope)
        Gradient of the loss with respect to ``q_abs``.
    q_nope, q_pe, w_uk
        The forward's inputs.
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    MLAAbsorbGrads
        ``dq_nope = dout[..., :d_c] @ w_uk[h]``, ``dq_pe = dout[..., d_c:]`` and
        ``dw_uk[h] = sum_b dout[b, h, :, :d_c]^T @ q_nope[b, h]``, (D13): the matrix product's
        backward, (L2)-(L3) of ``docs/derivations/linear.md``, for ``w_uk[h]^T``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.mla import mla_absorb_backward
    >>> rng = np.random.default_rng(0)
    >>> g = mla_absorb_backward(rng.normal(size=(2, 3, 4, 9)), rng.normal(size=(2, 3, 4, 5)),
    ...                         rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(3, 7, 5)))
    >>> g.dq_nope.shape, g.dq_pe.shape, g.dw_uk.shape
    ((2, 3, 4, 5), (2, 3, 4, 2), (3, 7, 5))
    """
    dt = resolve_dtype(dtype, dout, q_nope, q_pe, w_uk)
    q_nope, q_pe, w_uk = (
        as_float("q_nope", q_nope, dt),
        as_float("q_pe", q_pe, dt),
        as_float("w_uk", w_uk, dt),
    )
    _check_q_pair(q_nope, q_pe)
    _check_w_uk(w_uk, q_nope)
    d_c = w_uk.shape[1]
    dout = as_float("dout", dout, dt)
    _check_cotangent("dout", dout, q_nope.shape[:3] + (d_c + q_pe.shape[3],), Q_ABS)
    dq_lat = dout[..., :d_c]  # (B, H, T, d_c)
    dq_nope = dq_lat @ w_uk  # (B, H, T, d_c) @ (H, d_c, d_nope) -> (B, H, T, d_nope)   (D13)
    dq_pe = dout[..., d_c:].copy()  # (B, H, T, d_rope)   (D13)
    # (B, H, d_c, T) @ (B, H, T, d_nope) -> (B, H, d_c, d_nope), summed over B   (D13)
    dw_uk = (dq_lat.swapaxes(2, 3) @ q_nope).sum(axis=0)
    return MLAAbsorbGrads(dq_nope=dq_nope, dq_pe=dq_pe, dw_uk=dw_uk)


def _absorbed_forward(
    q_abs: Any, kv_latent: Any, d_v: Any, scale: Any, given: AttentionOptions, where: str
) -> tuple[int, AttentionTrace]:
    """``d_v`` and the trace of multi-query attention over the latent cache, (D6)."""
    dt = given.compute_dtype(q_abs, kv_latent)
    q_abs, kv_latent, d_v = _absorbed_inputs(q_abs, kv_latent, d_v, dt)
    opts = given.replace(scale=_absorbed_scale(scale, given, where, q_abs.shape[3]))
    k = kv_latent[:, None]  # (B, 1, S, d_c + d_rope): one key head for all H query heads
    v = k[..., :d_v]  # (B, 1, S, d_v): the value is the latent's first d_v columns   (D6)
    return d_v, sdpa_forward(q_abs, k, v, options=opts)  # (A1)-(A7) with Hkv = 1


def mla_attention_absorbed(
    q_abs: ArrayLike,
    kv_latent: ArrayLike,
    d_v: int,
    *,
    scale: float = REQUIRED,
    options: AttentionOptions | None = None,
    return_lse: bool = False,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Multi-head latent attention, absorbed form: multi-query attention over the latent cache.

    Parameters
    ----------
    q_abs : array_like, shape (B, H, T, d_c + d_rope)
        Absorbed queries, :func:`mla_absorb`.
    kv_latent : array_like, shape (B, S, d_c + d_rope)
        The latent cache ``[c_kv, k_pe]`` (concatenated along the last axis): one key/value head
        shared by all query heads, as FlashMLA's cache holds it (``num_heads_k = 1``).
    d_v : int
        Value width: the value is ``kv_latent[..., :d_v]`` (FlashMLA's ``head_dim_v``); ``d_c``
        for MLA (512 in DeepSeek-V3).
    scale : float
        **Required**, keyword-only: the naive form's ``1 / sqrt(d_nope + d_rope)`` (times a
        YaRN ``mscale**2``), *not* ``1 / sqrt(d_c + d_rope)``, the default of a kernel that reads
        it off the absorbed query's width, (D7). Omitting it is a ``TypeError`` (a
        ``scale`` in ``options`` counts as given).
    options : AttentionOptions, optional
        The attention options as one object.
    return_lse : bool, default False
        Also return the log-sum-exp, (B, H, T): equal to the naive form's (the same logits).
    **kwargs
        Any other field of :class:`~attention_ref.AttentionOptions`, applied to the (B, H, T, S)
        scores as in the naive form (``causal``, ``align``, ``window``, ``softcap``, ``mask``,
        ``bias``, ``sinks``, ...).

    Returns
    -------
    o_lat : ndarray, shape (B, H, T, d_v)
        The latent output ``P_h @ c_kv``; :func:`mla_unabsorb` maps it to the naive form's
        output, (D6).
    lse : ndarray, shape (B, H, T)
        Only with ``return_lse=True``.

    Notes
    -----
    .. math::
        \hat o_h = \operatorname{attention}(\hat q_h,\ L,\ L_{:, :d_v}),\qquad
        L = [C,\ R]\quad\text{(D5)-(D6)}

    with the scores :math:`\sigma\, \hat q_h L^\top = \sigma\, q_h k_h^\top` of the naive form,
    (D4), so weights, log-sum-exp and every option act identically. Default scales of the
    interfaces (``docs/derivations/mla.md``, "The scale"): FlashMLA's ``flash_mla_with_kvcache``
    defaults ``softmax_scale`` to ``q.shape[-1] ** (-0.5)`` = 1/sqrt(576) for DeepSeek-V3,
    which its callers override (vLLM's ``FlashMLAImpl`` passes ``softmax_scale=self.scale``);
    Hugging Face's ``DeepseekV3Attention`` and DeepSeek-V3's ``MLA`` use
    ``qk_head_dim ** -0.5`` = 1/sqrt(192) (times ``mscale**2`` under YaRN) in both forms.

    Examples
    --------
    >>> import math
    >>> import numpy as np
    >>> from attention_ref.variants.mla import (
    ...     mla_absorb, mla_attention_absorbed, mla_attention_naive, mla_unabsorb)
    >>> rng = np.random.default_rng(0)
    >>> B, H, T, S, d_nope, d_rope, d_c, Dv = 2, 3, 2, 5, 4, 2, 6, 3
    >>> q_nope, q_pe = rng.normal(size=(B, H, T, d_nope)), rng.normal(size=(B, H, T, d_rope))
    >>> c_kv, k_pe = rng.normal(size=(B, S, d_c)), rng.normal(size=(B, S, d_rope))
    >>> w_uk, w_uv = rng.normal(size=(H, d_c, d_nope)), rng.normal(size=(H, d_c, Dv))
    >>> o_lat = mla_attention_absorbed(mla_absorb(q_nope, q_pe, w_uk),
    ...                                np.concatenate([c_kv, k_pe], axis=-1), d_c,
    ...                                scale=1 / math.sqrt(d_nope + d_rope), causal=True)
    >>> naive = mla_attention_naive(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, causal=True)
    >>> bool(np.allclose(mla_unabsorb(o_lat, w_uv), naive, rtol=1e-12, atol=1e-14))
    True
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("mla_attention_absorbed")
    _, trace = _absorbed_forward(q_abs, kv_latent, d_v, scale, given, "mla_attention_absorbed")
    _check_return_lse(return_lse)
    return (trace.out, trace.logsumexp) if return_lse else trace.out


def mla_attention_absorbed_backward(
    dout: ArrayLike,
    q_abs: ArrayLike,
    kv_latent: ArrayLike,
    d_v: int,
    *,
    scale: float = REQUIRED,
    options: AttentionOptions | None = None,
    dlse: ArrayLike | None = None,
    **kwargs: Any,
) -> MLAAbsorbedGrads:
    r"""Gradients of :func:`mla_attention_absorbed`: ``(dq_abs, dkv_latent)``.

    Recomputes the forward, runs :func:`~attention_ref.sdpa_backward` with one key/value head
    ((A8)-(A19) of ``docs/derivations/attention.md``: ``dk`` and ``dv`` sum over the H query
    heads, (A9) and (A16)), then adds the two roles of the latent, (D12) of
    ``docs/derivations/mla.md``: ``dkv_latent = dk + [dv, 0]``.

    Parameters
    ----------
    dout : array_like, shape (B, H, T, d_v)
        Gradient of the loss with respect to ``o_lat``.
    q_abs, kv_latent, d_v, scale, options, **kwargs
        The forward's inputs and options, as for :func:`mla_attention_absorbed`; ``scale`` is
        required here too.
    dlse : array_like, shape (B, H, T), optional
        Gradient with respect to the log-sum-exp ``return_lse=True`` returned, (A17).

    Returns
    -------
    MLAAbsorbedGrads
        ``(dq_abs, dkv_latent)`` of shapes (B, H, T, d_c + d_rope) and (B, S, d_c + d_rope);
        ``.dbias`` and ``.dsinks`` as for :class:`MLAGrads`.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.mla import mla_attention_absorbed_backward
    >>> rng = np.random.default_rng(0)
    >>> q_abs, kv_latent = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 5, 8))
    >>> dq_abs, dkv_latent = mla_attention_absorbed_backward(
    ...     rng.normal(size=(2, 3, 4, 6)), q_abs, kv_latent, 6, scale=0.4, causal=True)
    >>> dq_abs.shape, dkv_latent.shape
    ((2, 3, 4, 8), (2, 5, 8))
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("mla_attention_absorbed_backward")
    require_forward_dropout_mask(given.dropout_mask, "the same keep-mask in both calls")
    d_v, trace = _absorbed_forward(
        q_abs, kv_latent, d_v, scale, given, "mla_attention_absorbed_backward"
    )
    g = sdpa_backward(dout, trace, dlse)  # dq (B,H,T,Dl), dk (B,1,S,Dl), dv (B,1,S,d_v)
    dkv_latent = np.ascontiguousarray(g.dk[:, 0])  # (B, S, d_c + d_rope): the key's role
    dkv_latent[..., :d_v] += g.dv[:, 0]  # plus the value's role, (B, S, d_v)   (D12)
    return MLAAbsorbedGrads(g.dq, dkv_latent, dbias=g.dbias, dsinks=g.dsinks)


def _unabsorb_inputs(o_lat: Any, w_uv: Any, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    o_lat, w_uv = as_float("o_lat", o_lat, dt), as_float("w_uv", w_uv, dt)
    _check_ndim("o_lat", o_lat, 4, O_LAT)
    _check_w_uv(w_uv, o_lat.shape[1], o_lat.shape[3], "o_lat (H, and its width d_v = d_c)")
    return o_lat, w_uv


def mla_unabsorb(
    o_lat: ArrayLike, w_uv: ArrayLike, *, dtype: DTypeLike | None = None
) -> np.ndarray:
    r"""Apply the value up-projection to the latent output: ``out_h = o_lat_h @ w_uv[h]``.

    Parameters
    ----------
    o_lat : array_like, shape (B, H, T, d_c)
        What :func:`mla_attention_absorbed` returned with ``d_v = d_c``.
    w_uv : array_like, shape (H, d_c, Dv)
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    ndarray, shape (B, H, T, Dv)
        The naive form's output, (D6) of ``docs/derivations/mla.md``.

    Notes
    -----
    vLLM's ``MLACommonBaseImpl._v_up_proj`` computes ``torch.bmm(x, W_UV)`` with ``W_UV``
    ``(H, d_c, Dv)``, this ``w_uv`` (``vllm/v1/attention/backends/mla/common.py``).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.mla import mla_unabsorb
    >>> rng = np.random.default_rng(0)
    >>> mla_unabsorb(rng.normal(size=(2, 3, 4, 6)), rng.normal(size=(3, 6, 5))).shape
    (2, 3, 4, 5)
    """
    o_lat, w_uv = _unabsorb_inputs(o_lat, w_uv, resolve_dtype(dtype, o_lat, w_uv))
    return o_lat @ w_uv  # (B, H, T, d_c) @ (H, d_c, Dv) -> (B, H, T, Dv)   (D6)


def mla_unabsorb_backward(
    dout: ArrayLike, o_lat: ArrayLike, w_uv: ArrayLike, *, dtype: DTypeLike | None = None
) -> MLAUnabsorbGrads:
    r"""Gradients of :func:`mla_unabsorb`, (D14) of ``docs/derivations/mla.md``.

    Parameters
    ----------
    dout : array_like, shape (B, H, T, Dv)
        Gradient of the loss with respect to the output.
    o_lat, w_uv
        The forward's inputs.
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    MLAUnabsorbGrads
        ``do_lat = dout @ w_uv[h]^T`` and ``dw_uv[h] = sum_b o_lat[b, h]^T @ dout[b, h]``, (D14):
        (L2)-(L3) of ``docs/derivations/linear.md`` per head.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.mla import mla_unabsorb_backward
    >>> rng = np.random.default_rng(0)
    >>> do_lat, dw_uv = mla_unabsorb_backward(rng.normal(size=(2, 3, 4, 5)),
    ...                                       rng.normal(size=(2, 3, 4, 6)),
    ...                                       rng.normal(size=(3, 6, 5)))
    >>> do_lat.shape, dw_uv.shape
    ((2, 3, 4, 6), (3, 6, 5))
    """
    dt = resolve_dtype(dtype, dout, o_lat, w_uv)
    o_lat, w_uv = _unabsorb_inputs(o_lat, w_uv, dt)
    dout = as_float("dout", dout, dt)
    _check_cotangent("dout", dout, o_lat.shape[:3] + (w_uv.shape[2],), "(B, H, T, Dv)")
    do_lat = dout @ w_uv.swapaxes(1, 2)  # (B, H, T, Dv) @ (H, Dv, d_c) -> (B, H, T, d_c)   (D14)
    dw_uv = (o_lat.swapaxes(2, 3) @ dout).sum(axis=0)  # (B, H, d_c, Dv) summed over B   (D14)
    return MLAUnabsorbGrads(do_lat=do_lat, dw_uv=dw_uv)


# ----------------------------------------------------------------------------- weights


def mla_split_kv_b_proj(
    weight: ArrayLike, num_heads: int, qk_nope_head_dim: int, v_head_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(w_uk, w_uv)`` from a PyTorch ``kv_b_proj.weight`` (Hugging Face / DeepSeek layout).

    Parameters
    ----------
    weight : array_like, shape (H * (d_nope + Dv), d_c)
        ``kv_b_proj.weight`` of Hugging Face's ``DeepseekV3Attention`` (``nn.Linear(d_c,
        H * (d_nope + Dv))``, which stores ``(out, in)``), ``wkv_b.weight`` of DeepSeek-V3's
        ``MLA``: its output, viewed ``(..., H, d_nope + Dv)``, is each head's ``[k_nope, v]``.
    num_heads, qk_nope_head_dim, v_head_dim : int
        H, d_nope and Dv (the config's ``num_attention_heads``, ``qk_nope_head_dim``,
        ``v_head_dim``).

    Returns
    -------
    w_uk : ndarray, shape (H, d_c, d_nope)
    w_uv : ndarray, shape (H, d_c, Dv)
        With ``c_kv @ weight.T`` viewed ``(B, S, H, d_nope + Dv)`` and split equal to
        ``[c_kv @ w_uk[h], c_kv @ w_uv[h]]`` for every head h.

    Notes
    -----
    The frameworks' views of the same array: DeepSeek-V3's absorbed path reads
    ``wkv_b.view(H, -1, d_c)``, taking ``[:, :d_nope]`` (``w_uk.swapaxes(1, 2)``) and
    ``[:, -Dv:]`` (``w_uv.swapaxes(1, 2)``); vLLM's ``process_weights_after_loading`` views
    ``weight.T`` as ``(d_c, H, d_nope + Dv)``, keeping ``W_UK_T = w_uk.swapaxes(1, 2)`` and
    ``W_UV = w_uv``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.mla import mla_split_kv_b_proj
    >>> w_uk, w_uv = mla_split_kv_b_proj(np.zeros((3 * (4 + 5), 6)), 3, 4, 5)
    >>> w_uk.shape, w_uv.shape
    ((3, 6, 4), (3, 6, 5))
    """
    dt = resolve_dtype(None, weight)
    weight = as_float("weight", weight, dt)
    H = check_positive_int("num_heads", num_heads)
    d_nope = check_positive_int("qk_nope_head_dim", qk_nope_head_dim)
    Dv = check_positive_int("v_head_dim", v_head_dim)
    if weight.ndim != 2 or weight.shape[0] != H * (d_nope + Dv):
        raise ValueError(
            "weight must have shape (H * (d_nope + Dv), d_c) = "
            f"({H} * ({d_nope} + {Dv}) = {H * (d_nope + Dv)}, d_c), nn.Linear's (out, in); got "
            f"shape {weight.shape}"
        )
    per_head = weight.reshape(H, d_nope + Dv, weight.shape[1])  # (H, d_nope + Dv, d_c)
    w_uk = per_head[:, :d_nope].swapaxes(1, 2).copy()  # (H, d_c, d_nope)
    w_uv = per_head[:, d_nope:].swapaxes(1, 2).copy()  # (H, d_c, Dv)
    return w_uk, w_uv
