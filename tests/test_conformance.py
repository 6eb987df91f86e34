"""`attention-ref compare torch|jax`: the frameworks' conformance on the canonical cases.

The full JAX table takes about a minute (JAX compiles each shape), so the suite runs it on a few
cases; `.ci/run` runs both commands on every case.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import require_jax, require_torch

from attention_ref.cases import cases, get_case
from attention_ref.oracle.conformance import format_rows, run_conformance


def test_torch_conforms_on_every_case():
    require_torch()
    rows = run_conformance("torch")
    assert not [r for r in rows if r.status == "FAIL"], format_rows("torch", rows)
    seen = {r.case for r in rows}
    assert seen == {c.name for c in cases()}
    skipped = {r.case for r in rows if r.status == "skip"}
    assert skipped == {
        "softcap",
        "dropout_keep_mask",
        "mha_gqa_kdim_vdim",
        "mha_mqa_no_bias_attention_bias",
    }
    assert max(r.error for r in rows if r.status == "pass" and r.quantity != "db_k") < 1e-13


def test_jax_conforms_on_a_few_cases():
    require_jax()
    names = ["causal_top_left_t_gt_s", "padding_empty_rows_zero", "mha_self_attention", "softcap"]
    rows = run_conformance("jax", [get_case(n) for n in names])
    assert not [r for r in rows if r.status == "FAIL"], format_rows("jax", rows)
    assert [r.status for r in rows if r.case == "softcap"] == ["skip"]
    # JAX's fully masked rows are uniform: the reference was computed with that policy
    assert {r.empty_rows for r in rows} == {"uniform"}


def test_a_wrong_convention_fails_the_table(monkeypatch):
    """A framework run with the other causal alignment must show up as FAIL rows."""
    require_torch()
    import attention_ref.adapters.torch as pt

    real = pt.run_torch_sdpa

    def misaligned(*args, **kwargs):
        if kwargs.get("causal"):
            kwargs["align"] = (
                "top_left" if kwargs.get("align") == "bottom_right" else "bottom_right"
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(pt, "run_torch_sdpa", misaligned)
    rows = run_conformance("torch", [get_case("causal_bottom_right_t_lt_s")])
    assert {r.status for r in rows} == {"FAIL"}
    assert "FAIL" in format_rows("torch", rows)


def test_compare_subcommand_prints_json(capsys):
    require_torch()
    from attention_ref.__main__ import main

    assert main(["compare", "torch", "--cases", "plain", "gqa", "--quiet", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["framework"] == "torch" and doc["passed"]
    assert {r["case"] for r in doc["rows"]} == {"plain", "gqa"}
    assert all(np.isfinite(r["rel_error"]) for r in doc["rows"])


def test_unknown_framework_is_refused():
    with pytest.raises(ValueError, match="framework must be one of"):
        run_conformance("tensorflow")
