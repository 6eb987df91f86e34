"""benchmarks/flex.py runs: it checks that each mod and the built-in option it is timed against
compute the same function, then prints one ratio per pair. Nothing is timed here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_flex_benchmark_quick_prints_its_table():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "flex.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "(med" in line]
    assert len(rows) == 5, run.stdout
