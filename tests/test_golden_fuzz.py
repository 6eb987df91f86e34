"""A golden set damaged in any single byte, or cut short anywhere, is refused with a
``GoldenError`` -- never read with a changed value, never another exception.

Every second byte of the case file and every fifth byte of the manifest is flipped (bit 0), and
every 13th length is tried as a truncation of each; ``ATTENTION_REF_FUZZ=full`` flips every byte
of both with two masks and tries every truncation (a minute or two).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from attention_ref.golden import MANIFEST_NAME, GoldenError, read_golden, write_golden

FULL = os.environ.get("ATTENTION_REF_FUZZ") == "full"
MASKS = (0x01, 0x80) if FULL else (0x01,)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "golden"
    write_golden(d, ["padding_empty_rows_zero"])  # bool options, -inf, an empty row
    golden = read_golden(d)
    values = {gc.name: (gc.dims, gc.options, gc.scale_used, gc.arrays()) for gc in golden}
    return d, {p.name: p.read_bytes() for p in d.iterdir()}, values


def _judge(d: Path, values) -> str:
    """'refused', or 'same' when the damaged set reads with every value unchanged."""
    try:
        golden = read_golden(d)
        got = {gc.name: (gc.dims, gc.options, gc.scale_used, gc.arrays()) for gc in golden}
    except GoldenError:
        return "refused"
    assert got.keys() == values.keys()
    for name, (dims, options, scale, arrays) in got.items():
        want = values[name]
        assert (dims, options, scale) == want[:3], name
        assert arrays.keys() == want[3].keys(), name
        for key, a in arrays.items():
            assert a.dtype == want[3][key].dtype and np.array_equal(
                a, want[3][key], equal_nan=True
            ), (name, key)
    return "same"


def _damage(tmp_path, original, file, transform):
    """Judge the set with ``file`` replaced by ``transform(its bytes)``; the copy is reused."""
    d, blobs, values = original
    work = tmp_path / "work"
    if not work.exists():
        shutil.copytree(d, work)
    (work / file).write_bytes(transform(blobs[file]))
    try:
        return _judge(work, values)
    finally:
        (work / file).write_bytes(blobs[file])


@pytest.mark.parametrize("file", ["padding_empty_rows_zero.npz", MANIFEST_NAME])
def test_every_byte_flip_is_refused_or_harmless(tmp_path, original, file):
    blob = original[1][file]
    stride = 1 if FULL else 2 if file.endswith(".npz") else 5
    outcomes = {"refused": 0, "same": 0}
    for i in range(0, len(blob), stride):
        for mask in MASKS:
            flip = lambda b, i=i, mask=mask: b[:i] + bytes([b[i] ^ mask]) + b[i + 1 :]  # noqa: E731
            outcomes[_damage(tmp_path, original, file, flip)] += 1
    assert outcomes["refused"] > 0.95 * sum(outcomes.values()), outcomes


@pytest.mark.parametrize("file", ["padding_empty_rows_zero.npz", MANIFEST_NAME])
def test_every_truncation_is_refused(tmp_path, original, file):
    """Refused, unless only the manifest's final newline is cut (the values are unchanged)."""
    blob = original[1][file]
    for n in range(0, len(blob), 1 if FULL else 13):
        outcome = _damage(tmp_path, original, file, lambda b, n=n: b[:n])
        assert outcome == "refused" or not blob[n:].strip(), (n, outcome)


def test_a_manifest_nested_too_deeply_is_refused(tmp_path, original):
    deep = b"[" * 100_000 + b"]" * 100_000
    assert _damage(tmp_path, original, MANIFEST_NAME, lambda b: deep) == "refused"


def test_a_huge_declared_shape_is_refused_without_allocating(tmp_path, original):
    """A manifest claiming a 2**37-entry array: the size check refuses it before any read."""
    import json

    from attention_ref.oracle.golden import _manifest_checksum

    def huge(b):
        m = json.loads(b)
        m["cases"][0]["arrays"][0]["shape"] = [2**37, 2**37]
        m["checksum"] = {"sha256": _manifest_checksum(m)}
        return json.dumps(m).encode()

    assert _damage(tmp_path, original, MANIFEST_NAME, huge) == "refused"
