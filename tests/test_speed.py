"""The fast plain path: in-place updates never reach the caller's arrays or the trace; the softmax
and its backward's shortcuts equal the literal stages; ``benchmarks/speed.py --quick`` runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attention_ref import sdpa_backward, sdpa_forward, softmax

ROOT = Path(__file__).resolve().parents[1]
B, H, HKV, T, S, DK, DV = 2, 4, 2, 3, 5, 4, 6

OPTION_SETS = {
    "mask_and_bias": {},
    "causal": {"causal": True, "align": "bottom_right"},
    "everything": {"causal": True, "softcap": 2.0, "dropout_p": 0.25, "empty_rows": "uniform"},
}


def _snapshot(trace) -> dict[str, np.ndarray]:
    return {
        name: np.array(value, copy=True)
        for name, value in trace._asdict().items()
        if isinstance(value, np.ndarray)
    }


def _assert_unchanged(trace, snapshot: dict[str, np.ndarray]) -> None:
    for field, before in snapshot.items():
        np.testing.assert_array_equal(
            getattr(trace, field), before, err_msg=f"trace.{field} was written"
        )


def test_the_trace_check_catches_a_write(rng):
    """The comparison below is not vacuous: one entry written into the trace's weights fails it."""
    trace = sdpa_forward(
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
    )
    snapshot = _snapshot(trace)
    trace.probs[1, 2, 0, 3] += 0.5  # what an in-place softmax backward on the wrong array would do
    with pytest.raises(AssertionError, match="trace.probs"):
        _assert_unchanged(trace, snapshot)


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_backward_writes_neither_the_trace_nor_the_inputs(rng, name):
    """sdpa_backward updates its own (..., H, T, S) gradient in place: the trace and dout stay as
    they were, and a second backward on the same trace gives the same gradients."""
    q, k, v = (
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
    )
    dout = rng.normal(size=(B, H, T, DV))
    options = dict(OPTION_SETS[name])
    if options.get("dropout_p"):
        options["dropout_mask"] = rng.random((B, H, T, S)) >= options["dropout_p"]
    options["bias"] = rng.normal(size=(H, T, S))
    options["mask"] = rng.random((T, S)) < 0.7
    inputs = {"q": q, "k": k, "v": v, "dout": dout, **{n: options[n] for n in ("bias", "mask")}}
    inputs_before = {n: x.copy() for n, x in inputs.items()}
    trace = sdpa_forward(q, k, v, **options)
    trace_before = _snapshot(trace)
    first = sdpa_backward(dout, trace)
    second = sdpa_backward(dout, trace)
    _assert_unchanged(trace, trace_before)
    for n, before in inputs_before.items():
        np.testing.assert_array_equal(inputs[n], before, err_msg=f"the caller's {n} was written")
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_softmax_of_logits_equals_softmax_of_masked_scores(rng):
    """The forward exponentiates the logits and sets the masked weights to 0 instead of
    exponentiating the fill: on every row with an allowed key that is bitwise the softmax of the
    masked scores (exp(fill - max) underflows to exactly 0), even where a masked logit would
    overflow exp or is a -inf bias. Forgetting to zero the masked weights fails it."""
    fill = np.finfo(np.float64).min
    q, k, v = (
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
    )
    mask = rng.random((B, 1, T, S)) < 0.5
    mask[..., 0] = True  # every row has an allowed key
    bias = 30 * rng.normal(size=(H, T, S))  # large scores: some allowed weights underflow too
    bias[0, 0, 1:3] = [1e6, -np.inf]  # a masked logit that overflows exp, and a -inf bias entry
    mask[:, :, 0, 1] = False
    trace = sdpa_forward(q, k, v, mask=mask, bias=bias)
    assert np.array_equal(trace.masked_logits, np.where(trace.allowed, trace.logits, fill))
    np.testing.assert_array_equal(trace.probs, softmax(trace.masked_logits))
    assert np.all(trace.probs[np.broadcast_to(~trace.allowed, trace.probs.shape)] == 0)
    with np.errstate(over="ignore", invalid="ignore"):
        unzeroed = np.exp(trace.logits - trace.row_max[..., None])  # the masked weights left in
        unzeroed /= unzeroed.sum(-1, keepdims=True)
    assert not np.allclose(unzeroed, trace.probs, equal_nan=True)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform", "nan"])
def test_backward_shortcuts_equal_the_stage_by_stage_backward(rng, empty_rows):
    """sdpa_backward zeroes masked gradients only on empty rows (elsewhere P = 0 there, so (A11)
    gave 0 already): equal to the literal stages, (A12) on every masked entry, to rounding."""
    q, k, v = (
        rng.normal(size=(B, H, T, DK)),
        rng.normal(size=(B, HKV, S, DK)),
        rng.normal(size=(B, HKV, S, DV)),
    )
    dout = rng.normal(size=(B, H, T, DV))
    mask = rng.random((B, 1, T, S)) < 0.6
    mask[0, 0, 1] = False  # one empty row in each head of batch 0
    keep = rng.random((B, H, T, S)) >= 0.2
    trace = sdpa_forward(
        q,
        k,
        v,
        mask=mask,
        bias=rng.normal(size=(H, T, S)),
        causal=True,
        align="bottom_right",
        dropout_p=0.2,
        dropout_mask=keep,
        empty_rows=empty_rows,
    )
    got = sdpa_backward(dout, trace)
    # The literal stages, (A8)-(A16), on the same trace:
    dprobs = (dout @ trace.v.repeat(H // HKV, axis=-3).swapaxes(-1, -2)) * keep / 0.8  # (A8), (A10)
    dmasked = trace.probs * (dprobs - np.sum(dprobs * trace.probs, axis=-1, keepdims=True))  # (A11)
    dlogits = np.where(trace.allowed, dmasked, 0.0)  # (A12)
    np.testing.assert_allclose(got.dbias, dlogits.sum(0), rtol=1e-12, atol=1e-14)
    dq = dlogits @ trace.k.repeat(H // HKV, axis=-3) * trace.scale  # (A15)
    np.testing.assert_allclose(got.dq, dq, rtol=1e-12, atol=1e-14)


def test_speed_benchmark_quick_prints_ratios():
    """``--quick`` runs end to end: it found torch SDPA, torch math and the tiled path giving ours'
    gradients (it checks before timing, and stops with status 1 when one does not:
    test_speed_benchmark_stops_on_a_wrong_contender), then printed both tables, a ratio in every
    timed cell. Nothing here asserts a speed."""
    from conftest import require_torch

    require_torch()
    run = _run_speed_quick()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.startswith("threads:") for line in lines), run.stdout
    assert any(
        line.startswith(
            "Every contender's dq, dk, dv equal ours to 1e-10 of their "
            "largest entry (torch SDPA, torch math, tiled"
        )
        for line in lines
    ), run.stdout
    rows = [line for line in lines if line.startswith("| none ") or line.startswith("| causal ")]
    assert len(rows) == 2, run.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert len(cells) == 7, row  # mask, four ratios, the torch backend, the diff vs torch
        for cell in cells[1:5]:  # "best (med m, lo-hi)": numbers, whatever their size
            float(cell.split()[0]), float(cell.split()[2].rstrip(","))
        float(cells[6])
    assert "## Growth with T = S" in run.stdout
    growth = [line for line in lines if line.split("|")[1:2] in ([" 64 "], [" 128 "], [" 256 "])]
    assert len(growth) == 3, run.stdout


def _run_speed_quick(*args: str, plant: str = "") -> subprocess.CompletedProcess:
    """``benchmarks/speed.py --quick *args`` in a fresh interpreter, after running ``plant``."""
    speed = str(ROOT / "benchmarks" / "speed.py")
    code = (
        f"{plant}\nimport runpy, sys\nsys.argv = [{speed!r}, '--quick', *{list(args)!r}]\n"
        f"runpy.run_path({speed!r}, run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


#: A gradient 1% wrong, planted before the benchmark runs: which function, which of its
#: gradients, and the contenders' gradients the benchmark must then report as differing.
SPEED_BUGS = {
    "ours": (
        "attention_ref",
        "sdpa_backward",
        "dk",
        {"torch SDPA dk", "torch math dk", "tiled dk"},
    ),
    "tiled": ("attention_ref.variants.flash", "flash_attention_backward", "dq", {"tiled dq"}),
}


@pytest.mark.parametrize("wrong", sorted(SPEED_BUGS))
def test_speed_benchmark_stops_on_a_wrong_contender(wrong):
    """With one gradient of the plain path (ours) or of the tiled path 1% wrong, the benchmark
    exits with status 1 before timing anything, naming each contender and gradient that differs
    from ours (every contender, when ours is the wrong one) and by how much."""
    import re

    from conftest import require_torch

    require_torch()
    module, name, field, expected = SPEED_BUGS[wrong]
    plant = (
        f"import importlib\nmodule = importlib.import_module({module!r})\n"
        f"right = getattr(module, {name!r})\n"
        f"def wrong(*args, **kwargs):\n"
        f"    grads = right(*args, **kwargs)\n"
        f"    return grads._replace({field}=1.01 * grads.{field})\n"
        f"setattr(module, {name!r}, wrong)\n"
    )
    run = _run_speed_quick("--no-growth", "--repeats", "1", plant=plant)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "stopped before timing" in run.stderr, run.stderr
    reported = re.findall(
        r"^  (.+ d[qkv]) \(mask none\): max abs diff vs ours (\S+) = (\S+) of",
        run.stderr,
        flags=re.M,
    )
    assert {contender for contender, _, _ in reported} == expected, run.stderr
    for _, _, relative in reported:  # 1% of the gradient entries: about 1e-2 of the largest
        assert 1e-4 < float(relative) <= 1.01e-2, run.stderr
    assert "| none |" not in run.stdout, run.stdout  # nothing was timed
