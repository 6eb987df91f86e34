"""The package's layers import only downwards.

attention_ref is five sub-packages, each allowed to import the ones below it:

    core (1)  <-  variants (2)  <-  adapters (3)  <-  oracle (4)  <-  cli (5)

The faces (``attention_ref/__init__.py``, ``testing.py``, ``cases.py``, ``golden.py``,
``gradcheck.py``, ``__main__.py``) only re-export and may import any layer; no layer imports a
face. ``_version.py`` is readable by all. Each sub-package's docstring says what it may import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attention_ref"
LAYERS = {"core": 1, "variants": 2, "adapters": 3, "oracle": 4, "cli": 5}
SHARED = {"_version"}  # importable from every layer
FACES = {"__init__", "__main__", "testing", "cases", "golden", "gradcheck", "_aliases"}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, 'attention_ref.x.y')`` for every import of the package in ``source``.

    ``module`` is the dotted name of the file (``attention_ref.core.scores``), to resolve relative
    imports; ``from . import a, b`` yields ``package.a`` and ``package.b``.
    """
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name) for a in node.names if a.name.startswith("attention_ref")
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("attention_ref"):
                continue
            if node.module is None or target in ("attention_ref",):
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def layer_of(dotted: str) -> str | None:
    """The layer a dotted name belongs to ('core', ...), 'shared', or 'face'."""
    parts = dotted.split(".")
    if len(parts) < 2:
        return "face"  # the package itself: its __init__ is a face
    if parts[1] in LAYERS:
        return parts[1]
    if parts[1] in SHARED:
        return "shared"
    return "face"


def violations(source: str, module: str) -> list[str]:
    """Imports of ``module`` that go up a layer or into a face."""
    own = layer_of(module)
    if own not in LAYERS:
        return []
    bad = []
    for line, target in imported_modules(source, module):
        where = layer_of(target)
        if where == "shared":
            continue
        if where == "face" or LAYERS[where] > LAYERS[own]:
            bad.append(f"{module}:{line} imports {target} ({where}, above {own})")
    return bad


def package_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out.append((".".join(rel.parts), path))
    return out


def test_every_layer_is_a_package_with_a_docstring_saying_what_it_may_import():
    for name in LAYERS:
        init = PACKAGE / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc or "may import" in doc, (
            f"{init}: docstring must say what it may import"
        )


def test_no_module_outside_the_layers_but_the_faces():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= FACES | SHARED, (
        f"modules at the top level that are not faces: {sorted(top - FACES - SHARED)}"
    )


def test_imports_go_down_the_layers():
    bad = []
    for module, path in package_modules():
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")] + ".__init__"
        bad += violations(path.read_text(), module)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source, module, expected",
    [
        ("from ..oracle.cases import cases", "attention_ref.core.mha", 1),  # core -> oracle: up
        ("from .. import golden", "attention_ref.variants.flash", 1),  # a layer -> a face
        ("import attention_ref.cli", "attention_ref.oracle.check", 1),  # absolute, up
        ("from ..core.attention import sdpa_forward", "attention_ref.oracle.exact", 0),
        ("from .scores import apply_mask", "attention_ref.core.attention", 0),
        ("from .._version import __version__", "attention_ref.core.mha", 0),
    ],
)
def test_the_checker_catches_an_upward_import(source, module, expected):
    assert len(violations(source, module)) == expected
