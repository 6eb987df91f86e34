"""The golden set written before the redesign (format_version 1) still verifies.

``tests/fixtures/golden_v1`` was written by ``attention-ref golden`` at commit 6735108, before the
package was split into layers. Every stored output, gradient and intermediate must be recomputed
by today's code to rtol 2e-15, atol 1e-16: the redesign changed where the code lives, not what it
computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from attention_ref.golden import GoldenError, read_golden, verify_golden

FIXTURE = Path(__file__).parent / "fixtures" / "golden_v1"

#: The bound the redesign promised: a couple of float64 ulps relative, and 1e-16 absolute for
#: entries that are zero in exact arithmetic.
RTOL, ATOL = 2e-15, 1e-16


def test_fixture_is_format_version_1_and_small():
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert len(manifest["cases"]) == 25
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) < 2**20  # under 1 MiB


def test_pre_redesign_golden_set_verifies():
    results = verify_golden(FIXTURE, rtol=RTOL, atol=ATOL)
    failed = [f"{r.case} {r.key}: {r.message}" for r in results if not r.passed]
    assert not failed, "\n".join(failed)
    judged = {(r.case, r.key) for r in results}
    assert len(judged) == len(results) >= 25 * 5  # every case: out, >= 3 gradients, intermediates


def test_fixture_tolerance_catches_a_few_ulps():
    """The bound is tight: the stored outputs pass against themselves, a 4e-15 relative change
    fails."""
    golden = read_golden(FIXTURE)

    def stored(scale):
        def candidate(name, inputs, options, cotangent):
            return {
                "output.out": golden[name].arrays()["output.out"]
                * (scale if name == "gqa" else 1.0)
            }

        return candidate

    assert all(r.passed for r in verify_golden(golden, stored(1.0), rtol=RTOL, atol=ATOL))
    bad = [
        (r.case, r.key)
        for r in verify_golden(golden, stored(1 + 4e-15), rtol=RTOL, atol=ATOL)
        if not r.passed
    ]
    assert bad == [("gqa", "output.out")]


def test_fixture_corruption_is_reported(tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(FIXTURE, copy)
    (copy / "gqa.npz").write_bytes((copy / "gqa.npz").read_bytes()[:-10])
    with pytest.raises(GoldenError, match="gqa"):
        read_golden(copy)
