#!/usr/bin/env python
"""Speed of the plain attention path (``sdpa_forward`` + ``sdpa_backward``), as ratios.

Measured in one process, with the same number of threads on both sides, in float64:

* **ours / torch SDPA**: PyTorch's ``F.scaled_dot_product_attention`` with its default CPU
  backend (the fused FlashAttention kernel), forward + ``backward()`` through autograd;
* **ours / torch math**: the same under ``sdpa_kernel(SDPBackend.MATH)`` (unfused, composite ops);
* **ours / floor**: the six float64 matrix products that exact attention must do, of the same
  shapes and layouts as the plain path's, alone: ``q k^T`` and ``P v`` forward (A1), (A7);
  ``dout v^T``, ``P^T dout``, ``dS k`` and ``dS^T q`` backward (A8), (A9), (A15), (A16), the
  second and fourth computed transposed (``dout^T P``, ``q^T dS``), the faster layout;
* **tiled / plain**: ``attention_ref.variants.flash`` (when present) against the plain path.

Then a growth table over T = S = 128 ... 4096: time relative to T = 128 (exact attention is
O(T^2) work) and the peak memory of one forward + backward measured with ``tracemalloc``
(plain: O(T^2), the (T, S) arrays; tiled: O(T)).

Every timing is the best of ``--repeats`` rounds; a round times each candidate once, in a random
order, right after an untimed call of the same candidate (see :func:`timings`). A ratio is
printed as the ratio of the best times, followed by the median and the range of the per-round
ratios (a round's candidates ran within a second of each other). Only ratios are printed, no
absolute times (they depend on the machine); the ratios themselves depend on the BLAS and on
the load. The targets: ours / torch SDPA <= 1.0 and ours / floor <= 1.5 at the default shape
and 2 threads, causal too; tiled / plain <= 2.

Before timing, every contender that computes attention (torch SDPA, torch math, tiled) must give
ours' ``dq``, ``dk`` and ``dv`` to :data:`AGREEMENT_RTOL` relative to the largest entry of each
(the floor multiplies stand-ins for P and dS, so it has no result to compare). When one does not,
the benchmark prints which, on which gradient and by how much, and exits with status 1 before
timing that mask: a ratio of wrong code is no ratio.

Usage::

    python benchmarks/speed.py              # the full run (a few minutes on 2 cores)
    python benchmarks/speed.py --quick      # small shapes, seconds; the test suite runs this
    python benchmarks/speed.py --threads 4

Threads: ``--threads`` (default 2) is set for NumPy's BLAS through ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` before NumPy is imported (and through
``threadpoolctl`` when it is installed), and for PyTorch with ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The shape of the targets, (B, H, T, S, Dk, Dv); --quick uses QUICK_SHAPE.
SHAPE = (2, 8, 512, 512, 64, 64)
QUICK_SHAPE = (2, 4, 128, 96, 32, 24)
#: Growth table: lengths T = S, with B = 1 and H = 4 heads of width 64 (at T = 4096 one
#: (B, H, T, S) float64 array is 512 MiB; the plain path holds three or four of them).
GROWTH_T = (128, 256, 512, 1024, 2048, 4096)
QUICK_GROWTH_T = (64, 128, 256)
GROWTH_SHAPE = (1, 4, 64)  # (B, H, Dk = Dv)
#: Largest allowed ``max|grad - ours| / max|ours|`` of a contender's dq, dk, dv: float64 attention
#: computed in different orders agrees to ~1e-15 relative (the "max abs diff vs torch" column);
#: 1e-10 leaves 1e5 of room and is 1e8 below a gradient that is 1% wrong.
AGREEMENT_RTOL = 1e-10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes and few repeats (seconds)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="threads for NumPy's BLAS and PyTorch (default 2)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per candidate (default 15; 3 with --quick)",
    )
    parser.add_argument("--no-growth", action="store_true", help="skip the growth table over T")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    return args


def limit_threads(n: int) -> str:
    """Limit NumPy's BLAS to ``n`` threads; returns how it was done, for the report.

    The environment variables only take effect if NumPy is not imported yet, which is why this
    module imports NumPy inside :func:`main`.
    """
    numpy_loaded = "numpy" in sys.modules
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import threadpoolctl
    except ImportError:
        if numpy_loaded:
            return f"NumPy BLAS threads NOT set (NumPy was imported before; {n} requested)"
        return f"NumPy BLAS: {n} (OMP/OPENBLAS/MKL_NUM_THREADS set before importing NumPy)"
    import numpy  # noqa: F401  -- load the BLAS so that threadpoolctl sees it

    threadpoolctl.threadpool_limits(n)
    found = ", ".join(
        f"{p['internal_api']} {p['num_threads']}" for p in threadpoolctl.threadpool_info()
    )
    return f"threadpoolctl: {found}"


def timings(candidates: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeats`` rounds of one call each.

    Each round runs the candidates in a new random order (seeded), so that slow periods of a
    shared machine hit all of them alike. Each timed call directly follows an untimed call of the
    same candidate: the thread pools are then the candidate's own, warm. (Right after a NumPy
    product OpenBLAS's worker threads keep spinning for up to ~0.1 s, on the cores PyTorch's
    threads need: without the untimed call, PyTorch measured up to twice as slow after NumPy.)
    """
    names = list(candidates)
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            candidates[name]()  # untimed: warm-up, and the previous candidate's threads go idle
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_cell(num: list[float], den: list[float]) -> str:
    """``best(num) / best(den)``, then the median [min-max] of the per-round ratios."""
    import numpy as np

    per_round = np.asarray(num) / np.asarray(den)
    return (
        f"{min(num) / min(den):5.2f} (med {np.median(per_round):.2f}, "
        f"{per_round.min():.2f}-{per_round.max():.2f})"
    )


def make_inputs(shape, seed: int = 0):
    import numpy as np

    B, H, T, S, Dk, Dv = shape
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, H, T, Dk))
    k = rng.normal(size=(B, H, S, Dk))
    v = rng.normal(size=(B, H, S, Dv))
    dout = rng.normal(size=(B, H, T, Dv))
    return q, k, v, dout


def plain_step(q, k, v, dout, causal):
    from attention_ref import sdpa_backward, sdpa_forward

    def step():
        return sdpa_backward(dout, sdpa_forward(q, k, v, causal=causal))

    return step


def has_tiled() -> bool:
    """Whether this checkout has the tiled path, ``attention_ref.variants.flash``."""
    try:
        import attention_ref.variants.flash  # noqa: F401
    except ImportError:
        return False
    return True


def tiled_step(q, k, v, dout, causal):
    """Forward + backward of the tiled path, or None when ``attention_ref.variants.flash`` is
    absent."""
    if not has_tiled():
        return None
    from attention_ref.variants.flash import flash_attention_backward, flash_attention_forward

    def step():
        fo = flash_attention_forward(q, k, v, causal=causal)
        return flash_attention_backward(dout, q, k, v, fo.out, fo.logsumexp, causal=causal)

    return step


def floor_step(q, k, v, dout, seed: int = 1):
    """The six matrix products of exact attention, on stand-ins for P and dS of shape
    (B, H, T, S)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = rng.random(q.shape[:-1] + (k.shape[-2],))  # (B, H, T, S) stands in for P (and P')
    ds = rng.normal(size=p.shape)  # (B, H, T, S) stands in for dS

    def step():
        q @ k.swapaxes(-1, -2)  # (B,H,T,Dk) @ (B,H,Dk,S) -> (B,H,T,S)    (A1)
        p @ v  # (B,H,T,S) @ (B,H,S,Dv) -> (B,H,T,Dv)                       (A7)
        dout @ v.swapaxes(-1, -2)  # (B,H,T,Dv) @ (B,H,Dv,S) -> (B,H,T,S)    (A8)
        # (A9) and (A16) as the plain path computes them, transposed: (P^T dout)^T = dout^T P,
        # about 1.4x faster with OpenBLAS than with the large operand transposed
        (dout.swapaxes(-1, -2) @ p).swapaxes(-1, -2)  # (B,H,Dv,T) @ (B,H,T,S) -> (B,H,S,Dv)    (A9)
        ds @ k  # (B,H,T,S) @ (B,H,S,Dk) -> (B,H,T,Dk)                      (A15)
        (q.swapaxes(-1, -2) @ ds).swapaxes(
            -1, -2
        )  # (B,H,Dk,T) @ (B,H,T,S) -> (B,H,S,Dk)      (A16)

    return step


def torch_steps(q, k, v, dout, causal):
    """``(default, math, backend)``: forward + backward through autograd in PyTorch, and the name
    of the backend the default one picks for these inputs."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tdout = torch.tensor(dout)

    def step():
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        out.backward(tdout)
        grads = (tq.grad, tk.grad, tv.grad)
        tq.grad = tk.grad = tv.grad = None
        return grads

    def math_step():
        with sdpa_kernel(SDPBackend.MATH):
            return step()

    try:
        backend = SDPBackend(torch._fused_sdp_choice(tq, tk, tv, None, 0.0, causal)).name
    except Exception:  # a private function: report "?" rather than fail the benchmark
        backend = "?"
    return step, math_step, backend


def disagreements(results: dict, label: str, rtol: float = AGREEMENT_RTOL) -> list[str]:
    """One message per contender gradient that differs from ours beyond ``rtol``; [] if none.

    ``results`` maps a contender's name to its ``(dq, dk, dv)`` (NumPy arrays or torch tensors),
    ``"ours"`` to the plain path's; ``label`` names the mask in the messages.
    """
    import numpy as np

    def as_array(x):
        return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x, dtype=np.float64)

    ours = [as_array(x) for x in results["ours"]]
    messages = []
    for name, grads in results.items():
        if name == "ours":
            continue
        for grad, mine, their in zip(
            ("dq", "dk", "dv"), ours, (as_array(x) for x in grads), strict=True
        ):
            scale = float(np.max(np.abs(mine)))
            if their.shape != mine.shape:
                messages.append(
                    f"{name} {grad} (mask {label}): shape {their.shape}, ours {mine.shape}"
                )
                continue
            diff = float(np.max(np.abs(their - mine))) if mine.size else 0.0
            if not diff <= rtol * scale:  # also catches NaN
                messages.append(
                    f"{name} {grad} (mask {label}): max abs diff vs ours {diff:.1e} = "
                    f"{diff / scale if scale else float('inf'):.1e} of max|{grad}| "
                    f"{scale:.1e}, above the tolerance {rtol:g}"
                )
    return messages


def ratio_table(args) -> list[str]:
    """Print the ratio table; returns the contenders' disagreements ([] when they all agree).

    A mask whose contenders disagree with ours is not timed: its disagreements return at once.
    """
    import numpy as np

    shape = QUICK_SHAPE if args.quick else SHAPE
    B, H, T, S, Dk, Dv = shape
    q, k, v, dout = make_inputs(shape)
    print(
        f"\n## Ratios at B={B}, H={H}, T={T}, S={S}, Dk={Dk}, Dv={Dv}, float64 "
        f"(best of {args.repeats}; median and range of the per-round ratios in brackets)\n"
    )
    print(
        "| mask | ours / torch SDPA | ours / torch math | ours / floor | tiled / plain "
        "| torch SDPA backend | max abs diff vs torch |"
    )
    print("|---|---|---|---|---|---|---|")
    for causal in (False, True):
        ours = plain_step(q, k, v, dout, causal)
        torch_default, torch_math, backend = torch_steps(q, k, v, dout, causal)
        candidates = {
            "ours": ours,
            "torch": torch_default,
            "math": torch_math,
            "floor": floor_step(q, k, v, dout),
        }
        tiled = tiled_step(q, k, v, dout, causal)
        if tiled is not None:
            candidates["tiled"] = tiled
        g, tg = ours(), torch_default()
        results = {"ours": (g.dq, g.dk, g.dv), "torch SDPA": tg, "torch math": torch_math()}
        if tiled is not None:
            tiled_grads = tiled()
            results["tiled"] = (tiled_grads.dq, tiled_grads.dk, tiled_grads.dv)
        wrong = disagreements(results, "causal" if causal else "none")
        if wrong:
            return wrong
        diff = max(
            float(np.max(np.abs(a - b.numpy())))
            for a, b in zip((g.dq, g.dk, g.dv), tg, strict=True)
        )
        t = timings(candidates, args.repeats)
        tiled_cell = ratio_cell(t["tiled"], t["ours"]) if tiled is not None else "n/a"
        print(
            f"| {'causal' if causal else 'none'} | {ratio_cell(t['ours'], t['torch'])} | "
            f"{ratio_cell(t['ours'], t['math'])} | {ratio_cell(t['ours'], t['floor'])} | "
            f"{tiled_cell} | {backend} | {diff:.1e} |"
        )
    others = ", ".join(name for name in results if name != "ours")
    print(
        f"\nEvery contender's dq, dk, dv equal ours to {AGREEMENT_RTOL:g} of their largest entry "
        f"({others}; the floor computes no result)."
    )
    print(
        "\nTargets at B=2, H=8, T=S=512, Dk=Dv=64 with 2 threads: ours / torch SDPA <= 1.0, "
        "ours / floor <= 1.5, tiled / plain <= 2."
    )
    return []


def peak_memory(step) -> int:
    """Peak bytes that NumPy allocated (traced by ``tracemalloc``) during one call of ``step``."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = step()
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return peak - base


def growth_table(args) -> None:
    lengths = QUICK_GROWTH_T if args.quick else GROWTH_T
    B, H, D = GROWTH_SHAPE
    t0 = lengths[0]
    tiled = has_tiled()
    print(f"\n## Growth with T = S (B={B}, H={H}, Dk=Dv={D}, no mask)\n")
    print(
        f"Each cell: relative to T={t0}, and in brackets the factor from the previous row "
        "(T doubles). Exact attention is O(T^2) work, x4 per doubling; peak memory grows x4 per "
        "doubling for the plain path (its (T, S) arrays) and x2 for the tiled one (O(T)).\n"
    )
    names = ["plain", "tiled"] if tiled else ["plain"]
    print("| T | " + " | ".join(f"{name} time | {name} peak memory" for name in names) + " |")
    print("|---|" + "---|---|" * len(names))
    first: dict[str, float] = {}
    previous: dict[str, float] = {}
    for n in lengths:
        q, k, v, dout = make_inputs((B, H, n, n, D, D))
        steps = {
            name: (plain_step if name == "plain" else tiled_step)(q, k, v, dout, False)
            for name in names
        }
        repeats = max(1, min(args.repeats, int(args.repeats * (512 / n) ** 2)))  # fewer at large T
        t = timings(steps, repeats)
        row = f"| {n} |"
        for name, step in steps.items():
            for key, value in (
                (name + " time", min(t[name])),
                (name + " memory", peak_memory(step)),
            ):
                first.setdefault(key, value)
                factor = f" (x{value / previous[key]:.1f})" if key in previous else ""
                row += f" {value / first[key]:.1f}{factor} |"
                previous[key] = value
        print(row, flush=True)
    print(
        f"\nPeak memory at T={t0}: "
        + ", ".join(f"{name} {first[name + ' memory'] / 2**20:.1f} MiB" for name in names)
        + " (tracemalloc: NumPy's allocations during one forward + backward; "
        "the inputs are not counted)."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    blas_threads = limit_threads(args.threads)
    sys.path.insert(0, str(REPO))  # benchmark this checkout's attention_ref
    import numpy as np

    try:
        import torch
    except ImportError:
        print("benchmarks/speed.py compares with PyTorch: pip install torch", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    import attention_ref

    print(
        "# attention_ref speed: ratios measured in one run" + (" (--quick)" if args.quick else "")
    )
    print(
        f"\nthreads: {blas_threads}; torch {torch.get_num_threads()} (torch.set_num_threads). "
        f"numpy {np.__version__}, torch {torch.__version__}, "
        f"attention_ref from {Path(attention_ref.__file__).parent}"
    )
    wrong = ratio_table(args)
    if wrong:
        print(
            "benchmarks/speed.py: stopped before timing, results differ from ours (the plain "
            "path; if every contender differs, suspect ours):\n  " + "\n  ".join(wrong),
            file=sys.stderr,
        )
        return 1
    if not args.no_growth:
        growth_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
