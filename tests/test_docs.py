"""The docs keep the code's equation citations honest.

1. Every public ``*_backward`` function (in ``attention_ref.__all__`` and in each public module of
   the package) has a docstring that names a page ``docs/derivations/<page>.md`` that exists, and
   cites an equation label defined on that page.
2. Every label the package cites, ``(L2)``, ``(A11)``, ..., is defined on some derivation page.
3. No label is defined twice.

A label is defined by a MyST dollarmath block whose closing line carries it::

    $$
    dx = dy\\, W^\\top
    $$ (L2)
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections import defaultdict
from pathlib import Path

import pytest

import attention_ref

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attention_ref"
DERIVATIONS = ROOT / "docs" / "derivations"
#: Every public module of every layer. Found by walking the package, so a renamed or moved module
#: (``linear`` -> ``projection``, ``softmax`` -> ``stable_softmax``) is still covered.
MODULES = tuple(
    m.name
    for m in pkgutil.walk_packages(attention_ref.__path__, prefix="attention_ref.")
    if not any(part.startswith("_") for part in m.name.split("."))
)
#: Backwards that must be found, so that the docstring test cannot pass by finding nothing.
EXPECTED_BACKWARDS = {
    "linear_backward",
    "split_heads_backward",
    "merge_heads_backward",
    "softmax_backward",
    "logsumexp_backward",
    "sdpa_backward",
    "scaled_dot_product_attention_backward",
    "mha_backward",
    "multi_head_attention_backward",
    "scaled_scores_backward",
    "softcap_backward",
    "weighted_values_backward",
}

CITATION = re.compile(r"\(([LHSAMGVFCRPDXB]\d+)\)")
PAGE_REF = re.compile(r"docs/derivations/([\w-]+)\.md")
OPEN_MATH = re.compile(r"^\$\$\s*$")
CLOSE_MATH = re.compile(r"^\$\$\s*(?:\((?P<label>[^()\s]+)\))?\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def parse_labels(text: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(label, line), ...], [problem, ...])`` of one page's labelled ``$$`` blocks.

    Display math opens with a line ``$$`` and closes with ``$$`` or ``$$ (LABEL)``; fenced code is
    skipped. A label outside a block, or a block left open, is a problem.
    """
    labels, problems = [], []
    in_math = in_fence = False
    opened_at = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not in_math and FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        close = CLOSE_MATH.match(line)
        if in_math:
            if close:
                in_math = False
                if close.group("label"):
                    labels.append((close.group("label"), lineno))
        elif OPEN_MATH.match(line):
            in_math, opened_at = True, lineno
        elif close and close.group("label"):
            problems.append(f"line {lineno}: label {close.group('label')} closes no $$ block")
    if in_math:
        problems.append(f"line {opened_at}: $$ block never closed")
    return labels, problems


def _pages() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DERIVATIONS.glob("*.md"))}


def _definitions() -> dict[str, list[tuple[str, int]]]:
    """label -> [(page, line), ...] over every derivation page."""
    defs: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for page, path in _pages().items():
        for label, lineno in parse_labels(path.read_text(encoding="utf-8"))[0]:
            defs[label].append((page, lineno))
    return defs


def _backward_functions() -> dict[str, object]:
    """Public functions named ``*_backward`` in ``attention_ref.__all__`` and the stage modules."""
    sources = [(attention_ref, list(attention_ref.__all__))]
    for name in MODULES:
        module = importlib.import_module(name)
        sources.append((module, [n for n in vars(module) if not n.startswith("_")]))
    found = {}
    for module, names in sources:
        for name in names:
            obj = getattr(module, name)
            if name.endswith("_backward") and inspect.isfunction(obj):
                found.setdefault(obj.__name__, obj)
    return dict(sorted(found.items()))


BACKWARDS = _backward_functions()


def test_backwards_are_found():
    assert {
        "attention_ref.core.scores",
        "attention_ref.core.heads",
        "attention_ref.core.attention",
        "attention_ref.core.mha",
    } <= set(MODULES), MODULES
    missing = EXPECTED_BACKWARDS - set(BACKWARDS)
    assert not missing, f"expected *_backward functions not found: {sorted(missing)}"


def test_derivation_pages_are_well_formed():
    pages = _pages()
    assert pages, f"no derivation pages under {DERIVATIONS}"
    problems = [
        f"{page}.md {p}"
        for page, path in pages.items()
        for p in parse_labels(path.read_text(encoding="utf-8"))[1]
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(BACKWARDS))
def test_backward_docstring_cites_its_derivation(name):
    doc = inspect.getdoc(BACKWARDS[name]) or ""
    pages = sorted(set(PAGE_REF.findall(doc)))
    assert pages, f"{name}'s docstring names no docs/derivations/<page>.md"
    existing = _pages()
    absent = [p for p in pages if p not in existing]
    assert not absent, f"{name}'s docstring names pages that do not exist: {absent}"
    cited = set(CITATION.findall(doc))
    on_pages = {
        label for label, where in _definitions().items() if any(p in pages for p, _ in where)
    }
    assert cited & on_pages, (
        f"{name}'s docstring cites {sorted(cited) or 'no equation'}, none of which is defined on "
        f"{', '.join(f'docs/derivations/{p}.md' for p in pages)}"
    )


def test_every_cited_label_is_defined():
    defined = _definitions()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            missing += [
                f"{path.name}:{lineno} ({label})"
                for label in CITATION.findall(line)
                if label not in defined
            ]
    assert not missing, "labels cited in the code but defined on no derivation page:\n" + "\n".join(
        missing
    )


def test_every_label_is_defined_once():
    duplicates = {label: where for label, where in _definitions().items() if len(where) > 1}
    assert not duplicates, "labels defined more than once: " + "; ".join(
        f"{label} at " + ", ".join(f"{page}.md:{line}" for page, line in where)
        for label, where in sorted(duplicates.items())
    )


def test_labels_are_numbered_in_page_order():
    """Sphinx numbers a page's labelled equations 1, 2, ...; keeping each page's labels in order
    from 1 makes (A11) render as (11) on the attention page."""
    problems = []
    for page, path in _pages().items():
        labels = [label for label, _ in parse_labels(path.read_text(encoding="utf-8"))[0]]
        numbers = [int(re.sub(r"^\D+", "", label)) for label in labels]
        if (
            numbers != list(range(1, len(labels) + 1))
            or len({re.sub(r"\d+$", "", label) for label in labels}) > 1
        ):
            problems.append(f"{page}.md: {labels}")
    assert not problems, "labels not numbered 1, 2, ... with one prefix per page: " + "; ".join(
        problems
    )


def test_parse_labels_rejects_malformed_pages():
    text = "$$\nx\n$$ (X1)\n```\n$$ (X9)\n```\n$$ (X2)\n$$\ny\n"
    labels, problems = parse_labels(text)
    assert labels == [("X1", 3)]
    assert any("X2" in p for p in problems)  # a label on a line that closes nothing
    assert any("never closed" in p for p in problems)
