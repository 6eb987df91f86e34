r"""Scaled dot-product attention: forward, hand-written backward, and a named trace.

Two ways in:

* :func:`scaled_dot_product_attention` / :func:`scaled_dot_product_attention_backward` take the
  inputs; the backward recomputes the forward.
* :func:`sdpa_forward` returns an :class:`AttentionTrace` holding every intermediate by name, and
  :func:`sdpa_backward` consumes it, so a forward plus a backward costs one forward.

Equations (A1)-(A19) are derived in ``docs/derivations/attention.md``; conventions (mask polarity,
causal alignment, fully masked rows, GQA) are in ``docs/conventions.md``.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ._validate import (
    as_float,
    check_ndim,
    check_nonempty,
    check_real_scalar,
    fresh,
    sum_to_shape,
)
from .masks import AllowedPairs
from .mods import mod_indices, score_mod_backward, score_mod_forward
from .options import AttentionOptions
from .precision import EXACT, ROUNDING_POINTS, Rounding
from .primitives import (
    dropout_backward_into,
    masked_softmax,
    row_dot,
    softmax_backward_into,
    zero_masked_into,
)
from .scores import (
    add_bias_backward,
    apply_mask,
    scaled_scores,
    scaled_scores_backward,
    softcap_backward,
    softcap_forward,
    weighted_values,
    weighted_values_backward,
)
from .softmax import stable_shift

#: The most memory the plain path's (..., H, T, S) intermediates of one call may take, in bytes
#: (the environment variable ``ATTENTION_REF_MAX_BYTES`` overrides it). Past it the call is refused
#: before anything is allocated: the tiled path (:mod:`attention_ref.variants.flash`) computes the
#: same function in memory linear in T and S.
MAX_INTERMEDIATE_BYTES = 8 * 2**30


def memory_limit() -> int:
    """:data:`MAX_INTERMEDIATE_BYTES`, or ``ATTENTION_REF_MAX_BYTES`` when set (an int)."""
    env = os.environ.get("ATTENTION_REF_MAX_BYTES")
    if env is None:
        return MAX_INTERMEDIATE_BYTES
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"ATTENTION_REF_MAX_BYTES must be an int (bytes); got {env!r}") from None


def _check_memory(scores_shape: tuple[int, ...], dt: np.dtype, opt: Any) -> None:
    """Refuse a plain-path call whose (..., H, T, S) arrays would pass :func:`memory_limit`."""
    entries = math.prod(scores_shape)  # Python ints: no overflow
    arrays = 3 + (opt.softcap is not None) + (opt.bias is not None) + (opt.dropout_p > 0)
    needed = entries * dt.itemsize * arrays  # scores, masked logits, probs, and the optional ones
    limit = memory_limit()
    if needed > limit:
        raise ValueError(
            f"the plain path would hold {arrays} arrays of shape (..., H, T, S) = {scores_shape}, "
            f"{needed:,} bytes ({needed / 2**30:.2f} GiB), more than the limit of {limit:,} bytes "
            "(attention_ref.core.attention.MAX_INTERMEDIATE_BYTES, or ATTENTION_REF_MAX_BYTES); "
            "use attention_ref.variants.flash.flash_attention_forward, whose memory is linear in "
            "T and S"
        )


class AttentionTrace(NamedTuple):
    """Every intermediate of one :func:`sdpa_forward` call, by name.

    Arrays are the converted (compute-dtype) values; none of them is one of the caller's arrays.
    Fields that a configuration does not use hold the previous stage's array (``capped_scores``
    without a softcap, ``dropped_probs`` without dropout) or None.
    """

    q: np.ndarray  #: (..., H, T, Dk) queries
    k: np.ndarray  #: (..., Hkv, S, Dk) keys
    v: np.ndarray  #: (..., Hkv, S, Dv) values
    scale: float  #: the score scale used (1/sqrt(Dk) unless given)
    softcap: float | None  #: the soft-cap, or None
    bias: np.ndarray | None  #: additive bias, broadcastable to (..., H, T, S)
    #: bool, broadcastable to (..., H, T, S) (e.g. (T, S) for causal only); True = may attend;
    #: None = all
    allowed: np.ndarray | None
    #: (..., H, T) bool: the query row has nothing to attend (no allowed key and no sink)
    row_is_empty: np.ndarray
    empty_rows: str  #: the policy applied to empty rows
    scores: np.ndarray  #: (..., H, T, S) raw scores q k^T * scale, (A1)
    capped_scores: np.ndarray  #: (..., H, T, S) after the soft-cap, (A2)
    #: (..., H, T, S) capped scores plus bias, (A3) (capped_scores without a bias), then the
    #: score_mod's output, (A20), when there is one
    logits: np.ndarray
    #: (..., H, T, S) the logits where allowed, a finite fill elsewhere, (A4)
    masked_logits: np.ndarray
    #: (..., H, T) max over the allowed logits (and the sink); -inf for an empty row
    row_max: np.ndarray
    #: (..., H, T) log of the sum of exp over the allowed logits (and the sink, when there is
    #: one), natural log; -inf for an empty row
    logsumexp: np.ndarray
    probs: np.ndarray  #: (..., H, T, S) attention weights (softmax, empty-row policy applied), (A5)
    dropout_p: float  #: dropout probability
    dropout_mask: np.ndarray | None  #: (..., H, T, S) bool dropout keep-mask (True = kept), or None
    dropped_probs: np.ndarray  #: (..., H, T, S) weights after dropout, (A6)
    out: np.ndarray  #: (..., H, T, Dv) output, (A7)
    #: the rounding policy of a low-precision baseline (None: the reference, nothing rounded)
    rounding: Rounding | None = None
    sinks: np.ndarray | None = None  #: (H,) the sink logits, or None
    #: (..., H, T) the sink's softmax weight p_sink = exp(sinks[h] - lse), (A18); None without sinks
    sink_probs: np.ndarray | None = None
    #: the score mod (a ScoreMod), or None
    score_mod: Any = None
    #: (B, H, T, S) the score mod's input, capped scores plus bias (A3); None without a score mod
    mod_input: np.ndarray | None = None

    @property
    def masked_scores(self) -> np.ndarray:
        """The 0.1 name of :attr:`masked_logits` (what golden files call ``masked_scores``)."""
        return self.masked_logits

    @property
    def keep_mask(self) -> np.ndarray | None:
        """The 0.1 name of :attr:`dropout_mask`."""
        return self.dropout_mask


class AttentionGrads(NamedTuple):
    """Gradients of scaled dot-product attention with respect to its differentiable inputs.

    Every array is the backward's own. ``dk`` and ``dv`` are computed as their transposes (faster,
    (A9) and (A16)) and are views with the last two axes swapped: not C-contiguous
    (``np.ascontiguousarray`` gives a C-ordered copy when a C or ctypes consumer needs one).
    """

    dq: np.ndarray  #: (..., H, T, Dk)
    #: (..., Hkv, S, Dk), summed over the query heads of each group; a transposed view
    dk: np.ndarray
    #: (..., Hkv, S, Dv), summed over the query heads of each group; a transposed view
    dv: np.ndarray
    dbias: np.ndarray | None  #: bias's own shape, or None without a bias
    dsinks: np.ndarray | None = None  #: (H,) for the sink logits, (A19); None without sinks
    #: the score mod's parameter gradients by name, (A22); None without a score mod ({} for a
    #: score mod without parameters)
    dscore_mod: dict[str, np.ndarray] | None = None


def dropout_keep_mask(
    shape: tuple[int, ...], dropout_p: float, rng: np.random.Generator
) -> np.ndarray:
    r"""Draw a boolean keep-mask: each entry True with probability ``1 - dropout_p``.

    Parameters
    ----------
    shape : tuple of int
        The attention weights' shape ``(..., H, T, S)``.
    dropout_p : float
        Drop probability in [0, 1).
    rng : numpy.random.Generator
        The only source of randomness; the same seed gives the same mask.

    Returns
    -------
    ndarray of bool, shape ``shape``

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import dropout_keep_mask
    >>> dropout_keep_mask((2, 3), 0.5, np.random.default_rng(0)).shape
    (2, 3)
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    if not isinstance(shape, tuple) or not all(
        isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_)) and n >= 0
        for n in shape
    ):
        raise ValueError(
            "shape must be a tuple of non-negative ints (the weights' shape (..., H, T, S)); got "
            f"{shape!r}"
        )
    p = check_real_scalar("dropout_p", dropout_p, positive=False)
    if p >= 1:
        raise ValueError(f"dropout_p must be in [0, 1); got {p}")
    return rng.random(shape) >= p


def dropout_forward(probs: np.ndarray, dropout_mask: np.ndarray, dropout_p: float) -> np.ndarray:
    r"""Dropout on the weights, (A6): ``probs * keep / (1 - p)``."""
    dropped = probs * dropout_mask
    dropped *= 1.0 / (1.0 - dropout_p)  # (A6)
    return dropped


def dropout_backward(
    ddropped: np.ndarray, dropout_mask: np.ndarray, dropout_p: float
) -> np.ndarray:
    r"""Gradient of :func:`dropout_forward`: ``d * keep / (1 - p)``, (A10) of
    ``docs/derivations/attention.md``."""
    return ddropped * dropout_mask * (1.0 / (1.0 - dropout_p))  # (A10)


def require_forward_dropout_mask(dropout_mask: Any, trace_pair: str) -> None:
    """A backward that recomputes its forward needs the forward's keep-mask, not a Generator."""
    if isinstance(dropout_mask, np.random.Generator):
        raise ValueError(
            "dropout_mask must be the boolean keep-mask the forward used, not a Generator (a "
            f"second draw would differ); use {trace_pair}, or dropout_keep_mask"
        )


def check_qkv(q: Any, k: Any, v: Any, dt: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v converted to ``dt`` and checked against each other (layouts, widths, GQA)."""
    q = as_float("q", q, dt)
    k = as_float("k", k, dt)
    v = as_float("v", v, dt)
    check_ndim("q", q, 3, "(..., H, T, Dk)")
    check_ndim("k", k, 3, "(..., Hkv, S, Dk)")
    check_ndim("v", v, 3, "(..., Hkv, S, Dv)")
    for name, x, layout in (
        ("q", q, "(..., H, T, Dk)"),
        ("k", k, "(..., Hkv, S, Dk)"),
        ("v", v, "(..., Hkv, S, Dv)"),
    ):
        check_nonempty(name, x, layout)
    if k.shape[:-3] != q.shape[:-3] or v.shape[:-3] != q.shape[:-3]:
        raise ValueError(
            f"q, k and v must have the same batch dims (...); got q.shape={q.shape}, "
            f"k.shape={k.shape}, v.shape={v.shape}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k must have Dk={q.shape[-1]} like q; got k.shape={k.shape}, q.shape={q.shape}"
        )
    if v.shape[-3] != k.shape[-3]:
        raise ValueError(
            f"v must have Hkv={k.shape[-3]} heads like k; got v.shape={v.shape}, k.shape={k.shape}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v must have S={k.shape[-2]} positions like k; got v.shape={v.shape}, "
            f"k.shape={k.shape}"
        )
    H, Hkv = q.shape[-3], k.shape[-3]
    if H % Hkv:
        raise ValueError(
            f"q's head count H={H} must be a multiple of k's Hkv={Hkv} (grouped-query attention); "
            f"got q.shape={q.shape}, k.shape={k.shape}"
        )
    return q, k, v


def sdpa_forward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> AttentionTrace:
    r"""Scaled dot-product attention, returning every intermediate in an :class:`AttentionTrace`.

    Takes the same arguments as :func:`scaled_dot_product_attention`; pass the trace to
    :func:`sdpa_backward` to get the gradients without recomputing anything.

    Parameters
    ----------
    q : array_like, shape (..., H, T, Dk)
    k : array_like, shape (..., Hkv, S, Dk)
    v : array_like, shape (..., Hkv, S, Dv)
    options : AttentionOptions, optional
        The attention options as one object.
    **kwargs
        Any field of :class:`~attention_ref.AttentionOptions` by name (``mask``, ``bias``,
        ``causal``, ``align``, ``window``, ``softcap``, ``scale``, ``dropout_p``,
        ``dropout_mask``, ``empty_rows``, ``dtype``); a keyword overrides ``options``.

    Returns
    -------
    AttentionTrace

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import sdpa_forward
    >>> rng = np.random.default_rng(0)
    >>> tr = sdpa_forward(rng.normal(size=(2, 3, 4)), rng.normal(size=(1, 5, 4)),
    ...                   rng.normal(size=(1, 5, 6)), causal=True, align="bottom_right")
    >>> tr.probs.shape, tr.logsumexp.shape, tr.out.shape
    ((2, 3, 5), (2, 3), (2, 3, 6))
    """
    given = AttentionOptions.of(options, **kwargs)
    dt = given.compute_dtype(q, k, v)  # complex inputs: complex128, for the complex step (G4)
    q_in, k_in, v_in = q, k, v
    q, k, v = check_qkv(q, k, v, dt)
    opt = given.check(q, k, mods=True)
    mask, bias, dropout_mask = given.mask, given.bias, given.dropout_mask  # the caller's arrays
    T, S = q.shape[-2], k.shape[-2]
    scores_shape = q.shape[:-1] + (S,)  # (..., H, T, S)
    _check_memory(scores_shape, dt, opt)

    # Which (query, key) pairs may attend: boolean mask & causal & window & finite bias & the
    # mask_mod (whose (B, H) are the first and third axes of 4-D inputs).
    heads = (q.shape[0], q.shape[1]) if q.ndim == 4 else (1, 1)
    allowed = AllowedPairs.from_options(opt, T, S, heads=heads).dense()  # (..., H, T, S)-able

    # fl: each stage's output rounded to the working precision; the identity for the reference
    # (core/precision.py). The inputs come first: a low-precision kernel stores them rounded.
    fl = opt.rounding or EXACT
    # each rounding point's own format (core/precision.py): the inputs, the scores, the weights
    # before P V, the output; all of them fl for a one-format policy
    fl_in, fl_s, fl_p, fl_out = (fl.at(point) for point in ROUNDING_POINTS)
    q, k, v, bias_r = fl_in(q), fl_in(k), fl_in(v), fl_in(opt.bias)
    # An overflow of the scores is reported below (_raise_overflow), not warned about here.
    with np.errstate(over="ignore", invalid="ignore"):
        if fl.scale_q_first:  # FlashAttention's reorder_ops: scale q (rounded), then the product
            scores = fl_s(scaled_scores(fl_in(q * opt.score_scale), k, 1.0))  # (..., H, T, S) (A1)
        else:
            scores = fl_s(scaled_scores(q, k, opt.score_scale))  # (..., H, T, S)   (A1)
        capped = (
            fl_s(softcap_forward(scores, opt.softcap)) if opt.softcap is not None else scores
        )  # (A2)
        logits = fl_s(capped + bias_r) if bias_r is not None else capped  # (A3)
    mod_input = None
    if opt.score_mod is not None:
        mod_input = logits  # (B, H, T, S)
        idx = mod_indices(heads[0], heads[1], T, S)
        logits = fl_s(score_mod_forward(opt.score_mod, logits, idx))  # (B, H, T, S)   (A20)
        neg = np.isneginf(logits.real)  # a -inf from the score mod masks its pair
        if neg.any():
            allowed = ~neg if allowed is None else allowed & ~neg
    if allowed is None or opt.sinks is not None:
        # (..., H, T); with sinks, a row without an allowed key still has its sink
        row_is_empty = np.zeros(scores_shape[:-1], dtype=bool)
        if allowed is not None:
            allowed = fresh(allowed, mask)
    else:
        allowed = fresh(allowed, mask)
        row_is_empty = np.broadcast_to(~allowed.any(axis=-1), scores_shape[:-1]).copy()
    if opt.empty_rows == "raise" and row_is_empty.any():
        where = np.argwhere(row_is_empty)
        raise ValueError(
            f"empty_rows='raise': {len(where)} query row(s) have no key to attend; the first at "
            f"index {tuple(int(i) for i in where[0])} of (..., H, T)"
        )
    masked = apply_mask(logits, allowed)  # (A4)

    # (A5) = (S1)-(S3) over the allowed keys: the softmax of the masked logits, with the row max of
    # the allowed ones as the shift. masked_softmax exponentiates the logits and zeroes the masked
    # weights (the same numbers as exponentiating the fill, faster: core/primitives.py).
    shift = stable_shift(masked, axis=-1)  # (..., H, T, 1) row max over the allowed keys   (S1)
    sink_exp = None
    if opt.sinks is not None:
        # (A18) the sink: one more logit sinks[h] per row, with value 0 (no column of P)
        sink_logits = fl_in(opt.sinks)[:, None, None]  # (H, 1, 1), broadcast to (..., H, T, 1)
        shift = np.maximum(shift, sink_logits.real)  # (S1) over the allowed keys and the sink
        sink_exp = np.exp(sink_logits - shift)  # (..., H, T, 1)   (S2) of the sink
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported just below
        probs, row_sum = masked_softmax(logits, shift, allowed, sink_exp)  # (S2), (S3)
    if opt.rounding is None and not np.isfinite(row_sum).all():
        _raise_overflow(row_sum, row_is_empty)
    row_max = shift[..., 0]  # (..., H, T)
    with np.errstate(divide="ignore"):
        lse = row_max + np.log(row_sum[..., 0])  # (..., H, T)   (S5)
    if row_is_empty.any():
        # (A5) empty-row policy: the row has no allowed key, so the softmax above is undefined.
        probs[row_is_empty] = {"zero": 0.0, "uniform": 1.0 / S, "nan": np.nan}[opt.empty_rows]
        row_max[row_is_empty] = -np.inf
        lse[row_is_empty] = -np.inf
    probs = fl_p(probs)
    # (..., H, T)   (A18)
    sink_probs = None if sink_exp is None else fl_p(sink_exp / row_sum)[..., 0]

    keep = None
    dropped = probs
    if opt.dropout_p > 0:
        keep = opt.dropout_mask
        if isinstance(keep, np.random.Generator):
            keep = dropout_keep_mask(scores_shape, opt.dropout_p, keep)
        else:
            keep = fresh(keep, dropout_mask)
        dropped = fl_p(dropout_forward(probs, keep, opt.dropout_p))  # (A6)

    # (..., H, T, S) @ (..., Hkv, S, Dv) -> (..., H, T, Dv)   (A7)
    out = fl_out(weighted_values(dropped, v))

    return AttentionTrace(
        q=fresh(q, q_in),
        k=fresh(k, k_in),
        v=fresh(v, v_in),
        scale=opt.score_scale,
        softcap=opt.softcap,
        bias=fresh(bias_r, bias) if bias_r is not None else None,
        allowed=allowed,
        row_is_empty=row_is_empty,
        empty_rows=opt.empty_rows,
        scores=scores,
        capped_scores=capped,
        logits=logits,
        masked_logits=masked,
        row_max=row_max,
        logsumexp=lse,
        probs=probs,
        dropout_p=opt.dropout_p,
        dropout_mask=keep,
        dropped_probs=dropped,
        out=out,
        rounding=opt.rounding,
        sinks=None if opt.sinks is None else fresh(fl_in(opt.sinks), given.sinks),
        sink_probs=sink_probs,
        score_mod=opt.score_mod,
        mod_input=mod_input,
    )


def _raise_overflow(row_sum: np.ndarray, row_is_empty: np.ndarray) -> None:
    """A finite input whose scores overflow float64 (|q k^T scale| > ~1.8e308) makes a row's
    softmax undefined: an error, not a silent NaN."""
    bad = ~np.isfinite(row_sum[..., 0]) & ~np.broadcast_to(row_is_empty, row_sum.shape[:-1])
    if not bad.any():
        return
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"the scores overflowed: {int(bad.sum())} query row(s) hold a logit that is not finite "
        f"in the compute dtype (q k^T * scale, softcap and bias), the first at index {first} of "
        "(..., H, T); scale q, k or scale down, or pass softcap"
    )


def sdpa_backward(
    dout: ArrayLike, trace: AttentionTrace, dlse: ArrayLike | None = None
) -> AttentionGrads:
    r"""Gradients of scaled dot-product attention from a forward :class:`AttentionTrace`.

    Implements (A8)-(A19) of ``docs/derivations/attention.md``, stage by stage in reverse.

    Parameters
    ----------
    dout : array_like, shape (..., H, T, Dv)
        Gradient of the loss with respect to the output.
    trace : AttentionTrace
        What :func:`sdpa_forward` returned.
    dlse : array_like, shape (..., H, T), optional
        Gradient of the loss with respect to the log-sum-exp (``trace.logsumexp``, what
        ``return_lse=True`` returns): it adds ``dlse * P`` to the logits' gradient, (A17). An
        empty row's log-sum-exp is the constant ``-inf``: its ``dlse`` is ignored.

    Returns
    -------
    AttentionGrads
        ``dq`` (..., H, T, Dk), ``dk`` (..., Hkv, S, Dk), ``dv`` (..., Hkv, S, Dv), ``dbias``
        (the bias's shape, or None) and ``dsinks`` ((H,), or None without sinks).

    Notes
    -----
    Fully masked rows: under ``"zero"`` and ``"uniform"`` no gradient reaches the scores of an
    empty row (its weights do not depend on them); under ``"uniform"`` ``dv`` receives the
    row's ``dout / S``. Under ``"nan"``, ``dv`` is NaN in every entry of each key/value head
    whose group holds an empty row, while ``dq``, ``dk`` and ``dbias`` stay finite: the gradient
    stops at masked entries, as autograd through ``softmax(scores.masked_fill(~mask, -inf))``
    gives. (An *additive* ``-inf`` mask, as ``nn.MultiheadAttention`` uses, also spreads the NaN
    into dq and dk.)

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import sdpa_forward, sdpa_backward
    >>> rng = np.random.default_rng(0)
    >>> tr = sdpa_forward(
    ...     rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 6))
    ... )
    >>> g = sdpa_backward(rng.normal(size=tr.out.shape), tr)
    >>> g.dq.shape, g.dk.shape, g.dv.shape, g.dbias
    ((2, 3, 4), (2, 5, 4), (2, 5, 6), None)
    """
    if not isinstance(trace, AttentionTrace):
        raise TypeError(
            f"trace must be the AttentionTrace returned by sdpa_forward; got {type(trace).__name__}"
        )
    dt = trace.out.dtype
    fl = trace.rounding or EXACT  # the forward's rounding policy (core/precision.py)
    dout = fl(as_float("dout", dout, dt))
    if dout.shape != trace.out.shape:
        raise ValueError(
            f"dout must have the output's shape (..., H, T, Dv) = {trace.out.shape}; got "
            f"{dout.shape}"
        )

    # (A8), (A9) out = P' v: ddropped (..., H, T, S), dv (..., Hkv, S, Dv)
    ddropped, dv = weighted_values_backward(dout, trace.dropped_probs, trace.v)
    ddropped, dv = fl(ddropped), fl(dv)
    # ddropped is this function's own array: (A10)-(A12) overwrite it (core/primitives.py), never
    # the trace's arrays.
    # (A10) P' = P * keep / (1 - p)
    dprobs = ddropped
    if trace.dropout_mask is not None:
        dprobs = fl(dropout_backward_into(ddropped, trace.dropout_mask, trace.dropout_p))
    # (A11) P = softmax(masked logits): dl = P (dP - D), D = sum_j P_j dP_j; (A17) the
    # log-sum-exp's cotangent adds dlse * P, i.e. D becomes D - dlse
    dot = row_dot(dprobs, trace.probs)  # (..., H, T, 1) D
    if dlse is not None:
        dot -= check_dlse(dlse, trace.logsumexp.shape, dt)[..., None]  # (A17)
    dsinks = None
    if trace.sinks is not None and trace.sink_probs is not None:
        dsinks = fl(sinks_backward(trace.sink_probs, dot[..., 0]))  # (A19)
    dmasked = fl(softmax_backward_into(dprobs, trace.probs, dot))  # (..., H, T, S)
    # (A12) masked = where(allowed, logits, fill): only allowed entries pass the gradient. A row
    # with an allowed key has P = 0 at its masked entries, so (A11) already gave them 0; only empty
    # rows (whose P the policy set) need zeroing.
    dlogits = dmasked
    if trace.allowed is not None and trace.row_is_empty.any():
        dlogits = zero_masked_into(dmasked, trace.allowed)
    dscore_mod = None
    if trace.score_mod is not None and trace.mod_input is not None:
        # (A21), (A22) logits = score_mod(capped + bias): its input's and its parameters' grads
        B, H, T, S = trace.mod_input.shape
        dlogits, dscore_mod = score_mod_backward(
            trace.score_mod, dlogits, trace.mod_input, mod_indices(B, H, T, S)
        )
        dlogits = fl(dlogits)
    # (A13) logits = capped + bias, bias broadcast: sum over the broadcast axes
    dbias = fl(add_bias_backward(dlogits, trace.bias.shape)) if trace.bias is not None else None
    # (A14) capped = cap * tanh(scores / cap)
    dscores = dlogits
    if trace.softcap is not None:
        dscores = fl(softcap_backward(dlogits, trace.capped_scores, trace.softcap))
    # (A15), (A16) scores = scale * q k^T
    dq, dk = scaled_scores_backward(dscores, trace.q, trace.k, trace.scale)
    return AttentionGrads(
        dq=fl(dq), dk=fl(dk), dv=dv, dbias=dbias, dsinks=dsinks, dscore_mod=dscore_mod
    )


def check_dlse(
    dlse: Any, shape: tuple[int, ...], dt: np.dtype, layout: str = "(..., H, T)"
) -> np.ndarray:
    """The log-sum-exp's cotangent as a float array of the log-sum-exp's shape ``layout``."""
    dlse = as_float("dlse", dlse, dt)
    if dlse.shape != shape:
        raise ValueError(
            f"dlse must have the log-sum-exp's shape {layout} = {shape}; got {dlse.shape}"
        )
    return dlse


def sinks_backward(sink_probs: np.ndarray, D: np.ndarray) -> np.ndarray:
    r"""(A19): ``dsinks`` (H,) from the sink's weights ``sink_probs`` (..., H, T) and each row's
    ``D`` (..., H, T), the softmax backward's row sum ``sum_j P_j dP_j`` minus ``dlse``.

    :math:`d\sigma_h = \sum_\text{rows} p_\text{sink} (d\text{lse} - D)`: the sink's value is 0,
    so its own ``dP`` is 0 and only the row sum reaches it (``docs/derivations/attention.md``).
    """
    heads = sink_probs.shape[-2]
    d = sum_to_shape(-(sink_probs * D)[..., None], (heads, 1, 1))  # (H, 1, 1) over the rows
    return d.reshape(heads)


def scaled_dot_product_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    return_lse: bool = False,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Scaled dot-product attention ``softmax(q k^T * scale) v``.

    Parameters
    ----------
    q : array_like, shape (..., H, T, Dk)
        Queries.
    k : array_like, shape (..., Hkv, S, Dk)
        Keys. ``Hkv`` must divide ``H``; query head ``h`` uses key/value head ``h // (H // Hkv)``
        (grouped-query attention; ``Hkv = 1`` is multi-query attention).
    v : array_like, shape (..., Hkv, S, Dv)
        Values.
    options : AttentionOptions, optional
        The attention options as one object (reusable for the backward).
    **kwargs
        Any field of :class:`~attention_ref.AttentionOptions` by name, where each is documented:
        ``mask`` (bool, True = may attend), ``bias`` (additive, ``-inf`` masks), ``causal``,
        ``align`` (``"top_left"`` or ``"bottom_right"``), ``window`` (``(left, right)``),
        ``chunk_size``, ``sink_tokens``, ``sinks`` (one logit per query head, shape (H,)),
        ``softcap``, ``scale`` (``1 / sqrt(Dk)`` by default), ``dropout_p``, ``dropout_mask``
        (a keep-mask or a Generator), ``empty_rows`` (``"zero"``, ``"uniform"``, ``"nan"``,
        ``"raise"``) and ``dtype``. A keyword overrides the same field of ``options``.
    return_lse : bool, default False
        Also return the log-sum-exp of each row.

    Returns
    -------
    out : ndarray, shape (..., H, T, Dv)
    lse : ndarray, shape (..., H, T)
        Only with ``return_lse=True``: ``log sum_j exp(logit_j)`` over the row's allowed keys
        (and ``+ exp(sinks[h])`` with sinks), natural log, before dropout; ``-inf`` on a row with
        nothing to attend. :func:`~attention_ref.lse_to_convention` converts it to base 2 or to
        ``+inf`` empty rows, and :func:`~attention_ref.merge_attention_states` merges such states.

    Notes
    -----
    .. math::
        s = \text{scale}\; q k^\top \ \text{(A1)},\quad
        c = \text{cap}\tanh(s/\text{cap}) \ \text{(A2)},\quad
        \ell = c + \text{bias} \ \text{(A3)},\quad
        \tilde\ell = \ell \text{ where allowed, else a finite fill} \ \text{(A4)},

        P = \operatorname{softmax}(\tilde\ell) \ \text{(A5)},\quad
        P' = P \odot \text{keep} / (1 - p) \ \text{(A6)},\quad
        \text{out} = P' v \ \text{(A7)}.

    See ``docs/derivations/attention.md``; :func:`sdpa_forward` returns every intermediate.

    References
    ----------
    Vaswani et al. (2017), "Attention is all you need".

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> rng = np.random.default_rng(0)
    >>> q = rng.normal(size=(2, 4, 3, 8))     # (B, H, T, Dk)
    >>> k = rng.normal(size=(2, 2, 5, 8))     # (B, Hkv, S, Dk): GQA, 2 query heads per kv head
    >>> v = rng.normal(size=(2, 2, 5, 6))     # (B, Hkv, S, Dv)
    >>> scaled_dot_product_attention(q, k, v, causal=True, align="bottom_right").shape
    (2, 4, 3, 6)
    """
    trace = sdpa_forward(q, k, v, options=options, **kwargs)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    return (trace.out, trace.logsumexp) if return_lse else trace.out


def scaled_dot_product_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    options: AttentionOptions | None = None,
    dlse: ArrayLike | None = None,
    **kwargs: Any,
) -> AttentionGrads:
    r"""Gradients of :func:`scaled_dot_product_attention`.

    Recomputes the forward from the same inputs and options, then applies (A8)-(A16) of
    ``docs/derivations/attention.md`` (see :func:`sdpa_backward`, which skips the recompute).

    Parameters
    ----------
    dout : array_like, shape (..., H, T, Dv)
        Gradient of the loss with respect to the output.
    q, k, v
        The forward's inputs.
    options : AttentionOptions, optional
        The forward's options as one object.
    **kwargs
        The forward's options by name, as for :func:`scaled_dot_product_attention`. A dropout
        ``dropout_mask`` must be the keep-mask the forward used: a Generator is refused here (it
        would draw a different mask).
    dlse : array_like, shape (..., H, T), optional
        Gradient with respect to the log-sum-exp the forward returned with ``return_lse=True``,
        (A17); see :func:`sdpa_backward`.

    Returns
    -------
    AttentionGrads
        ``dq`` (..., H, T, Dk), ``dk`` (..., Hkv, S, Dk), ``dv`` (..., Hkv, S, Dv), ``dbias``
        (the bias's shape; None without a bias), ``dsinks`` ((H,); None without sinks). With
        GQA, ``dk`` and ``dv`` sum over the query heads of each group, (A9) and (A16).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention_backward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(4, 3, 8)), rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 6))
    >>> g = scaled_dot_product_attention_backward(rng.normal(size=(4, 3, 6)), q, k, v,
    ...                                           bias=np.zeros((3, 5)))
    >>> g.dq.shape, g.dk.shape, g.dv.shape, g.dbias.shape
    ((4, 3, 8), (2, 5, 8), (2, 5, 6), (3, 5))
    """
    given = AttentionOptions.of(options, **kwargs)
    require_forward_dropout_mask(given.dropout_mask, "sdpa_forward/sdpa_backward")
    return sdpa_backward(dout, sdpa_forward(q, k, v, options=given), dlse)
