"""Conformance of attention_ref's FlexAttention with PyTorch's, in float64 on the CPU.

Every torch-side mod below is written here, in torch, from its cited source (the attention-gym
style ``def score_mod(score, b, h, q_idx, kv_idx)`` with captured tensors); none calls
attention_ref. The NumPy side is the library's mods (``attention_ref.core.mods``).

* Forward: :func:`attention_ref.flex_attention` (``path="plain"`` and ``path="tiled"`` with a
  BlockMask from :func:`attention_ref.create_block_mask`, small blocks, lengths not multiples of
  them) against ``torch.nn.attention.flex_attention.flex_attention`` for every library mod, their
  combinations (``and_masks``/``or_masks``, ``chain_score_mods``, a score mod with a mask mod,
  random combinations, a score mod returning -inf), with the lse, T < S and T > S, B > 1, H > 1,
  E != Ev, GQA and MQA, keys of batch 1 broadcast, rows with no key (output 0, lse -inf on both
  sides), the tiled path also with a mask_mod and no BlockMask. ``max|ours - torch| <= 1e-12``.
* Gradients: :func:`attention_ref.flex_attention_backward` (dq, dk, dv and every mod parameter:
  ALiBi's slopes, the relative-position table, T5's table, softcap's cap) against torch autograd
  through the same torch mods applied to a dense score tensor, for a random cotangent of the
  output AND of the lse; FlexAttention itself has no CPU backward (``_validate_device`` raises
  "FlexAttention does not support backward on CPU"). ``<= 1e-11``.
* BlockMask: every field of :func:`attention_ref.create_block_mask` equals torch's
  ``create_block_mask`` (including the entries of ``kv_indices`` past ``kv_num_blocks``, which
  torch's stable descending argsort defines), for causal, sliding-window, document, prefix-LM,
  chunked and head-dependent masks, B or H None, int and tuple BLOCK_SIZE, lengths not multiples
  of it; the converters of ``attention_ref.adapters.torch`` round-trip and a converted BlockMask
  gives torch's ``flex_attention`` the reference's output.
* Each comparison can fail: ALiBi with the other sign, T5 buckets off by one, the scale applied
  after the score mod, the lse's cotangent dropped, an ascending block order -- all differ from
  attention_ref by far more than the tolerance.

Torch's eager ``flex_attention`` wraps its higher-order op in ``torch.compile(backend="eager")``
(a dynamo trace per new mod); most tests set ``_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True``,
which calls the same op (``sdpa_dense`` -> ``math_attention``) without dynamo, and
``test_compiled_path`` runs the default path. The lse that torch returns is natural-log (its op
returns ``logsumexp / log(2)`` and ``_finalize_outputs`` multiplies by ``ln 2``).

Sources (torch 2.13.0 as installed):
``torch/_higher_order_ops/flex_attention.py`` ``_math_attention_inner`` (``scores = (scores *
scale)``, then ``torch.where(mask_mod(...), score_mod(scores, ...), -inf)``), ``math_attention``
(``repeat_interleave(key, G, dim=1)`` for GQA, ``masked_rows`` -> lse ``-inf``,
``torch._safe_softmax``); ``torch/nn/attention/flex_attention.py`` ``create_block_mask``,
``_convert_mask_to_block_mask`` (pad with False, ``mask_block_sum``), ``_dense_to_ordered``
(``argsort(descending=True, stable=True)``), ``_transpose_ordered``. Mods:
meta-pytorch/attention-gym ``attn_gym/mods/alibi.py``, ``attn_gym/mods/softcapping.py``,
``attn_gym/masks/{causal,sliding_window,document_mask,prefix_lm}.py``; pytorch/torchtune
``torchtune/models/llama4/_chunked_attention.py``; Hugging Face transformers
``src/transformers/models/t5/modeling_t5.py`` (``T5Attention._relative_position_bucket``) and
``src/transformers/masking_utils.py`` (``chunked_overlay``, ``blockwise_overlay``);
ofirpress/attention_with_linear_biases ``fairseq/models/transformer.py`` (``get_slopes``).

The tests skip without torch (and fail when ``ATTENTION_REF_REQUIRE_TORCH=1``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from conftest import require_torch

import attention_ref as ar
from attention_ref.adapters.torch import block_mask_from_torch, block_mask_to_torch

torch = require_torch()
from torch.nn.attention import flex_attention as fa  # noqa: E402  (after the torch gate)

pytestmark = [
    # flex_attention's "called without torch.compile()" note and return_lse's deprecation
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

#: Forward: both sides compute the same float64 formulas in different orders (a few ulps per
#: reduction over at most 11 keys; the lse also goes through torch's / ln 2 * ln 2).
FWD_TOL = 1e-12
#: Gradients: one more matmul and a reduction over heads and pairs (the tables' scatter-adds).
GRAD_TOL = 1e-11
#: A planted bug must miss by far more than the tolerance.
PLANTED_MIN = 1e-4

#: The largest difference measured per comparison kind, printed at the end (``pytest -s``).
MEASURED: dict[str, float] = {}

B, HQ, HKV, T, S, E, EV = 2, 4, 2, 7, 11, 5, 3


@pytest.fixture(autouse=True)
def _eager_flex(monkeypatch):
    """FlexAttention's op without the dynamo wrapper (same ``math_attention``; no 2 s trace)."""
    monkeypatch.setattr(fa, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MEASURED:
        print("\nmax |attention_ref - torch| per comparison:")
        for name in sorted(MEASURED):
            print(f"  {name:<28} {MEASURED[name]:.2e}")


def max_diff(kind: str, ours: Any, theirs: Any) -> float:
    """max|ours - theirs| over the finite entries; the -inf entries (empty rows' lse) must sit at
    the same places on both sides. Recorded under ``kind``."""
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{kind}: shape {ours.shape} != torch's {theirs.shape}"
    inf_o, inf_t = np.isneginf(ours), np.isneginf(theirs)
    assert np.array_equal(inf_o, inf_t), f"{kind}: -inf at {np.argwhere(inf_o ^ inf_t)[:5]}"
    assert np.isfinite(ours[~inf_o]).all() and np.isfinite(theirs[~inf_t]).all(), kind
    d = float(np.max(np.abs(ours[~inf_o] - theirs[~inf_t]), initial=0.0))
    MEASURED[kind] = max(MEASURED.get(kind, 0.0), d)
    return d


def assert_close(kind: str, ours: Any, theirs: Any, tol: float) -> float:
    d = max_diff(kind, ours, theirs)
    assert d <= tol, f"{kind}: max|attention_ref - torch| = {d:.3e} > {tol:.0e}"
    return d


def tt(x: Any, grad: bool = False) -> Any:
    """A float64 / int64 torch tensor holding a copy of ``x``."""
    arr = np.array(x)
    t = torch.tensor(arr, dtype=torch.float64 if arr.dtype.kind == "f" else torch.int64)
    return t.requires_grad_(grad)


def to_np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


# --------------------------------------------------------------------------------------------
# The torch-side mods, written from their sources (torch tensors only; vmap- and
# broadcast-friendly: FlexAttention calls them on 0-d tensors under vmap, the dense reference on
# broadcasting (B,1,1,1), (1,H,1,1), (1,1,T,1), (1,1,1,S) index tensors).
# --------------------------------------------------------------------------------------------


def t_causal(offset: int = 0) -> Callable:
    # attention-gym attn_gym/masks/causal.py: ``return q_idx >= kv_idx`` (offset: bottom-right)
    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal_mask


def t_gym_sliding_window(window_size: int) -> Callable:
    # attention-gym attn_gym/masks/sliding_window.py generate_sliding_window:
    # and_masks(q_idx - kv_idx <= window_size, causal_mask)
    def sliding_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= window_size

    return fa.and_masks(sliding_window, t_causal())


def t_window(left: int | None, right: int | None, offset: int) -> Callable:
    # A two-sided window around q' = q_idx + offset: q' - left <= kv_idx <= q' + right.
    parts = []
    if left is not None:
        parts.append(lambda b, h, q_idx, kv_idx: kv_idx >= q_idx + offset - left)
    if right is not None:
        parts.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + offset + right)
    return fa.and_masks(*parts)


def t_chunked(chunk_size: int, offset: int = 0) -> Callable:
    # transformers masking_utils.py chunked_overlay (no left padding):
    # ``kv_idx // chunk_size == q_idx // chunk_size``; offset moves the queries.
    def chunked(b, h, q_idx, kv_idx):
        return kv_idx // chunk_size == (q_idx + offset) // chunk_size

    return chunked


def t_torchtune_chunked_causal(chunk_size: int) -> Callable:
    # torchtune torchtune/models/llama4/_chunked_attention.py get_chunked_attention_mask:
    # same_chunk & causal(q_idx % chunk_size, kv_idx % chunk_size)
    def chunked_attention_mask_mod(b, h, q_idx, kv_idx):
        same_chunk = q_idx // chunk_size == kv_idx // chunk_size
        inner_mask = t_causal()(b, h, q_idx % chunk_size, kv_idx % chunk_size)
        return same_chunk & inner_mask

    return chunked_attention_mask_mod


def t_document(q_ids: Any, kv_ids: Any) -> Callable:
    # attention-gym document_mask.py: ``document_id[q_idx] == document_id[kv_idx]``; per batch
    # and with padding as transformers masking_utils.py blockwise_overlay:
    # ``(q_group == kv_group) & (q_group >= 0)``.
    qd, kd = tt(q_ids), tt(kv_ids)

    def document_mask(b, h, q_idx, kv_idx):
        q_group = qd[b, q_idx] if qd.ndim == 2 else qd[q_idx]
        kv_group = kd[b, kv_idx] if kd.ndim == 2 else kd[kv_idx]
        return (q_group == kv_group) & (q_group >= 0)

    return document_mask


def t_gym_document_causal(lengths: list[int]) -> Callable:
    # attention-gym document_mask.py generate_doc_mask_mod(causal_mask, offsets), verbatim logic:
    # same_doc & causal(q_idx - offsets[document_id[q_idx]], kv_idx - offsets[...]).
    offsets = torch.cumsum(torch.tensor([0, *lengths]), dim=-1)
    counts = offsets[1:] - offsets[:-1]
    document_id = torch.repeat_interleave(torch.arange(len(counts)), counts)

    def doc_mask_mod(b, h, q_idx, kv_idx):
        same_doc = document_id[q_idx] == document_id[kv_idx]
        q_logical = q_idx - offsets[document_id[q_idx]]
        kv_logical = kv_idx - offsets[document_id[kv_idx]]
        inner_mask = t_causal()(b, h, q_logical, kv_logical)
        return same_doc & inner_mask

    return doc_mask_mod


def t_prefix_lm(prefix: Any) -> Callable:
    # attention-gym attn_gym/masks/prefix_lm.py generate_prefix_lm_mask:
    # or_masks(kv_idx < prefix_length, causal_mask); per batch: prefix_length[b].
    p = tt(prefix)

    def prefix_mask(b, h, q_idx, kv_idx):
        return kv_idx < (p[b] if p.ndim == 1 else p)

    return fa.or_masks(prefix_mask, t_causal())


def t_alibi(slopes: Any) -> Callable:
    # attention-gym attn_gym/mods/alibi.py: ``bias = (kv_idx - q_idx) * scale``; here the slope
    # is a captured (learnable) tensor per head.
    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi_mod


def t_gym_alibi(H: int) -> Callable:
    # attention-gym attn_gym/mods/alibi.py generate_alibi_bias(H), verbatim.
    def alibi_mod(score, b, h, q_idx, kv_idx):
        scale = torch.exp2(-((h + 1) * 8.0 / H))
        bias = (kv_idx - q_idx) * scale
        return score + bias

    return alibi_mod


def t_softcap(cap: Any) -> Callable:
    # attention-gym attn_gym/mods/softcapping.py generate_tanh_softcap:
    # ``soft_cap * tanh(score / soft_cap)``
    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return tanh_softcap


def t_relative_position(table: Any, offset: int) -> Callable:
    # The FlexAttention blog's relative position bias (``score + (q_idx - kv_idx)``), learned:
    # one table entry per head and distance.
    def relative_positional(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + offset]

    return relative_positional


def hf_relative_position_bucket(
    relative_position, bidirectional=True, num_buckets=32, max_distance=128
):
    # Hugging Face transformers src/transformers/models/t5/modeling_t5.py
    # T5Attention._relative_position_bucket, line by line (float32 log as there: ``.float()``).
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def t_t5(table: Any, bidirectional: bool, max_distance: int, bucket_shift: int = 0) -> Callable:
    # T5Attention.compute_bias: relative_position = memory_position - context_position, i.e.
    # kv_idx - q_idx; values = relative_attention_bias(bucket). ``bucket_shift`` plants a bug.
    num_buckets = table.shape[1]

    def t5_bias(score, b, h, q_idx, kv_idx):
        bucket = hf_relative_position_bucket(
            kv_idx - q_idx, bidirectional, num_buckets, max_distance
        )
        if bucket_shift:
            bucket = torch.clamp(bucket + bucket_shift, 0, num_buckets - 1)
        return score + table[h, bucket]

    return t5_bias


def t_chain(*mods: Callable) -> Callable:
    def chained(score, b, h, q_idx, kv_idx):
        for m in mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score

    return chained


def t_custom(score, b, h, q_idx, kv_idx):
    # Twin of ``np_custom`` (a user's plain function of every index).
    f64 = torch.float64
    return score * (1.0 + 0.25 * h) + 0.1 * torch.cos((q_idx - kv_idx).to(f64)) - 0.3 * b.to(f64)


def np_custom(score, b, h, q_idx, kv_idx):
    return score * (1.0 + 0.25 * h) + 0.1 * np.cos(q_idx - kv_idx) - 0.3 * b


def t_neg_inf(score, b, h, q_idx, kv_idx):
    # A score mod that masks (FlexAttention: "-inf" from score_mod masks the pair), whole rows
    # included (q_idx == 2).
    return torch.where((kv_idx > q_idx + h) | (q_idx == 2), -math.inf, score)


def np_neg_inf(score, b, h, q_idx, kv_idx):
    return np.where((kv_idx > q_idx + h) | (q_idx == 2), -np.inf, score)


# --------------------------------------------------------------------------------------------
# The catalogue: attention_ref mods and their torch twins, with named parameters.
# --------------------------------------------------------------------------------------------


@dataclass
class Mod:
    """One mod, both sides: ``ref`` (attention_ref), ``make_torch(tensors)`` (the torch twin
    built on ``tensors[name]`` for every parameter), ``params`` (name -> NumPy value)."""

    ref: Any
    make_torch: Callable[[dict[str, Any]], Callable]
    params: dict[str, np.ndarray] = field(default_factory=dict)
    #: parameters the torch twin computes itself instead of capturing (no torch gradient)
    untracked: frozenset[str] = frozenset()


@dataclass
class Case:
    name: str
    score: Mod | None = None
    mask: Mod | None = None
    scale: float | None = None

    def torch_mods(self, tensors: dict[str, Any]) -> tuple[Callable | None, Callable | None]:
        return (
            None if self.score is None else self.score.make_torch(tensors),
            None if self.mask is None else self.mask.make_torch(tensors),
        )

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {} if self.score is None else dict(self.score.params)

    @property
    def untracked(self) -> frozenset[str]:
        return frozenset() if self.score is None else self.score.untracked


def chain(*mods: Mod) -> Mod:
    """``chain_score_mods`` on both sides; parameters renamed ``"i.name"`` as the library does."""
    params = {f"{i}.{n}": v for i, m in enumerate(mods) for n, v in m.params.items()}
    untracked = frozenset(f"{i}.{n}" for i, m in enumerate(mods) for n in m.untracked)

    def make(tensors):
        return t_chain(
            *[m.make_torch({n: tensors[f"{i}.{n}"] for n in m.params}) for i, m in enumerate(mods)]
        )

    return Mod(ar.chain_score_mods(*[m.ref for m in mods]), make, params, untracked)


def mask_and(*mods: Mod) -> Mod:
    return Mod(
        ar.and_masks(*[m.ref for m in mods]),
        lambda t: fa.and_masks(*[m.make_torch(t) for m in mods]),
    )


def mask_or(*mods: Mod) -> Mod:
    return Mod(
        ar.or_masks(*[m.ref for m in mods]),
        lambda t: fa.or_masks(*[m.make_torch(t) for m in mods]),
    )


def padded_doc_ids(Bn: int, n: int, seed: int) -> np.ndarray:
    """(Bn, n) document ids: sorted runs, the last positions -1 (padding)."""
    r = np.random.default_rng(seed)
    ids = np.sort(r.integers(0, 3, size=(Bn, n)), axis=-1)
    for i in range(Bn):
        ids[i, n - 2 - i :] = -1  # row i: its last 2 + i positions are padding
    return ids


def mask_pool(Tq: int, Skv: int) -> dict[str, Mod]:
    q_ids, kv_ids = padded_doc_ids(B, Tq, 1), padded_doc_ids(B, Skv, 2)
    q_1d, kv_1d = np.repeat([0, 1, 2], [3, 2, Tq])[:Tq], np.repeat([0, 1, 2], [2, 4, Skv])[:Skv]
    off = Skv - Tq
    return {
        "causal": Mod(ar.CausalMask(), lambda t: t_causal()),
        "causal_bottom_right": Mod(ar.CausalMask(offset=off), lambda t: t_causal(off)),
        "sliding_window_gym": Mod(ar.SlidingWindowMask(3), lambda t: t_gym_sliding_window(3)),
        "window_two_sided": Mod(
            ar.SlidingWindowMask(2, right=1, offset=off), lambda t: t_window(2, 1, off)
        ),
        "window_left_unbounded": Mod(
            ar.SlidingWindowMask(None, right=2), lambda t: t_window(None, 2, 0)
        ),
        "window_right_unbounded": Mod(
            ar.SlidingWindowMask(1, right=None), lambda t: t_window(1, None, 0)
        ),
        "chunked": Mod(ar.ChunkedMask(3), lambda t: t_chunked(3)),
        "chunked_offset": Mod(ar.ChunkedMask(4, offset=off), lambda t: t_chunked(4, off)),
        "chunked_causal_torchtune": Mod(
            ar.and_masks(ar.ChunkedMask(3), ar.CausalMask()),
            lambda t: t_torchtune_chunked_causal(3),
        ),
        "document_padded": Mod(ar.DocumentMask(q_ids, kv_ids), lambda t: t_document(q_ids, kv_ids)),
        "document_shared": Mod(ar.DocumentMask(q_1d, kv_1d), lambda t: t_document(q_1d, kv_1d)),
        "prefix_lm": Mod(ar.PrefixLMMask(3), lambda t: t_prefix_lm(3)),
        "prefix_lm_per_batch": Mod(ar.PrefixLMMask([2, 5]), lambda t: t_prefix_lm([2, 5])),
    }


def score_pool(Tq: int, Skv: int, H: int) -> dict[str, Mod]:
    r = np.random.default_rng(3)
    slopes = r.uniform(0.05, 0.6, H)
    rel = r.standard_normal((H, Tq + Skv - 1))
    t5_bi, t5_uni = r.standard_normal((H, 8)), r.standard_normal((H, 6))
    return {
        "alibi": Mod(ar.ALiBi(slopes), lambda t: t_alibi(t["slopes"]), {"slopes": slopes}),
        "alibi_gym": Mod(  # the slopes computed inside the twin, as attention-gym does
            ar.ALiBi(ar.alibi_slopes(H)),
            lambda t: t_gym_alibi(H),
            {"slopes": ar.alibi_slopes(H)},
            frozenset({"slopes"}),
        ),
        "softcap": Mod(ar.SoftCap(0.9), lambda t: t_softcap(t["cap"]), {"cap": np.array(0.9)}),
        "relative_position": Mod(
            ar.RelativePositionBias(rel, offset=Skv - 1),
            lambda t: t_relative_position(t["table"], Skv - 1),
            {"table": rel},
        ),
        "t5_bidirectional": Mod(
            ar.T5RelativeBias(t5_bi, bidirectional=True, max_distance=8),
            lambda t: t_t5(t["table"], True, 8),
            {"table": t5_bi},
        ),
        "t5_unidirectional": Mod(
            ar.T5RelativeBias(t5_uni, bidirectional=False, max_distance=5),
            lambda t: t_t5(t["table"], False, 5),
            {"table": t5_uni},
        ),
        "custom_plain_function": Mod(np_custom, lambda t: t_custom),
    }


def build_cases(Tq: int = T, Skv: int = S, H: int = HQ) -> list[Case]:
    m, s = mask_pool(Tq, Skv), score_pool(Tq, Skv, H)
    cases = [Case("no_mods"), Case("no_mods_scale", scale=0.37)]
    cases += [Case(f"mask:{n}", mask=v) for n, v in m.items()]
    cases += [Case(f"score:{n}", score=v) for n, v in s.items()]
    neg_inf = Mod(np_neg_inf, lambda t: t_neg_inf)
    cases += [
        Case("score:neg_inf_masking", neg_inf),
        Case("neg_inf_masking+prefix_lm", neg_inf, m["prefix_lm_per_batch"]),
        Case("t5_unscaled+causal", s["t5_unidirectional"], m["causal"], scale=1.0),
        Case("alibi+causal", s["alibi"], m["causal"]),
        Case("softcap+document", s["softcap"], m["document_padded"], scale=2.0),
        Case(
            "chain(alibi,softcap)+and(document,causal)",
            chain(s["alibi"], s["softcap"]),
            mask_and(m["document_padded"], m["causal_bottom_right"]),
        ),
        Case(
            "chain(t5,relpos,softcap)+or(prefix,window)",
            chain(s["t5_bidirectional"], s["relative_position"], s["softcap"]),
            mask_or(m["prefix_lm_per_batch"], m["window_two_sided"]),
            scale=0.6,
        ),
    ]
    # Random combinations (seeded): 1 mask, 2 joined by and_masks or 3 by or_masks; 0-3 score
    # mods chained. The name spells the combination.
    r = np.random.default_rng(2026)
    mask_names, score_names = sorted(m), sorted(s)
    for i in range(6):
        picked = list(r.choice(mask_names, size=i % 3 + 1, replace=False))
        op = {1: "", 2: "and", 3: "or"}[len(picked)]
        join = {1: lambda x: x, 2: mask_and, 3: mask_or}[len(picked)]
        mask = join(*[m[n] for n in picked])
        k = int(r.integers(0, 4))
        mods = list(r.choice(score_names, size=k, replace=False))
        score = None if k == 0 else s[mods[0]] if k == 1 else chain(*[s[n] for n in mods])
        name = f"random{i}:{op}({','.join(picked)})+chain({','.join(mods)})"
        cases.append(Case(name, score, mask, scale=[None, 0.5][i % 2]))
    return cases


CASES = build_cases()
#: (T, S, case): the catalogue with fewer queries than keys and with more (T > S: the
#: bottom-right masks leave the first queries without a key; negative offsets floor-divide).
SHAPED = [(T, S, c) for c in CASES] + [(S, T, c) for c in build_cases(S, T)]
SHAPED_IDS = [f"{c.name}-T{Tq}S{Skv}" for Tq, Skv, c in SHAPED]


def make_qkv(rng, Bn=B, Hq=HQ, Hkv=HKV, Tq=T, Skv=S, En=E, Evn=EV):
    q = rng.standard_normal((Bn, Hq, Tq, En))
    k = rng.standard_normal((Bn, Hkv, Skv, En))
    v = rng.standard_normal((Bn, Hkv, Skv, Evn))
    return q, k, v


def torch_flex(q, k, v, score_mod, mask_mod, scale, block_size=None, enable_gqa=True):
    """torch's flex_attention (no grad, float64): (out, natural-log lse) as NumPy."""
    Bn, Hq, Tq, _ = q.shape
    block_mask = None
    if mask_mod is not None:
        kw = {} if block_size is None else {"BLOCK_SIZE": block_size}
        block_mask = fa.create_block_mask(mask_mod, Bn, Hq, Tq, k.shape[2], device="cpu", **kw)
    out, aux = fa.flex_attention(
        tt(q),
        tt(k),
        tt(v),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=enable_gqa,
        return_aux=fa.AuxRequest(lse=True),
    )
    return to_np(out), to_np(aux.lse)


def ref_kwargs(case: Case, path: str, block_size: Any, Bn: int, Hq: int, Tq: int, Skv: int):
    kw: dict[str, Any] = {"score_mod": case.score and case.score.ref, "scale": case.scale}
    if path == "tiled" and case.mask is not None:
        kw["block_mask"] = ar.create_block_mask(
            case.mask.ref, Bn, Hq, Tq, Skv, BLOCK_SIZE=block_size
        )
    else:
        kw["mask_mod"] = case.mask and case.mask.ref
    return kw


PATHS = [("plain", None), ("tiled", 4), ("tiled", (4, 8))]
PATH_IDS = ["plain", "tiled4", "tiled4x8"]


# --------------------------------------------------------------------------------------------
# 1. Forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "block"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(("Tq", "Skv", "case"), SHAPED, ids=SHAPED_IDS)
def test_forward_matches_torch(Tq, Skv, case, path, block, rng):
    q, k, v = make_qkv(rng, Tq=Tq, Skv=Skv)
    t_score, t_mask = case.torch_mods({n: tt(p) for n, p in case.params.items()})
    out_t, lse_t = torch_flex(q, k, v, t_score, t_mask, case.scale, block)
    kw = ref_kwargs(case, path, block, B, HQ, Tq, Skv)
    out, lse = ar.flex_attention(q, k, v, enable_gqa=True, return_lse=True, path=path, **kw)
    assert_close(f"forward out ({path})", out, out_t, FWD_TOL)
    assert_close(f"forward lse ({path})", lse, lse_t, FWD_TOL)
    out_only = ar.flex_attention(q, k, v, enable_gqa=True, path=path, **kw)
    np.testing.assert_array_equal(out_only, out)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tiled_path_with_mask_mod_only(case, rng):
    """The tiled path given a mask_mod and no BlockMask (FlexAttention's default: one block of
    128, the mask mod on every pair)."""
    q, k, v = make_qkv(rng)
    t_score, t_mask = case.torch_mods({n: tt(p) for n, p in case.params.items()})
    out_t, lse_t = torch_flex(q, k, v, t_score, t_mask, case.scale)
    out, lse = ar.flex_attention(
        q,
        k,
        v,
        score_mod=case.score and case.score.ref,
        mask_mod=case.mask and case.mask.ref,
        scale=case.scale,
        enable_gqa=True,
        return_lse=True,
        path="tiled",
    )
    assert_close("forward out (tiled)", out, out_t, FWD_TOL)
    assert_close("forward lse (tiled)", lse, lse_t, FWD_TOL)


@pytest.mark.parametrize(
    ("Hq", "Hkv", "gqa"), [(3, 3, False), (4, 1, True), (6, 2, True)], ids=["MHA", "MQA", "GQA3"]
)
@pytest.mark.parametrize("path", ["plain", "tiled"])
def test_head_layouts(Hq, Hkv, gqa, path, rng):
    """Query head h reads key/value head h // (Hq // Hkv) (torch: repeat_interleave), and the
    score mod sees the QUERY head (ALiBi's slopes and T5's table have Hq rows)."""
    cases = {c.name: c for c in build_cases(T, S, Hq)}
    for name in [
        "chain(t5,relpos,softcap)+or(prefix,window)",
        "alibi+causal",
        "score:t5_bidirectional",
    ]:
        case = cases[name]
        q, k, v = make_qkv(rng, Hq=Hq, Hkv=Hkv)
        t_score, t_mask = case.torch_mods({n: tt(p) for n, p in case.params.items()})
        out_t, lse_t = torch_flex(q, k, v, t_score, t_mask, case.scale, 4, enable_gqa=gqa)
        kw = ref_kwargs(case, path, 4, B, Hq, T, S)
        out, lse = ar.flex_attention(q, k, v, enable_gqa=gqa, return_lse=True, path=path, **kw)
        assert_close(f"forward out ({path})", out, out_t, FWD_TOL)
        assert_close(f"forward lse ({path})", lse, lse_t, FWD_TOL)


@pytest.mark.parametrize("path", ["plain", "tiled"])
def test_empty_rows_zero_output_and_neg_inf_lse(path, rng):
    """Padding queries (document id -1) have no key: torch gives out 0 and lse -inf
    (``math_attention``: ``masked_rows`` -> ``-inf``, ``_safe_softmax`` -> 0); so must we."""
    case = {c.name: c for c in CASES}["chain(alibi,softcap)+and(document,causal)"]
    q, k, v = make_qkv(rng)
    t_score, t_mask = case.torch_mods({n: tt(p) for n, p in case.params.items()})
    out_t, lse_t = torch_flex(q, k, v, t_score, t_mask, case.scale, (4, 8))
    kw = ref_kwargs(case, path, (4, 8), B, HQ, T, S)
    out, lse = ar.flex_attention(q, k, v, enable_gqa=True, return_lse=True, path=path, **kw)
    # (B, T): the rows with no key, from the ids directly (padding, and documents of no key)
    q_ids, kv_ids = padded_doc_ids(B, T, 1), padded_doc_ids(B, S, 2)
    t_, s_ = np.arange(T)[:, None], np.arange(S)[None, :]
    allowed = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] >= 0)
    empty = ~(allowed & (t_ + S - T >= s_)).any(-1)
    assert (empty[q_ids < 0]).all() and empty.sum() >= 5
    for name, o, l_ in (("torch", out_t, lse_t), ("attention_ref", out, lse)):
        assert np.all(o[empty[:, None, :, None].repeat(HQ, 1).repeat(EV, 3)] == 0.0), name
        assert np.all(np.isneginf(l_[empty[:, None, :].repeat(HQ, 1)])), name
        assert np.isfinite(l_[~empty[:, None, :].repeat(HQ, 1)]).all(), name
    assert_close(f"forward out ({path})", out, out_t, FWD_TOL)
    assert_close(f"forward lse ({path})", lse, lse_t, FWD_TOL)


def test_gym_document_causal_self_attention(rng):
    """attention-gym's packed causal document mask (offsets, logical positions) equals
    ``and_masks(DocumentMask(ids), CausalMask())`` on a packed self-attention sequence."""
    lengths = [3, 1, 4, 5]
    n = sum(lengths)
    ids = np.repeat(np.arange(len(lengths)), lengths)
    q, k, v = make_qkv(rng, Tq=n, Skv=n)
    out_t, lse_t = torch_flex(q, k, v, None, t_gym_document_causal(lengths), None, 4)
    mask = ar.and_masks(ar.DocumentMask(ids), ar.CausalMask())
    for path in ["plain", "tiled"]:
        kw = ref_kwargs(Case("doc", mask=Mod(mask, None)), path, 4, B, HQ, n, n)
        out, lse = ar.flex_attention(q, k, v, enable_gqa=True, return_lse=True, path=path, **kw)
        assert_close(f"forward out ({path})", out, out_t, FWD_TOL)
        assert_close(f"forward lse ({path})", lse, lse_t, FWD_TOL)


@pytest.mark.parametrize("path", ["plain", "tiled"])
def test_key_value_batch_broadcast(path, rng):
    """Keys and values of batch 1 serve every query batch (torch's ``math_attention``:
    ``key.expand((Bq, ...))``, allowed when a block_mask has the queries' batch); dk and dv sum
    over the queries' batch."""
    case = {c.name: c for c in CASES}["chain(t5,relpos,softcap)+or(prefix,window)"]
    q = rng.standard_normal((B, HQ, T, E))
    k, v = rng.standard_normal((1, HKV, S, E)), rng.standard_normal((1, HKV, S, EV))
    t_score, t_mask = case.torch_mods({n: tt(p) for n, p in case.params.items()})
    out_t, lse_t = torch_flex(q, k, v, t_score, t_mask, case.scale, (4, 8))
    kw = ref_kwargs(case, path, (4, 8), B, HQ, T, S)
    out, lse = ar.flex_attention(q, k, v, enable_gqa=True, return_lse=True, path=path, **kw)
    assert_close(f"forward out ({path})", out, out_t, FWD_TOL)
    assert_close(f"forward lse ({path})", lse, lse_t, FWD_TOL)
    dout, dlse = rng.standard_normal((B, HQ, T, EV)), rng.standard_normal((B, HQ, T))
    _, _, (dq_t, dk_t, dv_t), dp_t = torch_grads(case, q, k, v, dout, dlse)
    g = ref_grads(case, q, k, v, dout, dlse, path, (4, 8))
    assert g.dk.shape == (1, HKV, S, E) and g.dv.shape == (1, HKV, S, EV)
    for name, ours, theirs in [("dq", g.dq, dq_t), ("dk", g.dk, dk_t), ("dv", g.dv, dv_t)]:
        assert_close(f"{name} ({path})", ours, theirs, GRAD_TOL)
    for name, grad in dp_t.items():
        assert_close(f"d{name.split('.')[-1]} ({path})", g.dscore_mod[name], grad, GRAD_TOL)


def test_plain_path_takes_the_block_masks_mask_mod(rng):
    """Given only a block_mask, the plain path uses its mask_mod (torch's eager path reads
    ``block_mask[-1]``, the mask_mod, and no block list)."""
    case = {c.name: c for c in CASES}["alibi+causal"]
    q, k, v = make_qkv(rng)
    t_score, t_mask = case.torch_mods({n: tt(p) for n, p in case.params.items()})
    out_t, lse_t = torch_flex(q, k, v, t_score, t_mask, case.scale, 4)
    bm = ar.create_block_mask(case.mask.ref, B, HQ, T, S, BLOCK_SIZE=4)
    out, lse = ar.flex_attention(
        q, k, v, score_mod=case.score.ref, block_mask=bm, enable_gqa=True, return_lse=True
    )
    assert_close("forward out (plain)", out, out_t, FWD_TOL)
    assert_close("forward lse (plain)", lse, lse_t, FWD_TOL)


def test_compiled_path(monkeypatch, rng):
    """One comparison through torch's default path: the op traced by dynamo
    (``torch.compile(..., backend="eager")``), the lse converted from log2 by
    ``_finalize_outputs``."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fa, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", False)
    captured = counters["stats"]["calls_captured"]
    case = {c.name: c for c in CASES}["chain(t5,relpos,softcap)+or(prefix,window)"]
    q, k, v = make_qkv(rng)
    t_score, t_mask = case.torch_mods({n: tt(p) for n, p in case.params.items()})
    out_t, lse_t = torch_flex(q, k, v, t_score, t_mask, case.scale, (4, 8))
    for path in ["plain", "tiled"]:
        kw = ref_kwargs(case, path, (4, 8), B, HQ, T, S)
        out, lse = ar.flex_attention(q, k, v, enable_gqa=True, return_lse=True, path=path, **kw)
        assert_close(f"compiled out ({path})", out, out_t, FWD_TOL)
        assert_close(f"compiled lse ({path})", lse, lse_t, FWD_TOL)
    assert counters["stats"]["calls_captured"] > captured  # dynamo did trace it


def test_alibi_slopes_match_reference_code():
    """``alibi_slopes`` against the ALiBi paper's code (ofirpress/attention_with_linear_biases
    ``get_slopes``, non-powers of two included) and attention-gym's ``exp2(-(h+1) * 8 / H)``."""

    def get_slopes(n):  # fairseq/models/transformer.py, TransformerDecoder.__init__
        def get_slopes_power_of_2(n):
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            ratio = start
            return [start * ratio**i for i in range(n)]

        if math.log2(n).is_integer():
            return get_slopes_power_of_2(n)
        closest_power_of_2 = 2 ** math.floor(math.log2(n))
        return (
            get_slopes_power_of_2(closest_power_of_2)
            + get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
        )

    for n in [*range(1, 17), 24, 32, 40]:
        ours = ar.alibi_slopes(n)
        assert ours.shape == (n,)
        assert_close("alibi_slopes vs get_slopes", ours, get_slopes(n), 0.0)
    for n in [1, 2, 4, 8, 16, 32]:  # gym's exp2 runs in float32: exact for dyadic slopes
        h = torch.arange(n)
        gym = torch.exp2(-((h + 1) * 8.0 / n))  # attn_gym/mods/alibi.py
        assert_close(
            "alibi_slopes vs gym f32", ar.alibi_slopes(n), to_np(gym), 0.0 if n <= 8 else 1e-7
        )


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 16), (6, 20), (10, 7)])
def test_t5_buckets_match_hugging_face(bidirectional, num_buckets, max_distance):
    """The T5 mod's bias with ``table[h, j] = j`` IS the bucket: compare it with
    ``_relative_position_bucket`` over relative positions -300..300 (past max_distance)."""
    table = np.tile(np.arange(num_buckets, dtype=np.float64), (2, 1))
    mod = ar.T5RelativeBias(table, bidirectional=bidirectional, max_distance=max_distance)
    b, h = np.zeros((1, 1, 1, 1), np.int64), np.arange(2).reshape(1, 2, 1, 1)
    q_idx, kv_idx = np.full((1, 1, 1, 1), 300), np.arange(601).reshape(1, 1, 1, -1)
    ours = mod(np.zeros((1, 2, 1, 601)), b, h, q_idx, kv_idx)
    rel = torch.arange(601) - 300
    hf = hf_relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert_close("t5 bucket", ours[0, 0, 0], to_np(hf).astype(np.float64), 0.0)
    assert_close("t5 bucket", ours[0, 1, 0], to_np(hf).astype(np.float64), 0.0)


# --------------------------------------------------------------------------------------------
# 2. Gradients: torch autograd through the same torch mods on a dense score tensor
# --------------------------------------------------------------------------------------------


def torch_dense(q, k, v, score_mod, mask_mod, scale):
    """FlexAttention's math, densely, differentiable: s = q k^T * scale (GQA by
    repeat_interleave), score_mod, then where(mask, s, -inf), a softmax that gives 0 on a row
    with no key, @ v; lse natural log, -inf on such rows."""
    Bn, Hq, Tq, En = q.shape
    Skv = k.shape[2]
    G = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    s = (q @ kk.transpose(-2, -1)) * (1.0 / math.sqrt(En) if scale is None else scale)
    b = torch.arange(Bn).view(Bn, 1, 1, 1)
    h = torch.arange(Hq).view(1, Hq, 1, 1)
    q_idx = torch.arange(Tq).view(1, 1, Tq, 1)
    kv_idx = torch.arange(Skv).view(1, 1, 1, Skv)
    if score_mod is not None:
        s = score_mod(s, b, h, q_idx, kv_idx)
    if mask_mod is not None:
        allowed = torch.broadcast_to(mask_mod(b, h, q_idx, kv_idx), s.shape)
        s = torch.where(allowed, s, torch.tensor(-math.inf, dtype=s.dtype))
    m = s.detach().amax(dim=-1, keepdim=True)
    empty = torch.isneginf(m)
    m = torch.where(empty, 0.0, m)
    e = torch.exp(s - m)  # 0 where masked
    denom = torch.where(empty, 1.0, e.sum(dim=-1, keepdim=True))
    out = (e / denom) @ vv
    lse = torch.where(empty, -math.inf, m + torch.log(denom)).squeeze(-1)
    return out, lse


def torch_grads(case, q, k, v, dout, dlse, use_dlse=True):
    """dq, dk, dv and {param name: grad} by torch autograd (VJP with dout and dlse)."""
    qt, kt, vt = tt(q, True), tt(k, True), tt(v, True)
    params = {n: tt(p, True) for n, p in case.params.items()}
    t_score, t_mask = case.torch_mods(params)
    out, lse = torch_dense(qt, kt, vt, t_score, t_mask, case.scale)
    outs, cots = [out], [tt(dout)]
    if use_dlse:
        outs.append(lse)
        cots.append(tt(dlse))
    wrt = [qt, kt, vt, *params.values()]
    grads = torch.autograd.grad(outs, wrt, cots, allow_unused=True)
    grads = [np.zeros(w.shape) if g is None else to_np(g) for g, w in zip(grads, wrt, strict=True)]
    return out, lse, grads[:3], dict(zip(params, grads[3:], strict=True))


def ref_grads(case, q, k, v, dout, dlse, path, block):
    kw = ref_kwargs(case, path, block, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return ar.flex_attention_backward(dout, q, k, v, enable_gqa=True, path=path, dlse=dlse, **kw)


@pytest.mark.parametrize(("path", "block"), [("plain", None), ("tiled", (4, 8))], ids=PATH_IDS[::2])
@pytest.mark.parametrize(("Tq", "Skv", "case"), SHAPED, ids=SHAPED_IDS)
def test_gradients_match_torch_autograd(Tq, Skv, case, path, block, rng):
    q, k, v = make_qkv(rng, Tq=Tq, Skv=Skv)
    dout, dlse = rng.standard_normal((B, HQ, Tq, EV)), rng.standard_normal((B, HQ, Tq))
    out_d, lse_d, (dq_t, dk_t, dv_t), dp_t = torch_grads(case, q, k, v, dout, dlse)
    if path == "plain":  # the dense reference is FlexAttention's forward
        t_score, t_mask = case.torch_mods({n: tt(p) for n, p in case.params.items()})
        out_f, lse_f = torch_flex(q, k, v, t_score, t_mask, case.scale)
        assert_close("dense ref vs torch flex", to_np(out_d), out_f, FWD_TOL)
        assert_close("dense ref vs torch flex", to_np(lse_d), lse_f, FWD_TOL)
    g = ref_grads(case, q, k, v, dout, dlse, path, block)
    assert_close(f"dq ({path})", g.dq, dq_t, GRAD_TOL)
    assert_close(f"dk ({path})", g.dk, dk_t, GRAD_TOL)
    assert_close(f"dv ({path})", g.dv, dv_t, GRAD_TOL)
    assert set(g.dscore_mod) == set(dp_t), f"dscore_mod keys {set(g.dscore_mod)} != {set(dp_t)}"
    for name, grad in dp_t.items():
        assert np.shape(g.dscore_mod[name]) == grad.shape, name
        if name in case.untracked:
            continue
        kind = name.split(".")[-1]
        assert_close(f"d{kind} ({path})", g.dscore_mod[name], grad, GRAD_TOL)


# --------------------------------------------------------------------------------------------
# 3. BlockMask
# --------------------------------------------------------------------------------------------

QL, KL = 13, 18  # not multiples of any block size below
BM_FIELDS = [
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
]


def block_mask_cases() -> dict[str, Mod]:
    m = mask_pool(QL, KL)
    pool = {n: m[n] for n in ["causal", "sliding_window_gym", "chunked", "prefix_lm_per_batch"]}
    pool["causal_bottom_right"] = m["causal_bottom_right"]
    pool["document_padded"] = m["document_padded"]
    pool["chunked_causal_torchtune"] = m["chunked_causal_torchtune"]
    pool["head_window"] = Mod(  # a plain mask function that depends on the head
        lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx <= 2 * h + 1),
        lambda t: lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx <= 2 * h + 1),
    )
    return pool


BM_CASES = block_mask_cases()


def assert_block_masks_equal(ours, theirs, where: str) -> None:
    """Every field of an attention_ref BlockMask equals torch's (all entries of the index
    lists, the padding of tail blocks, dtype int32)."""
    for name in BM_FIELDS:
        a, t = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (t is None), f"{where}: {name} is {a} vs torch {t}"
        if t is None:
            continue
        t = to_np(t)
        assert a.dtype == np.int32 == t.dtype, f"{where}: {name} dtype {a.dtype} vs {t.dtype}"
        assert a.shape == t.shape, f"{where}: {name} shape {a.shape} vs torch {t.shape}"
        bad = np.argwhere(a != t)
        assert bad.size == 0, f"{where}: {name} differs at {bad[:4].tolist()}"
    assert tuple(ours.BLOCK_SIZE) == tuple(theirs.BLOCK_SIZE), where
    assert tuple(ours.seq_lengths) == tuple(theirs.seq_lengths), where
    assert tuple(ours.shape) == tuple(theirs.shape), where
    np.testing.assert_array_equal(ours.to_dense(), to_np(theirs.to_dense()), err_msg=where)


@pytest.mark.parametrize("BLOCK_SIZE", [4, (4, 8), (8, 3), 5, 128], ids=str)
@pytest.mark.parametrize("mask_name", sorted(BM_CASES))
def test_create_block_mask_matches_torch(mask_name, BLOCK_SIZE):
    mod = BM_CASES[mask_name]
    for Bn, Hn in [(2, 3), (None, None), (2, None), (None, 3)]:
        where = f"{mask_name} B={Bn} H={Hn} BLOCK_SIZE={BLOCK_SIZE}"
        ours = ar.create_block_mask(mod.ref, Bn, Hn, QL, KL, BLOCK_SIZE=BLOCK_SIZE)
        theirs = fa.create_block_mask(
            mod.make_torch({}), Bn, Hn, QL, KL, device="cpu", BLOCK_SIZE=BLOCK_SIZE
        )
        assert_block_masks_equal(ours, theirs, where)
    ours = ar.create_block_mask(
        mod.ref, 2, 3, QL, KL, BLOCK_SIZE=BLOCK_SIZE, separate_full_blocks=False
    )
    theirs = fa.create_block_mask(
        mod.make_torch({}),
        2,
        3,
        QL,
        KL,
        device="cpu",
        BLOCK_SIZE=BLOCK_SIZE,
        separate_full_blocks=False,
    )
    assert_block_masks_equal(ours, theirs, f"{mask_name} separate_full_blocks=False")


@pytest.mark.parametrize("mask_name", ["causal", "document_padded", "prefix_lm_per_batch"])
def test_block_mask_converters(mask_name, rng):
    """block_mask_to_torch / block_mask_from_torch round-trip; torch's flex_attention with the
    converted BlockMask gives the reference's output."""
    mod = BM_CASES[mask_name]
    t_mask = mod.make_torch({})
    ours = ar.create_block_mask(mod.ref, B, HQ, QL, KL, BLOCK_SIZE=(4, 8))
    theirs = fa.create_block_mask(t_mask, B, HQ, QL, KL, device="cpu", BLOCK_SIZE=(4, 8))
    converted = block_mask_to_torch(ours, mask_mod=t_mask)
    assert isinstance(converted, fa.BlockMask)
    assert_block_masks_equal(ours, converted, "block_mask_to_torch")
    back = block_mask_from_torch(theirs, mask_mod=mod.ref)
    assert_block_masks_equal(back, theirs, "block_mask_from_torch")
    again = block_mask_from_torch(converted, mask_mod=mod.ref)
    assert_block_masks_equal(again, theirs, "round trip")
    q, k, v = make_qkv(rng, Tq=QL, Skv=KL)
    out_t, aux = fa.flex_attention(
        tt(q),
        tt(k),
        tt(v),
        block_mask=converted,
        enable_gqa=True,
        return_aux=fa.AuxRequest(lse=True),
    )
    for bm in (ours, back):
        out, lse = ar.flex_attention(
            q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, path="tiled"
        )
        assert_close("converted block mask out", out, to_np(out_t), FWD_TOL)
        assert_close("converted block mask lse", lse, to_np(aux.lse), FWD_TOL)


# --------------------------------------------------------------------------------------------
# 4. Each comparison can fail: planted bugs miss by far more than the tolerance
# --------------------------------------------------------------------------------------------


def test_planted_alibi_sign_is_caught(rng):
    """The FlexAttention blog's first version had ``alibi_bias[h] * (q_idx - kv_idx)``
    (pytorch/pytorch.github.io commit 67fc54c flipped it); that twin must fail."""
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    q, k, v = make_qkv(rng)
    out, lse = ar.flex_attention(
        q, k, v, score_mod=ar.ALiBi(slopes), enable_gqa=True, return_lse=True
    )
    s_t = tt(slopes)
    good = torch_flex(q, k, v, t_alibi(s_t), None, None)

    def wrong_sign(score, b, h, q_idx, kv_idx):
        return score + s_t[h] * (q_idx - kv_idx)

    bad = torch_flex(q, k, v, wrong_sign, None, None)
    assert_close("forward out (plain)", out, good[0], FWD_TOL)
    assert max_diff("planted: alibi sign", out, bad[0]) > PLANTED_MIN
    assert max_diff("planted: alibi sign", lse, bad[1]) > PLANTED_MIN


def test_planted_t5_bucket_off_by_one_is_caught(rng):
    table = np.random.default_rng(5).standard_normal((HQ, 8))
    q, k, v = make_qkv(rng)
    out = ar.flex_attention(
        q, k, v, score_mod=ar.T5RelativeBias(table, max_distance=8), enable_gqa=True
    )
    good = torch_flex(q, k, v, t_t5(tt(table), True, 8), None, None)[0]
    bad = torch_flex(q, k, v, t_t5(tt(table), True, 8, bucket_shift=1), None, None)[0]
    assert_close("forward out (plain)", out, good, FWD_TOL)
    assert max_diff("planted: t5 bucket + 1", out, bad) > PLANTED_MIN


def test_planted_scale_after_score_mod_is_caught(rng):
    """FlexAttention scales first, then calls score_mod (``_math_attention_inner``); softcap on
    the unscaled score, then scaled, differs."""
    case = Case("softcap", Mod(ar.SoftCap(0.9), None), None)
    q, k, v = make_qkv(rng)
    out = ar.flex_attention(q, k, v, score_mod=case.score.ref, enable_gqa=True)
    G = HQ // HKV
    qt, kt, vt = tt(q), tt(k).repeat_interleave(G, 1), tt(v).repeat_interleave(G, 1)
    s = 0.9 * torch.tanh((qt @ kt.transpose(-2, -1)) / 0.9) / math.sqrt(E)
    bad = torch.softmax(s, dim=-1) @ vt
    assert max_diff("planted: scale after mod", out, to_np(bad)) > PLANTED_MIN


def test_planted_dropped_dlse_is_caught(rng):
    """The lse cotangent matters: torch's gradients without it differ from ours with it."""
    case = {c.name: c for c in CASES}["chain(alibi,softcap)+and(document,causal)"]
    q, k, v = make_qkv(rng)
    dout, dlse = rng.standard_normal((B, HQ, T, EV)), rng.standard_normal((B, HQ, T))
    _, _, (dq_t, _, _), dp_t = torch_grads(case, q, k, v, dout, dlse, use_dlse=False)
    g = ref_grads(case, q, k, v, dout, dlse, "plain", None)
    assert max_diff("planted: dlse dropped", g.dq, dq_t) > PLANTED_MIN
    assert max_diff("planted: dlse dropped", g.dscore_mod["0.slopes"], dp_t["0.slopes"]) > (
        PLANTED_MIN
    )


def test_planted_block_order_is_caught():
    """kv_indices past kv_num_blocks follow torch's stable DESCENDING argsort; an ascending
    sort of the same dense block mask (a plausible reimplementation) would not match."""
    ours = ar.create_block_mask(BM_CASES["sliding_window_gym"].ref, 2, 3, QL, KL, BLOCK_SIZE=4)
    theirs = fa.create_block_mask(
        BM_CASES["sliding_window_gym"].make_torch({}), 2, 3, QL, KL, device="cpu", BLOCK_SIZE=4
    )
    assert_block_masks_equal(ours, theirs, "sliding window")
    partial = ours.partial_blocks().astype(np.int32)
    descending = np.argsort(-partial, axis=-1, kind="stable").astype(np.int32)
    np.testing.assert_array_equal(descending, to_np(theirs.kv_indices))
    ascending = np.argsort(partial, axis=-1, kind="stable").astype(np.int32)
    planted = dataclasses.replace(ours, kv_indices=ascending)
    with pytest.raises(AssertionError, match="kv_indices differs"):
        assert_block_masks_equal(planted, theirs, "planted: ascending order")
