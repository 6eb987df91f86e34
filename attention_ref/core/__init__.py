"""The core: every stage of attention with its hand-written backward, and the two compositions.

Layer 1 of attention_ref. What it holds, in the order of the forward pass:

* ``linear`` -- the projections ``x @ w + b``, (L1)-(L4);
* ``heads`` -- head split and merge, (H1)-(H4);
* ``softmax`` -- the stable softmax and logsumexp, (S1)-(S6);
* ``rotary`` -- rotary position embeddings: tables, rotation and its backward, (R1)-(R14);
* ``options`` -- :class:`AttentionOptions`, the one definition of the attention options;
* ``mods`` -- FlexAttention's score and mask mods: the library, with each mod's derivatives,
  and the complex step for a user's own, (B1)-(B14);
* ``masks`` -- the one builder of the (query, key) pairs a row may attend, dense and per block;
* ``block_mask`` -- FlexAttention's BlockMask (empty, partial and full blocks) and its checker;
* ``scores`` -- scaled scores, soft-capping, masking and the weighted values: the stages of
  scaled dot-product attention, (A1)-(A19);
* ``primitives`` -- the speed layer: the few fused or in-place operations the stages call, each
  documented with the plain expression it computes;
* ``merge`` -- partial attention states merged by their log-sum-exp, and sinks added once,
  (C1)-(C7);
* ``attention`` -- dropout, and scaled dot-product attention: forward, backward and trace;
* ``mha`` -- multi-head attention, which composes the stages and adds no math.

May import: numpy and the standard library only. Nothing here imports another layer
(``variants``, ``adapters``, ``oracle``, ``cli``); ``tests/test_layers.py`` checks it.
"""
