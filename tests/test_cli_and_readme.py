"""The main job (python -m attention_ref) and the README's example run as documented."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

from attention_ref.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_passes_and_prints_a_table(capsys):
    assert main(["--quiet"]) == 0
    out = capsys.readouterr().out
    assert "scaled_dot_product_attention" in out and "multi_head_attention" in out
    assert re.search(r"gradcheck: \d+ passed, 0 failed", out)
    assert "FAIL" not in out


def test_main_job_fails_when_a_gradient_is_wrong(monkeypatch, capsys):
    import attention_ref.oracle.cases as cases

    real = cases.sdpa_backward

    def broken(dout, trace):
        g = real(dout, trace)
        return g._replace(dv=(1 + 1e-9) * g.dv)  # far below what finite differences can see

    monkeypatch.setattr(cases, "sdpa_backward", broken)
    assert main(["check", "--quiet", "--quick", "--seed", "1"]) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.endswith("FAIL")]
    assert rows and all(r[0] == "scaled_dot_product_attention" and r[2] == "dv" for r in rows)
    # finite differences pass it (1e-9 < FD_RTOL); the complex step does not
    assert all(float(r[3]) < 1e-6 and float(r[4]) > 1e-10 for r in rows)


def test_check_json_is_machine_readable(capsys):
    import json

    assert main(["check", "--quick", "--quiet", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] and doc["command"] == "check"
    cases_seen = {r["case"] for r in doc["rows"]}
    assert "causal_bottom_right_t_gt_s" in cases_seen and "long_rows" not in cases_seen
    assert max(r["cs_rel_error"] for r in doc["rows"] if not r["exact_zero"]) < 1e-12


def test_cases_subcommand_lists_every_case(capsys):
    from attention_ref.cases import cases

    assert main(["cases"]) == 0
    out = capsys.readouterr().out
    assert all(c.name in out for c in cases())


def test_a_reader_closing_the_pipe_ends_the_run_quietly():
    """``attention-ref cases | head``: when the reader has closed the pipe, the command stops with
    141 (128 + SIGPIPE) and no traceback, instead of a BrokenPipeError. (The whole listing fits
    in a pipe's buffer, so the reader closes before the child, still importing, writes.)"""
    run = subprocess.Popen(
        [sys.executable, "-m", "attention_ref", "cases"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    run.stdout.close()  # the reader goes away before the first line
    stderr = run.stderr.read().decode()
    run.stderr.close()
    assert run.wait(timeout=60) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "attention_ref", "check", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "finite differences" in " ".join(result.stdout.split())  # argparse wraps lines


def test_readme_ten_line_example_prints_what_its_comments_say():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Ten lines", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    expected = [line.split("# ")[-1] for line in block.splitlines() if line.startswith("print(")]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(block, "README.md", "exec"), {})
    assert buf.getvalue().splitlines() == expected


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && pytest' in readme and "python -m attention_ref" in readme
    assert 'pip install --quiet -e ".[test]"' in ci and "\npytest\n" in ci and "torch==2.13.0" in ci
