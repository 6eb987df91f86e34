"""The golden writer cannot lose data: killed at any filesystem step of a write or an overwrite,
it leaves the complete old set or the complete new set, the user's files survive, and the next
write cleans up; it never follows or writes through a symbolic link, and says nothing about a
link's target.

The kills are real: each runs the writer in a fresh interpreter that ``os._exit``s at step k
(no ``finally`` runs, no buffer is flushed), for every k the write has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attention_ref.golden import MANIFEST_NAME, GoldenError, read_golden, write_golden
from attention_ref.oracle import golden

OLD, NEW = ["plain", "gqa"], ["one_element", "plain"]
USER = {"README.txt": b"my notes", "results.csv": b"1,2,3\n"}

KILL = """
import os, sys
from attention_ref.oracle import golden
n = [0]
def step(what, k=int(sys.argv[2])):
    n[0] += 1
    if n[0] == k:
        os._exit(9)
golden._fs_step = step
if sys.argv[4] == "fallback":
    golden._exchange = lambda a, b: False
if sys.argv[4] == "in_place":  # the writer of attention_ref 0.2.0: delete, then write in place
    from pathlib import Path
    def in_place(path, files, overwrite):
        for p in sorted(path.glob("*.npz")) + [path / golden.MANIFEST_NAME]:
            golden._fs_step(f"delete {p.name}")
            p.unlink(missing_ok=True)
        for name, blob in files.items():
            golden._fs_step(f"write {name}")
            (path / name).write_bytes(blob)
    golden._replace_set = in_place
golden.write_golden(sys.argv[1], sys.argv[3].split(","), overwrite=True)
"""


def _set_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.name not in USER}


def _steps(tmp: Path, cases: list[str], fallback: bool) -> list[str]:
    """The writer's filesystem steps for this write, in order (counted in this process)."""
    seen: list[str] = []
    d = tmp / "count"
    _old_set_with_user_files(d)
    real_step, real_exchange = golden._fs_step, golden._exchange
    golden._fs_step = seen.append
    if fallback:
        golden._exchange = lambda a, b: False
    try:
        write_golden(d, cases, overwrite=True)
    finally:
        golden._fs_step, golden._exchange = real_step, real_exchange
    shutil.rmtree(d)
    return seen


def _old_set_with_user_files(d: Path) -> None:
    write_golden(d, OLD)
    for name, blob in USER.items():
        (d / name).write_bytes(blob)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The bytes of the complete old and new sets, written without interruption."""
    tmp = tmp_path_factory.mktemp("reference_sets")
    write_golden(tmp / "old", OLD)
    write_golden(tmp / "new", NEW)
    return _set_bytes(tmp / "old"), _set_bytes(tmp / "new")


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two_renames"])
def test_a_kill_at_any_step_of_an_overwrite_leaves_the_old_or_the_new_set(tmp_path, sets, fallback):
    old, new = sets
    steps = _steps(tmp_path, NEW, fallback)
    assert len(steps) >= 8, steps  # create, fsync per file, links, exchange, fsyncs, remove
    outcomes = set()
    for k in range(1, len(steps) + 1):
        d = tmp_path / f"kill_{k}" / "golden"
        _old_set_with_user_files(d)
        run = subprocess.run(
            [sys.executable, "-c", KILL, str(d), str(k), ",".join(NEW), "fallback" * fallback],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 9, (k, steps[k - 1], run.stderr)
        where = f"killed before step {k} ({steps[k - 1]})"
        if d.exists():
            got = _set_bytes(d)
            assert got in (old, new), f"{where}: a mixture of the two sets: {sorted(got)}"
            outcomes.add("old" if got == old else "new")
            read_golden(d)  # and it verifies
            for name, blob in USER.items():
                assert (d / name).read_bytes() == blob, f"{where}: {name} lost"
        else:
            # only the fallback has a moment with no directory: the set is aside, whole
            assert fallback, f"{where}: the directory is gone"
            (aside,) = [p for p in d.parent.iterdir() if p.name.endswith("-old")]
            assert _set_bytes(aside) == old and all(
                (aside / n).read_bytes() == b for n, b in USER.items()
            ), where
            outcomes.add("aside")
        # the next write cleans up whatever was left and writes the new set
        write_golden(d, NEW, overwrite=True)
        assert _set_bytes(d) == new, where
        assert all((d / n).read_bytes() == b for n, b in USER.items()), where
        assert sorted(p.name for p in d.parent.iterdir()) == ["golden"], f"{where}: leftovers"
    assert {"old", "new"} <= outcomes  # the kills landed on both sides of the swap


def test_a_kill_while_creating_a_set_leaves_nothing_or_the_whole_set(tmp_path, sets):
    _, new = sets
    count = tmp_path / "count"
    seen: list[str] = []
    real = golden._fs_step
    golden._fs_step = seen.append
    try:
        write_golden(count, NEW)
    finally:
        golden._fs_step = real
    for k in range(1, len(seen) + 1):
        d = tmp_path / f"kill_{k}" / "golden"
        d.parent.mkdir()
        subprocess.run(
            [sys.executable, "-c", KILL, str(d), str(k), ",".join(NEW), ""], capture_output=True
        )
        assert not d.exists() or _set_bytes(d) == new, seen[k - 1]
        write_golden(d, NEW, overwrite=True)
        assert _set_bytes(d) == new and [p.name for p in d.parent.iterdir()] == ["golden"]


def test_overwrite_replaces_exactly_the_listed_files(tmp_path):
    d = tmp_path / "g"
    _old_set_with_user_files(d)
    write_golden(d, ["one_element"], overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [MANIFEST_NAME, "one_element.npz", *USER]
    )  # plain.npz and gqa.npz were the old set's; the user's files are kept
    assert read_golden(d).names == ["one_element"]


@pytest.mark.parametrize(
    "plant",
    ["manifest.json.part", "plain.npz", "notes.txt"],
)
def test_a_symbolic_link_in_the_directory_is_refused_and_never_written_through(tmp_path, plant):
    target = tmp_path / "secret" / "passwd"
    target.parent.mkdir()
    target.write_bytes(b"root:x:0:0\n")
    d = tmp_path / "g"
    write_golden(d, OLD)
    if (d / plant).exists():
        (d / plant).unlink()
    os.symlink(target, d / plant)
    before = {p.name: os.readlink(p) if p.is_symlink() else p.read_bytes() for p in d.iterdir()}
    with pytest.raises(FileExistsError, match="symbolic link") as exc:
        write_golden(d, NEW, overwrite=True)
    assert str(target) not in str(exc.value) and "passwd" not in str(exc.value)
    assert target.read_bytes() == b"root:x:0:0\n"
    after = {p.name: os.readlink(p) if p.is_symlink() else p.read_bytes() for p in d.iterdir()}
    assert after == before


def test_the_reader_refuses_a_linked_file_without_reading_its_target(tmp_path):
    target = tmp_path / "passwd"
    target.write_bytes(b"root:x:0:0\n" * 100)
    d = tmp_path / "g"
    write_golden(d, OLD)
    (d / "plain.npz").unlink()
    os.symlink(target, d / "plain.npz")
    with pytest.raises(GoldenError) as exc:
        read_golden(d)
    (problem,) = exc.value.problems
    assert problem.file == "plain.npz" and "symbolic link" in problem.what
    assert "1100" not in str(exc.value) and "sha256" not in str(exc.value)


def test_overwrite_refuses_what_it_may_not_replace_before_touching_anything(tmp_path):
    d = tmp_path / "g"
    write_golden(d, OLD)
    cases = {
        "sub.npz": lambda: (d / "sub.npz").mkdir(),
        "another tool's manifest": lambda: (d / MANIFEST_NAME).write_text('{"tool": "other"}'),
        "a user's .npz": lambda: (d / "my_candidate_outputs.npz").write_bytes(b"mine"),
    }
    for what, plant in cases.items():
        shutil.rmtree(d)
        write_golden(d, OLD)
        plant()
        before = sorted(p.name for p in d.iterdir())
        snapshot = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
        with pytest.raises(FileExistsError):
            write_golden(d, NEW, overwrite=True)
        assert sorted(p.name for p in d.iterdir()) == before, what
        assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == snapshot, what
        assert [p.name for p in tmp_path.iterdir()] == ["g"], f"{what}: a staging directory left"


def test_a_linked_target_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    with pytest.raises(FileExistsError, match="symbolic link"):
        write_golden(tmp_path / "link", ["plain"])
    assert list(real.iterdir()) == []


def test_a_dead_writers_staging_directory_is_removed_a_live_ones_is_not(tmp_path):
    d = tmp_path / "g"
    write_golden(d, OLD)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    stale = tmp_path / f".g{golden._STAGING}{dead}-abc"
    stale.mkdir()
    (stale / "plain.npz").write_bytes(b"half")
    live = tmp_path / f".g{golden._STAGING}{os.getppid()}-xyz"
    live.mkdir()
    write_golden(d, NEW, overwrite=True)
    assert not stale.exists() and live.exists()
    assert read_golden(d).names == NEW


def test_the_kill_test_catches_a_writer_that_replaces_files_in_place(tmp_path, sets):
    """The check above is not vacuous: the 0.2.0 writer (delete the old set, then write the new
    one in place) leaves neither set at some kill points."""
    old, new = sets
    mixtures = 0
    for k in range(1, 7):
        d = tmp_path / f"kill_{k}" / "golden"
        _old_set_with_user_files(d)
        subprocess.run(
            [sys.executable, "-c", KILL, str(d), str(k), ",".join(NEW), "in_place"],
            capture_output=True,
        )
        mixtures += _set_bytes(d) not in (old, new)
    assert mixtures >= 4
