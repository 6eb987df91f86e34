r"""FlexAttention in NumPy: ``flex_attention`` with its semantics, and the backward it lacks on CPU.

``torch.nn.attention.flex_attention.flex_attention(query, key, value, score_mod, block_mask,
scale, enable_gqa, return_lse)`` computes, in its eager form (``torch/_higher_order_ops/
flex_attention.py``, ``math_attention`` and ``_math_attention_inner``):

.. code-block:: text

    scores = (q @ k^T) * scale                                 scale = 1/sqrt(E) by default
    post   = where(mask_mod(b, h, q_idx, kv_idx), score_mod(scores, b, h, q_idx, kv_idx), -inf)
    lse    = logsumexp(post) (-inf on a fully masked row)      natural log at the top level
    out    = _safe_softmax(post) @ v                           0 on a fully masked row

with GQA by ``repeat_interleave`` (query head ``h`` reads key/value head ``h // (Hq / Hkv)``) and
key/value batch 1 broadcast to the queries' batch. This module computes the same function on the
reference's two paths: the plain one (:func:`~attention_ref.sdpa_forward` with the ``score_mod``
and ``mask_mod`` options, (A20)-(A22)) and the tiled one
(:func:`~attention_ref.flash_attention_forward`, mods evaluated per block, a
:class:`~attention_ref.BlockMask` honoured as kernels honour it). The backward returns ``dq``,
``dk``, ``dv`` and the gradient of every parameter of the score mod, which FlexAttention on CPU
cannot give ("FlexAttention does not support backward on CPU", ``_validate_device`` in
``torch/nn/attention/flex_attention.py``).

Derivations: (A20)-(A22) of ``docs/derivations/attention.md`` and (B1)-(B14) of
``docs/derivations/flex.md``; the user's page is ``docs/flex.md``.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike

from ..core._validate import as_float, check_choice, resolve_dtype
from ..core.attention import AttentionGrads, sdpa_backward, sdpa_forward
from ..core.block_mask import BlockMask, check_block_mask
from .flash import (
    BLOCK_K,
    BLOCK_Q,
    FlashOutput,
    flash_attention_backward,
    flash_attention_forward,
)

__all__ = ["FLEX_PATHS", "flex_attention", "flex_attention_backward"]

#: ``"plain"``: the whole (B, H, T, S) score array (as FlexAttention's eager path; a BlockMask
#: there only lends its ``mask_mod``). ``"tiled"``: block by block (as its kernels), a
#: BlockMask's empty blocks skipped and its full blocks computed without the ``mask_mod``.
FLEX_PATHS = ("plain", "tiled")


def _prepare(q, k, v, score_mod, mask_mod, block_mask, scale, enable_gqa, path, check):
    """The inputs as float64 arrays and the options, checked as ``flex_attention`` checks."""
    dt = resolve_dtype(None, q, k, v)  # float64; complex128 for the complex step (G4)
    q, k, v = as_float("q", q, dt), as_float("k", k, dt), as_float("v", v, dt)
    for name, x, layout in (
        ("q", q, "(B, Hq, L, E)"),
        ("k", k, "(B, Hkv, S, E)"),
        ("v", v, "(B, Hkv, S, Ev)"),
    ):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D {layout}, as FlexAttention's; got shape {x.shape}"
            )
    path = check_choice("path", path, FLEX_PATHS)
    if not isinstance(enable_gqa, (bool, np.bool_)):
        raise TypeError(f"enable_gqa must be a bool; got {enable_gqa!r}")
    if not isinstance(check, (bool, np.bool_)):
        raise TypeError(f"check must be a bool; got {check!r}")
    Hq, Hkv = q.shape[1], k.shape[1]
    if not enable_gqa and Hq != Hkv:
        raise ValueError(
            f"q has Hq={Hq} heads and k has Hkv={Hkv}: pass enable_gqa=True for grouped-query "
            "attention (as flex_attention asks)"
        )
    if enable_gqa and Hq % Hkv:
        raise ValueError(f"enable_gqa needs Hq a multiple of Hkv; got Hq={Hq}, Hkv={Hkv}")
    B, Bkv = q.shape[0], k.shape[0]
    if v.shape[0] != Bkv:
        raise ValueError(f"k and v must have the same batch size; got {k.shape}, {v.shape}")
    if Bkv != B:
        if Bkv != 1:
            raise ValueError(
                f"k and v must have q's batch size B={B} or 1 (broadcast, as flex_attention's "
                f"math_attention); got {Bkv}"
            )
        k = np.broadcast_to(k, (B,) + k.shape[1:])
        v = np.broadcast_to(v, (B,) + v.shape[1:])
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(
                f"block_mask must be an attention_ref BlockMask; got {type(block_mask).__name__} "
                "(attention_ref.adapters.torch.block_mask_from_torch converts torch's)"
            )
        if block_mask.seq_lengths != (q.shape[2], k.shape[2]):
            raise ValueError(
                f"block_mask was made for (Q_LEN, KV_LEN) = {block_mask.seq_lengths}; got "
                f"q_len={q.shape[2]}, kv_len={k.shape[2]}"
            )
        Bm, Hm = block_mask.shape[:2]
        if Bm not in (1, B) or Hm not in (1, Hq):
            raise ValueError(
                f"block_mask's (B, H) = {(Bm, Hm)} must be 1 or the inputs' (B, H) = {(B, Hq)}"
            )
        if mask_mod is None:
            mask_mod = block_mask.mask_mod
        if check and path == "plain":
            report = check_block_mask(block_mask, mask_mod, B=B, H=Hq)
            if not report.ok:
                raise ValueError(f"check=True: the block_mask is wrong: {report}")
    elif check:
        raise ValueError("check=True verifies a block_mask; got block_mask=None")
    opts: dict[str, Any] = {"score_mod": score_mod, "mask_mod": mask_mod, "scale": scale}
    return q, k, v, Bkv, opts, path


def flex_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    path: str = "plain",
    check: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""FlexAttention: attention with a programmable score mod and mask mod, in float64.

    Parameters
    ----------
    q : array_like, shape (B, Hq, L, E)
    k : array_like, shape (B, Hkv, S, E)
        Batch ``B`` or 1 (broadcast).
    v : array_like, shape (B, Hkv, S, Ev)
    score_mod : callable or ScoreMod, optional
        ``score_mod(score, b, h, q_idx, kv_idx) -> score``, called once on the (B, Hq, L, S)
        scaled scores with broadcasting index arrays ``b`` (B,1,1,1), ``h`` (1,Hq,1,1), ``q_idx``
        (1,1,L,1), ``kv_idx`` (1,1,1,S) (per block on the tiled path). A library mod
        (:class:`~attention_ref.ALiBi`, ...) or :func:`~attention_ref.custom_score_mod` carries
        its derivatives; a plain function is differentiated by the complex step. A ``-inf``
        result masks the pair.
    mask_mod : callable, optional
        ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend). Default: the
        ``block_mask``'s, else every pair.
    block_mask : BlockMask, optional
        From :func:`~attention_ref.create_block_mask`. The plain path reads only its
        ``mask_mod`` (as FlexAttention's eager path); the tiled path skips its empty blocks and
        computes its full blocks without calling the mask mod (as the kernels).
    scale : float, optional
        ``1 / sqrt(E)`` when omitted.
    enable_gqa : bool, default False
        Allow ``Hkv < Hq`` (``Hq`` a multiple of ``Hkv``).
    return_lse : bool, default False
        Also return the log-sum-exp (natural log, (B, Hq, L); ``-inf`` on an empty row).
    path : {"plain", "tiled"}, default "plain"
    check : bool, default False
        Verify the ``block_mask`` against the mask mod first
        (:func:`~attention_ref.check_block_mask`) and raise ``ValueError`` listing the wrong
        blocks.

    Returns
    -------
    out : ndarray, shape (B, Hq, L, Ev)
        0 on a row with no allowed key.
    lse : ndarray, shape (B, Hq, L)
        Only with ``return_lse=True``.

    Notes
    -----
    .. math::
        s = \text{scale}\, q k^\top \ \text{(A1)},\quad
        \ell = \text{score\_mod}(s, b, h, i, j) \ \text{(A20)},\quad
        \text{out} = \operatorname{softmax}(\ell \text{ where } \text{mask\_mod}(b, h, i, j))\, v.

    The order and the empty rows are FlexAttention's (``_math_attention_inner``: the mask is a
    ``torch.where`` after the ``score_mod``; ``math_attention``: ``_safe_softmax`` and a
    ``-inf`` lse on a fully masked row); the tiled path with a wrong BlockMask differs from the
    plain path exactly where a kernel would. See ``docs/flex.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import ALiBi, CausalMask, alibi_slopes, flex_attention
    >>> rng = np.random.default_rng(0)
    >>> q = rng.normal(size=(2, 4, 5, 8))     # (B, Hq, L, E)
    >>> k = rng.normal(size=(2, 2, 7, 8))     # (B, Hkv, S, E)
    >>> v = rng.normal(size=(2, 2, 7, 3))     # (B, Hkv, S, Ev)
    >>> out, lse = flex_attention(q, k, v, score_mod=ALiBi(alibi_slopes(4)),
    ...                           mask_mod=CausalMask(), enable_gqa=True, return_lse=True)
    >>> out.shape, lse.shape
    ((2, 4, 5, 3), (2, 4, 5))
    """
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    q, k, v, _, opts, path = _prepare(
        q, k, v, score_mod, mask_mod, block_mask, scale, enable_gqa, path, check
    )
    if path == "plain":
        tr = sdpa_forward(q, k, v, **opts)  # (A1)-(A7) with (A20)
        out, lse = tr.out, tr.logsumexp
    else:
        res = flash_attention_forward(q, k, v, **_tiled(opts, block_mask, check))
        out, lse = cast(FlashOutput, res)
    return (out, lse) if return_lse else out


def _tiled(opts: dict[str, Any], block_mask: BlockMask | None, check: bool) -> dict[str, Any]:
    """The tiled path's arguments: the BlockMask's tiles, or FlexAttention's default 128."""
    if block_mask is None:
        return {**opts, "block_q": 128, "block_k": 128}
    mod = opts["mask_mod"]
    return {
        **opts,
        "mask_mod": None if mod is block_mask.mask_mod else mod,
        "block_mask": block_mask,
        "check": check,
        "block_q": BLOCK_Q,
        "block_k": BLOCK_K,
    }


def flex_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    dlse: ArrayLike | None = None,
    path: str = "plain",
    check: bool = False,
) -> AttentionGrads:
    r"""Gradients of :func:`flex_attention`, including every parameter of the score mod.

    Recomputes the forward from the same inputs and options, then goes back through it: (A8)-
    (A17) of ``docs/derivations/attention.md``, with the score mod's (A21) (the derivative with
    respect to the score: the mod's ``grad_score``, or the complex step (B4)) and (A22) (its
    parameters: the mod's ``vjp_params``; a scatter-add for a bias table, (B10)).

    Parameters
    ----------
    dout : array_like, shape (B, Hq, L, Ev)
        Gradient of the loss with respect to the output.
    q, k, v, score_mod, mask_mod, block_mask, scale, enable_gqa, path, check
        As for :func:`flex_attention`.
    dlse : array_like, shape (B, Hq, L), optional
        Gradient with respect to the log-sum-exp (``return_lse=True``), (A17).

    Returns
    -------
    AttentionGrads
        ``dq`` (B, Hq, L, E), ``dk`` (Bkv, Hkv, S, E), ``dv`` (Bkv, Hkv, S, Ev) (summed over
        the batch when the keys were broadcast from batch 1), and ``dscore_mod``: the gradient
        of each of the score mod's ``params`` by name (``{}`` without any).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import RelativePositionBias, flex_attention_backward
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.normal(size=(1, 2, 3, 4)), rng.normal(size=(1, 2, 5, 4)),
    ...            rng.normal(size=(1, 2, 5, 6)))
    >>> mod = RelativePositionBias(np.zeros((2, 7)), offset=4)   # (H, L + S - 1)
    >>> g = flex_attention_backward(rng.normal(size=(1, 2, 3, 6)), q, k, v, score_mod=mod)
    >>> g.dq.shape, g.dk.shape, g.dscore_mod["table"].shape
    ((1, 2, 3, 4), (1, 2, 5, 4), (2, 7))
    """
    q, k, v, Bkv, opts, path = _prepare(
        q, k, v, score_mod, mask_mod, block_mask, scale, enable_gqa, path, check
    )
    if path == "plain":
        g = sdpa_backward(dout, sdpa_forward(q, k, v, **opts), dlse)  # (A8)-(A17), (A21)-(A22)
    else:
        kw = _tiled(opts, block_mask, check)
        res = cast(FlashOutput, flash_attention_forward(q, k, v, **kw))
        kw.pop("check", None)  # verified once, by the forward
        g = flash_attention_backward(dout, q, k, v, res.out, res.logsumexp, dlse=dlse, **kw)
    dk, dv = g.dk, g.dv
    if Bkv != q.shape[0]:  # the keys were broadcast from batch 1: their gradient sums over it
        dk, dv = dk.sum(axis=0, keepdims=True), dv.sum(axis=0, keepdims=True)
    return g._replace(dk=dk, dv=dv, dscore_mod={} if g.dscore_mod is None else g.dscore_mod)
