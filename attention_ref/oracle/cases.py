r"""Named canonical cases: a seeded grid of attention configurations to parametrise tests with.

Every case has a stable name, builds its inputs from its own seed (derived from the name, so
adding a case never changes another), and produces the reference outputs, gradients and
intermediates. Use them to test your implementation on the configurations where frameworks
differ or kernels break::

    import pytest
    from attention_ref.cases import cases

    @pytest.mark.parametrize("case", cases("sdpa"), ids=str)
    def test_my_attention(case):
        data = case.build()
        ref = data.reference()
        out = my_attention(**data.inputs, **data.options)      # your code
        assert_close(out, ref.out)

The grid (``python -m attention_ref cases`` lists it): plain attention; causal ``top_left`` and
``bottom_right`` with T < S and T > S; sliding windows; key padding with fully masked rows under
the ``"zero"`` and ``"uniform"`` policies; an additive bias (with and without ``-inf`` entries);
GQA and MQA; Dk != Dv; cross-attention (T != S everywhere); soft-capping; dropout with a
keep-mask; 1-element edges; long rows; and multi-head attention (self- and cross-attention, GQA,
kdim/vdim, key padding, no bias, an attention bias).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from ..core.attention import (
    AttentionTrace,
    sdpa_backward,
    sdpa_forward,
)
from ..core.mha import (
    MultiHeadParams,
    MultiHeadTrace,
    init_params,
    mha_backward,
    mha_forward,
    multi_head_attention,
)

__all__ = [
    "ALL_KINDS",
    "KINDS",
    "SERVING_KINDS",
    "Case",
    "CaseData",
    "Reference",
    "cases",
    "get_case",
    "serving_cases",
]

#: The attention kinds: scaled dot-product and multi-head attention (frameworks run these).
KINDS = ("sdpa", "mha")
#: The serving layouts (``attention_ref.variants``): paged attention, attention with a KV cache
#: (inference only: no gradients), multi-head latent attention, top-k sparse attention.
SERVING_KINDS = ("paged", "kvcache", "mla", "sparse")
#: Every kind of case; a golden set may hold any of them.
ALL_KINDS = KINDS + SERVING_KINDS
#: The kinds with a backward: their cases have a cotangent and a gradient per input.
DIFFERENTIABLE_KINDS = ("sdpa", "mha", "paged", "mla", "sparse")

#: Array-valued options: not differentiated, but part of the case's definition.
_ARRAY_OPTIONS = ("mask", "dropout_mask")
_PARAM_NAMES = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


class Reference(NamedTuple):
    """What the reference computes for a case, all float64 (or ``dtype``) numpy arrays."""

    out: np.ndarray  #: the output: (..., H, T, Dv) for SDPA, (..., T, D_out) for MHA
    grads: dict[
        str, np.ndarray
    ]  #: gradient of each input, keyed by the input's name (``q``, ``w_o``, ``bias``, ...)
    intermediates: dict[str, np.ndarray]  #: scores, masked_scores, row_max, logsumexp, probs, ...


@dataclass(frozen=True)
class Case:
    """One named configuration. ``build()`` makes its arrays; ``str(case)`` is its name."""

    name: str  #: stable identifier, safe as a pytest id and a file name
    kind: str  #: "sdpa" (scaled dot-product attention) or "mha" (multi-head attention)
    description: str  #: one line: what the case exercises
    dims: Mapping[str, int]  #: B, H, Hkv, T, S, Dk, Dv (MHA also D, Dk_in, Dv_in, D_out)
    options: Mapping[str, Any] = field(
        default_factory=dict
    )  #: scalar options (causal, align, window, ...)
    #: array extras: "padding", "empty_row", "bias", "neg_inf_bias", "dropout", "no_param_bias"
    extras: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  #: groups: "mask", "causal", "gqa", "long", ...

    def __str__(self) -> str:
        return self.name

    @property
    def seed(self) -> int:
        """Seed of the inputs: a checksum of the name, stable across versions and platforms."""
        return zlib.crc32(self.name.encode())

    def build(self, seed: int | None = None) -> CaseData:
        """Draw the case's arrays from its seed; the same case always gives the same arrays.

        ``seed`` (a non-negative int) draws another instance of the same configuration, mixed
        with the case's own seed; omitted, the canonical instance.
        """
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or a non-negative int; got {seed!r}")
        return _build(self, seed)


@dataclass(frozen=True)
class CaseData:
    """The arrays of one case, and the reference evaluated on them.

    ``inputs`` are the differentiable arrays (SDPA: ``q``, ``k``, ``v`` and ``bias`` if any; MHA:
    ``query``, ``key``, ``value``, the weights ``w_q`` ... ``b_o`` and ``bias`` if any); ``options``
    the rest of the keyword arguments (masks, keep-mask, flags; ``num_heads`` and ``num_kv_heads``
    for MHA), so ``reference function(**inputs, **options)`` is the case -- see :meth:`forward`.
    """

    case: Case
    inputs: dict[str, np.ndarray]
    options: dict[str, Any]
    #: a random upstream gradient of the output's shape (None for the inference-only kvcache)
    cotangent: np.ndarray | None

    def function(self) -> Callable[..., np.ndarray]:
        """``f(**inputs) -> out``: the reference forward with the options closed over (for
        gradcheck)."""
        opts = dict(self.options)
        if self.case.kind in SERVING_KINDS:
            forward = _serving_forward(self.case.kind)
            return lambda **inputs: forward(**inputs, **opts)
        if self.case.kind == "sdpa":
            return lambda **inputs: sdpa_forward(**inputs, **opts).out

        def mha(query, key, value, bias=None, **weights):
            extra = {} if bias is None else {"bias": bias}
            return multi_head_attention(
                query, key, value, MultiHeadParams(**weights), **extra, **opts
            )

        return mha

    def forward(self, **overrides: Any) -> np.ndarray:
        """The reference output; keyword ``overrides`` replace inputs (e.g. a complex ``q``)."""
        return self.function()(**{**self.inputs, **overrides})

    def scale_used(self) -> float:
        """The score scale the reference applies: ``scale`` if given, else the default of the
        kind (``1 / sqrt(Dk)``; MLA: ``1 / sqrt(d_nope + d_rope)``, the width before
        absorption)."""
        if self.case.kind in KINDS:
            tr = self.trace()
            return float((tr if isinstance(tr, AttentionTrace) else tr.attention).scale)
        given = self.options.get("scale", self.options.get("softmax_scale"))
        if given is not None:
            return float(given)
        d = self.case.dims
        width = d["d_nope"] + d["d_rope"] if self.case.kind == "mla" else d["Dk"]
        return 1.0 / float(np.sqrt(width))

    def trace(self, dtype: Any = None) -> AttentionTrace | MultiHeadTrace:
        """The forward with every intermediate (:class:`~attention_ref.AttentionTrace` or
        :class:`~attention_ref.MultiHeadTrace`); attention kinds only."""
        if self.case.kind not in KINDS:
            raise ValueError(
                f"a {self.case.kind!r} case has no single trace; use reference() for its output, "
                "gradients and intermediates"
            )
        kwargs: dict[str, Any] = {**self.inputs, **self.options, "dtype": dtype}
        if self.case.kind == "sdpa":
            return sdpa_forward(**kwargs)
        weights = {n: kwargs.pop(n) for n in _PARAM_NAMES if n in kwargs}
        return mha_forward(params=MultiHeadParams(**weights), **kwargs)

    def reference(self, dtype: Any = None) -> Reference:
        """Output, gradients (for ``cotangent``) and intermediates, from one forward and
        backward."""
        if self.case.kind in SERVING_KINDS:
            return _serving_reference(self)
        tr = self.trace(dtype)
        cot = np.asarray(self.cotangent)  # attention kinds always have one
        if isinstance(tr, AttentionTrace):
            g = sdpa_backward(cot, tr)
            grads = {"q": g.dq, "k": g.dk, "v": g.dv}
            if g.dbias is not None:
                grads["bias"] = g.dbias
            attn = tr
        else:
            mg = mha_backward(cot, tr)
            grads = mg.as_dict()
            attn = tr.attention
        inter = {
            "scores": attn.scores,
            "masked_scores": attn.masked_scores,
            "row_max": attn.row_max,
            "logsumexp": attn.logsumexp,
            "probs": attn.probs,
        }
        if isinstance(tr, MultiHeadTrace):
            inter.update(q=tr.q, k=tr.k, v=tr.v, context=tr.context)
        return Reference(tr.out, {n: grads[n] for n in self.inputs}, inter)


def _sdpa_case(
    name, description, *, B=2, H=2, Hkv=None, T=3, S=5, Dk=4, Dv=None, extras=(), tags=(), **options
):
    dims = dict(
        B=B, H=H, Hkv=H if Hkv is None else Hkv, T=T, S=S, Dk=Dk, Dv=Dk if Dv is None else Dv
    )
    return Case(name, "sdpa", description, dims, options, tuple(extras), tuple(tags))


def _mha_case(
    name,
    description,
    *,
    B=2,
    H=2,
    Hkv=None,
    T=3,
    S=5,
    D=6,
    Dk=None,
    Dv=None,
    Dk_in=None,
    Dv_in=None,
    D_out=None,
    extras=(),
    tags=(),
    **options,
):
    Dk = D // H if Dk is None else Dk
    dims = dict(
        B=B,
        H=H,
        Hkv=H if Hkv is None else Hkv,
        T=T,
        S=S,
        D=D,
        Dk=Dk,
        Dv=Dk if Dv is None else Dv,
        Dk_in=D if Dk_in is None else Dk_in,
        Dv_in=D if Dv_in is None else Dv_in,
        D_out=D if D_out is None else D_out,
    )
    return Case(name, "mha", description, dims, options, tuple(extras), tuple(tags))


_CASES: tuple[Case, ...] = (
    _sdpa_case("plain", "no mask, H = Hkv, Dk = Dv, T != S"),
    _sdpa_case(
        "causal_top_left_t_lt_s",
        "causal, query i sees keys j <= i (PyTorch is_causal, JAX), T < S",
        T=3,
        S=5,
        causal=True,
        align="top_left",
        tags=("causal",),
    ),
    _sdpa_case(
        "causal_top_left_t_gt_s",
        "causal top_left with T > S: the last queries see every key",
        T=6,
        S=4,
        causal=True,
        align="top_left",
        tags=("causal",),
    ),
    _sdpa_case(
        "causal_bottom_right_t_lt_s",
        "causal, query i sees keys j <= i + S - T (FlashAttention, decoding), T < S",
        T=3,
        S=6,
        causal=True,
        align="bottom_right",
        tags=("causal",),
    ),
    _sdpa_case(
        "causal_bottom_right_t_gt_s",
        "causal bottom_right with T > S: the first T - S query rows are empty (zeros)",
        T=6,
        S=4,
        causal=True,
        align="bottom_right",
        tags=("causal", "empty_rows"),
    ),
    _sdpa_case(
        "sliding_window_causal",
        "causal sliding window (2, 0): each query sees itself and 2 keys back (Mistral)",
        T=6,
        S=6,
        window=(2, 0),
        tags=("window",),
    ),
    _sdpa_case(
        "sliding_window_two_sided_bottom_right",
        "window (1, 1) around i + S - T, T < S",
        T=4,
        S=7,
        window=(1, 1),
        align="bottom_right",
        tags=("window",),
    ),
    _sdpa_case(
        "padding_empty_rows_zero",
        "key padding per batch element plus one fully masked query row; empty rows give 0",
        extras=("padding", "empty_row"),
        tags=("mask", "empty_rows"),
    ),
    _sdpa_case(
        "padding_empty_rows_uniform",
        "the same masks; empty rows give weights 1/S (JAX, the -1e9 idiom)",
        extras=("padding", "empty_row"),
        empty_rows="uniform",
        tags=("mask", "empty_rows"),
    ),
    _sdpa_case(
        "padding_no_empty_rows",
        "key padding that leaves every query a key",
        extras=("padding",),
        tags=("mask",),
    ),
    _sdpa_case(
        "additive_bias",
        "a random additive bias of shape (1, H, T, S), broadcast over the batch",
        extras=("bias",),
        tags=("bias",),
    ),
    _sdpa_case(
        "bias_with_neg_inf",
        "a bias whose -inf entries mask their pairs (ALiBi-style padding)",
        extras=("bias", "neg_inf_bias"),
        tags=("bias", "mask"),
    ),
    _sdpa_case(
        "gqa",
        "grouped-query attention: H = 4 query heads over Hkv = 2 key/value heads, Dk != Dv",
        H=4,
        Hkv=2,
        Dk=4,
        Dv=3,
        tags=("gqa",),
    ),
    _sdpa_case("mqa", "multi-query attention: Hkv = 1", H=4, Hkv=1, tags=("gqa",)),
    _sdpa_case("dk_ne_dv", "value width differs from the query/key width", Dk=8, Dv=3),
    _sdpa_case(
        "cross_attention_long_keys",
        "T = 2 queries over S = 9 keys, causal bottom_right + padding",
        T=2,
        S=9,
        causal=True,
        align="bottom_right",
        extras=("padding",),
        tags=("causal", "mask"),
    ),
    _sdpa_case(
        "softcap",
        "soft-capped scores cap * tanh(s / cap) with cap = 1.5 (Gemma 2), with a bias",
        softcap=1.5,
        extras=("bias",),
        tags=("bias",),
    ),
    _sdpa_case(
        "dropout_keep_mask",
        "dropout p = 0.25 with an explicit keep-mask",
        dropout_p=0.25,
        extras=("dropout",),
        tags=("dropout",),
    ),
    _sdpa_case("custom_scale", "an explicit scale 0.3 instead of 1/sqrt(Dk)", scale=0.3),
    _sdpa_case(
        "one_element",
        "B = H = T = S = Dk = Dv = 1: a softmax over one key",
        B=1,
        H=1,
        T=1,
        S=1,
        Dk=1,
    ),
    _sdpa_case(
        "long_rows",
        "S = 1024 keys per row, GQA, causal bottom_right: long softmax reductions",
        B=1,
        H=2,
        Hkv=1,
        T=4,
        S=1024,
        Dk=8,
        Dv=8,
        causal=True,
        align="bottom_right",
        tags=("long", "causal", "gqa"),
    ),
    _mha_case(
        "mha_self_attention",
        "self-attention D = 8, H = 2, biases, causal",
        T=4,
        S=4,
        D=8,
        causal=True,
        extras=("self",),
        tags=("causal",),
    ),
    _mha_case(
        "mha_cross_attention_key_padding",
        "cross-attention T != S with key padding (nn.MultiheadAttention-expressible)",
        T=3,
        S=5,
        D=6,
        H=2,
        extras=("padding",),
        tags=("mask",),
    ),
    _mha_case(
        "mha_gqa_kdim_vdim",
        "GQA H = 4, Hkv = 2, Dk = 3 != Dv = 5, kdim = 5, vdim = 7, out width 4",
        H=4,
        Hkv=2,
        D=6,
        Dk=3,
        Dv=5,
        Dk_in=5,
        Dv_in=7,
        D_out=4,
        tags=("gqa",),
    ),
    _mha_case(
        "mha_mqa_no_bias_attention_bias",
        "MQA, no projection biases, bottom_right causal + an attention bias",
        H=3,
        Hkv=1,
        D=6,
        T=2,
        S=4,
        causal=True,
        align="bottom_right",
        extras=("no_param_bias", "bias"),
        tags=("gqa", "bias", "causal"),
    ),
)


def cases(
    kind: str | None = None, *, tags: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()
) -> list[Case]:
    """The canonical cases, in a fixed order.

    Parameters
    ----------
    kind : {"sdpa", "mha"}, optional
        Only scaled dot-product attention or only multi-head attention cases.
    tags : tuple of str, optional
        Only cases carrying one of these tags (``"causal"``, ``"mask"``, ``"empty_rows"``,
        ``"bias"``, ``"gqa"``, ``"window"``, ``"dropout"``, ``"long"``).
    exclude : tuple of str
        Leave out cases carrying any of these tags (e.g. ``("long",)`` for a quick run).

    Returns
    -------
    list of Case

    Examples
    --------
    >>> from attention_ref.cases import cases
    >>> [str(c) for c in cases("sdpa", tags=("causal",))][:2]
    ['causal_top_left_t_lt_s', 'causal_top_left_t_gt_s']
    >>> data = cases("sdpa")[0].build()
    >>> sorted(data.inputs), data.reference().out.shape
    (['k', 'q', 'v'], (2, 2, 3, 4))
    """
    if kind is not None and kind not in ALL_KINDS:
        raise ValueError(f"kind must be one of {ALL_KINDS} or None; got {kind!r}")
    for name, value in (("tags", tags or ()), ("exclude", exclude)):
        if not isinstance(value, tuple) or not all(isinstance(t, str) for t in value):
            raise TypeError(f"{name} must be a tuple of str; got {value!r}")
    return [
        c
        for c in (_CASES if kind in (None, *KINDS) else _SERVING_CASES)
        if (kind is None or c.kind == kind)
        and (tags is None or set(tags) & set(c.tags))
        and not set(exclude) & set(c.tags)
    ]


def get_case(name: str) -> Case:
    """The case called ``name``.

    Examples
    --------
    >>> from attention_ref.cases import get_case
    >>> get_case("gqa").dims["Hkv"]
    2
    """
    for c in _CASES + _SERVING_CASES:
        if c.name == name:
            return c
    names = [c.name for c in _CASES + _SERVING_CASES]
    raise ValueError(f"no canonical case named {name!r}; the names are {names}")


def serving_cases(kind: str | None = None) -> list[Case]:
    """The canonical cases of the serving layouts (``paged``, ``kvcache``, ``mla``, ``sparse``).

    :func:`cases` without a kind gives the attention cases only (what frameworks run); these
    come on their own, or with ``cases("paged")`` and so on.

    Examples
    --------
    >>> from attention_ref.cases import serving_cases
    >>> [c.kind for c in serving_cases()]
    ['paged', 'paged', 'kvcache', 'mla', 'sparse']
    >>> data = serving_cases("sparse")[0].build()
    >>> sorted(data.inputs), data.options["indices"].dtype
    (['k', 'q', 'v'], dtype('int64'))
    """
    if kind is not None and kind not in SERVING_KINDS:
        raise ValueError(f"kind must be one of {SERVING_KINDS} or None; got {kind!r}")
    return [c for c in _SERVING_CASES if kind is None or c.kind == kind]


def _build(case: Case, seed: int | None) -> CaseData:
    rng = np.random.default_rng(case.seed if seed is None else [case.seed, seed])
    if case.kind in SERVING_KINDS:
        return _build_serving(case, rng)
    d = case.dims
    B, H, Hkv, T, S = d["B"], d["H"], d["Hkv"], d["T"], d["S"]
    options: dict[str, Any] = dict(case.options)
    inputs: dict[str, np.ndarray] = {}
    if case.kind == "sdpa":
        inputs["q"] = rng.normal(size=(B, H, T, d["Dk"]))
        inputs["k"] = rng.normal(size=(B, Hkv, S, d["Dk"]))
        inputs["v"] = rng.normal(size=(B, Hkv, S, d["Dv"]))
    else:
        inputs["query"] = rng.normal(size=(B, T, d["D"]))
        if "self" in case.extras:
            inputs["key"], inputs["value"] = inputs["query"].copy(), inputs["query"].copy()
        else:
            inputs["key"] = rng.normal(size=(B, S, d["Dk_in"]))
            inputs["value"] = rng.normal(size=(B, S, d["Dv_in"]))
        p = init_params(
            rng,
            d_model=d["D"],
            num_heads=H,
            num_kv_heads=Hkv,
            head_dim=d["Dk"],
            v_head_dim=d["Dv"],
            kdim=d["Dk_in"],
            vdim=d["Dv_in"],
            out_dim=d["D_out"],
            bias="no_param_bias" not in case.extras,
        )
        inputs.update(p.as_dict())
        options.update(num_heads=H, num_kv_heads=Hkv)
    if "padding" in case.extras or "empty_row" in case.extras:
        mask = np.ones((B, 1, T, S), dtype=bool)  # (B, 1, T, S): the same for every head
        if "padding" in case.extras:
            lengths = [S] + [
                max(1, S - 2 - i) for i in range(B - 1)
            ]  # batch 0 unpadded, then shorter
            for b, n in enumerate(lengths):
                mask[b, :, :, n:] = False
        if "empty_row" in case.extras:
            mask[0, :, min(1, T - 1), :] = False  # batch 0: query row 1 sees nothing
        options["mask"] = mask
    if "bias" in case.extras:
        bias = rng.normal(size=(1, H, T, S))  # (1, H, T, S): broadcast over the batch
        if "neg_inf_bias" in case.extras:
            bias[0, :, :, -1] = -np.inf  # the last key is masked for every query
            bias[0, 0, 0, :] = -np.inf  # head 0, query 0: an empty row
        inputs["bias"] = bias
    if "dropout" in case.extras:
        options["dropout_mask"] = rng.random((B, H, T, S)) >= options["dropout_p"]
    out_shape = (B, H, T, d["Dv"]) if case.kind == "sdpa" else (B, T, d["D_out"])
    cotangent = rng.normal(size=out_shape)
    return CaseData(case, inputs, options, cotangent)


# ----------------------------------------------------------------------------- serving layouts


def _serving_case(name, kind, description, dims, *, extras=(), tags=(), **options) -> Case:
    return Case(name, kind, description, dims, options, tuple(extras), tuple(tags))


_SERVING_CASES: tuple[Case, ...] = (
    _serving_case(
        "paged_gqa_causal",
        "paged",
        "3 sequences of lengths 9, 7, 5 in shuffled pages of 4 slots (2 unused pages), the last "
        "T = 2 positions of each as queries, causal, GQA",
        dict(B=3, H=4, Hkv=2, T=2, S=9, Dk=4, Dv=3, page_size=4),
        tags=("causal", "gqa"),
        causal=True,
    ),
    _serving_case(
        "paged_window_softcap_sinks",
        "paged",
        "paged cache with a causal window (3, 0), a soft-cap and learnable sinks (dsinks)",
        dict(B=2, H=2, Hkv=1, T=3, S=8, Dk=4, Dv=4, page_size=3),
        extras=("sinks",),
        tags=("causal", "window", "sinks"),
        causal=True,
        window=(3, 0),
        softcap=2.0,
    ),
    _serving_case(
        "kvcache_rotary_append",
        "kvcache",
        "flash_attn_with_kvcache: append 2 new rotated keys at cache_seqlens [3, 6] of a 10-slot "
        "cache, causal, GQA, rotary_dim 4 of 6 (GPT-NeoX pairs); inference only",
        dict(B=2, H=4, Hkv=2, T=2, S=10, Dk=6, Dv=5, rotary_dim=4),
        tags=("causal", "gqa", "rotary"),
        causal=True,
    ),
    _serving_case(
        "mla_causal",
        "mla",
        "multi-head latent attention, naive form (intermediates: the absorbed form's q_abs, "
        "kv_latent, o_lat), causal bottom_right, T < S",
        dict(B=2, H=3, T=3, S=5, d_nope=4, d_rope=2, d_c=6, Dv=5),
        tags=("causal",),
        causal=True,
        align="bottom_right",
    ),
    _serving_case(
        "sparse_topk_gqa",
        "sparse",
        "top-3 sparse attention, one index list per kv head with -1 padding and an all -1 row, "
        "causal bottom_right, GQA",
        dict(B=2, H=4, Hkv=2, T=4, S=9, Dk=4, Dv=3, topk=3),
        tags=("causal", "gqa", "sparse"),
        causal=True,
        align="bottom_right",
    ),
)


def _serving_forward(kind: str) -> Callable[..., Any]:
    """The reference forward of a serving kind, returning the output array."""
    from ..variants import mla, paged, sparse

    if kind == "paged":
        return paged.paged_attention
    if kind == "mla":
        return mla.mla_attention_naive
    if kind == "sparse":
        return sparse.sparse_attention
    return lambda **kw: paged.attention_with_kvcache(**kw).out


def _build_serving(case: Case, rng: np.random.Generator) -> CaseData:
    d = case.dims
    options: dict[str, Any] = dict(case.options)
    inputs: dict[str, np.ndarray] = {}
    B, H, T = d["B"], d["H"], d["T"]
    cotangent: np.ndarray | None
    if case.kind == "paged":
        P, S = d["page_size"], d["S"]
        seqlens = np.array([max(T, S - 2 * b) for b in range(B)], dtype=np.int64)  # (B,)
        pages = [-(-int(n) // P) for n in seqlens]  # pages each sequence uses
        num_blocks = sum(pages) + 2  # two pages no sequence owns
        order = rng.permutation(num_blocks)
        table = np.zeros((B, -(-S // P)), dtype=np.int64)  # (B, max_blocks); unused entries 0
        start = 0
        for b, n in enumerate(pages):
            table[b, :n] = order[start : start + n]
            start += n
        inputs["q"] = rng.normal(size=(B, H, T, d["Dk"]))
        inputs["k_pages"] = rng.normal(size=(num_blocks, P, d["Hkv"], d["Dk"]))
        inputs["v_pages"] = rng.normal(size=(num_blocks, P, d["Hkv"], d["Dv"]))
        options.update(block_table=table, seqlens=seqlens)
        cotangent = rng.normal(size=(B, H, T, d["Dv"]))
    elif case.kind == "kvcache":
        from ..core.rotary import rotary_cos_sin

        S, Hkv = d["S"], d["Hkv"]
        inputs["q"] = rng.normal(size=(B, T, H, d["Dk"]))  # FlashAttention's layouts
        inputs["k_cache"] = rng.normal(size=(B, S, Hkv, d["Dk"]))
        inputs["v_cache"] = rng.normal(size=(B, S, Hkv, d["Dv"]))
        inputs["k"] = rng.normal(size=(B, T, Hkv, d["Dk"]))
        inputs["v"] = rng.normal(size=(B, T, Hkv, d["Dv"]))
        cos, sin = rotary_cos_sin(np.arange(S), d["rotary_dim"])  # (S, rotary_dim / 2)
        cache_seqlens = np.array([3 + 3 * b for b in range(B)], dtype=np.int64)
        options.update(
            cache_seqlens=cache_seqlens, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False
        )
        cotangent = None
    elif case.kind == "mla":
        S, dc = d["S"], d["d_c"]
        inputs["q_nope"] = rng.normal(size=(B, H, T, d["d_nope"]))
        inputs["q_pe"] = rng.normal(size=(B, H, T, d["d_rope"]))
        inputs["c_kv"] = rng.normal(size=(B, S, dc))
        inputs["k_pe"] = rng.normal(size=(B, S, d["d_rope"]))
        inputs["w_uk"] = rng.normal(size=(H, dc, d["d_nope"])) / np.sqrt(dc)
        inputs["w_uv"] = rng.normal(size=(H, dc, d["Dv"])) / np.sqrt(dc)
        cotangent = rng.normal(size=(B, H, T, d["Dv"]))
    else:  # sparse
        S, Hkv, K = d["S"], d["Hkv"], d["topk"]
        indices = np.stack([rng.permutation(S)[:K] for _ in range(B * Hkv * T)]).reshape(
            B, Hkv, T, K
        )  # (B, Hkv, T, topk), distinct keys per row
        indices[:, :, 1, -1] = -1  # padding
        indices[0, 0, 2, :] = -1  # an empty row: no key listed
        inputs["q"] = rng.normal(size=(B, H, T, d["Dk"]))
        inputs["k"] = rng.normal(size=(B, Hkv, S, d["Dk"]))
        inputs["v"] = rng.normal(size=(B, Hkv, S, d["Dv"]))
        options["indices"] = indices.astype(np.int64)
        cotangent = rng.normal(size=(B, H, T, d["Dv"]))
    if "sinks" in case.extras:
        inputs["sinks"] = rng.normal(size=(H,))
    return CaseData(case, inputs, options, cotangent)


def _serving_reference(data: CaseData) -> Reference:
    """Output, gradients and intermediates of a serving case, from its variant's functions."""
    from ..variants import mla, paged, sparse

    kind = data.case.kind
    x: dict[str, Any] = dict(data.inputs)
    opts: dict[str, Any] = dict(data.options)
    cot: Any = data.cotangent
    r: Any
    if kind == "kvcache":
        r = paged.attention_with_kvcache(**x, **opts, return_lse=True)  # KVCacheLSEResult
        return Reference(
            r.out, {}, {"logsumexp": r.lse, "k_cache_new": r.k_cache, "v_cache_new": r.v_cache}
        )
    if kind == "paged":
        out, lse = paged.paged_attention(**x, **opts, return_lse=True)
        g = paged.paged_attention_backward(cot, **x, **opts)
        grads: dict[str, Any] = {
            "q": g.dq,
            "k_pages": g.dk_pages,
            "v_pages": g.dv_pages,
            "sinks": g.dsinks,
        }
        inter: dict[str, Any] = {"logsumexp": lse}
    elif kind == "mla":
        out, lse = mla.mla_attention_naive(**x, **opts, return_lse=True)
        g = mla.mla_attention_naive_backward(cot, **x, **opts)
        grads = dict(zip(("q_nope", "q_pe", "c_kv", "k_pe", "w_uk", "w_uv"), g, strict=True))
        q_abs = mla.mla_absorb(x["q_nope"], x["q_pe"], x["w_uk"])  # (B, H, T, d_c + d_rope)
        latent = np.concatenate([x["c_kv"], x["k_pe"]], axis=-1)  # (B, S, d_c + d_rope)
        o_lat = mla.mla_attention_absorbed(
            q_abs, latent, x["c_kv"].shape[-1], **{**opts, "scale": data.scale_used()}
        )
        inter = {"logsumexp": lse, "q_abs": q_abs, "kv_latent": latent, "o_lat": o_lat}
    else:
        out, lse = sparse.sparse_attention(**x, **opts, return_lse=True)
        g = sparse.sparse_attention_backward(cot, **x, **opts)
        grads = {"q": g.dq, "k": g.dk, "v": g.dv, "sinks": g.dsinks}
        inter = {"logsumexp": lse}
    return Reference(out, {n: grads[n] for n in x}, inter)
