"""Conformance of an installed framework with the reference, on every canonical case.

``attention-ref compare torch`` / ``attention-ref compare jax`` run the framework's attention
(PyTorch's ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``; JAX's
``jax.nn.dot_product_attention`` and a ``jnp`` multi-head attention around it) through the
adapters of :mod:`attention_ref.adapters` on each case of :mod:`attention_ref.cases`, forward and
backward with the case's random cotangent, and judge each output and gradient:

* PyTorch computes in float64: ``max|torch - ref| <= 1e-12 max|ref|`` (:data:`FLOAT64_RTOL`).
* JAX computes its softmax in float32 even with x64 enabled, so its results are judged by the
  error-budget rule (:func:`attention_ref.testing.check_budget`) against the reference computed
  in float32 (:func:`attention_ref.testing.sdpa_baseline`): outputs within
  :data:`~attention_ref.testing.OUTPUT_BUDGET` (2x) of the baseline's error, gradients within
  :data:`MIXED_PRECISION_GRADIENT_BUDGET` (24x; see there why not 3x).

A gradient that is 0 in exact arithmetic (the key projection's bias ``b_k``: it shifts a whole
score row) is round-off on both sides; it is judged on the scale of the case's largest gradient
(an absolute allowance of ``1e-12`` times it in float64, the noise floor of it in float32), as the
complex-step rule (G6) does.

Fully masked rows follow the framework's own convention (zero for PyTorch, uniform for JAX): the
reference is computed with that ``empty_rows`` policy, and the table says so. Options a framework
cannot express (soft-capping, a dropout keep-mask, Dk != Dv in JAX, GQA in
``nn.MultiheadAttention``, ...) are reported as skipped, with the adapter's reason.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, NamedTuple

import numpy as np

from ..core.mha import MultiHeadParams
from .cases import CaseData, cases
from .tables import Column, json_float, render_table
from .testing import (
    OUTPUT_BUDGET,
    check_budget,
    compare,
    mha_baseline,
    noise_floor,
    sdpa_baseline,
)

FRAMEWORKS = ("torch", "jax")

#: Pass threshold of a float64 framework against the reference, relative to the largest
#: reference value: both compute the same formulas in float64 in different orders (measured
#: 7.8e-15 at worst against PyTorch 2.13); a wrong convention is off by 1e-3 or more.
FLOAT64_RTOL = 1e-12


#: Gradient budget for a mixed-precision framework (JAX: float32 softmax, float64 products),
#: judged against the uniformly float32 baseline. JAX rounds only its softmax, the baseline every
#: stage: their errors are of one order (JAX's / the baseline's: median 0.63) but peak on different
#: entries, and a baseline luckily exact where it peaks makes the ratio large. Measured with jax
#: 0.10.2 (CPU) over 1000 seeds of the 20 canonical cases JAX can express (``Case.build(seed)``)
#: and of the 13 option sets of tests/test_adapters_jax.py, on 141,081 gradients that are not 0 in
#: exact arithmetic: the budget each needed, (error - floor) / baseline error, was 1.95 at the
#: 99th percentile, 3.88 at the 99.9th, 13.65 at most (dk, padding_empty_rows_zero, seed 771),
#: and above 8 ten times: PyTorch's smallest factor is too tight. 24x is 1.75x the largest
#: measured (the tail falls like x^-3.7: 126, 10 and 2 needed more than 4, 8 and 12).
#: FlashAttention's 3x assumes the candidate and the baseline round the same stages; PyTorch's own
#: SDPA tests allow 8x (dv), 25x (dk) and 160x (dq) the low-precision reference's error for fused
#: kernels (test/test_transformers.py, ``fudge_factors``). A wrong convention exceeds the allowance
#: 1e5-fold.
MIXED_PRECISION_GRADIENT_BUDGET = 24.0


class ConformanceRow(NamedTuple):
    """One output or gradient of one case, or one skipped case."""

    case: str
    function: str  #: the framework entry point
    quantity: str  #: "out", "dq", "dw_k", ... or "-" for a skipped case
    status: str  #: "pass", "FAIL" or "skip"
    error: float | None  #: max|framework - ref| / max|ref|
    verdict: str  #: the rule and the numbers behind it, or the reason for a skip
    empty_rows: str  #: the policy the reference used for this case

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "function": self.function,
            "quantity": self.quantity,
            "status": self.status,
            "rel_error": json_float(self.error),
            "verdict": self.verdict,
            "empty_rows": self.empty_rows,
        }


def _framework(name: str) -> tuple[Any, ...]:
    if name == "torch":
        from ..adapters import torch as pt

        return (
            pt.run_torch_sdpa,
            pt.run_torch_mha,
            pt.TORCH_SDPA_EMPTY_ROWS,
            pt.TORCH_MHA_EMPTY_ROWS,
            "torch F.scaled_dot_product_attention",
            "torch nn.MultiheadAttention",
            None,
        )
    if name == "jax":
        from ..adapters import jax as jx

        return (
            jx.run_jax_sdpa,
            jx.run_jax_mha,
            jx.JAX_EMPTY_ROWS,
            jx.JAX_EMPTY_ROWS,
            "jax.nn.dot_product_attention",
            "jax multi-head (jnp + dot_product_attention)",
            jx.JAX_SOFTMAX_DTYPE,
        )
    raise ValueError(f"framework must be one of {FRAMEWORKS}; got {name!r}")


def _grads_dict(kind: str, grads: Any) -> dict[str, np.ndarray]:
    if kind == "sdpa":
        out = {"q": grads.dq, "k": grads.dk, "v": grads.dv}
        if grads.dbias is not None:
            out["bias"] = grads.dbias
        return out
    return grads.as_dict()


def _baseline(data: CaseData, options: dict[str, Any], precision: str):
    kwargs: dict[str, Any] = {**options, "precision": precision}
    if data.case.kind == "sdpa":
        arrays: dict[str, Any] = dict(data.inputs)
        return sdpa_baseline(dout=data.cotangent, **arrays, **kwargs)
    weights = {n: a for n, a in data.inputs.items() if n.startswith(("w_", "b_"))}
    if "bias" in data.inputs:
        kwargs["bias"] = data.inputs["bias"]
    return mha_baseline(
        data.inputs["query"],
        data.inputs["key"],
        data.inputs["value"],
        MultiHeadParams(**weights),
        data.cotangent,
        **kwargs,
    )


def run_conformance(
    framework: str, selected: list[Any] | None = None, progress: Callable[[str], None] | None = None
) -> list[ConformanceRow]:
    """Run ``framework`` on the canonical cases (all, or ``selected``) and judge every output and
    gradient.

    Parameters
    ----------
    framework : {"torch", "jax"}
    selected : list of attention_ref.cases.Case, optional
        Default: every canonical case.
    progress : callable, optional
        Called with a short message before each case.

    Returns
    -------
    list of ConformanceRow

    Raises
    ------
    ImportError
        If the framework is not installed (the message names the package).
    """
    from ..adapters import UnsupportedOption

    run_sdpa, run_mha, sdpa_policy, mha_policy, sdpa_name, mha_name, low = _framework(framework)
    say = progress or (lambda msg: None)
    rows: list[ConformanceRow] = []
    for case in cases() if selected is None else selected:
        say(f"{framework}: {case}")
        data = case.build()
        policy = sdpa_policy if case.kind == "sdpa" else mha_policy
        function = sdpa_name if case.kind == "sdpa" else mha_name
        options = {**data.options, "empty_rows": policy}
        try:
            if case.kind == "sdpa":
                run = run_sdpa(**data.inputs, dout=data.cotangent, **options)
            else:
                weights = {n: a for n, a in data.inputs.items() if n.startswith(("w_", "b_"))}
                extra = {} if "bias" not in data.inputs else {"bias": data.inputs["bias"]}
                run = run_mha(
                    data.inputs["query"],
                    data.inputs["key"],
                    data.inputs["value"],
                    MultiHeadParams(**weights),
                    data.cotangent,
                    **extra,
                    **options,
                )
        except UnsupportedOption as exc:
            rows.append(ConformanceRow(case.name, function, "-", "skip", None, str(exc), policy))
            continue
        ref_data = CaseData(case, data.inputs, options, data.cotangent)
        ref = ref_data.reference()
        theirs = {
            "out": run.out,
            **{"d" + n: g for n, g in _grads_dict(case.kind, run.grads).items()},
        }
        ours = {"out": ref.out, **{"d" + n: g for n, g in ref.grads.items()}}
        base = _baseline(data, options, low) if low is not None else None
        # A gradient that is 0 in exact arithmetic (the key projection's bias) is round-off on
        # both sides: it is judged on the scale of the case's largest gradient, as (G6) does.
        grad_scale = max(
            float(np.max(np.abs(g), initial=0.0)) for n, g in ours.items() if n != "out"
        )
        for quantity, expected in ours.items():
            if quantity not in theirs:
                rows.append(
                    ConformanceRow(
                        case.name,
                        function,
                        quantity,
                        "FAIL",
                        None,
                        "the framework returned no such gradient",
                        policy,
                    )
                )
                continue
            if base is None:
                c = compare(theirs[quantity], expected, name=quantity)
                zero = quantity != "out" and c.scale <= FLOAT64_RTOL * grad_scale
                atol = FLOAT64_RTOL * grad_scale if quantity != "out" else 0.0
                ok = c.nonfinite_mismatch == 0 and c.max_abs_error <= FLOAT64_RTOL * c.scale + atol
                if zero:
                    verdict = (
                        f"float64: gradient is 0; abs error {c.max_abs_error:.1e} <= {atol:.1e}"
                    )
                else:
                    verdict = (
                        f"float64: rel {c.rel_error:.1e} <= {FLOAT64_RTOL:g}"
                        if ok
                        else f"float64: {c}"
                    )
                rows.append(
                    ConformanceRow(
                        case.name,
                        function,
                        quantity,
                        "pass" if ok else "FAIL",
                        c.rel_error,
                        verdict,
                        policy,
                    )
                )
                continue
            base_value = base.out if quantity == "out" else (base.grads or {})[quantity[1:]]
            floor = (
                None
                if quantity == "out"
                else max(noise_floor(expected, str(low)), noise_floor([grad_scale], str(low)))
            )
            r = check_budget(
                theirs[quantity],
                expected,
                base_value,
                precision=str(low),
                floor=floor,
                rtol_budget=OUTPUT_BUDGET if quantity == "out" else MIXED_PRECISION_GRADIENT_BUDGET,
                name=quantity,
            )
            zero = quantity != "out" and r.candidate.scale <= FLOAT64_RTOL * grad_scale
            verdict = (
                f"{low} budget: {'gradient is 0; ' if zero else ''}error "
                f"{r.candidate.max_abs_error:.1e} <= {r.allowed:.1e} ({r.rtol_budget:g} x baseline "
                f"{r.baseline.max_abs_error:.1e} + floor {r.floor:.1e})"
                if r.passed
                else str(r).replace("\n", " ")
            )
            rows.append(
                ConformanceRow(
                    case.name,
                    function,
                    quantity,
                    "pass" if r.passed else "FAIL",
                    r.candidate.rel_error,
                    verdict,
                    policy,
                )
            )
    return rows


#: The columns of :func:`format_rows`.
COLUMNS = (
    Column("case"),
    Column("quantity"),
    Column("rel error", "right"),
    Column("result", min_width=6),
    Column("rule / reason"),
)


def format_rows(framework: str, rows: list[ConformanceRow], *, fmt: str = "text") -> str:
    """The conformance table with a title and a closing count line.

    Parameters
    ----------
    framework : {"torch", "jax"}
        Named in the title and the count line.
    rows : list of ConformanceRow
        From :func:`run_conformance`.
    fmt : {"text", "markdown"}
        Aligned text (the default), or a Markdown table (``attention-ref compare --markdown``).

    Returns
    -------
    str

    Examples
    --------
    >>> from attention_ref.oracle.conformance import ConformanceRow, format_rows
    >>> row = ConformanceRow("plain", "sdpa", "out", "pass", 2.7e-16,
    ...                      "float64: rel 2.7e-16 <= 1e-12", "zero")
    >>> print(format_rows("torch", [row]))
    conformance of torch with attention_ref
    case   quantity  rel error  result  rule / reason
    -------------------------------------------------
    plain  out         2.7e-16  pass    float64: rel 2.7e-16 <= 1e-12
    <BLANKLINE>
    compare torch: 1 passed, 0 failed, 0 skipped (cases the framework cannot express)
    """
    cells = []
    for r in rows:
        zero = "gradient is 0" in r.verdict
        err = "" if r.error is None else ("grad = 0" if zero else f"{r.error:.1e}")
        note = r.verdict
        if r.status == "pass" and r.empty_rows != "zero":
            note += f"; empty rows: {r.empty_rows}"
        cells.append((r.case, r.quantity, err, r.status, note))
    n_pass = sum(r.status == "pass" for r in rows)
    n_fail = sum(r.status == "FAIL" for r in rows)
    n_skip = sum(r.status == "skip" for r in rows)
    count = (
        f"compare {framework}: {n_pass} passed, {n_fail} failed, {n_skip} skipped "
        "(cases the framework cannot express)"
    )
    return render_table(
        COLUMNS,
        cells,
        fmt=fmt,
        title=f"conformance of {framework} with attention_ref",
        footer=count,
    )


def main_compare(
    framework: str,
    names: list[str] | None = None,
    quiet: bool = False,
    as_json: bool = False,
    markdown: bool = False,
) -> int:
    from .cases import get_case

    start = time.perf_counter()
    progress = (
        None if quiet else (lambda msg: print(f"  running {msg} ...", file=sys.stderr, flush=True))
    )
    try:
        selected = None if not names else [get_case(n) for n in names]
        rows = run_conformance(framework, selected, progress)
    except (ImportError, ValueError) as exc:  # framework not installed, unknown case name
        print(f"attention-ref compare: {exc}", file=sys.stderr)
        return 2
    ok = not any(r.status == "FAIL" for r in rows)
    if as_json:
        print(
            json.dumps(
                {
                    "command": "compare",
                    "framework": framework,
                    "passed": ok,
                    "rows": [r.as_dict() for r in rows],
                },
                indent=1,
            )
        )
    else:
        print(format_rows(framework, rows, fmt="markdown" if markdown else "text"))
        print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if ok else 1
