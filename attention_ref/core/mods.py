r"""Programmable attention: ``score_mod`` and ``mask_mod`` as PyTorch's FlexAttention defines them.

A **score mod** edits each logit, ``score_mod(score, b, h, q_idx, kv_idx) -> new score``; a **mask
mod** says which pairs exist, ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend).
FlexAttention calls them on scalars under ``vmap``; here a mod is called **once**, on arrays that
broadcast against each other (never per element):

=========  ====================  =========================================================
argument   shape                 meaning
=========  ====================  =========================================================
score      (B, H, T, S)          the scaled score ``q k^T * scale`` of every pair (float64)
b          (B, 1, 1, 1)          batch index, int64
h          (1, H, 1, 1)          query head index (not the key/value head of GQA), int64
q_idx      (1, 1, T, 1)          query index ``0 .. T-1`` (raw: no alignment), int64
kv_idx     (1, 1, 1, S)          key index ``0 .. S-1``, int64
=========  ====================  =========================================================

On the tiled path a mod is called per block, with the block's slices of these arrays (``q_idx``
of shape ``(1, 1, Tb, 1)`` holding the block's query positions, and so on). A mod written with
NumPy broadcasting (``h`` indexing a table, ``q_idx - kv_idx``) works unchanged on both.

Every library mod is a small object that knows its derivative: a :class:`ScoreMod` has
:meth:`~ScoreMod.grad_score` (the elementwise derivative with respect to the score, (B2)) and
:meth:`~ScoreMod.vjp_params` (the gradient of its parameters given the gradient of its output,
(B3)); :meth:`~ScoreMod.with_params` returns a copy with new parameter values (a gradient step).
A user's own function becomes a :class:`ScoreMod` through :func:`custom_score_mod`; without a
derivative of its own, the derivative is taken by the complex step, (B4)-(B5), exact for mods
that extend to complex scores analytically. The derivations are (B1)-(B14) of
``docs/derivations/flex.md``; ``docs/flex.md`` is the user's page.

Sources for the conventions: PyTorch ``torch/nn/attention/flex_attention.py`` (``flex_attention``'s
``score_mod`` signature, ``and_masks``, ``or_masks``, ``create_mask``) and
``torch/_higher_order_ops/flex_attention.py`` (``_math_attention_inner``: the mask applied after
the ``score_mod``, to the scaled scores); the mods themselves follow meta-pytorch/attention-gym
(``attn_gym/mods/``, ``attn_gym/masks/``) and Hugging Face transformers (T5's buckets), each cited
in its class.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np

from ._validate import check_count, check_positive_int, check_real_scalar

__all__ = [
    "ALiBi",
    "CausalMask",
    "ChunkedMask",
    "DocumentMask",
    "MaskMod",
    "PrefixLMMask",
    "RelativePositionBias",
    "ScoreMod",
    "SlidingWindowMask",
    "SoftCap",
    "T5RelativeBias",
    "alibi_slopes",
    "and_masks",
    "chain_score_mods",
    "custom_score_mod",
    "mod_indices",
    "or_masks",
    "t5_relative_bucket",
]

#: The complex step's imaginary increment, (B4): far below the score's round-off, so that
#: ``Im f(s + i h) / h`` is the derivative to the last bit (there is no subtraction).
COMPLEX_STEP = 1e-30

Indices = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def mod_indices(B: int, H: int, rows: Any, cols: Any) -> Indices:
    r"""The broadcasting index arrays a mod is called with, (B1).

    Parameters
    ----------
    B, H : int
        Batch size and number of query heads.
    rows, cols : int or array_like of int
        The query positions (``T`` for ``0 .. T-1``) and the key positions (``S`` for
        ``0 .. S-1``); a block passes its own positions.

    Returns
    -------
    b : ndarray, shape (B, 1, 1, 1)
    h : ndarray, shape (1, H, 1, 1)
    q_idx : ndarray, shape (1, 1, len(rows), 1)
    kv_idx : ndarray, shape (1, 1, 1, len(cols))

    Examples
    --------
    >>> from attention_ref.core.mods import mod_indices
    >>> b, h, q_idx, kv_idx = mod_indices(2, 3, 4, 5)
    >>> b.shape, h.shape, q_idx.shape, kv_idx.shape
    ((2, 1, 1, 1), (1, 3, 1, 1), (1, 1, 4, 1), (1, 1, 1, 5))
    >>> (q_idx - kv_idx).shape
    (1, 1, 4, 5)
    """
    rows = np.arange(int(rows)) if isinstance(rows, numbers.Integral) else np.asarray(rows)
    cols = np.arange(int(cols)) if isinstance(cols, numbers.Integral) else np.asarray(cols)
    return (
        np.arange(B, dtype=np.int64).reshape(B, 1, 1, 1),
        np.arange(H, dtype=np.int64).reshape(1, H, 1, 1),
        rows.astype(np.int64).reshape(1, 1, -1, 1),
        cols.astype(np.int64).reshape(1, 1, 1, -1),
    )


def _name(mod: Any) -> str:
    return getattr(mod, "__name__", None) or type(mod).__name__


def _as_index_table(name: str, x: Any, ndim: tuple[int, ...], layout: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu" or arr.ndim not in ndim:
        raise TypeError(
            f"{name} must be an int array of shape {layout}; got {arr.dtype} {arr.shape}"
        )
    return arr.astype(np.int64)  # a copy: later changes to the caller's array do not reach us


def _as_param(name: str, x: Any, shape_ndim: int, layout: str) -> np.ndarray:
    """A parameter as a float64 copy (complex128 for complex values: the complex step of a whole
    attention, (G4), perturbs the parameters too)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "biufc" or arr.ndim != shape_ndim:
        raise TypeError(
            f"{name} must be a real array of shape {layout}; got {arr.dtype} {arr.shape}"
        )
    arr = arr.astype(np.complex128 if arr.dtype.kind == "c" else np.float64)  # a copy
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; got {int((~np.isfinite(arr)).sum())} entries not")
    return arr


def _check_head(mod: str, count: int, h: np.ndarray) -> None:
    if h.size and int(h.max()) >= count:
        raise ValueError(
            f"{mod} has {count} heads' parameters but was called with query head index up to "
            f"{int(h.max())}: it needs one entry per query head H"
        )


def _sum_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """(B, H, T, S) -> (H,): the sum over every axis but the heads."""
    return np.broadcast_to(x, x.shape).sum(axis=(0, 2, 3)).reshape(heads)


# ----------------------------------------------------------------------------- score mods


class ScoreMod:
    r"""A score mod with its derivatives: subclass it, or wrap a function with
    :func:`custom_score_mod`.

    A subclass defines ``__call__(score, b, h, q_idx, kv_idx)`` (arrays of the shapes in the
    module docstring; the result must broadcast to ``score``'s shape), and overrides
    :meth:`grad_score` with its derivative (the default is the complex step, (B4)). One with
    parameters overrides :attr:`params`, :meth:`vjp_params` and :meth:`with_params`.
    """

    def __call__(
        self, score: np.ndarray, b: np.ndarray, h: np.ndarray, q_idx: np.ndarray, kv_idx: np.ndarray
    ) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must define __call__")

    def grad_score(
        self, score: np.ndarray, b: np.ndarray, h: np.ndarray, q_idx: np.ndarray, kv_idx: np.ndarray
    ) -> np.ndarray:
        r"""``d mod / d score``, elementwise, broadcastable to ``score``, (B2).

        The default is the complex step (B4): ``Im mod(score + i h) / h``.
        """
        return complex_step(self, score, b, h, q_idx, kv_idx)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The differentiable parameters by name (copies); empty for a mod without any."""
        return {}

    def vjp_params(
        self,
        g: np.ndarray,
        score: np.ndarray,
        b: np.ndarray,
        h: np.ndarray,
        q_idx: np.ndarray,
        kv_idx: np.ndarray,
    ) -> dict[str, np.ndarray]:
        r"""The gradient of each parameter, given ``g`` (B, H, T, S), the gradient of the loss
        with respect to this mod's output, (B3). Keys as :attr:`params`."""
        return {}

    def with_params(self, params: Mapping[str, Any] | None = None, /, **arrays: Any) -> ScoreMod:
        """A copy with new parameter values (by name; unknown names are a ``ValueError``)."""
        new = {**(params or {}), **arrays}
        _check_names(self, new)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_names(mod: ScoreMod, new: Mapping[str, Any]) -> None:
    unknown = sorted(set(new) - set(mod.params))
    if unknown:
        raise ValueError(
            f"{type(mod).__name__} has parameters {sorted(mod.params)}; got unknown {unknown}"
        )


def complex_step(
    fn: Callable[..., Any],
    score: np.ndarray,
    b: np.ndarray,
    h: np.ndarray,
    q_idx: np.ndarray,
    kv_idx: np.ndarray,
    *extra: Any,
) -> np.ndarray:
    r"""``d fn / d score`` by the complex step, (B4): ``Im fn(score + i h, ...) / h``, h = 1e-30.

    Exact to rounding for a mod that extends analytically to complex scores: arithmetic,
    ``exp``, ``log``, ``tanh``, ``sin``, powers, and selections (``np.where``) on the indices or on
    the score's real part. ``np.abs`` and ``np.real`` return real arrays: refused (below).
    Non-analytic forms that stay complex -- ``np.conj``, ``|s|`` written as
    ``np.sqrt(s * np.conj(s))``, a lexicographic ``np.maximum`` at a tie -- give a wrong derivative
    silently, (B5); give such a mod its own ``grad_score``.

    Raises
    ------
    TypeError
        When ``score`` is complex already (a complex step of a complex step) or ``fn`` returns a
        real array for a complex score (it dropped the imaginary part, e.g. ``astype(float)``).
    """
    if np.iscomplexobj(score):
        raise TypeError(
            f"the complex-step derivative of score_mod {_name(fn)} needs a real score, but the "
            "score is complex (the inputs are complex already); give the mod its own grad_score "
            "(custom_score_mod(fn, grad_score=...))"
        )
    out = np.asarray(fn(score + 1j * COMPLEX_STEP, b, h, q_idx, kv_idx, *extra))
    if not np.iscomplexobj(out):
        raise TypeError(
            f"score_mod {_name(fn)} returned a real array ({out.dtype}) for a complex score: it "
            "drops the imaginary part (np.real, float(), astype(float), a real out= buffer), so "
            "the complex step cannot differentiate it; give it a grad_score "
            "(custom_score_mod(fn, grad_score=...))"
        )
    return out.imag / COMPLEX_STEP  # (B4)


class _CustomScoreMod(ScoreMod):
    """A user's function, with the derivatives given or taken by the complex step."""

    def __init__(
        self,
        fn: Callable[..., Any],
        grad_score: Callable[..., Any] | None,
        params: Mapping[str, Any] | None,
        vjp_params: Callable[..., Any] | None,
    ) -> None:
        self.fn, self._grad, self._vjp = fn, grad_score, vjp_params
        self._params = {
            str(n): _as_param(f"params[{n!r}]", p, np.ndim(p), "(any)")
            for n, p in (params or {}).items()
        }
        self.__name__ = _name(fn)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.fn(score, b, h, q_idx, kv_idx, **self._params)

    def grad_score(self, score, b, h, q_idx, kv_idx):
        if self._grad is not None:
            return self._grad(score, b, h, q_idx, kv_idx, **self._params)
        return complex_step(self, score, b, h, q_idx, kv_idx)  # (B4)

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {n: p.copy() for n, p in self._params.items()}

    def vjp_params(self, g, score, b, h, q_idx, kv_idx):
        if not self._params:
            return {}
        if self._vjp is not None:
            grads = dict(self._vjp(g, score, b, h, q_idx, kv_idx, **self._params))
            if set(grads) != set(self._params):
                raise ValueError(
                    f"vjp_params of {self.__name__} must return a gradient for each of "
                    f"{sorted(self._params)}; got {sorted(grads)}"
                )
            return {n: np.asarray(grads[n], dtype=np.float64) for n in self._params}
        # (B6): one complex step per parameter entry, the entry perturbed by i h
        out: dict[str, np.ndarray] = {}
        for n, p in self._params.items():
            grad = np.zeros(p.shape)
            for idx in np.ndindex(p.shape):
                bumped = {**self._params, n: p.astype(np.complex128)}
                bumped[n][idx] += 1j * COMPLEX_STEP
                val = np.asarray(self.fn(score, b, h, q_idx, kv_idx, **bumped))
                if not np.iscomplexobj(val):
                    raise TypeError(
                        f"score_mod {self.__name__} returned a real array when its parameter "
                        f"{n!r} was complex: the complex step cannot differentiate it; give it "
                        "vjp_params"
                    )
                grad[idx] = np.sum(g * val.imag) / COMPLEX_STEP  # (B6)
            out[n] = grad
        return out

    def with_params(self, params=None, /, **arrays):
        new = {**(params or {}), **arrays}
        _check_names(self, new)
        mod = _CustomScoreMod(self.fn, self._grad, {**self._params, **new}, self._vjp)
        for n, p in new.items():
            if np.shape(p) != self._params[n].shape:
                raise ValueError(
                    f"{self.__name__}.with_params: {n!r} must keep its shape "
                    f"{self._params[n].shape}; got {np.shape(p)}"
                )
        return mod

    def __repr__(self) -> str:
        return f"custom_score_mod({self.__name__}, params={sorted(self._params)})"


def custom_score_mod(
    fn: Callable[..., Any],
    *,
    grad_score: Callable[..., Any] | None = None,
    params: Mapping[str, Any] | None = None,
    vjp_params: Callable[..., Any] | None = None,
) -> ScoreMod:
    r"""A user's score mod as a :class:`ScoreMod`, with its derivatives given or taken by the
    complex step.

    Parameters
    ----------
    fn : callable
        ``fn(score, b, h, q_idx, kv_idx, **params) -> array`` broadcastable to ``score``'s
        (B, H, T, S), written with NumPy broadcasting (module docstring for the shapes).
    grad_score : callable, optional
        ``grad_score(score, b, h, q_idx, kv_idx, **params)``: ``d fn / d score``, elementwise.
        Omitted: the complex step, (B4), which needs ``fn`` to accept complex scores and to be
        analytic in them (``docs/flex.md``, (B4)-(B5)).
    params : mapping of str to array_like, optional
        The differentiable parameters ``fn`` takes as keywords (a bias table, slopes). Their
        gradients come back from :func:`~attention_ref.flex_attention_backward` under these names.
    vjp_params : callable, optional
        ``vjp_params(g, score, b, h, q_idx, kv_idx, **params) -> {name: gradient}`` with ``g``
        the (B, H, T, S) gradient of the loss with respect to ``fn``'s output. Omitted: one
        complex step per parameter entry, (B6) (costly for large tables).

    Returns
    -------
    ScoreMod

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.mods import custom_score_mod, mod_indices
    >>> def quadratic(score, b, h, q_idx, kv_idx, w):
    ...     return score + w[h] * (q_idx - kv_idx) ** 2 / 10
    >>> mod = custom_score_mod(quadratic, params={"w": [0.5, -0.25]})
    >>> idx = mod_indices(1, 2, 3, 4)
    >>> s = np.ones((1, 2, 3, 4))
    >>> mod(s, *idx).shape, float(mod.grad_score(s, *idx).max())
    ((1, 2, 3, 4), 1.0)
    >>> mod.vjp_params(np.ones((1, 2, 3, 4)), s, *idx)["w"]
    array([2.6, 2.6])
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    for name, f in (("grad_score", grad_score), ("vjp_params", vjp_params)):
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be callable or None; got {type(f).__name__}")
    if params is not None and not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of names to arrays; got {type(params).__name__}")
    return _CustomScoreMod(fn, grad_score, params, vjp_params)


def as_score_mod(score_mod: Any) -> ScoreMod | None:
    """``score_mod`` as a :class:`ScoreMod` (a plain function is wrapped by
    :func:`custom_score_mod`); None stays None."""
    if score_mod is None or isinstance(score_mod, ScoreMod):
        return score_mod
    if not callable(score_mod):
        raise TypeError(
            "score_mod must be None, a ScoreMod or a callable (score, b, h, q_idx, kv_idx) -> "
            f"score; got {type(score_mod).__name__}"
        )
    return custom_score_mod(score_mod)


class ALiBi(ScoreMod):
    r"""ALiBi: ``score + slopes[h] * (kv_idx - q_idx)``, a linear penalty on distance, (B7).

    Parameters
    ----------
    slopes : array_like, shape (H,)
        One slope per query head (:func:`alibi_slopes` gives the paper's). Differentiable.

    Notes
    -----
    Source: meta-pytorch/attention-gym ``attn_gym/mods/alibi.py`` (``generate_alibi_bias``:
    ``bias = alibi_bias[h] * (kv_idx - q_idx)``, ``return score + bias``). Press et al. (2022),
    "Train Short, Test Long". With causal masking ``kv_idx <= q_idx``, so the bias is ``<= 0``.
    ``d/d score = 1``; ``d/d slopes[h] = sum g (kv_idx - q_idx)`` over the head's pairs, (B7).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.mods import ALiBi, mod_indices
    >>> mod = ALiBi([0.5, 0.25])
    >>> mod(np.zeros((1, 2, 2, 3)), *mod_indices(1, 2, 2, 3))[0, 0]
    array([[ 0. ,  0.5,  1. ],
           [-0.5,  0. ,  0.5]])
    """

    def __init__(self, slopes: Any) -> None:
        self.slopes = _as_param("slopes", slopes, 1, "(H,)")

    def _distance(self, h, q_idx, kv_idx):
        _check_head("ALiBi", len(self.slopes), h)
        return self.slopes[h], (kv_idx - q_idx).astype(np.float64)

    def __call__(self, score, b, h, q_idx, kv_idx):
        slope, dist = self._distance(h, q_idx, kv_idx)
        return score + slope * dist  # (B7)

    def grad_score(self, score, b, h, q_idx, kv_idx):
        return np.ones((1, 1, 1, 1))  # (B7)

    @property
    def params(self):
        return {"slopes": self.slopes.copy()}

    def vjp_params(self, g, score, b, h, q_idx, kv_idx):
        _, dist = self._distance(h, q_idx, kv_idx)
        d = np.zeros_like(self.slopes)
        d[: g.shape[1]] = _sum_heads(g * dist, g.shape[1])  # (B7) per head
        return {"slopes": d}

    def with_params(self, params=None, /, **arrays):
        new = {**(params or {}), **arrays}
        _check_names(self, new)
        out = ALiBi(new.get("slopes", self.slopes))
        _same_shape("ALiBi", "slopes", out.slopes, self.slopes)
        return out

    def __repr__(self) -> str:
        return f"ALiBi(slopes={self.slopes.tolist()})"


def _same_shape(mod: str, name: str, new: np.ndarray, old: np.ndarray) -> None:
    if new.shape != old.shape:
        raise ValueError(
            f"{mod}.with_params: {name} must keep its shape {old.shape}; got {new.shape}"
        )


def alibi_slopes(num_heads: int) -> np.ndarray:
    r"""The ALiBi paper's slopes for ``num_heads`` heads: ``2^(-8 (h + 1) / n)`` for a power of
    two ``n``, (B8).

    For a head count that is not a power of two, the slopes of the closest smaller power of two
    ``n`` followed by every other slope of ``2 n``, as the paper's reference code does.

    Parameters
    ----------
    num_heads : int

    Returns
    -------
    ndarray, shape (num_heads,)

    Notes
    -----
    Source: ofirpress/attention_with_linear_biases, ``fairseq/models/transformer.py``
    (``get_slopes``); Hugging Face transformers ``models/bloom/modeling_bloom.py``
    (``build_alibi_tensor``) computes the same numbers.

    Examples
    --------
    >>> from attention_ref.core.mods import alibi_slopes
    >>> alibi_slopes(4)
    array([0.25      , 0.0625    , 0.015625  , 0.00390625])
    >>> alibi_slopes(6).round(4)
    array([0.25  , 0.0625, 0.0156, 0.0039, 0.5   , 0.125 ])
    """
    n = check_positive_int("num_heads", num_heads)

    def power_of_two(m: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))  # 2^(-8/m)
        return [start * start**i for i in range(m)]  # (B8)

    if math.log2(n).is_integer():
        return np.array(power_of_two(n))
    closest = 2 ** math.floor(math.log2(n))
    return np.array(power_of_two(closest) + power_of_two(2 * closest)[0::2][: n - closest])


class SoftCap(ScoreMod):
    r"""Soft-capping: ``cap * tanh(score / cap)``, (B9).

    Parameters
    ----------
    cap : float, > 0
        Differentiable (a 0-d parameter ``"cap"``).

    Notes
    -----
    Source: meta-pytorch/attention-gym ``attn_gym/mods/softcapping.py``
    (``generate_tanh_softcap``: ``soft_cap * tanh(score / soft_cap)``); Gemma 2 caps its
    attention logits at 50. With ``t = tanh(score / cap)``: ``d/d score = 1 - t^2`` and
    ``d/d cap = t - (score / cap) (1 - t^2)``, (B9). The same function as the ``softcap=`` option
    of :func:`~attention_ref.scaled_dot_product_attention` (A2).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.mods import SoftCap, mod_indices
    >>> SoftCap(2.0)(np.array([[[[0.0, 100.0]]]]), *mod_indices(1, 1, 1, 2))
    array([[[[0., 2.]]]])
    """

    def __init__(self, cap: Any) -> None:
        self.cap = check_real_scalar("cap", cap, positive=True)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.cap * np.tanh(score / self.cap)  # (B9)

    def grad_score(self, score, b, h, q_idx, kv_idx):
        t = np.tanh(score / self.cap)
        return 1.0 - t * t  # (B9)

    @property
    def params(self):
        return {"cap": np.array(self.cap)}

    def vjp_params(self, g, score, b, h, q_idx, kv_idx):
        u = score / self.cap
        t = np.tanh(u)
        return {"cap": np.array(np.sum(g * (t - u * (1.0 - t * t))))}  # (B9)

    def with_params(self, params=None, /, **arrays):
        new = {**(params or {}), **arrays}
        _check_names(self, new)
        cap = new.get("cap", self.cap)
        return SoftCap(float(np.asarray(cap)) if np.ndim(cap) == 0 else cap)

    def __repr__(self) -> str:
        return f"SoftCap(cap={self.cap})"


class RelativePositionBias(ScoreMod):
    r"""A learned relative-position bias table: ``score + table[h, q_idx - kv_idx + offset]``,
    (B10).

    Parameters
    ----------
    table : array_like, shape (H, N)
        One row per query head; differentiable (``"table"``). For queries ``0..T-1`` and keys
        ``0..S-1``, ``N = T + S - 1`` and ``offset = S - 1`` cover every distance.
    offset : int
        Added to ``q_idx - kv_idx`` to index the table; every index met must lie in ``[0, N)``
        (a ``ValueError`` otherwise).

    Notes
    -----
    Source: the FlexAttention blog post (pytorch/pytorch.github.io
    ``_posts/2024-08-07-flexattention.md``, "Relative Position Encodings": ``score + (q_idx -
    kv_idx)``), here with a learned table indexed by that distance. The table's gradient is a
    scatter-add: ``dtable[h, n] = sum of g over the pairs with q_idx - kv_idx + offset = n``,
    (B10).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.mods import RelativePositionBias, mod_indices
    >>> table = np.arange(5.0)[None]        # (H=1, N=5): distances -2..2 with offset 2
    >>> mod = RelativePositionBias(table, offset=2)
    >>> mod(np.zeros((1, 1, 3, 3)), *mod_indices(1, 1, 3, 3))[0, 0]
    array([[2., 1., 0.],
           [3., 2., 1.],
           [4., 3., 2.]])
    """

    def __init__(self, table: Any, offset: int) -> None:
        self.table = _as_param("table", table, 2, "(H, N)")
        self.offset: int
        if isinstance(offset, (bool, np.bool_)) or not isinstance(offset, numbers.Integral):
            raise TypeError(f"offset must be an int; got {offset!r}")
        self.offset = int(offset)

    def _index(self, h, q_idx, kv_idx):
        _check_head("RelativePositionBias", self.table.shape[0], h)
        n = q_idx - kv_idx + self.offset  # (1, 1, T, S)
        if n.size and (n.min() < 0 or n.max() >= self.table.shape[1]):
            raise ValueError(
                f"RelativePositionBias: q_idx - kv_idx + offset spans [{int(n.min())}, "
                f"{int(n.max())}], outside the table's [0, {self.table.shape[1]}); give a table "
                "of T + S - 1 columns and offset S - 1"
            )
        return n

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.table[h, self._index(h, q_idx, kv_idx)]  # (B10)

    def grad_score(self, score, b, h, q_idx, kv_idx):
        return np.ones((1, 1, 1, 1))

    @property
    def params(self):
        return {"table": self.table.copy()}

    def vjp_params(self, g, score, b, h, q_idx, kv_idx):
        return {"table": _scatter_heads(g, self._index(h, q_idx, kv_idx), self.table.shape)}

    def with_params(self, params=None, /, **arrays):
        new = {**(params or {}), **arrays}
        _check_names(self, new)
        out = RelativePositionBias(new.get("table", self.table), self.offset)
        _same_shape("RelativePositionBias", "table", out.table, self.table)
        return out

    def __repr__(self) -> str:
        return f"RelativePositionBias(table shape {self.table.shape}, offset={self.offset})"


def _scatter_heads(g: np.ndarray, n: np.ndarray, table_shape: tuple[int, int]) -> np.ndarray:
    """(B10)/(B12): ``d[h, n[t, s]] += sum_b g[b, h, t, s]`` for a (H, N) table."""
    heads, N = table_shape
    Hg = g.shape[1]
    per_head = np.broadcast_to(g, g.shape).sum(axis=0)  # (H, T, S)
    n = np.broadcast_to(n[0, 0] if n.ndim == 4 else n, per_head.shape[-2:])  # (T, S)
    flat = (np.arange(Hg)[:, None, None] * N + n[None]).ravel()  # (H * T * S,)
    d = np.bincount(flat, weights=per_head.ravel(), minlength=Hg * N).reshape(Hg, N)
    out = np.zeros(table_shape)
    out[:Hg] = d
    return out


def t5_relative_bucket(
    relative_position: Any,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> np.ndarray:
    r"""T5's bucket of a relative position ``kv_idx - q_idx``, (B11).

    Exact positions for small distances (half the buckets), logarithmically wider buckets up to
    ``max_distance``, the last bucket beyond; with ``bidirectional`` half the buckets are for
    keys after the query.

    Parameters
    ----------
    relative_position : array_like of int
        ``memory_position - query_position`` (``kv_idx - q_idx``).
    bidirectional : bool, default True
    num_buckets : int, default 32
    max_distance : int, default 128

    Returns
    -------
    ndarray of int64, the input's shape

    Notes
    -----
    Source: Hugging Face transformers ``src/transformers/models/t5/modeling_t5.py``
    (``T5Attention._relative_position_bucket``). The logarithmic part is computed in float32,
    as there (``relative_position.float()``), so that its truncation to an int is the same
    operation; ``tests/test_flex_torch.py`` compares the buckets with that code exactly.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.mods import t5_relative_bucket
    >>> t5_relative_bucket(np.array([-200, -20, -3, 0, 3, 20, 200]))
    array([15, 10,  3,  0, 19, 26, 31])
    """
    n = check_positive_int("num_buckets", num_buckets)
    max_distance = check_positive_int("max_distance", max_distance)
    rel = np.asarray(relative_position).astype(np.int64)
    buckets = np.zeros(rel.shape, dtype=np.int64)
    if bidirectional:
        n //= 2
        buckets += (rel > 0).astype(np.int64) * n
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = n // 2  # (B11) positions below it get their own bucket
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        large = (
            np.log(rel.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(n - max_exact)
        )
    large = max_exact + np.where(is_small, 0, large).astype(np.int64)  # truncation, as .to(long)
    large = np.minimum(large, n - 1)
    return buckets + np.where(is_small, rel, large)  # (B11)


class T5RelativeBias(ScoreMod):
    r"""T5's bucketed relative-position bias: ``score + table[h, bucket(kv_idx - q_idx)]``,
    (B12).

    Parameters
    ----------
    table : array_like, shape (H, num_buckets)
        The learned bias per head and bucket; differentiable (``"table"``).
    bidirectional : bool, default True
        Encoder attention (True) or decoder self-attention (False, only keys before the query).
    max_distance : int, default 128

    Notes
    -----
    Source: Hugging Face transformers ``src/transformers/models/t5/modeling_t5.py``
    (``T5Attention.compute_bias``: ``relative_position = memory_position - context_position``,
    ``values = self.relative_attention_bias(relative_position_bucket)``, permuted to
    (1, H, T, S) and added to the scores). The buckets are :func:`t5_relative_bucket`. T5 does
    not scale its scores: pass ``scale=1.0`` to match it. The gradient is a scatter-add over the
    buckets, (B12).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.mods import T5RelativeBias, mod_indices
    >>> mod = T5RelativeBias(np.arange(32.0)[None])      # bias = the bucket number
    >>> mod(np.zeros((1, 1, 1, 4)), *mod_indices(1, 1, [2], 4))[0, 0]
    array([[ 2.,  1.,  0., 17.]])
    """

    def __init__(self, table: Any, *, bidirectional: bool = True, max_distance: int = 128) -> None:
        self.table = _as_param("table", table, 2, "(H, num_buckets)")
        if not isinstance(bidirectional, (bool, np.bool_)):
            raise TypeError(f"bidirectional must be a bool; got {bidirectional!r}")
        self.bidirectional = bool(bidirectional)
        self.max_distance = check_positive_int("max_distance", max_distance)
        check_positive_int("num_buckets (the table's columns)", self.table.shape[1])

    def _index(self, h, q_idx, kv_idx):
        _check_head("T5RelativeBias", self.table.shape[0], h)
        return t5_relative_bucket(
            kv_idx - q_idx,
            bidirectional=self.bidirectional,
            num_buckets=self.table.shape[1],
            max_distance=self.max_distance,
        )  # (1, 1, T, S)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.table[h, self._index(h, q_idx, kv_idx)]  # (B12)

    def grad_score(self, score, b, h, q_idx, kv_idx):
        return np.ones((1, 1, 1, 1))

    @property
    def params(self):
        return {"table": self.table.copy()}

    def vjp_params(self, g, score, b, h, q_idx, kv_idx):
        return {"table": _scatter_heads(g, self._index(h, q_idx, kv_idx), self.table.shape)}

    def with_params(self, params=None, /, **arrays):
        new = {**(params or {}), **arrays}
        _check_names(self, new)
        out = T5RelativeBias(
            new.get("table", self.table),
            bidirectional=self.bidirectional,
            max_distance=self.max_distance,
        )
        _same_shape("T5RelativeBias", "table", out.table, self.table)
        return out

    def __repr__(self) -> str:
        return (
            f"T5RelativeBias(table shape {self.table.shape}, bidirectional={self.bidirectional}, "
            f"max_distance={self.max_distance})"
        )


class _Chain(ScoreMod):
    def __init__(self, mods: tuple[ScoreMod, ...]) -> None:
        self.mods = mods

    def _forward(self, score, idx):
        inputs = []  # the input of each mod, (B13)
        for m in self.mods:
            inputs.append(score)
            score = np.asarray(m(score, *idx))
        return inputs, score

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self._forward(score, (b, h, q_idx, kv_idx))[1]

    def _grads(self, score, idx):
        inputs, _ = self._forward(score, idx)
        return inputs, [
            np.asarray(m.grad_score(s, *idx)) for m, s in zip(self.mods, inputs, strict=True)
        ]

    def grad_score(self, score, b, h, q_idx, kv_idx):
        _, grads = self._grads(score, (b, h, q_idx, kv_idx))
        out = grads[0]
        for d in grads[1:]:
            out = out * d  # (B13) the chain rule
        return out

    @property
    def params(self):
        return {f"{i}.{n}": p for i, m in enumerate(self.mods) for n, p in m.params.items()}

    def vjp_params(self, g, score, b, h, q_idx, kv_idx):
        idx = (b, h, q_idx, kv_idx)
        inputs, grads = self._grads(score, idx)
        out: dict[str, np.ndarray] = {}
        upstream = g  # dL/d(output of mod i), walking back from the last, (B13)
        for i in range(len(self.mods) - 1, -1, -1):
            for n, d in self.mods[i].vjp_params(upstream, inputs[i], *idx).items():
                out[f"{i}.{n}"] = d
            upstream = upstream * grads[i]
        return {n: out[n] for n in self.params}

    def with_params(self, params=None, /, **arrays):
        new = {**(params or {}), **arrays}
        _check_names(self, new)
        mods = []
        for i, m in enumerate(self.mods):
            mine = {n.split(".", 1)[1]: p for n, p in new.items() if n.split(".", 1)[0] == str(i)}
            mods.append(m.with_params(mine) if mine else m)
        return _Chain(tuple(mods))

    def __repr__(self) -> str:
        return "chain_score_mods(" + ", ".join(map(repr, self.mods)) + ")"


def chain_score_mods(*score_mods: Any) -> ScoreMod:
    r"""The score mods applied one after the other (the first to the score, the next to its
    result), with the chain rule for the derivatives, (B13).

    Parameters are keyed ``"<position>.<name>"``: ``"0.slopes"``, ``"1.cap"``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.core.mods import ALiBi, SoftCap, chain_score_mods, mod_indices
    >>> mod = chain_score_mods(ALiBi([1.0]), SoftCap(3.0))
    >>> sorted(mod.params)
    ['0.slopes', '1.cap']
    >>> mod(np.zeros((1, 1, 1, 2)), *mod_indices(1, 1, [1], 2)).round(4)
    array([[[[-0.9645,  0.    ]]]])
    """
    if not score_mods:
        raise ValueError("chain_score_mods needs at least one score mod")
    mods = tuple(as_score_mod(m) for m in score_mods)
    if any(m is None for m in mods):
        raise TypeError("chain_score_mods: every argument must be a score mod; got None")
    return _Chain(cast(tuple[ScoreMod, ...], mods))


def score_mod_forward(mod: ScoreMod, logits: np.ndarray, idx: Indices) -> np.ndarray:
    r"""(A20): the mod's output on ``logits`` (B, H, T, S), checked and as a new array of the
    logits' shape and dtype.

    Raises ``ValueError`` for a result that does not broadcast to the logits or holds NaN or
    ``+inf``; ``-inf`` is allowed and masks its pair (FlexAttention's ``create_mask`` reads a
    score mod's ``-inf`` the same way).
    """
    out = np.asarray(mod(logits, *idx))
    if out.dtype.kind not in "biufc":
        raise TypeError(f"score_mod {_name(mod)} returned a {out.dtype} array; expected numbers")
    try:
        out = np.broadcast_to(out, logits.shape)
    except ValueError:
        raise ValueError(
            f"score_mod {_name(mod)} returned shape {out.shape}, which does not broadcast to the "
            f"scores' (B, H, T, S) = {logits.shape}"
        ) from None
    bad = np.isnan(out) | np.isposinf(out.real)
    if bad.any():
        # the pair's own indices (a tile's position i is its idx[2][i], and so on)
        first = tuple(int(x.ravel()[i]) for x, i in zip(idx, np.argwhere(bad)[0], strict=True))
        raise ValueError(
            f"score_mod {_name(mod)} returned {int(bad.sum())} NaN/+inf entries, the first at "
            f"(b, h, q_idx, kv_idx) = {first}; only -inf (masks the pair) is allowed"
        )
    return out.astype(np.result_type(logits.dtype, out.dtype), copy=True)


def score_mod_backward(
    mod: ScoreMod, dout: np.ndarray, logits: np.ndarray, idx: Indices
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""(A21)-(A22) of ``docs/derivations/attention.md``: the gradient of the mod's input and
    of its parameters, from ``dout`` (B, H, T, S), the gradient of its output, 0 wherever the
    pair is masked."""
    grad = np.asarray(mod.grad_score(logits, *idx))  # (B2)
    dlogits = np.where(
        dout != 0, dout * grad, 0.0
    )  # (A21) selection: an inf slope at a masked pair is unread
    return dlogits.astype(dout.dtype, copy=False), mod.vjp_params(dout, logits, *idx)  # (A22)


# ----------------------------------------------------------------------------- mask mods


class MaskMod:
    r"""A mask mod: ``__call__(b, h, q_idx, kv_idx)`` -> bool array broadcastable to
    (B, H, T, S), True = may attend. Any function of that signature is one too; the library's
    are objects with a readable ``repr``."""

    def __call__(
        self, b: np.ndarray, h: np.ndarray, q_idx: np.ndarray, kv_idx: np.ndarray
    ) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must define __call__")


def _offset(offset: Any) -> int:
    if isinstance(offset, (bool, np.bool_)) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset must be an int; got {offset!r}")
    return int(offset)


class CausalMask(MaskMod):
    r"""Causal: ``q_idx + offset >= kv_idx``, (B14).

    ``offset = 0`` is FlexAttention's and PyTorch's top-left ``is_causal``; ``offset = KV_LEN -
    Q_LEN`` is the bottom-right alignment of FlashAttention and decoding (``align="bottom_right"``
    in ``docs/conventions.md``).

    Notes
    -----
    Source: PyTorch ``torch/nn/attention/flex_attention.py`` (``create_block_mask``'s example:
    ``def causal_mask(b, h, q_idx, kv_idx): return q_idx >= kv_idx``).

    Examples
    --------
    >>> from attention_ref.core.mods import CausalMask, mod_indices
    >>> CausalMask(offset=1)(*mod_indices(1, 1, 2, 3))[0, 0].astype(int)
    array([[1, 1, 0],
           [1, 1, 1]])
    """

    def __init__(self, offset: int = 0) -> None:
        self.offset = _offset(offset)

    def __call__(self, b, h, q_idx, kv_idx):
        return q_idx + self.offset >= kv_idx

    def __repr__(self) -> str:
        return f"CausalMask(offset={self.offset})"


class SlidingWindowMask(MaskMod):
    r"""A sliding window: ``q' - left <= kv_idx <= q' + right`` with ``q' = q_idx + offset``,
    (B14).

    Parameters
    ----------
    left : int or None
        Keys before the query's position; None = unbounded.
    right : int or None, default 0
        Keys after it (0: causal within the window); None = unbounded.
    offset : int, default 0
        The query's position on the key axis minus ``q_idx`` (``KV_LEN - Q_LEN``: bottom-right).

    Notes
    -----
    ``SlidingWindowMask(W)`` is FlexAttention's ``SLIDING_WINDOW = W`` with causal (``q_idx >=
    kv_idx`` and ``q_idx - kv_idx <= W``: W + 1 keys), the blog post's "Sliding Window + Causal"
    (pytorch/pytorch.github.io ``_posts/2024-08-07-flexattention.md``; meta-pytorch/attention-gym
    ``attn_gym/masks/sliding_window.py``), and this library's ``causal=True, window=(W, 0)``
    (``docs/windows.md``).

    Examples
    --------
    >>> from attention_ref.core.mods import SlidingWindowMask, mod_indices
    >>> SlidingWindowMask(1)(*mod_indices(1, 1, 4, 4))[0, 0].astype(int)
    array([[1, 0, 0, 0],
           [1, 1, 0, 0],
           [0, 1, 1, 0],
           [0, 0, 1, 1]])
    """

    def __init__(self, left: int | None, right: int | None = 0, offset: int = 0) -> None:
        for name, side in (("left", left), ("right", right)):
            if side is not None:
                check_count(name, side)
        self.left = None if left is None else int(left)
        self.right = None if right is None else int(right)
        self.offset = _offset(offset)

    def __call__(self, b, h, q_idx, kv_idx):
        pos = q_idx + self.offset
        ok = np.ones(np.broadcast_shapes(pos.shape, kv_idx.shape), dtype=bool)
        if self.left is not None:
            ok &= kv_idx >= pos - self.left
        if self.right is not None:
            ok &= kv_idx <= pos + self.right
        return ok

    def __repr__(self) -> str:
        return f"SlidingWindowMask(left={self.left}, right={self.right}, offset={self.offset})"


class ChunkedMask(MaskMod):
    r"""Chunked attention: ``(q_idx + offset) // chunk_size == kv_idx // chunk_size``, (B14).

    Combine with :class:`CausalMask` (:func:`and_masks`) for Llama 4's local attention.

    Notes
    -----
    Sources: pytorch/torchtune ``torchtune/models/llama4/_chunked_attention.py``
    (``get_chunked_attention_mask``: ``same_chunk = q_chunk == kv_chunk``) and Hugging Face
    transformers ``src/transformers/masking_utils.py`` (``chunked_causal_mask_function``:
    ``and_masks(chunked_overlay(...), causal_mask_function)``, ``chunked_overlay`` comparing
    ``kv_idx // chunk_size`` with ``q_idx // chunk_size`` after removing any left padding);
    ``docs/windows.md`` has Llama 4's convention.

    Examples
    --------
    >>> from attention_ref.core.mods import ChunkedMask, mod_indices
    >>> ChunkedMask(2)(*mod_indices(1, 1, 4, 4))[0, 0].astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 1, 1],
           [0, 0, 1, 1]])
    """

    def __init__(self, chunk_size: int, offset: int = 0) -> None:
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.offset = _offset(offset)

    def __call__(self, b, h, q_idx, kv_idx):
        return (q_idx + self.offset) // self.chunk_size == kv_idx // self.chunk_size

    def __repr__(self) -> str:
        return f"ChunkedMask(chunk_size={self.chunk_size}, offset={self.offset})"


class DocumentMask(MaskMod):
    r"""Document (packed-sequence) masking: a query attends the keys of its own document,
    (B14).

    Parameters
    ----------
    q_doc_ids : array_like of int, shape (T,) or (B, T)
        The document of each query position (per batch element, or shared).
    kv_doc_ids : array_like of int, shape (S,) or (B, S), optional
        The document of each key; ``q_doc_ids`` when omitted (self-attention over one packed
        sequence).

    Notes
    -----
    ``q_doc_ids[b, q_idx] == kv_doc_ids[b, kv_idx]``, and an id ``< 0`` marks padding, which
    attends nothing and is attended by nothing (its query row is empty: output 0). Combine with
    :class:`CausalMask` for causal packing. Source: meta-pytorch/attention-gym
    ``attn_gym/masks/document_mask.py`` (``generate_doc_mask_mod``) and the FlexAttention blog
    post ("Document Masking/Jagged Sequences": ``document_id[q_idx] == document_id[kv_idx]``).

    Examples
    --------
    >>> from attention_ref.core.mods import DocumentMask, mod_indices
    >>> DocumentMask([0, 0, 1, -1])(*mod_indices(1, 1, 4, 4))[0, 0].astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 1, 0],
           [0, 0, 0, 0]])
    """

    def __init__(self, q_doc_ids: Any, kv_doc_ids: Any = None) -> None:
        self.q_doc_ids = _as_index_table("q_doc_ids", q_doc_ids, (1, 2), "(T,) or (B, T)")
        self.kv_doc_ids = (
            self.q_doc_ids.copy()
            if kv_doc_ids is None
            else _as_index_table("kv_doc_ids", kv_doc_ids, (1, 2), "(S,) or (B, S)")
        )

    @staticmethod
    def _lookup(name: str, ids: np.ndarray, b: np.ndarray, pos: np.ndarray) -> np.ndarray:
        n = ids.shape[-1]
        if pos.size and int(pos.max()) >= n:
            raise ValueError(
                f"DocumentMask: {name} has {n} positions but was called with index up to "
                f"{int(pos.max())}"
            )
        if ids.ndim == 1:
            return ids[pos]
        if b.size and int(b.max()) >= ids.shape[0]:
            raise ValueError(
                f"DocumentMask: {name} has {ids.shape[0]} batch rows but was called with batch "
                f"index up to {int(b.max())}"
            )
        return ids[b, pos]

    def __call__(self, b, h, q_idx, kv_idx):
        dq = self._lookup("q_doc_ids", self.q_doc_ids, b, q_idx)  # (B|1, 1, T, 1)
        dk = self._lookup("kv_doc_ids", self.kv_doc_ids, b, kv_idx)  # (B|1, 1, 1, S)
        return (dq == dk) & (dq >= 0) & (dk >= 0)

    def __repr__(self) -> str:
        return (
            f"DocumentMask(q_doc_ids shape {self.q_doc_ids.shape}, "
            f"kv_doc_ids shape {self.kv_doc_ids.shape})"
        )


class PrefixLMMask(MaskMod):
    r"""Prefix-LM: every query attends the whole prefix, and causally after it:
    ``kv_idx < prefix_lengths[b]`` or ``q_idx >= kv_idx``, (B14).

    Parameters
    ----------
    prefix_lengths : int or array_like of int, shape (B,)
        The prefix length (bidirectional part), shared or per batch element.

    Notes
    -----
    Source: meta-pytorch/attention-gym ``attn_gym/masks/prefix_lm.py``
    (``generate_prefix_lm_mask``: ``or_masks(prefix_mask, causal_mask)`` with ``prefix_mask =
    kv_idx < prefix_length``).

    Examples
    --------
    >>> from attention_ref.core.mods import PrefixLMMask, mod_indices
    >>> PrefixLMMask(2)(*mod_indices(1, 1, 4, 4))[0, 0].astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 0],
           [1, 1, 1, 1]])
    """

    def __init__(self, prefix_lengths: Any) -> None:
        arr = np.asarray(prefix_lengths)
        if arr.dtype.kind not in "iu" or arr.ndim > 1:
            raise TypeError(
                f"prefix_lengths must be an int or a (B,) int array; got {arr.dtype} {arr.shape}"
            )
        if (arr < 0).any():
            raise ValueError(f"prefix_lengths must be >= 0; got {arr.tolist()}")
        self.prefix_lengths = arr.astype(np.int64)

    def __call__(self, b, h, q_idx, kv_idx):
        p = self.prefix_lengths
        if p.ndim == 1:
            if b.size and int(b.max()) >= len(p):
                raise ValueError(
                    f"PrefixLMMask has {len(p)} prefix lengths but was called with batch index "
                    f"up to {int(b.max())}"
                )
            p = p[b]  # (B, 1, 1, 1)
        return (kv_idx < p) | (q_idx >= kv_idx)

    def __repr__(self) -> str:
        return f"PrefixLMMask(prefix_lengths={self.prefix_lengths.tolist()})"


class _Combined(MaskMod):
    def __init__(self, mods: tuple[Callable[..., Any], ...], op: str) -> None:
        self.mods, self.op = mods, op

    def __call__(self, b, h, q_idx, kv_idx):
        shape = np.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)
        out = np.full((1,) * len(shape), self.op == "and")
        for m in self.mods:
            got = evaluate_mask_mod(m, (b, h, q_idx, kv_idx), shape)
            out = out & got if self.op == "and" else out | got
        return out

    def __repr__(self) -> str:
        return f"{self.op}_masks(" + ", ".join(map(repr, self.mods)) + ")"


def and_masks(*mask_mods: Callable[..., Any]) -> MaskMod:
    r"""The intersection of mask mods: a pair may attend when every one allows it.

    As ``torch.nn.attention.flex_attention.and_masks`` (no mods: every pair allowed).

    Examples
    --------
    >>> from attention_ref.core.mods import CausalMask, DocumentMask, and_masks, mod_indices
    >>> m = and_masks(CausalMask(), DocumentMask([0, 0, 1]))
    >>> m(*mod_indices(1, 1, 3, 3))[0, 0].astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [0, 0, 1]])
    """
    _check_callables("and_masks", mask_mods)
    return _Combined(tuple(mask_mods), "and")


def or_masks(*mask_mods: Callable[..., Any]) -> MaskMod:
    r"""The union of mask mods: a pair may attend when any one allows it.

    As ``torch.nn.attention.flex_attention.or_masks`` (no mods: no pair allowed).

    Examples
    --------
    >>> from attention_ref.core.mods import ChunkedMask, CausalMask, or_masks, mod_indices
    >>> or_masks(ChunkedMask(2), CausalMask())(*mod_indices(1, 1, 3, 3))[0, 0].astype(int)
    array([[1, 1, 0],
           [1, 1, 0],
           [1, 1, 1]])
    """
    _check_callables("or_masks", mask_mods)
    return _Combined(tuple(mask_mods), "or")


def _check_callables(where: str, mods: tuple[Any, ...]) -> None:
    for i, m in enumerate(mods):
        if not callable(m):
            raise TypeError(
                f"{where}: argument {i} must be a mask mod (callable); got {type(m).__name__}"
            )


def evaluate_mask_mod(
    mask_mod: Callable[..., Any], idx: Indices, shape: tuple[int, ...]
) -> np.ndarray:
    """``mask_mod(*idx)`` checked: a bool array broadcastable to ``shape`` (B, H, T, S)."""
    out = np.asarray(mask_mod(*idx))
    if out.dtype != np.bool_:
        raise TypeError(
            f"mask_mod {_name(mask_mod)} must return a bool array (True = may attend); got "
            f"dtype {out.dtype}"
        )
    try:
        np.broadcast_shapes(out.shape, shape)
    except ValueError:
        raise ValueError(
            f"mask_mod {_name(mask_mod)} returned shape {out.shape}, which does not broadcast "
            f"to (B, H, T, S) = {shape}"
        ) from None
    if out.ndim > len(shape) or np.broadcast_shapes(out.shape, shape) != tuple(shape):
        raise ValueError(
            f"mask_mod {_name(mask_mod)} returned shape {out.shape}, larger than (B, H, T, S) = "
            f"{shape}"
        )
    return out
