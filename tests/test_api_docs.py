"""docs/api.md against the package: every public name documented, every documented name real.

The API page is written by hand (its order and prose are for readers), so it is checked here
against the exports rather than generated from them:

(a) every public name is documented on the page, at the path it is imported from:
    ``attention_ref.linear`` under ``.. currentmodule:: attention_ref``,
    ``attention_ref.testing.compare`` under ``attention_ref.testing`` (documenting it only at
    ``attention_ref.oracle.testing`` does not count), and each public module has an
    ``.. automodule::``. The public names are listed in :data:`PUBLIC_MODULES`'s modules'
    ``__all__``, or, for a module without ``__all__``, the names its own source defines at top
    level (functions, classes, assignments; not imports) that do not start with ``_``. A public
    name that is a module (``gradcheck`` in ``attention_ref.__all__``) needs its automodule.
(b) every documented name exists at the documented path and is of the kind its directive says
    (``autofunction`` a function, ``autoclass`` a class, ...), and the members an ``autoclass``
    lists in ``:members:`` exist on the class.

The page's directives are read from its ``{eval-rst}`` blocks, with their context as Sphinx
keeps it: ``.. currentmodule::`` and ``.. automodule::`` set the module of the directives that
follow, across blocks, until the next one; a dotted name (``.. autofunction:: pkg.mod.name``)
names its own module. ``.. automodule:: X`` with ``:members:`` is refused: what it expands to
depends on docstrings and ``__all__``, so the check could not see it; the page lists names one
by one instead. Sphinx builds the same page with ``-W`` in ``tests/test_docs_build.py``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "api.md"

#: The modules whose public names the page must document, each at its own path.
PUBLIC_MODULES = (
    "attention_ref",
    "attention_ref.gradcheck",
    "attention_ref.testing",
    "attention_ref.cases",
    "attention_ref.golden",
    "attention_ref.variants.flash",
    "attention_ref.variants.varlen",
    "attention_ref.variants.decode",
    "attention_ref.variants.context_parallel",
    "attention_ref.variants.mla",
    "attention_ref.variants.paged",
    "attention_ref.variants.sparse",
    "attention_ref.variants.flex",
    "attention_ref.variants.fp8",
    "attention_ref.oracle.exact",
    "attention_ref.adapters",
    "attention_ref.adapters.windows",
    "attention_ref.adapters.torch",
    "attention_ref.adapters.jax",
)

#: Directive -> the kind of object it documents.
MODULE_LEVEL = {
    "autofunction": "function",
    "autodecorator": "function",
    "autoclass": "class",
    "autoexception": "exception",
    "autodata": "data",
}
CLASS_LEVEL = {"automethod", "autoattribute", "autoproperty"}

FENCE_OPEN = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*\{eval-rst\}\s*$")
DIRECTIVE = re.compile(r"^\.\.\s+(?P<name>[\w:-]+)::\s*(?P<arg>\S*)\s*$")
OPTION = re.compile(r"^\s+:(?P<name>[\w-]+):\s*(?P<value>.*)$")


class Directive(NamedTuple):
    """One autodoc or module directive of the page, resolved against its module context."""

    line: int  #: line number in the page
    kind: str  #: ``autofunction``, ``automodule``, ``currentmodule``, ...
    module: str  #: the module it documents in (for ``automodule``: the module itself)
    name: str  #: the documented name (dotted for class members); ``""`` for a module
    options: dict  #: option name -> its value, continuation lines joined


# --------------------------------------------------------------------------- public names


def defined_names(module: ModuleType) -> list[str]:
    """Names the module's own source defines at top level (not imports), without a leading ``_``."""
    tree = ast.parse(Path(inspect.getsourcefile(module)).read_text(encoding="utf-8"))
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                elts = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
                names += [t.id for t in elts if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in dict.fromkeys(names) if not n.startswith("_")]


def public_names(module_name: str) -> list[str]:
    """A module's ``__all__`` if it has one, else :func:`defined_names`."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return defined_names(module)


def public_api() -> dict[str, list[str]]:
    """Module -> its public names, for every module of :data:`PUBLIC_MODULES`."""
    return {name: public_names(name) for name in PUBLIC_MODULES}


# --------------------------------------------------------------------------- the page


def parse_directives(text: str) -> tuple[list[Directive], list[str]]:
    """The directives of the ``{eval-rst}`` blocks of a MyST page, and the problems found.

    The module context starts empty and persists across blocks, as in Sphinx.
    """
    directives: list[Directive] = []
    problems: list[str] = []
    current = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE_OPEN.match(lines[i])
        i += 1
        if not opened:
            continue
        fence = opened.group("fence")
        block: list[tuple[int, str]] = []
        while i < len(lines) and not lines[i].startswith(fence[0] * len(fence)):
            block.append((i + 1, lines[i]))
            i += 1
        i += 1  # the closing fence
        j = 0
        while j < len(block):
            lineno, line = block[j]
            j += 1
            match = DIRECTIVE.match(line)
            if not match:
                continue
            kind, arg = match.group("name"), match.group("arg")
            options: dict[str, str] = {}
            last = None
            # the options follow the directive line, indented, up to the first blank line
            while j < len(block) and block[j][1][:1].isspace() and block[j][1].strip():
                opt = OPTION.match(block[j][1])
                if opt:
                    last = opt.group("name")
                    options[last] = opt.group("value").strip()
                elif last is not None:  # an option's continuation line
                    options[last] += " " + block[j][1].strip()
                j += 1
            if kind in ("currentmodule", "py:currentmodule", "module", "py:module"):
                current = "" if arg == "None" else arg
                directives.append(Directive(lineno, "currentmodule", current, "", options))
            elif kind == "automodule":
                current = arg
                directives.append(Directive(lineno, kind, arg, "", options))
                if "members" in options:
                    problems.append(
                        f"line {lineno}: automodule:: {arg} has :members:; list the "
                        "names one by one so that they can be checked"
                    )
            elif kind in MODULE_LEVEL:
                module, _, name = arg.rpartition(".") if "." in arg else (current, "", arg)
                if not module:
                    problems.append(f"line {lineno}: {kind}:: {arg} has no current module")
                    continue
                directives.append(Directive(lineno, kind, module, name, options))
            elif kind in CLASS_LEVEL:
                if not current:
                    problems.append(f"line {lineno}: {kind}:: {arg} has no current module")
                    continue
                directives.append(Directive(lineno, kind, current, arg, options))
    return directives, problems


#: How a problem names each kind.
A_KIND = {
    "function": "a function",
    "class": "a class",
    "exception": "an exception",
    "data": "data",
    "module": "a module",
}


def _kind_of(obj: object) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isroutine(obj):
        return "function"
    return "data"


def _has_member(obj: object, name: str) -> bool:
    """Whether autodoc can find ``name`` on ``obj``: an attribute, or on a class also an
    annotation-only field (a dataclass field without a default) or an instance attribute that
    its methods assign (``self.name = ...``)."""
    if hasattr(obj, name):
        return True
    if not inspect.isclass(obj):
        return False
    if any(name in vars(klass).get("__annotations__", {}) for klass in obj.__mro__):
        return True
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return False
    return re.search(rf"^\s*self\.{re.escape(name)}\s*[:=]", source, flags=re.M) is not None


def _members(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


def check_api_page(text: str, public: dict[str, list[str]]) -> list[str]:
    """Every problem of a page: (a) public names it does not document, (b) names it documents
    that do not exist (or are of another kind), and malformed directives."""
    directives, problems = parse_directives(text)
    documented: set[tuple[str, str]] = set()
    modules_documented: set[str] = set()
    for d in directives:
        if d.kind == "currentmodule":
            continue
        try:
            module = importlib.import_module(d.module)
        except ImportError as exc:
            problems.append(
                f"line {d.line}: {d.kind}:: names module {d.module}, which does not import ({exc})"
            )
            continue
        if d.kind == "automodule":
            modules_documented.add(d.module)
            continue
        obj: object = module
        for part in d.name.split("."):
            if not hasattr(obj, part):
                problems.append(
                    f"line {d.line}: {d.kind}:: {d.name}: {d.module}.{d.name} does not exist"
                )
                break
            obj = getattr(obj, part)
        else:
            if d.kind in MODULE_LEVEL:
                documented.add((d.module, d.name))
                want, got = MODULE_LEVEL[d.kind], _kind_of(obj)
                if got != want and not (want == "class" and got == "exception"):
                    problems.append(
                        f"line {d.line}: {d.kind}:: {d.name}: {d.module}.{d.name} "
                        f"is {A_KIND[got]}, not {A_KIND[want]}"
                    )
                for option in ("members", "exclude-members"):
                    for member in _members(d.options.get(option, "")):
                        if not _has_member(obj, member):
                            problems.append(
                                f"line {d.line}: {d.kind}:: {d.name} :{option}: "
                                f"{member}: {d.module}.{d.name}.{member} does not "
                                "exist"
                            )
    for module_name, names in public.items():
        if module_name not in modules_documented:
            problems.append(f"undocumented module: {module_name} has no automodule")
        module = importlib.import_module(module_name)
        for name in names:
            obj = getattr(module, name, None)
            if inspect.ismodule(obj):
                if f"{module_name}.{name}" not in modules_documented:
                    problems.append(
                        f"undocumented module: {module_name}.{name} (public in "
                        f"{module_name}) has no automodule"
                    )
            elif (module_name, name) not in documented:
                problems.append(f"undocumented: {module_name}.{name}")
    return problems


# --------------------------------------------------------------------------- the tests


def test_api_page_documents_every_public_name_and_nothing_else():
    problems = check_api_page(API_PAGE.read_text(encoding="utf-8"), public_api())
    assert not problems, "docs/api.md and the package disagree:\n" + "\n".join(problems)


def test_public_names_of_modules_without_all_are_their_own():
    """flash and exact have no ``__all__``: their names, not what they import."""
    for module_name in ("attention_ref.variants.flash", "attention_ref.oracle.exact"):
        module = importlib.import_module(module_name)
        names = public_names(module_name)
        assert names, module_name
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isroutine(obj):
                assert obj.__module__ == module_name, (module_name, name, obj.__module__)
    flash = public_names("attention_ref.variants.flash")
    assert {"flash_attention_forward", "flash_attention_backward", "BLOCK_Q"} <= set(flash)
    assert "AttentionGrads" not in flash and "annotations" not in flash  # imported, not its own
    exact = public_names("attention_ref.oracle.exact")
    assert {"exact_sdpa", "exact_mha", "MAX_SCORES"} <= set(exact) and "attention_mask" not in exact


SYNTHETIC = """
# A small API page

```{eval-rst}
.. automodule:: attention_ref
   :no-members:

.. currentmodule:: attention_ref

.. autofunction:: linear

.. autofunction:: no_such_function

.. autoclass:: LinearGrads
   :members: dx, dweight,
             no_such_field
```

Text between blocks does not reset the module.

```{eval-rst}
.. autoclass:: linear_backward

.. autofunction:: attention_ref.testing.compare

.. automodule:: attention_ref.no_such_module
   :no-members:

.. automodule:: attention_ref.cases
   :members:
```
"""
SYNTHETIC_PUBLIC = {
    "attention_ref": ["linear", "linear_backward", "LinearGrads", "softmax", "gradcheck"],
    "attention_ref.testing": ["compare", "assert_close"],
}


def test_checker_catches_undocumented_and_nonexistent_names():
    problems = check_api_page(SYNTHETIC, SYNTHETIC_PUBLIC)
    text = "\n".join(problems)
    # (a) public names left out, a public submodule without automodule, a module without one
    assert "undocumented: attention_ref.softmax" in text, text
    assert "undocumented: attention_ref.testing.assert_close" in text, text
    assert "undocumented module: attention_ref.gradcheck" in text, text
    assert "undocumented module: attention_ref.testing has no automodule" in text, text
    # (b) documented names that do not exist, a member that does not, the wrong kind
    assert "attention_ref.no_such_function does not exist" in text, text
    assert "attention_ref.LinearGrads.no_such_field does not exist" in text, text
    assert "attention_ref.linear_backward is a function, not a class" in text, text
    assert "module attention_ref.no_such_module, which does not import" in text, text
    assert "automodule:: attention_ref.cases has :members:" in text, text
    # and nothing else: linear, LinearGrads (dx, dweight) and testing.compare are documented
    assert len(problems) == 9, text


def test_parse_directives_keeps_the_module_context():
    directives, problems = parse_directives(SYNTHETIC)
    assert len(problems) == 1 and "automodule:: attention_ref.cases has :members:" in problems[0]
    found = [(d.kind, d.module, d.name) for d in directives if d.kind != "currentmodule"]
    assert found == [
        ("automodule", "attention_ref", ""),
        ("autofunction", "attention_ref", "linear"),
        ("autofunction", "attention_ref", "no_such_function"),
        ("autoclass", "attention_ref", "LinearGrads"),
        ("autoclass", "attention_ref", "linear_backward"),  # the context survived the prose
        ("autofunction", "attention_ref.testing", "compare"),  # a dotted name, its own module
        ("automodule", "attention_ref.no_such_module", ""),
        ("automodule", "attention_ref.cases", ""),
    ]
    grads = next(d for d in directives if d.name == "LinearGrads")
    assert _members(grads.options["members"]) == ["dx", "dweight", "no_such_field"]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_names_exist(module_name):
    """A name in ``__all__`` that the module does not define could never be documented."""
    module = importlib.import_module(module_name)
    missing = [n for n in public_names(module_name) if not hasattr(module, n)]
    assert not missing, f"{module_name}.__all__ lists names it does not have: {missing}"
