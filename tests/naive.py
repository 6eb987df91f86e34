"""A deliberately naive attention, written from the definitions in docs/conventions.md with Python
loops over (batch, head, query, key), sharing no code with attention_ref. Forward tests compare
against it; it is slow and only for tiny shapes."""

from __future__ import annotations

import math

import numpy as np


def naive_attention(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    causal=False,
    align="top_left",
    window=None,
    softcap=None,
    scale=None,
    dropout_p=0.0,
    keep=None,
    empty_rows="zero",
    chunk_size=None,
    sink_tokens=0,
    sinks=None,
):
    """q (B, H, T, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv) -> (B, H, T, Dv); one batch dim."""
    B, H, T, Dk = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    full = (B, H, T, S)
    mask = np.broadcast_to(np.ones((), bool) if mask is None else mask, full)
    bias = np.broadcast_to(np.zeros(()) if bias is None else bias, full)
    out = np.zeros((B, H, T, Dv))
    for b in range(B):
        for h in range(H):
            kv = h // group  # query head h reads kv head h // (H // Hkv)
            for i in range(T):
                pos = i if align == "top_left" else i + S - T
                logits, keys = [], []
                for j in range(S):
                    ok = bool(mask[b, h, i, j])
                    if causal and j > pos:
                        ok = False
                    local = True  # the window and the chunks, which sink tokens are exempt from
                    if window is not None:
                        left, right = window
                        if left is not None and j < pos - left:
                            local = False
                        if right is not None and j > pos + right:
                            local = False
                    if chunk_size is not None and math.floor(pos / chunk_size) != j // chunk_size:
                        local = False
                    if not local and not (j < sink_tokens and (window or chunk_size)):
                        ok = False
                    s = scale * sum(q[b, h, i, d] * k[b, kv, j, d] for d in range(Dk))
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    s = s + bias[b, h, i, j]
                    if ok and s != -math.inf:
                        logits.append(s)
                        keys.append(j)
                weights = np.zeros(S)
                if sinks is not None:  # one more logit sinks[h] with value 0: never an empty row
                    m = max(logits + [sinks[h]])
                    e = [math.exp(x - m) for x in logits]
                    total = sum(e) + math.exp(sinks[h] - m)
                    for j, ej in zip(keys, e, strict=True):
                        weights[j] = ej / total
                elif keys:
                    m = max(logits)
                    e = [math.exp(x - m) for x in logits]
                    for j, ej in zip(keys, e, strict=True):
                        weights[j] = ej / sum(e)
                elif empty_rows == "uniform":
                    weights[:] = 1.0 / S
                elif empty_rows == "nan":
                    weights[:] = math.nan
                if dropout_p:
                    weights = weights * keep[b, h, i] / (1.0 - dropout_p)
                for j in range(S):
                    out[b, h, i] += weights[j] * v[b, kv, j]
    return out
