"""The main job: every backward against finite differences and the complex step, as a table.

``python -m attention_ref`` (or ``attention-ref check``) runs the stage backwards (linear, head
split/merge, softmax, logsumexp) and then scaled dot-product attention and multi-head attention
on every canonical case (:mod:`attention_ref.cases`), and compares each gradient with

* a central-difference VJP (G1) with a random cotangent, pass rule (G3): the independent check,
  limited to ~1e-8 by cancellation;
* the complex step (G4), pass rule (G6): exact to round-off, so it holds the backward to 1e-12.

Cases tagged ``long`` and the realistic-size run use random directions instead, (G2) and (G5).
Exit status 1 if any check fails.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from ..core import heads, mha, mods
from ..core import linear as projection
from ..core import softmax as stable_softmax
from ..variants.flex import flex_attention, flex_attention_backward
from .cases import DIFFERENTIABLE_KINDS, cases, serving_cases
from .compare import Comparison
from .gradcheck import (
    CS_RTOL,
    FD_NOISE_FACTOR,
    FD_RTOL,
    GradCheckResult,
    check_complex_step,
    check_directional,
    check_vjp,
)
from .tables import Column, json_float, render_table

#: The reference function of each kind of case, as the main job's table names it.
_FUNCTION_OF_KIND = {
    "sdpa": "scaled_dot_product_attention",
    "mha": "multi_head_attention",
    "paged": "paged_attention",
    "mla": "mla_attention_naive",
    "sparse": "sparse_attention",
}


class Row(NamedTuple):
    """One gradient of one case, checked two ways."""

    function: str
    case: str
    gradient: str
    fd: Comparison  #: analytic vs central difference
    fd_atol: float  #: round-off floor of the finite difference, (G3)
    cs: Comparison  #: analytic vs complex step
    cs_atol: float  #: round-off floor of the complex step, (G6)
    fd_passed: bool
    cs_passed: bool

    @property
    def passed(self) -> bool:
        return self.fd_passed and self.cs_passed

    @property
    def exact_zero(self) -> bool:
        """The true gradient is 0 (within the complex step's round-off): relative errors mean
        nothing."""
        return self.cs.scale <= self.cs_atol

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; a relative error that is not finite (a zero gradient) is null."""
        return {
            "function": self.function,
            "case": self.case,
            "gradient": self.gradient,
            "fd_rel_error": json_float(self.fd.rel_error),
            "fd_abs_error": self.fd.max_abs_error,
            "fd_atol": self.fd_atol,
            "cs_rel_error": json_float(self.cs.rel_error),
            "cs_abs_error": self.cs.max_abs_error,
            "cs_atol": self.cs_atol,
            "exact_zero": self.exact_zero,
            "passed": self.passed,
        }


def _rows(function: str, case: str, fd: GradCheckResult, cs: GradCheckResult) -> Iterator[Row]:
    for name, rep in fd.reports.items():
        crep = cs.reports[name]
        yield Row(
            function,
            case,
            "d" + name,
            rep,
            fd.atol,
            crep,
            cs.atol,
            rep.passed(fd.rtol, fd.atol),
            crep.passed(cs.rtol, cs.atol),
        )


def _check_both(function, case, f, inputs, c, grads, rng, directional: bool) -> list[Row]:
    if directional:
        fd = check_directional(f, inputs, c, grads, rng=rng, num_directions=3)
        cs = check_complex_step(f, inputs, c, grads, num_directions=3, rng=rng)
    else:
        fd = check_vjp(f, inputs, c, grads)
        cs = check_complex_step(f, inputs, c, grads)
    return list(_rows(function, case, fd, cs))


def _flex_checks(rng: np.random.Generator) -> list[Row]:
    """flex_attention's gradients, the score mod's parameter included: (A20)-(A22), (B7)-(B12)."""
    B, H, Hkv, T, S, E, Ev = 2, 4, 2, 5, 7, 3, 4
    configs: list[tuple[str, Callable[[np.ndarray], Any], str, np.ndarray, Any, int]] = [
        (
            "ALiBi slopes, causal bottom-right, GQA",
            lambda p: mods.ALiBi(p),
            "slopes",
            mods.alibi_slopes(H) * (1 + rng.random(H)),
            mods.CausalMask(offset=S - T),
            B,
        ),
        (
            "relative-position table, causal documents with padding (empty rows)",
            lambda p: mods.RelativePositionBias(p, S - 1),
            "table",
            rng.normal(size=(H, T + S - 1)),
            mods.and_masks(
                mods.CausalMask(offset=S - T),
                mods.DocumentMask([0, 0, 1, 1, -1], [0, 0, 0, 1, 1, 1, -1]),
            ),
            B,
        ),
        (
            "softcap then T5 buckets, prefix-LM, keys of batch 1 broadcast",
            lambda p: mods.chain_score_mods(
                mods.SoftCap(2.0), mods.T5RelativeBias(p, max_distance=4)
            ),
            "1.table",
            rng.normal(size=(H, 8)),
            mods.PrefixLMMask([2, 3]),
            1,
        ),
    ]
    rows: list[Row] = []
    for case, make, name, param, mask_mod, Bkv in configs:
        q = rng.normal(size=(B, H, T, E))
        k, v = rng.normal(size=(Bkv, Hkv, S, E)), rng.normal(size=(Bkv, Hkv, S, Ev))
        c = rng.normal(size=(B, H, T, Ev))

        def f(q, k, v, param, make=make, mask_mod=mask_mod):
            return flex_attention(
                q, k, v, score_mod=make(param), mask_mod=mask_mod, enable_gqa=True
            )

        g = flex_attention_backward(
            c, q, k, v, score_mod=make(param), mask_mod=mask_mod, enable_gqa=True
        )
        inputs = {"q": q, "k": k, "v": v, "param": param}
        dparams = g.dscore_mod or {}  # flex_attention_backward always gives the dict
        grads = {"q": g.dq, "k": g.dk, "v": g.dv, "param": dparams[name]}
        for row in _check_both("flex_attention", case, f, inputs, c, grads, rng, False):
            rows.append(row._replace(gradient=f"d{name}") if row.gradient == "dparam" else row)
    return rows


def run_checks(
    seed: int = 0, progress: Callable[[str], None] | None = None, *, quick: bool = False
) -> list[Row]:
    """Run every check of the report; one row per gradient.

    ``seed`` 0 uses the canonical instance of each case; another seed draws other inputs for the
    same configurations. ``quick`` leaves out the long cases and the realistic-size run.
    """
    rng = np.random.default_rng(seed)
    say = progress or (lambda msg: None)
    rows: list[Row] = []

    say("stages: linear, split_heads, merge_heads, softmax, logsumexp")
    x, w, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5)), rng.normal(size=5)
    c = rng.normal(size=(2, 3, 5))
    g = projection.linear_backward(c, x, w, b)
    rows += _check_both(
        "linear",
        "(2,3,4)@(4,5)+b",
        projection.linear,
        {"x": x, "weight": w, "bias": b},
        c,
        {"x": g.dx, "weight": g.dweight, "bias": g.dbias},
        rng,
        False,
    )
    x, c = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 3, 2))
    rows += _check_both(
        "split_heads",
        "H=3",
        lambda x: heads.split_heads(x, 3),
        {"x": x},
        c,
        {"x": heads.split_heads_backward(c)},
        rng,
        False,
    )
    x, c = rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(2, 4, 6))
    rows += _check_both(
        "merge_heads",
        "H=3",
        heads.merge_heads,
        {"x": x},
        c,
        {"x": heads.merge_heads_backward(c, 3)},
        rng,
        False,
    )
    x, c = 3 * rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    rows += _check_both(
        "softmax",
        "axis=-1",
        stable_softmax.softmax,
        {"x": x},
        c,
        {"x": stable_softmax.softmax_backward(c, stable_softmax.softmax(x))},
        rng,
        False,
    )
    c = rng.normal(size=(5,))
    rows += _check_both(
        "logsumexp",
        "axis=0",
        lambda x: stable_softmax.logsumexp(x, axis=0),
        {"x": x},
        c,
        {"x": stable_softmax.logsumexp_backward(c, x, axis=0)},
        rng,
        False,
    )

    serving = [c for c in serving_cases() if c.kind in DIFFERENTIABLE_KINDS]
    for case in cases(exclude=("long",) if quick else ()) + serving:
        function = _FUNCTION_OF_KIND[case.kind]
        say(f"{function}: {case}")
        data = case.build(None if seed == 0 else seed)
        ref = data.reference()
        rows += _check_both(
            function,
            case.name,
            data.function(),
            data.inputs,
            data.cotangent,
            ref.grads,
            rng,
            "long" in case.tags,
        )

    say("flex_attention: score mods with their parameters, mask mods")
    rows += _flex_checks(rng)

    if not quick:
        say("multi_head_attention: directional check at B=2 T=48 S=64 D=64 H=8 Hkv=2")
        p = mha.init_params(rng, d_model=64, num_heads=8, num_kv_heads=2, kdim=48, vdim=40)
        query, key, value = (
            rng.normal(size=(2, 48, 64)),
            rng.normal(size=(2, 64, 48)),
            rng.normal(size=(2, 64, 40)),
        )
        opts: dict[str, Any] = dict(causal=True, align="bottom_right")
        tr = mha.mha_forward(query, key, value, p, num_heads=8, num_kv_heads=2, **opts)
        c = rng.normal(size=tr.out.shape)
        g = mha.mha_backward(c, tr)

        def f_big(query, key, value, **weights):
            return mha.multi_head_attention(
                query,
                key,
                value,
                mha.MultiHeadParams(**weights),
                num_heads=8,
                num_kv_heads=2,
                **opts,
            )

        rows += _check_both(
            "multi_head_attention",
            "directional, B=2 T=48 S=64 D=64 H=8 Hkv=2",
            f_big,
            {"query": query, "key": key, "value": value, **p.as_dict()},
            c,
            g.as_dict(),
            rng,
            True,
        )
    return rows


def _cell(rep: Comparison, exact_zero: bool) -> str:
    return f"abs {rep.max_abs_error:.1e}" if exact_zero else f"{rep.rel_error:.1e}"


#: The columns of :func:`format_table`; the two errors are right-aligned, 12 wide.
COLUMNS = (
    Column("function"),
    Column("case"),
    Column("gradient"),
    Column("finite diff", "right", 12),
    Column("complex step", "right", 12),
    Column("result"),
)


def format_table(rows: list[Row], *, fmt: str = "text") -> str:
    """The rows as a table with the pass rules and a closing count line.

    Parameters
    ----------
    rows : list of Row
        From :func:`run_checks`.
    fmt : {"text", "markdown"}
        Aligned text (the default), or a Markdown table (``attention-ref check --markdown``);
        the lines below the table are the same in both.

    Returns
    -------
    str

    Examples
    --------
    >>> from attention_ref.gradcheck import error_report
    >>> from attention_ref.oracle.check import Row, format_table
    >>> rep = error_report([1.0, 2.0], [1.0, 2.0 + 1e-13])
    >>> row = Row("softmax", "axis=-1", "dx", rep, 1e-8, rep, 1e-12, True, True)
    >>> print(format_table([row], fmt="markdown").splitlines()[2])
    | softmax  | axis=-1 | dx       |     5.0e-14 |      5.0e-14 | pass   |
    """
    cells = [
        (
            r.function,
            r.case,
            r.gradient,
            _cell(r.fd, r.exact_zero),
            _cell(r.cs, r.exact_zero),
            "pass" if r.passed else "FAIL",
        )
        for r in rows
    ]
    failed = sum(not r.passed for r in rows)
    nonzero = [r for r in rows if not r.exact_zero]
    worst_fd = max((r.fd.rel_error for r in nonzero), default=0)
    worst_cs = max((r.cs.rel_error for r in nonzero), default=0)
    footer = [
        "errors: max|analytic - numerical| / max|numerical|; 'abs': the true gradient is exactly 0",
        "  (e.g. the key projection's bias b_k, or a softmax over one key), so the error is "
        "absolute.",
        f"finite diff (G1) passes when max|diff| <= {FD_RTOL:g} max|numerical| + atol, "
        f"atol = {FD_NOISE_FACTOR:g} u ||f|| ||c|| / eps (G3)",
        f"complex step (G4) passes when max|diff| <= {CS_RTOL:g} max|numerical| + atol, "
        f"atol = {CS_RTOL:g} x the check's largest gradient (G6)",
        f"worst relative error, nonzero gradients: finite diff {worst_fd:.1e}, "
        f"complex step {worst_cs:.1e}",
        f"gradcheck: {len(rows) - failed} passed, {failed} failed",
    ]
    return render_table(COLUMNS, cells, fmt=fmt, footer=footer)


def main_check(
    seed: int = 0,
    quiet: bool = False,
    as_json: bool = False,
    quick: bool = False,
    markdown: bool = False,
) -> int:
    """``attention-ref check``: run the checks and print the table; returns the exit status."""
    start = time.perf_counter()
    progress = (
        None if quiet else (lambda msg: print(f"  checking {msg} ...", file=sys.stderr, flush=True))
    )
    rows = run_checks(seed, progress, quick=quick)
    ok = all(r.passed for r in rows)
    if as_json:
        print(
            json.dumps(
                {
                    "command": "check",
                    "seed": seed,
                    "passed": ok,
                    "rows": [r.as_dict() for r in rows],
                },
                indent=1,
            )
        )
    else:
        print(format_table(rows, fmt="markdown" if markdown else "text"))
        print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if ok else 1
