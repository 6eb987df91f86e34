"""The command line never prints a traceback: each misuse or failure is one line on stderr and a
documented exit status (``attention_ref.cli``: 0 ok, 1 failed, 2 usage, 3 environment, 4 bug,
130 interrupted, 141 closed pipe). Run as a user would, in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _cli(*args: str, stdout=subprocess.PIPE, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "attention_ref", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        **kwargs,
    )


def _no_traceback(run: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in run.stderr and "Traceback" not in (run.stdout or ""), run.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("check", "--seed", "-1"),
        ("check", "--seed", "x"),
        ("golden",),
        ("compare", "numpy"),
        ("verify", "a", "--precision", "float8"),
        ("nonsense",),
    ],
)
def test_usage_errors_exit_2_in_one_line(args):
    run = _cli(*args)
    assert run.returncode == 2, run.stderr
    _no_traceback(run)
    assert "error:" in run.stderr


def test_an_unknown_case_is_a_usage_error(tmp_path):
    run = _cli("golden", str(tmp_path / "g"), "--cases", "no_such_case", "--quiet")
    assert run.returncode == 2
    _no_traceback(run)
    assert "no_such_case" in run.stderr and not (tmp_path / "g").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_an_environment_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        run = _cli("golden", str(ro / "g"), "--cases", "plain", "--quiet")
    finally:
        ro.chmod(0o700)
    assert run.returncode == 3
    _no_traceback(run)
    assert run.stderr.count("\n") == 1 and "error:" in run.stderr


def test_a_path_through_a_file_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run = _cli("golden", str(blocker / "g"), "--cases", "plain", "--quiet")  # parent is a file
    assert run.returncode == 2
    _no_traceback(run)
    assert "is a file, not a directory" in run.stderr and run.stderr.count("\n") == 1


def test_a_write_that_the_file_system_refuses_is_an_environment_error(tmp_path):
    run = _cli("golden", str(tmp_path / ("x" * 300)), "--cases", "plain", "--quiet")
    assert run.returncode == 3  # ENAMETOOLONG from the file system
    _no_traceback(run)
    assert run.stderr.startswith("attention-ref: error:") and run.stderr.count("\n") == 1


def test_a_full_stdout_is_an_environment_error():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        run = _cli("cases", stdout=full)
    assert run.returncode == 3
    _no_traceback(run)
    assert "No space left" in run.stderr and run.stderr.count("\n") == 1


def test_a_closed_stdout_is_not_an_error():
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; os.close(1); from attention_ref.cli import main; "
            "sys.exit(main(['cases']))",
        ],
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    _no_traceback(run)
    assert run.returncode in (0, 3), run.stderr


def test_a_missing_golden_set_fails_verification_in_one_line(tmp_path):
    run = _cli("verify", str(tmp_path / "nothing"), "--quiet")
    assert run.returncode == 1
    _no_traceback(run)
    assert "no such directory" in run.stdout + run.stderr


def test_a_bug_is_one_line_with_status_4(tmp_path):
    code = (
        "import sys\n"
        "import attention_ref.oracle.golden as g\n"
        "def boom(*a, **k):\n"
        "    raise KeyError('planted')\n"
        "g.write_golden = boom\n"
        "from attention_ref.cli import main\n"
        f"sys.exit(main(['golden', {str(tmp_path / 'g')!r}, '--quiet']))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 4
    _no_traceback(run)
    assert "internal error (KeyError" in run.stderr and "please report" in run.stderr


def test_a_corrupt_golden_set_is_one_line_and_status_1(tmp_path):
    from attention_ref.golden import write_golden

    d = tmp_path / "g"
    write_golden(d, ["plain", "gqa"])
    blob = bytearray((d / "gqa.npz").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (d / "gqa.npz").write_bytes(bytes(blob))
    (d / "plain.npz").write_bytes(b"")
    run = _cli("verify", str(d), "--quiet")
    assert run.returncode == 1
    _no_traceback(run)
    assert (
        run.stdout.count("\n") == 1 and "not valid" in run.stdout and "more problem" in run.stdout
    )
