#!/usr/bin/env python
"""What FlexAttention's mods cost against the built-in options they can express, as ratios.

Each row times a forward + backward of ``flex_attention`` / ``flex_attention_backward`` with a mod
against the recomputing pair ``scaled_dot_product_attention`` + ``..._backward`` with the option
that computes the same function, in one process, on the same inputs (float64):

* ``CausalMask()`` against ``causal=True``;
* ``SoftCap(cap)`` against ``softcap=cap``;
* ``RelativePositionBias(table, S - 1)`` against ``bias=`` the gathered ``(H, T, S)`` table (the
  mod also returns the table's gradient, scatter-added; the option its ``dbias``);
* a plain function ``cap * tanh(s / cap)`` (its derivative by the complex step) against
  ``softcap=cap``;
* the tiled path with a causal ``BlockMask`` (128 x 128 blocks) against
  ``flash_attention_forward``/``_backward`` with ``causal=True`` and the same tiles.

Before timing, each pair's outputs and gradients are checked to agree to 1e-12 relative, so a
ratio of wrong code is not printed. Timings are the best of ``--repeats`` rounds (``speed.py``'s
:func:`timings`); only ratios are printed.

Usage::

    python benchmarks/flex.py            # the default shape (2, 8, 512, 512, 64, 64)
    python benchmarks/flex.py --quick    # small shapes, seconds
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
    from attention_ref.variants.flash import flash_attention_backward, flash_attention_forward

    shape = QUICK_SHAPE if args.quick else SHAPE
    repeats = args.repeats or (3 if args.quick else 7)
    q, k, v, dout = make_inputs(shape)
    B, H, T, S = shape[:4]
    rng = np.random.default_rng(1)
    table = rng.normal(size=(H, T + S - 1))
    b, h, qi, ki = ar.mod_indices(B, H, T, S)
    bias = table[h, qi - ki + S - 1][0]  # (H, T, S): the table gathered
    cap = 3.0

    def user_softcap(score, b, h, q_idx, kv_idx):
        return cap * np.tanh(score / cap)

    def flex(**kw):
        def step():
            ar.flex_attention(q, k, v, **kw)
            return ar.flex_attention_backward(dout, q, k, v, **kw)

        return step

    def plain(**kw):
        def step():
            ar.scaled_dot_product_attention(q, k, v, **kw)
            return ar.scaled_dot_product_attention_backward(dout, q, k, v, **kw)

        return step

    bm = ar.create_block_mask(ar.CausalMask(), None, None, T, S, BLOCK_SIZE=128)

    def tiled_flex():
        return flex(block_mask=bm, path="tiled")()

    def tiled_plain():
        res = flash_attention_forward(q, k, v, causal=True, block_q=128, block_k=128)
        return flash_attention_backward(
            dout, q, k, v, res.out, res.logsumexp, causal=True, block_q=128, block_k=128
        )

    rows = [
        ("CausalMask vs causal=True", flex(mask_mod=ar.CausalMask()), plain(causal=True)),
        ("SoftCap vs softcap=", flex(score_mod=ar.SoftCap(cap)), plain(softcap=cap)),
        (
            "RelativePositionBias vs bias=",
            flex(score_mod=ar.RelativePositionBias(table, S - 1)),
            plain(bias=bias),
        ),
        (
            "user function (complex step) vs softcap=",
            flex(score_mod=user_softcap),
            plain(softcap=cap),
        ),
        ("tiled, causal BlockMask vs tiled causal=True", tiled_flex, tiled_plain),
    ]
    for name, a, b_ in rows:  # the pairs compute the same function
        ga, gb = a(), b_()
        err = max(
            np.abs(x - y).max() / np.abs(y).max() for x, y in zip(ga[:3], gb[:3], strict=True)
        )
        if err > 1e-12:
            print(f"{name}: the gradients differ by {err:.1e} relative: not timed")
            return 1

    print(f"shape (B, H, T, S, Dk, Dv) = {shape}; {how}; best of {repeats} rounds")
    print()
    print("| flex_attention + backward with | time / the built-in option's |")
    print("|---|---|")
    for name, a, b_ in rows:
        t = timings({"mod": a, "option": b_}, repeats)
        print(f"| {name} | {ratio_cell(t['mod'], t['option'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
