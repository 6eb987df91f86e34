r"""Compare any attention implementation with the reference, with tolerances that can be justified.

* :func:`compare` -- the worst error of an array against the reference, where it is, both values
  there, and the NaN/Inf mismatches; :func:`assert_close` raises an ``AssertionError`` whose
  message is that report, with per-precision default tolerances (:data:`DEFAULT_TOLERANCES`).
  They live in ``attention_ref.oracle.compare``, with :class:`Comparison`, the one report that
  :func:`attention_ref.gradcheck.error_report` and the error budget return too; this module
  re-exports them.
* The **error-budget rule** of FlashAttention's and PyTorch's attention tests, as an API:
  a low-precision candidate's error against the float64 reference may be at most
  ``rtol_budget`` times the error of a *baseline* -- the reference itself computed in the
  candidate's precision -- plus a noise floor:

  .. math::
      \max|\text{candidate} - \text{ref}| \le
      \text{rtol\_budget} \cdot \max|\text{baseline} - \text{ref}| + \text{floor},
      \qquad \text{floor} = 2\, \operatorname{ulp}_p(\max|\text{ref}| + 0.3)

  in the candidate's precision ``p``: the bound of FlashAttention's ``fwd_atol``,
  ``2 * max|fl(fl(r + 0.3) - 0.3) - r|``, the error of doing any arithmetic at all on the output
  (:func:`noise_floor`).
  :func:`check_budget` / :func:`assert_within_budget` apply it to one array;
  :func:`budget_reports` to a canonical case's output and every gradient.
* Baselines: :func:`sdpa_baseline` and :func:`mha_baseline` compute the reference in float32,
  float16 or **bfloat16** (emulated: NumPy has no bfloat16, so values are rounded from float32
  to 8 significant bits, round-to-nearest-even, :func:`round_to_bfloat16`), rounding every stage's
  output to that precision while products accumulate in float32, as GPU kernels and PyTorch's
  low-precision eager ops do; ``reorder=True`` scales q before the product, as FlashAttention's
  reference with ``reorder_ops=True``, a different order of operations.

Everything here takes NumPy arrays or anything ``numpy.asarray`` accepts, and also torch tensors
(detached and moved to the CPU; bfloat16 ones are widened exactly to float32).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ..core._validate import sum_to_shape
from ..core.attention import AttentionGrads, sdpa_forward
from ..core.mha import MultiHeadParams
from ..core.options import AttentionOptions
from ..core.scores import (
    apply_mask,
    apply_mask_backward,
    group_heads,
    ungroup_heads,
)
from .compare import (  # the one comparison report: re-exported here, its documented home
    DEFAULT_TOLERANCES,
    PRECISIONS,
    Comparison,
    Tolerance,
    assert_close,
    compare,
    to_numpy,
)
from .compare import (
    check_precision as _check_precision,
)

__all__ = [
    "PRECISIONS",
    "UNIT_ROUNDOFF",
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "OUTPUT_BUDGET",
    "GRADIENT_BUDGET",
    "Comparison",
    "compare",
    "assert_close",
    "round_to_bfloat16",
    "round_to",
    "noise_floor",
    "BudgetReport",
    "check_budget",
    "assert_within_budget",
    "Baseline",
    "sdpa_baseline",
    "mha_baseline",
    "budget_reports",
    "to_numpy",
]

#: Unit roundoff u = 2^-p of each precision (p significant bits: 53, 24, 11, 8).
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}

#: Budget factor for outputs: FlashAttention's tests allow 2x the baseline's error (``rtol = 2``).
OUTPUT_BUDGET = 2.0
#: Budget factor for gradients: 3x, as FlashAttention-2's tests (tests/test_flash_attn.py) allow
#: for dq, dk and dv (its FlashAttention-3 tests use 2x, 3x with softcap, plus the floor). A
#: backward chains more low-precision operations than the forward (dP, the softmax backward, two
#: more products per input). Implementations whose accumulation differs much from the baseline's
#: may need more: PyTorch's own SDPA tests allow 8x-160x for fused kernels' gradients.
GRADIENT_BUDGET = 3.0


# ----------------------------------------------------------------------------- rounding


def round_to_bfloat16(x: ArrayLike) -> np.ndarray:
    """Round to the nearest bfloat16 value (ties to even), returned as float32.

    bfloat16 keeps float32's 8 exponent bits and 8 significant bits (7 stored). Rounding a
    float32 adds ``0x7FFF`` plus the lowest kept bit to its bit pattern and clears the low 16 bits:
    round-to-nearest-even on the dropped half. Infinities stay infinite, values past the
    largest bfloat16 round to infinity, NaNs stay NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.testing import round_to_bfloat16
    >>> round_to_bfloat16(np.array([1 + 2**-8, 1 + 3 * 2**-8, 3.14159])).tolist()   # ties to even
    [1.0, 1.015625, 3.140625]
    """
    f = np.asarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), np.float32(np.nan), rounded).astype(np.float32)


def round_to(x: ArrayLike, precision: str) -> np.ndarray:
    """Round to the nearest value of ``precision``; float64 stays float64, the others give float32.

    Examples
    --------
    >>> from attention_ref.testing import round_to
    >>> float(round_to(0.1, "float16")), float(round_to(0.1, "bfloat16"))
    (0.0999755859375, 0.10009765625)
    """
    precision = _check_precision(precision)
    if precision == "float64":
        return np.asarray(x, dtype=np.float64)
    if precision == "bfloat16":
        return round_to_bfloat16(x)
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(precision).astype(np.float32)


def noise_floor(reference: ArrayLike, precision: str) -> float:
    r"""The absolute allowance of the error budget: two ulps of ``max|reference| + 0.3`` in
    ``precision``.

    FlashAttention's tests compute it empirically as ``2 * max|fl(fl(r + 0.3) - 0.3) - r|``: the
    cost of doing any arithmetic at all on the output in that precision. Over a large tensor that
    maximum reaches its bound, two units in the last place of ``max|r| + 0.3``; over a small one
    (a bias gradient of 6 entries) it is often exactly 0 by luck, and the rule then judges
    round-off against round-off. This function returns the bound itself,

    .. math:: \text{floor} = 2\, \operatorname{ulp}_p(\max|r| + 0.3),

    so the floor depends on the magnitude and the precision only. Non-finite entries are ignored.

    Examples
    --------
    >>> from attention_ref.testing import noise_floor
    >>> noise_floor([1.0, -0.5], "bfloat16") == 2 * 2**-7   # ulp of 1.3 in bfloat16 is 2^-7
    True
    >>> noise_floor([0.0], "float32") == 2 * 2**-25         # ulp of 0.3 in float32 is 2^-25
    True
    """
    precision = _check_precision(precision)
    r = to_numpy(reference)[0].astype(np.float64)
    finite = np.isfinite(r)
    if not finite.any():
        return 0.0
    top = float(np.max(np.abs(r[finite]))) + 0.3
    bits = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}[precision]
    ulp = 2.0 ** (math.floor(math.log2(top)) - (bits - 1))
    return 2 * ulp


# ----------------------------------------------------------------------------- the error budget


class BudgetReport(NamedTuple):
    """One array judged by the error-budget rule."""

    name: str  #: what was compared
    precision: str  #: the candidate's precision (the baseline's)
    candidate: Comparison  #: candidate vs float64 reference
    baseline: Comparison  #: baseline vs float64 reference
    rtol_budget: float  #: allowed multiple of the baseline's error
    floor: float  #: absolute allowance (:func:`noise_floor` unless given)
    allowed: float  #: rtol_budget * baseline error + floor
    passed: bool  #: candidate error <= allowed and no NaN/Inf mismatch the baseline does not have

    @property
    def ratio(self) -> float:
        """Candidate error / baseline error (inf when the baseline is exact and the candidate is
        not)."""
        c, b = self.candidate.max_abs_error, self.baseline.max_abs_error
        return 0.0 if c == 0 else (c / b if b > 0 else float("inf"))

    def __str__(self) -> str:
        verdict = "within budget" if self.passed else "OVER BUDGET"
        return (
            f"{self.name}: {verdict} ({self.precision}): candidate error "
            f"{self.candidate.max_abs_error:.3e} vs allowed {self.allowed:.3e} = "
            f"{self.rtol_budget:g} x baseline error {self.baseline.max_abs_error:.3e} + floor "
            f"{self.floor:.3e} (ratio {self.ratio:.2f})\n"
            f"  candidate: {self.candidate}\n  baseline:  {self.baseline}"
        )


def check_budget(
    candidate: Any,
    reference: Any,
    baseline: Any,
    *,
    precision: str,
    rtol_budget: float = OUTPUT_BUDGET,
    floor: float | None = None,
    name: str = "",
) -> BudgetReport:
    r"""Judge a low-precision candidate by the error-budget rule.

    Passes when ``max|candidate - reference| <= rtol_budget * max|baseline - reference| + floor``
    and the candidate has no NaN/Inf mismatch with the reference that the baseline does not have.

    Parameters
    ----------
    candidate : array_like or torch tensor
        The implementation under test, in ``precision``.
    reference : array_like
        The float64 reference.
    baseline : array_like
        The reference computed in the candidate's precision (:func:`sdpa_baseline`, or
        ``dtype=numpy.float32`` for a float32 candidate).
    precision : {"float32", "float16", "bfloat16", "float64"}
    rtol_budget : float, default :data:`OUTPUT_BUDGET`
        :data:`GRADIENT_BUDGET` for gradients.
    floor : float, optional
        Default :func:`noise_floor` of the reference in ``precision``.
    name : str

    Returns
    -------
    BudgetReport

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention as sdpa
    >>> from attention_ref.testing import check_budget
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (
    ...     rng.normal(size=(2, 8, 16)), rng.normal(size=(2, 8, 16)), rng.normal(size=(2, 8, 16))
    ... )
    >>> ref = sdpa(q, k, v)
    >>> base = sdpa(q, k, v, dtype=np.float32)
    >>> cand = sdpa(q[..., ::-1], k[..., ::-1], v, dtype=np.float32)   # another summation order
    >>> check_budget(cand, ref, base, precision="float32").passed
    True
    >>> check_budget(
    ...     sdpa(q, k, v, scale=0.99 / 4, dtype=np.float32), ref, base, precision="float32"
    ... ).passed
    False
    """
    precision = _check_precision(precision)
    if (
        not isinstance(rtol_budget, (int, float))
        or isinstance(rtol_budget, bool)
        or not rtol_budget >= 1
    ):
        raise ValueError(f"rtol_budget must be a number >= 1; got {rtol_budget!r}")
    cand = compare(candidate, reference, name=name)
    base = compare(baseline, reference, name=name)
    fl = noise_floor(reference, precision) if floor is None else float(floor)
    allowed = rtol_budget * base.max_abs_error + fl
    passed = cand.max_abs_error <= allowed and cand.nonfinite_mismatch <= base.nonfinite_mismatch
    return BudgetReport(name, precision, cand, base, float(rtol_budget), fl, allowed, bool(passed))


def assert_within_budget(
    candidate: Any,
    reference: Any,
    baseline: Any,
    *,
    precision: str,
    rtol_budget: float = OUTPUT_BUDGET,
    floor: float | None = None,
    name: str = "",
) -> BudgetReport:
    """:func:`check_budget`, raising ``AssertionError`` with the report when it fails.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.testing import assert_within_budget
    >>> ref = np.array([1.0, 2.0])
    >>> _ = assert_within_budget(np.float32(ref), ref, np.float32(ref), precision="float32")
    """
    report = check_budget(
        candidate,
        reference,
        baseline,
        precision=precision,
        rtol_budget=rtol_budget,
        floor=floor,
        name=name,
    )
    if not report.passed:
        raise AssertionError(str(report))
    return report


# ----------------------------------------------------------------------------- baselines


class Baseline(NamedTuple):
    """A reference computed in a lower precision (float32 arrays holding that precision's
    values)."""

    out: np.ndarray
    grads: (
        dict[str, np.ndarray] | None
    )  #: keyed like the inputs (q, k, v, bias / query, ..., w_q, ...)


def _stage_sdpa(q, k, v, dout, rnd, reorder, options: AttentionOptions):
    """SDPA forward (and backward) in float32 with every stage's output rounded by ``rnd``."""
    tr = sdpa_forward(q, k, v, options=options.replace(dtype=np.float32))  # masks, keep-mask, scale
    hkv = k.shape[-3]
    kt = k[..., :, None, :, :].swapaxes(-1, -2)  # (..., Hkv, 1, Dk, S)
    if reorder:
        s = (
            group_heads(rnd(tr.q * np.float32(tr.scale)), hkv) @ kt
        )  # scale q first (FlashAttention's reorder_ops)
    else:
        s = (group_heads(tr.q, hkv) @ kt) * np.float32(tr.scale)
    scores = rnd(ungroup_heads(s))  # (..., H, T, S)
    capped = (
        rnd(tr.softcap * np.tanh(scores / np.float32(tr.softcap)))
        if tr.softcap is not None
        else scores
    )
    logits = rnd(capped + tr.bias) if tr.bias is not None else capped
    masked = apply_mask(logits, tr.allowed)
    m = np.max(masked, axis=-1, keepdims=True)
    e = np.exp(masked - m)
    probs = e / e.sum(axis=-1, keepdims=True)
    probs[tr.row_is_empty] = {
        "zero": 0.0,
        "uniform": 1.0 / masked.shape[-1],
        "nan": np.nan,
        "raise": 0.0,
    }[tr.empty_rows]
    probs = rnd(probs)
    dropped = (
        rnd(probs * tr.keep_mask / np.float32(1 - tr.dropout_p))
        if tr.keep_mask is not None
        else probs
    )
    vg = v[..., :, None, :, :]  # (..., Hkv, 1, S, Dv)
    out = rnd(ungroup_heads(group_heads(dropped, hkv) @ vg))  # (..., H, T, Dv)
    if dout is None:
        return out, None, tr
    dog = group_heads(rnd(dout), hkv)
    ddropped = rnd(ungroup_heads(dog @ vg.swapaxes(-1, -2)))  # dP'
    dv = rnd((group_heads(dropped, hkv).swapaxes(-1, -2) @ dog).sum(axis=-3))
    dprobs = (
        rnd(ddropped * tr.keep_mask / np.float32(1 - tr.dropout_p))
        if tr.keep_mask is not None
        else ddropped
    )
    dmasked = rnd(probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)))
    dlogits = apply_mask_backward(dmasked, tr.allowed)
    dbias = rnd(sum_to_shape(dlogits, tr.bias.shape)) if tr.bias is not None else None
    dscores = (
        rnd(dlogits * (1 - (capped / np.float32(tr.softcap)) ** 2))
        if tr.softcap is not None
        else dlogits
    )
    dsg = group_heads(dscores, hkv)
    dq = rnd(ungroup_heads(dsg @ k[..., :, None, :, :]) * np.float32(tr.scale))
    dk = rnd((dsg.swapaxes(-1, -2) @ group_heads(tr.q, hkv)).sum(axis=-3) * np.float32(tr.scale))
    return out, AttentionGrads(dq, dk, dv, dbias), tr


def sdpa_baseline(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    dout: ArrayLike | None = None,
    *,
    precision: str,
    reorder: bool = False,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> Baseline:
    r"""Scaled dot-product attention computed in a low precision: the error budget's baseline.

    The inputs (and ``bias``, ``dout``) are rounded to ``precision``; products accumulate in
    float32; the output of every stage -- scores, soft-capped scores, logits, weights, output,
    and in the backward dP, the softmax gradient, dq, dk, dv, dbias -- is rounded to
    ``precision``. The softmax itself runs in float32 on rounded logits, as PyTorch's
    low-precision softmax does.

    Parameters
    ----------
    q, k, v : array_like
        As in :func:`~attention_ref.scaled_dot_product_attention`.
    dout : array_like, optional
        Cotangent; when given, the gradients are computed too.
    precision : {"float32", "float16", "bfloat16"}
        bfloat16 is emulated (:func:`round_to_bfloat16`).
    reorder : bool, default False
        Scale q before the product instead of the scores after it.
    options : AttentionOptions, optional
        The attention options as one object.
    **kwargs
        Fields of :class:`~attention_ref.AttentionOptions` by name (mask, bias, causal, align,
        window, softcap, scale, dropout_p, dropout_mask, empty_rows); a keyword overrides
        ``options``. The compute dtype is float32 whatever ``dtype`` says.

    Returns
    -------
    Baseline
        ``out`` and (with ``dout``) ``grads`` keyed ``q``, ``k``, ``v`` (and ``bias``), float32
        arrays holding ``precision`` values.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.testing import sdpa_baseline
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 6, 8)), rng.normal(size=(2, 6, 8))
    >>> base = sdpa_baseline(q, k, v, precision="bfloat16", causal=True)
    >>> err = np.abs(base.out - scaled_dot_product_attention(q, k, v, causal=True)).max()
    >>> bool(2**-10 < err < 2**-5)      # a few bfloat16 ulps
    True
    """
    precision = _check_precision(precision)
    if precision == "float64":
        raise ValueError(
            "precision must be a low precision for a baseline ('float32', 'float16' or "
            "'bfloat16'); got 'float64' (the reference itself)"
        )
    if not isinstance(reorder, (bool, np.bool_)):
        raise TypeError(f"reorder must be a bool; got {reorder!r}")

    def rnd(x):
        return round_to(x, precision)

    given = AttentionOptions.of(options, **kwargs)
    if given.bias is not None:
        given = given.replace(bias=_round_bias(given.bias, rnd))
    out, grads, _ = _stage_sdpa(
        rnd(to_numpy(q)[0]),
        rnd(to_numpy(k)[0]),
        rnd(to_numpy(v)[0]),
        None if dout is None else to_numpy(dout)[0],
        rnd,
        bool(reorder),
        given,
    )
    if grads is None:
        return Baseline(out, None)
    g = {"q": grads.dq, "k": grads.dk, "v": grads.dv}
    if grads.dbias is not None:
        g["bias"] = grads.dbias
    return Baseline(out, g)


def _round_bias(bias, rnd):
    b = np.asarray(bias, dtype=np.float64)
    return np.where(np.isneginf(b), -np.inf, rnd(np.where(np.isneginf(b), 0.0, b)))


def mha_baseline(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    dout: ArrayLike | None = None,
    *,
    precision: str,
    num_heads: int,
    num_kv_heads: int | None = None,
    reorder: bool = False,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> Baseline:
    """Multi-head attention computed in a low precision, stage by stage (see :func:`sdpa_baseline`).

    Inputs and weights are rounded to ``precision``; each projection, the attention stages and
    the output projection round their outputs; the backward rounds every gradient it produces.

    Returns
    -------
    Baseline
        ``out`` and (with ``dout``) ``grads`` keyed ``query``, ``key``, ``value``, ``w_q``, ...,
        ``b_o`` (present weights only) and ``bias``.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import init_params, multi_head_attention
    >>> from attention_ref.testing import mha_baseline
    >>> rng = np.random.default_rng(0)
    >>> p = init_params(rng, d_model=8, num_heads=2)
    >>> x = rng.normal(size=(2, 5, 8))
    >>> base = mha_baseline(x, x, x, p, precision="float16", num_heads=2)
    >>> bool(np.abs(base.out - multi_head_attention(x, x, x, p, num_heads=2)).max() < 1e-2)
    True
    """
    precision = _check_precision(precision)
    if precision == "float64":
        raise ValueError(
            "precision must be a low precision for a baseline ('float32', 'float16' or "
            "'bfloat16'); got 'float64'"
        )
    if not isinstance(params, MultiHeadParams):
        raise TypeError(f"params must be a MultiHeadParams; got {type(params).__name__}")

    def rnd(x):
        return round_to(x, precision)

    H = num_heads
    Hkv = H if num_kv_heads is None else num_kv_heads
    w = {n: rnd(a) for n, a in params.as_dict().items()}
    xq, xk, xv = rnd(to_numpy(query)[0]), rnd(to_numpy(key)[0]), rnd(to_numpy(value)[0])

    def proj(x, wn, bn):
        y = x @ w[wn]
        return rnd(y + w[bn] if bn in w else y)

    def split(x, h):  # (..., T, h*D) -> (..., h, T, D)
        return np.swapaxes(x.reshape(*x.shape[:-1], h, x.shape[-1] // h), -2, -3)

    q, k, v = (
        split(proj(xq, "w_q", "b_q"), H),
        split(proj(xk, "w_k", "b_k"), Hkv),
        split(proj(xv, "w_v", "b_v"), Hkv),
    )
    given = AttentionOptions.of(options, **kwargs)
    if given.bias is not None:
        given = given.replace(bias=_round_bias(given.bias, rnd))
    ctx_dout = None
    dout_r = None
    if dout is not None:
        dout_r = rnd(to_numpy(dout)[0])
        ctx_dout = rnd(dout_r @ w["w_o"].T)  # d concat
        ctx_dout = split(ctx_dout, H)
    ctx, g, _ = _stage_sdpa(q, k, v, ctx_dout, rnd, bool(reorder), given)
    concat = np.swapaxes(ctx, -2, -3).reshape(*ctx.shape[:-3], ctx.shape[-2], -1)  # (..., T, H*Dv)
    out = proj(concat, "w_o", "b_o")
    if dout is None or g is None or dout_r is None:
        return Baseline(out, None)

    def merge(x):  # (..., h, T, D) -> (..., T, h*D)
        return np.swapaxes(x, -2, -3).reshape(*x.shape[:-3], x.shape[-2], -1)

    def flat_sum(x, y):  # sum over batch and positions of x^T y: the weight gradient
        return rnd(x.reshape(-1, x.shape[-1]).T @ y.reshape(-1, y.shape[-1]))

    grads: dict[str, np.ndarray] = {}
    dq2, dk2, dv2 = merge(g.dq), merge(g.dk), merge(g.dv)
    grads["query"] = rnd(dq2 @ w["w_q"].T)
    grads["key"] = rnd(dk2 @ w["w_k"].T)
    grads["value"] = rnd(dv2 @ w["w_v"].T)
    grads["w_q"], grads["w_k"], grads["w_v"] = (
        flat_sum(xq, dq2),
        flat_sum(xk, dk2),
        flat_sum(xv, dv2),
    )
    grads["w_o"] = flat_sum(concat, dout_r)
    for bn, d in (("b_q", dq2), ("b_k", dk2), ("b_v", dv2), ("b_o", dout_r)):
        if bn in w:
            grads[bn] = rnd(d.reshape(-1, d.shape[-1]).sum(axis=0))
    if g.dbias is not None:
        grads["bias"] = g.dbias
    return Baseline(out, grads)


def budget_reports(
    data: Any,
    out: Any,
    grads: dict[str, Any] | None = None,
    *,
    precision: str,
    reorder: bool = False,
    output_budget: float = OUTPUT_BUDGET,
    gradient_budget: float = GRADIENT_BUDGET,
    reference: Any = None,
) -> list[BudgetReport]:
    """Judge a candidate's output (and gradients) on a canonical case by the error-budget rule.

    Parameters
    ----------
    data : attention_ref.cases.CaseData
        The case the candidate ran (``case.build()``), with its ``cotangent`` as ``dout``.
    out : array_like or torch tensor
        The candidate's output.
    grads : dict of str to array_like, optional
        The candidate's gradients keyed like ``data.inputs``; any subset.
    precision : {"float32", "float16", "bfloat16"}
        The candidate's precision; the baseline is computed in it.
    reorder : bool
        Baseline with q scaled first (see :func:`sdpa_baseline`).
    output_budget, gradient_budget : float
        The budget factors (defaults :data:`OUTPUT_BUDGET`, :data:`GRADIENT_BUDGET`).
    reference : attention_ref.cases.Reference, optional
        The float64 reference, if already computed (``data.reference()``).

    Returns
    -------
    list of BudgetReport
        ``out`` first, then one per gradient given.

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref.cases import get_case
    >>> from attention_ref.testing import budget_reports, sdpa_baseline
    >>> data = get_case("gqa").build()
    >>> cand = sdpa_baseline(
    ...     **data.inputs, dout=data.cotangent, precision="bfloat16", reorder=True, **data.options
    ... )
    >>> [r.passed for r in budget_reports(data, cand.out, cand.grads, precision="bfloat16")]
    [True, True, True, True]
    """
    ref = data.reference() if reference is None else reference
    dout = data.cotangent if grads else None
    if data.case.kind == "sdpa":
        base = sdpa_baseline(
            **data.inputs, dout=dout, precision=precision, reorder=reorder, **data.options
        )
    else:
        weights = {n: a for n, a in data.inputs.items() if n.startswith(("w_", "b_"))}
        extra = {} if "bias" not in data.inputs else {"bias": data.inputs["bias"]}
        base = mha_baseline(
            data.inputs["query"],
            data.inputs["key"],
            data.inputs["value"],
            MultiHeadParams(**weights),
            dout,
            precision=precision,
            reorder=reorder,
            **extra,
            **data.options,
        )
    reports = [
        check_budget(
            out, ref.out, base.out, precision=precision, rtol_budget=output_budget, name="out"
        )
    ]
    for name, g in (grads or {}).items():
        if base.grads is None or name not in base.grads:
            raise ValueError(
                f"grads has {name!r}, which is not an input of case {data.case.name!r}: "
                f"{sorted(data.inputs)}"
            )
        reports.append(
            check_budget(
                g,
                ref.grads[name],
                base.grads[name],
                precision=precision,
                rtol_budget=gradient_budget,
                name="d" + name,
            )
        )
    return reports
