"""Variants: the same attention computed another way, or on other layouts.

Layer 2 of attention_ref. Each module computes what :func:`attention_ref.sdpa_forward` computes,
takes the same :class:`~attention_ref.core.options.AttentionOptions` and builds its allowed pairs
with :mod:`attention_ref.core.masks`:

* ``flash`` -- tiled FlashAttention-2, forward and backward from the logsumexp, (F1)-(F9);
* ``varlen`` -- packed variable-length batches with ``cu_seqlens``, (V1)-(V6);
* ``decode`` -- decoding with an immutable key/value cache;
* ``context_parallel`` -- ring and zigzag context parallelism, simulated rank by rank, forward and
  backward, with every step's partial state in a trace;
* ``paged`` -- paged KV caches in FlashAttention's, FlashInfer's and vLLM's layouts, paged
  attention and its backward, poisoned padding, and ``flash_attn_with_kvcache``, (P1)-(P14);
* ``mla`` -- multi-head latent attention (DeepSeek-V2/V3), naive and absorbed forms, forward and
  backward, (D1)-(D15);
* ``sparse`` -- top-k sparse attention (DeepSeek DSA) and the lightning indexer, (X1)-(X10);
* ``flex`` -- FlexAttention's ``flex_attention`` with score and mask mods (their library is
  :mod:`attention_ref.core.mods`, the BlockMask :mod:`attention_ref.core.block_mask`), on the
  plain and the tiled path, with the backward and the mods' parameter gradients, (B1)-(B14).

Split-KV is ``num_splits`` of ``flash``. A new variant is a new module here. May import: numpy
and :mod:`attention_ref.core`.
"""
