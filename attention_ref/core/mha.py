r"""Multi-head attention: projections, head split, scaled dot-product attention, merge, output.

It composes the stages and adds no math of its own::

    q = split_heads(query @ w_q + b_q, H)       (M1)   (..., H, T, Dk)
    k = split_heads(key @ w_k + b_k, Hkv)       (M2)   (..., Hkv, S, Dk)
    v = split_heads(value @ w_v + b_v, Hkv)     (M3)   (..., Hkv, S, Dv)
    context = attention(q, k, v, options)       (M4)   (..., H, T, Dv)
    concat = merge_heads(context)               (M5)   (..., T, H*Dv)
    out = concat @ w_o + b_o                    (M6)   (..., T, D_out)

and the backward runs the stages' backwards in reverse, (M7)-(M10) in
``docs/derivations/mha.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ._validate import as_float, check_ndim, check_nonempty, check_positive_int, fresh
from .attention import (
    AttentionTrace,
    require_forward_dropout_mask,
    sdpa_backward,
    sdpa_forward,
)
from .heads import merge_heads, merge_heads_backward, split_heads, split_heads_backward
from .linear import LinearGrads, linear, linear_backward
from .options import AttentionOptions
from .precision import EXACT


@dataclass(frozen=True)
class MultiHeadParams:
    r"""The weights of one multi-head attention layer, in math layout ``y = x @ w + b``.

    Attributes
    ----------
    w_q : ndarray, shape (Dq_in, H*Dk)
        Query projection. Head ``h`` owns columns ``h*Dk : (h+1)*Dk``.
    w_k : ndarray, shape (Dk_in, Hkv*Dk)
        Key projection (``Dk_in`` is PyTorch's ``kdim``).
    w_v : ndarray, shape (Dv_in, Hkv*Dv)
        Value projection (``Dv_in`` is PyTorch's ``vdim``).
    w_o : ndarray, shape (H*Dv, D_out)
        Output projection.
    b_q, b_k, b_v, b_o : ndarray or None
        Biases of shapes (H*Dk,), (Hkv*Dk,), (Hkv*Dv,), (D_out,); None for no bias.
    num_heads, num_kv_heads : int or None
        The head counts the weights were made for (:func:`init_params` records them). When
        given, :func:`multi_head_attention` refuses other counts: weights for 4 heads of width 8
        would otherwise run as 8 heads of width 4, another model, without a word. None: not
        recorded (weights from elsewhere), not checked.

    Notes
    -----
    PyTorch's ``nn.MultiheadAttention`` stores the transposes, ``(out, in)``, packed into
    ``in_proj_weight`` when kdim = vdim = embed_dim. The same class holds gradients:
    :func:`multi_head_attention_backward` returns one whose fields are the gradients of these.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import init_params
    >>> p = init_params(np.random.default_rng(0), d_model=8, num_heads=2)
    >>> p.w_q.shape, p.w_o.shape, p.b_o.shape
    ((8, 8), (8, 8), (8,))
    """

    w_q: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    w_o: np.ndarray
    b_q: np.ndarray | None = None
    b_k: np.ndarray | None = None
    b_v: np.ndarray | None = None
    b_o: np.ndarray | None = None
    # int or None; typed Any so that MultiHeadParams(**dict_of_arrays) type-checks
    num_heads: Any = field(default=None, compare=False)
    num_kv_heads: Any = field(default=None, compare=False)

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays that are present, by field name (biases that are None are left out; the
        head counts are not arrays and are left out too)."""
        return {n: getattr(self, n) for n in _WEIGHT_NAMES if getattr(self, n) is not None}


#: The array fields of :class:`MultiHeadParams`, in order.
_WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


def init_params(
    rng: np.random.Generator,
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    kdim: int | None = None,
    vdim: int | None = None,
    out_dim: int | None = None,
    bias: bool = True,
) -> MultiHeadParams:
    r"""Random :class:`MultiHeadParams` drawn from ``rng``.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness.
    d_model : int
        D, the query input width.
    num_heads : int
        H.
    num_kv_heads : int, optional
        Hkv (divides H); H when omitted. 1 gives multi-query attention.
    head_dim : int, optional
        Dk; ``d_model // num_heads`` when omitted (then H must divide D).
    v_head_dim : int, optional
        Dv; ``head_dim`` when omitted.
    kdim, vdim : int, optional
        Widths of the key and value inputs (cross-attention); ``d_model`` when omitted.
    out_dim : int, optional
        Output width; ``d_model`` when omitted.
    bias : bool, default True
        Draw the four biases (else they are None).

    Returns
    -------
    MultiHeadParams

    Notes
    -----
    Weights are Glorot-uniform, :math:`U(-a, a)` with :math:`a = \sqrt{6/(\text{in}+\text{out})}`,
    as PyTorch initialises ``in_proj_weight``. Biases are :math:`U(-1/\sqrt{\text{in}},
    1/\sqrt{\text{in}})` (``nn.Linear``'s rule) rather than PyTorch MHA's zeros, so that a test
    using them exercises the bias paths.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import init_params
    >>> p = init_params(np.random.default_rng(0), d_model=12, num_heads=4, num_kv_heads=2,
    ...                 head_dim=5, v_head_dim=7, kdim=6, vdim=9)
    >>> p.w_q.shape, p.w_k.shape, p.w_v.shape, p.w_o.shape
    ((12, 20), (6, 10), (9, 14), (28, 12))
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    if not isinstance(bias, (bool, np.bool_)):
        raise TypeError(f"bias must be a bool; got {bias!r}")
    d_model = check_positive_int("d_model", d_model)
    H = check_positive_int("num_heads", num_heads)
    Hkv = H if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
    if H % Hkv:
        raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={Hkv}")
    if head_dim is None:
        if d_model % H:
            raise ValueError(
                f"d_model={d_model} must be divisible by num_heads={H} when head_dim is not given"
            )
        head_dim = d_model // H
    Dk = check_positive_int("head_dim", head_dim)
    Dv = Dk if v_head_dim is None else check_positive_int("v_head_dim", v_head_dim)
    kdim = d_model if kdim is None else check_positive_int("kdim", kdim)
    vdim = d_model if vdim is None else check_positive_int("vdim", vdim)
    out_dim = d_model if out_dim is None else check_positive_int("out_dim", out_dim)

    def weight(n_in, n_out):
        a = math.sqrt(6.0 / (n_in + n_out))
        return rng.uniform(-a, a, size=(n_in, n_out))

    def bias_of(n_in, n_out):
        a = 1.0 / math.sqrt(n_in)
        return rng.uniform(-a, a, size=(n_out,)) if bias else None

    return MultiHeadParams(
        w_q=weight(d_model, H * Dk),
        w_k=weight(kdim, Hkv * Dk),
        w_v=weight(vdim, Hkv * Dv),
        w_o=weight(H * Dv, out_dim),
        b_q=bias_of(d_model, H * Dk),
        b_k=bias_of(kdim, Hkv * Dk),
        b_v=bias_of(vdim, Hkv * Dv),
        b_o=bias_of(H * Dv, out_dim),
        num_heads=H,
        num_kv_heads=Hkv,
    )


class MultiHeadTrace(NamedTuple):
    """Every intermediate of one :func:`mha_forward` call, by name."""

    query: np.ndarray  #: (..., T, Dq_in)
    key: np.ndarray  #: (..., S, Dk_in)
    value: np.ndarray  #: (..., S, Dv_in)
    params: MultiHeadParams  #: converted weights
    num_heads: int  #: H
    num_kv_heads: int  #: Hkv
    q: np.ndarray  #: (..., H, T, Dk) per-head queries, (M1)
    k: np.ndarray  #: (..., Hkv, S, Dk) per-head keys, (M2)
    v: np.ndarray  #: (..., Hkv, S, Dv) per-head values, (M3)
    attention: AttentionTrace  #: scores, masked scores, row max, logsumexp, weights, ... (M4)
    context: np.ndarray  #: (..., H, T, Dv) per-head attention output, (M4)
    concat: np.ndarray  #: (..., T, H*Dv) heads concatenated, (M5)
    out: np.ndarray  #: (..., T, D_out) output, (M6)


class MultiHeadGrads(NamedTuple):
    """Gradients of multi-head attention. For self-attention, sum dquery, dkey and dvalue."""

    dquery: np.ndarray  #: (..., T, Dq_in)
    dkey: np.ndarray  #: (..., S, Dk_in)
    dvalue: np.ndarray  #: (..., S, Dv_in)
    dparams: MultiHeadParams  #: gradients of every weight and bias (None where the bias is None)
    dbias: np.ndarray | None  #: gradient of the attention bias, or None
    dsinks: np.ndarray | None = None  #: (H,) gradient of the sink logits, or None

    def as_dict(self) -> dict[str, np.ndarray]:
        """Every gradient keyed by the name of its input: ``query``, ``key``, ``value``,
        ``w_q``, ..., ``bias``; gradients that are None are left out. Handy for
        :func:`attention_ref.gradcheck.check_vjp`."""
        out = {
            "query": self.dquery,
            "key": self.dkey,
            "value": self.dvalue,
            **self.dparams.as_dict(),
        }
        if self.dbias is not None:
            out["bias"] = self.dbias
        if self.dsinks is not None:
            out["sinks"] = self.dsinks
        return out


def _check_params(params, dt):
    if not isinstance(params, MultiHeadParams):
        raise TypeError(f"params must be a MultiHeadParams; got {type(params).__name__}")
    conv: dict[str, Any] = {}
    for name in _WEIGHT_NAMES:
        value = getattr(params, name)
        if value is None:
            if name.startswith("w_"):
                raise TypeError(f"params.{name} must be an array; got None")
            conv[name] = None
            continue
        arr = as_float(f"params.{name}", value, dt)
        want = 2 if name.startswith("w_") else 1
        if arr.ndim != want:
            layout = "(in, out)" if want == 2 else "(out,)"
            raise ValueError(f"params.{name} must have shape {layout}; got shape {arr.shape}")
        conv[name] = fresh(arr, value)
    return MultiHeadParams(**conv, num_heads=params.num_heads, num_kv_heads=params.num_kv_heads)


def _check_head_counts(params: MultiHeadParams, H: int, Hkv: int) -> None:
    """Refuse head counts other than the ones the weights were made for (when recorded)."""
    made = (params.num_heads, params.num_kv_heads)
    if (made[0] is not None and made[0] != H) or (made[1] is not None and made[1] != Hkv):
        raise ValueError(
            f"params were made for num_heads={made[0]}, num_kv_heads={made[1]}; got "
            f"num_heads={H}, num_kv_heads={Hkv} (the same weights would compute another model)"
        )


def _check_widths(query, key, value, p: MultiHeadParams, H: int, Hkv: int):
    for name, x, w, layout in (
        ("query", query, "w_q", "(..., T, Dq_in)"),
        ("key", key, "w_k", "(..., S, Dk_in)"),
        ("value", value, "w_v", "(..., S, Dv_in)"),
    ):
        check_ndim(name, x, 2, layout)
        check_nonempty(name, x, layout)
        n_in = getattr(p, w).shape[0]
        if x.shape[-1] != n_in:
            raise ValueError(
                f"{name}'s last axis must match params.{w}.shape[0] = {n_in}; got "
                f"{name}.shape={x.shape}"
            )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key and value must share (..., S); got key.shape={key.shape}, "
            f"value.shape={value.shape}"
        )
    if query.shape[:-2] != key.shape[:-2]:
        raise ValueError(
            f"query and key must have the same batch dims (...); got query.shape={query.shape}, "
            f"key.shape={key.shape}"
        )
    if p.w_q.shape[1] % H:
        raise ValueError(
            f"params.w_q has {p.w_q.shape[1]} columns (H*Dk), not divisible by num_heads={H}"
        )
    Dk = p.w_q.shape[1] // H
    if p.w_k.shape[1] != Hkv * Dk:
        raise ValueError(
            f"params.w_k must have Hkv*Dk = {Hkv}*{Dk} = {Hkv * Dk} columns; got shape "
            f"{p.w_k.shape}"
        )
    if p.w_v.shape[1] % Hkv:
        raise ValueError(
            f"params.w_v has {p.w_v.shape[1]} columns (Hkv*Dv), not divisible by num_kv_heads={Hkv}"
        )
    Dv = p.w_v.shape[1] // Hkv
    if p.w_o.shape[0] != H * Dv:
        raise ValueError(
            f"params.w_o must have H*Dv = {H}*{Dv} = {H * Dv} rows; got shape {p.w_o.shape}"
        )
    for b, w, axis in (("b_q", "w_q", 1), ("b_k", "w_k", 1), ("b_v", "w_v", 1), ("b_o", "w_o", 1)):
        bias = getattr(p, b)
        if bias is not None and bias.shape != (getattr(p, w).shape[axis],):
            raise ValueError(
                f"params.{b} must have shape ({getattr(p, w).shape[axis]},); got {bias.shape}"
            )


def mha_forward(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> MultiHeadTrace:
    r"""Multi-head attention, returning every intermediate in a :class:`MultiHeadTrace`.

    Takes the same arguments as :func:`multi_head_attention`; pass the trace to
    :func:`mha_backward` for the gradients without recomputing.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import init_params, mha_forward
    >>> rng = np.random.default_rng(0)
    >>> p = init_params(rng, d_model=8, num_heads=2)
    >>> x = rng.normal(size=(3, 5, 8))
    >>> tr = mha_forward(x, x, x, p, num_heads=2, causal=True)
    >>> tr.q.shape, tr.attention.probs.shape, tr.concat.shape, tr.out.shape
    ((3, 2, 5, 4), (3, 2, 5, 5), (3, 5, 8), (3, 5, 8))
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("mha_forward")
    weights = params.as_dict().values() if isinstance(params, MultiHeadParams) else ()
    dt = given.compute_dtype(query, key, value, *weights)
    H = check_positive_int("num_heads", num_heads)
    Hkv = H if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
    if H % Hkv:
        raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={Hkv}")
    p = _check_params(params, dt)
    _check_head_counts(p, H, Hkv)
    query_in, key_in, value_in = query, key, value
    query = as_float("query", query, dt)
    key = query if key is query_in else as_float("key", key, dt)
    value = (
        query if value is query_in else (key if value is key_in else as_float("value", value, dt))
    )
    _check_widths(query, key, value, p, H, Hkv)
    # fl: each stage's output rounded to the working precision, the identity for the reference
    # (core/precision.py); a low-precision layer holds its inputs and weights rounded too.
    fl = given.rounding or EXACT
    if not fl.exact:
        query, key, value = fl(query), fl(key), fl(value)
        p = MultiHeadParams(**{n: fl(a) for n, a in p.as_dict().items()})

    # (..., T, Dq_in) -> (..., H, T, Dk)   (M1)
    q = split_heads(fl(linear(query, p.w_q, p.b_q, dtype=dt)), H, dtype=dt)
    # (..., S, Dk_in) -> (..., Hkv, S, Dk)   (M2)
    k = split_heads(fl(linear(key, p.w_k, p.b_k, dtype=dt)), Hkv, dtype=dt)
    # (..., S, Dv_in) -> (..., Hkv, S, Dv)   (M3)
    v = split_heads(fl(linear(value, p.w_v, p.b_v, dtype=dt)), Hkv, dtype=dt)
    attn = sdpa_forward(q, k, v, options=given.replace(dtype=dt))  # (..., H, T, Dv)   (M4)
    concat = merge_heads(attn.out, dtype=dt)  # (..., H, T, Dv) -> (..., T, H*Dv)   (M5)
    # (..., T, H*Dv) @ (H*Dv, D_out) -> (..., T, D_out)   (M6)
    out = fl(linear(concat, p.w_o, p.b_o, dtype=dt))
    return MultiHeadTrace(
        query=fresh(query, query_in),
        key=fresh(key, key_in),
        value=fresh(value, value_in),
        params=p,
        num_heads=H,
        num_kv_heads=Hkv,
        q=q,
        k=k,
        v=v,
        attention=attn,
        context=attn.out,
        concat=concat,
        out=out,
    )


def mha_backward(dout: ArrayLike, trace: MultiHeadTrace) -> MultiHeadGrads:
    r"""Gradients of multi-head attention from a forward :class:`MultiHeadTrace`.

    Runs the stages' backwards in reverse: (M7) the output projection (L2)-(L4), (M8) the head
    merge (H4), (M9) attention (A8)-(A16), (M10) the head splits and input projections. See
    ``docs/derivations/mha.md``.

    Parameters
    ----------
    dout : array_like, shape (..., T, D_out)
        Gradient of the loss with respect to the output.
    trace : MultiHeadTrace
        What :func:`mha_forward` returned.

    Returns
    -------
    MultiHeadGrads
        ``dquery``, ``dkey``, ``dvalue``, ``dparams`` (a :class:`MultiHeadParams` of gradients)
        and ``dbias`` (the attention bias's gradient, or None).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import init_params, mha_forward, mha_backward
    >>> rng = np.random.default_rng(0)
    >>> p = init_params(rng, d_model=8, num_heads=2, bias=False)
    >>> x = rng.normal(size=(3, 5, 8))
    >>> tr = mha_forward(x, x, x, p, num_heads=2)
    >>> g = mha_backward(rng.normal(size=tr.out.shape), tr)
    >>> (g.dquery + g.dkey + g.dvalue).shape, g.dparams.w_q.shape, g.dparams.b_q
    ((3, 5, 8), (8, 8), None)
    """
    if not isinstance(trace, MultiHeadTrace):
        raise TypeError(
            f"trace must be the MultiHeadTrace returned by mha_forward; got {type(trace).__name__}"
        )
    p, dt = trace.params, trace.out.dtype
    H = trace.num_heads
    fl = trace.attention.rounding or EXACT  # the forward's rounding policy (core/precision.py)
    dout = fl(as_float("dout", dout, dt))
    if dout.shape != trace.out.shape:
        raise ValueError(
            f"dout must have the output's shape (..., T, D_out) = {trace.out.shape}; got "
            f"{dout.shape}"
        )

    def rounded(g: LinearGrads) -> LinearGrads:
        return g if fl.exact else LinearGrads(fl(g.dx), fl(g.dweight), fl(g.dbias))

    g_o = rounded(linear_backward(dout, trace.concat, p.w_o, p.b_o, dtype=dt))  # (M7), (L2)-(L4)
    dcontext = merge_heads_backward(g_o.dx, H, dtype=dt)  # (..., T, H*Dv) -> (..., H, T, Dv)   (M8)
    g_attn = sdpa_backward(dcontext, trace.attention)  # (M9) via (A8)-(A16)
    # (M10) back through each head split and input projection
    dq, dk, dv = (split_heads_backward(g, dtype=dt) for g in (g_attn.dq, g_attn.dk, g_attn.dv))
    g_q = rounded(linear_backward(dq, trace.query, p.w_q, p.b_q, dtype=dt))
    g_k = rounded(linear_backward(dk, trace.key, p.w_k, p.b_k, dtype=dt))
    g_v = rounded(linear_backward(dv, trace.value, p.w_v, p.b_v, dtype=dt))
    dparams = MultiHeadParams(
        w_q=g_q.dweight,
        w_k=g_k.dweight,
        w_v=g_v.dweight,
        w_o=g_o.dweight,
        b_q=g_q.dbias,
        b_k=g_k.dbias,
        b_v=g_v.dbias,
        b_o=g_o.dbias,
    )
    return MultiHeadGrads(
        dquery=g_q.dx,
        dkey=g_k.dx,
        dvalue=g_v.dx,
        dparams=dparams,
        dbias=g_attn.dbias,
        dsinks=g_attn.dsinks,
    )


def multi_head_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> np.ndarray:
    r"""Multi-head attention: project, split heads, attend, merge, project.

    Parameters
    ----------
    query : array_like, shape (..., T, Dq_in)
    key : array_like, shape (..., S, Dk_in)
    value : array_like, shape (..., S, Dv_in)
        For self-attention pass the same array three times.
    params : MultiHeadParams
        Weights in ``(in, out)`` layout (see :func:`init_params`).
    num_heads : int
        H; divides ``params.w_q``'s columns into heads of width Dk.
    num_kv_heads : int, optional
        Hkv (grouped-query attention); H when omitted.
    options : AttentionOptions, optional
        The attention options of the per-head attention (M4), as one object.
    **kwargs
        Any field of :class:`~attention_ref.AttentionOptions` by name (``mask``, ``bias``,
        ``causal``, ``align``, ``window``, ``softcap``, ``scale``, ``dropout_p``,
        ``dropout_mask``, ``empty_rows``; ``dtype`` also sets the projections' compute dtype).
        Masks, biases and keep-masks are over the per-head scores, (..., H, T, S).

    Returns
    -------
    out : ndarray, shape (..., T, D_out)

    Notes
    -----
    Equations (M1)-(M6) of ``docs/derivations/mha.md``:
    :math:`q = \operatorname{split}(x_q W_q + b_q)`, likewise k and v with Hkv heads,
    :math:`\text{out} = \operatorname{merge}(\operatorname{attention}(q, k, v))\, W_o + b_o`.

    A fully masked query row has, under ``empty_rows="zero"``, a zero *context*; its output row
    is then ``b_o`` (0 without an output bias).

    References
    ----------
    Vaswani et al. (2017), "Attention is all you need"; Ainslie et al. (2023), "GQA".

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import init_params, multi_head_attention
    >>> rng = np.random.default_rng(0)
    >>> p = init_params(rng, d_model=8, num_heads=4, num_kv_heads=2, kdim=6, vdim=5)
    >>> x, mem_k, mem_v = (
    ...     rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 7, 6)), rng.normal(size=(2, 7, 5))
    ... )
    >>> multi_head_attention(x, mem_k, mem_v, p, num_heads=4, num_kv_heads=2).shape
    (2, 3, 8)
    """
    return mha_forward(
        query,
        key,
        value,
        params,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        options=options,
        **kwargs,
    ).out


def multi_head_attention_backward(
    dout: ArrayLike,
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> MultiHeadGrads:
    r"""Gradients of :func:`multi_head_attention`.

    Recomputes the forward, then applies (M7)-(M10) of ``docs/derivations/mha.md`` (see
    :func:`mha_backward`, which takes a trace and skips the recompute).

    Parameters
    ----------
    dout : array_like, shape (..., T, D_out)
        Gradient of the loss with respect to the output.
    query, key, value, params, num_heads, num_kv_heads
        The forward's inputs, as for :func:`multi_head_attention`.
    options : AttentionOptions, optional
        The forward's attention options as one object.
    **kwargs
        The forward's options by name. A dropout ``dropout_mask`` must be the keep-mask the
        forward used: a Generator is refused here (it would draw a different mask).

    Returns
    -------
    MultiHeadGrads
        ``dquery``, ``dkey``, ``dvalue``, ``dparams`` (a :class:`MultiHeadParams` of gradients;
        None where a bias is None) and ``dbias`` (the attention bias's gradient, or None).
        **Self-attention**: the loss sees the one input three times, so its gradient is
        ``dquery + dkey + dvalue``; the caller sums them.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import init_params, multi_head_attention_backward
    >>> rng = np.random.default_rng(0)
    >>> p = init_params(rng, d_model=8, num_heads=2)
    >>> x = rng.normal(size=(2, 5, 8))
    >>> g = multi_head_attention_backward(rng.normal(size=(2, 5, 8)), x, x, x, p, num_heads=2)
    >>> dx = g.dquery + g.dkey + g.dvalue        # self-attention: sum the three
    >>> dx.shape, g.dparams.w_o.shape
    ((2, 5, 8), (8, 8))
    """
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("multi_head_attention_backward")
    require_forward_dropout_mask(given.dropout_mask, "mha_forward/mha_backward")
    trace = mha_forward(
        query, key, value, params, num_heads=num_heads, num_kv_heads=num_kv_heads, options=given
    )
    return mha_backward(dout, trace)
