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
  float16, **bfloat16** or FP8 (``float8_e4m3fn``, ``float8_e5m2``: ml_dtypes' formats, the
  ``lowp`` extra), rounding every stage's output to that precision while products accumulate in
  float32, as GPU kernels and PyTorch's low-precision eager ops do; ``policy=`` rounds at chosen
  points only (a :class:`~attention_ref.core.precision.Rounding` or a preset mirroring a kernel,
  ``PRESETS``); ``reorder=True`` scales q before the product, as FlashAttention's reference
  with ``reorder_ops=True``, a different order of operations.

Everything here takes NumPy arrays or anything ``numpy.asarray`` accepts, and also torch tensors
(detached and moved to the CPU; bfloat16 ones are widened exactly to float32).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ..core.attention import sdpa_backward, sdpa_forward
from ..core.mha import MultiHeadParams, mha_backward, mha_forward
from ..core.options import AttentionOptions
from ..core.precision import (
    FP8_FORMATS,
    PRESETS,
    SIGNIFICANT_BITS,
    UNIT_ROUNDOFF,
    Rounding,
    round_to,
    round_to_bfloat16,
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

#: Budget factor for outputs: FlashAttention's tests allow 2x the baseline's error (``rtol = 2``).
OUTPUT_BUDGET = 2.0
#: Budget factor for gradients: 3x, as FlashAttention-2's tests (tests/test_flash_attn.py) allow
#: for dq, dk and dv (its FlashAttention-3 tests use 2x, 3x with softcap, plus the floor). A
#: backward chains more low-precision operations than the forward (dP, the softmax backward, two
#: more products per input). Implementations whose accumulation differs much from the baseline's
#: may need more: PyTorch's own SDPA tests allow 8x-160x for fused kernels' gradients.
GRADIENT_BUDGET = 3.0


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
    For the FP8 formats the floor is bfloat16's: an FP8 attention's output is bfloat16
    (:func:`~attention_ref.fp8_attention`).

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
    # an FP8 attention's output is bfloat16 (FlashAttention 3's FP8 forward): the floor is the
    # cost of arithmetic on that output
    bits = SIGNIFICANT_BITS["bfloat16" if precision in FP8_FORMATS else precision]
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
    precision : {"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float64"}
        For an FP8 candidate, its input format; the baseline is then
        :func:`~attention_ref.fp8_attention` of the same quantized inputs.
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
    #: keyed like the inputs (q, k, v, bias / query, ..., w_q, ...)
    grads: dict[str, np.ndarray] | None


def _policy(precision: Any, reorder: Any, policy: Any = None) -> Rounding:
    if not isinstance(reorder, (bool, np.bool_)):
        raise TypeError(f"reorder must be a bool; got {reorder!r}")
    if policy is not None:
        if precision is not None or reorder:
            raise ValueError("give precision (and reorder) or policy, not both")
        if isinstance(policy, str):
            if policy not in PRESETS:
                raise ValueError(
                    f"policy must be a Rounding or one of {sorted(PRESETS)}; got {policy!r}"
                )
            return PRESETS[policy]
        if not isinstance(policy, Rounding):
            raise TypeError(
                f"policy must be a Rounding or a preset name; got {type(policy).__name__}"
            )
        return policy
    if precision is None:
        raise TypeError("give precision= (or policy=, a Rounding or a preset name)")
    return Rounding(_check_precision(precision), scale_q_first=bool(reorder))


def _baseline_options(
    options: AttentionOptions | None, kwargs: dict[str, Any], policy: Rounding
) -> AttentionOptions:
    given = AttentionOptions.of(options, **kwargs)
    given.refuse_mods("a low-precision baseline")
    given.refuse(("dtype", "rounding"), "a baseline", "its precision sets both")
    bias = given.bias
    if bias is not None:
        bias = to_numpy(bias)[0]
    return given.replace(bias=bias, rounding=policy)


def sdpa_baseline(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    dout: ArrayLike | None = None,
    *,
    precision: str | None = None,
    reorder: bool = False,
    policy: Rounding | str | None = None,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> Baseline:
    r"""Scaled dot-product attention computed in a low precision: the error budget's baseline.

    It is :func:`~attention_ref.sdpa_forward` and :func:`~attention_ref.sdpa_backward` themselves
    under the rounding policy :class:`~attention_ref.core.precision.Rounding` of ``precision``:
    the inputs (``q``, ``k``, ``v``, ``bias``, ``dout``) are rounded to ``precision``, products
    accumulate in float32, and the output of every stage -- scores, soft-capped scores, logits,
    weights, output, and in the backward dP, the softmax gradient, dq, dk, dv, dbias -- is
    rounded to ``precision``. The softmax itself runs in float32 on rounded logits, as
    PyTorch's low-precision softmax does. With ``precision="float64"`` nothing is rounded and
    the result is the reference, bit for bit.

    Parameters
    ----------
    q, k, v : array_like
        As in :func:`~attention_ref.scaled_dot_product_attention`.
    dout : array_like, optional
        Cotangent; when given, the gradients are computed too.
    precision : {"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float64"}
        Every stage rounded to it; bfloat16 and FP8 are ml_dtypes' (the ``lowp`` extra).
    reorder : bool, default False
        Scale q (and round it) before the product instead of the scores after it.
    policy : Rounding or str, optional
        Instead of ``precision``: a policy with its own rounding points, or the name of one of
        :data:`~attention_ref.core.precision.PRESETS` (``"flash_attention_2_bf16"``, ...;
        ``docs/precision.md``).
    options : AttentionOptions, optional
        The attention options as one object.
    **kwargs
        Fields of :class:`~attention_ref.AttentionOptions` by name (mask, bias, causal, align,
        window, softcap, scale, dropout_p, dropout_mask, empty_rows); a keyword overrides
        ``options``. ``dtype`` and ``rounding`` are set by ``precision`` and refused here.

    Returns
    -------
    Baseline
        ``out`` and (with ``dout``) ``grads`` keyed ``q``, ``k``, ``v`` (and ``bias``), float32
        arrays holding ``precision`` values (float64 for ``"float64"``).

    Examples
    --------
    >>> import numpy as np
    >>> from attention_ref import scaled_dot_product_attention
    >>> from attention_ref.testing import sdpa_baseline
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 6, 8)), rng.normal(size=(2, 6, 8))
    >>> base = sdpa_baseline(q, k, v, precision="bfloat16", causal=True)
    >>> err = np.abs(base.out - scaled_dot_product_attention(q, k, v, causal=True)).max()
    >>> bool(2**-10 < err < 2**-5)  # a few bfloat16 ulps
    True
    >>> fa2 = sdpa_baseline(q, k, v, policy="flash_attention_2_bf16", causal=True)  # a kernel
    >>> err2 = np.abs(fa2.out - scaled_dot_product_attention(q, k, v, causal=True)).max()
    >>> bool(0 < err2 < 2**-5)
    True
    """
    policy = _policy(precision, reorder, policy)
    given = _baseline_options(options, kwargs, policy)
    q, k, v = (to_numpy(x)[0] for x in (q, k, v))
    trace = sdpa_forward(q, k, v, options=given)  # every stage under fl = policy
    if dout is None:
        return Baseline(trace.out, None)
    g = sdpa_backward(to_numpy(dout)[0], trace)
    grads = {"q": g.dq, "k": g.dk, "v": g.dv}
    if g.dbias is not None:
        grads["bias"] = g.dbias
    return Baseline(trace.out, grads)


def mha_baseline(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    dout: ArrayLike | None = None,
    *,
    precision: str | None = None,
    num_heads: int,
    num_kv_heads: int | None = None,
    reorder: bool = False,
    options: AttentionOptions | None = None,
    **kwargs: Any,
) -> Baseline:
    """Multi-head attention computed in a low precision, stage by stage (see :func:`sdpa_baseline`).

    :func:`~attention_ref.mha_forward` and :func:`~attention_ref.mha_backward` under the rounding
    policy of ``precision``: inputs and weights are rounded; each projection, the attention
    stages and the output projection round their outputs; the backward rounds every gradient it
    produces. ``precision="float64"`` is the reference, bit for bit.

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
    policy = _policy(precision, reorder)
    given = _baseline_options(options, kwargs, policy)
    if not isinstance(params, MultiHeadParams):
        raise TypeError(f"params must be a MultiHeadParams; got {type(params).__name__}")
    query, key, value = (to_numpy(x)[0] for x in (query, key, value))
    trace = mha_forward(
        query, key, value, params, num_heads=num_heads, num_kv_heads=num_kv_heads, options=given
    )
    if dout is None:
        return Baseline(trace.out, None)
    return Baseline(trace.out, mha_backward(to_numpy(dout)[0], trace).as_dict())


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
