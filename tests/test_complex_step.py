"""Every backward against the complex step, to 1e-12 relative (finite differences reach ~1e-8).

The complex step ``Im f(x + i h t) / h`` (G4) takes no difference, so it is exact to round-off
for analytic code; the forwards of attention_ref are complex-safe (the max shift uses the real
part) so every hand-written backward can be held to float64 precision.
"""

from __future__ import annotations

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.cases import cases
from attention_ref.core.attention import dropout_backward, dropout_forward
from attention_ref.core.masks import causal_mask
from attention_ref.core.scores import (
    add_bias_backward,
    apply_mask,
    apply_mask_backward,
    scaled_scores,
    scaled_scores_backward,
    softcap_backward,
    softcap_forward,
    weighted_values,
    weighted_values_backward,
)
from attention_ref.gradcheck import (
    CS_RTOL,
    FD_RTOL,
    check_complex_step,
    check_vjp,
    complex_step_vjp,
)

B, H, HKV, T, S, DK, DV = 2, 4, 2, 3, 5, 4, 6


def _assert_cs(result):
    assert result.passed, f"\n{result}"
    assert CS_RTOL <= 1e-12


# ----------------------------------------------------------------------------- the method itself


def test_complex_step_matches_closed_form_derivatives(rng):
    x, c = rng.normal(size=7), rng.normal(size=7)
    g = complex_step_vjp(lambda x: np.exp(np.sin(x)), x, c)
    expected = np.exp(np.sin(x)) * np.cos(x) * c  # d/dx exp(sin x), written from calculus
    np.testing.assert_allclose(g, expected, rtol=1e-15, atol=0)


def test_complex_step_is_exact_where_finite_differences_are_not(rng):
    # f(x) = x^2 at a large x: a central difference loses ~8 digits to cancellation, the complex
    # step none.
    from attention_ref.gradcheck import numerical_vjp

    x, c = np.array([1e4]), np.array([1.0])
    assert complex_step_vjp(lambda x: x * x, x, c)[0] == 2e4
    assert abs(numerical_vjp(lambda x: x * x, x, c)[0] - 2e4) > 1e-6


def test_refuses_a_forward_that_drops_the_imaginary_part(rng):
    x, c = rng.normal(size=3), rng.normal(size=3)
    with pytest.raises(ValueError, match="not complex-safe"):
        complex_step_vjp(lambda x: np.real(x) ** 2, x, c)


def test_directional_mode_needs_a_generator(rng):
    x, c = rng.normal(size=3), rng.normal(size=3)
    with pytest.raises(TypeError, match="num_directions needs rng"):
        check_complex_step(lambda x: x * 1.0, {"x": x}, c, {"x": c}, num_directions=2)


def test_catches_an_error_far_below_what_finite_differences_can_see(rng):
    data = cases("sdpa")[0].build()
    ref = data.reference()
    wrong = {**ref.grads, "v": ref.grads["v"] * (1 + 1e-9)}
    f = data.function()
    assert check_vjp(f, data.inputs, data.cotangent, wrong).passed  # 1e-9 < FD_RTOL: invisible
    assert FD_RTOL > 1e-9
    result = check_complex_step(f, data.inputs, data.cotangent, wrong)
    assert not result.passed and result.worst[0] == "v"
    assert result.reports["v"].rel_error == pytest.approx(1e-9, rel=1e-3)


def test_complex_forward_real_part_is_the_real_forward(rng):
    data = [c for c in cases("sdpa") if c.name == "softcap"][0].build()
    t = rng.normal(size=data.inputs["q"].shape)
    out_c = data.forward(q=data.inputs["q"] + 1e-30j * t)
    assert out_c.dtype == np.complex128
    np.testing.assert_allclose(out_c.real, data.forward(), rtol=0, atol=1e-15)


def test_complex_inputs_are_not_modified(rng):
    q = rng.normal(size=(B, H, T, DK)) + 1e-30j * rng.normal(size=(B, H, T, DK))
    k, v = rng.normal(size=(B, HKV, S, DK)), rng.normal(size=(B, HKV, S, DV))
    before = q.copy()
    ar.scaled_dot_product_attention(q, k, v, causal=True)
    assert np.array_equal(q, before)


# ----------------------------------------------------------------------------- every backward


@pytest.mark.parametrize("case", cases(), ids=str)
def test_attention_backward_on_every_canonical_case(case):
    data = case.build()
    ref = data.reference()
    kw = dict(num_directions=4, rng=np.random.default_rng(0)) if "long" in case.tags else {}
    _assert_cs(check_complex_step(data.function(), data.inputs, data.cotangent, ref.grads, **kw))


def test_linear_backward(rng):
    x, w, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5)), rng.normal(size=5)
    c = rng.normal(size=(2, 3, 5))
    g = ar.linear_backward(c, x, w, b)
    _assert_cs(
        check_complex_step(
            ar.linear,
            {"x": x, "weight": w, "bias": b},
            c,
            {"x": g.dx, "weight": g.dweight, "bias": g.dbias},
        )
    )


def test_head_split_and_merge_backwards(rng):
    x, c = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 3, 2))
    _assert_cs(
        check_complex_step(
            lambda x: ar.split_heads(x, 3), {"x": x}, c, {"x": ar.split_heads_backward(c)}
        )
    )
    x, c = rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(2, 4, 6))
    _assert_cs(
        check_complex_step(ar.merge_heads, {"x": x}, c, {"x": ar.merge_heads_backward(c, 3)})
    )


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_and_logsumexp_backwards(rng, axis):
    x, c = 4 * rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    _assert_cs(
        check_complex_step(
            lambda x: ar.softmax(x, axis=axis),
            {"x": x},
            c,
            {"x": ar.softmax_backward(c, ar.softmax(x, axis=axis), axis=axis)},
        )
    )
    c = rng.normal(size=ar.logsumexp(x, axis=axis).shape)
    _assert_cs(
        check_complex_step(
            lambda x: ar.logsumexp(x, axis=axis),
            {"x": x},
            c,
            {"x": ar.logsumexp_backward(c, x, axis=axis)},
        )
    )


def test_internal_stage_backwards(rng):
    q, k = rng.normal(size=(B, H, T, DK)), rng.normal(size=(B, HKV, S, DK))
    c = rng.normal(size=(B, H, T, S))
    dq, dk = scaled_scores_backward(c, q, k, 0.7)
    _assert_cs(
        check_complex_step(
            lambda q, k: scaled_scores(q, k, 0.7), {"q": q, "k": k}, c, {"q": dq, "k": dk}
        )
    )

    w, v = rng.random(size=(B, H, T, S)), rng.normal(size=(B, HKV, S, DV))
    c = rng.normal(size=(B, H, T, DV))
    dw, dv = weighted_values_backward(c, w, v)
    _assert_cs(
        check_complex_step(weighted_values, {"weights": w, "v": v}, c, {"weights": dw, "v": dv})
    )

    s, c = 3 * rng.normal(size=(B, H, T, S)), rng.normal(size=(B, H, T, S))
    _assert_cs(
        check_complex_step(
            lambda s: softcap_forward(s, 2.0),
            {"s": s},
            c,
            {"s": softcap_backward(c, softcap_forward(s, 2.0), 2.0)},
        )
    )

    allowed = causal_mask(T, S, align="bottom_right")
    _assert_cs(
        check_complex_step(
            lambda x: apply_mask(x, allowed), {"x": s}, c, {"x": apply_mask_backward(c, allowed)}
        )
    )

    capped, bias = rng.normal(size=(B, H, T, S)), rng.normal(size=(H, 1, S))
    _assert_cs(
        check_complex_step(
            lambda bias: capped + bias,
            {"bias": bias},
            c,
            {"bias": add_bias_backward(c, bias.shape)},
        )
    )

    p, keep = rng.random(size=(B, H, T, S)), rng.random(size=(B, H, T, S)) >= 0.3
    _assert_cs(
        check_complex_step(
            lambda p: dropout_forward(p, keep, 0.3),
            {"p": p},
            c,
            {"p": dropout_backward(c, keep, 0.3)},
        )
    )


def test_multi_head_attention_directional_at_realistic_size(rng):
    p = ar.init_params(rng, d_model=64, num_heads=8, num_kv_heads=2, kdim=48, vdim=40)
    query, key, value = (
        rng.normal(size=(2, 48, 64)),
        rng.normal(size=(2, 64, 48)),
        rng.normal(size=(2, 64, 40)),
    )
    tr = ar.mha_forward(
        query, key, value, p, num_heads=8, num_kv_heads=2, causal=True, align="bottom_right"
    )
    c = rng.normal(size=tr.out.shape)
    g = ar.mha_backward(c, tr)

    def f(query, key, value, **weights):
        return ar.multi_head_attention(
            query,
            key,
            value,
            ar.MultiHeadParams(**weights),
            num_heads=8,
            num_kv_heads=2,
            causal=True,
            align="bottom_right",
        )

    _assert_cs(
        check_complex_step(
            f,
            {"query": query, "key": key, "value": value, **p.as_dict()},
            c,
            g.as_dict(),
            num_directions=3,
            rng=rng,
        )
    )
