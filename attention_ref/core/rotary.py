r"""Rotary position embeddings (RoPE): the cos/sin tables, the rotation, and its backward.

RoPE rotates each pair of query (or key) features by an angle proportional to the token's
position, so that the score of a query at position ``p`` and a key at position ``p'`` depends on
the positions through ``p' - p`` only (R9). Three functions:

* :func:`rotary_cos_sin` -- the tables ``cos``, ``sin`` of shape ``positions.shape +
  (rotary_dim // 2,)`` from the inverse frequencies (R1)-(R2), optionally scaled as Hugging Face
  transformers' ``rope_type`` "linear", "llama3" or "yarn" do it (R10)-(R14);
  :func:`rotary_inv_freq` returns the inverse frequencies and the attention factor alone;
* :func:`apply_rotary` -- the rotation (R3) of the first ``rotary_dim = 2 * cos.shape[-1]``
  features of ``x`` with either pairing (R4), the rest passed through (R5);
* :func:`apply_rotary_backward` -- its transpose, the rotation by minus the angle (R7).

The tables are FlashAttention's (``flash_attn/layers/rotary.py``: ``cos, sin`` of shape
``(seqlen, rotary_dim / 2)``); Hugging Face's ``LlamaRotaryEmbedding`` returns the same values
duplicated along the last axis, ``concatenate([cos, cos], -1)`` (R6).

Derivation and sources: ``docs/derivations/rotary.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._validate import as_float, check_broadcastable, check_real_scalar, resolve_dtype

__all__ = ["apply_rotary", "apply_rotary_backward", "rotary_cos_sin", "rotary_inv_freq"]

#: The ``rope_type`` values of ``scaling`` this module computes.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: Rope types of transformers' ``ROPE_INIT_FUNCTIONS`` that are not computed here, and why.
UNSUPPORTED_ROPE_TYPES = {
    "dynamic": "its frequencies depend on the current sequence length (seq_len)",
    "longrope": "it needs per-frequency short/long factor lists and the sequence length",
    "proportional": "it returns head_dim // 2 frequencies, zero past the rotated ones",
}
#: Keys of a ``scaling`` dict accepted for each rope type: (required, optional). ``rope_type``
#: (or the legacy ``type``), ``rope_theta`` (checked against ``base``) and
#: ``partial_rotary_factor`` (already applied: ``rotary_dim`` is the rotated width) are accepted
#: for every type.
SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        (),
    ),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}
COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")

COS_LAYOUT = "(..., T, rotary_dim // 2)"
X_LAYOUT = "(..., T, Dk)"


# ----------------------------------------------------------------------------- frequencies


def _check_rotary_dim(rotary_dim: Any) -> int:
    if isinstance(rotary_dim, (bool, np.bool_)) or not isinstance(rotary_dim, numbers.Integral):
        raise TypeError(f"rotary_dim must be an even int >= 2; got {rotary_dim!r}")
    rotary_dim = int(rotary_dim)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(
            f"rotary_dim must be an even int >= 2 (features are rotated in pairs); got {rotary_dim}"
        )
    return rotary_dim


def _check_base(base: Any) -> float:
    base = check_real_scalar("base", base, positive=True)
    if base <= 1.0:
        raise ValueError(
            f"base must be > 1 (the inverse frequencies base**(-2i/rotary_dim) must decrease); "
            f"got {base}"
        )
    return base


def _scaling_params(scaling: Any, base: float) -> tuple[str, dict[str, Any]]:
    """``(rope_type, {key: value})`` of a validated ``scaling`` dict (None: no scaling)."""
    if scaling is None:
        return "default", {}
    if not isinstance(scaling, Mapping):
        raise TypeError(
            "scaling must be None or a dict such as {'rope_type': 'linear', 'factor': 2.0} "
            f"(transformers' rope_scaling / rope_parameters); got {type(scaling).__name__}"
        )
    # transformers' rule: rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if "rope_type" in scaling and "type" in scaling and scaling["type"] != rope_type:
        raise ValueError(
            f"scaling has rope_type={scaling['rope_type']!r} and the legacy type="
            f"{scaling['type']!r}; they must agree (or give only rope_type)"
        )
    if isinstance(rope_type, str) and rope_type in UNSUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"scaling['rope_type'] = {rope_type!r} is not supported: "
            f"{UNSUPPORTED_ROPE_TYPES[rope_type]}; supported: {ROPE_TYPES}"
        )
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ValueError(f"scaling['rope_type'] must be one of {ROPE_TYPES}; got {rope_type!r}")
    required, optional = SCALING_KEYS[rope_type]
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ValueError(
            f"scaling with rope_type={rope_type!r} is missing the required key(s) {missing}; "
            f"required: {list(required)}, optional: {list(optional)}"
        )
    unknown = sorted(str(k) for k in scaling if k not in required + optional + COMMON_KEYS)
    if unknown:
        raise ValueError(
            f"scaling with rope_type={rope_type!r} has unrecognised key(s) {unknown}; "
            f"required: {list(required)}, optional: {list(optional)}"
        )
    theta = scaling.get("rope_theta")
    if (
        theta is not None
        and check_real_scalar("scaling['rope_theta']", theta, positive=True) != base
    ):
        raise ValueError(
            f"scaling['rope_theta'] = {theta} differs from base = {base}; pass base={theta} "
            "(or drop rope_theta from scaling)"
        )
    return rope_type, {k: scaling[k] for k in required + optional if k in scaling}


def _positive(params: Mapping[str, Any], key: str) -> float:
    return check_real_scalar(f"scaling[{key!r}]", params[key], positive=True)


def _llama3(inv_freq: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
    """(R11): transformers' ``_compute_llama3_parameters``, on float64 inverse frequencies."""
    factor = _positive(p, "factor")
    low, high = _positive(p, "low_freq_factor"), _positive(p, "high_freq_factor")
    old_context_len = _positive(p, "original_max_position_embeddings")
    if high <= low:
        raise ValueError(
            "scaling['high_freq_factor'] must be > scaling['low_freq_factor'] (the smoothing "
            f"divides by their difference); got high_freq_factor={high}, low_freq_factor={low}"
        )
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq  # (r/2,)
    # long wavelengths (low frequencies) are divided by the factor, short ones kept
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)  # (r/2,)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn(inv_freq: np.ndarray, rotary_dim: int, base: float, p: Mapping[str, Any]):
    """(R12)-(R14): transformers' ``_compute_yarn_parameters``; ``(inv_freq, attention_factor)``."""
    factor = _positive(p, "factor")
    original_max = _positive(p, "original_max_position_embeddings")
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    for key in ("mscale", "mscale_all_dim"):
        if p.get(key) is not None:
            check_real_scalar(f"scaling[{key!r}]", p[key], positive=False)

    def get_mscale(scale: float, m: float = 1.0) -> float:  # transformers' yarn_get_mscale
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:  # (R14)
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    else:
        attention_factor = _positive(p, "attention_factor")
    # `or`: a None or 0 gives the paper's default, as in transformers
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1
    beta_fast = check_real_scalar("scaling['beta_fast']", beta_fast, positive=True)
    beta_slow = check_real_scalar("scaling['beta_slow']", beta_slow, positive=True)
    truncate = p.get("truncate", True)
    if not isinstance(truncate, (bool, np.bool_)):
        raise TypeError(f"scaling['truncate'] must be a bool; got {truncate!r}")

    def correction_dim(num_rotations: float) -> float:  # (R12)
        return (rotary_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # transformers' "Prevent singularity"
    ramp = np.clip((np.arange(rotary_dim // 2) - low) / (high - low), 0.0, 1.0)  # (r/2,) (R13)
    # ramp 0: extrapolation (the original frequency); ramp 1: interpolation (divided by factor)
    blended = (inv_freq / factor) * ramp + inv_freq * (1.0 - ramp)  # (R13)
    return blended, float(attention_factor)


def rotary_inv_freq(
    rotary_dim: int, base: float = 10000.0, scaling: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, float]:
    r"""The inverse frequencies of RoPE and the attention factor that multiplies cos and sin.

    The pair ``(inv_freq, attention_factor)`` that transformers' ``ROPE_INIT_FUNCTIONS[rope_type]``
    return (``src/transformers/modeling_rope_utils.py``), computed in float64.

    Parameters
    ----------
    rotary_dim : int
        Number of rotated features, even, ``>= 2`` (``int(head_dim * partial_rotary_factor)``).
    base : float, default 10000.0
        The base ``theta`` of (R1) (transformers' ``rope_theta``), ``> 1``.
    scaling : dict, optional
        A transformers ``rope_scaling`` / ``rope_parameters`` dict; see :func:`rotary_cos_sin`.

    Returns
    -------
    inv_freq : ndarray of float64, shape (rotary_dim // 2,)
        (R1), scaled by (R10), (R11) or (R13).
    attention_factor : float
        1.0, except for ``"yarn"``: (R14).

    Notes
    -----
    (R1)-(R2) and (R10)-(R14) of ``docs/derivations/rotary.md``.

    Examples
    --------
    >>> from attention_ref.core.rotary import rotary_inv_freq
    >>> rotary_inv_freq(4, base=100.0)
    (array([1. , 0.1]), 1.0)
    >>> rotary_inv_freq(4, base=100.0, scaling={"rope_type": "linear", "factor": 2.0})
    (array([0.5 , 0.05]), 1.0)
    """
    rotary_dim = _check_rotary_dim(rotary_dim)
    base = _check_base(base)
    rope_type, params = _scaling_params(scaling, base)
    inv_freq = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))  # (R1)
    if rope_type == "linear":
        return inv_freq / _positive(params, "factor"), 1.0  # (R10)
    if rope_type == "llama3":
        return _llama3(inv_freq, params), 1.0  # (R11)
    if rope_type == "yarn":
        return _yarn(inv_freq, rotary_dim, base, params)  # (R12)-(R14)
    return inv_freq, 1.0


def rotary_cos_sin(
    positions: ArrayLike,
    rotary_dim: int,
    base: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The cos and sin tables of RoPE for the given positions, (R1)-(R2).

    Parameters
    ----------
    positions : array_like of int or float, any shape
        Token positions: ``arange(T)``, or ``(B, T)`` for per-sequence positions (see the
        example). Finite.
    rotary_dim : int
        Number of rotated features, even, ``>= 2``; at most the head width ``Dk`` of the ``x``
        that :func:`apply_rotary` rotates (``Dk - rotary_dim`` features pass through).
    base : float, default 10000.0
        The base ``theta`` of (R1) (transformers' ``rope_theta``), ``> 1``.
    scaling : dict, optional
        None for plain RoPE, or a dict as in transformers' ``config.rope_scaling`` /
        ``config.rope_parameters``, with ``"rope_type"`` (or the legacy ``"type"``):

        * ``{"rope_type": "default"}``: no scaling;
        * ``{"rope_type": "linear", "factor": f}``: position interpolation, angles of positions
          ``/ f`` (``_compute_linear_scaling_rope_parameters``: ``inv_freq /= factor``), (R10);
        * ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
          "original_max_position_embeddings"}``: Llama 3.1's per-frequency rule
          (``_compute_llama3_parameters``): wavelengths ``2 pi / inv_freq`` above
          ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``,
          those below ``original_max_position_embeddings / high_freq_factor`` kept, the band
          between smoothed, (R11);
        * ``{"rope_type": "yarn", "factor", "original_max_position_embeddings"}``, optional
          ``"beta_fast"`` (32), ``"beta_slow"`` (1), ``"mscale"``, ``"mscale_all_dim"``,
          ``"attention_factor"``, ``"truncate"`` (True): YaRN (``_compute_yarn_parameters``):
          inverse frequencies blended between ``inv_freq`` and ``inv_freq / factor`` by a linear
          ramp over the correction range, (R12)-(R13); cos and sin multiplied by the attention
          factor, ``0.1 ln(factor) + 1`` by default or ``yarn_get_mscale(factor, mscale) /
          yarn_get_mscale(factor, mscale_all_dim)`` when both are given and non-zero, (R14), as
          ``LlamaRotaryEmbedding.forward`` applies it (``emb.cos() * self.attention_scaling``).

        ``"rope_theta"`` may be in the dict if it equals ``base``; ``"partial_rotary_factor"`` is
        accepted and ignored (``rotary_dim`` is already the rotated width). Other keys, missing
        required keys and other rope types raise ValueError.

    Returns
    -------
    cos, sin : ndarray of float64, shape ``positions.shape + (rotary_dim // 2,)``
        ``m cos(p * inv_freq[i])`` and ``m sin(p * inv_freq[i])``, (R2), with ``m`` the attention
        factor (1 but for YaRN). FlashAttention's layout; Hugging Face's tables are
        ``concatenate([cos, cos], -1)``.

    Raises
    ------
    ValueError
        An odd or too small ``rotary_dim``, ``base <= 1``, non-finite positions, an unknown or
        unsupported ``rope_type``, missing or unrecognised ``scaling`` keys, bad values.
    TypeError
        Non-numeric positions, a non-int ``rotary_dim``, a ``scaling`` that is not a dict.

    Notes
    -----
    .. math::
        \omega_i = \theta^{-2i/r}\ \text{(R1)},\qquad
        c_{p,i} = m \cos(p\,\omega_i),\quad s_{p,i} = m \sin(p\,\omega_i)\ \text{(R2)}

    Angles are computed in float64; a kernel that forms ``p * inv_freq`` in float32
    (transformers' ``position_ids.float()``) differs by a few times ``|p * inv_freq| * 6e-8``. See
    ``docs/derivations/rotary.md`` for the scaling rules (R10)-(R14) and their sources.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.rotary import rotary_cos_sin
    >>> cos, sin = rotary_cos_sin(np.arange(3), rotary_dim=4)
    >>> cos.shape
    (3, 2)
    >>> np.round(sin[1], 4)                   # sin(1 * 10000 ** (-2i / 4)), i = 0, 1
    array([0.8415, 0.01  ])

    Per-sequence position offsets (a KV cache, FlashAttention's ``seqlen_offsets``): positions
    ``(B, T)``, and an axis for the heads so the tables broadcast against ``x`` ``(B, H, T, Dk)``:

    >>> offsets = np.array([0, 7])            # sequence b starts at position offsets[b]
    >>> cos, sin = rotary_cos_sin(offsets[:, None] + np.arange(3), rotary_dim=4)  # (B, T, 2)
    >>> cos[:, None].shape                    # pass cos[:, None], sin[:, None] to apply_rotary
    (2, 1, 3, 2)

    YaRN multiplies both tables by its attention factor, ``0.1 ln 4 + 1`` here:

    >>> yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    >>> cos, sin = rotary_cos_sin([0], 8, scaling=yarn)
    >>> round(float(cos[0, 0]), 6)
    1.138629
    """
    pos = as_float("positions", positions, np.dtype(np.float64))
    if not np.isfinite(pos).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(pos))[0])
        raise ValueError(f"positions must be finite; got {pos[bad]} at index {bad}")
    inv_freq, attention_factor = rotary_inv_freq(rotary_dim, base, scaling)  # (R1), (R10)-(R14)
    angle = pos[..., None] * inv_freq  # positions.shape + (r/2,)   (R2)
    cos, sin = np.cos(angle), np.sin(angle)
    if attention_factor != 1.0:
        cos *= attention_factor  # (R2), (R14)
        sin *= attention_factor
    return cos, sin


# ----------------------------------------------------------------------------- the rotation


def _prepare(
    name: str, x: ArrayLike, cos: ArrayLike, sin: ArrayLike, interleaved: Any, dtype: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Validated ``(x, cos, sin, rotary_dim // 2)`` in the compute dtype."""
    if not isinstance(interleaved, (bool, np.bool_)):
        raise TypeError(
            f"interleaved must be a bool (True: pairs (2i, 2i+1); False: pairs (i, i + r/2)); "
            f"got {interleaved!r}"
        )
    dt = resolve_dtype(dtype, x, cos, sin)
    x = as_float(name, x, dt)
    cos = as_float("cos", cos, dt)
    sin = as_float("sin", sin, dt)
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape {X_LAYOUT}; got a scalar")
    if cos.ndim < 1:
        raise ValueError(f"cos must have shape {COS_LAYOUT}; got a scalar")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape; got {cos.shape} and {sin.shape}")
    half = cos.shape[-1]
    if half < 1:
        raise ValueError(
            f"cos must have rotary_dim // 2 >= 1 entries on its last axis; got shape {cos.shape}"
        )
    if 2 * half > x.shape[-1]:
        raise ValueError(
            f"rotary_dim = 2 * cos.shape[-1] = {2 * half} exceeds {name}'s last dim "
            f"Dk = {x.shape[-1]} ({name} shape {x.shape}, cos shape {cos.shape})"
        )
    target = x.shape[:-1] + (half,)
    check_broadcastable("cos", cos, target, f"{name}.shape[:-1] + (rotary_dim // 2,)")
    return x, cos, sin, half


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, half: int, interleaved: bool):
    """(R3)-(R5) on validated arrays: a new array; ``sin -> -sin`` gives the transpose (R7)."""
    out = x.copy()  # (..., T, Dk); features r: pass through unchanged   (R5)
    r = 2 * half
    # (R4): the pair of feature i is (2i, 2i + 1) interleaved, (i, i + r/2) otherwise
    first, second = (
        (slice(0, r, 2), slice(1, r, 2)) if interleaved else (slice(0, half), slice(half, r))
    )
    a, b = x[..., first], x[..., second]  # (..., T, r/2) each, views of x
    out[..., first] = a * cos - b * sin  # (R3)
    out[..., second] = a * sin + b * cos  # (R3)
    return out


def apply_rotary(
    x: ArrayLike,
    cos: ArrayLike,
    sin: ArrayLike,
    interleaved: bool = False,
    *,
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    r"""Rotate the first ``rotary_dim = 2 * cos.shape[-1]`` features of ``x`` in pairs, (R3).

    Parameters
    ----------
    x : array_like, shape (..., T, Dk)
        Queries ``(..., H, T, Dk)`` or keys ``(..., Hkv, S, Dk)`` (any leading dims; the
        second-to-last axis is the positions); ``Dk >= rotary_dim``.
    cos, sin : array_like, shape (T, rotary_dim // 2) or (..., T, rotary_dim // 2)
        The tables of :func:`rotary_cos_sin`, one shape, broadcastable to
        ``x.shape[:-1] + (rotary_dim // 2,)`` (e.g. ``(B, 1, T, r/2)`` for positions per
        sequence).
    interleaved : bool, default False
        False: feature ``i`` pairs with ``i + rotary_dim / 2`` (GPT-NeoX, Hugging Face
        ``rotate_half``, FlashAttention ``interleaved=False``). True: ``2i`` pairs with ``2i + 1``
        (GPT-J, FlashAttention ``interleaved=True``). (R4)
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    ndarray, same shape as ``x``
        A new array: pairs rotated, (R3); features ``rotary_dim:`` equal to ``x``'s, (R5).

    Notes
    -----
    For pair ``(a, b)`` of frequency ``i``:

    .. math::
        y_a = c_i\, x_a - s_i\, x_b,\qquad y_b = s_i\, x_a + c_i\, x_b \qquad \text{(R3)}

    which is FlashAttention's ``x * cos + rotate_half(x, interleaved) * sin`` and Hugging Face's
    ``q * cos + rotate_half(q) * sin``, (R6). See ``docs/derivations/rotary.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.rotary import apply_rotary
    >>> x = np.array([[1.0, 0.0, 0.0, 0.0, 5.0]])        # (T=1, Dk=5)
    >>> cos, sin = np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])  # angles 90 and 0 degrees
    >>> apply_rotary(x, cos, sin)                        # pair (0, 2) turns, 5.0 passes through
    array([[0., 0., 1., 0., 5.]])
    >>> apply_rotary(x, cos, sin, interleaved=True)      # pair (0, 1) turns
    array([[0., 1., 0., 0., 5.]])
    """
    x, cos, sin, half = _prepare("x", x, cos, sin, interleaved, dtype)
    return _rotate(x, cos, sin, half, bool(interleaved))  # (R3)-(R5)


def apply_rotary_backward(
    dout: ArrayLike,
    cos: ArrayLike,
    sin: ArrayLike,
    interleaved: bool = False,
    *,
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    r"""Gradient of :func:`apply_rotary` with respect to ``x``: the transposed rotation, (R7).

    The rotation is linear in ``x`` with a block-diagonal Jacobian of 2x2 blocks
    ``[[c, -s], [s, c]]``; its transpose ``[[c, s], [-s, c]]`` is the same rotation with ``sin``
    negated (by minus the angle: the inverse when ``c^2 + s^2 = 1``), and the pass-through
    features get ``dout`` unchanged, (R8). FlashAttention's ``ApplyRotaryEmb.backward`` does the
    same (``apply_rotary(..., conjugate=True)``, which negates ``sin``). Derivation:
    ``docs/derivations/rotary.md``, (R7)-(R8).

    Only ``dx`` is returned: ``cos`` and ``sin`` are treated as constants (they are functions of
    the positions, not trained); their gradients are written out on the derivation page.

    Parameters
    ----------
    dout : array_like, shape (..., T, Dk)
        Gradient with respect to the forward's output.
    cos, sin : array_like
        The forward's tables.
    interleaved : bool, default False
        The forward's pairing, (R4).
    dtype : dtype, optional
        Compute dtype; float64 when omitted.

    Returns
    -------
    ndarray, same shape as ``dout``
        ``dx``, a new array.

    Notes
    -----
    .. math::
        dx_a = c_i\, dy_a + s_i\, dy_b,\qquad dx_b = -s_i\, dy_a + c_i\, dy_b \qquad \text{(R7)}

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.rotary import apply_rotary, apply_rotary_backward, rotary_cos_sin
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 6))   # (H, T, Dk)
    >>> cos, sin = rotary_cos_sin(np.arange(3), rotary_dim=4)
    >>> y = apply_rotary(x, cos, sin)
    >>> bool(np.allclose(apply_rotary_backward(y, cos, sin), x))  # orthogonal: R^T R = I
    True
    """
    dout, cos, sin, half = _prepare("dout", dout, cos, sin, interleaved, dtype)
    return _rotate(dout, cos, -sin, half, bool(interleaved))  # (R7)-(R8)
