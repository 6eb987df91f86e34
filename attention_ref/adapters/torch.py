r"""PyTorch adapters: weights, mask polarity, the option mapping, and runners.

* Weights: :func:`params_from_torch` and :func:`params_to_torch` convert between
  ``torch.nn.MultiheadAttention`` (``(out, in)`` layout, ``in_proj_weight`` packed or
  ``q/k/v_proj_weight`` separate) and :class:`~attention_ref.MultiHeadParams` (``(in, out)``);
  :func:`param_grads_from_torch` reads the module's gradients in the same layout.
* Masks: ``nn.MultiheadAttention``'s ``key_padding_mask`` and boolean ``attn_mask`` mean
  True = *ignore*; the reference's ``mask`` means True = *may attend*. Every converter says in
  its name which side it reads and writes: :func:`mask_from_key_padding_mask`,
  :func:`key_padding_mask_from_mask`, :func:`mask_from_ignore_mask`, :func:`ignore_mask_from_mask`;
  float additive masks: :func:`mask_and_bias_from_additive_mask`, :func:`additive_mask_from_mask`.
  These are NumPy functions; they accept torch bool tensors as well.
* Options: :func:`torch_sdpa_kwargs` maps the reference's options to the keyword arguments of
  ``torch.nn.functional.scaled_dot_product_attention``, :func:`torch_mha_kwargs` to those of an
  ``nn.MultiheadAttention`` call. What torch cannot express raises
  :class:`~attention_ref.adapters.UnsupportedOption`.
* FlexAttention's BlockMask: :func:`block_mask_to_torch` and :func:`block_mask_from_torch`
  convert between :class:`~attention_ref.BlockMask` and ``torch.nn.attention.flex_attention``'s.
* Runners: :func:`run_torch_sdpa` and :func:`run_torch_mha` run torch in float64 on the math
  backend and return its output and autograd gradients (``out.backward(dout)``) as NumPy arrays,
  in the types the reference's backwards return.

Importing this module does not import torch; the functions that need it import it when called.
Mapping tables and the behaviours measured with torch 2.13.0: ``docs/adapters.md``.
"""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ..core._validate import as_float, check_broadcastable, check_positive_int
from ..core.attention import AttentionGrads
from ..core.block_mask import BlockMask
from ..core.masks import attention_mask
from ..core.mha import MultiHeadGrads, MultiHeadParams
from ..core.options import AttentionOptions
from . import (
    FrameworkRun,
    UnsupportedOption,
    _bool_array,
    _check_full_shape,
    _dtype,
    _head_arrays,
    _numpy,
    _prepare,
)

__all__ = [
    "TORCH_VERSION_CHECKED",
    "TORCH_SDPA_EMPTY_ROWS",
    "TORCH_MHA_EMPTY_ROWS",
    "mask_from_key_padding_mask",
    "key_padding_mask_from_mask",
    "mask_from_ignore_mask",
    "ignore_mask_from_mask",
    "mask_and_bias_from_additive_mask",
    "additive_mask_from_mask",
    "params_from_torch",
    "param_grads_from_torch",
    "params_to_torch",
    "torch_sdpa_kwargs",
    "torch_mha_kwargs",
    "run_torch_sdpa",
    "run_torch_mha",
    "block_mask_to_torch",
    "block_mask_from_torch",
]

#: The torch version whose behaviour the constants below and ``docs/adapters.md`` record.
TORCH_VERSION_CHECKED = "2.13.0"
#: What ``F.scaled_dot_product_attention`` (math backend) gives a query row with no key to
#: attend, as an ``empty_rows`` policy: output 0 and no gradient (its ``_safe_softmax``),
#: measured with torch 2.13.0 for boolean masks, float masks with a row of ``-inf``, and
#: ``causal_lower_right`` with T > S. Other backends were not measured.
TORCH_SDPA_EMPTY_ROWS = "zero"
#: What ``nn.MultiheadAttention`` gives a fully masked query row when called as the runner calls
#: it (``need_weights=False``, training mode or gradients enabled, math backend): a zero context
#: row, so the output row is ``out_proj.bias``. Measured with torch 2.13.0. With
#: ``need_weights=True`` the row is NaN instead (``"nan"``), and in eval mode under
#: ``torch.no_grad()`` its fused fast path also gives NaN.
TORCH_MHA_EMPTY_ROWS = "zero"

_SDPA = "torch F.scaled_dot_product_attention"
_MHA = "torch nn.MultiheadAttention"
_NO_DROPOUT = (
    "torch draws the dropout keep-mask from its own RNG; the reference's explicit "
    "dropout_mask cannot be passed to it"
)
_IGNORE = "nn.MultiheadAttention polarity: True = ignore"
_ATTEND = "True = may attend"


def _torch() -> Any:
    """The torch module, imported on first use; ImportError says what to install."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError(
            "this function of attention_ref.adapters.torch needs PyTorch, which is not installed: "
            "pip install torch (the CPU build is enough)"
        ) from exc


def _torch_dtype(torch: Any, dt: np.dtype) -> Any:
    return torch.from_numpy(np.empty(0, dtype=dt)).dtype


def _tensor(torch: Any, arr: np.ndarray, *, requires_grad: bool = False) -> Any:
    """A torch tensor holding a copy of ``arr`` (never sharing its memory)."""
    return torch.tensor(np.ascontiguousarray(arr), requires_grad=requires_grad)


def _out(t: Any) -> np.ndarray:
    """A torch tensor's values as a NumPy array of its own."""
    return np.array(t.detach().cpu().numpy(), copy=True)


@contextmanager
def _math_backend(torch: Any) -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


# ---------------------------------------------------------------------------------------------
# Mask polarity
# ---------------------------------------------------------------------------------------------


def mask_from_key_padding_mask(key_padding_mask: ArrayLike) -> np.ndarray:
    r"""``nn.MultiheadAttention``'s ``key_padding_mask`` (True = ignore) as a reference ``mask``
    (True = may attend).

    Parameters
    ----------
    key_padding_mask : array_like of bool or torch bool tensor, shape (B, S)
        True where key ``j`` of batch element ``b`` is padding (torch polarity). An unbatched
        ``(S,)`` mask, or more leading dims ``(..., S)``, works the same way.

    Returns
    -------
    mask : ndarray of bool, shape (B, 1, 1, S)
        True where the key may be attended, broadcastable to (B, H, T, S).

    See Also
    --------
    key_padding_mask_from_mask : the inverse.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.adapters.torch import mask_from_key_padding_mask
    >>> kpm = np.array([[False, False, True],      # batch 0: key 2 is padding
    ...                 [False, True, True]])      # batch 1: keys 1 and 2 are padding
    >>> m = mask_from_key_padding_mask(kpm)
    >>> m.shape
    (2, 1, 1, 3)
    >>> m[:, 0, 0, :].astype(int)
    array([[1, 1, 0],
           [1, 0, 0]])
    """
    kpm = _bool_array("key_padding_mask", key_padding_mask, _IGNORE + " this key")
    if kpm.ndim < 1:
        raise ValueError(f"key_padding_mask must have shape (B, S); got shape {kpm.shape}")
    return ~kpm[..., None, None, :]  # (B, S) -> (B, 1, 1, S)


def key_padding_mask_from_mask(mask: ArrayLike) -> np.ndarray:
    r"""A key-padding-shaped reference ``mask`` (True = may attend) as ``key_padding_mask`` (True =
    ignore).

    Parameters
    ----------
    mask : array_like of bool or torch bool tensor, shape (B, 1, 1, S)
        A mask that varies only with the batch element and the key (one row shared by every
        head and query), True = may attend. Leading dims ``(..., 1, 1, S)`` are kept.

    Returns
    -------
    key_padding_mask : ndarray of bool, shape (B, S)
        True where the key is ignored, as ``nn.MultiheadAttention`` expects.

    Raises
    ------
    ValueError
        If the head or query axis of ``mask`` is not 1: such a mask is not a key padding mask;
        :func:`ignore_mask_from_mask` converts it to an ``attn_mask`` instead.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.adapters.torch import key_padding_mask_from_mask
    >>> mask = np.array([True, True, False])[None, None, None, :]   # (1, 1, 1, S)
    >>> key_padding_mask_from_mask(mask)
    array([[False, False,  True]])
    """
    m = _bool_array("mask", mask, _ATTEND)
    if m.ndim < 3 or m.shape[-3:-1] != (1, 1):
        raise ValueError(
            "mask must have shape (B, 1, 1, S) (the same row for every head and query) to be a "
            f"key_padding_mask; got shape {m.shape} (use ignore_mask_from_mask for an attn_mask)"
        )
    return ~m[..., 0, 0, :]  # (B, 1, 1, S) -> (B, S)


def mask_from_ignore_mask(attn_mask: ArrayLike, *, num_heads: int | None = None) -> np.ndarray:
    r"""``nn.MultiheadAttention``'s boolean ``attn_mask`` (True = ignore) as a reference ``mask``
    (True = may attend).

    Parameters
    ----------
    attn_mask : array_like of bool or torch bool tensor, shape (T, S) or (B*H, T, S)
        True where query ``i`` may **not** attend key ``j`` (torch polarity). The 3-D form
        holds batch element ``b``, head ``h`` at index ``b * H + h``.
    num_heads : int, optional
        H; required for the 3-D form, to split ``B*H``.

    Returns
    -------
    mask : ndarray of bool, shape (T, S) or (B, H, T, S)

    See Also
    --------
    ignore_mask_from_mask : the inverse.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.adapters.torch import mask_from_ignore_mask
    >>> no_peeking = np.triu(np.ones((3, 3), dtype=bool), k=1)  # torch's causal attn_mask
    >>> mask_from_ignore_mask(no_peeking).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]])
    """
    ignore = _bool_array("attn_mask", attn_mask, _IGNORE)
    if ignore.ndim == 2:
        return ~ignore
    if ignore.ndim != 3:
        raise ValueError(
            f"attn_mask must have shape (T, S) or (B*H, T, S); got shape {ignore.shape}"
        )
    if num_heads is None:
        raise ValueError(
            "num_heads is needed to split a 3-D attn_mask (B*H, T, S); got "
            f"attn_mask.shape={ignore.shape}"
        )
    H = check_positive_int("num_heads", num_heads)
    if ignore.shape[0] % H:
        raise ValueError(
            f"attn_mask's first axis (B*H) must be a multiple of num_heads={H}; got shape "
            f"{ignore.shape}"
        )
    return ~ignore.reshape(
        ignore.shape[0] // H, H, *ignore.shape[1:]
    )  # (B*H, T, S) -> (B, H, T, S)


def ignore_mask_from_mask(mask: ArrayLike) -> np.ndarray:
    r"""A reference ``mask`` (True = may attend) as ``nn.MultiheadAttention``'s boolean
    ``attn_mask`` (True = ignore).

    Parameters
    ----------
    mask : array_like of bool or torch bool tensor, shape (T, S) or (B, H, T, S)
        True = may attend, with every axis at its full size (``np.broadcast_to`` a broadcastable
        mask first): ``nn.MultiheadAttention`` takes exactly these two shapes.

    Returns
    -------
    attn_mask : ndarray of bool, shape (T, S) or (B*H, T, S)
        True = ignore; batch element ``b``, head ``h`` at index ``b * H + h``.

    Examples
    --------
    >>> from attention_ref import causal_mask
    >>> from attention_ref.adapters.torch import ignore_mask_from_mask
    >>> ignore_mask_from_mask(causal_mask(2, 3)).astype(int)    # True above the diagonal
    array([[0, 1, 1],
           [0, 0, 1]])
    """
    m = _bool_array("mask", mask, _ATTEND)
    if m.ndim == 2:
        return ~m
    if m.ndim != 4:
        raise ValueError(
            f"mask must have shape (T, S) or (B, H, T, S) for an attn_mask; got shape {m.shape}"
        )
    return ~m.reshape(-1, *m.shape[2:])  # (B, H, T, S) -> (B*H, T, S)


def mask_and_bias_from_additive_mask(attn_mask: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    r"""Split a float additive ``attn_mask`` into a boolean ``mask`` and a finite ``bias``.

    PyTorch adds a float ``attn_mask`` to the scores; its ``-inf`` entries mask their pair. The
    reference can take the whole array as ``bias`` (a ``-inf`` bias entry masks too); the split
    makes the masked pairs explicit.

    Parameters
    ----------
    attn_mask : array_like of float or torch float tensor, shape (..., T, S)
        Finite entries are added to the scores; ``-inf`` entries mask. NaN and ``+inf`` are
        refused.

    Returns
    -------
    mask : ndarray of bool, shape (..., T, S)
        True where ``attn_mask`` is finite (may attend).
    bias : ndarray of float64, shape (..., T, S)
        ``attn_mask`` where finite, 0 where masked.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.adapters.torch import mask_and_bias_from_additive_mask
    >>> mask, bias = mask_and_bias_from_additive_mask(np.array([[0.5, -np.inf], [-1.0, 2.0]]))
    >>> mask
    array([[ True, False],
           [ True,  True]])
    >>> bias
    array([[ 0.5,  0. ],
           [-1. ,  2. ]])
    """
    a = as_float("attn_mask", _numpy(attn_mask), np.dtype(np.float64))
    if a.ndim < 2:
        raise ValueError(f"attn_mask must have shape (..., T, S); got shape {a.shape}")
    bad = np.isnan(a) | np.isposinf(a)
    if bad.any():
        raise ValueError(f"attn_mask must be finite or -inf; got {int(bad.sum())} NaN/+inf entries")
    mask = ~np.isneginf(a)
    return mask, np.where(mask, a, 0.0)


def additive_mask_from_mask(
    mask: ArrayLike | None = None, bias: ArrayLike | None = None
) -> np.ndarray:
    r"""A reference ``mask`` and/or ``bias`` as one float additive ``attn_mask``: ``bias`` where
    allowed, ``-inf`` elsewhere.

    Parameters
    ----------
    mask : array_like of bool, optional
        True = may attend; broadcastable with ``bias``.
    bias : array_like of float, optional
        The additive bias (0 when omitted).

    Returns
    -------
    attn_mask : ndarray of float64
        The broadcast shape of ``mask`` and ``bias``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.adapters.torch import additive_mask_from_mask
    >>> additive_mask_from_mask(np.array([[True, False]]), np.array([[0.5, 0.25]]))
    array([[ 0.5, -inf]])
    """
    if mask is None and bias is None:
        raise ValueError("additive_mask_from_mask needs a mask, a bias or both; got neither")
    b = np.zeros(()) if bias is None else as_float("bias", _numpy(bias), np.dtype(np.float64))
    if mask is None:
        return np.array(b, copy=True)
    m = _bool_array("mask", mask, _ATTEND)
    try:
        np.broadcast_shapes(m.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"mask and bias must broadcast together; got mask.shape={m.shape}, bias.shape={b.shape}"
        ) from None
    return np.where(m, b, -np.inf)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _check_module(torch: Any, module: Any) -> None:
    if not isinstance(module, torch.nn.MultiheadAttention):
        raise TypeError(
            f"module must be a torch.nn.MultiheadAttention; got {type(module).__name__}"
        )
    if module.bias_k is not None or module.bias_v is not None:
        raise UnsupportedOption(
            "add_bias_kv=True",
            "attention_ref.MultiHeadParams",
            "the module appends learned bias rows to the keys and values (S grows by 1), which "
            "has no counterpart in the reference",
        )
    if module.add_zero_attn:
        raise UnsupportedOption(
            "add_zero_attn=True",
            "attention_ref.MultiHeadParams",
            "the module appends a zero key and value (S grows by 1), which has no counterpart in "
            "the reference",
        )


def _module_arrays(module: Any, *, grad: bool, dt: np.dtype) -> MultiHeadParams:
    """The module's weights (or their .grad) in (in, out) layout, as arrays of ``dt``."""

    def get(name: str, t: Any) -> np.ndarray:
        if grad:
            if t.grad is None:
                raise ValueError(
                    f"module.{name}.grad is None: run backward through the module first"
                )
            t = t.grad
        return np.array(t.detach().cpu().numpy(), dtype=dt, copy=True)

    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = np.split(
            get("in_proj_weight", module.in_proj_weight), 3
        )  # (3E, E) -> 3 x (E, E), rows q, k, v
    else:
        w_q, w_k, w_v = (
            get(f"{n}_proj_weight", getattr(module, f"{n}_proj_weight")) for n in "qkv"
        )
    b_q = b_k = b_v = b_o = None
    if module.in_proj_bias is not None:
        b_q, b_k, b_v = np.split(get("in_proj_bias", module.in_proj_bias), 3)  # (3E,) -> 3 x (E,)
    if module.out_proj.bias is not None:
        b_o = get("out_proj.bias", module.out_proj.bias)
    w_o = get("out_proj.weight", module.out_proj.weight)
    return MultiHeadParams(  # (out, in) -> (in, out)
        w_q=w_q.T.copy(),
        w_k=w_k.T.copy(),
        w_v=w_v.T.copy(),
        w_o=w_o.T.copy(),
        b_q=b_q,
        b_k=b_k,
        b_v=b_v,
        b_o=b_o,
    )


def params_from_torch(module: Any) -> tuple[MultiHeadParams, dict[str, Any]]:
    r"""An ``nn.MultiheadAttention``'s weights as :class:`~attention_ref.MultiHeadParams`, and its
    configuration.

    torch stores ``(out, in)`` and computes ``x @ w.T + b``; the reference stores ``(in, out)``
    and computes ``x @ w + b``: every weight is transposed. With ``kdim = vdim = embed_dim`` the
    query, key and value weights are the rows of ``in_proj_weight`` in that order, else
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``. ``in_proj_bias`` splits the same way.

    Parameters
    ----------
    module : torch.nn.MultiheadAttention
        Without ``add_bias_kv`` or ``add_zero_attn`` (refused: the reference has no
        counterpart).

    Returns
    -------
    params : MultiHeadParams
        float64 copies: ``w_q`` (E, E), ``w_k`` (kdim, E), ``w_v`` (vdim, E), ``w_o`` (E, E),
        biases (E,) or None (``bias=False``).
    config : dict
        ``num_heads``, ``embed_dim``, ``kdim``, ``vdim``, ``batch_first``, ``dropout``: pass
        ``num_heads=config["num_heads"]`` to :func:`~attention_ref.multi_head_attention`.

    Raises
    ------
    UnsupportedOption
        For a module with ``add_bias_kv=True`` or ``add_zero_attn=True``.

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")   # the example needs PyTorch
    >>> from attention_ref.adapters.torch import params_from_torch
    >>> module = torch.nn.MultiheadAttention(8, 2, kdim=6, vdim=5, dtype=torch.float64)
    >>> params, config = params_from_torch(module)
    >>> params.w_q.shape, params.w_k.shape, params.w_v.shape, params.w_o.shape
    ((8, 8), (6, 8), (5, 8), (8, 8))
    >>> config["num_heads"], config["batch_first"]
    (2, False)
    """
    torch = _torch()
    _check_module(torch, module)
    params = _module_arrays(module, grad=False, dt=np.dtype(np.float64))
    config = {
        "num_heads": int(module.num_heads),
        "embed_dim": int(module.embed_dim),
        "kdim": int(module.kdim),
        "vdim": int(module.vdim),
        "batch_first": bool(module.batch_first),
        "dropout": float(module.dropout),
    }
    return params, config


def param_grads_from_torch(module: Any) -> MultiHeadParams:
    r"""The gradients of an ``nn.MultiheadAttention``'s weights, in the reference's ``(in, out)``
    layout.

    Read after ``out.backward(dout)``; the layout is that of :func:`params_from_torch`, so the
    result compares field by field with ``multi_head_attention_backward(...).dparams``.

    Parameters
    ----------
    module : torch.nn.MultiheadAttention

    Returns
    -------
    MultiHeadParams
        float64 copies of each parameter's ``.grad``, transposed; None where the module has no
        bias.

    Raises
    ------
    ValueError
        If a parameter has no gradient yet.

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")   # the example needs PyTorch
    >>> from attention_ref.adapters.torch import param_grads_from_torch
    >>> module = torch.nn.MultiheadAttention(4, 2, batch_first=True, dtype=torch.float64)
    >>> x = torch.randn(1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> out, _ = module(x, x, x, need_weights=False)
    >>> out.backward(torch.ones_like(out).normal_(generator=torch.Generator().manual_seed(1)))
    >>> g = param_grads_from_torch(module)
    >>> g.w_q.shape, g.b_o.shape
    ((4, 4), (4,))
    """
    torch = _torch()
    _check_module(torch, module)
    return _module_arrays(module, grad=True, dt=np.dtype(np.float64))


def params_to_torch(
    params: MultiHeadParams,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    dtype: DTypeLike | None = None,
) -> Any:
    r"""An ``nn.MultiheadAttention`` (``batch_first=True``, float64) holding
    :class:`~attention_ref.MultiHeadParams`.

    The inverse of :func:`params_from_torch`: weights are transposed to ``(out, in)``; with
    ``kdim = vdim = D`` they are packed into ``in_proj_weight`` (rows q, k, v).

    Parameters
    ----------
    params : MultiHeadParams
        ``w_q`` (D, H*Dk), ``w_k`` (Dk_in, Hkv*Dk), ``w_v`` (Dv_in, Hkv*Dv), ``w_o`` (H*Dv, D_out).
    num_heads : int
        H.
    num_kv_heads : int, optional
        Hkv; refused unless it equals H.
    dtype : dtype, optional
        The module's dtype; float64 when omitted.

    Returns
    -------
    torch.nn.MultiheadAttention
        ``embed_dim = D``, ``kdim = Dk_in``, ``vdim = Dv_in``, ``dropout=0``, in training mode
        (the mode in which a fully masked row gives a zero context, ``TORCH_MHA_EMPTY_ROWS``).

    Raises
    ------
    UnsupportedOption
        Where ``nn.MultiheadAttention`` cannot hold the weights: grouped-query attention
        (Hkv != H), ``H*Dk != D``, Dv != Dk, an output width other than D, or some biases None
        and others not (one ``bias`` flag covers all four).

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")   # the example needs PyTorch
    >>> import numpy as np
    >>> from attention_ref import init_params
    >>> from attention_ref.adapters.torch import params_to_torch
    >>> p = init_params(np.random.default_rng(0), d_model=8, num_heads=2, kdim=6, vdim=5)
    >>> module = params_to_torch(p, num_heads=2)
    >>> module.k_proj_weight.shape, module.batch_first, module.in_proj_bias.dtype
    (torch.Size([8, 6]), True, torch.float64)
    """
    torch = _torch()
    dt = _dtype(dtype)
    if not isinstance(params, MultiHeadParams):
        raise TypeError(f"params must be a MultiHeadParams; got {type(params).__name__}")
    H = check_positive_int("num_heads", num_heads)
    if num_kv_heads is not None and check_positive_int("num_kv_heads", num_kv_heads) != H:
        raise UnsupportedOption(
            f"num_kv_heads={num_kv_heads}",
            _MHA,
            f"it has one key/value head per query head (Hkv = H = {H}); no grouped-query attention",
        )

    def weight(name: str) -> np.ndarray:
        value = getattr(params, name)
        if value is None:
            raise TypeError(f"params.{name} must be an array; got None")
        arr = as_float(f"params.{name}", value, dt)
        if arr.ndim != 2:
            raise ValueError(f"params.{name} must have shape (in, out); got shape {arr.shape}")
        return arr

    w_q, w_k, w_v, w_o = weight("w_q"), weight("w_k"), weight("w_v"), weight("w_o")
    D = w_q.shape[0]
    if w_q.shape[1] % H:
        raise ValueError(
            f"params.w_q has {w_q.shape[1]} columns (H*Dk), not divisible by num_heads={H}"
        )
    Dk = w_q.shape[1] // H
    if w_q.shape[1] != D:
        raise UnsupportedOption(
            "params.w_q",
            _MHA,
            f"it projects the query to embed_dim = D = {D} columns (H*Dk = D); w_q has shape "
            f"{w_q.shape}",
        )
    if w_k.shape[1] != D:
        raise UnsupportedOption(
            "params.w_k",
            _MHA,
            f"its key projection has embed_dim = H*Dk = {D} columns (Hkv = H, no grouped-query "
            f"attention); w_k has shape {w_k.shape}",
        )
    if w_v.shape[1] != D:
        raise UnsupportedOption(
            "params.w_v",
            _MHA,
            f"its value projection has embed_dim = H*Dv = {D} columns (Dv = Dk = {Dk}); w_v has "
            f"shape {w_v.shape}",
        )
    if w_o.shape != (D, D):
        raise UnsupportedOption(
            "params.w_o",
            _MHA,
            f"its out_proj maps embed_dim to embed_dim, shape (D, D) = {(D, D)}; w_o has shape "
            f"{w_o.shape}",
        )
    names = ("b_q", "b_k", "b_v", "b_o")
    present = [n for n in names if getattr(params, n) is not None]
    if present and len(present) != 4:
        raise UnsupportedOption(
            "params.b_*",
            _MHA,
            "one bias flag covers in_proj_bias (query, key, value) and out_proj.bias: all four "
            f"biases or none; got {', '.join(present)} present and "
            f"{', '.join(n for n in names if n not in present)} None",
        )
    biases = {n: as_float(f"params.{n}", getattr(params, n), dt) for n in present}
    for n, b in biases.items():
        if b.shape != (D,):
            raise ValueError(f"params.{n} must have shape ({D},); got shape {b.shape}")

    module = torch.nn.MultiheadAttention(
        D,
        H,
        dropout=0.0,
        bias=bool(present),
        kdim=w_k.shape[0],
        vdim=w_v.shape[0],
        batch_first=True,
        dtype=_torch_dtype(torch, dt),
    )
    with torch.no_grad():  # (in, out) -> (out, in)
        if module._qkv_same_embed_dim:
            module.in_proj_weight.copy_(
                _tensor(torch, np.concatenate([w_q.T, w_k.T, w_v.T]))
            )  # (3D, D)
        else:
            module.q_proj_weight.copy_(_tensor(torch, w_q.T))
            module.k_proj_weight.copy_(_tensor(torch, w_k.T))
            module.v_proj_weight.copy_(_tensor(torch, w_v.T))
        module.out_proj.weight.copy_(_tensor(torch, w_o.T))
        if present:
            module.in_proj_bias.copy_(
                _tensor(torch, np.concatenate([biases["b_q"], biases["b_k"], biases["b_v"]]))
            )  # (3D,)
            module.out_proj.bias.copy_(_tensor(torch, biases["b_o"]))
    return module.train()


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def _bias_tensor(torch: Any, bias: Any, bias_np: np.ndarray, tdt: Any) -> Any:
    """The bias as a tensor of ``tdt``: the caller's tensor (autograd flows to it) or a copy."""
    if torch.is_tensor(bias):
        return bias.to(tdt)
    return _tensor(torch, bias_np).to(tdt)


def torch_sdpa_kwargs(
    T: int,
    S: int,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    r"""The keyword arguments of ``torch.nn.functional.scaled_dot_product_attention`` for the
    reference's options.

    ``F.scaled_dot_product_attention(q, k, v, **torch_sdpa_kwargs(T, S, **options))`` computes
    ``scaled_dot_product_attention(q, k, v, **options)`` (with torch's math backend):

    ====================================  ===================================================
    reference                             torch
    ====================================  ===================================================
    ``causal`` only, ``top_left``         ``is_causal=True``
    ``causal`` only, ``bottom_right``     ``attn_mask=causal_lower_right(T, S)`` when T <= S;
                                          an explicit boolean mask when T > S
    ``mask``, ``window``, other combos    ``attn_mask``: boolean, True = may attend
    ``bias`` (with or without masks)      ``attn_mask``: float, ``bias`` where allowed, ``-inf``
                                          elsewhere
    Hkv < H                               ``enable_gqa=True``
    ``scale``                             ``scale``
    ====================================  ===================================================

    (``is_causal`` cannot be combined with an ``attn_mask`` in torch, so a causal mask combined
    with anything else is folded into the explicit mask. When T = S the two alignments agree and
    ``is_causal`` is used.)

    Parameters
    ----------
    T, S : int
        Query and key lengths.
    num_heads, num_kv_heads : int, optional
        H and Hkv; ``enable_gqa`` is set when both are given and differ.
    options, **kwargs
        The attention options (an AttentionOptions and/or its fields by name: mask, bias,
        causal, align, window, softcap, scale, dropout_p, dropout_mask, empty_rows, dtype),
        as for :func:`~attention_ref.scaled_dot_product_attention`. ``mask`` and ``bias`` may be
        torch tensors; a ``bias`` tensor is used as it is, so autograd reaches it.
    dtype : dtype, optional
        dtype of a float ``attn_mask`` (it must match the query's); float64 when omitted.

    Returns
    -------
    dict
        ``attn_mask`` (None, a bool or float tensor, or a ``CausalBias``), ``is_causal``,
        ``dropout_p`` (0.0), ``scale`` and ``enable_gqa``.

    Raises
    ------
    UnsupportedOption
        For ``softcap``; ``dropout_p > 0`` (torch draws its own keep-mask); an ``empty_rows``
        other than ``"zero"`` (``TORCH_SDPA_EMPTY_ROWS``) when some query row has no key to
        attend.

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")   # the example needs PyTorch
    >>> from attention_ref.adapters.torch import torch_sdpa_kwargs
    >>> kw = torch_sdpa_kwargs(3, 5, num_heads=4, num_kv_heads=2, causal=True)
    >>> kw["is_causal"], kw["attn_mask"], kw["enable_gqa"]
    (True, None, True)
    >>> type(torch_sdpa_kwargs(3, 5, causal=True, align="bottom_right")["attn_mask"]).__name__
    'CausalBias'
    """
    opts = AttentionOptions.of(options, **kwargs)
    bias, dtype = opts.bias, opts.dtype
    p = _prepare(_SDPA, TORCH_SDPA_EMPTY_ROWS, _NO_DROPOUT, T, S, opts)
    gqa = False
    if num_kv_heads is not None:
        if num_heads is None:
            raise ValueError(f"num_kv_heads={num_kv_heads} needs num_heads too")
        H, Hkv = (
            check_positive_int("num_heads", num_heads),
            check_positive_int("num_kv_heads", num_kv_heads),
        )
        if H % Hkv:
            raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={Hkv}")
        gqa = Hkv != H
    elif num_heads is not None:
        check_positive_int("num_heads", num_heads)
    torch = _torch()
    tdt = _torch_dtype(torch, _dtype(dtype))

    attn_mask: Any = None
    is_causal = False
    only_causal = p.causal and p.mask is None and p.window is None and p.bias is None
    if only_causal and (p.align == "top_left" or T == S):
        is_causal = True  # tril(ones(T, S)): top-left
    elif only_causal and T < S:
        from torch.nn.attention.bias import causal_lower_right

        attn_mask = causal_lower_right(T, S)  # tril(ones(T, S), diagonal=S - T): bottom-right
    elif p.bias is not None:
        attn_mask = _bias_tensor(
            torch, bias, p.bias, tdt
        )  # (..., H, T, S) float, added to the scores
        if p.structural is not None:
            attn_mask = torch.where(_tensor(torch, p.structural), attn_mask, float("-inf"))
    elif p.structural is not None:
        attn_mask = _tensor(torch, p.structural)  # bool, True = takes part
    return {
        "attn_mask": attn_mask,
        "dropout_p": 0.0,
        "is_causal": is_causal,
        "scale": p.scale,
        "enable_gqa": gqa,
    }


def _key_padding_or_none(mask: np.ndarray, B: int, S: int) -> np.ndarray | None:
    """``key_padding_mask`` (B, S) when ``mask`` varies only along B and S (shape (b, 1, 1, s)),
    else None."""
    m4 = mask.reshape(
        (1,) * (4 - mask.ndim) + mask.shape
    )  # (b, h, t, s); mask.ndim <= 4 was checked
    if m4.shape[1:3] != (1, 1):
        return None
    return key_padding_mask_from_mask(np.broadcast_to(m4, (B, 1, 1, S)))


def torch_mha_kwargs(
    batch_size: int,
    T: int,
    S: int,
    *,
    num_heads: int,
    head_dim: int | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    r"""The keyword arguments of an ``nn.MultiheadAttention`` call for the reference's options.

    ``module(query, key, value, **torch_mha_kwargs(B, T, S, num_heads=H, **options))`` computes
    ``multi_head_attention(query, key, value, params, num_heads=H, **options)`` for a module
    from :func:`params_to_torch` (``batch_first=True``, training mode):

    =========================================  ==============================================
    reference                                  ``nn.MultiheadAttention``
    =========================================  ==============================================
    ``mask`` of shape (B, 1, 1, S), no bias    ``key_padding_mask`` (B, S), True = ignore
    ``causal``/``window`` with such a mask     plus ``attn_mask`` (T, S), True = ignore
    any other boolean mask                     ``attn_mask`` (T, S) or (B*H, T, S), True = ignore
    ``bias`` (with or without masks)           float ``attn_mask`` (B*H, T, S): ``bias`` where
                                               allowed, ``-inf`` elsewhere
    =========================================  ==============================================

    and ``need_weights=False`` (with ``need_weights=True`` torch gives NaN rows where this gives
    zero ones).

    Parameters
    ----------
    batch_size, T, S : int
        B, and the query and key lengths.
    num_heads : int
        H.
    head_dim : int, optional
        Dk; needed only to check a ``scale`` (the module's is fixed at ``1 / sqrt(Dk)``).
    options, **kwargs
        The attention options (an AttentionOptions and/or its fields by name: mask, bias,
        causal, align, window, softcap, scale, dropout_p, dropout_mask, empty_rows, dtype),
        as for :func:`~attention_ref.multi_head_attention`; ``mask`` and ``bias`` broadcast to
        (B, H, T, S). A ``bias`` torch tensor is used as it is, so autograd reaches it.
    dtype : dtype, optional
        dtype of a float ``attn_mask``; float64 when omitted.

    Returns
    -------
    dict
        ``key_padding_mask``, ``attn_mask`` (torch tensors or None) and ``need_weights=False``.

    Raises
    ------
    UnsupportedOption
        For ``softcap``; ``dropout_p > 0``; a ``scale`` other than ``1 / sqrt(head_dim)``; an
        ``empty_rows`` other than ``"zero"`` (``TORCH_MHA_EMPTY_ROWS``) when some query row has
        no key to attend.

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")   # the example needs PyTorch
    >>> import numpy as np
    >>> from attention_ref.adapters.torch import torch_mha_kwargs
    >>> keep = np.ones((2, 1, 1, 5), dtype=bool)
    >>> keep[1, ..., 3:] = False                          # batch 1: the last two keys are padding
    >>> kw = torch_mha_kwargs(2, 4, 5, num_heads=2, mask=keep, causal=True, align="bottom_right")
    >>> kw["key_padding_mask"].int().tolist(), tuple(kw["attn_mask"].shape), kw["need_weights"]
    ([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], (4, 5), False)
    """
    opts = AttentionOptions.of(options, **kwargs)
    bias, scale, dtype = opts.bias, opts.scale, opts.dtype
    B = check_positive_int("batch_size", batch_size)
    H = check_positive_int("num_heads", num_heads)
    if scale is not None and head_dim is None:
        raise ValueError(
            "head_dim (Dk) is needed to check scale against the module's fixed 1 / sqrt(Dk)"
        )
    p = _prepare(_MHA, TORCH_MHA_EMPTY_ROWS, _NO_DROPOUT, T, S, opts)
    if p.scale is not None:
        fixed = 1.0 / math.sqrt(check_positive_int("head_dim", head_dim))
        if not math.isclose(p.scale, fixed, rel_tol=1e-12):
            raise UnsupportedOption(
                "scale",
                _MHA,
                f"its score scale is fixed at 1/sqrt(Dk) = {fixed!r}; got scale={p.scale!r}",
            )
    full = (B, H, T, S)
    for name, arr in (("mask", p.mask), ("bias", p.bias)):
        if arr is not None:
            check_broadcastable(name, arr, full, "(B, H, T, S)")
    torch = _torch()
    tdt = _torch_dtype(torch, _dtype(dtype))

    key_padding_mask = attn_mask = None
    if p.bias is not None:
        b = _bias_tensor(torch, bias, p.bias, tdt)
        if p.structural is not None:
            b = torch.where(_tensor(torch, p.structural), b, float("-inf"))
        attn_mask = b.expand(full).reshape(B * H, T, S)  # (B, H, T, S) -> (B*H, T, S), float
    else:
        rest = p.structural
        kpm = None if p.mask is None else _key_padding_or_none(p.mask, B, S)
        if kpm is not None:
            key_padding_mask = _tensor(torch, kpm)  # (B, S), True = ignore
            rest = attention_mask(
                T, S, causal=p.causal, align=p.align, window=p.window
            )  # (T, S) or None
        if rest is not None:
            if all(n == 1 for n in rest.shape[:-2]):
                rest = np.broadcast_to(rest.reshape(rest.shape[-2:]), (T, S))  # (T, S)
            else:
                rest = np.broadcast_to(
                    rest.reshape((1,) * (4 - rest.ndim) + rest.shape), full
                )  # (B, H, T, S)
            attn_mask = _tensor(
                torch, ignore_mask_from_mask(rest)
            )  # (T, S) or (B*H, T, S), True = ignore
    return {"key_padding_mask": key_padding_mask, "attn_mask": attn_mask, "need_weights": False}


# ---------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------


def run_torch_sdpa(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    dout: ArrayLike | None = None,
    *,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> FrameworkRun:
    r"""Run ``torch.nn.functional.scaled_dot_product_attention`` on the reference's inputs and
    options.

    The options are mapped by :func:`torch_sdpa_kwargs`; torch runs on its math backend, in
    float64 unless ``dtype`` says otherwise, and with ``dout`` the gradients come from autograd,
    ``out.backward(dout)``.

    Parameters
    ----------
    q : array_like, shape (..., H, T, Dk)
    k : array_like, shape (..., Hkv, S, Dk)
    v : array_like, shape (..., Hkv, S, Dv)
    dout : array_like, shape (..., H, T, Dv), optional
        Cotangent of the output; without it no gradient is computed.
    options, **kwargs
        The attention options (an AttentionOptions and/or its fields by name: mask, bias,
        causal, align, window, softcap, scale, dropout_p, dropout_mask, empty_rows, dtype),
        as for :func:`~attention_ref.scaled_dot_product_attention`.
    dtype : dtype, optional
        The dtype torch computes in; float64 when omitted.

    Returns
    -------
    FrameworkRun
        ``out`` (..., H, T, Dv) and ``grads``, an :class:`~attention_ref.AttentionGrads`
        (``dq``, ``dk``, ``dv``, ``dbias`` of the bias's shape or None), or None without ``dout``.

    Raises
    ------
    UnsupportedOption
        See :func:`torch_sdpa_kwargs`.

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")   # the example needs PyTorch
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.adapters.torch import run_torch_sdpa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (
    ...     rng.normal(size=(2, 4, 3, 8)),
    ...     rng.normal(size=(2, 2, 5, 8)),
    ...     rng.normal(size=(2, 2, 5, 6)),
    ... )
    >>> run = run_torch_sdpa(
    ...     q, k, v, rng.normal(size=(2, 4, 3, 6)), causal=True, align="bottom_right"
    ... )
    >>> ours = scaled_dot_product_attention(q, k, v, causal=True, align="bottom_right")
    >>> bool(np.abs(run.out - ours).max() < 1e-12), run.grads.dk.shape
    (True, (2, 2, 5, 8))
    """
    opts = AttentionOptions.of(options, **kwargs)
    mask, bias = opts.mask, opts.bias
    torch = _torch()
    dt = _dtype(opts.dtype)
    q, k, v = _head_arrays(q, k, v, dt)
    H, T, S, Hkv = q.shape[-3], q.shape[-2], k.shape[-2], k.shape[-3]
    scores_shape = q.shape[:-1] + (S,)  # (..., H, T, S)
    mask_np = None if mask is None else _bool_array("mask", mask, _ATTEND)
    bias_np = None if bias is None else as_float("bias", _numpy(bias), dt)
    _check_full_shape("mask", mask_np, scores_shape)
    _check_full_shape("bias", bias_np, scores_shape)
    dout_arr = None if dout is None else as_float("dout", _numpy(dout), dt)
    grad = dout_arr is not None
    if dout_arr is not None and dout_arr.shape != q.shape[:-1] + (v.shape[-1],):
        raise ValueError(
            f"dout must have the output's shape (..., H, T, Dv) = {q.shape[:-1] + (v.shape[-1],)}; "
            f"got {dout_arr.shape}"
        )

    leaves = {
        name: _tensor(torch, a, requires_grad=grad) for name, a in (("q", q), ("k", k), ("v", v))
    }
    if bias_np is not None:
        leaves["bias"] = _tensor(torch, bias_np, requires_grad=grad)
    kwargs = torch_sdpa_kwargs(
        T,
        S,
        num_heads=H,
        num_kv_heads=Hkv,
        mask=mask_np,
        bias=leaves.get("bias"),
        options=opts.replace(dtype=dt),
    )
    with _math_backend(torch):
        out = torch.nn.functional.scaled_dot_product_attention(
            leaves["q"], leaves["k"], leaves["v"], **kwargs
        )
    grads = None
    if dout_arr is not None:
        out.backward(_tensor(torch, dout_arr))
        grads = AttentionGrads(
            dq=_out(leaves["q"].grad),
            dk=_out(leaves["k"].grad),
            dv=_out(leaves["v"].grad),
            dbias=_out(leaves["bias"].grad) if "bias" in leaves else None,
        )
    return FrameworkRun(out=_out(out), grads=grads)


def run_torch_mha(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    dout: ArrayLike | None = None,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> FrameworkRun:
    r"""Run ``torch.nn.MultiheadAttention`` with the reference's weights, inputs and options.

    The weights go into a module by :func:`params_to_torch`, the options into the call by
    :func:`torch_mha_kwargs`; the module runs in training mode with ``need_weights=False`` on
    the math backend, and with ``dout`` the gradients come from ``out.backward(dout)``.
    ``query``, ``key`` and ``value`` are three separate tensors even when they are one array, so
    their gradients come back separately, as :class:`~attention_ref.MultiHeadGrads` has them
    (for self-attention the input's gradient is their sum).

    Parameters
    ----------
    query : array_like, shape (B, T, D)
    key : array_like, shape (B, S, Dk_in)
    value : array_like, shape (B, S, Dv_in)
    params : MultiHeadParams
        In the reference's ``(in, out)`` layout; see :func:`params_to_torch` for what the
        module can hold.
    dout : array_like, shape (B, T, D), optional
        Cotangent of the output.
    num_heads : int
        H.
    num_kv_heads : int, optional
        Refused unless equal to H.
    options, **kwargs
        The attention options (an AttentionOptions and/or its fields by name: mask, bias,
        causal, align, window, softcap, scale, dropout_p, dropout_mask, empty_rows, dtype),
        as for :func:`~attention_ref.multi_head_attention`.
    dtype : dtype, optional
        The dtype torch computes in; float64 when omitted.

    Returns
    -------
    FrameworkRun
        ``out`` (B, T, D) and ``grads``, a :class:`~attention_ref.MultiHeadGrads` (``dquery``,
        ``dkey``, ``dvalue``, ``dparams`` in ``(in, out)`` layout, ``dbias``), or None.

    Raises
    ------
    UnsupportedOption
        See :func:`params_to_torch` and :func:`torch_mha_kwargs`.

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")   # the example needs PyTorch
    >>> import numpy as np
    >>> from attention_ref import init_params, multi_head_attention
    >>> from attention_ref.adapters.torch import run_torch_mha
    >>> rng = np.random.default_rng(0)
    >>> p = init_params(rng, d_model=8, num_heads=2, kdim=6, vdim=5)
    >>> x, mem_k, mem_v = (
    ...     rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 7, 6)), rng.normal(size=(2, 7, 5))
    ... )
    >>> run = run_torch_mha(x, mem_k, mem_v, p, rng.normal(size=(2, 3, 8)), num_heads=2)
    >>> bool(np.abs(run.out - multi_head_attention(x, mem_k, mem_v, p, num_heads=2)).max() < 1e-12)
    True
    >>> run.grads.dkey.shape, run.grads.dparams.w_k.shape
    ((2, 7, 6), (6, 8))
    """
    opts = AttentionOptions.of(options, **kwargs)
    mask, bias = opts.mask, opts.bias
    torch = _torch()
    dt = _dtype(opts.dtype)
    H = check_positive_int("num_heads", num_heads)
    module = params_to_torch(params, num_heads=H, num_kv_heads=num_kv_heads, dtype=dt)
    widths = {"query": module.embed_dim, "key": module.kdim, "value": module.vdim}
    layouts = {"query": "(B, T, D)", "key": "(B, S, Dk_in)", "value": "(B, S, Dv_in)"}
    inputs = {}
    for name, x in (("query", query), ("key", key), ("value", value)):
        arr = as_float(name, _numpy(x), dt)
        if arr.ndim != 3 or arr.size == 0 or arr.shape[-1] != widths[name]:
            raise ValueError(
                f"{name} must have shape {layouts[name]} with last axis {widths[name]} (from "
                f"params); got shape {arr.shape}"
            )
        inputs[name] = arr
    B, T, S = inputs["query"].shape[0], inputs["query"].shape[1], inputs["key"].shape[1]
    if inputs["key"].shape[:2] != (B, S) or inputs["value"].shape[:2] != (B, S):
        raise ValueError(
            "query, key and value must share B and key, value S; got "
            f"query.shape={inputs['query'].shape}, key.shape={inputs['key'].shape}, "
            f"value.shape={inputs['value'].shape}"
        )
    dout_arr = None if dout is None else as_float("dout", _numpy(dout), dt)
    grad = dout_arr is not None
    if dout_arr is not None and dout_arr.shape != (B, T, module.embed_dim):
        raise ValueError(
            f"dout must have the output's shape (B, T, D) = {(B, T, module.embed_dim)}; got "
            f"{dout_arr.shape}"
        )
    leaves = {name: _tensor(torch, a, requires_grad=grad) for name, a in inputs.items()}
    if bias is not None:
        bias_np = as_float("bias", _numpy(bias), dt)
        check_broadcastable("bias", bias_np, (B, H, T, S), "(B, H, T, S)")
        leaves["bias"] = _tensor(torch, bias_np, requires_grad=grad)
    kwargs = torch_mha_kwargs(
        B,
        T,
        S,
        num_heads=H,
        head_dim=module.head_dim,
        mask=mask,
        bias=leaves.get("bias"),
        options=opts.replace(dtype=dt),
    )
    with _math_backend(torch):
        out, _ = module(leaves["query"], leaves["key"], leaves["value"], **kwargs)
    grads = None
    if dout_arr is not None:
        out.backward(_tensor(torch, dout_arr))
        grads = MultiHeadGrads(
            dquery=_out(leaves["query"].grad),
            dkey=_out(leaves["key"].grad),
            dvalue=_out(leaves["value"].grad),
            dparams=_module_arrays(module, grad=True, dt=dt),
            dbias=_out(leaves["bias"].grad) if "bias" in leaves else None,
        )
    return FrameworkRun(out=_out(out), grads=grads)


# ---------------------------------------------------------------------------------------------
# FlexAttention's BlockMask
# ---------------------------------------------------------------------------------------------


def block_mask_to_torch(block_mask: BlockMask, mask_mod: Any = None) -> Any:
    r"""An attention_ref :class:`~attention_ref.BlockMask` as torch's
    ``torch.nn.attention.flex_attention.BlockMask``.

    Parameters
    ----------
    block_mask : BlockMask
    mask_mod : callable, optional
        The torch form of the mask mod (``mask_mod(b, h, q_idx, kv_idx)`` on torch scalars, as
        FlexAttention calls it): a NumPy mask mod cannot run inside torch. Required when the
        BlockMask has partial blocks (torch's default ``noop_mask`` would attend every pair of
        them).

    Returns
    -------
    torch.nn.attention.flex_attention.BlockMask
        Built by ``BlockMask.from_kv_blocks`` from the key-side lists (int32 CPU tensors), the
        ``BLOCK_SIZE`` and ``seq_lengths``; torch computes the query side, which equals this
        BlockMask's.

    Examples
    --------
    >>> from attention_ref import CausalMask, create_block_mask
    >>> from attention_ref.adapters.torch import block_mask_to_torch
    >>> bm = create_block_mask(CausalMask(), 1, 1, 8, 8, BLOCK_SIZE=4)
    >>> tbm = block_mask_to_torch(bm, mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    >>> tbm.BLOCK_SIZE, tuple(tbm.kv_num_blocks.shape)
    ((4, 4), (1, 1, 2))
    """
    torch = _torch()
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be an attention_ref BlockMask; got {type(block_mask).__name__}"
        )
    if mask_mod is None and block_mask.kv_num_blocks.any():
        raise ValueError(
            "the BlockMask has partial blocks: pass mask_mod, the torch form of its mask mod "
            "(torch's default noop_mask would attend every pair of them)"
        )
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable or None; got {type(mask_mod).__name__}")

    def t(x: np.ndarray | None) -> Any:
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32))

    return TorchBlockMask.from_kv_blocks(
        t(block_mask.kv_num_blocks),
        t(block_mask.kv_indices),
        t(block_mask.full_kv_num_blocks),
        t(block_mask.full_kv_indices),
        BLOCK_SIZE=(int(block_mask.BLOCK_SIZE[0]), int(block_mask.BLOCK_SIZE[1])),
        mask_mod=mask_mod,
        seq_lengths=(int(block_mask.seq_lengths[0]), int(block_mask.seq_lengths[1])),
    )


def block_mask_from_torch(torch_block_mask: Any, mask_mod: Any = None) -> BlockMask:
    r"""torch's ``torch.nn.attention.flex_attention.BlockMask`` as an attention_ref
    :class:`~attention_ref.BlockMask`.

    Parameters
    ----------
    torch_block_mask : torch.nn.attention.flex_attention.BlockMask
    mask_mod : callable, optional
        The NumPy form of its mask mod (``attention_ref.core.mods``); torch's own runs on torch
        tensors, not on the NumPy index arrays. Without one the BlockMask has no mask mod:
        :func:`~attention_ref.check_block_mask` then needs one passed to it.

    Returns
    -------
    BlockMask
        The key-side lists copied as int32 arrays, ``BLOCK_SIZE`` and ``seq_lengths``; the
        query side recomputed (equal to torch's).

    Examples
    --------
    >>> import torch
    >>> from torch.nn.attention.flex_attention import create_block_mask as torch_create
    >>> from attention_ref import CausalMask, check_block_mask
    >>> from attention_ref.adapters.torch import block_mask_from_torch
    >>> tbm = torch_create(lambda b, h, q, kv: q >= kv, 1, 1, 8, 8, device="cpu", BLOCK_SIZE=4)
    >>> check_block_mask(block_mask_from_torch(tbm, CausalMask())).ok
    True
    """
    _torch()
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

    if not isinstance(torch_block_mask, TorchBlockMask):
        raise TypeError(
            "torch_block_mask must be a torch.nn.attention.flex_attention.BlockMask; got "
            f"{type(torch_block_mask).__name__}"
        )

    def n(x: Any) -> np.ndarray | None:
        return None if x is None else _out(x).astype(np.int32)

    return BlockMask.from_kv_blocks(
        n(torch_block_mask.kv_num_blocks),
        n(torch_block_mask.kv_indices),
        n(torch_block_mask.full_kv_num_blocks),
        n(torch_block_mask.full_kv_indices),
        BLOCK_SIZE=(int(torch_block_mask.BLOCK_SIZE[0]), int(torch_block_mask.BLOCK_SIZE[1])),
        mask_mod=mask_mod,
        seq_lengths=(int(torch_block_mask.seq_lengths[0]), int(torch_block_mask.seq_lengths[1])),
    )
