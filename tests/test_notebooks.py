"""Notebooks are stored without outputs, each with a paired MyST-markdown text form (jupytext)
that must say the same thing, and each ends by asserting what it taught: its last cell fails when
a bug in what it taught is planted in attention_ref. The suite executes them (pytest --nbmake,
from setup.cfg's addopts)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import jupytext
import nbformat
import pytest
from conftest import require_torch

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} cell {i} has outputs"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_paired_text_form_is_in_sync(path):
    md = path.with_suffix(".md")
    assert md.exists(), (
        f"{md.name} missing: run `jupytext --sync {path.relative_to(path.parents[1])}`"
    )
    nb_cells = [(c.cell_type, c.source.strip()) for c in nbformat.read(path, as_version=4).cells]
    md_cells = [(c.cell_type, c.source.strip()) for c in jupytext.read(md).cells]
    assert md_cells == nb_cells, f"{md.name} and {path.name} differ: run `jupytext --sync`"


#: Run in the kernel before a notebook's first cell: imports every module of attention_ref (so
#: that later imports bind what is planted), and defines ``_plant(path, make_bug)``, which
#: replaces the function at ``path`` by ``make_bug(original)`` under every name any module of
#: attention_ref binds it to (a re-export, a caller's module global, the 0.1 alias paths).
PLANT_SETUP = """\
import importlib as _importlib, pkgutil as _pkgutil, sys as _sys
import numpy as _np
import attention_ref as _ar

for _info in _pkgutil.walk_packages(_ar.__path__, "attention_ref."):
    if not _info.name.startswith(("attention_ref.adapters", "attention_ref.cli")):
        try:
            _importlib.import_module(_info.name)
        except ImportError:  # a module the notebook needs will fail in the notebook
            pass


def _plant(path, make_bug):
    module, _, name = path.rpartition(".")
    original = getattr(_importlib.import_module(module), name)
    bug, bound = make_bug(original), 0
    for mod in list(_sys.modules.values()):
        if getattr(mod, "__name__", "").partition(".")[0] == "attention_ref":
            for attr, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, attr, bug)
                    bound += 1
    assert bound, f"planting a bug: nothing in attention_ref binds {path}"
"""


class Bug(NamedTuple):
    what: str  #: what the planted bug gets wrong
    plant: str  #: code run after PLANT_SETUP, before the notebook
    caught_by: str  #: text of the last cell's assertion that must fail
    needs_torch: bool = False  #: the assertion that catches it runs only with torch


def _scaled(factor: str, field: str = "") -> str:
    """``make_bug`` source: the result (or its ``field``) times ``factor``, i.e. off by 1%."""
    if not field:
        return f"lambda f: lambda *a, **kw: {factor} * f(*a, **kw)"
    return f"lambda f: lambda *a: (lambda g: g._replace({field}={factor} * g.{field}))(f(*a))"


#: Per notebook (file stem), the bugs its last cell must catch: each notebook runs with the bug
#: planted and must fail with an AssertionError raised by its last cell, at ``caught_by``.
PLANTED_BUGS: dict[str, list[Bug]] = {
    "01_shapes_and_projections": [
        Bug(
            "split_heads is x.reshape(H, T, Dk): right shape, entries from the wrong heads",
            '_plant("attention_ref.split_heads", lambda f: lambda x, num_heads, **kw: '
            "_np.reshape(x, _np.shape(x)[:-2] + (num_heads, _np.shape(x)[-2], -1)))",
            "assert np.array_equal(q[:, h], q_flat[:, :, h * Dk:(h + 1) * Dk])",
        )
    ],
    "02_softmax_and_stability": [
        Bug(
            "softmax_backward 1% too large",
            f'_plant("attention_ref.softmax_backward", {_scaled("1.01")})',
            "assert np.allclose(J.T @ dp, softmax_backward(dp, p))",
        )
    ],
    "03_scaled_dot_product_attention": [
        Bug(
            "default scale 1/Dk instead of 1/sqrt(Dk)",
            "def _scale_1_over_dk(f):\n"
            "    def sdpa_forward(q, k, v, **kw):\n"
            '        if kw.get("scale") is None and kw.get("options") is None:\n'
            '            kw["scale"] = 1.0 / _np.shape(q)[-1]\n'
            "        return f(q, k, v, **kw)\n"
            "    return sdpa_forward\n"
            '_plant("attention_ref.sdpa_forward", _scale_1_over_dk)',
            "assert np.all(np.abs(var_scaled - 1) <= band)",
        )
    ],
    "04_masks": [
        Bug(
            'causal_mask ignores align: "bottom_right" built as "top_left"',
            '_plant("attention_ref.causal_mask", lambda f: lambda T, S, **kw: f(T, S))',
            'assert causal_mask(3, 6, align="bottom_right")[0, 3]',
        )
    ],
    "05_backward_by_hand": [
        Bug(
            "softcap_backward (A14) 1% too large, in the stages and in sdpa_backward",
            f'_plant("attention_ref.core.scores.softcap_backward", {_scaled("1.01")})',
            "assert all(passed for _, passed in checks.values())",
        ),
        Bug(
            "sdpa_backward's dq 1% too large (the stages are right)",
            f'_plant("attention_ref.sdpa_backward", {_scaled("1.01", "dq")})',
            "assert all(r.rel_error <= 1e-14 for r in same.values())",
        ),
    ],
    "06_multi_head_attention": [
        Bug(
            "sdpa_backward's dk 1% too large (reaches mha_backward's dkey, dw_k)",
            f'_plant("attention_ref.sdpa_backward", {_scaled("1.01", "dk")})',
            "assert result.passed",
        )
    ],
    "07_attention_ref_as_oracle": [
        Bug(
            "check_budget judges only NaN/Inf placement, not the size of the error",
            '_plant("attention_ref.testing.check_budget", lambda f: lambda *a, **kw: '
            "(lambda r: r._replace(passed=r.candidate.nonfinite_mismatch "
            "<= r.baseline.nonfinite_mismatch))(f(*a, **kw)))",
            "assert {n for n, r in buggy32.items() if not r.passed} == set(exact) - MASK_BLIND",
            needs_torch=True,
        )
    ],
    "08_online_softmax_and_tiling": [
        Bug(
            "online_softmax_update forgets the rescale e^(m - m') of l and acc",
            "def _no_rescale(f):\n"
            "    def online_softmax_update(state, *a, **kw):\n"
            "        new = f(state, *a, **kw)\n"
            "        kept = 1 - _np.exp(state.row_max - new.row_max)  # undo the rescale\n"
            "        return new._replace(row_sum=new.row_sum + kept * state.row_sum,\n"
            "                            acc=new.acc + kept * state.acc)\n"
            "    return online_softmax_update\n"
            '_plant("attention_ref.variants.flash.online_softmax_update", _no_rescale)',
            "assert online_err.rel_error <= 1e-15",
        )
    ],
    "09_composable_attention": [
        Bug(
            "merge_attention_states returns the merged lse too large by log 2 (out right)",
            '_plant("attention_ref.merge_attention_states", lambda f: lambda *a, **kw: '
            "(lambda s: s._replace(lse=s.lse + _np.log(2.0)))(f(*a, **kw)))",
            "assert merge_err <= 1e-13",
        )
    ],
    "10_serving_layouts": [
        Bug(
            "gather_pages off by one: position p gets slot p + 1's row, the last position the fill",
            "def _skip_first_slot(f):\n"
            "    def gather_pages(pages, block_table, seqlens, **kw):\n"
            "        g = f(pages, block_table, seqlens, **kw)\n"
            "        dense = g.dense.copy()\n"
            "        for b, n in enumerate(g.lengths):\n"
            "            if n:\n"
            "                dense[b, :, : n - 1] = g.dense[b, :, 1:n]\n"
            '                dense[b, :, n - 1] = kw.get("fill", 0.0)\n'
            "        return g._replace(dense=dense)\n"
            "    return gather_pages\n"
            '_plant("attention_ref.variants.paged.gather_pages", _skip_first_slot)',
            "assert gather_exact and paged_err <= 1e-13",
        )
    ],
    "11_flex_attention": [
        Bug(
            "RelativePositionBias's table gradient (B10) scattered at kv_idx - q_idx: mirrored",
            '_plant("attention_ref.core.mods._scatter_heads", '
            "lambda f: lambda g, n, shape: f(g, shape[1] - 1 - n, shape))",
            "assert table_check.passed",
        ),
        Bug(
            "check_block_mask reports nothing wrong (an empty report)",
            "import dataclasses as _dc\n"
            '_plant("attention_ref.check_block_mask", lambda f: lambda *a, **kw: '
            "_dc.replace(f(*a, **kw), wrong_full=[], missed=[]))",
            "assert report.wrong_full == [(0, 0, 2, 2, 6)] and report.missed == []",
        ),
    ],
}


def _run_with_bug(path: Path, plant: str) -> tuple[int | None, int, str, str]:
    """Execute the notebook with ``plant`` run first; ``(failing cell, last cell, error name,
    failing line)``, the cells counted among the notebook's own code cells (None: no error)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PLANT_SETUP + "\n" + plant + "\n"))
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    code = [c for c in nb.cells if c.cell_type == "code"]
    try:
        client.execute()
    except CellExecutionError:
        pass
    for i, cell in enumerate(code):
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(output.traceback))
                marked = re.findall(r"^-+> *\d+ (.*)$", text, flags=re.M) or [text[-300:]]
                return i - 1, len(code) - 2, output.ename, marked[0]
    return None, len(code) - 2, "", ""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ends_by_asserting_what_it_taught(path):
    """The last cell's assertions are not vacuous: with a bug in what the notebook taught planted
    in attention_ref (in the kernel, before the first cell), the notebook fails, with an
    AssertionError raised by its last cell. (Without the bug it passes: the suite's --nbmake
    run.)"""
    bugs = PLANTED_BUGS.get(path.stem)
    assert bugs, f"{path.name}: add a bug its last cell must catch to PLANTED_BUGS"
    for bug in bugs:
        if bug.needs_torch:
            require_torch()
        cell, last, ename, line = _run_with_bug(path, bug.plant)
        assert cell is not None, f"{path.name} passed with a planted bug: {bug.what}"
        assert (cell, ename) == (last, "AssertionError"), (
            f"{path.name} with {bug.what}: expected an AssertionError in the last code cell "
            f"({last}); got {ename or 'no error'} in cell {cell} (-1: the planting): {line}"
        )
        assert bug.caught_by in line, f"{path.name} with {bug.what}: failed at {line!r}"
