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
    import attention_ref.attention as attention

    real = attention.sdpa_backward

    def broken(dout, trace):
        g = real(dout, trace)
        return g._replace(dv=1.01 * g.dv)

    monkeypatch.setattr(attention, "sdpa_backward", broken)
    assert main(["check", "--quiet", "--seed", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "attention_ref", "check", "--help"],
                            capture_output=True, text=True, check=True)
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
