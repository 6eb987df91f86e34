"""attention_ref: the NumPy ground truth for multi-head attention, forward and backward.

Every stage (projection, head split/merge, stable softmax, scaled and masked scores, scaled
dot-product attention, multi-head attention) is a pure function with a hand-written backward,
verified by finite differences. Conventions: ``docs/conventions.md``.
"""

from . import _aliases, gradcheck
from ._version import __version__  # noqa: F401  (the package version, attention_ref.__version__)
from .core.attention import (
    AttentionGrads,
    AttentionTrace,
    dropout_keep_mask,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
    sdpa_backward,
    sdpa_forward,
)
from .core.block_mask import BlockMask, BlockMaskReport, check_block_mask, create_block_mask
from .core.heads import merge_heads, merge_heads_backward, split_heads, split_heads_backward
from .core.linear import LinearGrads, linear, linear_backward
from .core.masks import AllowedPairs, attention_mask, causal_mask, window_mask
from .core.merge import (
    AttentionState,
    add_sinks,
    add_sinks_backward,
    lse_from_convention,
    lse_to_convention,
    merge_attention_states,
    merge_attention_states_backward,
)
from .core.mha import (
    MultiHeadGrads,
    MultiHeadParams,
    MultiHeadTrace,
    init_params,
    mha_backward,
    mha_forward,
    multi_head_attention,
    multi_head_attention_backward,
)
from .core.mods import (
    ALiBi,
    CausalMask,
    ChunkedMask,
    DocumentMask,
    MaskMod,
    PrefixLMMask,
    RelativePositionBias,
    ScoreMod,
    SlidingWindowMask,
    SoftCap,
    T5RelativeBias,
    alibi_slopes,
    and_masks,
    chain_score_mods,
    custom_score_mod,
    mod_indices,
    or_masks,
    t5_relative_bucket,
)
from .core.options import AttentionOptions
from .core.rotary import apply_rotary, apply_rotary_backward, rotary_cos_sin, rotary_inv_freq
from .core.softmax import logsumexp, logsumexp_backward, softmax, softmax_backward
from .variants.context_parallel import (
    context_parallel_attention,
    context_parallel_attention_backward,
)
from .variants.flash import flash_attention_backward, flash_attention_forward
from .variants.flex import flex_attention, flex_attention_backward
from .variants.fp8 import QuantizedFP8, fp8_attention, quantize_fp8
from .variants.mla import (
    mla_absorb,
    mla_attention_absorbed,
    mla_attention_naive,
    mla_attention_naive_backward,
    mla_unabsorb,
)
from .variants.paged import (
    attention_with_kvcache,
    paged_attention,
    paged_attention_backward,
    poison_unused,
)
from .variants.sparse import lightning_indexer, sparse_attention, sparse_attention_backward

__all__ = [
    "QuantizedFP8",
    "fp8_attention",
    "quantize_fp8",
    "flex_attention",
    "flex_attention_backward",
    "BlockMask",
    "BlockMaskReport",
    "check_block_mask",
    "create_block_mask",
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
    "AllowedPairs",
    "AttentionGrads",
    "AttentionOptions",
    "AttentionState",
    "AttentionTrace",
    "LinearGrads",
    "MultiHeadGrads",
    "MultiHeadParams",
    "MultiHeadTrace",
    "add_sinks",
    "add_sinks_backward",
    "apply_rotary",
    "apply_rotary_backward",
    "attention_mask",
    "attention_with_kvcache",
    "causal_mask",
    "context_parallel_attention",
    "context_parallel_attention_backward",
    "dropout_keep_mask",
    "flash_attention_backward",
    "flash_attention_forward",
    "gradcheck",
    "init_params",
    "lightning_indexer",
    "linear",
    "linear_backward",
    "logsumexp",
    "logsumexp_backward",
    "lse_from_convention",
    "lse_to_convention",
    "merge_attention_states",
    "merge_attention_states_backward",
    "merge_heads",
    "merge_heads_backward",
    "mha_backward",
    "mha_forward",
    "mla_absorb",
    "mla_attention_absorbed",
    "mla_attention_naive",
    "mla_attention_naive_backward",
    "mla_unabsorb",
    "multi_head_attention",
    "multi_head_attention_backward",
    "paged_attention",
    "paged_attention_backward",
    "poison_unused",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "sdpa_backward",
    "sdpa_forward",
    "softmax",
    "softmax_backward",
    "sparse_attention",
    "sparse_attention_backward",
    "split_heads",
    "split_heads_backward",
    "window_mask",
]

_aliases.install(__name__)  # the module paths of 0.1 (attention_ref.flash, ...): see _aliases.py
