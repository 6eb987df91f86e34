"""The exact (mpmath) reference, and the float64 and float32 paths measured against it.

1. The exact backward is checked against mpmath central differences at 60 digits (step 1e-20,
   error ~1e-40), on an SDPA case with every option that changes the gradient and on an MHA case;
   the check resolves an error of 1e-20 relative, far below float64's rounding.
2. The exact forward is checked against a closed form computed directly with mpmath, and its
   fully masked rows against the conventions.
3. The float64 path (``sdpa_forward``/``sdpa_backward``, ``mha_forward``/``mha_backward``) is
   measured against it in units of float64 eps, ``max|ours - exact| / (eps * max|exact|)``, per
   quantity, on small configurations covering the options; the error must stay below a bound set
   by the reduction lengths, and a deliberately perturbed result (scale x (1 + 1e-12)) must not.
   The same for ``dtype=np.float32`` in units of float32 eps.
4. Argument checks, the size limits, the lazy import, the rounding, and the docs page's examples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import mpmath  # the [exact] extra; the test extra installs it
import numpy as np
import pytest

import attention_ref as ar
from attention_ref import AttentionOptions
from attention_ref.cases import cases as canonical_cases
from attention_ref.oracle import exact
from attention_ref.oracle.exact import exact_mha, exact_sdpa

ROOT = Path(__file__).resolve().parents[1]
EPS = {np.float64: float(np.finfo(np.float64).eps), np.float32: float(np.finfo(np.float32).eps)}
#: Working precision of the measurements: 30 digits leave 14 beyond float64's.
DPS = 30
#: The relative perturbation of the scale that stands in for a wrong result, per precision:
#: 1e-12 is 4500 float64 eps, 1e-4 is 840 float32 eps, both far above any bound below.
PERTURBATION = {np.float64: 1e-12, np.float32: 1e-4}
#: Factor on the reduction length in the error bound (see `error_bound`).
BOUND_FACTOR = 1.0
#: Gradients that are 0 in exact arithmetic, measured against a related gradient's size instead:
#: a key-projection bias shifts every score of a softmax row by the same q . b_k, and softmax is
#: shift-invariant, so db_k = 0 (the exact reference returns it at its rounding level, ~1e-47).
SCALE_OF = {"b_k": "w_k"}
#: Quantities that do not depend on the score scale, so a wrong scale cannot move them: db_o is
#: the sum of dout, and db_v the sum of dout weighted by each row's total weight, 1 (no
#: dropout or empty rows in the MHA configurations); db_k is 0.
SCALE_INDEPENDENT = {"b_k", "b_v", "b_o"}

# ----------------------------------------------------------------------------- measuring


def eps_error(actual: Any, expected: Any, eps: float, scale: float | None = None) -> float:
    """``max|actual - expected| / (eps * max|expected|)`` over the finite entries.

    The non-finite entries (NaN rows of ``empty_rows="nan"``, -inf logsumexp of empty rows) must
    agree exactly; they are left out of the error. ``scale`` replaces ``max|expected|``.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    finite = np.isfinite(e)
    assert np.array_equal(np.isnan(a), np.isnan(e)), "NaN patterns differ"
    assert np.array_equal(a[~finite & ~np.isnan(e)], e[~finite & ~np.isnan(e)]), "infinities differ"
    if scale is None:
        scale = float(np.abs(e[finite]).max(initial=0.0))
    diff = float(np.abs(a[finite] - e[finite]).max(initial=0.0))
    if diff == 0:
        return 0.0
    return diff / (eps * scale) if scale > 0 else math.inf


def f32_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 values held in float64: the float32 path sees the same numbers."""
    return rng.normal(size=shape).astype(np.float32).astype(np.float64)


class Config(NamedTuple):
    name: str
    kind: str  # "sdpa" or "mha"
    inputs: dict[str, Any]  # q, k, v (SDPA) or query, key, value, params (MHA)
    dout: np.ndarray
    options: dict[str, Any]  # the attention options (and num_heads / num_kv_heads for MHA)
    reduction_length: (
        int  # the summed lengths of the reductions on the longest path, see error_bound
    )


def error_bound(config: Config) -> float:
    """The asserted bound on every quantity's error, in eps of the precision measured.

    A float dot product of length n errs by at most about n/2 eps relative to the sum of its
    terms' magnitudes (gamma_n, with eps = 2u); errors of successive stages add. The longest
    chain of reductions that one gradient passes through is ``config.reduction_length`` (computed
    per configuration below); exp, log, tanh and the products add a few roundings of their own,
    covered by not halving. With inputs of order 1 and no strong cancellation the sum of
    magnitudes is of the order of the result's largest entry, so ``BOUND_FACTOR *
    reduction_length`` eps bounds the error relative to ``max|exact|``. The measured errors sit
    well below it (their signs do not align), docs/exact.md lists them.
    """
    return BOUND_FACTOR * config.reduction_length


def sdpa_reduction_length(B, H, Hkv, T, S, Dk, Dv) -> int:
    """Scores (Dk), dP (Dv), the softmax sum and its backward's row sum (S each), dq (S), and
    dk / dv over the group's query heads and positions (G*T), dbias over the batch (B)."""
    return Dk + Dv + 3 * S + max(H // Hkv * T, B)


def sdpa_config(
    name: str,
    seed: int,
    dims: dict[str, int],
    options: Callable[[np.random.Generator, dict[str, int]], dict[str, Any]],
) -> Config:
    rng = np.random.default_rng(seed)
    d = {"B": 2, "H": 4, "Hkv": 2, "T": 3, "S": 5, "Dk": 4, "Dv": 3, **dims}
    B, H, Hkv, T, S, Dk, Dv = (d[n] for n in ("B", "H", "Hkv", "T", "S", "Dk", "Dv"))
    inputs = {
        "q": f32_values(rng, (B, H, T, Dk)),
        "k": f32_values(rng, (B, Hkv, S, Dk)),
        "v": f32_values(rng, (B, Hkv, S, Dv)),
    }
    dout = f32_values(rng, (B, H, T, Dv))
    return Config(
        name, "sdpa", inputs, dout, options(rng, d), sdpa_reduction_length(B, H, Hkv, T, S, Dk, Dv)
    )


def padding_mask(B: int, T: int, S: int) -> np.ndarray:
    """(B, 1, T, S): batch 1 has two padding keys; batch 0's query row 1 sees no key (empty row)."""
    m = np.ones((B, 1, T, S), dtype=bool)
    m[1, :, :, S - 2 :] = False
    m[0, :, 1, :] = False
    return m


def neg_inf_bias(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    b = f32_values(rng, shape)
    b.reshape(-1)[1] = -np.inf  # one pair masked by the bias
    return b


#: (name, seed, shape overrides, options builder). Defaults B=2, H=4, Hkv=2, T=3, S=5, Dk=4, Dv=3.
SDPA_SPECS: list[
    tuple[str, int, dict[str, int], Callable[[np.random.Generator, dict[str, int]], dict[str, Any]]]
] = [
    ("GQA", 1, {}, lambda rng, d: {}),
    (
        "bias (H,T,S) + softcap",
        2,
        {},
        lambda rng, d: {"bias": f32_values(rng, (d["H"], d["T"], d["S"])), "softcap": 1.5},
    ),
    ("causal top_left", 3, {}, lambda rng, d: {"causal": True}),
    (
        "causal bottom_right, T>S (empty rows)",
        4,
        {"T": 5, "S": 3},
        lambda rng, d: {"causal": True, "align": "bottom_right"},
    ),
    (
        "padding, empty row zero",
        5,
        {},
        lambda rng, d: {"mask": padding_mask(d["B"], d["T"], d["S"])},
    ),
    (
        "padding, empty row uniform",
        6,
        {},
        lambda rng, d: {"mask": padding_mask(d["B"], d["T"], d["S"]), "empty_rows": "uniform"},
    ),
    (
        "padding, empty row nan",
        8,
        {},
        lambda rng, d: {"mask": padding_mask(d["B"], d["T"], d["S"]), "empty_rows": "nan"},
    ),
    (
        "dropout keep-mask + bias with -inf",
        7,
        {},
        lambda rng, d: {
            "dropout_p": 0.25,
            "dropout_mask": rng.random((d["B"], d["H"], d["T"], d["S"])) >= 0.25,
            "bias": neg_inf_bias(rng, (d["B"], 1, d["T"], d["S"])),
        },
    ),
]


def f32_params(rng: np.random.Generator, **kwargs: Any) -> ar.MultiHeadParams:
    p = ar.init_params(rng, **kwargs)
    return ar.MultiHeadParams(
        **{n: w.astype(np.float32).astype(np.float64) for n, w in p.as_dict().items()}
    )


def mha_reduction_length(B, H, Hkv, T, S, D_in, Dk, Dv, D_out) -> int:
    """The attention's chain, plus the input projection (D_in), the output projection (H*Dv) and
    its backward (D_out), and the weight gradients' sum over the positions (B*max(T, S))."""
    return sdpa_reduction_length(B, H, Hkv, T, S, Dk, Dv) + D_in + H * Dv + D_out + B * max(T, S)


def mha_self_config(seed: int) -> Config:
    rng = np.random.default_rng(seed)
    B, T, D, H, Dk, Dv = 2, 4, 6, 2, 3, 2
    x = f32_values(rng, (B, T, D))
    p = f32_params(rng, d_model=D, num_heads=H, head_dim=Dk, v_head_dim=Dv)
    return Config(
        "MHA self-attention, causal",
        "mha",
        {"query": x, "key": x, "value": x, "params": p},
        f32_values(rng, (B, T, D)),
        {"num_heads": H, "causal": True},
        mha_reduction_length(B, H, H, T, T, D, Dk, Dv, D),
    )


def mha_cross_config(seed: int) -> Config:
    rng = np.random.default_rng(seed)
    B, T, S, D, H, Hkv, Dk, Dv, Dk_in, Dv_in = 2, 3, 5, 6, 4, 2, 2, 3, 5, 4
    p = f32_params(
        rng,
        d_model=D,
        num_heads=H,
        num_kv_heads=Hkv,
        head_dim=Dk,
        v_head_dim=Dv,
        kdim=Dk_in,
        vdim=Dv_in,
    )
    inputs = {
        "query": f32_values(rng, (B, T, D)),
        "key": f32_values(rng, (B, S, Dk_in)),
        "value": f32_values(rng, (B, S, Dv_in)),
        "params": p,
    }
    key_padding = np.ones((B, 1, 1, S), dtype=bool)
    key_padding[1, ..., S - 2 :] = False
    options = {
        "num_heads": H,
        "num_kv_heads": Hkv,
        "bias": f32_values(rng, (H, T, S)),
        "mask": key_padding,
    }
    return Config(
        "MHA cross-attention, GQA, kdim/vdim, bias, key padding",
        "mha",
        inputs,
        f32_values(rng, (B, T, D)),
        options,
        mha_reduction_length(B, H, Hkv, T, S, Dk_in, Dk, Dv, D),
    )


def make_configs(draw: int = 0) -> dict[str, Config]:
    """Every configuration, by name; ``draw`` > 0 draws other inputs for the same configurations
    (the tests use draw 0; docs/exact.md reports the worst over draws 0-19)."""
    configs = [
        sdpa_config(name, seed + 1000 * draw, dims, options)
        for name, seed, dims, options in SDPA_SPECS
    ]
    configs += [mha_self_config(11 + 1000 * draw), mha_cross_config(12 + 1000 * draw)]
    return {c.name: c for c in configs}


CONFIGS = make_configs()


def exact_quantities(c: Config) -> dict[str, np.ndarray]:
    """The exact quantities of one configuration, by name."""
    if c.kind == "sdpa":
        ex = exact_sdpa(**c.inputs, dout=c.dout, **c.options, dps=DPS)
        return {n: x for n, x in ex._asdict().items() if x is not None}
    m = exact_mha(**c.inputs, dout=c.dout, **c.options, dps=DPS)
    out = {
        "out": m.out,
        "probs": m.probs,
        "logsumexp": m.logsumexp,
        "dquery": m.dquery,
        "dkey": m.dkey,
        "dvalue": m.dvalue,
        **m.dparams.as_dict(),
    }
    if m.dbias is not None:
        out["dbias"] = m.dbias
    return out


def library_result(c: Config, dtype: Any, scale_factor: float = 1.0) -> dict[str, np.ndarray]:
    """The library's quantities (trace + backward) at ``dtype``, with the scale times
    ``scale_factor``."""
    options = dict(c.options)
    if scale_factor != 1.0:
        Dk = (
            c.inputs["q"].shape[-1]
            if c.kind == "sdpa"
            else c.inputs["params"].w_q.shape[1] // options["num_heads"]
        )
        options["scale"] = options.get("scale", 1.0 / math.sqrt(Dk)) * scale_factor
    if c.kind == "sdpa":
        tr = ar.sdpa_forward(**c.inputs, **options, dtype=dtype)
        g = ar.sdpa_backward(c.dout, tr)
        res = {
            "out": tr.out,
            "probs": tr.probs,
            "logsumexp": tr.logsumexp,
            "dq": g.dq,
            "dk": g.dk,
            "dv": g.dv,
        }
        if g.dbias is not None:
            res["dbias"] = g.dbias
        return res
    mt = ar.mha_forward(**c.inputs, **options, dtype=dtype)
    mg = ar.mha_backward(c.dout, mt)
    res = {
        "out": mt.out,
        "probs": mt.attention.probs,
        "logsumexp": mt.attention.logsumexp,
        "dquery": mg.dquery,
        "dkey": mg.dkey,
        "dvalue": mg.dvalue,
        **mg.dparams.as_dict(),
    }
    if mg.dbias is not None:
        res["dbias"] = mg.dbias
    return res


@functools.lru_cache(maxsize=None)
def exact_result(name: str) -> dict[str, np.ndarray]:
    """The exact quantities of one of CONFIGS (computed once per test session)."""
    return exact_quantities(CONFIGS[name])


def errors_in_eps(
    c: Config, ex: dict[str, np.ndarray], dtype: Any, scale_factor: float = 1.0
) -> dict[str, float]:
    """Each quantity's error in eps of ``dtype`` against the exact result ``ex``."""
    ours = library_result(c, dtype, scale_factor)
    assert set(ours) == set(ex), (sorted(ours), sorted(ex))
    return {
        q: eps_error(
            ours[q],
            ex[q],
            EPS[dtype],
            scale=float(np.abs(ex[SCALE_OF[q]]).max()) if q in SCALE_OF else None,
        )
        for q in ex
    }


def measure(name: str, dtype: Any, scale_factor: float = 1.0) -> dict[str, float]:
    return errors_in_eps(CONFIGS[name], exact_result(name), dtype, scale_factor)


# --------------------------------------------------------------------------- 3. the measured errors


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_error_against_exact_is_within_the_bound(name, dtype):
    bound = error_bound(CONFIGS[name])
    errors = measure(name, dtype)
    over = {q: round(e, 2) for q, e in errors.items() if not e <= bound}
    assert not over, f"{name}: errors over the bound {bound} eps: {over}"
    assert max(errors.values()) > 0  # the measurement sees rounding at all


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_perturbed_result_exceeds_the_bound(name, dtype):
    """The check can fail: the scale off by 1e-12 (float64) or 1e-4 (float32) relative."""
    bound = error_bound(CONFIGS[name])
    errors = measure(name, dtype, scale_factor=1.0 + PERTURBATION[dtype])
    under = {q: round(e, 2) for q, e in errors.items() if e <= bound and q not in SCALE_INDEPENDENT}
    assert not under, f"{name}: a wrong scale passes the bound {bound} eps for {under}"


def canonical_config(case: Any) -> Config:
    """A canonical case of :mod:`attention_ref.cases` (float64 inputs) as a Config."""
    data = case.build()
    d = case.dims
    options = dict(data.options)
    if case.kind == "sdpa":
        return Config(
            case.name,
            "sdpa",
            dict(data.inputs),
            data.cotangent,
            options,
            sdpa_reduction_length(d["B"], d["H"], d["Hkv"], d["T"], d["S"], d["Dk"], d["Dv"]),
        )
    inputs = dict(data.inputs)
    weights = {
        n: inputs.pop(n)
        for n in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")
        if n in inputs
    }
    if "bias" in inputs:
        options["bias"] = inputs.pop("bias")
    inputs["params"] = ar.MultiHeadParams(**weights)
    return Config(
        case.name,
        "mha",
        inputs,
        data.cotangent,
        options,
        mha_reduction_length(
            d["B"],
            d["H"],
            d["Hkv"],
            d["T"],
            d["S"],
            max(d["D"], d["Dk_in"], d["Dv_in"]),
            d["Dk"],
            d["Dv"],
            d["D_out"],
        ),
    )


@pytest.mark.parametrize("case", canonical_cases(), ids=str)
def test_canonical_cases_float64_error_within_the_bound(case):
    """Every canonical case (attention_ref.cases) in float64, against the exact result."""
    c = canonical_config(case)
    bound = error_bound(c)
    errors = errors_in_eps(c, exact_quantities(c), np.float64)
    over = {q: round(e, 2) for q, e in errors.items() if not e <= bound}
    assert not over, f"{case}: errors over the bound {bound} eps: {over}"


# ---------------------------------------------------------------------------- 1. the exact backward

#: Digits and step of the central differences that check the exact backward. The difference
#: (phi(x + h t) - phi(x - h t)) / 2h errs by h^2 |phi'''| / 6 ~ 1e-40 (truncation) plus
#: 10^-60 |phi| / h ~ 1e-40 (rounding), for phi = <dout, out> of order 1.
FD_DPS = 60
FD_STEP = "1e-20"
#: Agreement required, relative to sum_i |t_i g_i|: 1e-30 leaves 10 digits of margin over the
#: error above, and is 14 orders of magnitude below float64's rounding.
FD_RTOL = 1e-30
#: The relative error the check must detect (`test_the_mp_check_detects_an_error_of_1e_20`).
FD_DETECTS = 1e-20


def fd_sdpa_case() -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """Every option that changes the gradient: GQA, bias (broadcast, with a -inf), softcap, a
    padding mask with an empty row under "uniform", a dropout keep-mask; T != S, Dk != Dv, B > 1."""
    rng = np.random.default_rng(21)
    B, H, Hkv, T, S, Dk, Dv = 2, 4, 2, 3, 5, 4, 3
    inputs = {
        "q": rng.normal(size=(B, H, T, Dk)),
        "k": rng.normal(size=(B, Hkv, S, Dk)),
        "v": rng.normal(size=(B, Hkv, S, Dv)),
    }
    options = {
        "bias": neg_inf_bias(rng, (B, 1, T, S)),
        "softcap": 1.5,
        "mask": padding_mask(B, T, S),
        "empty_rows": "uniform",
        "dropout_p": 0.25,
        "dropout_mask": rng.random((B, H, T, S)) >= 0.25,
    }
    return inputs, rng.normal(size=(B, H, T, Dv)), options


class Directional(NamedTuple):
    fd: Any  # mp central difference of <dout, out> along t
    analytic: Any  # <t, gradient> from the exact backward, in mp
    scale: Any  # sum |t_i g_i|


def directional(
    ctx: Any, phi: Callable[[Any], Any], x: np.ndarray, grad: np.ndarray, rng: np.random.Generator
) -> Directional:
    """Central difference of ``phi`` at ``x`` along a random ``t``, and ``<t, grad>``."""
    t = exact._to_mp(ctx, rng.normal(size=x.shape))
    h = ctx.mpf(FD_STEP)
    fd = (phi(x + h * t) - phi(x - h * t)) / (2 * h)
    products = [ti * gi for ti, gi in zip(t.ravel(), grad.ravel(), strict=True)]
    return Directional(fd, ctx.fsum(products), ctx.fsum(abs(p) for p in products))


def sdpa_directionals() -> dict[str, Directional]:
    inputs, dout, options = fd_sdpa_case()
    ctx, a, dout_mp, _ = exact._prepare_sdpa(
        **inputs, dout=dout, dps=FD_DPS, given=AttentionOptions(**options)
    )
    _, grads = exact._sdpa_mp(ctx, a, dout_mp)
    rng = np.random.default_rng(22)

    def phi_of(name: str) -> Callable[[Any], Any]:
        return lambda x: ctx.fdot(
            dout_mp.ravel(), exact._attention_forward(ctx, a._replace(**{name: x})).out.ravel()
        )

    return {
        name: directional(ctx, phi_of(name), getattr(a, name), g, rng)
        for name, g in zip(("q", "k", "v", "bias"), grads[:4], strict=True)
    }


def mha_directionals() -> dict[str, Directional]:
    """The cross-attention configuration plus a soft-cap (which makes db_k nonzero: the key
    bias's shift of a row's scores no longer cancels) and a dropout keep-mask."""
    c = CONFIGS["MHA cross-attention, GQA, kdim/vdim, bias, key padding"]
    keep = np.random.default_rng(23).random((2, 4, 3, 5)) >= 0.5  # (B, H, T, S)
    given = AttentionOptions.of(
        **{n: x for n, x in c.options.items() if n in AttentionOptions.names()},
        softcap=2.0,
        dropout_p=0.5,
        dropout_mask=keep,
    )
    heads = {n: x for n, x in c.options.items() if n not in AttentionOptions.names()}
    ctx, m, dout_mp, _ = exact._prepare_mha(
        **c.inputs, dout=c.dout, dps=FD_DPS, **heads, given=given
    )
    r = exact._mha_mp(ctx, m, dout_mp)
    rng = np.random.default_rng(24)

    def phi(m2: Any) -> Any:
        return ctx.fdot(dout_mp.ravel(), exact._mha_mp(ctx, m2, None).out.ravel())

    result = {
        name: directional(
            ctx, lambda x, n=name: phi(m._replace(**{n: x})), getattr(m, name), g, rng
        )
        for name, g in (("query", r.dquery), ("key", r.dkey), ("value", r.dvalue))
    }
    for name, g in r.dparams.as_dict().items():
        result[name] = directional(
            ctx,
            lambda x, n=name: phi(m._replace(params=dataclasses.replace(m.params, **{n: x}))),
            getattr(m.params, name),
            g,
            rng,
        )
    result["bias"] = directional(
        ctx,
        lambda x: phi(m._replace(attention=m.attention._replace(bias=x))),
        m.attention.bias,
        r.dbias,
        rng,
    )
    return result


@functools.lru_cache(maxsize=None)
def directionals(kind: str) -> dict[str, Directional]:
    return sdpa_directionals() if kind == "sdpa" else mha_directionals()


@pytest.mark.parametrize("kind", ["sdpa", "mha"])
def test_exact_backward_matches_mp_central_differences(kind):
    results = directionals(kind)
    expected = {
        "sdpa": {"q", "k", "v", "bias"},
        "mha": {
            "query",
            "key",
            "value",
            "bias",
            "w_q",
            "w_k",
            "w_v",
            "w_o",
            "b_q",
            "b_k",
            "b_v",
            "b_o",
        },
    }
    assert set(results) == expected[kind]
    bad = {
        n: mpmath.nstr(abs(r.fd - r.analytic) / r.scale, 3)
        for n, r in results.items()
        if not abs(r.fd - r.analytic) <= FD_RTOL * r.scale
    }
    assert not bad, (
        f"exact backward vs mp central differences, relative error over {FD_RTOL}: {bad}"
    )


@pytest.mark.parametrize("kind", ["sdpa", "mha"])
def test_the_mp_check_detects_an_error_of_1e_20(kind):
    """A gradient off by 1e-20 relative (10^4 below float64's rounding) fails the check above."""
    for name, r in directionals(kind).items():
        wrong = r.analytic + r.analytic * FD_DETECTS  # (not * (1 + 1e-20): that float is 1.0)
        assert abs(r.fd - wrong) > FD_RTOL * r.scale, name


# ----------------------------------------------------------------------------- 2. closed forms


def test_forward_matches_a_closed_form_with_two_keys():
    """S = 2: the softmax is the logistic function; every result is correctly rounded."""
    q, k, v = (
        np.array([[[0.7]]]),
        np.array([[[1.3], [-0.4]]]),
        np.array([[[2.0, -1.0], [0.5, 3.0]]]),
    )
    bias, cap, scale = np.array([0.25, -0.5]), 0.9, 1.7
    ex = exact_sdpa(q, k, v, bias=bias, softcap=cap, scale=scale)
    with mpmath.workdps(60):
        mf = mpmath.mpf
        logits = [
            mf(cap) * mpmath.tanh(mf(scale) * mf(0.7) * mf(kj) / mf(cap)) + mf(b)
            for kj, b in ((1.3, 0.25), (-0.4, -0.5))
        ]
        p0 = 1 / (1 + mpmath.exp(logits[1] - logits[0]))
        out = [p0 * mf(2.0) + (1 - p0) * mf(0.5), p0 * mf(-1.0) + (1 - p0) * mf(3.0)]
        lse = mpmath.log(mpmath.exp(logits[0]) + mpmath.exp(logits[1]))
        expected_out, expected_p = [float(x) for x in out], [float(p0), float(1 - p0)]
        expected_lse = float(lse)
    assert ex.out.ravel().tolist() == expected_out
    assert ex.probs.ravel().tolist() == expected_p
    assert ex.logsumexp.ravel().tolist() == [expected_lse]


def test_empty_row_policies_follow_the_conventions():
    rng = np.random.default_rng(31)
    q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(1, 2, 4)), rng.normal(size=(1, 2, 3))
    dout = rng.normal(size=(2, 3, 3))
    opts = {"causal": True, "align": "bottom_right"}  # T=3 > S=2: query row 0 sees no key
    zero = exact_sdpa(q, k, v, dout, **opts)
    assert (
        np.all(zero.out[:, 0] == 0)
        and np.all(zero.probs[:, 0] == 0)
        and np.all(zero.logsumexp[:, 0] == -np.inf)
    )
    assert np.all(zero.dq[:, 0] == 0)
    uniform = exact_sdpa(q, k, v, dout, empty_rows="uniform", **opts)
    assert np.all(uniform.probs[:, 0] == 0.5)
    np.testing.assert_allclose(
        uniform.out[:, 0], np.broadcast_to(v[0].mean(axis=0), (2, 3)), rtol=1e-15
    )
    nan = exact_sdpa(q, k, v, dout, empty_rows="nan", **opts)
    assert np.isnan(nan.out[:, 0]).all() and np.isnan(nan.dv).all()
    assert np.isfinite(nan.dq).all() and np.isfinite(nan.dk).all()


# ----------------------------------------------------------------------------- 4. the interface


def small_inputs(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """q (H=2, T=3, Dk=4), k (Hkv=1, S=5, Dk), v (Hkv, S, Dv=2), dout (H, T, Dv)."""
    return (
        rng.normal(size=(2, 3, 4)),
        rng.normal(size=(1, 5, 4)),
        rng.normal(size=(1, 5, 2)),
        rng.normal(size=(2, 3, 2)),
    )


@pytest.mark.parametrize(
    "args, error, words",
    [
        (
            dict(
                q=np.zeros((1, 400, 1)), k=np.zeros((1, 300, 1)), v=np.zeros((1, 300, 1)), dout=None
            ),
            ValueError,
            ("MAX_SCORES", "120000"),
        ),
        (
            dict(
                q=np.zeros((1, 10, 15000)),
                k=np.zeros((1, 10, 15000)),
                v=np.zeros((1, 10, 1)),
                dout=None,
            ),
            ValueError,
            ("MAX_MULTIPLY_ADDS", "1500100"),
        ),
        (dict(dps=10), ValueError, ("dps", "10")),
        (dict(dps=50.0), TypeError, ("dps",)),
        (
            dict(dropout_p=0.5, dropout_mask=np.random.default_rng(0)),
            TypeError,
            ("dropout_mask", "Generator"),
        ),
        (dict(dout=np.zeros((2, 3, 3))), ValueError, ("dout", "(2, 3, 2)", "(2, 3, 3)")),
        (dict(q=np.zeros((2, 3, 4), dtype=complex)), TypeError, ("q", "real", "complex128")),
        (dict(align="bottom-right"), ValueError, ("align", "bottom-right")),
        (
            dict(mask=np.zeros((3, 5), dtype=bool), empty_rows="raise"),
            ValueError,
            ("empty_rows='raise'",),
        ),
    ],
)
def test_exact_sdpa_rejects_bad_arguments(rng, args, error, words):
    q, k, v, dout = small_inputs(rng)
    kwargs = {"q": q, "k": k, "v": v, "dout": dout, **args}
    with pytest.raises(error) as info:
        exact_sdpa(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_exact_mha_rejects_bad_arguments(rng):
    p = ar.init_params(rng, d_model=4, num_heads=2)
    x = rng.normal(size=(1, 400, 4))
    with pytest.raises(ValueError, match="MAX_SCORES"):
        exact_mha(x, x, x, p, num_heads=2)
    wide = ar.init_params(rng, d_model=2000, num_heads=2, head_dim=50)
    y = rng.normal(size=(1, 10, 2000))
    with pytest.raises(ValueError, match="MAX_MULTIPLY_ADDS"):
        exact_mha(y, y, y, wide, num_heads=2)
    x = rng.normal(size=(2, 3, 4))
    with pytest.raises(
        ValueError, match=r"dout must have the output's shape \(\.\.\., T, D_out\) = \(2, 3, 4\)"
    ):
        exact_mha(x, x, x, p, np.zeros((2, 3, 5)), num_heads=2)
    with pytest.raises(ValueError, match="num_heads=2 must be a multiple of num_kv_heads=3"):
        exact_mha(x, x, x, p, num_heads=2, num_kv_heads=3)
    with pytest.raises(TypeError, match="params.w_q must be real"):
        exact_mha(x, x, x, dataclasses.replace(p, w_q=p.w_q * 1j), num_heads=2)


def test_inputs_are_not_modified_and_outputs_are_fresh_float64(rng):
    q, k, v, dout = (x.astype(np.float32) for x in small_inputs(rng))
    bias = rng.normal(size=(3, 5))
    before = [x.copy() for x in (q, k, v, dout, bias)]
    ex = exact_sdpa(q, k, v, dout, bias=bias)
    assert all(np.array_equal(a, b) for a, b in zip(before, (q, k, v, dout, bias), strict=True))
    for x in (r for r in ex if r is not None):
        assert x.dtype == np.float64
        assert not any(np.may_share_memory(x, y) for y in (q, k, v, dout, bias))
    assert ex.dbias.shape == bias.shape


def test_rounding_is_correct_down_to_subnormals():
    ctx = exact._context(40)
    tiny = ctx.ldexp(1, -1074)  # the smallest subnormal
    # 2.5 + 1e-30 steps of 2^-1074: nearest is 3 steps. Rounding to 53 bits first would give
    # exactly 2.5 steps, then the tie would round to even, 2 steps.
    assert exact._round_one(ctx, (ctx.mpf(2.5) + ctx.mpf("1e-30")) * tiny) == 3 * 5e-324
    assert exact._round_one(ctx, ctx.mpf(2.5) * tiny) == 2 * 5e-324  # a true tie: to even
    assert exact._round_one(ctx, 1 + ctx.ldexp(1, -53)) == 1.0  # a tie: to even
    assert exact._round_one(ctx, 1 + ctx.ldexp(1, -53) + ctx.ldexp(1, -100)) == 1 + 2.0**-52
    assert exact._round_one(ctx, ctx.ninf) == -np.inf and np.isnan(exact._round_one(ctx, ctx.nan))


def test_import_attention_ref_does_not_import_mpmath():
    code = (
        "import sys, attention_ref, attention_ref.oracle.exact; "
        "sys.exit(int('mpmath' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_missing_mpmath_says_how_to_install_it(monkeypatch, rng):
    monkeypatch.setitem(sys.modules, "mpmath", None)  # makes `import mpmath` raise ImportError
    q, k, v, _ = small_inputs(rng)
    with pytest.raises(ImportError, match=re.escape("pip install 'attention_ref[exact]'")):
        exact_sdpa(q, k, v)


def test_docs_page_examples_run():
    text = (ROOT / "docs" / "exact.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, "docs/exact.md has no python code blocks"
    namespace: dict = {"__name__": "docs_exact"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/exact.md (python block {i})", "exec"), namespace)
