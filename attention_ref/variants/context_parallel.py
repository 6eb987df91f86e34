r"""Context parallelism, simulated: ring and zigzag attention over ``world_size`` ranks.

The sequence is split over W ranks. Each rank keeps its own queries and passes its key/value
block around a ring: at step ``s`` (0 to W - 1) rank ``r`` holds the block of rank
``(r - s) mod W``, computes the partial attention of its queries over those keys, and merges it
into its running state with :func:`~attention_ref.merge_attention_states`, (C1)-(C3) of
``docs/derivations/merge.md``. After W steps every rank has attention over the whole sequence.
This is ring attention (Liu et al. 2023) as ``zhuzilin/ring-flash-attention`` and Megatron-LM's
context parallelism implement it; nothing here runs in parallel: the ranks are a loop, so that
each step's partial can be inspected (:class:`ContextParallelTrace`).

Schedules (``rank_positions``):

* ``"ring"``: the T positions cut into W contiguous chunks; rank r holds chunk r.
* ``"zigzag"``: cut into 2W chunks; rank r holds chunks r and 2W - 1 - r, so that under a causal
  mask every rank has the same amount of work (ring-flash-attention's ``zigzag_ring_flash_attn``,
  Megatron's load-balanced context parallelism).

The backward follows the same ring: each rank keeps its queries, its final output and
log-sum-exp; the key/value blocks travel again, each with a ``(dk, dv)`` accumulator that every
rank it visits adds its contribution to, and which returns to its owner at the end. Each step's
contribution is the FlashAttention-2 backward of the rank's queries over the block, from the
*final* output and log-sum-exp, (F6)-(F9) of ``docs/derivations/flash.md``.

The partials are computed by the tiled path (:mod:`attention_ref.variants.flash`) on the rank's
rows and the block's keys, with the pairs that may attend taken from the one builder at their
global positions (:meth:`~attention_ref.AllowedPairs.take`), so every mask option works.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ..core._validate import as_float, check_choice, check_positive_int, sum_to_shape
from ..core.attention import AttentionGrads, check_dlse, check_qkv, sinks_backward
from ..core.masks import AllowedPairs
from ..core.merge import add_sinks, merge_attention_states
from ..core.options import AttentionOptions, CheckedOptions
from ..core.primitives import row_dot
from .flash import (
    _empty_rows_backward,
    _empty_rows_forward,
    flash_attention_backward,
    flash_attention_forward,
)

__all__ = [
    "SCHEDULES",
    "ContextParallelStep",
    "ContextParallelTrace",
    "context_parallel_attention",
    "context_parallel_attention_backward",
    "context_parallel_backward",
    "context_parallel_forward",
    "rank_positions",
]

#: The ways the sequence is cut over the ranks.
SCHEDULES = ("ring", "zigzag")


def rank_positions(length: int, world_size: int, schedule: str = "ring") -> list[np.ndarray]:
    r"""The sequence positions each rank holds, ``world_size`` arrays of ``length / world_size``.

    Parameters
    ----------
    length : int
        T (or S): the sequence length; a multiple of ``world_size`` (ring) or of
        ``2 * world_size`` (zigzag), as the implementations require.
    world_size : int
        W, the number of ranks.
    schedule : {"ring", "zigzag"}, default "ring"
        ``"ring"``: rank r holds chunk r of W. ``"zigzag"``: rank r holds chunks r and
        ``2W - 1 - r`` of 2W.

    Returns
    -------
    list of ndarray of int64
        ``positions[r]`` in increasing order.

    Examples
    --------
    >>> from attention_ref.variants.context_parallel import rank_positions
    >>> [p.tolist() for p in rank_positions(8, 2, "zigzag")]
    [[0, 1, 6, 7], [2, 3, 4, 5]]
    """
    length = check_positive_int("length", length)
    world_size = check_positive_int("world_size", world_size)
    schedule = check_choice("schedule", schedule, SCHEDULES)
    pieces = world_size if schedule == "ring" else 2 * world_size
    if length % pieces:
        raise ValueError(
            f"the sequence length {length} must be a multiple of {pieces} "
            f"({'world_size' if schedule == 'ring' else '2 * world_size'}) for the {schedule!r} "
            f"schedule with world_size={world_size}"
        )
    chunks = np.arange(length, dtype=np.int64).reshape(pieces, length // pieces)
    if schedule == "ring":
        return [chunks[r] for r in range(world_size)]
    return [np.concatenate([chunks[r], chunks[pieces - 1 - r]]) for r in range(world_size)]


class ContextParallelStep(NamedTuple):
    """What rank ``rank`` computed at step ``step`` of the ring."""

    rank: int  #: r
    step: int  #: s
    source: int  #: (r - s) mod W: the rank whose key/value block was held at this step
    kind: str  #: "empty" (no pair may attend: skipped), "partial" or "full"
    out: np.ndarray  #: (..., H, T_r, Dv) the partial output over the block's keys (0 where none)
    lse: np.ndarray  #: (..., H, T_r) its log-sum-exp, -inf on a row with no key in the block
    merged_out: np.ndarray  #: (..., H, T_r, Dv) the running state after merging this step, (C3)
    merged_lse: np.ndarray  #: (..., H, T_r) its log-sum-exp, (C1)


class ContextParallelTrace(NamedTuple):
    """One :func:`context_parallel_forward` call: every rank's every step, and the result."""

    q: np.ndarray  #: (..., H, T, Dk) the queries (compute dtype)
    k: np.ndarray  #: (..., Hkv, S, Dk)
    v: np.ndarray  #: (..., Hkv, S, Dv)
    options: AttentionOptions  #: the attention options, as given
    world_size: int  #: W
    schedule: str  #: "ring" or "zigzag"
    query_positions: tuple[np.ndarray, ...]  #: per rank, the query positions it holds
    key_positions: tuple[np.ndarray, ...]  #: per rank, the key/value positions it owns
    steps: tuple[tuple[ContextParallelStep, ...], ...]  #: ``steps[r][s]``
    out: np.ndarray  #: (..., H, T, Dv) the output, every rank's rows in place
    logsumexp: np.ndarray  #: (..., H, T) natural log; -inf on a row with nothing to attend


class _Problem(NamedTuple):
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    opt: CheckedOptions
    pairs: AllowedPairs
    qpos: list[np.ndarray]
    kpos: list[np.ndarray]


def _prepare(q, k, v, world_size, schedule, options, kwargs) -> tuple[AttentionOptions, _Problem]:
    given = AttentionOptions.of(options, **kwargs)
    given.refuse(
        ("dropout_p", "dropout_mask"),
        "context-parallel attention",
        "its steps run on the tiled path, which has no dropout",
        what="dropout",
    )
    given.refuse(
        ("rounding",),
        "context-parallel attention",
        "the rounding policy of the baselines is the plain path's (sdpa_forward)",
    )
    dt = given.compute_dtype(q, k, v)
    q, k, v = check_qkv(q, k, v, dt)
    opt = given.check(q, k)
    world_size = check_positive_int("world_size", world_size)
    schedule = check_choice("schedule", schedule, SCHEDULES)
    T, S = q.shape[-2], k.shape[-2]
    try:
        qpos = rank_positions(T, world_size, schedule)
        kpos = rank_positions(S, world_size, schedule)
    except ValueError as exc:
        raise ValueError(f"q has T={T} and k has S={S} positions: {exc}") from None
    pairs = AllowedPairs.from_options(opt, T, S)
    return given, _Problem(q, k, v, opt, pairs, qpos, kpos)


def _block(x: np.ndarray | None, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    """Rows ``rows`` and columns ``cols`` of an array broadcastable to (..., T, S)."""
    if x is None:
        return None
    sub = x[..., rows, :] if x.shape[-2] != 1 else x
    return sub[..., cols] if x.shape[-1] != 1 else sub


def _step_options(opt: CheckedOptions, allowed, bias) -> dict[str, Any]:
    """The options of one step's sub-problem: its pairs as a mask (global positions), its bias."""
    return dict(
        mask=allowed,
        bias=bias,
        softcap=opt.softcap,
        scale=opt.score_scale,
        empty_rows="zero",  # a row with no key in this block is a -inf partial, (C2)
        dtype=opt.dtype,
    )


def context_parallel_forward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    world_size: int,
    schedule: str = "ring",
    *,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> ContextParallelTrace:
    r"""Context-parallel attention, returning every rank's every step in a
    :class:`ContextParallelTrace`.

    Takes the same arguments as :func:`context_parallel_attention`; pass the trace to
    :func:`context_parallel_backward`.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.variants.context_parallel import context_parallel_forward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 3))
    >>> tr = context_parallel_forward(q, k, v, 2, "zigzag", causal=True)
    >>> [(st.rank, st.step, st.source, st.kind) for steps in tr.steps for st in steps]
    [(0, 0, 0, 'partial'), (0, 1, 1, 'partial'), (1, 0, 1, 'partial'), (1, 1, 0, 'partial')]
    """
    given, pb = _prepare(q, k, v, world_size, schedule, options, kwargs)
    W, opt = len(pb.qpos), pb.opt
    out = np.zeros(pb.q.shape[:-1] + (pb.v.shape[-1],), dtype=pb.q.dtype)  # (..., H, T, Dv)
    lse = np.full(pb.q.shape[:-1], -np.inf, dtype=pb.q.real.dtype)  # (..., H, T)
    steps: list[tuple[ContextParallelStep, ...]] = []
    for r in range(W):
        rows = pb.qpos[r]
        q_r = pb.q[..., rows, :]  # (..., H, T_r, Dk): rank r's queries never move
        state = None
        rank_steps = []
        for s in range(W):
            src = (r - s) % W  # the key/value block held at step s
            cols = pb.kpos[src]
            kind, allowed = pb.pairs.take(rows, cols)
            if kind == "empty":
                # nothing may attend: skipped, as the ring implementations skip it (C2: weight 0)
                part_out = np.zeros(q_r.shape[:-1] + (pb.v.shape[-1],), dtype=pb.q.dtype)
                part_lse = np.full(q_r.shape[:-1], -np.inf, dtype=lse.dtype)
            else:
                part_out, part_lse = flash_attention_forward(
                    q_r,
                    pb.k[..., cols, :],
                    pb.v[..., cols, :],
                    **_step_options(opt, allowed, _block(opt.bias, rows, cols)),
                )
            if state is None:
                state = (part_out, part_lse)
            else:
                state = merge_attention_states(
                    np.stack([state[0], part_out]), np.stack([state[1], part_lse])
                )  # (C1)-(C3): the running state and this step's partial
            rank_steps.append(
                ContextParallelStep(r, s, src, kind, part_out, part_lse, state[0], state[1])
            )
        steps.append(tuple(rank_steps))
        out_r, lse_r = rank_steps[-1].merged_out, rank_steps[-1].merged_lse
        if opt.sinks is not None:
            out_r, lse_r = add_sinks(out_r, lse_r, opt.sinks)  # (C6) once, after the last step
        out[..., rows, :] = out_r
        lse[..., rows] = lse_r
    if opt.sinks is None:
        out = _empty_rows_forward(out, lse, pb.v, opt.empty_rows)
    return ContextParallelTrace(
        q=pb.q,
        k=pb.k,
        v=pb.v,
        options=given,
        world_size=W,
        schedule=schedule,
        query_positions=tuple(pb.qpos),
        key_positions=tuple(pb.kpos),
        steps=tuple(steps),
        out=out,
        logsumexp=lse,
    )


def context_parallel_backward(
    dout: ArrayLike, trace: ContextParallelTrace, dlse: ArrayLike | None = None
) -> AttentionGrads:
    r"""Gradients of context-parallel attention from its :class:`ContextParallelTrace`.

    Each rank keeps its queries, ``dout``, final output and log-sum-exp; the key/value blocks
    travel around the ring again, each carrying a ``(dk, dv)`` accumulator, and at every step a
    rank adds the FlashAttention-2 backward of its queries over the block it holds, computed
    from the *final* output and log-sum-exp ((F6)-(F9) of ``docs/derivations/flash.md``, with
    (A17) of ``docs/derivations/attention.md`` for ``dlse``). The accumulators return to their
    owners after W steps; ``dq`` never leaves its rank.

    Parameters
    ----------
    dout : array_like, shape (..., H, T, Dv)
    trace : ContextParallelTrace
        What :func:`context_parallel_forward` returned.
    dlse : array_like, shape (..., H, T), optional
        Gradient with respect to the log-sum-exp.

    Returns
    -------
    AttentionGrads
        ``dq``, ``dk``, ``dv``, ``dbias`` (or None) and ``dsinks`` (or None), as
        :func:`~attention_ref.sdpa_backward` returns.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention_backward
    >>> from attention_ref.variants.context_parallel import (
    ...     context_parallel_backward, context_parallel_forward)
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 3))
    >>> dout = rng.normal(size=(2, 8, 3))
    >>> g = context_parallel_backward(dout, context_parallel_forward(q, k, v, 4, causal=True))
    >>> ref = scaled_dot_product_attention_backward(dout, q, k, v, causal=True)
    >>> bool(np.allclose(g.dk, ref.dk, rtol=1e-12, atol=1e-14))
    True
    """
    if not isinstance(trace, ContextParallelTrace):
        raise TypeError(
            "trace must be the ContextParallelTrace returned by context_parallel_forward; got "
            f"{type(trace).__name__}"
        )
    _, pb = _prepare(trace.q, trace.k, trace.v, trace.world_size, trace.schedule, trace.options, {})
    opt, W = pb.opt, trace.world_size
    dt = trace.out.dtype
    dout = as_float("dout", dout, dt)
    if dout.shape != trace.out.shape:
        raise ValueError(
            f"dout must have the output's shape (..., H, T, Dv) = {trace.out.shape}; got "
            f"{dout.shape}"
        )
    if dlse is not None:
        dlse = check_dlse(dlse, trace.logsumexp.shape, dt)
    out, lse = trace.out, trace.logsumexp
    dq = np.zeros(pb.q.shape, dtype=dt)  # (..., H, T, Dk)
    dbias = None if opt.bias is None else np.zeros(opt.bias.shape, dtype=dt)
    # The accumulators that travel with the key/value blocks: travel[src] = (dk, dv) of the block
    # rank src owns, (..., Hkv, S_r, Dk) and (..., Hkv, S_r, Dv)
    travel = [
        (
            np.zeros(pb.k[..., cols, :].shape, dtype=dt),
            np.zeros(pb.v[..., cols, :].shape, dtype=dt),
        )
        for cols in pb.kpos
    ]
    for s in range(W):  # step s: every rank r holds the block (and accumulator) of (r - s) mod W
        for r in range(W):
            src = (r - s) % W
            rows, cols = pb.qpos[r], pb.kpos[src]
            kind, allowed = pb.pairs.take(rows, cols)
            if kind == "empty":
                continue  # P = 0 on the whole block: no gradient from it
            g = flash_attention_backward(
                dout[..., rows, :],
                pb.q[..., rows, :],
                pb.k[..., cols, :],
                pb.v[..., cols, :],
                out[..., rows, :],
                lse[..., rows],
                dlse=None if dlse is None else dlse[..., rows],
                **_step_options(opt, allowed, _block(opt.bias, rows, cols)),
            )
            dq[..., rows, :] += g.dq  # (F9) dq stays on its rank
            travel[src][0][...] += g.dk  # (F9) into the accumulator travelling with the block
            travel[src][1][...] += g.dv
            if dbias is not None and g.dbias is not None:
                r_idx = rows if opt.bias.shape[-2] != 1 else np.zeros(1, dtype=np.int64)
                c_idx = cols if opt.bias.shape[-1] != 1 else np.zeros(1, dtype=np.int64)
                dbias[..., r_idx[:, None], c_idx[None, :]] += sum_to_shape(
                    g.dbias, dbias[..., r_idx[:, None], c_idx[None, :]].shape
                )
    # after W steps each accumulator is back at its owner: scatter to the global positions
    dk = np.zeros(pb.k.shape, dtype=dt)  # (..., Hkv, S, Dk)
    dv = np.zeros(pb.v.shape, dtype=dt)  # (..., Hkv, S, Dv)
    for src, cols in enumerate(pb.kpos):
        dk[..., cols, :] = travel[src][0]
        dv[..., cols, :] = travel[src][1]
    dsinks = None
    if opt.sinks is not None:
        # (A19) once, from the final state: d sigma_h = sum of p_sink (dlse - rowsum(dout out))
        D = row_dot(dout, out)[..., 0]  # (..., H, T)
        if dlse is not None:
            D -= dlse
        dsinks = sinks_backward(np.exp(opt.sinks[:, None] - lse), D)  # p_sink, (A18)
    else:
        _empty_rows_backward(dv, dout, lse, opt.empty_rows)
    return AttentionGrads(dq=dq, dk=dk, dv=dv, dbias=dbias, dsinks=dsinks)


def context_parallel_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    world_size: int,
    schedule: str = "ring",
    *,
    options: AttentionOptions | None = None,
    return_lse: bool = False,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Attention computed as ``world_size`` simulated context-parallel ranks compute it.

    The result equals :func:`~attention_ref.scaled_dot_product_attention` (to round-off); the
    point is the path: the queries are split over the ranks, the key/value blocks go around the
    ring, and each step's partial state is merged with (C1)-(C3) of
    ``docs/derivations/merge.md``.
    :func:`~attention_ref.variants.context_parallel.context_parallel_forward` returns every step.

    Parameters
    ----------
    q : array_like, shape (..., H, T, Dk)
    k : array_like, shape (..., Hkv, S, Dk)
    v : array_like, shape (..., Hkv, S, Dv)
        T and S must be multiples of ``world_size`` (ring) or ``2 * world_size`` (zigzag).
        Positions are global: ``causal``, ``window``, ``chunk_size`` and ``align`` mean what
        they mean on the whole sequence.
    world_size : int
        W, the number of simulated ranks.
    schedule : {"ring", "zigzag"}, default "ring"
        How the sequence is cut over the ranks
        (:func:`~attention_ref.variants.context_parallel.rank_positions`).
    options : AttentionOptions, optional
    return_lse : bool, default False
        Also return the log-sum-exp (..., H, T).
    **kwargs
        Fields of :class:`~attention_ref.AttentionOptions`, as for the tiled path (no dropout,
        no rounding). ``sinks`` are added once per rank, after its last step.

    Returns
    -------
    out : ndarray, shape (..., H, T, Dv)
    lse : ndarray, shape (..., H, T)
        With ``return_lse=True``.

    References
    ----------
    Liu, Zaharia & Abbeel (2023), "Ring attention with blockwise transformers for near-infinite
    context"; ``zhuzilin/ring-flash-attention`` (``ring_flash_attn.py``,
    ``zigzag_ring_flash_attn.py``); Megatron-LM context parallelism.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.variants.context_parallel import context_parallel_attention
    >>> rng = np.random.default_rng(0)
    >>> q = rng.normal(size=(2, 4, 8, 4))
    >>> k, v = rng.normal(size=(2, 2, 8, 4)), rng.normal(size=(2, 2, 8, 5))
    >>> out = context_parallel_attention(q, k, v, 2, "zigzag", causal=True)
    >>> ref = scaled_dot_product_attention(q, k, v, causal=True)
    >>> bool(np.allclose(out, ref, rtol=1e-13, atol=1e-15))
    True
    """
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    tr = context_parallel_forward(q, k, v, world_size, schedule, options=options, **kwargs)
    return (tr.out, tr.logsumexp) if return_lse else tr.out


def context_parallel_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    world_size: int,
    schedule: str = "ring",
    *,
    options: AttentionOptions | None = None,
    dlse: ArrayLike | None = None,
    **kwargs: Any,
) -> AttentionGrads:
    r"""Gradients of context-parallel attention, passing dk/dv around the ring.

    Recomputes the forward, then
    :func:`~attention_ref.variants.context_parallel.context_parallel_backward` ((F6)-(F9) of
    ``docs/derivations/flash.md`` at each step, (C1)-(C3) of ``docs/derivations/merge.md`` for
    the forward's merge).

    Parameters
    ----------
    dout : array_like, shape (..., H, T, Dv)
    q, k, v, world_size, schedule, options, **kwargs
        The forward's inputs and options.
    dlse : array_like, shape (..., H, T), optional
        Gradient with respect to the log-sum-exp.

    Returns
    -------
    AttentionGrads

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention_backward
    >>> from attention_ref.variants.context_parallel import context_parallel_attention_backward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 3))
    >>> dout = rng.normal(size=(2, 8, 3))
    >>> g = context_parallel_attention_backward(dout, q, k, v, 2, "zigzag", causal=True)
    >>> ref = scaled_dot_product_attention_backward(dout, q, k, v, causal=True)
    >>> bool(np.allclose(g.dq, ref.dq, rtol=1e-12, atol=1e-14))
    True
    """
    tr = context_parallel_forward(q, k, v, world_size, schedule, options=options, **kwargs)
    return context_parallel_backward(dout, tr, dlse)
