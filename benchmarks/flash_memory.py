"""Peak memory and relative time of the tiled attention (attention_ref.variants.flash).

1. Memory: scaled dot-product attention forward + backward with the tiled path, B = 1, H = 8,
   T = S = 16384, Dk = Dv = 64, float64, run in a child process; its peak resident set size
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) must stay under 1.5 GiB. One (B, H, T, S)
   float64 array alone would be 16 GiB, and the plain path holds several.
2. Time: tiled / plain forward + backward at a size where both fit (default T = S = 1024..4096),
   interleaved in one process, best of ``--repeats``. Only ratios are printed: absolute times
   depend on the machine and on whoever else shares it.

Usage (from the repository root)::

    # the full run (a few minutes on 2 cores)
    python benchmarks/flash_memory.py
    # a quick run
    python benchmarks/flash_memory.py --T 2048 --time-T 512
    # the time ratios only
    python benchmarks/flash_memory.py --skip-memory
    # single-threaded BLAS (shared machines)
    python benchmarks/flash_memory.py --threads 1

Both measurements run in child processes, the memory one first: Linux carries ``ru_maxrss`` over
``fork`` + ``exec``, so a child started after a large run of the parent would report the parent's
peak. The child also reports ``VmHWM`` from ``/proc/self/status`` (its own address space only).
On a machine shared with other jobs, ``--threads 1`` (``OPENBLAS_NUM_THREADS=1``) keeps the
timings meaningful: a multi-threaded BLAS competing for busy cores can slow down tenfold.

Exit status 1 when the peak exceeds ``--bound-gib`` or a ratio exceeds ``--max-ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's attention_ref

from attention_ref import sdpa_backward, sdpa_forward  # noqa: E402
from attention_ref.variants.flash import (
    BLOCK_K,
    BLOCK_Q,
    flash_attention_backward,
    flash_attention_forward,
)  # noqa: E402

GIB = 2**30


def _inputs(B: int, H: int, T: int, D: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((B, H, T, D)) for _ in range(4))  # (B, H, T, D), S = T
    return q, k, v, dout


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _vmhwm_bytes() -> int | None:
    """Peak RSS of this address space (``VmHWM``), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child_memory(args: argparse.Namespace) -> dict:
    """Inputs, then tiled forward + backward; the peak RSS."""
    q, k, v, dout = _inputs(1, args.H, args.T, args.D)
    rss_inputs = _maxrss_bytes()
    opts = dict(causal=args.causal, block_q=args.block_q, block_k=args.block_k)
    start = time.perf_counter()
    res = flash_attention_forward(q, k, v, **opts)
    mid = time.perf_counter()
    g = flash_attention_backward(dout, q, k, v, res.out, res.logsumexp, **opts)
    end = time.perf_counter()
    if not all(np.isfinite(x).all() for x in (res.out, g.dq, g.dk, g.dv)):
        raise RuntimeError("the tiled path returned non-finite values on random inputs")
    return {
        "rss_inputs": rss_inputs,
        "rss_peak": _maxrss_bytes(),
        "vmhwm": _vmhwm_bytes(),
        "forward_s": mid - start,
        "backward_s": end - mid,
    }


def child_time(args: argparse.Namespace) -> dict:
    """tiled / plain forward + backward time at each --time-T, interleaved, best of --repeats."""
    ratios = {}
    for T in args.time_T:
        q, k, v, dout = _inputs(1, args.H, T, args.D, seed=1)
        opts = dict(causal=args.causal)

        def plain(q=q, k=k, v=v, dout=dout, opts=opts):
            sdpa_backward(dout, sdpa_forward(q, k, v, **opts))

        def tiled(q=q, k=k, v=v, dout=dout, opts=opts):
            res = flash_attention_forward(
                q, k, v, block_q=args.block_q, block_k=args.block_k, **opts
            )
            flash_attention_backward(
                dout,
                q,
                k,
                v,
                res.out,
                res.logsumexp,
                block_q=args.block_q,
                block_k=args.block_k,
                **opts,
            )

        best = {"plain": np.inf, "tiled": np.inf}
        plain(), tiled()  # warm-up: first-touch page faults, BLAS start-up
        for _ in range(args.repeats):  # interleaved, so that a busy spell hits both
            for name, f in (("plain", plain), ("tiled", tiled)):
                start = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - start)
        ratios[T] = best["tiled"] / best["plain"]
    return ratios


def _run_child(kind: str, argv: list[str], threads: int | None) -> dict:
    env = dict(os.environ)
    if threads is not None:
        env.update(
            OPENBLAS_NUM_THREADS=str(threads),
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
        )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind] + argv, capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise RuntimeError(f"the {kind} child failed:\n{done.stdout}\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def memory(args: argparse.Namespace, argv: list[str]) -> bool:
    r = _run_child("memory", argv, args.threads)
    scores = args.H * args.T * args.T * 8  # one (B, H, T, S) float64 array, B = 1
    inputs = 4 * args.H * args.T * args.D * 8  # q, k, v, dout
    ok = r["rss_peak"] <= args.bound_gib * GIB
    print(
        f"memory: tiled forward+backward, B=1, H={args.H}, T=S={args.T}, Dk=Dv={args.D}, float64, "
        f"blocks {args.block_q}x{args.block_k}{', causal' if args.causal else ''}"
    )
    print(
        f"  peak RSS (ru_maxrss) {r['rss_peak'] / GIB:.3f} GiB: {'under' if ok else 'OVER'} the "
        f"{args.bound_gib} GiB bound"
        + (f"; VmHWM {r['vmhwm'] / GIB:.3f} GiB" if r["vmhwm"] else "")
    )
    print(
        f"  after creating the inputs: {r['rss_inputs'] / GIB:.3f} GiB "
        f"(q, k, v, dout are {inputs / GIB:.3f} GiB)"
    )
    print(
        f"  one (B, H, T, S) float64 array would be {scores / GIB:.1f} GiB, "
        f"{scores / r['rss_peak']:.0f}x the tiled peak"
    )
    print(
        f"  wall time {r['wall_s']:.0f} s "
        f"(forward {r['forward_s']:.1f} s, backward {r['backward_s']:.1f} s)"
    )
    return ok


def timing(args: argparse.Namespace, argv: list[str]) -> bool:
    ratios = _run_child("time", argv, args.threads)
    ok = True
    for T, ratio in ratios.items():
        if T == "wall_s":
            continue
        ok &= ratio <= args.max_ratio
        print(
            f"time: T=S={T}, B=1, H={args.H}, Dk=Dv={args.D}{', causal' if args.causal else ''}, "
            f"blocks {args.block_q}x{args.block_k}: tiled / plain (forward+backward, "
            f"best of {args.repeats}) = "
            f"{ratio:.2f}{'' if ratio <= args.max_ratio else f'  EXCEEDS {args.max_ratio}'}"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=16384, help="T = S of the memory run (default 16384)")
    p.add_argument("--H", type=int, default=8, help="heads (default 8)")
    p.add_argument("--D", type=int, default=64, help="Dk = Dv (default 64)")
    p.add_argument("--block-q", type=int, default=BLOCK_Q)
    p.add_argument("--block-k", type=int, default=BLOCK_K)
    p.add_argument("--causal", action="store_true", help="causal attention (top_left)")
    p.add_argument("--bound-gib", type=float, default=1.5, help="peak RSS bound of the memory run")
    p.add_argument(
        "--time-T",
        type=int,
        nargs="+",
        default=[1024, 2048, 4096],
        help="T = S of the time comparisons (default 1024 2048 4096)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-ratio", type=float, default=2.0, help="tiled / plain time bound")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="BLAS threads of the children (default: the environment's)",
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--child", choices=("memory", "time"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps((child_memory if args.child == "memory" else child_time)(args)))
        return 0
    ok = True
    if not args.skip_memory:
        ok &= memory(args, argv)  # first: see the module docstring
    if not args.skip_time:
        ok &= timing(args, argv)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
