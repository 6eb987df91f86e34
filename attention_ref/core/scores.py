r"""Scaled scores, soft-capping and masking: the stage between q, k and the softmax.

Order of operations on the scores (``docs/conventions.md``)::

    q @ k^T * scale  ->  softcap  ->  + bias  ->  mask (boolean, causal, window)  ->  softmax

Grouped-query attention (GQA): query head ``h`` reads key/value head ``h // G`` with
``G = H // Hkv``. The functions here view the H query heads as ``(Hkv, G)`` instead of repeating
k and v, so nothing is copied; the backward sums over the ``G`` axis, (A9) and (A16).
Derivation: ``docs/derivations/attention.md``.

The functions in this module are the internal stages of
:func:`~attention_ref.scaled_dot_product_attention`: they expect float arrays already checked by
it. Which pairs may attend is built in :mod:`attention_ref.core.masks`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validate import sum_to_shape
from .primitives import transposed_product

# ----------------------------------------------------------------------------- GQA grouping


def group_heads(x: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """View ``(..., H, T, X)`` as ``(..., Hkv, G, T, X)``: query head ``h = kv * G + g``."""
    *lead, h, t, width = x.shape
    return x.reshape(*lead, num_kv_heads, h // num_kv_heads, t, width)


def ungroup_heads(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`group_heads`: ``(..., Hkv, G, T, X) -> (..., H, T, X)``."""
    *lead, hkv, g, t, width = x.shape
    return x.reshape(*lead, hkv * g, t, width)


def stack_group_rows(x: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """View ``(..., H, T, X)`` as ``(..., Hkv, G*T, X)``: each group's G query heads as one block of
    rows.

    A product that contracts this axis sums over the group's heads, as (A9) and (A16) do.
    """
    *lead, h, t, width = x.shape
    return x.reshape(*lead, num_kv_heads, (h // num_kv_heads) * t, width)


# ----------------------------------------------------------------------------- scores


def scaled_scores(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    r"""Scores ``q @ k^T * scale`` with GQA grouping, (A1).

    ``q`` (..., H, T, Dk), ``k`` (..., Hkv, S, Dk) -> (..., H, T, S).
    """
    qg = group_heads(q, k.shape[-3])  # (..., Hkv, G, T, Dk)
    kt = k[..., :, None, :, :].swapaxes(-1, -2)  # (..., Hkv, 1, Dk, S)
    s = qg @ kt  # (..., Hkv, G, T, Dk) @ (..., Hkv, 1, Dk, S) -> (..., Hkv, G, T, S)
    s *= scale  # (A1); scaling q instead saves this pass but adds a rounding (benchmarks/README.md)
    return ungroup_heads(s)  # (..., H, T, S)


def scaled_scores_backward(
    dscores: np.ndarray, q: np.ndarray, k: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(dq, dk)`` of :func:`scaled_scores`: (A15) and (A16) of ``docs/derivations/attention.md``.

    ``dk`` sums over the query heads of each group. It is computed as its transpose,
    ``q^T @ ds`` (:func:`attention_ref.core.primitives.transposed_product`), so it is returned
    as a view with its last two axes swapped.
    """
    hkv = k.shape[-3]
    dsg = group_heads(dscores, hkv)  # (..., Hkv, G, T, S)
    # (A15) s = scale * q k^T, so dq = scale * ds @ k
    # (..., Hkv, G, T, S) @ (..., Hkv, 1, S, Dk) -> (..., Hkv, G, T, Dk)
    dq = dsg @ k[..., :, None, :, :]
    dq *= scale
    # (A16) dk = scale * sum over the group's heads of ds^T @ q: one product over their stacked G*T
    # rows
    ds_rows = stack_group_rows(dscores, hkv)  # (..., Hkv, G*T, S)
    dk = transposed_product(ds_rows, stack_group_rows(q, hkv))  # (..., Hkv, S, Dk)
    dk *= scale
    return ungroup_heads(dq), dk


def softcap_forward(scores: np.ndarray, cap: float) -> np.ndarray:
    r"""Soft-capping ``cap * tanh(scores / cap)``, (A2): bounded in ``(-cap, cap)``."""
    return cap * np.tanh(scores / cap)  # (A2)


def softcap_backward(dcapped: np.ndarray, capped: np.ndarray, cap: float) -> np.ndarray:
    r"""Gradient of :func:`softcap_forward` from its output: ``dc * (1 - (c / cap)^2)``.

    (A14) of ``docs/derivations/attention.md``: the derivative of tanh is ``1 - tanh^2``.
    """
    return dcapped * (1.0 - (capped / cap) ** 2)  # (A14)


def masked_fill_value(dtype: Any) -> float:
    """The finite fill for masked scores: the most negative finite number of ``dtype``.

    exp(fill - m) underflows to exactly 0 for any row whose max m is a real score, and no
    ``inf - inf`` can occur. A row with nothing allowed is all-fill; attention applies its
    ``empty_rows`` policy to it.
    """
    return float(np.finfo(dtype).min)


def apply_mask(logits: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    r"""Masked scores, (A4): ``logits`` where allowed, the finite fill elsewhere."""
    if allowed is None:
        return logits
    masked = logits.copy()  # logits' shape; the trace keeps logits too
    np.copyto(masked, masked_fill_value(logits.dtype), where=~allowed)  # (A4)
    return masked


def apply_mask_backward(dmasked: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    r"""Gradient of :func:`apply_mask`: it passes only where allowed, (A12) of
    ``docs/derivations/attention.md``.

    The fill is a constant, so a masked entry's logit gets no gradient.
    """
    if allowed is None:
        return dmasked
    return np.where(allowed, dmasked, 0)  # (A12)


def add_bias_backward(dlogits: np.ndarray, bias_shape: tuple[int, ...]) -> np.ndarray:
    r"""Gradient of ``logits = capped + bias`` for the bias, (A13) of
    ``docs/derivations/attention.md``.

    The bias was broadcast to (..., H, T, S); its gradient sums over the broadcast axes. The
    gradient for ``capped`` is ``dlogits`` itself.
    """
    return np.array(sum_to_shape(dlogits, bias_shape), copy=True)  # (A13), its own array


# ----------------------------------------------------------------------------- values


def weighted_values(weights: np.ndarray, v: np.ndarray) -> np.ndarray:
    r"""``weights @ v`` with GQA grouping, (A7): (..., H, T, S), (..., Hkv, S, Dv) ->
    (..., H, T, Dv)."""
    pg = group_heads(weights, v.shape[-3])  # (..., Hkv, G, T, S)
    # (..., Hkv, G, T, S) @ (..., Hkv, 1, S, Dv) -> (..., Hkv, G, T, Dv)
    out = pg @ v[..., :, None, :, :]
    return ungroup_heads(out)  # (..., H, T, Dv)   (A7)


def weighted_values_backward(
    dout: np.ndarray, weights: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(dweights, dv)`` of :func:`weighted_values`: (A8) and (A9) of
    ``docs/derivations/attention.md``.

    ``dv`` sums over the query heads of each group; like ``dk`` in :func:`scaled_scores_backward`
    it is computed as its transpose and returned as a view with its last two axes swapped.
    """
    hkv = v.shape[-3]
    dog = group_heads(dout, hkv)  # (..., Hkv, G, T, Dv)
    # (A8) out = P v, so dP = dout @ v^T
    # (..., Hkv, G, T, Dv) @ (..., Hkv, 1, Dv, S) -> (..., Hkv, G, T, S)
    dweights = dog @ v[..., :, None, :, :].swapaxes(-1, -2)
    # (A9) dv = sum over the group's heads of P^T @ dout: one product over their stacked G*T rows
    p_rows = stack_group_rows(weights, hkv)  # (..., Hkv, G*T, S)
    dv = transposed_product(p_rows, stack_group_rows(dout, hkv))  # (..., Hkv, S, Dv)
    return ungroup_heads(dweights), dv
