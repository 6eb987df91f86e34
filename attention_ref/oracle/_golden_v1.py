"""The conventions and key-group texts of golden format version 1 (what ``attention-ref golden``
wrote at 0.1/0.2.0): a version-1 manifest must carry exactly these. Generated from
``tests/fixtures/golden_v1/manifest.json``; never edit.
"""

from __future__ import annotations

from typing import Any

# fmt: off
# ruff: noqa: E501
CONVENTIONS_V1: dict[str, Any] = {'dimension_letters': {'B': 'batch',
                       'T': 'query positions',
                       'S': 'key/value positions',
                       'D': 'model width of the query input',
                       'H': 'query heads',
                       'Hkv': 'key/value heads (H is a multiple of Hkv)',
                       'Dk': 'per-head query/key width',
                       'Dv': 'per-head value width',
                       'Dk_in': 'key input width (MHA)',
                       'Dv_in': 'value input width (MHA)',
                       'D_out': 'output width (MHA)'},
 'layout': {'sdpa': 'q (B, H, T, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv), out (B, H, T, Dv); C '
                    'order (row-major, the last axis varies fastest)',
            'mha': 'query (B, T, D), key (B, S, Dk_in), value (B, S, Dv_in), out (B, T, D_out); '
                   'per-head intermediates (B, H, T, Dk) and (B, Hkv, S, Dk) like sdpa'},
 'scale': 'scores are multiplied by scale; scale null means 1 / sqrt(Dk); scale_used is the value '
          'applied',
 'order_of_operations': ['scores = q @ k^T * scale',
                         'softcap (if not null): scores = softcap * tanh(scores / softcap)',
                         '+ bias (additive, broadcast to (B, H, T, S); a -inf entry masks its '
                         'pair)',
                         'mask: the boolean mask AND causal AND window; masked entries are '
                         'excluded from the softmax',
                         'probs = softmax over S of the allowed entries; empty rows follow '
                         'empty_rows',
                         'dropout (dropout_p > 0): probs * option.dropout_mask / (1 - dropout_p)',
                         'out = (dropped) probs @ v'],
 'mask': 'bool, broadcastable to (B, H, T, S); true = may attend (PyTorch '
         'scaled_dot_product_attention, JAX)',
 'causal': {'top_left': 'query i may attend key j when j <= i (PyTorch is_causal, JAX)',
            'bottom_right': 'query i may attend key j when j <= i + S - T (FlashAttention, '
                            'decoding)'},
 'window': "window [left, right]: query i may attend key j when i' - left <= j <= i' + right, "
           "with i' = i (align top_left) or i + S - T (align bottom_right); a null side is "
           'unbounded; combined with causal by AND',
 'empty_rows': {'zero': 'a query row with no key to attend gives weights 0 and output 0, and '
                        'passes no gradient',
                'uniform': 'such a row gives weights 1/S over all keys (output = mean of v)',
                'nan': 'such a row gives NaN',
                'raise': 'such a row is an error'},
 'gqa': 'query head h uses key/value head h // (H // Hkv); key/value gradients sum over the heads '
        'of each group',
 'dropout': 'deterministic: option.dropout_mask is the keep-mask (true = kept), kept weights are '
            'scaled by 1 / (1 - dropout_p); intermediate.probs are the weights before dropout',
 'weights': 'y = x @ w + b with w of shape (in, out) (PyTorch nn.Linear stores (out, in): '
            'transpose it)',
 'mha': ['q = split_heads(query @ w_q + b_q, H), k = split_heads(key @ w_k + b_k, Hkv), v = '
         'split_heads(value @ w_v + b_v, Hkv)',
         'split_heads: (B, T, H*Dh) -> (B, H, T, Dh) with out[b, h, t, d] = x[b, t, h*Dh + d]',
         'context = sdpa(q, k, v, options); out = merge_heads(context) @ w_o + b_o, merge_heads '
         'the inverse of split_heads',
         'a case without b_q, b_k, b_v, b_o has no projection biases'],
 'gradients': 'grad.X is the vector-Jacobian product sum(cotangent * d output.out / d input.X), '
              "of input.X's shape; an input broadcast in the forward (a bias of shape (1, H, T, "
              'S)) has its gradient summed over the broadcast axes',
 'intermediates': {'scores': '(B, H, T, S) q @ k^T * scale, before softcap, bias and mask',
                   'masked_scores': '(B, H, T, S) after softcap, bias and mask; masked entries '
                                    'hold masked_fill, not -inf',
                   'row_max': '(B, H, T) max of masked_scores over the allowed keys; -inf for an '
                              'empty row',
                   'logsumexp': '(B, H, T) log of sum of exp(masked_scores) over the allowed '
                                'keys; -inf for an empty row',
                   'probs': '(B, H, T, S) attention weights after the empty-row policy, before '
                            'dropout',
                   'q': 'MHA: (B, H, T, Dk) per-head queries',
                   'k': 'MHA: (B, Hkv, S, Dk) per-head keys',
                   'v': 'MHA: (B, Hkv, S, Dv) per-head values',
                   'context': 'MHA: (B, H, T, Dv) per-head attention output'},
 'masked_fill': -1.7976931348623157e+308,
 'arrays': 'little-endian; dtype <f8 = IEEE 754 binary64, |b1 = one byte per element, 0 or 1; '
           "sha256 = SHA-256 of the array's raw data bytes in C order (the .npy payload after its "
           'header)'}

KEY_GROUPS_V1: dict[str, Any] = {'input': 'the differentiable arguments (sdpa: q, k, v, bias; mha: query, key, value, w_q ... '
          'b_o, bias)',
 'option': 'array-valued options: mask (bool), dropout_mask (bool)',
 'cotangent': 'the random upstream gradient of output.out (same shape)',
 'output': 'output.out, the reference output',
 'grad': 'grad.X, the gradient of input.X for the cotangent',
 'intermediate': 'forward intermediates by name (see conventions.intermediates)'}
# fmt: on
