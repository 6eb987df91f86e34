"""Shared fixtures: a seeded Generator per test, and the torch and jax gates."""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import pytest

# The suite writes nothing into the checkout: no bytecode here or in the interpreters it starts
# (notebook kernels, the CLI), no pytest cache (setup.cfg: -p no:cacheprovider), no mypy cache
# (test_typing.py), every file it makes under a tmp directory.
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
try:  # hypothesis keeps a cache directory, .hypothesis/ in the working directory by default
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="attention_ref_hypothesis_"))
except ImportError:
    pass


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded Generator: every test is reproducible on its own."""
    return np.random.default_rng(20261121)


def require_torch():
    """Import torch, or skip -- unless ATTENTION_REF_REQUIRE_TORCH=1 (CI), where its absence
    fails."""
    if os.environ.get("ATTENTION_REF_REQUIRE_TORCH") == "1":
        import torch  # noqa: F401  -- an ImportError here fails the test, as CI wants

        return torch
    return pytest.importorskip("torch")


def require_jax():
    """Import jax, or skip -- unless ATTENTION_REF_REQUIRE_JAX=1 (CI), where its absence fails."""
    if os.environ.get("ATTENTION_REF_REQUIRE_JAX") == "1":
        import jax  # noqa: F401  -- an ImportError here fails the test, as CI wants

        return jax
    return pytest.importorskip("jax")
