"""The main job: run every backward against finite differences and print a table.

``python -m attention_ref`` (or ``attention-ref check``) runs a multi-head attention forward and
backward, and each stage's backward, on small configurations that cannot hide bugs (T != S,
H > 1, Hkv < H, Dk != Dv, batch > 1, 1-element edges), compares every gradient with a central-
difference VJP (random cotangents), then runs a directional check at a realistic size. Exit
status 1 if any check fails.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from . import attention, heads, mha, projection, stable_softmax
from .gradcheck import FD_NOISE_FACTOR, FD_RTOL, GradCheckResult, check_directional, check_vjp


class Row(NamedTuple):
    function: str
    case: str
    gradient: str
    rel_error: float  #: max|analytic - numerical| / max|numerical|
    abs_error: float  #: max|analytic - numerical|
    atol: float  #: the round-off floor of this check, (G3)
    passed: bool

    @property
    def exact_zero(self) -> bool:
        """The numerical gradient is itself within round-off of 0: a relative error means nothing."""
        return self.rel_error > 0 and self.abs_error / self.rel_error <= self.atol


def _rows(function: str, case: str, result: GradCheckResult) -> Iterator[Row]:
    for name, rep in result.reports.items():
        yield Row(function, case, "d" + name, rep.rel_error, rep.max_abs_error, result.atol,
                  rep.passed(result.rtol, result.atol))


def _sdpa_cases(rng: np.random.Generator):
    """(case name, inputs, options) for scaled dot-product attention; inputs are q, k, v[, bias]."""
    B, H, Hkv, T, S, Dk, Dv = 2, 4, 2, 3, 5, 4, 3

    def qkv(T=T, S=S, H=H, Hkv=Hkv, Dk=Dk, Dv=Dv, B=B):
        return dict(q=rng.normal(size=(B, H, T, Dk)), k=rng.normal(size=(B, Hkv, S, Dk)),
                    v=rng.normal(size=(B, Hkv, S, Dv)))

    pad = np.ones((B, 1, T, S), dtype=bool)
    pad[1, :, :, 3:] = False  # batch 1: the last two keys are padding
    pad[0, :, 1, :] = False  # batch 0: query row 1 sees nothing (an empty row)
    yield "GQA T<S Dk!=Dv", qkv(), {}
    yield "causal bottom_right T<S + bias", {**qkv(), "bias": rng.normal(size=(1, H, T, S))}, dict(causal=True, align="bottom_right")
    yield "causal top_left T>S + window", qkv(T=6, S=4), dict(causal=True, window=(2, None))
    yield "window (1,1) bottom_right", qkv(T=4, S=7), dict(window=(1, 1), align="bottom_right")
    yield "padding + empty row, zero", qkv(), dict(mask=pad)
    yield "padding + empty row, uniform", qkv(), dict(mask=pad, empty_rows="uniform")
    yield "softcap + bias (T,S)", {**qkv(), "bias": rng.normal(size=(T, S))}, dict(softcap=1.5)
    yield "dropout keep-mask", qkv(), dict(dropout_p=0.25, dropout_mask=rng.random((B, H, T, S)) >= 0.25)
    yield "MQA, 1-element edges", qkv(T=1, S=1, H=3, Hkv=1, Dk=1, Dv=1, B=1), {}


def _mha_cases(rng: np.random.Generator):
    """(case name, num_heads, num_kv_heads, query, key, value, params, options)."""
    x = rng.normal(size=(2, 4, 8))
    p = mha.init_params(rng, d_model=8, num_heads=4, num_kv_heads=2, head_dim=3, v_head_dim=5)
    yield "self-attention GQA causal", 4, 2, x, x, x, p, dict(causal=True)
    p = mha.init_params(rng, d_model=6, num_heads=2, kdim=5, vdim=7)
    keep = np.array([[True] * 5, [True, True, True, False, False]])  # key padding, per batch
    yield ("cross-attention kdim/vdim, key padding", 2, None, rng.normal(size=(2, 3, 6)),
           rng.normal(size=(2, 5, 5)), rng.normal(size=(2, 5, 7)), p, dict(mask=keep[:, None, None, :]))
    p = mha.init_params(rng, d_model=6, num_heads=3, num_kv_heads=1, bias=False, out_dim=4)
    yield ("MQA no bias, bottom_right + attn bias", 3, 1, rng.normal(size=(1, 2, 6)),
           rng.normal(size=(1, 4, 6)), rng.normal(size=(1, 4, 6)), p,
           dict(causal=True, align="bottom_right", bias=rng.normal(size=(3, 2, 4))))


def run_checks(seed: int = 0, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Run every finite-difference check of the report; return one row per gradient."""
    rng = np.random.default_rng(seed)
    say = progress or (lambda msg: None)
    rows: list[Row] = []
    inputs: dict[str, Any]
    grads: dict[str, Any]
    opts: dict[str, Any]

    say("linear")
    x, w, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5)), rng.normal(size=5)
    c = rng.normal(size=(2, 3, 5))
    g = projection.linear_backward(c, x, w, b)
    rows += _rows("linear", "(2,3,4)@(4,5)+b", check_vjp(projection.linear, {"x": x, "weight": w, "bias": b}, c,
                                                        {"x": g.dx, "weight": g.dweight, "bias": g.dbias}))
    say("split_heads / merge_heads")
    x, c = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 3, 2))
    rows += _rows("split_heads", "H=3", check_vjp(lambda x: heads.split_heads(x, 3), {"x": x}, c,
                                                  {"x": heads.split_heads_backward(c)}))
    x, c = rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(2, 4, 6))
    rows += _rows("merge_heads", "H=3", check_vjp(heads.merge_heads, {"x": x}, c,
                                                  {"x": heads.merge_heads_backward(c, 3)}))
    say("softmax / logsumexp")
    x, c = 3 * rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    rows += _rows("softmax", "axis=-1", check_vjp(stable_softmax.softmax, {"x": x}, c,
                                                  {"x": stable_softmax.softmax_backward(c, stable_softmax.softmax(x))}))
    c = rng.normal(size=(5,))
    rows += _rows("logsumexp", "axis=0", check_vjp(lambda x: stable_softmax.logsumexp(x, axis=0), {"x": x}, c,
                                                   {"x": stable_softmax.logsumexp_backward(c, x, axis=0)}))

    for case, inputs, opts in _sdpa_cases(rng):
        say(f"scaled_dot_product_attention: {case}")
        tr = attention.sdpa_forward(**inputs, **opts)
        c = rng.normal(size=tr.out.shape)
        g = attention.sdpa_backward(c, tr)
        grads = {"q": g.dq, "k": g.dk, "v": g.dv, "bias": g.dbias}
        result = check_vjp(lambda **kw: attention.scaled_dot_product_attention(**kw, **opts), inputs, c,
                           {n: grads[n] for n in inputs})
        rows += _rows("scaled_dot_product_attention", case, result)

    for case, H, Hkv, query, key, value, p, opts in _mha_cases(rng):
        say(f"multi_head_attention: {case}")
        tr = mha.mha_forward(query, key, value, p, num_heads=H, num_kv_heads=Hkv, **opts)
        c = rng.normal(size=tr.out.shape)
        g = mha.mha_backward(c, tr)
        self_attention = query is key is value
        attn_bias = opts.get("bias")
        other = {k: v for k, v in opts.items() if k != "bias"}

        def f(x=None, query=None, key=None, value=None, bias=None, **weights):
            if x is not None:
                query = key = value = x
            return mha.multi_head_attention(query, key, value, mha.MultiHeadParams(**weights),
                                            num_heads=H, num_kv_heads=Hkv, bias=bias, **other)

        inputs = {"x": query} if self_attention else {"query": query, "key": key, "value": value}
        grads = ({"x": g.dquery + g.dkey + g.dvalue} if self_attention
                 else {"query": g.dquery, "key": g.dkey, "value": g.dvalue})
        inputs.update(p.as_dict())
        grads.update(g.dparams.as_dict())
        if attn_bias is not None:
            inputs["bias"], grads["bias"] = attn_bias, g.dbias
        rows += _rows("multi_head_attention", case, check_vjp(f, inputs, c, grads))

    say("multi_head_attention: directional check at B=2 T=48 S=64 D=64 H=8 Hkv=2")
    p = mha.init_params(rng, d_model=64, num_heads=8, num_kv_heads=2, kdim=48, vdim=40)
    query, key, value = rng.normal(size=(2, 48, 64)), rng.normal(size=(2, 64, 48)), rng.normal(size=(2, 64, 40))
    opts = dict(causal=True, align="bottom_right")
    tr = mha.mha_forward(query, key, value, p, num_heads=8, num_kv_heads=2, **opts)
    c = rng.normal(size=tr.out.shape)
    g = mha.mha_backward(c, tr)

    def f_big(query, key, value, **weights):
        return mha.multi_head_attention(query, key, value, mha.MultiHeadParams(**weights),
                                        num_heads=8, num_kv_heads=2, **opts)

    result = check_directional(f_big, {"query": query, "key": key, "value": value, **p.as_dict()}, c,
                               {"query": g.dquery, "key": g.dkey, "value": g.dvalue, **g.dparams.as_dict()},
                               rng=rng, num_directions=3)
    rows += _rows("multi_head_attention", "directional, realistic size", result)
    return rows


def _error_cell(r: Row) -> str:
    return f"abs {r.abs_error:.1e} (grad = 0)" if r.exact_zero else f"{r.rel_error:.1e}"


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table with a closing count line."""
    widths = [max(len(h), *(len(getattr(r, f)) for r in rows)) for h, f in
              (("function", "function"), ("case", "case"), ("gradient", "gradient"))]
    head = (f"{'function':<{widths[0]}}  {'case':<{widths[1]}}  {'gradient':<{widths[2]}}  "
            f"{'rel error':>17}  result")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.function:<{widths[0]}}  {r.case:<{widths[1]}}  {r.gradient:<{widths[2]}}  "
                     f"{_error_cell(r):>17}  {'pass' if r.passed else 'FAIL'}")
    failed = sum(not r.passed for r in rows)
    lines.append("")
    lines.append(f"pass rule: max|analytic - numerical| <= atol + {FD_RTOL:g} * max|numerical|,")
    lines.append(f"  atol = {FD_NOISE_FACTOR:g} u ||f|| ||c|| / eps, the round-off bound of the finite difference (G3)")
    lines.append("  'abs ... (grad = 0)': the true gradient is exactly zero (e.g. the key projection's bias b_k); the error is absolute")
    lines.append(f"worst relative error (nonzero gradients): {max((r.rel_error for r in rows if not r.exact_zero), default=0):.1e}")
    lines.append(f"gradcheck: {len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)


def main_check(seed: int = 0, quiet: bool = False) -> int:
    import sys

    start = time.perf_counter()
    progress = None if quiet else (lambda msg: print(f"  checking {msg} ...", file=sys.stderr, flush=True))
    rows = run_checks(seed, progress)
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if all(r.passed for r in rows) else 1
