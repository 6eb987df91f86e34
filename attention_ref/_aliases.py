"""The module paths of attention_ref 0.1, kept working after the move into layers.

Before the layers, every module sat directly in ``attention_ref/``. Each old path is now an alias:
``import attention_ref.flash`` gives the module object ``attention_ref.variants.flash`` itself
(not a copy), so attributes, ``isinstance`` checks and monkeypatching behave as on the new path.
New code should use the new paths (``docs/api.md`` lists them).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old submodule name -> its home since the layers.
MOVED = {
    "attention": "core.attention",
    "heads": "core.heads",
    "mha": "core.mha",
    "projection": "core.linear",
    "scores": "core.scores",
    "stable_softmax": "core.softmax",
    "_validate": "core._validate",
    "flash": "variants.flash",
    "varlen": "variants.varlen",
    "decode": "variants.decode",
    "exact": "oracle.exact",
    "conformance": "oracle.conformance",
    "report": "oracle.check",
}


class _Loader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the target module was executed when it was imported."""


class _Finder(importlib.abc.MetaPathFinder):
    """Resolves ``attention_ref.<old>`` to ``attention_ref.<new>`` for the names in
    :data:`MOVED`."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (the finder protocol)
        prefix = self.package + "."
        if not fullname.startswith(prefix) or fullname[len(prefix) :] not in MOVED:
            return None
        new = prefix + MOVED[fullname[len(prefix) :]]
        return importlib.machinery.ModuleSpec(fullname, _Loader(new))


def install(package: str) -> None:
    """Register the finder once (importing the package twice must not add a second one)."""
    if not any(isinstance(f, _Finder) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_Finder(package))
