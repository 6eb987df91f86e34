"""Property-based tests of the public API (hypothesis): for random shapes, dtypes and options,
``scaled_dot_product_attention`` and the tiled path equal the naive loops of ``tests/naive.py``,
or refuse with a ValueError/TypeError that names the argument; inputs are never mutated. Random
bad values of each option are refused by name."""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from naive import naive_attention  # noqa: E402

import attention_ref as ar  # noqa: E402
from attention_ref.variants.flash import flash_attention_forward  # noqa: E402

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def problems(draw):
    """Inputs and options of one attention call, all valid."""
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 2))
    T, S = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    Dk, Dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from([np.float64, np.float32, np.float16, np.int64]))
    scale_in = 3.0 if dtype == np.int64 else 1.0
    q = (rng.normal(size=(B, H, T, Dk)) * scale_in).astype(dtype)
    k = (rng.normal(size=(B, Hkv, S, Dk)) * scale_in).astype(dtype)
    v = (rng.normal(size=(B, Hkv, S, Dv)) * scale_in).astype(dtype)
    side = st.one_of(st.none(), st.integers(0, 6))
    opts = dict(
        causal=draw(st.booleans()),
        align=draw(st.sampled_from(["top_left", "bottom_right"])),
        window=draw(st.one_of(st.none(), st.tuples(side, side))),
        chunk_size=draw(st.one_of(st.none(), st.integers(1, 4))),
        sink_tokens=draw(st.integers(0, 2)),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 10.0))),
        scale=draw(st.one_of(st.none(), st.floats(0.0, 2.0))),
        empty_rows=draw(st.sampled_from(["zero", "uniform", "nan"])),
    )
    if draw(st.booleans()):
        opts["mask"] = rng.random(draw(st.sampled_from([(S,), (T, S), (B, 1, T, S)]))) > 0.3
    if draw(st.booleans()):
        bias = rng.normal(size=(1, H, T, S))
        bias[rng.random(bias.shape) > 0.8] = -np.inf
        opts["bias"] = bias
    if draw(st.booleans()):
        opts["sinks"] = rng.normal(size=H)
    return q, k, v, opts


@SETTINGS
@given(problems())
def test_attention_equals_the_naive_loops_and_mutates_nothing(problem):
    q, k, v, opts = problem
    before = [x.copy() for x in (q, k, v)] + [
        o.copy() for o in opts.values() if isinstance(o, np.ndarray)
    ]
    out = ar.scaled_dot_product_attention(q, k, v, **opts)
    want = naive_attention(*(x.astype(np.float64) for x in (q, k, v)), **opts)
    np.testing.assert_allclose(out, want, rtol=1e-11, atol=1e-13)  # NaN where NaN
    tiled = flash_attention_forward(q, k, v, block_q=2, block_k=3, num_splits=2, **opts).out
    np.testing.assert_allclose(tiled, want, rtol=1e-11, atol=1e-13)
    after = [x for x in (q, k, v)] + [o for o in opts.values() if isinstance(o, np.ndarray)]
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after, strict=True))


BAD_VALUES = {
    "causal": ["yes", 1, None],
    "align": ["middle", 0],
    "window": [(-1, 0), (0,), "wide", (1.5, None), (2**63, None)],
    "chunk_size": [0, -2, 1.5, True],
    "sink_tokens": [-1, 0.5],
    "softcap": [0.0, -1.0, float("nan"), "big"],
    "scale": [-1.0, float("inf"), "x"],
    "dropout_p": [1.0, -0.1, float("nan")],
    "empty_rows": ["bogus", None],
    "sinks": [np.zeros(7), np.array([np.inf, 0.0]), "abc"],
    "mask": [np.zeros((3, 9), bool), np.ones((2, 2)), "all"],
    "bias": [np.zeros((4, 4)), np.array([[np.nan]]), np.full((1,), np.inf)],
}


@SETTINGS
@given(st.sampled_from(sorted(BAD_VALUES)), st.data())
def test_a_bad_option_is_refused_by_name(name, data):
    value = data.draw(st.sampled_from(BAD_VALUES[name]))
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 5, 4))
    with pytest.raises((ValueError, TypeError)) as exc:
        ar.scaled_dot_product_attention(q, k, v, **{name: value})
    assert name in str(exc.value), (name, value, str(exc.value))


def test_the_property_fails_when_the_library_is_wrong(monkeypatch):
    """Not vacuous: the same property, run on a library whose sink tokens are ignored, fails."""
    import attention_ref.core.masks as masks

    real = masks._positional

    def forgets_sink_tokens(rows, cols, causal, window, offset, chunk_size=None, sink_tokens=0):
        return real(rows, cols, causal, window, offset, chunk_size, 0)

    monkeypatch.setattr(masks, "_positional", forgets_sink_tokens)
    with pytest.raises(AssertionError):
        test_attention_equals_the_naive_loops_and_mutates_nothing()
