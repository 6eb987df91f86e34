"""FlexAttention on the NumPy side: gradients by finite differences, user mods and the complex
step, BlockMask semantics, index shapes, bad inputs, no mutation.

Every reference here is written in this file: a dense einsum FlexAttention (``ref_flex``: GQA by
``np.repeat`` over heads, the mask applied after the score mod, ``-inf`` pairs masked, an empty
row giving output 0 and lse ``-inf``), each library mod rewritten from its formula on full
``np.indices`` grids (T5's bucket as a scalar Python function from Hugging Face's
``T5Attention._relative_position_bucket``), and BlockMask kinds counted from the dense mask.

* Gradients: :func:`attention_ref.flex_attention_backward` (``dq``, ``dk``, ``dv``, the lse's
  cotangent and every score-mod parameter) against central differences
  (:func:`attention_ref.gradcheck.check_vjp`) of ``ref_flex``, on the plain path and the tiled
  path with a ``BLOCK_SIZE=(4, 3)`` BlockMask and lengths that are not multiples of it, for
  every library mod and mask mod (and ``and_masks``/``or_masks``), B = 2, Hq = 4 > Hkv = 2, T != S
  (both T < S and T > S), E = 3 != Ev = 2, keys of batch 1, rows with no key. Each mod's
  ``grad_score`` and ``vjp_params`` also against finite differences of its ``__call__``.
* User mods: plain functions and :func:`attention_ref.custom_score_mod` (with and without
  ``vjp_params``) differentiated by the complex step; a non-analytic mod that keeps the complex
  dtype fails the check, silently wrong, (B5), and passes with its own ``grad_score``; ``np.abs``,
  ``.real`` and ``astype(float)`` drop the imaginary part and raise ``TypeError`` naming the fix.
* The checkers fail on planted bugs (a table gradient one column off, ALiBi's slope gradient
  negated, the reference's ALiBi with the other sign, corrupted BlockMasks).
* BlockMask: ``check_block_mask`` finds wrong blocks; the tiled path honours a BlockMask as a
  kernel does (wrong results exactly on the rows the corruption touches; the mask mod called
  only on partial tiles); ``from_kv_blocks`` validation; ``to_dense``, ``sparsity``, ``kinds``.

Sources of the conventions: PyTorch ``torch/_higher_order_ops/flex_attention.py``
(``_math_attention_inner``: ``torch.where(mask_mod(...), score_mod(scores * scale, ...), -inf)``;
``math_attention``: ``repeat_interleave`` for GQA, ``-inf`` lse and ``_safe_softmax`` zeros on a
fully masked row) and ``torch/nn/attention/flex_attention.py`` (``BlockMask``,
``create_block_mask``, ``_convert_mask_to_block_mask``: the padding past the lengths counts as
masked); Hugging Face
transformers ``src/transformers/models/t5/modeling_t5.py``
(``T5Attention._relative_position_bucket``, ``compute_bias``: ``memory_position -
context_position``). Derivations: ``docs/derivations/flex.md`` (B1)-(B14).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import require_torch

import attention_ref as ar
from attention_ref.gradcheck import check_vjp

#: Forward against the einsum reference: both float64, sums in other orders (a few ulps).
FWD_TOL = 1e-12
#: A planted bug must miss by far more than round-off.
PLANTED_MIN = 1e-3
#: The largest error measured per kind, printed at the end (``pytest -s``).
MEASURED: dict[str, float] = {}

B, HQ, HKV, E, EV = 2, 4, 2, 3, 2
BLOCK = (4, 3)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MEASURED:
        print("\nmax errors measured (relative for gradients, absolute for forwards):")
        for name in sorted(MEASURED):
            print(f"  {name:<44} {MEASURED[name]:.2e}")


def record(kind: str, value: float) -> float:
    MEASURED[kind] = max(MEASURED.get(kind, 0.0), float(value))
    return value


# ----------------------------------------------------------------------------- references


def ref_flex(q, k, v, score_fn=None, mask_fn=None, scale=None):
    """FlexAttention by its definition, on full (B, Hq, T, S) index grids: (out, lse)."""
    Bq, Hq, T, Dk = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    k = np.broadcast_to(k, (Bq,) + k.shape[1:])
    v = np.broadcast_to(v, (Bq,) + v.shape[1:])
    kr, vr = np.repeat(k, Hq // Hkv, axis=1), np.repeat(v, Hq // Hkv, axis=1)  # head h -> h // G
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    s = np.einsum("bhte,bhse->bhts", q, kr) * scale
    b, h, i, j = np.indices((Bq, Hq, T, S))
    if score_fn is not None:
        s = np.broadcast_to(score_fn(s, b, h, i, j), s.shape)
    ok = ~np.isneginf(s)
    if mask_fn is not None:
        ok = ok & mask_fn(b, h, i, j)
    m = np.where(ok, s, -np.inf).max(axis=-1, keepdims=True)
    e = np.where(ok, np.exp(np.where(ok, s, 0.0) - np.where(np.isfinite(m), m, 0.0)), 0.0)
    den = e.sum(axis=-1, keepdims=True)
    p = e / np.where(den > 0, den, 1.0)
    out = np.einsum("bhts,bhsd->bhtd", p, vr)
    lse = np.where(
        den[..., 0] > 0, m[..., 0] + np.log(np.where(den > 0, den, 1.0))[..., 0], -np.inf
    )
    return out, lse


def r_alibi(slopes):
    return lambda s, b, h, i, j: s + slopes[h] * (j - i)


def r_softcap(cap):
    return lambda s, b, h, i, j: cap * np.tanh(s / cap)


def r_relpos(table, offset):
    return lambda s, b, h, i, j: s + table[h, i - j + offset]


def t5_bucket_scalar(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Hugging Face's ``_relative_position_bucket`` for one ``rel = kv_idx - q_idx``."""
    out = 0
    if bidirectional:
        num_buckets //= 2
        out += num_buckets if rel > 0 else 0
        n = abs(rel)
    else:
        n = -min(rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return out + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return out + min(large, num_buckets - 1)


def r_t5(table, bidirectional, max_distance):
    def fn(s, b, h, i, j):
        bucket = np.vectorize(t5_bucket_scalar)(j - i, bidirectional, table.shape[1], max_distance)
        return s + table[h, bucket]

    return fn


def r_chain(*fns):
    def fn(s, b, h, i, j):
        for f in fns:
            s = f(s, b, h, i, j)
        return s

    return fn


def m_causal(o):
    return lambda b, h, i, j: i + o >= j


def m_window(left, right, o):
    return lambda b, h, i, j: (j >= i + o - left) & (j <= i + o + right)


def m_chunk(c, o):
    return lambda b, h, i, j: (i + o) // c == j // c


def m_doc(qd, kd):
    qd, kd = np.asarray(qd), np.asarray(kd)
    return lambda b, h, i, j: (qd[b, i] == kd[b, j]) & (qd[b, i] >= 0) & (kd[b, j] >= 0)


def m_prefix(p):
    p = np.asarray(p)
    return lambda b, h, i, j: (j < p[b]) | (i >= j)


def head_band(b, h, i, j):
    """A head-dependent mask mod, written as a plain function: |i - j| <= h + 1."""
    return np.abs(i - j) <= h + 1


#: Document ids for T = 7, S = 10 (B = 2): -1 is padding; batch 1's document 2 has no key, so
#: its queries (rows 4, 5) are empty as well as the padded ones.
Q_DOC = np.array([[0, 0, 0, 1, 1, -1, -1], [0, 1, 1, 1, 2, 2, -1]])
KV_DOC = np.array([[0, 0, 0, 0, 1, 1, 1, -1, -1, -1], [0, 0, 1, 1, 1, 1, 1, 3, 3, 3]])


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """A score mod (library and reference, built from the parameters) and a mask mod."""

    name: str
    T: int
    S: int
    params: Callable[[np.random.Generator], dict[str, np.ndarray]]
    lib: Callable[[dict[str, np.ndarray]], Any]
    ref: Callable[[dict[str, np.ndarray]], Callable[..., Any]]
    mask: Any
    mask_ref: Callable[..., Any]
    bm_batch: int | None = None  # the BlockMask's B (B for a batch-dependent mask)
    bm_heads: int | None = None  # the BlockMask's H (HQ for a head-dependent mask)
    kv_batch: int = B
    scale: float | None = None


def t5_params(rng):
    return {"table": rng.normal(size=(HQ, 8))}


def t5_lib(bidirectional):
    return lambda p: ar.T5RelativeBias(p["table"], bidirectional=bidirectional, max_distance=12)


def t5_ref(bidirectional):
    return lambda p: r_t5(p["table"], bidirectional, 12)


CASES = [
    Case(
        "alibi|causal_bottom_right",
        7,
        10,
        lambda rng: {"slopes": rng.uniform(-0.6, 0.6, HQ)},
        lambda p: ar.ALiBi(p["slopes"]),
        lambda p: r_alibi(p["slopes"]),
        ar.CausalMask(offset=3),
        m_causal(3),
    ),
    Case(
        "softcap|window_top_left",
        7,
        10,
        lambda rng: {"cap": np.array(1.5)},
        lambda p: ar.SoftCap(float(p["cap"])),
        lambda p: r_softcap(p["cap"]),
        ar.SlidingWindowMask(2, 1),
        m_window(2, 1, 0),
    ),
    Case(
        "relpos|window_bottom_right",
        7,
        10,
        lambda rng: {"table": 0.5 * rng.normal(size=(HQ, 16))},
        lambda p: ar.RelativePositionBias(p["table"], offset=9),
        lambda p: r_relpos(p["table"], 9),
        ar.SlidingWindowMask(3, 0, offset=3),
        m_window(3, 0, 3),
    ),
    Case(
        "t5_bidirectional|chunked_T>S",
        10,
        7,
        t5_params,
        t5_lib(True),
        t5_ref(True),
        ar.ChunkedMask(4, offset=-3),
        m_chunk(4, -3),
        scale=1.0,  # T5 does not scale its scores
    ),
    Case(
        "t5_unidirectional|document_padded",
        7,
        10,
        t5_params,
        t5_lib(False),
        t5_ref(False),
        ar.DocumentMask(Q_DOC, KV_DOC),
        m_doc(Q_DOC, KV_DOC),
        bm_batch=B,
    ),
    Case(
        "chain3|prefix_lm_T>S_kv_batch_1",
        10,
        7,
        lambda rng: {
            "0.slopes": rng.uniform(-0.5, 0.5, HQ),
            "1.cap": np.array(2.0),
            "2.table": 0.5 * rng.normal(size=(HQ, 16)),
        },
        lambda p: ar.chain_score_mods(
            ar.ALiBi(p["0.slopes"]),
            ar.SoftCap(float(p["1.cap"])),
            ar.RelativePositionBias(p["2.table"], offset=6),
        ),
        lambda p: r_chain(r_alibi(p["0.slopes"]), r_softcap(p["1.cap"]), r_relpos(p["2.table"], 6)),
        ar.PrefixLMMask(np.array([3, 6])),
        m_prefix([3, 6]),
        bm_batch=B,
        kv_batch=1,
    ),
    Case(
        "softcap_alibi|and_or_head_dependent",
        7,
        10,
        lambda rng: {"0.cap": np.array(1.2), "1.slopes": rng.uniform(-0.6, 0.6, HQ)},
        lambda p: ar.chain_score_mods(ar.SoftCap(float(p["0.cap"])), ar.ALiBi(p["1.slopes"])),
        lambda p: r_chain(r_softcap(p["0.cap"]), r_alibi(p["1.slopes"])),
        ar.and_masks(ar.or_masks(ar.ChunkedMask(3), ar.CausalMask()), head_band),
        lambda b, h, i, j: (((i // 3) == (j // 3)) | (i >= j)) & (np.abs(i - j) <= h + 1),
        bm_heads=HQ,
    ),
]
CASE_IDS = [c.name for c in CASES]


def make_qkv(rng, T, S, kv_batch=B):
    return (
        rng.normal(size=(B, HQ, T, E)),
        rng.normal(size=(kv_batch, HKV, S, E)),
        rng.normal(size=(kv_batch, HKV, S, EV)),
    )


def block_mask_of(case: Case):
    return ar.create_block_mask(
        case.mask, case.bm_batch, case.bm_heads, case.T, case.S, BLOCK_SIZE=BLOCK
    )


def path_kwargs(path: str, bm) -> dict[str, Any]:
    return {"path": "plain"} if path == "plain" else {"path": "tiled", "block_mask": bm}


def packed(out, lse):
    """(out, lse) as one vector, the empty rows' -inf lse as 0 (constant under perturbation)."""
    return np.concatenate([out.ravel(), np.where(np.isneginf(lse), 0.0, lse).ravel()])


def split_cotangent(c, T):
    n = B * HQ * T * EV
    return c[:n].reshape(B, HQ, T, EV), c[n:].reshape(B, HQ, T)


def assert_passed(kind: str, res) -> None:
    record(kind, res.worst[1].rel_error)
    assert res.passed, f"{kind}:\n{res}"


# ----------------------------------------------------------------------------- 1. gradients


@pytest.mark.parametrize("path", ["plain", "tiled"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_the_einsum_reference(case, path, rng):
    q, k, v = make_qkv(rng, case.T, case.S, case.kv_batch)
    p = case.params(rng)
    out, lse = ar.flex_attention(
        q, k, v, score_mod=case.lib(p), mask_mod=case.mask, scale=case.scale, enable_gqa=True,
        return_lse=True, **path_kwargs(path, block_mask_of(case)),
    )  # fmt: skip
    want, want_lse = ref_flex(q, k, v, case.ref(p), case.mask_ref, case.scale)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    err = max(np.abs(out - want).max(), np.abs(lse[fin] - want_lse[fin]).max())
    assert record(f"forward {path}", err) <= FWD_TOL, err
    if case.name.startswith("t5_unidirectional"):  # the padded and docless rows are empty
        assert np.isneginf(lse[0, :, 5:]).all() and np.isneginf(lse[1, :, 4:]).all()
        assert (out[0, :, 5:] == 0).all() and (out[1, :, 4:] == 0).all()


@pytest.mark.parametrize("path", ["plain", "tiled"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_by_finite_differences(case, path, rng):
    """dq, dk, dv (with the lse's cotangent) and every parameter against central differences of
    the reference, for a random cotangent of out and lse."""
    q, k, v = make_qkv(rng, case.T, case.S, case.kv_batch)
    p0 = case.params(rng)
    c = rng.normal(size=B * HQ * case.T * (EV + 1))
    dout, dlse = split_cotangent(c, case.T)
    g = ar.flex_attention_backward(
        dout, q, k, v, score_mod=case.lib(p0), mask_mod=case.mask, scale=case.scale,
        enable_gqa=True, dlse=dlse, **path_kwargs(path, block_mask_of(case)),
    )  # fmt: skip
    assert sorted(g.dscore_mod) == sorted(p0)
    assert g.dk.shape == k.shape and g.dv.shape == v.shape

    def f(q, k, v, **params):
        return packed(*ref_flex(q, k, v, case.ref(params), case.mask_ref, case.scale))

    grads = {"q": g.dq, "k": g.dk, "v": g.dv, **g.dscore_mod}
    res = check_vjp(f, {"q": q, "k": k, "v": v, **p0}, c, grads)
    assert_passed(f"fd {path} {case.name}", res)


def _direct_setups(rng):
    """(name, mod, score, index arrays): each library mod on full grids and on a tile's."""
    T, S = 7, 10
    full = ar.mod_indices(B, HQ, T, S)
    tile = ar.mod_indices(B, HQ, np.arange(4, 7), np.arange(3, 6))
    mods = {
        "ALiBi": ar.ALiBi(rng.uniform(-1, 1, HQ)),
        "SoftCap": ar.SoftCap(1.3),
        "RelativePositionBias": ar.RelativePositionBias(rng.normal(size=(HQ, 16)), offset=9),
        "T5RelativeBias_bidirectional": ar.T5RelativeBias(
            rng.normal(size=(HQ, 8)), max_distance=12
        ),
        "T5RelativeBias_unidirectional": ar.T5RelativeBias(
            rng.normal(size=(HQ, 8)), bidirectional=False, max_distance=12
        ),
        "chain": ar.chain_score_mods(
            ar.SoftCap(2.5), ar.ALiBi(rng.uniform(-1, 1, HQ)), ar.SoftCap(1.7)
        ),
    }
    for name, mod in mods.items():
        for where, idx in (("full", full), ("tile", tile)):
            shape = (B, HQ, idx[2].shape[2], idx[3].shape[3])
            yield f"{name}/{where}", mod, 2.0 * rng.normal(size=shape), idx


def test_each_mods_derivatives_against_finite_differences_of_its_call(rng):
    """grad_score (B2) and vjp_params (B3) of every library mod against central differences of
    the mod's own __call__, on full index grids and on a tile's."""
    for name, mod, score, idx in _direct_setups(rng):
        g = rng.normal(size=score.shape)

        def f_score(score, mod=mod, idx=idx):
            return np.broadcast_to(mod(score, *idx), score.shape)

        d = g * np.broadcast_to(mod.grad_score(score, *idx), score.shape)
        assert_passed(
            f"mod grad_score {name}", check_vjp(f_score, {"score": score}, g, {"score": d})
        )

        def f_params(mod=mod, score=score, idx=idx, **params):
            return np.broadcast_to(mod.with_params(params)(score, *idx), score.shape)

        res = check_vjp(f_params, mod.params, g, mod.vjp_params(g, score, *idx))
        assert_passed(f"mod vjp_params {name}", res)


def test_mask_only_gives_no_parameter_gradients(rng):
    q, k, v = make_qkv(rng, 7, 10)
    dout = rng.normal(size=(B, HQ, 7, EV))
    g = ar.flex_attention_backward(dout, q, k, v, mask_mod=ar.CausalMask(3), enable_gqa=True)
    assert g.dscore_mod == {}
    fn_mod = ar.flex_attention_backward(
        dout, q, k, v, score_mod=lambda s, b, h, i, j: s * 1.0, enable_gqa=True
    )
    assert fn_mod.dscore_mod == {}


# ----------------------------------------------------------------------------- 2. user mods


def _user_w(score, b, h, q_idx, kv_idx, w, c):
    return score * np.tanh(w[h]) + c * (q_idx - kv_idx) / 4


def _user_w_vjp(g, score, b, h, q_idx, kv_idx, w, c):
    per_head = np.broadcast_to(g * score, g.shape).sum(axis=(0, 2, 3))  # (H,)
    dist = np.broadcast_to(q_idx - kv_idx, g.shape)
    return {"w": per_head * (1.0 - np.tanh(w) ** 2), "c": np.array(np.sum(g * dist) / 4)}


USER_MODS = {
    "sin(h + q - kv) * score": (lambda s, b, h, i, j: s * np.sin(h + i - j), None),
    "exp(-score^2)": (lambda s, b, h, i, j: np.exp(-(s**2)), None),
    "custom params, complex step": ("custom", False),
    "custom params, own vjp_params": ("custom", True),
}


@pytest.mark.parametrize("path", ["plain", "tiled"])
@pytest.mark.parametrize("name", sorted(USER_MODS))
def test_user_mods_by_the_complex_step(name, path, rng):
    """A plain function (derivative by the complex step, (B4)) and custom_score_mod with
    parameters (their gradient by one complex step per entry, (B6), or the user's vjp_params)."""
    T, S = 7, 10
    q, k, v = make_qkv(rng, T, S)
    fn, own_vjp = USER_MODS[name]
    p0: dict[str, np.ndarray] = {}
    if fn == "custom":
        p0 = {"w": rng.normal(size=HQ), "c": np.array(0.7)}
        mod = ar.custom_score_mod(_user_w, params=p0, vjp_params=_user_w_vjp if own_vjp else None)

        def ref(p):
            return lambda s, b, h, i, j: _user_w(s, b, h, i, j, **p)
    else:
        mod = fn

        def ref(p):
            return fn

    bm = ar.create_block_mask(ar.CausalMask(3), None, None, T, S, BLOCK_SIZE=BLOCK)
    c = rng.normal(size=B * HQ * T * (EV + 1))
    dout, dlse = split_cotangent(c, T)
    kw = path_kwargs(path, bm)
    g = ar.flex_attention_backward(
        dout, q, k, v, score_mod=mod, mask_mod=ar.CausalMask(3), enable_gqa=True, dlse=dlse, **kw
    )
    out = ar.flex_attention(
        q, k, v, score_mod=mod, mask_mod=ar.CausalMask(3), enable_gqa=True, **kw
    )
    err = np.abs(out - ref_flex(q, k, v, ref(p0), m_causal(3))[0]).max()
    assert record(f"forward {path}", err) <= FWD_TOL

    def f(q, k, v, **p):
        return packed(*ref_flex(q, k, v, ref(p), m_causal(3)))

    res = check_vjp(
        f, {"q": q, "k": k, "v": v, **p0}, c, {"q": g.dq, "k": g.dk, "v": g.dv, **g.dscore_mod}
    )
    assert_passed(f"fd {path} user {name}", res)


def _abs_complex(s, b, h, i, j):
    """|s| written so that it stays complex: sqrt(s conj(s)), whose complex step is 0, (B5)."""
    return np.sqrt(s * np.conj(s))


def _sign(s, b, h, i, j):
    return np.sign(s)


NON_ANALYTIC = {
    "|s| as sqrt(s conj s)": (_abs_complex, _sign),
    "conj(s)": (lambda s, b, h, i, j: np.conj(s), lambda s, b, h, i, j: np.ones_like(s)),
}


@pytest.mark.parametrize("name", sorted(NON_ANALYTIC))
def test_non_analytic_mod_fails_the_check_until_it_has_its_grad_score(name, rng):
    """(B5): a mod that is not analytic but keeps the complex dtype gets a wrong complex-step
    derivative, silently; the finite-difference check catches it, and a correct grad_score
    fixes it."""
    T, S = 7, 10
    q, k, v = make_qkv(rng, T, S)
    fn, grad = NON_ANALYTIC[name]
    c = rng.normal(size=B * HQ * T * (EV + 1))
    dout, dlse = split_cotangent(c, T)

    def f(q, k, v):
        return packed(*ref_flex(q, k, v, fn, m_causal(3)))

    def check(mod):
        g = ar.flex_attention_backward(
            dout, q, k, v, score_mod=mod, mask_mod=ar.CausalMask(3), enable_gqa=True, dlse=dlse
        )
        return check_vjp(f, {"q": q, "k": k, "v": v}, c, {"q": g.dq, "k": g.dk, "v": g.dv})

    wrong = check(fn)
    assert not wrong.passed and "FAIL dq" in str(wrong) and "FAIL dk" in str(wrong)
    assert wrong.worst[1].rel_error > 0.1
    assert_passed(
        f"fd non-analytic {name} with grad_score", check(ar.custom_score_mod(fn, grad_score=grad))
    )


def test_abs_and_dropping_the_imaginary_part_raise_naming_the_fix(rng):
    """np.abs, .real and astype(float) return a real array for a complex score: the complex
    step cannot differentiate them, and the backward says to give a grad_score. The forward
    needs no derivative and runs. np.abs with np.sign as its grad_score passes the check."""
    T, S = 7, 10
    q, k, v = make_qkv(rng, T, S)
    dout = rng.normal(size=(B, HQ, T, EV))
    drops = {
        "abs": lambda s, b, h, i, j: np.abs(s),
        "real": lambda s, b, h, i, j: s.real * 2.0,
        "astype": lambda s, b, h, i, j: s.astype(np.float64) * 2.0,
    }
    for name, fn in drops.items():
        for path in ("plain", "tiled"):
            ar.flex_attention(q, k, v, score_mod=fn, enable_gqa=True, path=path)
            warns = pytest.warns(np.exceptions.ComplexWarning)
            with warns if name == "astype" else contextlib.nullcontext():
                with pytest.raises(TypeError, match=r"drops the imaginary part.*grad_score"):
                    ar.flex_attention_backward(
                        dout, q, k, v, score_mod=fn, enable_gqa=True, path=path
                    )

    def real_param(s, b, h, i, j, w):
        return s * float(np.real(w))

    mod = ar.custom_score_mod(real_param, params={"w": 0.5})
    with pytest.raises(TypeError, match=r"parameter 'w' was complex.*vjp_params"):
        ar.flex_attention_backward(dout, q, k, v, score_mod=mod, enable_gqa=True)

    fixed = ar.custom_score_mod(drops["abs"], grad_score=_sign)
    c = rng.normal(size=dout.shape)
    g = ar.flex_attention_backward(c, q, k, v, score_mod=fixed, enable_gqa=True)

    def f(q, k, v):
        return ref_flex(q, k, v, drops["abs"])[0]

    res = check_vjp(f, {"q": q, "k": k, "v": v}, c, {"q": g.dq, "k": g.dk, "v": g.dv})
    assert_passed("fd np.abs with grad_score=np.sign", res)


@pytest.mark.parametrize("path", ["plain", "tiled"])
def test_score_mod_minus_inf_masks_like_a_mask_mod(path, rng):
    """A score mod's -inf masks its pair (torch's create_mask reads a score mod's -inf so):
    output, lse and gradients equal those of the same pairs masked by a mask_mod, including a
    row with no pair left (out 0, lse -inf). NaN or +inf raise ValueError."""
    T, S = 7, 10
    q, k, v = make_qkv(rng, T, S)
    keep = m_doc(Q_DOC, KV_DOC)

    def minus_inf(s, b, h, i, j):
        return np.where(keep(b, h, i, j), s * 0.8, -np.inf)

    def scaled(s, b, h, i, j):
        return s * 0.8

    doc = ar.DocumentMask(Q_DOC, KV_DOC)
    bm_all = ar.create_block_mask(lambda b, h, i, j: i >= 0, None, None, T, S, BLOCK_SIZE=BLOCK)
    bm_doc = ar.create_block_mask(doc, B, None, T, S, BLOCK_SIZE=BLOCK)
    kw1, kw2 = path_kwargs(path, bm_all), path_kwargs(path, bm_doc)
    a = ar.flex_attention(q, k, v, score_mod=minus_inf, enable_gqa=True, return_lse=True, **kw1)
    w = ar.flex_attention(
        q, k, v, score_mod=scaled, mask_mod=doc, enable_gqa=True, return_lse=True, **kw2
    )
    assert np.isneginf(a[1]).any() and np.array_equal(np.isneginf(a[1]), np.isneginf(w[1]))
    fin = np.isfinite(w[1])
    assert np.abs(a[0] - w[0]).max() <= FWD_TOL and np.abs(a[1][fin] - w[1][fin]).max() <= FWD_TOL
    dout, dlse = rng.normal(size=(B, HQ, T, EV)), rng.normal(size=(B, HQ, T))
    ga = ar.flex_attention_backward(
        dout, q, k, v, score_mod=minus_inf, enable_gqa=True, dlse=dlse, **kw1
    )
    gw = ar.flex_attention_backward(
        dout, q, k, v, score_mod=scaled, mask_mod=doc, enable_gqa=True, dlse=dlse, **kw2
    )
    for x, y in zip((ga.dq, ga.dk, ga.dv), (gw.dq, gw.dk, gw.dv), strict=True):
        assert np.isfinite(x).all()
        assert record(f"-inf score mod vs mask_mod {path}", np.abs(x - y).max()) <= FWD_TOL


@pytest.mark.parametrize("path", ["plain", "tiled"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "+inf"])
def test_score_mod_nan_or_plus_inf_raises_naming_the_pair(bad, path, rng):
    """NaN or +inf from a score mod is a ValueError naming the first such pair by its
    (b, h, q_idx, kv_idx), on either path (q_idx = 2, kv_idx = 5 lies in the tile (0, 1))."""
    q, k, v = make_qkv(rng, 7, 10)
    bm = ar.create_block_mask(lambda b, h, i, j: i >= 0, None, None, 7, 10, BLOCK_SIZE=BLOCK)

    def poison(s, b, h, i, j):
        return np.where((b == 1) & (h == 3) & (i == 2) & (j == 5), bad, s)

    pair = r"\(b, h, q_idx, kv_idx\) = \(1, 3, 2, 5\)"
    with pytest.raises(ValueError, match=r"returned 1 NaN/\+inf entries, the first at " + pair):
        ar.flex_attention(q, k, v, score_mod=poison, enable_gqa=True, **path_kwargs(path, bm))


# ----------------------------------------------------------------------------- 3. planted bugs


class _OffByOneTable(ar.RelativePositionBias):
    """The table's gradient scatter-added one column to the right: a planted bug."""

    def vjp_params(self, g, score, b, h, q_idx, kv_idx):
        n = np.broadcast_to((q_idx - kv_idx + self.offset + 1)[0, 0], g.shape[-2:])
        d = np.zeros(self.table.shape)
        per_head = np.broadcast_to(g, g.shape).sum(axis=0)  # (H, T, S)
        for hh in range(per_head.shape[0]):
            np.add.at(d[hh], np.minimum(n, d.shape[1] - 1), per_head[hh])
        return {"table": d}


class _FlippedAlibi(ar.ALiBi):
    """ALiBi's slope gradient with the wrong sign: a planted bug."""

    def vjp_params(self, g, score, b, h, q_idx, kv_idx):
        return {"slopes": -super().vjp_params(g, score, b, h, q_idx, kv_idx)["slopes"]}


@pytest.mark.parametrize("path", ["plain", "tiled"])
def test_planted_parameter_gradient_bugs_are_caught(path, rng):
    T, S = 7, 10
    q, k, v = make_qkv(rng, T, S)
    table, slopes = rng.normal(size=(HQ, 16)), rng.uniform(-0.6, 0.6, HQ)
    bm = ar.create_block_mask(ar.CausalMask(3), None, None, T, S, BLOCK_SIZE=BLOCK)
    c = rng.normal(size=(B, HQ, T, EV))
    kw = {"mask_mod": ar.CausalMask(3), "enable_gqa": True, **path_kwargs(path, bm)}
    for name, buggy, ref in (
        ("table", _OffByOneTable(table, offset=9), lambda x: r_relpos(x, 9)),
        ("slopes", _FlippedAlibi(slopes), r_alibi),
    ):
        g = ar.flex_attention_backward(c, q, k, v, score_mod=buggy, **kw)
        x0 = table if name == "table" else slopes

        def f(ref=ref, name=name, **x):
            return ref_flex(q, k, v, ref(x[name]), m_causal(3))[0]

        res = check_vjp(f, {name: x0}, c, {name: g.dscore_mod[name]})
        assert not res.passed and res.worst[0] == name, str(res)
        assert res.worst[1].rel_error > PLANTED_MIN and f"FAIL d{name}" in str(res)


def test_planted_forward_bug_is_caught(rng):
    """The reference comparison fails for ALiBi with the other sign."""
    q, k, v = make_qkv(rng, 7, 10)
    slopes = rng.uniform(0.2, 0.6, HQ)
    ours = ar.flex_attention(q, k, v, score_mod=ar.ALiBi(slopes), enable_gqa=True)
    flipped = ref_flex(q, k, v, lambda s, b, h, i, j: s + slopes[h] * (i - j))[0]
    assert np.abs(ours - flipped).max() > PLANTED_MIN


# ----------------------------------------------------------------------------- 4. BlockMask


def lists_of(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(num, indices) of a (B, H, nq, nk) bool grid: the set columns first (rest 0)."""
    num = dense.sum(axis=-1).astype(np.int32)
    idx = np.zeros(dense.shape, dtype=np.int32)
    for pos in np.ndindex(dense.shape[:-1]):
        cols = np.flatnonzero(dense[pos])
        idx[pos][: len(cols)] = cols
    return num, idx


def rebuilt(bm, partial, full):
    num, idx = lists_of(partial)
    fnum, fidx = lists_of(full)
    return ar.BlockMask.from_kv_blocks(
        num, idx, fnum, fidx, BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod,
        seq_lengths=bm.seq_lengths,
    )  # fmt: skip


def dense_truth(mask_fn, Bm, Hm, T, S):
    return np.broadcast_to(mask_fn(*np.indices((Bm, Hm, T, S))), (Bm, Hm, T, S))


def block_counts(dense, qb, kb):
    """Allowed pairs and real pairs per block, the padding past the lengths not counted."""
    Bm, Hm, T, S = dense.shape
    nq, nk = -(-T // qb), -(-S // kb)
    allowed = np.zeros((Bm, Hm, nq, nk), dtype=int)
    area = np.zeros((nq, nk), dtype=int)
    for i in range(nq):
        for j in range(nk):
            blk = dense[..., i * qb : (i + 1) * qb, j * kb : (j + 1) * kb]
            allowed[..., i, j] = blk.sum(axis=(-2, -1))
            area[i, j] = blk.shape[-2] * blk.shape[-1]
    return allowed, area


T_BM, S_BM = 7, 10
#: bottom-right causal (T=7, S=10): block (0, 1) (rows 0-3, keys 3-5) is partial with 3 masked
#: pairs, in rows 0 and 1; block (0, 0) (rows 0-3, keys 0-2) is full. The tail query block (rows
#: 4-6) is never full: its padding row counts as masked.
BM_MASK = ar.CausalMask(3)


def test_block_mask_fields_against_the_dense_mask():
    for mod, ref, Bm in (
        (BM_MASK, m_causal(3), None),
        (ar.DocumentMask(Q_DOC, KV_DOC), m_doc(Q_DOC, KV_DOC), B),
    ):
        bm = ar.create_block_mask(mod, Bm, None, T_BM, S_BM, BLOCK_SIZE=BLOCK)
        dense = dense_truth(ref, Bm or 1, 1, T_BM, S_BM)
        allowed, area = block_counts(dense, *BLOCK)
        padded_area = BLOCK[0] * BLOCK[1]
        full = allowed == padded_area  # a tail block holds padding: never full
        partial = (allowed > 0) & ~full
        kinds = np.where(full, 2, np.where(partial, 1, 0))
        assert bm.shape == ((Bm or 1), 1, T_BM, S_BM) and bm.num_blocks == (2, 4)
        assert np.array_equal(bm.kinds(), kinds) and bm.kinds().dtype == np.int8
        assert np.array_equal(bm.to_dense(), (kinds > 0).astype(np.int32))
        assert np.array_equal(bm.partial_blocks(), partial)
        assert np.array_equal(bm.full_blocks(), full)
        assert np.array_equal(bm.kv_num_blocks, partial.sum(-1))
        assert np.array_equal(bm.full_kv_num_blocks, full.sum(-1))
        assert np.array_equal(bm.q_num_blocks, partial.sum(-2))  # the transposes
        assert np.array_equal(bm.full_q_num_blocks, full.sum(-2))
        computed = int((kinds > 0).sum())
        want = 100.0 * (1.0 - computed * padded_area / ((Bm or 1) * T_BM * S_BM))
        assert bm.sparsity() == pytest.approx(want, rel=1e-12)
        if Bm is None:  # the causal grid holds every kind; the documents' none full
            assert 0 in kinds and 1 in kinds and 2 in kinds
        assert ar.check_block_mask(bm).ok and str(ar.check_block_mask(bm)).startswith(
            "BlockMask ok"
        )
        merged = ar.create_block_mask(
            mod, Bm, None, T_BM, S_BM, BLOCK_SIZE=BLOCK, separate_full_blocks=False
        )
        assert merged.full_kv_num_blocks is None and set(np.unique(merged.kinds())) <= {0, 1}
        assert np.array_equal(merged.to_dense(), bm.to_dense())
        report = ar.check_block_mask(merged)
        assert report.ok and report.partial_but_full == int(full.sum())


def test_check_block_mask_finds_a_wrong_full_block_and_a_missed_block():
    bm = ar.create_block_mask(BM_MASK, B, None, T_BM, S_BM, BLOCK_SIZE=BLOCK)
    dense = dense_truth(m_causal(3), B, 1, T_BM, S_BM)
    allowed, area = block_counts(dense, *BLOCK)
    assert bm.kinds()[1, 0, 0, 1] == 1 and bm.kinds()[0, 0, 0, 0] == 2
    partial, full = bm.partial_blocks().copy(), bm.full_blocks().copy()
    partial[1, 0, 0, 1], full[1, 0, 0, 1] = False, True  # a partial block marked full
    wrong = ar.check_block_mask(rebuilt(bm, partial, full))
    masked = int(area[0, 1] - allowed[1, 0, 0, 1])
    assert masked == 3 and wrong.wrong_full == [(1, 0, 0, 1, masked)] and wrong.missed == []
    assert not wrong.ok
    assert "(b=1, h=0, q_block=0, kv_block=1) marked full: 3 masked pair(s)" in str(wrong)

    partial, full = bm.partial_blocks().copy(), bm.full_blocks().copy()
    full[0, 0, 0, 0] = False  # an allowed block dropped
    missed = ar.check_block_mask(rebuilt(bm, partial, full))
    assert missed.missed == [(0, 0, 0, 0, int(allowed[0, 0, 0, 0]))] and missed.wrong_full == []
    assert allowed[0, 0, 0, 0] == 12
    assert "(b=0, h=0, q_block=0, kv_block=0) marked empty: 12 allowed pair(s)" in str(missed)
    # a full block marked partial is only wasted work
    partial, full = bm.partial_blocks().copy(), bm.full_blocks().copy()
    full[0, 0, 0, 0], partial[0, 0, 0, 0] = False, True
    waste = ar.check_block_mask(rebuilt(bm, partial, full))
    assert waste.ok and waste.partial_but_full == 1 and "could be skipped or full" in str(waste)
    # a BlockMask broadcast over B and H is checked at the sizes asked for
    bm1 = ar.create_block_mask(BM_MASK, None, None, T_BM, S_BM, BLOCK_SIZE=BLOCK)
    assert ar.check_block_mask(bm1, B=B, H=HQ).ok
    doc_bm = ar.create_block_mask(
        ar.DocumentMask(Q_DOC, KV_DOC), B, None, T_BM, S_BM, BLOCK_SIZE=BLOCK
    )
    assert not ar.check_block_mask(doc_bm, BM_MASK).ok  # against another mask mod


@pytest.mark.parametrize("corruption", ["wrong_full", "missed"])
def test_tiled_path_honours_a_corrupted_block_mask_like_a_kernel(corruption, rng):
    """With a wrong BlockMask the tiled path is wrong exactly where a kernel would be: on the
    rows of the corrupted (b, query block) whose pairs in that block change, and nowhere
    else; the plain path (which reads only the mask mod) is right; check=True raises."""
    q, k, v = make_qkv(rng, T_BM, S_BM)
    bm = ar.create_block_mask(BM_MASK, B, None, T_BM, S_BM, BLOCK_SIZE=BLOCK)
    partial, full = bm.partial_blocks().copy(), bm.full_blocks().copy()
    if corruption == "wrong_full":
        bb, qi, kj = 1, 0, 1
        partial[bb, 0, qi, kj], full[bb, 0, qi, kj] = False, True
    else:
        bb, qi, kj = 0, 0, 0
        full[bb, 0, qi, kj] = False
    bad = rebuilt(bm, partial, full)
    dense = dense_truth(m_causal(3), B, 1, T_BM, S_BM)[:, 0]  # (B, T, S)
    rows = np.arange(qi * BLOCK[0], min((qi + 1) * BLOCK[0], T_BM))
    blk = dense[bb][np.ix_(rows, np.arange(kj * BLOCK[1], (kj + 1) * BLOCK[1]))]
    # the rows the corruption changes: a masked pair attended, or allowed pairs skipped
    touched = rows[(~blk).any(axis=1)] if corruption == "wrong_full" else rows[blk.any(axis=1)]
    assert 0 < len(touched) and (corruption == "missed" or len(touched) < len(rows))

    mod = ar.ALiBi(rng.uniform(-0.5, 0.5, HQ))
    kw = {"score_mod": mod, "enable_gqa": True, "return_lse": True}
    plain = ar.flex_attention(q, k, v, block_mask=bad, **kw)
    right = ar.flex_attention(q, k, v, mask_mod=BM_MASK, **kw)
    tiled = ar.flex_attention(q, k, v, block_mask=bad, path="tiled", **kw)
    assert np.abs(plain[0] - right[0]).max() <= FWD_TOL
    diff = np.abs(tiled[0] - right[0]).max(axis=-1)  # (B, H, T)
    changed = np.zeros((B, HQ, T_BM), dtype=bool)
    changed[bb, :, touched] = True  # every query head: the BlockMask's H is 1
    assert (diff[changed] > PLANTED_MIN).all(), diff
    assert (
        record("tiled with a corrupted BlockMask, untouched rows", diff[~changed].max()) <= FWD_TOL
    )
    for p in ("plain", "tiled"):
        with pytest.raises(ValueError, match=rf"(?s)check=True.*\(b={bb}, h=0, q_block={qi}, "):
            ar.flex_attention(q, k, v, block_mask=bad, path=p, check=True, **kw)
    ar.flex_attention(q, k, v, block_mask=bm, path="tiled", check=True, **kw)  # a right one passes


class SpyMask:
    """Bottom-right causal, recording the index arrays of every call."""

    def __init__(self):
        self.calls: list[tuple[np.ndarray, ...]] = []

    def __call__(self, b, h, q_idx, kv_idx):
        self.calls.append((b, h, q_idx, kv_idx))
        doc = m_doc(Q_DOC, KV_DOC)(b, h, q_idx, kv_idx)
        return (q_idx + 3 >= kv_idx) | doc


def test_mask_mod_called_only_on_partial_tiles(rng):
    """A kernel never calls mask_mod on a tile whose blocks are all full or all empty: every
    call of the tiled path is one tile of the BlockMask's grid, with the block's positions, and
    marked partial for some (b, h); each partial tile once in the forward, and once more in the
    backward (after its recomputed forward). Without separate full blocks the output is the same."""
    spy = SpyMask()
    bm = ar.create_block_mask(spy, B, None, T_BM, S_BM, BLOCK_SIZE=BLOCK)
    kinds = bm.kinds()
    assert (kinds == 0).any() and (kinds == 2).any() and (kinds == 1).any()
    some_partial = {tuple(ij) for ij in np.argwhere((kinds == 1).any(axis=(0, 1)))}
    q, k, v = make_qkv(rng, T_BM, S_BM)
    kw = {"score_mod": ar.SoftCap(1.5), "enable_gqa": True, "path": "tiled", "block_mask": bm}

    def tiles_called():
        seen = []
        for b, h, qi, ki in spy.calls:
            assert b.shape == (B, 1, 1, 1) and h.shape == (1, HQ, 1, 1)
            assert qi.shape[:2] == (1, 1) and qi.shape[3] == 1 and ki.shape[:3] == (1, 1, 1)
            i0, j0 = int(qi.min()), int(ki.min())
            assert i0 % BLOCK[0] == 0 and j0 % BLOCK[1] == 0
            rows = np.arange(i0, min(i0 + BLOCK[0], T_BM))
            cols = np.arange(j0, min(j0 + BLOCK[1], S_BM))
            assert np.array_equal(qi.ravel(), rows) and np.array_equal(ki.ravel(), cols)
            seen.append((i0 // BLOCK[0], j0 // BLOCK[1]))
        spy.calls.clear()
        return seen

    spy.calls.clear()
    out = ar.flex_attention(q, k, v, **kw)
    fwd = tiles_called()
    assert sorted(fwd) == sorted(some_partial)
    dout = rng.normal(size=out.shape)
    g = ar.flex_attention_backward(dout, q, k, v, **kw)
    assert sorted(tiles_called()) == sorted(list(some_partial) * 2)

    want = ref_flex(q, k, v, r_softcap(1.5), SpyMask())[0]
    assert record("forward tiled spy", np.abs(out - want).max()) <= FWD_TOL
    merged = ar.create_block_mask(
        spy, B, None, T_BM, S_BM, BLOCK_SIZE=BLOCK, separate_full_blocks=False
    )
    kw2 = {**kw, "block_mask": merged}
    assert np.abs(ar.flex_attention(q, k, v, **kw2) - out).max() <= FWD_TOL
    g2 = ar.flex_attention_backward(dout, q, k, v, **kw2)
    for x, y in zip(g2[:3], g[:3], strict=True):
        assert np.abs(x - y).max() <= FWD_TOL


def test_from_kv_blocks_validation():
    num, idx = np.array([[[1, 2]]]), np.array([[[[0, 1, 2, 3], [1, 2, 0, 3]]]])
    fk = ar.BlockMask.from_kv_blocks
    bm = fk(num, idx, BLOCK_SIZE=(4, 3), seq_lengths=(7, 10))
    assert bm.shape == (1, 1, 7, 10) and bm.full_kv_num_blocks is None
    assert fk(num, idx, BLOCK_SIZE=(4, 3)).seq_lengths == (8, 12)  # torch's default
    assert np.array_equal(bm.q_num_blocks, [[[1, 1, 1, 0]]])  # the transpose
    assert np.array_equal(bm.to_dense(), [[[[1, 0, 0, 0], [0, 1, 1, 0]]]])
    fk(num, np.where(np.arange(4) < 2, idx, 99))  # entries past kv_num_blocks are never read
    with pytest.raises(
        ValueError, match=r"kv_indices \(B, H, nq, nk\) = \(1, 1, 3, 4\) must match"
    ):
        fk(num, np.zeros((1, 1, 3, 4), int))
    with pytest.raises(ValueError, match="given together or not at all"):
        fk(num, idx, full_kv_num_blocks=num)
    with pytest.raises(ValueError, match="full_kv_num_blocks .* must have kv_num_blocks'"):
        fk(num, idx, np.array([[[1, 1, 1]]]), np.zeros((1, 1, 3, 4), int))
    with pytest.raises(ValueError, match=r"kv_num_blocks must lie in \[0, nk=4\]; got 1..5"):
        fk(np.array([[[1, 5]]]), idx)
    with pytest.raises(ValueError, match=r"full_kv_num_blocks must lie in \[0, nk=4\]"):
        fk(num, idx, np.array([[[-1, 0]]]), idx)
    with pytest.raises(ValueError, match=r"kv_indices must lie in \[0, nk=4\) where they are used"):
        fk(num, np.where(np.arange(4) == 1, 4, idx))
    with pytest.raises(ValueError, match=r"seq_lengths \(9, 10\) with BLOCK_SIZE \(4, 3\) make"):
        fk(num, idx, BLOCK_SIZE=(4, 3), seq_lengths=(9, 10))
    with pytest.raises(
        TypeError, match=r"kv_num_blocks must be an int array of shape \(B, H, nq\)"
    ):
        fk(num.astype(float), idx)
    with pytest.raises(
        TypeError, match=r"kv_indices must be an int array of shape \(B, H, nq, nk\)"
    ):
        fk(num, idx[0])
    with pytest.raises(TypeError, match="mask_mod must be callable or None; got int"):
        fk(num, idx, mask_mod=3)
    with pytest.raises(TypeError, match="BLOCK_SIZE must be an int or a pair"):
        fk(num, idx, BLOCK_SIZE=(1, 2, 3))
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        fk(num, idx, BLOCK_SIZE=0)
    with pytest.raises(TypeError, match="mask_mod must be callable; got int"):
        ar.create_block_mask(3, None, None, 4, 4)
    with pytest.raises(TypeError, match="separate_full_blocks must be a bool"):
        ar.create_block_mask(BM_MASK, None, None, 4, 4, separate_full_blocks=1)
    with pytest.raises(TypeError, match="check_block_mask needs a mask_mod"):
        ar.check_block_mask(bm)
    with pytest.raises(TypeError, match="block_mask must be an attention_ref BlockMask"):
        ar.check_block_mask(object(), BM_MASK)
    with pytest.raises(ValueError, match=r"B=3 does not match the BlockMask's B=2"):
        ar.check_block_mask(ar.create_block_mask(BM_MASK, 2, None, 4, 4, BLOCK_SIZE=2), B=3)


# ----------------------------------------------------------------------------- 5. index shapes


class ShapeMod(ar.ScoreMod):
    """A score mod asserting the documented shapes (B1) and recording its calls."""

    def __init__(self, T, S, tiled):
        self.T, self.S, self.tiled, self.calls, self.grads = T, S, tiled, [], 0

    def _check(self, score, b, h, q_idx, kv_idx):
        assert b.dtype == h.dtype == q_idx.dtype == kv_idx.dtype == np.int64
        assert b.shape == (B, 1, 1, 1) and np.array_equal(b.ravel(), np.arange(B))
        assert h.shape == (1, HQ, 1, 1) and np.array_equal(h.ravel(), np.arange(HQ))
        Tb, Sb = q_idx.shape[2], kv_idx.shape[3]
        assert q_idx.shape == (1, 1, Tb, 1) and kv_idx.shape == (1, 1, 1, Sb)
        assert score.shape == (B, HQ, Tb, Sb)
        if self.tiled:
            i0, j0 = int(q_idx[0, 0, 0, 0]), int(kv_idx[0, 0, 0, 0])
            assert i0 % BLOCK[0] == 0 and j0 % BLOCK[1] == 0
            assert np.array_equal(q_idx.ravel(), np.arange(i0, min(i0 + BLOCK[0], self.T)))
            assert np.array_equal(kv_idx.ravel(), np.arange(j0, min(j0 + BLOCK[1], self.S)))
        else:
            assert np.array_equal(q_idx.ravel(), np.arange(self.T))
            assert np.array_equal(kv_idx.ravel(), np.arange(self.S))
        return q_idx.ravel()[0] // BLOCK[0], kv_idx.ravel()[0] // BLOCK[1]

    def __call__(self, score, b, h, q_idx, kv_idx):
        self.calls.append(self._check(score, b, h, q_idx, kv_idx))
        return score + 0.1 * (q_idx - kv_idx)

    def grad_score(self, score, b, h, q_idx, kv_idx):
        self._check(score, b, h, q_idx, kv_idx)
        self.grads += 1
        return np.ones((1, 1, 1, 1))


class CountingMask:
    def __init__(self):
        self.n = 0

    def __call__(self, b, h, q_idx, kv_idx):
        assert b.shape == (B, 1, 1, 1) and h.shape == (1, HQ, 1, 1)
        assert q_idx.shape[-1] == 1 and kv_idx.shape[-2] == 1
        self.n += 1
        return q_idx + 3 >= kv_idx


def test_mod_index_shapes_and_one_call_on_the_plain_path(rng):
    T, S = T_BM, S_BM
    q, k, v = make_qkv(rng, T, S)
    mod, mask = ShapeMod(T, S, tiled=False), CountingMask()
    out = ar.flex_attention(q, k, v, score_mod=mod, mask_mod=mask, enable_gqa=True)
    assert len(mod.calls) == 1 and mask.n == 1 and mod.grads == 0
    ar.flex_attention_backward(
        rng.normal(size=out.shape), q, k, v, score_mod=mod, mask_mod=mask, enable_gqa=True
    )
    assert len(mod.calls) == 2 and mod.grads == 1 and mask.n == 2  # the recomputed forward, (B2)

    n = []

    def plain_fn(s, b, h, i, j):  # a plain function: the complex step calls it once more
        n.append(np.iscomplexobj(s))
        return s * 0.5

    ar.flex_attention_backward(
        rng.normal(size=out.shape), q, k, v, score_mod=plain_fn, enable_gqa=True
    )
    assert n == [False, True]

    tiled = ShapeMod(T, S, tiled=True)
    bm = ar.create_block_mask(BM_MASK, None, None, T, S, BLOCK_SIZE=BLOCK)
    got = ar.flex_attention(q, k, v, score_mod=tiled, block_mask=bm, path="tiled", enable_gqa=True)
    nonempty = {tuple(ij) for ij in np.argwhere(bm.kinds()[0, 0] > 0)}
    assert sorted(tiled.calls) == sorted(nonempty)  # once per computed tile; empty ones skipped
    want = ref_flex(q, k, v, lambda s, b, h, i, j: s + 0.1 * (i - j), m_causal(3))[0]
    assert np.abs(got - want).max() <= FWD_TOL


# ----------------------------------------------------------------------------- 6. bad inputs


def test_bad_inputs_raise_naming_the_argument(rng):
    T, S = 5, 7
    q, k, v = make_qkv(rng, T, S)
    f = ar.flex_attention
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, Hq, L, E\).*got shape \(4, 5, 3\)"):
        f(q[0], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="Hq=4 heads and k has Hkv=2: pass enable_gqa=True"):
        f(q, k, v)
    with pytest.raises(ValueError, match="enable_gqa needs Hq a multiple of Hkv; got Hq=3, Hkv=2"):
        f(q[:, :3], k, v, enable_gqa=True)
    k3, v3 = np.concatenate([k, k[:1]]), np.concatenate([v, v[:1]])
    with pytest.raises(ValueError, match="k and v must have q's batch size B=2 or 1.*got 3"):
        f(q, k3, v3, enable_gqa=True)
    bm = ar.create_block_mask(BM_MASK, None, None, T, S + 1, BLOCK_SIZE=BLOCK)
    for path in ("plain", "tiled"):
        with pytest.raises(
            ValueError, match=r"block_mask was made for \(Q_LEN, KV_LEN\) = \(5, 8\)"
        ):
            f(q, k, v, enable_gqa=True, block_mask=bm, path=path)

    class TorchLikeBlockMask:  # what a torch BlockMask looks like from here
        seq_lengths, BLOCK_SIZE, mask_mod = (T, S), (128, 128), None

    for path in ("plain", "tiled"):
        with pytest.raises(
            TypeError, match="block_mask must be an attention_ref BlockMask; got Torch"
        ):
            f(q, k, v, enable_gqa=True, block_mask=TorchLikeBlockMask(), path=path)
    wrong_b = ar.create_block_mask(BM_MASK, 3, None, T, S, BLOCK_SIZE=BLOCK)
    with pytest.raises(ValueError, match=r"block_mask's \(B, H\) = \(3, 1\) must be 1 or"):
        f(q, k, v, enable_gqa=True, block_mask=wrong_b, path="tiled")
    for path in ("plain", "tiled"):
        with pytest.raises(TypeError, match="mask_mod <lambda> must return a bool array.*int64"):
            f(q, k, v, enable_gqa=True, path=path, mask_mod=lambda b, h, i, j: (i >= j).astype(int))
    with pytest.raises(ValueError, match=r"spans \[0, 10\], outside the table's \[0, 10\)"):
        f(q, k, v, enable_gqa=True, score_mod=ar.RelativePositionBias(np.zeros((HQ, 10)), offset=6))
    with pytest.raises(ValueError, match="ALiBi has 2 heads' parameters but .* up to 3"):
        f(q, k, v, enable_gqa=True, score_mod=ar.ALiBi([0.5, 0.25]))
    with pytest.raises(ValueError, match="DocumentMask: q_doc_ids has 4 positions but .* up to 4"):
        f(q, k, v, enable_gqa=True, mask_mod=ar.DocumentMask([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="DocumentMask: kv_doc_ids has 3 positions"):
        f(q, k, v, enable_gqa=True, mask_mod=ar.DocumentMask([0, 0, 1, 1, 1], [0, 0, 1]))
    with pytest.raises(
        TypeError, match=r"q_doc_ids must be an int array of shape \(T,\) or \(B, T\)"
    ):
        ar.DocumentMask([0.0, 1.0])
    with pytest.raises(ValueError, match="path must be one of"):
        f(q, k, v, enable_gqa=True, path="fast")
    with pytest.raises(ValueError, match="check=True verifies a block_mask; got block_mask=None"):
        f(q, k, v, enable_gqa=True, check=True)
    with pytest.raises(TypeError, match="score_mod must be None, a ScoreMod or a callable"):
        f(q, k, v, enable_gqa=True, score_mod=3)
    with pytest.raises(TypeError, match="mask_mod must be None or a callable"):
        f(q, k, v, enable_gqa=True, mask_mod=3)
    with pytest.raises(ValueError, match=r"score_mod <lambda> returned shape \(2, 4, 5, 2\)"):
        f(q, k, v, enable_gqa=True, score_mod=lambda s, b, h, i, j: s[..., :2])
    with pytest.raises(ValueError, match=r"mask_mod <lambda> returned shape \(3, 3\)"):
        f(q, k, v, enable_gqa=True, mask_mod=lambda b, h, i, j: np.ones((3, 3), bool))
    with pytest.raises(TypeError, match="enable_gqa must be a bool; got 1"):
        f(q, k, v, enable_gqa=1)
    dout = rng.normal(size=(B, HQ, T, EV))
    with pytest.raises(ValueError, match=r"dlse must have the log-sum-exp's shape"):
        ar.flex_attention_backward(dout, q, k, v, enable_gqa=True, dlse=np.zeros((B, HQ, T - 1)))
    custom = ar.custom_score_mod(
        lambda s, b, h, i, j, w: s * w, params={"w": 1.0}, vjp_params=lambda *a, w: {"x": 0.0}
    )
    with pytest.raises(
        ValueError, match=r"vjp_params of <lambda> must return a gradient for each of \['w'\]"
    ):
        ar.flex_attention_backward(dout, q, k, v, enable_gqa=True, score_mod=custom)
    # the mods' own arguments
    with pytest.raises(TypeError, match=r"slopes must be a real array of shape \(H,\)"):
        ar.ALiBi(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="slopes must be finite"):
        ar.ALiBi([np.nan, 1.0])
    with pytest.raises(ValueError, match="cap must be > 0"):
        ar.SoftCap(-1.0)
    with pytest.raises(TypeError, match="offset must be an int; got 1.0"):
        ar.RelativePositionBias(np.zeros((2, 3)), offset=1.0)
    with pytest.raises(
        ValueError, match=r"ALiBi has parameters \['slopes'\]; got unknown \['slope'\]"
    ):
        ar.ALiBi([1.0, 2.0]).with_params(slope=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"slopes must keep its shape \(2,\); got \(3,\)"):
        ar.ALiBi([1.0, 2.0]).with_params(slopes=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="chain_score_mods needs at least one score mod"):
        ar.chain_score_mods()
    with pytest.raises(ValueError, match="prefix_lengths must be >= 0"):
        ar.PrefixLMMask([2, -1])
    with pytest.raises(TypeError, match="and_masks: argument 1 must be a mask mod"):
        ar.and_masks(BM_MASK, 3)


def _refusal_calls(rng):
    """Each path that does not compute mods, called with valid inputs: name -> call(**kw)."""
    from attention_ref.adapters.torch import run_torch_sdpa
    from attention_ref.oracle.exact import exact_sdpa
    from attention_ref.testing import sdpa_baseline
    from attention_ref.variants import context_parallel, decode, mla, paged, sparse, varlen

    n = rng.normal
    q4, k4, v4 = n(size=(2, 4, 3, 8)), n(size=(2, 2, 5, 8)), n(size=(2, 2, 5, 6))
    d4 = n(size=(2, 4, 3, 6))
    vq, vk, vv = n(size=(5, 2, 4)), n(size=(5, 2, 4)), n(size=(5, 2, 3))
    pages = (n(size=(6, 4, 2, 8)), n(size=(6, 4, 2, 5)), [[4, 1, 0], [2, 5, 3]], [7, 10])
    mla_in = (
        n(size=(2, 3, 2, 4)), n(size=(2, 3, 2, 2)), n(size=(2, 5, 6)), n(size=(2, 5, 2)),
        n(size=(3, 6, 4)), n(size=(3, 6, 3)),
    )  # fmt: skip
    idx = np.array([[0, 1], [1, -1], [2, 0]])[None, None]
    cp = (n(size=(2, 4, 8, 4)), n(size=(2, 2, 8, 4)), n(size=(2, 2, 8, 5)))
    params = ar.init_params(rng, d_model=8, num_heads=4, num_kv_heads=2)
    x, mem = n(size=(2, 3, 8)), n(size=(2, 7, 8))
    cache = decode.KVCache.empty((), num_kv_heads=2, head_dim=4, v_head_dim=3)
    return {
        "varlen_attention": lambda **kw: varlen.varlen_attention(
            vq, vk, vv, [0, 3, 5], [0, 3, 5], **kw
        ),
        "varlen_attention_backward": lambda **kw: varlen.varlen_attention_backward(
            n(size=(5, 2, 3)), vq, vk, vv, [0, 3, 5], [0, 3, 5], **kw
        ),
        "decode_step": lambda **kw: decode.decode_step(
            n(size=(2, 1, 4)), cache, n(size=(2, 1, 4)), n(size=(2, 1, 3)), **kw
        ),
        "paged_attention": lambda **kw: paged.paged_attention(q4, *pages, **kw),
        "paged_attention_backward": lambda **kw: paged.paged_attention_backward(
            n(size=(2, 4, 3, 5)), q4, *pages, **kw
        ),
        "attention_with_kvcache": lambda **kw: paged.attention_with_kvcache(
            n(size=(2, 1, 2, 4)),
            n(size=(2, 8, 1, 4)),
            n(size=(2, 8, 1, 4)),
            cache_seqlens=[3, 5],
            **kw,
        ),
        "mla_attention_naive": lambda **kw: mla.mla_attention_naive(*mla_in, **kw),
        "mla_attention_naive_backward": lambda **kw: mla.mla_attention_naive_backward(
            n(size=(2, 3, 2, 3)), *mla_in, **kw
        ),
        "sparse_attention": lambda **kw: sparse.sparse_attention(q4, k4, v4, idx, **kw),
        "sparse_attention_backward": lambda **kw: sparse.sparse_attention_backward(
            d4, q4, k4, v4, idx, **kw
        ),
        "context_parallel_attention": lambda **kw: context_parallel.context_parallel_attention(
            *cp, 2, **kw
        ),
        "context_parallel_attention_backward": lambda **kw: (
            context_parallel.context_parallel_attention_backward(n(size=(2, 4, 8, 5)), *cp, 2, **kw)
        ),
        "multi_head_attention": lambda **kw: ar.multi_head_attention(
            x, mem, mem, params, num_heads=4, num_kv_heads=2, **kw
        ),
        "multi_head_attention_backward": lambda **kw: ar.multi_head_attention_backward(
            n(size=(2, 3, 8)), x, mem, mem, params, num_heads=4, num_kv_heads=2, **kw
        ),
        "exact_sdpa": lambda **kw: exact_sdpa(
            n(size=(1, 2, 3, 2)), n(size=(1, 2, 4, 2)), n(size=(1, 2, 4, 2)), dps=30, **kw
        ),
        "run_torch_sdpa": lambda **kw: run_torch_sdpa(q4, k4, v4, d4, **kw),
        "sdpa_baseline": lambda **kw: sdpa_baseline(q4, k4, v4, d4, precision="bfloat16", **kw),
    }


REFUSING = [
    "varlen_attention", "varlen_attention_backward", "decode_step", "paged_attention",
    "paged_attention_backward", "attention_with_kvcache", "mla_attention_naive",
    "mla_attention_naive_backward", "sparse_attention", "sparse_attention_backward",
    "context_parallel_attention", "context_parallel_attention_backward", "multi_head_attention",
    "multi_head_attention_backward", "exact_sdpa", "run_torch_sdpa", "sdpa_baseline",
]  # fmt: skip


@pytest.mark.parametrize("name", REFUSING)
def test_other_paths_refuse_mods_by_name(name, rng):
    """Every path that does not compute score_mod/mask_mod refuses them with a ValueError that
    names them and the paths that do; the same call without them runs."""
    if name == "run_torch_sdpa":
        require_torch()
    call = _refusal_calls(rng)[name]
    call()
    pattern = r"does not support score_mod/mask_mod: they are computed by the plain path"
    for kw in (
        {"score_mod": lambda s, b, h, i, j: s},
        {"mask_mod": lambda b, h, i, j: i >= j},
        {"options": ar.AttentionOptions(score_mod=ar.SoftCap(2.0))},
    ):
        with pytest.raises(ValueError, match=pattern) as err:
            call(**kw)
        named = "mask_mod=" if "mask_mod" in kw else "score_mod="
        assert named in str(err.value)


# ----------------------------------------------------------------------------- 7. no mutation


def _snapshot(obj) -> dict[str, np.ndarray]:
    return {n: np.array(a, copy=True) for n, a in vars(obj).items() if isinstance(a, np.ndarray)}


@pytest.mark.parametrize("path", ["plain", "tiled"])
def test_nothing_is_mutated(path, rng):
    T, S = T_BM, S_BM
    q, k, v = make_qkv(rng, T, S)
    dout, dlse = rng.normal(size=(B, HQ, T, EV)), rng.normal(size=(B, HQ, T))
    slopes, table = rng.uniform(-0.5, 0.5, HQ), rng.normal(size=(HQ, 16))
    qd, kd = Q_DOC.copy(), KV_DOC.copy()
    mod = ar.chain_score_mods(ar.ALiBi(slopes), ar.RelativePositionBias(table, offset=9))
    mask = ar.and_masks(ar.DocumentMask(qd, kd), ar.CausalMask(3))
    bm = ar.create_block_mask(mask, B, None, T, S, BLOCK_SIZE=BLOCK)
    arrays = {"q": q, "k": k, "v": v, "dout": dout, "dlse": dlse, "slopes": slopes, "table": table}
    arrays.update(qd=qd, kd=kd)
    before = {n: a.copy() for n, a in arrays.items()}
    bm_before, params_before = _snapshot(bm), mod.params
    doc_before = _snapshot(mask.mods[0])
    kw = {"score_mod": mod, "mask_mod": mask, "enable_gqa": True, **path_kwargs(path, bm)}
    ar.flex_attention(q, k, v, return_lse=True, **kw)
    ar.flex_attention_backward(dout, q, k, v, dlse=dlse, **kw)
    for n, a in arrays.items():
        assert np.array_equal(a, before[n]), n
    for n, a in _snapshot(bm).items():
        assert np.array_equal(a, bm_before[n]), f"BlockMask.{n}"
    for n, a in _snapshot(mask.mods[0]).items():
        assert np.array_equal(a, doc_before[n]), f"DocumentMask.{n}"
    for n, p in mod.params.items():
        assert np.array_equal(p, params_before[n]), n
    # the mods hold copies: the caller's later changes do not reach them
    slopes += 1.0
    qd[:] = 0
    assert np.array_equal(mod.params["0.slopes"], before["slopes"])
    assert np.array_equal(mask.mods[0].q_doc_ids, before["qd"])


def test_with_params_returns_a_new_mod_and_params_returns_copies(rng):
    slopes, table = rng.uniform(-0.5, 0.5, HQ), rng.normal(size=(HQ, 16))
    mods = {
        "ALiBi": (ar.ALiBi(slopes), {"slopes": slopes + 1}),
        "SoftCap": (ar.SoftCap(2.0), {"cap": 3.0}),
        "RelativePositionBias": (ar.RelativePositionBias(table, offset=9), {"table": table * 2}),
        "T5RelativeBias": (ar.T5RelativeBias(table[:, :8]), {"table": table[:, :8] + 1}),
        "chain": (ar.chain_score_mods(ar.ALiBi(slopes), ar.SoftCap(2.0)), {"1.cap": 4.0}),
        "custom": (
            ar.custom_score_mod(_user_w, params={"w": slopes, "c": 0.5}),
            {"w": slopes - 1},
        ),
    }
    score = rng.normal(size=(B, HQ, 7, 10))
    idx = ar.mod_indices(B, HQ, 7, 10)
    for name, (mod, new) in mods.items():
        old_params, old_out = mod.params, mod(score, *idx)
        changed = mod.with_params(new)
        assert changed is not mod and type(changed) is type(mod), name
        for n, p in changed.params.items():
            want = np.asarray(new[n]) if n in new else old_params[n]
            assert np.array_equal(p, want), (name, n)
        for n, p in mod.params.items():
            assert np.array_equal(p, old_params[n]), (name, n)  # the old mod unchanged
        assert np.array_equal(mod(score, *idx), old_out)
        assert not np.array_equal(changed(score, *idx), old_out), name
        got = mod.params
        for p in got.values():
            p += 7.0  # a copy: the mod does not see it
        for n, p in mod.params.items():
            assert np.array_equal(p, old_params[n]), (name, n)
        assert np.array_equal(mod(score, *idx), old_out)
    assert ar.chain_score_mods(ar.SoftCap(2.0)).with_params({}).params["0.cap"] == 2.0
