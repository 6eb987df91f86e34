#!/usr/bin/env python
"""What the log-sum-exp output and learnable sinks cost on the plain path, as ratios.

Each row times a forward + backward of the plain path against the same pair without the
feature, in one process, on the same inputs (float64):

* ``return_lse + dlse``: ``scaled_dot_product_attention(..., return_lse=True)`` and its
  backward with a random ``dlse``, against the pair without them;
* ``sinks``: the same pair with ``sinks=`` (one logit per head) and its ``dsinks``;
* ``both``: the two together;

for the recomputing pair most users call (``scaled_dot_product_attention`` +
``scaled_dot_product_attention_backward``) and for the trace pair (``sdpa_forward`` +
``sdpa_backward``), unmasked and causal. The target: at most 1.10. Before timing, each
feature's output is checked to be what it should be (``dlse = 0`` and ``sinks = -1e4`` give the
featureless result), so a ratio of wrong code is not printed.

Timings are the best of ``--repeats`` rounds, each round in a random order after an untimed call
(``speed.py``'s :func:`timings`); only ratios are printed.

Usage::

    python benchmarks/composable.py            # the default shape (2, 8, 512, 512, 64, 64)
    python benchmarks/composable.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's attention_ref
sys.path.insert(1, str(Path(__file__).resolve().parent))  # speed.py's helpers

from speed import QUICK_SHAPE, SHAPE, limit_threads, make_inputs, ratio_cell, timings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    args = parser.parse_args(argv)
    how = limit_threads(args.threads)

    import numpy as np

    import attention_ref as ar

    shape = QUICK_SHAPE if args.quick else SHAPE
    repeats = args.repeats or (3 if args.quick else 9)
    q, k, v, dout = make_inputs(shape)
    H = shape[1]
    rng = np.random.default_rng(1)
    dlse = rng.normal(size=dout.shape[:-1])
    sinks = rng.normal(size=H)

    def recompute(causal, lse, with_sinks):
        kw = dict(causal=causal, sinks=sinks if with_sinks else None)

        def step():
            ar.scaled_dot_product_attention(q, k, v, return_lse=lse, **kw)
            return ar.scaled_dot_product_attention_backward(
                dout, q, k, v, dlse=dlse if lse else None, **kw
            )

        return step

    def trace_pair(causal, lse, with_sinks):
        kw = dict(causal=causal, sinks=sinks if with_sinks else None)

        def step():
            tr = ar.sdpa_forward(q, k, v, **kw)
            return ar.sdpa_backward(dout, tr, dlse if lse else None)

        return step

    # the features are what they claim: dlse = 0 and a sink of -1e4 change nothing measurable
    base = ar.scaled_dot_product_attention_backward(dout, q, k, v)
    zero = ar.scaled_dot_product_attention_backward(dout, q, k, v, dlse=np.zeros_like(dlse))
    far = ar.scaled_dot_product_attention_backward(dout, q, k, v, sinks=np.full(H, -1e4))
    for name, g in (("dlse = 0", zero), ("sinks = -1e4", far)):
        err = max(
            np.abs(a - b).max() / np.abs(b).max() for a, b in zip(g[:3], base[:3], strict=True)
        )
        if err > 1e-14:
            print(f"{name} changed the gradients by {err:.1e} relative: not timed")
            return 1

    print(f"shape (B, H, T, S, Dk, Dv) = {shape}; {how}; best of {repeats} rounds")
    print()
    print("| pair | mask | return_lse + dlse | sinks | both |")
    print("|---|---|---|---|---|")
    for pair_name, make in (("recomputing", recompute), ("trace", trace_pair)):
        for causal in (False, True):
            cands = {
                "none": make(causal, False, False),
                "lse": make(causal, True, False),
                "sinks": make(causal, False, True),
                "both": make(causal, True, True),
            }
            t = timings(cands, repeats)
            cells = [ratio_cell(t[n], t["none"]) for n in ("lse", "sinks", "both")]
            print(f"| {pair_name} | {'causal' if causal else 'none'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
