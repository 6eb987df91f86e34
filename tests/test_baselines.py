"""The low-precision baselines are the core stages under a rounding policy, not a second copy.

* In float64 the policy rounds nothing, so the "baseline" is the reference bit for bit, on every
  canonical case, output and gradients.
* In bfloat16 every stored intermediate is a bfloat16 value (the policy rounded it) and the
  output equals a forward rounded by hand at the documented places, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from attention_ref import AttentionOptions, sdpa_forward
from attention_ref.cases import cases
from attention_ref.core.precision import Rounding, round_to
from attention_ref.testing import budget_reports, mha_baseline, sdpa_baseline


def _baseline(data, precision, reorder=False):
    if data.case.kind == "sdpa":
        return sdpa_baseline(
            **data.inputs, dout=data.cotangent, precision=precision, reorder=reorder, **data.options
        )
    from attention_ref import MultiHeadParams

    weights = {n: a for n, a in data.inputs.items() if n.startswith(("w_", "b_"))}
    extra = {"bias": data.inputs["bias"]} if "bias" in data.inputs else {}
    return mha_baseline(
        data.inputs["query"],
        data.inputs["key"],
        data.inputs["value"],
        MultiHeadParams(**weights),
        data.cotangent,
        precision=precision,
        reorder=reorder,
        **extra,
        **data.options,
    )


@pytest.mark.parametrize("case", cases(), ids=str)
def test_the_float64_baseline_is_the_reference_bit_for_bit(case):
    data = case.build()
    ref = data.reference()
    base = _baseline(data, "float64")
    np.testing.assert_array_equal(base.out, ref.out)
    assert set(base.grads) == set(ref.grads)
    for name, g in ref.grads.items():
        np.testing.assert_array_equal(base.grads[name], g, err_msg=name)


def test_every_stage_of_a_bfloat16_baseline_holds_bfloat16_values(rng):
    q, k, v = (
        rng.normal(size=(2, 4, 3, 8)),
        rng.normal(size=(2, 2, 5, 8)),
        rng.normal(size=(2, 2, 5, 6)),
    )
    tr = sdpa_forward(
        q,
        k,
        v,
        options=AttentionOptions(
            causal=True,
            align="bottom_right",
            softcap=3.0,
            bias=rng.normal(size=(4, 3, 5)),
            rounding=Rounding("bfloat16"),
        ),
    )
    assert tr.out.dtype == np.float32
    for name in ("q", "k", "v", "bias", "scores", "capped_scores", "logits", "probs", "out"):
        x = getattr(tr, name)
        np.testing.assert_array_equal(round_to(x, "bfloat16"), x, err_msg=name)
    # ... and the reference's trace does not (the check can fail)
    ref = sdpa_forward(q, k, v, causal=True)
    assert not np.array_equal(round_to(ref.probs, "bfloat16"), ref.probs)


@pytest.mark.parametrize("reorder", [False, True])
def test_the_bfloat16_forward_rounds_where_documented(rng, reorder):
    """An independent forward, written here with numpy and rounded by hand at each stage."""
    q, k, v = rng.normal(size=(3, 4, 8)), rng.normal(size=(3, 6, 8)), rng.normal(size=(3, 6, 5))
    r = lambda x: round_to(x, "bfloat16")  # noqa: E731
    scale = np.float32(1 / np.sqrt(8))
    qr, kr, vr = r(q), r(k), r(v)
    s = (
        r((r(qr * scale) @ kr.swapaxes(-1, -2)))
        if reorder
        else r((qr @ kr.swapaxes(-1, -2)) * scale)
    )
    e = np.exp(s - s.max(-1, keepdims=True))
    p = r(e / e.sum(-1, keepdims=True))
    want = r(p @ vr)
    got = sdpa_baseline(q, k, v, precision="bfloat16", reorder=reorder).out
    np.testing.assert_array_equal(got, want)
    other = sdpa_baseline(q, k, v, precision="bfloat16", reorder=not reorder).out
    assert not np.array_equal(other, want)  # the order of operations is visible


@pytest.mark.parametrize("name", ["gqa", "softcap", "mha_gqa_kdim_vdim"])
def test_a_baseline_judges_itself_within_budget(name):
    from attention_ref.cases import get_case

    data = get_case(name).build()
    base = _baseline(data, "bfloat16")
    assert all(
        rep.passed for rep in budget_reports(data, base.out, base.grads, precision="bfloat16")
    )
