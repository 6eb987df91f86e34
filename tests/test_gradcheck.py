"""The checker is itself tested: exact on known derivatives, and it rejects known-wrong
backwards."""

from __future__ import annotations

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.gradcheck import (
    check_directional,
    check_vjp,
    error_report,
    fd_noise_floor,
    numerical_vjp,
)

T, S = 4, 6  # T != S so a causal alignment bug shows


def diagonal_only_softmax_backward(dprobs, probs):
    """A classic wrong backward: only the Jacobian's diagonal p (1 - p), no cross terms."""
    return probs * (1 - probs) * dprobs


def test_numerical_vjp_matches_a_hand_derivative(rng):
    x, c = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    # f(x) = sin(x) * x**2 elementwise: f'(x) = cos(x) x^2 + 2 x sin(x), derived by hand
    expected = (np.cos(x) * x**2 + 2 * x * np.sin(x)) * c
    got = numerical_vjp(lambda x: np.sin(x) * x**2, x, c)
    assert error_report(got, expected).rel_error < 1e-9


def test_numerical_vjp_of_a_matrix_product(rng):
    a, w, c = rng.normal(size=(5, 3)), rng.normal(size=(3, 2)), rng.normal(size=(5, 2))
    # y = a @ w: the VJP with respect to w is a^T c
    assert error_report(numerical_vjp(lambda w: a @ w, w, c), a.T @ c).rel_error < 1e-9


def test_numerical_vjp_does_not_modify_its_input(rng):
    x = rng.normal(size=(2, 3))
    x.setflags(write=False)
    numerical_vjp(np.tanh, x, rng.normal(size=(2, 3)))


def test_softmax_checker_accepts_right_and_rejects_diagonal_only(rng):
    x, c = rng.normal(size=(3, S)), rng.normal(size=(3, S))
    p = ar.softmax(x)
    good = check_vjp(ar.softmax, {"x": x}, c, {"x": ar.softmax_backward(c, p)})
    bad = check_vjp(ar.softmax, {"x": x}, c, {"x": diagonal_only_softmax_backward(c, p)})
    assert good.passed and not bad.passed
    assert bad.reports["x"].rel_error > 1e-2  # wrong by O(1), not by noise
    bad_dir = check_directional(
        ar.softmax, {"x": x}, c, {"x": diagonal_only_softmax_backward(c, p)}, rng=rng
    )
    assert not bad_dir.passed


def test_all_ones_cotangent_cannot_see_a_wrong_softmax_backward(rng):
    """Why random cotangents: rows of softmax sum to 1, so with c = 1 the true gradient is 0, and a
    backward that is wrong by a factor (here: its sign) still gives 0 and passes."""
    x = rng.normal(size=(3, S))
    p = ar.softmax(x)

    def wrong(c):
        return -ar.softmax_backward(c, p)

    ones = np.ones((3, S))
    assert check_vjp(ar.softmax, {"x": x}, ones, {"x": wrong(ones)}).passed
    c = rng.normal(size=(3, S))
    assert not check_vjp(ar.softmax, {"x": x}, c, {"x": wrong(c)}).passed


def test_checker_rejects_a_causal_mask_aligned_the_wrong_way(rng):
    q, k, v = (
        rng.normal(size=(2, 2, T, 3)),
        rng.normal(size=(2, 2, S, 3)),
        rng.normal(size=(2, 2, S, 5)),
    )
    c = rng.normal(size=(2, 2, T, 5))

    def forward(**kw):
        return ar.scaled_dot_product_attention(**kw, causal=True, align="bottom_right")

    right = ar.scaled_dot_product_attention_backward(c, q, k, v, causal=True, align="bottom_right")
    wrong = ar.scaled_dot_product_attention_backward(c, q, k, v, causal=True, align="top_left")
    inputs = {"q": q, "k": k, "v": v}
    assert check_vjp(forward, inputs, c, {"q": right.dq, "k": right.dk, "v": right.dv}).passed
    result = check_vjp(forward, inputs, c, {"q": wrong.dq, "k": wrong.dk, "v": wrong.dv})
    assert not any(r.passed(result.rtol, result.atol) for r in result.reports.values()), result
    assert not check_directional(
        forward, inputs, c, {"q": wrong.dq, "k": wrong.dk, "v": wrong.dv}, rng=rng
    ).passed


def test_checker_rejects_gqa_gradients_not_summed_over_the_group(rng):
    q, k, v = (
        rng.normal(size=(2, 4, T, 3)),
        rng.normal(size=(2, 2, S, 3)),
        rng.normal(size=(2, 2, S, 5)),
    )
    c = rng.normal(size=(2, 4, T, 5))
    g_rep = ar.scaled_dot_product_attention_backward(
        c, q, np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    )
    first_of_group = g_rep.dk[:, ::2]  # forgot to sum over the group's query heads
    result = check_vjp(
        lambda k: ar.scaled_dot_product_attention(q, k, v), {"k": k}, c, {"k": first_of_group}
    )
    assert not result.passed


def test_checker_rejects_a_scale_off_by_one_percent(rng):
    q, k, v = (
        rng.normal(size=(2, 2, T, 3)),
        rng.normal(size=(2, 2, S, 3)),
        rng.normal(size=(2, 2, S, 5)),
    )
    c = rng.normal(size=(2, 2, T, 5))
    g = ar.scaled_dot_product_attention_backward(c, q, k, v)
    result = check_directional(
        lambda q: ar.scaled_dot_product_attention(q, k, v),
        {"q": q},
        c,
        {"q": 1.01 * g.dq},
        rng=rng,
        num_directions=2,
    )
    assert not result.passed


def test_error_report_locates_the_worst_element_and_counts_nonfinite_mismatches():
    a = np.array([[1.0, 2.0], [3.0, np.nan]])
    e = np.array([[1.0, 2.5], [3.0, 4.0]])
    r = error_report(a, e)
    assert r.location == (0, 1) and r.actual == 2.0 and r.expected == 2.5
    assert r.max_abs_error == 0.5 and r.rel_error == pytest.approx(0.5 / 3.0)
    assert r.nonfinite_mismatch == 1 and not r.passed(1.0, 1.0)
    assert "(0, 1)" in str(r)
    both_nan = error_report(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]))
    assert both_nan.nonfinite_mismatch == 0 and both_nan.passed(0.0, 0.0)


def test_noise_floor_scales_with_f_and_c(rng):
    """fd_noise_floor bounds the round-off of a central difference, measured: on f(x) = A x + b
    the central difference has no truncation error (f is linear), so its whole error against the
    exact J^T c = A^T c is round-off, which grows with |f| (the offset b), |c| and 1/eps. Over
    12 decades of floor the measured error stays below it, and above 1e-4 of it (measured: 2e-3
    to 1e-2 of it): a bound that tracks the error, neither too tight nor absurdly loose."""
    A = rng.normal(size=(40, 12))  # f: R^12 -> R^40
    for offset in (0.0, 1.0, 1e3, 1e6):  # |f(x)| ~ offset: the round-off of f grows with it
        for c_size in (1e-3, 1.0, 1e4):
            for eps in (1e-6, 1e-4):
                x, b = rng.normal(size=12), offset * rng.normal(size=40)
                c = c_size * rng.normal(size=40)
                fd = np.array(
                    [
                        (A @ (x + eps * e) + b - (A @ (x - eps * e) + b)) @ c / (2 * eps)
                        for e in np.eye(12)
                    ]
                )  # (G1), by hand
                error = float(np.max(np.abs(fd - A.T @ c)))  # A^T c: exact to ~1e-16 of it
                floor = fd_noise_floor(A @ x + b, c, eps)
                assert 1e-4 * floor < error <= floor, (offset, c_size, eps, error, floor)


def test_checker_reports_name_and_location_in_its_table(rng):
    x, c = rng.normal(size=(2, S)), rng.normal(size=(2, S))
    result = check_vjp(
        ar.softmax, {"x": x}, c, {"x": diagonal_only_softmax_backward(c, ar.softmax(x))}
    )
    text = str(result)
    assert text.startswith("FAIL dx:") and "at (" in text
    assert result.worst[0] == "x"


def test_checker_validates_its_arguments(rng):
    x = rng.normal(size=(2, 3))
    with pytest.raises(ValueError, match=r"grads\['x'\] must have the input's shape \(2, 3\)"):
        check_vjp(ar.softmax, {"x": x}, x, {"x": np.zeros(3)})
    with pytest.raises(ValueError, match=r"grads must hold a gradient for 'x'"):
        check_vjp(ar.softmax, {"x": x}, x, {})
    with pytest.raises(ValueError, match=r"f\(x\) must have cotangent's shape"):
        numerical_vjp(ar.softmax, x, np.zeros(4))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        check_directional(ar.softmax, {"x": x}, x, {"x": x}, rng=0)


def test_error_report_scale_for_gradients_that_are_zero_in_exact_arithmetic():
    roundoff = np.array([4e-16, -2e-16])
    assert error_report(roundoff, -roundoff).rel_error > 1  # round-off against round-off
    assert error_report(roundoff, -roundoff, scale=2.0).rel_error == pytest.approx(4e-16)


def test_noise_floor_refuses_to_be_infinite(rng):
    """An output holding a huge finite fill would make the default atol infinite, and then any
    gradient would pass; the checker refuses instead of passing a wrong backward."""
    x = rng.normal(size=(2, 3))
    fill = np.finfo(np.float64).min

    def f(x):
        return np.where([[True, False, True]] * 2, x, fill)

    with pytest.raises(ValueError, match="pass atol explicitly"):
        fd_noise_floor(f(x), rng.normal(size=(2, 3)))
    with pytest.raises(ValueError, match="pass atol explicitly"):
        check_vjp(f, {"x": x}, rng.normal(size=(2, 3)), {"x": np.zeros((2, 3))})
