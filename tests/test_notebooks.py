"""Notebooks are stored without outputs, each with a paired MyST-markdown text form (jupytext)
that must say the same thing, and each ends by asserting what it taught. The suite executes them
(pytest --nbmake, from setup.cfg's addopts)."""
from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_paired_text_form_is_in_sync(path):
    md = path.with_suffix(".md")
    assert md.exists(), f"{md.name} missing: run `jupytext --sync {path.relative_to(path.parents[1])}`"
    nb_cells = [(c.cell_type, c.source.strip()) for c in nbformat.read(path, as_version=4).cells]
    md_cells = [(c.cell_type, c.source.strip()) for c in jupytext.read(md).cells]
    assert md_cells == nb_cells, f"{md.name} and {path.name} differ: run `jupytext --sync`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ends_by_asserting_what_it_taught(path):
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert "assert " in code[-1], f"{path.name}: the last code cell must assert"
