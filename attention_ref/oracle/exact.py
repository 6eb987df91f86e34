r"""Exact-arithmetic reference: attention forward and backward in mpmath, rounded once to float64.

:func:`exact_sdpa` and :func:`exact_mha` compute scaled dot-product attention and multi-head
attention, and their gradients, in multiple-precision arithmetic (mpmath, ``dps`` significant
decimal digits, 50 by default) from the float64 inputs taken exactly, and round each result to
the nearest float64 once at the end. They are the yardstick for the float64 path itself:
``max|ours - exact| / (eps * max|exact|)`` is its error in units of float64 ``eps``
(``docs/exact.md`` has the measured values).

The arithmetic here is written independently of the NumPy code it judges: plain loops over
(b, h, i, j) that follow the equations of ``docs/derivations/attention.md``, (A1)-(A16), and
``docs/derivations/mha.md``, (M1)-(M10). Only the argument checks and the boolean mask builder
(:func:`~attention_ref.attention_mask`) are shared with the library; the mpmath backward is
itself checked against mpmath central differences in ``tests/test_exact.py``.

mpmath is an optional dependency, imported when one of these functions runs:
``pip install 'attention_ref[exact]'``. It is slow (microseconds per multiply-add), so the
functions refuse shapes above :data:`MAX_MULTIPLY_ADDS` multiply-adds or :data:`MAX_SCORES`
scores, where one call would take more than about 10 s.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ..core._validate import _is_complex, as_float, check_positive_int
from ..core.attention import check_qkv
from ..core.masks import AllowedPairs
from ..core.mha import MultiHeadParams, _check_params, _check_widths
from ..core.options import AttentionOptions

#: The most multiply-adds a call may need in its forward pass: the score and value products
#: ``B*H*T*S*(Dk+Dv)``, plus the four projections for :func:`exact_mha`. Pure-Python mpmath at
#: ``dps=50`` takes 4-7 us per multiply-add of the forward, backward included (measured: 13.5 s
#: for 2.0 M on the 2-core CI machine), so a call at this size takes about 10 s.
MAX_MULTIPLY_ADDS = 1_500_000
#: The most attention scores ``B*H*T*S`` a call may have: each costs an exp (and a tanh with a
#: soft-cap) besides its dot products, about 60 us forward and backward (measured: 5.9 s for
#: 99 856 scores with Dk = Dv = 1).
MAX_SCORES = 100_000
#: The default working precision, in significant decimal digits (about 166 bits).
DEFAULT_DPS = 50
#: The lowest ``dps`` accepted: 30 digits leave 14 digits beyond float64's 16 for the
#: cancellation in the reductions and the softmax backward's row sum, so the rounded float64
#: result is the correctly rounded exact value in practice.
MIN_DPS = 30
#: The highest ``dps`` accepted (cost grows with the digits).
MAX_DPS = 1000

_FLOAT64_MIN_NORMAL = 2.0**-1022
_FLOAT64_MIN_SUBNORMAL_EXP = -1074


class ExactAttention(NamedTuple):
    """The exact result of :func:`exact_sdpa`, each entry the float64 nearest to the mpmath value.

    The gradient fields are None when no ``dout`` was given (``dbias`` also without a bias).
    """

    out: np.ndarray  #: (..., H, T, Dv) output, (A7)
    probs: (
        np.ndarray
    )  #: (..., H, T, S) attention weights before dropout (empty-row policy applied), (A5)
    logsumexp: (
        np.ndarray
    )  #: (..., H, T) log of the sum of exp over the allowed logits; -inf for an empty row
    dq: np.ndarray | None  #: (..., H, T, Dk)
    dk: np.ndarray | None  #: (..., Hkv, S, Dk), summed over the query heads of each group
    dv: np.ndarray | None  #: (..., Hkv, S, Dv), summed over the query heads of each group
    dbias: np.ndarray | None  #: the bias's own shape
    dsinks: np.ndarray | None = None  #: (H,) with ``sinks`` and a ``dout``, else None


class ExactMultiHead(NamedTuple):
    """The exact result of :func:`exact_mha`, each entry the float64 nearest to the mpmath value.

    The gradient fields are None when no ``dout`` was given (``dbias`` also without a bias).
    """

    out: np.ndarray  #: (..., T, D_out) output, (M6)
    probs: np.ndarray  #: (..., H, T, S) attention weights before dropout, (A5)
    logsumexp: (
        np.ndarray
    )  #: (..., H, T) per-row logsumexp of the allowed logits; -inf for an empty row
    dquery: np.ndarray | None  #: (..., T, Dq_in)
    dkey: np.ndarray | None  #: (..., S, Dk_in)
    dvalue: np.ndarray | None  #: (..., S, Dv_in)
    dparams: (
        MultiHeadParams | None
    )  #: gradients of the weights and biases (None where a bias is None)
    dbias: np.ndarray | None  #: the attention bias's own shape


# ----------------------------------------------------------------------------- mpmath plumbing


def _context(dps: Any) -> Any:
    """A private mpmath context at ``dps`` digits (the global ``mpmath.mp`` is left alone)."""
    if isinstance(dps, (bool, np.bool_)) or not isinstance(dps, (int, np.integer)):
        raise TypeError(f"dps must be an int (decimal digits); got {dps!r}")
    if not MIN_DPS <= dps <= MAX_DPS:
        raise ValueError(f"dps must be in [{MIN_DPS}, {MAX_DPS}]; got {int(dps)}")
    try:
        import mpmath
    except ImportError:
        raise ImportError(
            "attention_ref.oracle.exact needs mpmath (>=1.3,<1.4): pip install "
            "'attention_ref[exact]'"
        ) from None
    ctx = mpmath.MPContext()
    ctx.dps = int(dps)
    return ctx


def _to_mp(ctx: Any, a: np.ndarray) -> np.ndarray:
    """An object array of mpf holding the float64 entries of ``a`` exactly."""
    flat = [ctx.mpf(x) for x in np.asarray(a, dtype=np.float64).ravel().tolist()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(np.shape(a))


def _round_one(ctx: Any, x: Any) -> float:
    """The float64 nearest to ``x`` (ties to even), subnormals included."""
    if ctx.isfinite(x) and x != 0 and abs(x) < _FLOAT64_MIN_NORMAL:
        # float(x) would round to 53 bits and then again to the subnormal grid: round once, on it.
        steps = int(ctx.nint(ctx.ldexp(x, -_FLOAT64_MIN_SUBNORMAL_EXP)))
        return math.ldexp(steps, _FLOAT64_MIN_SUBNORMAL_EXP)
    return float(x)  # 53-bit round-to-nearest; inf, -inf and NaN pass through


def _to_float64(ctx: Any, a: np.ndarray) -> np.ndarray:
    """Round an object array of mpf to float64, entry by entry (a new array)."""
    return np.array([_round_one(ctx, x) for x in a.ravel()], dtype=np.float64).reshape(a.shape)


def _mp_full(ctx: Any, shape: tuple[int, ...], value: Any) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    out.fill(value)
    return out


# ----------------------------------------------------------------------------- attention in mp


class _AttentionArgs(NamedTuple):
    """Everything the mp attention needs, validated and converted (object arrays of mpf)."""

    q: np.ndarray  # (N, H, T, Dk)
    k: np.ndarray  # (N, Hkv, S, Dk)
    v: np.ndarray  # (N, Hkv, S, Dv)
    bias: np.ndarray | None  # the bias's own shape
    bias_index: np.ndarray | None  # (N, H, T, S) int: which bias entry each score reads
    allowed: np.ndarray  # (N, H, T, S) bool: may attend (mask, causal, window, finite bias)
    keep_scale: np.ndarray | None  # (N, H, T, S) mpf: keep / (1 - p), or None without dropout
    scale: Any  # mpf
    softcap: Any  # mpf or None
    empty_rows: str
    sinks: np.ndarray | None = None  # (H,) mpf sink logits, or None


class _AttentionForward(NamedTuple):
    probs: np.ndarray  # (N, H, T, S) P, (A5)
    dropped: np.ndarray  # (N, H, T, S) P', (A6)
    logsumexp: np.ndarray  # (N, H, T)
    tanh: np.ndarray | None  # (N, H, T, S) tanh(s / cap) where allowed, for (A14)
    out: np.ndarray  # (N, H, T, Dv), (A7)
    sink_probs: np.ndarray | None = None  # (N, H, T) the sink's weight, (A18), or None


def _attention_forward(ctx: Any, a: _AttentionArgs) -> _AttentionForward:
    """(A1)-(A7) and the sink (A18), one (b, h, i) row at a time."""
    N, H, T, _ = a.q.shape
    Hkv, S, Dv = a.v.shape[1:]
    G = H // Hkv
    zero = ctx.zero
    probs = _mp_full(ctx, (N, H, T, S), zero)
    lse = _mp_full(ctx, (N, H, T), ctx.ninf)
    sink_probs = None if a.sinks is None else _mp_full(ctx, (N, H, T), zero)
    tanh = _mp_full(ctx, (N, H, T, S), zero)  # tanh(s / cap), kept for (A14) when soft-capping
    empty_fill = {"zero": zero, "uniform": ctx.one / S, "nan": ctx.nan}
    bias = None  # (N, H, T, S): the bias broadcast to the scores
    if a.bias is not None and a.bias_index is not None:
        bias = a.bias.reshape(-1)[a.bias_index]
    for n in range(N):
        for h in range(H):
            kv = h // G  # query head h reads key/value head h // G
            for i in range(T):
                logits = {}
                for j in range(S):
                    if not a.allowed[n, h, i, j]:
                        continue  # (A4): a masked entry's weight is exactly 0 below
                    s = a.scale * ctx.fdot(a.q[n, h, i], a.k[n, kv, j])  # (A1)
                    if a.softcap is not None:
                        t = ctx.tanh(s / a.softcap)
                        tanh[n, h, i, j] = t
                        s = a.softcap * t  # (A2)
                    if bias is not None:
                        s = s + bias[n, h, i, j]  # (A3)
                    logits[j] = s
                terms = list(logits.values())
                if a.sinks is not None:
                    terms.append(a.sinks[h])  # (A18) one more term, with value 0
                elif not logits:  # an empty row: the policy's constant weights
                    for j in range(S):
                        probs[n, h, i, j] = empty_fill[a.empty_rows]
                    continue
                m = max(terms)
                lse[n, h, i] = m + ctx.log(ctx.fsum(ctx.exp(x - m) for x in terms))
                for j, x in logits.items():
                    probs[n, h, i, j] = ctx.exp(x - lse[n, h, i])  # (A5)
                if sink_probs is not None and a.sinks is not None:
                    sink_probs[n, h, i] = ctx.exp(a.sinks[h] - lse[n, h, i])  # (A18)
    dropped = probs if a.keep_scale is None else probs * a.keep_scale  # (A6), entrywise in mp
    out = _mp_full(ctx, (N, H, T, Dv), zero)
    for n in range(N):
        for h in range(H):
            kv = h // G
            for i in range(T):
                for e in range(Dv):
                    out[n, h, i, e] = ctx.fdot(dropped[n, h, i], a.v[n, kv, :, e])  # (A7)
    return _AttentionForward(
        probs=probs,
        dropped=dropped,
        logsumexp=lse,
        tanh=tanh if a.softcap is not None else None,
        out=out,
        sink_probs=sink_probs,
    )


def _attention_backward(
    ctx: Any,
    a: _AttentionArgs,
    f: _AttentionForward,
    dout: np.ndarray,
    dlse: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(A8)-(A19): ``(dq, dk, dv, dbias, dsinks)`` from the mp forward, ``dout`` (N, H, T, Dv)
    and the log-sum-exp's cotangent ``dlse`` (N, H, T) or None."""
    N, H, T, Dk = a.q.shape
    Hkv, S, Dv = a.v.shape[1:]
    G = H // Hkv
    zero = ctx.zero
    sink_terms: list[list[Any]] = [[] for _ in range(H)]  # (A19) per head, summed at the end
    dlogits = _mp_full(ctx, (N, H, T, S), zero)
    dscores = _mp_full(ctx, (N, H, T, S), zero)
    tanh = f.tanh
    for n in range(N):
        for h in range(H):
            kv = h // G
            for i in range(T):
                dlse_i = zero if dlse is None else dlse[n, h, i]
                if not a.allowed[n, h, i].any():
                    if a.sinks is not None:
                        sink_terms[h].append(dlse_i)  # (A19) only the sink: p_sink = 1, D = 0
                    continue  # empty row: its weights do not depend on the scores, (A12)
                # (A8) dP'_j = sum_e dout_e v_je; (A10) dP_j = dP'_j keep_j / (1 - p)
                dprobs = [ctx.fdot(dout[n, h, i], a.v[n, kv, j]) for j in range(S)]
                if a.keep_scale is not None:
                    dprobs = [d * a.keep_scale[n, h, i, j] for j, d in enumerate(dprobs)]
                p = f.probs[n, h, i]
                rho = ctx.fdot(dprobs, p) - dlse_i  # sum_j' dP_j' P_j' - dlse, (A17)
                if f.sink_probs is not None:
                    sink_terms[h].append(-f.sink_probs[n, h, i] * rho)  # (A19)
                for j in range(S):
                    if not a.allowed[n, h, i, j]:
                        continue  # (A12): a masked logit gets no gradient
                    dl = p[j] * (dprobs[j] - rho)  # (A11), (A17)
                    dlogits[n, h, i, j] = dl  # (A13) dc = dl
                    # (A14) d/ds cap tanh(s / cap) = 1 - tanh(s / cap)^2
                    dscores[n, h, i, j] = (
                        dl * (1 - tanh[n, h, i, j] ** 2) if tanh is not None else dl
                    )
    dq = _mp_full(ctx, (N, H, T, Dk), zero)
    dk = _mp_full(ctx, (N, Hkv, S, Dk), zero)
    dv = _mp_full(ctx, (N, Hkv, S, Dv), zero)
    for n in range(N):
        for h in range(H):
            kv = h // G
            for i in range(T):
                for d in range(Dk):
                    dq[n, h, i, d] = a.scale * ctx.fdot(dscores[n, h, i], a.k[n, kv, :, d])  # (A15)
        for kv in range(Hkv):
            group = slice(kv * G, (kv + 1) * G)  # the query heads that read kv head kv
            for j in range(S):
                ds_j = dscores[n, group, :, j].ravel()  # (G*T,) over (h, i)
                dp_j = f.dropped[n, group, :, j].ravel()  # (G*T,)
                for d in range(Dk):
                    dk[n, kv, j, d] = a.scale * ctx.fdot(ds_j, a.q[n, group, :, d].ravel())  # (A16)
                for e in range(Dv):
                    dv[n, kv, j, e] = ctx.fdot(dp_j, dout[n, group, :, e].ravel())  # (A9)
    dbias = None
    if a.bias is not None and a.bias_index is not None:
        # (A13) each bias entry gets the sum of dlogits over the scores it was broadcast to
        terms: list[list[Any]] = [[] for _ in range(a.bias.size)]
        for index, dl in zip(a.bias_index.ravel().tolist(), dlogits.ravel(), strict=True):
            terms[index].append(dl)
        dbias = np.empty(a.bias.size, dtype=object)
        dbias[:] = [ctx.fsum(t) for t in terms]
        dbias = dbias.reshape(a.bias.shape)
    dsinks = None
    if a.sinks is not None:
        dsinks = np.empty(H, dtype=object)
        dsinks[:] = [ctx.fsum(t) for t in sink_terms]
    return dq, dk, dv, dbias, dsinks


# ----------------------------------------------------------------------------- validation


def _check_size(name: str, scores: int, work: int, formula: str) -> None:
    """Refuse shapes that would keep mpmath busy for more than about 10 s."""
    if scores > MAX_SCORES:
        raise ValueError(
            f"{name} is for small shapes: these inputs have B*H*T*S = {scores} attention scores, "
            f"more than MAX_SCORES = {MAX_SCORES}; shrink B, H, T or S"
        )
    if work > MAX_MULTIPLY_ADDS:
        raise ValueError(
            f"{name} is for small shapes: these inputs need {formula} = {work} multiply-adds, more "
            f"than MAX_MULTIPLY_ADDS = {MAX_MULTIPLY_ADDS}; shrink the shapes or the widths"
        )


def _attention_args(
    ctx: Any,
    lead: tuple[int, ...],
    opt: Any,
    scale_given: bool,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
) -> _AttentionArgs:
    """The mp form of the checked options, for mp arrays q (N, H, T, Dk), k (N, Hkv, S, Dk), v
    (N, Hkv, S, Dv).

    ``lead`` is the leading (...) shape that N flattens.
    """
    _, H, T, Dk = q.shape
    S = k.shape[2]
    scores_shape = lead + (H, T, S)  # (..., H, T, S)
    N = int(np.prod(lead, dtype=np.int64))
    allowed = AllowedPairs.from_options(opt, T, S).dense()  # mask, causal, window, -inf bias
    full = (
        np.ones(scores_shape, dtype=bool)
        if allowed is None
        else np.broadcast_to(allowed, scores_shape).copy()
    )
    bias = bias_index = None
    if opt.bias is not None:
        bias = _to_mp(ctx, opt.bias)
        bias_index = np.broadcast_to(np.arange(opt.bias.size).reshape(opt.bias.shape), scores_shape)
        bias_index = bias_index.reshape(N, H, T, S)
    empty = ~full.any(axis=-1)  # (..., H, T)
    if opt.empty_rows == "raise" and empty.any() and opt.sinks is None:
        where = np.argwhere(empty)
        raise ValueError(
            f"empty_rows='raise': {len(where)} query row(s) have no key to attend; the first at "
            f"index {tuple(int(i) for i in where[0])} of (..., H, T)"
        )
    keep_scale = None
    if opt.dropout_p > 0:
        factor = ctx.one / (ctx.one - ctx.mpf(opt.dropout_p))  # 1 / (1 - p), exact inputs
        keep = np.asarray(opt.dropout_mask).reshape(N, H, T, S)
        keep_scale = _mp_full(ctx, (N, H, T, S), ctx.zero)
        keep_scale[keep] = factor
    return _AttentionArgs(
        q=q,
        k=k,
        v=v,
        bias=bias,
        bias_index=bias_index,
        allowed=full.reshape(N, H, T, S),
        keep_scale=keep_scale,
        scale=ctx.mpf(opt.scale) if scale_given else 1 / ctx.sqrt(Dk),
        softcap=ctx.mpf(opt.softcap) if opt.softcap is not None else None,
        empty_rows=opt.empty_rows,
        sinks=None if opt.sinks is None else _to_mp(ctx, opt.sinks),
    )


def _refuse_complex(arrays: dict[str, Any]) -> None:
    """The complex step is the library's business: the exact reference is real-valued."""
    for name, x in arrays.items():
        if _is_complex(x):
            raise TypeError(
                f"{name} must be real (bool, int or float): the exact reference computes in real "
                f"mpmath arithmetic; got dtype {np.asarray(x).dtype}"
            )


def _refuse_dtype(given: AttentionOptions) -> None:
    given.refuse(
        ("dtype", "rounding"),
        "the exact reference",
        "it computes in mpmath at dps significant digits and returns float64",
    )


def _refuse_generator(dropout_mask: Any) -> None:
    if isinstance(dropout_mask, np.random.Generator):
        raise TypeError(
            "dropout_mask must be a boolean keep-mask of shape (..., H, T, S) (True = keep), not a "
            "numpy.random.Generator: draw one with attention_ref.dropout_keep_mask and pass the "
            "same mask to the code under test"
        )


def _prepare_sdpa(
    q, k, v, dout, *, dps, given: AttentionOptions
) -> tuple[Any, _AttentionArgs, np.ndarray | None, tuple[int, ...]]:
    """Validate and convert; returns ``(ctx, args, dout as mp (N, H, T, Dv) or None, lead)``."""
    _refuse_dtype(given)
    ctx = _context(dps)
    _refuse_generator(given.dropout_mask)
    _refuse_complex(
        {"q": q, "k": k, "v": v, "dout": dout, "bias": given.bias, "sinks": given.sinks}
    )
    f64 = np.dtype(np.float64)
    q, k, v = check_qkv(q, k, v, f64)
    opt = given.check(q, k)
    lead, (H, T, Dk), (Hkv, S, Dv) = q.shape[:-3], q.shape[-3:], v.shape[-3:]
    N = int(np.prod(lead, dtype=np.int64))
    _check_size(
        "exact_sdpa",
        N * H * T * S,
        N * H * T * S * (Dk + Dv),
        f"B*H*T*S*(Dk+Dv) = {N}*{H}*{T}*{S}*({Dk}+{Dv})",
    )
    dout_mp = None
    if dout is not None:
        dout = as_float("dout", dout, f64)
        if dout.shape != lead + (H, T, Dv):
            raise ValueError(
                f"dout must have the output's shape (..., H, T, Dv) = {lead + (H, T, Dv)}; got "
                f"{dout.shape}"
            )
        dout_mp = _to_mp(ctx, dout).reshape(N, H, T, Dv)
    args = _attention_args(
        ctx,
        lead,
        opt,
        given.scale is not None,
        _to_mp(ctx, q).reshape(N, H, T, Dk),
        _to_mp(ctx, k).reshape(N, Hkv, S, Dk),
        _to_mp(ctx, v).reshape(N, Hkv, S, Dv),
    )
    return ctx, args, dout_mp, lead


def _sdpa_mp(
    ctx: Any, a: _AttentionArgs, dout: np.ndarray | None, dlse: np.ndarray | None = None
) -> tuple[_AttentionForward, tuple | None]:
    """Forward, and the backward when ``dout`` is given, all in mp (leading dims flattened)."""
    f = _attention_forward(ctx, a)
    return f, (_attention_backward(ctx, a, f, dout, dlse) if dout is not None else None)


# ----------------------------------------------------------------------------- public: SDPA


def exact_sdpa(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    dout: ArrayLike | None = None,
    *,
    options: AttentionOptions | None = None,
    dps: int = DEFAULT_DPS,
    dlse: ArrayLike | None = None,
    **kwargs: Any,
) -> ExactAttention:
    r"""Scaled dot-product attention and its gradients in exact (mpmath) arithmetic, for small
    shapes.

    The same computation as :func:`~attention_ref.scaled_dot_product_attention` and
    :func:`~attention_ref.scaled_dot_product_attention_backward`, with the same options, carried
    out at ``dps`` significant digits from the float64 inputs taken exactly; each result is the
    float64 nearest to its mpmath value.

    Parameters
    ----------
    q : array_like, shape (..., H, T, Dk)
        Queries; converted to float64 (float32 and float16 values are taken exactly).
    k : array_like, shape (..., Hkv, S, Dk)
        Keys; query head ``h`` reads key/value head ``h // (H // Hkv)``.
    v : array_like, shape (..., Hkv, S, Dv)
        Values.
    dout : array_like, shape (..., H, T, Dv), optional
        Gradient of the loss with respect to the output; the gradients are computed only when given.
    options, **kwargs
        The attention options (an AttentionOptions and/or its fields by name; ``dtype`` is
        refused),
        as in :func:`~attention_ref.scaled_dot_product_attention`. Without ``scale`` the scale is
        the exact :math:`1/\sqrt{\text{Dk}}`, not its float64 rounding; a given ``scale``,
        ``softcap`` and ``dropout_p`` are taken exactly, and :math:`1/(1-p)` is computed in mpmath.
    dropout_mask : array_like of bool, shape (..., H, T, S), optional
        The keep-mask (True = keep), required when ``dropout_p > 0``. A Generator is refused:
        pass the mask the code under test used.
    dps : int, default 50
        Working precision in significant decimal digits, from :data:`MIN_DPS` to :data:`MAX_DPS`.
    dlse : array_like, shape (..., H, T), optional
        Gradient with respect to the log-sum-exp, (A17); needs ``dout``.

    Returns
    -------
    ExactAttention
        ``out`` (..., H, T, Dv), ``probs`` (..., H, T, S) before dropout, ``logsumexp``
        (..., H, T) (the sink's term included) and, when ``dout`` is given, ``dq``
        (..., H, T, Dk), ``dk`` (..., Hkv, S, Dk), ``dv`` (..., Hkv, S, Dv), ``dbias`` (the
        bias's shape, or None) and ``dsinks`` ((H,) with ``sinks``, else None), all float64.

    Raises
    ------
    ValueError
        On the same invalid arguments as the library, and for shapes with more than
        :data:`MAX_SCORES` scores :math:`B H T S` or :data:`MAX_MULTIPLY_ADDS` multiply-adds
        :math:`B H T S (\text{Dk}+\text{Dv})`.
    ImportError
        When mpmath is not installed (``pip install 'attention_ref[exact]'``).

    Notes
    -----
    Forward (A1)-(A7) and backward (A8)-(A16) of ``docs/derivations/attention.md``, with the
    log-sum-exp's cotangent (A17) and the sinks (A18)-(A19), as loops over
    the batch, the heads and the query and key positions, with mpmath's ``fdot`` and ``fsum``
    (one rounding per dot product, at ``dps`` digits) for the reductions. The conventions are the
    library's: a fully masked row follows ``empty_rows`` (its scores get no gradient), ``probs``
    are the weights before dropout.

    References
    ----------
    Vaswani et al. (2017), "Attention is all you need". F. Johansson et al., mpmath 1.3 (2023),
    https://mpmath.org. N. J. Higham (2002), "Accuracy and Stability of Numerical Algorithms",
    2nd ed., section 3.1, for the rounding error of the float64 dot products measured against it.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.oracle.exact import exact_sdpa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(4, 3, 2)), rng.normal(size=(2, 5, 2)), rng.normal(size=(2, 5, 3))
    >>> ex = exact_sdpa(q, k, v, rng.normal(size=(4, 3, 3)), causal=True, align="bottom_right")
    >>> ex.out.shape, ex.dq.shape, ex.dk.shape, ex.dv.shape, ex.dbias
    ((4, 3, 3), (4, 3, 2), (2, 5, 2), (2, 5, 3), None)
    >>> ours = scaled_dot_product_attention(q, k, v, causal=True, align="bottom_right")
    >>> eps = np.finfo(np.float64).eps
    >>> bool(np.abs(ours - ex.out).max() / (eps * np.abs(ex.out).max()) < 8)
    True
    """
    ctx, a, dout_mp, lead = _prepare_sdpa(
        q, k, v, dout, dps=dps, given=AttentionOptions.of(options, **kwargs)
    )
    H, T, Dk = a.q.shape[1:]
    Hkv, S, Dv = a.v.shape[1:]
    dlse_mp = None
    if dlse is not None:
        if dout_mp is None:
            raise ValueError("dlse needs dout: the gradients are computed only when dout is given")
        dlse = as_float("dlse", dlse, np.dtype(np.float64))
        if dlse.shape != lead + (H, T):
            raise ValueError(
                f"dlse must have the log-sum-exp's shape (..., H, T) = {lead + (H, T)}; got "
                f"{dlse.shape}"
            )
        dlse_mp = _to_mp(ctx, dlse).reshape(-1, H, T)
    f, grads = _sdpa_mp(ctx, a, dout_mp, dlse_mp)
    dq = dk = dv = dbias = dsinks = None
    if grads is not None:
        dq = _to_float64(ctx, grads[0]).reshape(lead + (H, T, Dk))
        dk = _to_float64(ctx, grads[1]).reshape(lead + (Hkv, S, Dk))
        dv = _to_float64(ctx, grads[2]).reshape(lead + (Hkv, S, Dv))
        dbias = _to_float64(ctx, grads[3]) if grads[3] is not None else None
        dsinks = _to_float64(ctx, grads[4]) if grads[4] is not None else None
    return ExactAttention(
        out=_to_float64(ctx, f.out).reshape(lead + (H, T, Dv)),
        probs=_to_float64(ctx, f.probs).reshape(lead + (H, T, S)),
        logsumexp=_to_float64(ctx, f.logsumexp).reshape(lead + (H, T)),
        dq=dq,
        dk=dk,
        dv=dv,
        dbias=dbias,
        dsinks=dsinks,
    )


# ----------------------------------------------------------------------------- multi-head in mp


class _MultiHeadArgs(NamedTuple):
    query: np.ndarray  # (N, T, Dq_in) mpf
    key: np.ndarray  # (N, S, Dk_in)
    value: np.ndarray  # (N, S, Dv_in)
    params: MultiHeadParams  # every weight and bias as an mpf array (None where a bias is None)
    H: int
    Hkv: int
    attention: _AttentionArgs  # q, k, v are placeholders: the forward fills them in


def _linear_mp(ctx: Any, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """(L1) ``y[n, r, o] = sum_c x[n, r, c] w[c, o] + b[o]`` for x (N, R, in)."""
    N, R, _ = x.shape
    n_out = w.shape[1]
    y = _mp_full(ctx, (N, R, n_out), ctx.zero)
    for n in range(N):
        for r in range(R):
            for o in range(n_out):
                y[n, r, o] = ctx.fdot(x[n, r], w[:, o]) + (b[o] if b is not None else 0)  # (L1)
    return y


def _linear_backward_mp(
    ctx: Any, dy: np.ndarray, x: np.ndarray, w: np.ndarray, has_bias: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(L2)-(L4): ``dx`` (N, R, in), ``dw`` (in, out), ``db`` (out,) for dy (N, R, out)."""
    N, R, n_out = dy.shape
    n_in = w.shape[0]
    dx = _mp_full(ctx, (N, R, n_in), ctx.zero)
    for n in range(N):
        for r in range(R):
            for c in range(n_in):
                dx[n, r, c] = ctx.fdot(dy[n, r], w[c])  # (L2)
    xs, dys = x.reshape(N * R, n_in), dy.reshape(N * R, n_out)  # every (n, r) position
    dw = _mp_full(ctx, (n_in, n_out), ctx.zero)
    for c in range(n_in):
        for o in range(n_out):
            dw[c, o] = ctx.fdot(xs[:, c], dys[:, o])  # (L3)
    db = None
    if has_bias:
        db = np.empty(n_out, dtype=object)
        db[:] = [ctx.fsum(dys[:, o]) for o in range(n_out)]  # (L4)
    return dx, dw, db


def _split_mp(ctx: Any, y: np.ndarray, heads: int) -> np.ndarray:
    """(H1) ``out[n, h, t, d] = y[n, t, h*Dh + d]``: (N, T, heads*Dh) -> (N, heads, T, Dh)."""
    N, T, width = y.shape
    Dh = width // heads
    out = _mp_full(ctx, (N, heads, T, Dh), ctx.zero)
    for n in range(N):
        for h in range(heads):
            for t in range(T):
                for d in range(Dh):
                    out[n, h, t, d] = y[n, t, h * Dh + d]
    return out


def _merge_mp(ctx: Any, x: np.ndarray) -> np.ndarray:
    """(H2) ``out[n, t, h*Dh + d] = x[n, h, t, d]``: (N, heads, T, Dh) -> (N, T, heads*Dh)."""
    N, heads, T, Dh = x.shape
    out = _mp_full(ctx, (N, T, heads * Dh), ctx.zero)
    for n in range(N):
        for h in range(heads):
            for t in range(T):
                for d in range(Dh):
                    out[n, t, h * Dh + d] = x[n, h, t, d]
    return out


class _MultiHeadMp(NamedTuple):
    attention: _AttentionForward
    out: np.ndarray  # (N, T, D_out)
    dquery: np.ndarray | None  # (N, T, Dq_in), and the rest: None without dout
    dkey: np.ndarray | None  # (N, S, Dk_in)
    dvalue: np.ndarray | None  # (N, S, Dv_in)
    dparams: MultiHeadParams | None  # mpf arrays
    dbias: np.ndarray | None  # the attention bias's own shape


def _mha_mp(ctx: Any, m: _MultiHeadArgs, dout: np.ndarray | None) -> _MultiHeadMp:
    """(M1)-(M6), and (M7)-(M10) when ``dout`` (N, T, D_out) is given, all in mp."""
    p = m.params
    q_lin = _linear_mp(ctx, m.query, p.w_q, p.b_q)  # (N, T, H*Dk)
    k_lin = _linear_mp(ctx, m.key, p.w_k, p.b_k)  # (N, S, Hkv*Dk)
    v_lin = _linear_mp(ctx, m.value, p.w_v, p.b_v)  # (N, S, Hkv*Dv)
    a = m.attention._replace(
        q=_split_mp(ctx, q_lin, m.H),  # (N, H, T, Dk)   (M1)
        k=_split_mp(ctx, k_lin, m.Hkv),  # (N, Hkv, S, Dk)   (M2)
        v=_split_mp(ctx, v_lin, m.Hkv),  # (N, Hkv, S, Dv)   (M3)
    )
    f = _attention_forward(ctx, a)  # (N, H, T, Dv)   (M4)
    concat = _merge_mp(ctx, f.out)  # (N, T, H*Dv)   (M5)
    out = _linear_mp(ctx, concat, p.w_o, p.b_o)  # (N, T, D_out)   (M6)
    if dout is None:
        return _MultiHeadMp(
            attention=f, out=out, dquery=None, dkey=None, dvalue=None, dparams=None, dbias=None
        )
    dconcat, dw_o, db_o = _linear_backward_mp(ctx, dout, concat, p.w_o, p.b_o is not None)  # (M7)
    dcontext = _split_mp(ctx, dconcat, m.H)  # (N, H, T, Dv)   (M8)
    dq, dk, dv, dbias, _ = _attention_backward(ctx, a, f, dcontext)  # (M9); no sinks in MHA
    # (M10) the backward of each split is a merge, then the input projection's backward
    dquery, dw_q, db_q = _linear_backward_mp(
        ctx, _merge_mp(ctx, dq), m.query, p.w_q, p.b_q is not None
    )
    dkey, dw_k, db_k = _linear_backward_mp(ctx, _merge_mp(ctx, dk), m.key, p.w_k, p.b_k is not None)
    dvalue, dw_v, db_v = _linear_backward_mp(
        ctx, _merge_mp(ctx, dv), m.value, p.w_v, p.b_v is not None
    )
    dparams = MultiHeadParams(
        w_q=dw_q, w_k=dw_k, w_v=dw_v, w_o=dw_o, b_q=db_q, b_k=db_k, b_v=db_v, b_o=db_o
    )
    return _MultiHeadMp(
        attention=f, out=out, dquery=dquery, dkey=dkey, dvalue=dvalue, dparams=dparams, dbias=dbias
    )


def _prepare_mha(
    query, key, value, params, dout, *, num_heads, num_kv_heads, dps, given: AttentionOptions
):
    """Validate and convert; returns ``(ctx, args, dout as mp (N, T, D_out) or None, lead)``."""
    _refuse_dtype(given)
    given.refuse(("sinks",), "exact_mha", "its result has no dsinks; use exact_sdpa on the heads")
    ctx = _context(dps)
    _refuse_generator(given.dropout_mask)
    weights = (
        {f"params.{n}": w for n, w in params.as_dict().items()}
        if isinstance(params, MultiHeadParams)
        else {}
    )
    _refuse_complex(
        {"query": query, "key": key, "value": value, "dout": dout, "bias": given.bias, **weights}
    )
    f64 = np.dtype(np.float64)
    H = check_positive_int("num_heads", num_heads)
    Hkv = H if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
    if H % Hkv:
        raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={Hkv}")
    p = _check_params(params, f64)
    query, key, value = (
        as_float(n, x, f64) for n, x in (("query", query), ("key", key), ("value", value))
    )
    _check_widths(query, key, value, p, H, Hkv)
    lead, T, S = query.shape[:-2], query.shape[-2], key.shape[-2]
    Dk, Dv, D_out = p.w_q.shape[1] // H, p.w_v.shape[1] // Hkv, p.w_o.shape[1]
    N = int(np.prod(lead, dtype=np.int64))
    work = N * (
        T * p.w_q.size + S * (p.w_k.size + p.w_v.size) + H * T * S * (Dk + Dv) + T * p.w_o.size
    )
    _check_size(
        "exact_mha",
        N * H * T * S,
        work,
        "B*(T*|w_q| + S*(|w_k| + |w_v|) + H*T*S*(Dk+Dv) + T*|w_o|)",
    )
    # The attention options are checked against the per-head scores (..., H, T, S).
    opt = given.validate(lead + (H, T, S), f64, head_dim=Dk)
    dout_mp = None
    if dout is not None:
        dout = as_float("dout", dout, f64)
        if dout.shape != lead + (T, D_out):
            raise ValueError(
                f"dout must have the output's shape (..., T, D_out) = {lead + (T, D_out)}; got "
                f"{dout.shape}"
            )
        dout_mp = _to_mp(ctx, dout).reshape(N, T, D_out)
    # q, k and v are placeholders of the per-head shapes: _mha_mp fills them in, (M1)-(M3)
    attention = _attention_args(
        ctx,
        lead,
        opt,
        given.scale is not None,
        np.empty((N, H, T, Dk), dtype=object),
        np.empty((N, Hkv, S, Dk), dtype=object),
        np.empty((N, Hkv, S, Dv), dtype=object),
    )
    m = _MultiHeadArgs(
        query=_to_mp(ctx, query).reshape(N, T, query.shape[-1]),
        key=_to_mp(ctx, key).reshape(N, S, key.shape[-1]),
        value=_to_mp(ctx, value).reshape(N, S, value.shape[-1]),
        params=MultiHeadParams(**{n: _to_mp(ctx, w) for n, w in p.as_dict().items()}),
        H=H,
        Hkv=Hkv,
        attention=attention,
    )
    return ctx, m, dout_mp, lead


# ----------------------------------------------------------------------------- public: MHA


def exact_mha(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    dout: ArrayLike | None = None,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    options: AttentionOptions | None = None,
    dps: int = DEFAULT_DPS,
    **kwargs: Any,
) -> ExactMultiHead:
    r"""Multi-head attention and its gradients in exact (mpmath) arithmetic, for small shapes.

    The same computation as :func:`~attention_ref.multi_head_attention` and
    :func:`~attention_ref.multi_head_attention_backward`, at ``dps`` significant digits from the
    float64 inputs and weights taken exactly; each result is the float64 nearest to its mpmath
    value.

    Parameters
    ----------
    query : array_like, shape (..., T, Dq_in)
    key : array_like, shape (..., S, Dk_in)
    value : array_like, shape (..., S, Dv_in)
        For self-attention pass the same array three times (and add the three input gradients).
    params : MultiHeadParams
        Weights in ``(in, out)`` layout, see :class:`~attention_ref.MultiHeadParams`.
    dout : array_like, shape (..., T, D_out), optional
        Gradient of the loss with respect to the output; the gradients are computed only when given.
    num_heads : int
        H.
    num_kv_heads : int, optional
        Hkv (grouped-query attention); H when omitted.
    mask, bias, causal, align, window, softcap, scale, dropout_p, dropout_mask, empty_rows
        As in :func:`exact_sdpa` (the attention options of
        :func:`~attention_ref.multi_head_attention`; ``dropout_mask`` is a keep-mask, never a
        Generator).
    dps : int, default 50
        Working precision in significant decimal digits.

    Returns
    -------
    ExactMultiHead
        ``out`` (..., T, D_out), ``probs`` (..., H, T, S), ``logsumexp`` (..., H, T) and, when
        ``dout`` is given, ``dquery``, ``dkey``, ``dvalue`` (the inputs' shapes), ``dparams`` (a
        :class:`~attention_ref.MultiHeadParams` of gradients, None where a bias is None) and
        ``dbias`` (the attention bias's shape, or None), all float64.

    Raises
    ------
    ValueError
        On the same invalid arguments as the library, and for shapes with more than
        :data:`MAX_SCORES` scores or :data:`MAX_MULTIPLY_ADDS` multiply-adds (the four
        projections plus the attention).
    ImportError
        When mpmath is not installed.

    Notes
    -----
    (M1)-(M10) of ``docs/derivations/mha.md``: the projections (L1)-(L4) and head split and
    merge (H1)-(H2) as loops, attention as in :func:`exact_sdpa`.

    References
    ----------
    Vaswani et al. (2017), "Attention is all you need"; Ainslie et al. (2023), "GQA".

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import init_params, multi_head_attention
    >>> from attention_ref.oracle.exact import exact_mha
    >>> rng = np.random.default_rng(0)
    >>> p = init_params(rng, d_model=4, num_heads=2, num_kv_heads=1, head_dim=2, v_head_dim=3)
    >>> x = rng.normal(size=(2, 3, 4))
    >>> ex = exact_mha(x, x, x, p, rng.normal(size=(2, 3, 4)), num_heads=2, num_kv_heads=1)
    >>> ex.out.shape, (ex.dquery + ex.dkey + ex.dvalue).shape, ex.dparams.w_v.shape
    ((2, 3, 4), (2, 3, 4), (4, 3))
    >>> ours = multi_head_attention(x, x, x, p, num_heads=2, num_kv_heads=1)
    >>> eps = np.finfo(np.float64).eps
    >>> bool(np.abs(ours - ex.out).max() / (eps * np.abs(ex.out).max()) < 16)
    True
    """
    ctx, m, dout_mp, lead = _prepare_mha(
        query,
        key,
        value,
        params,
        dout,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        dps=dps,
        given=AttentionOptions.of(options, **kwargs),
    )
    r = _mha_mp(ctx, m, dout_mp)
    H, T, S = m.H, m.query.shape[1], m.key.shape[1]
    dquery = dkey = dvalue = dparams = None
    if (
        r.dquery is not None
        and r.dkey is not None
        and r.dvalue is not None
        and r.dparams is not None
    ):
        dquery = _to_float64(ctx, r.dquery).reshape(lead + (T, m.query.shape[-1]))
        dkey = _to_float64(ctx, r.dkey).reshape(lead + (S, m.key.shape[-1]))
        dvalue = _to_float64(ctx, r.dvalue).reshape(lead + (S, m.value.shape[-1]))
        dparams = MultiHeadParams(
            **{n: _to_float64(ctx, g) for n, g in r.dparams.as_dict().items()}
        )
    return ExactMultiHead(
        out=_to_float64(ctx, r.out).reshape(lead + (T, r.out.shape[-1])),
        probs=_to_float64(ctx, r.attention.probs).reshape(lead + (H, T, S)),
        logsumexp=_to_float64(ctx, r.attention.logsumexp).reshape(lead + (H, T)),
        dquery=dquery,
        dkey=dkey,
        dvalue=dvalue,
        dparams=dparams,
        dbias=_to_float64(ctx, r.dbias) if r.dbias is not None else None,
    )
