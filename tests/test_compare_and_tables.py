"""One comparison report, one table renderer.

* :class:`attention_ref.oracle.compare.Comparison` is what ``compare``/``assert_close``,
  ``gradcheck.error_report`` (and every gradient check) and the error-budget rule return, and its
  numbers equal an independent computation: the worst error and its index from
  ``np.abs(a - e)`` and ``np.unravel_index``, and NaN/Inf mismatches counted by hand, entry by
  entry, on arrays with planted NaN, +inf, -inf and matching infinities.
* :func:`attention_ref.oracle.tables.render_table` lays out the same cells as aligned text and as
  a Markdown table that parses back into them; ``check``, ``compare`` and ``verify`` print it
  with ``--markdown``.

The checks are written so that a wrong report fails them: ``test_the_checks_catch_planted_bugs``
feeds them reports with actual and expected swapped, matching infinities counted as mismatches,
and the index of the second-worst entry, and expects each to be rejected.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import attention_ref as ar
from attention_ref import gradcheck, testing
from attention_ref.__main__ import main
from attention_ref.cases import get_case
from attention_ref.golden import ArrayResult, format_results
from attention_ref.oracle import compare as compare_module
from attention_ref.oracle import conformance
from attention_ref.oracle.compare import Comparison, compare
from attention_ref.oracle.tables import Column, json_float, render_table

FIXTURE = Path(__file__).parent / "fixtures" / "golden_v1"

# ----------------------------------------------------------------------------- one type


def test_every_judge_returns_the_one_comparison_type(rng):
    a, e = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    assert gradcheck.ErrorReport is Comparison and testing.Comparison is Comparison
    assert testing.compare is compare and ar.testing.assert_close is compare_module.assert_close
    assert type(gradcheck.error_report(a, e)) is Comparison
    assert type(testing.compare(a, e)) is Comparison
    assert type(testing.assert_close(a, a)) is Comparison
    a32 = a.astype(np.float32)
    budget = testing.check_budget(a32, a, a32, precision="float32")
    assert type(budget.candidate) is Comparison and type(budget.baseline) is Comparison
    data = get_case("plain").build()
    base = testing.sdpa_baseline(**data.inputs, precision="float32", **data.options)
    (report,) = testing.budget_reports(data, base.out, precision="float32")
    assert type(report.candidate) is Comparison and type(report.baseline) is Comparison
    x, c = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    grads = {"x": ar.softmax_backward(c, ar.softmax(x))}
    result = gradcheck.check_vjp(ar.softmax, {"x": x}, c, grads)
    assert all(type(r) is Comparison for r in result.reports.values())


def test_testing_keeps_its_public_names():
    """The move into oracle/compare.py changed where the code lives, not the face's API."""
    for name in (
        "PRECISIONS",
        "Tolerance",
        "DEFAULT_TOLERANCES",
        "Comparison",
        "compare",
        "assert_close",
        "to_numpy",
    ):
        assert name in testing.__all__
        assert getattr(testing, name) is getattr(compare_module, name)
    assert set(compare_module.__all__) <= set(testing.__all__)
    assert "ErrorReport" in gradcheck.__all__ and "error_report" in gradcheck.__all__


# ----------------------------------------------------------------------------- the numbers


def _planted(rng):
    """``(a, e, nan_mismatch, inf_mismatch)``: random arrays with non-finite entries planted at
    known places, the two counts worked out by hand below."""
    a, e = rng.normal(size=(4, 5, 6)), rng.normal(size=(4, 5, 6))
    plant = [  # (index, a, e): which mismatch it is
        ((0, 0, 0), np.nan, 1.0),  # NaN vs number: NaN mismatch
        ((0, 0, 1), 2.0, np.nan),  # number vs NaN: NaN mismatch
        ((0, 0, 2), np.nan, np.nan),  # NaN vs NaN: identical
        ((0, 1, 0), np.inf, 3.0),  # +inf vs number: Inf mismatch
        ((0, 1, 1), -4.0, -np.inf),  # number vs -inf: Inf mismatch
        ((0, 1, 2), np.inf, -np.inf),  # +inf vs -inf: Inf mismatch
        ((0, 1, 3), np.inf, np.inf),  # the same infinity: identical
        ((0, 1, 4), -np.inf, -np.inf),  # the same infinity: identical
        ((0, 2, 0), np.nan, np.inf),  # NaN vs +inf: a NaN mismatch (counted once)
        ((0, 2, 1), -np.inf, np.nan),  # -inf vs NaN: a NaN mismatch (counted once)
    ]
    for i, x, y in plant:
        a[i], e[i] = x, y
    return a, e, 4, 3


def _by_hand(a, e):
    """Worst error, its index, scale and both mismatch counts, entry by entry in Python."""
    nan_mm = inf_mm = 0
    for x, y in zip(a.ravel().tolist(), e.ravel().tolist(), strict=True):
        if math.isnan(x) or math.isnan(y):
            nan_mm += math.isnan(x) != math.isnan(y)
        elif math.isinf(x) or math.isinf(y):
            inf_mm += x != y
    both = np.isfinite(a) & np.isfinite(e)
    diff = np.abs(np.where(both, a, 0.0) - np.where(both, e, 0.0))
    index = np.unravel_index(np.argmax(diff), a.shape)
    scale = np.abs(np.where(both, e, 0.0)).max()
    return diff.max(), tuple(int(i) for i in index), scale, nan_mm, inf_mm


def _check_report(rep, a, e, nan_mm, inf_mm):
    """Assert that ``rep`` tells the truth about ``a`` against ``e``."""
    max_abs, index, scale, hand_nan, hand_inf = _by_hand(a, e)
    assert (hand_nan, hand_inf) == (nan_mm, inf_mm), "the planted counts are wrong"
    assert rep.shape == a.shape
    assert rep.max_abs_error == max_abs and rep.location == index
    assert rep.actual == a[index] and rep.expected == e[index]
    assert rep.scale == scale and rep.rel_error == max_abs / scale
    assert (rep.nan_mismatch, rep.inf_mismatch) == (nan_mm, inf_mm)
    assert rep.nonfinite_mismatch == nan_mm + inf_mm


def test_the_numbers_equal_an_independent_computation(rng):
    a, e, nan_mm, inf_mm = _planted(rng)
    a[3, 4, 5] = e[3, 4, 5] + 7.5  # the worst error, at the last index: a wrong argmax shows
    for rep in (compare(a, e, name="dq"), gradcheck.error_report(a, e)):
        _check_report(rep, a, e, nan_mm, inf_mm)
    assert compare(a, e, name="dq").name == "dq" and gradcheck.error_report(a, e).name == ""
    # both directions: actual and expected play different roles in location and scale
    swapped = compare(e, a)
    assert swapped.location == (3, 4, 5)
    assert (swapped.actual, swapped.expected) == (e[3, 4, 5], a[3, 4, 5])
    _check_report(swapped, e, a, nan_mm, inf_mm)


def test_error_report_and_compare_agree_field_by_field(rng):
    a, e, _, _ = _planted(rng)
    for scale in (None, 2.0):
        old, new = gradcheck.error_report(a, e, scale=scale), compare(a, e, scale=scale)
        assert old == new._replace(name="")
    assert gradcheck.error_report(a, e, scale=2.0).rel_error == _by_hand(a, e)[0] / 2.0


def test_nonfinite_counts_only_entries_that_differ():
    inf, nan = np.inf, np.nan
    same = np.array([inf, -inf, nan, 1.0])
    rep = compare(same, same.copy())
    assert (rep.nan_mismatch, rep.inf_mismatch, rep.max_abs_error) == (0, 0, 0.0)
    assert rep.passed(0.0)
    rep = compare(np.array([inf, -inf, nan, nan]), np.array([-inf, 1.0, 1.0, inf]))
    assert (rep.nan_mismatch, rep.inf_mismatch) == (2, 2)
    assert not rep.passed(1e9, atol=1e9)  # a mismatch fails whatever the tolerance


def test_passed_is_the_gradcheck_rule(rng):
    a = rng.normal(size=50)
    e = a + 1e-3 * rng.normal(size=50)
    rep = gradcheck.error_report(a, e)
    edge = rep.max_abs_error / rep.scale
    for rtol, atol in (
        (edge, 0.0),
        (0.0, rep.max_abs_error),
        (edge / 2, 0.0),
        (0.0, 0.0),
        (edge / 2, rep.max_abs_error / 2),
    ):
        assert rep.passed(rtol, atol) == (rep.max_abs_error <= atol + rtol * rep.scale)
    assert rep.passed(edge * (1 + 1e-12)) and not rep.passed(edge * (1 - 1e-9))


def test_the_budget_rule_keeps_counting_nonfinite_mismatches(rng):
    ref = rng.normal(size=(3, 4))
    base = ref.astype(np.float32)
    cand = ref.astype(np.float32)
    assert testing.check_budget(cand, ref, base, precision="float32").passed
    cand[1, 2] = np.nan  # a NaN the baseline does not have
    report = testing.check_budget(cand, ref, base, precision="float32")
    assert not report.passed and report.candidate.nonfinite_mismatch == 1
    base[1, 2] = np.nan  # ... and one it has
    assert testing.check_budget(cand, ref, base, precision="float32").passed


def _wrong(rep: Comparison, bug: str, a, e) -> Comparison:
    """``rep`` with one planted bug."""
    both = np.isfinite(a) & np.isfinite(e)
    if bug == "actual and expected swapped":
        return rep._replace(actual=rep.expected, expected=rep.actual)
    if bug == "matching infinities counted":  # the two planted same-infinity pairs
        return rep._replace(inf_mismatch=rep.inf_mismatch + 2)
    if bug == "the second-worst index":
        diff = np.abs(np.where(both, a, 0.0) - np.where(both, e, 0.0))
        second = np.unravel_index(np.argsort(diff, axis=None)[-2], a.shape)
        return rep._replace(location=tuple(int(i) for i in second))
    if bug == "scale from actual":
        return rep._replace(scale=float(np.abs(np.where(both, a, 0.0)).max()))
    raise AssertionError(bug)


@pytest.mark.parametrize(
    "bug",
    [
        "actual and expected swapped",
        "matching infinities counted",
        "the second-worst index",
        "scale from actual",
    ],
)
def test_the_checks_catch_planted_bugs(rng, bug):
    a, e, nan_mm, inf_mm = _planted(rng)
    a[2, 2, 2] = e[2, 2, 2] + 5.0
    rep = compare(a, e)
    _check_report(rep, a, e, nan_mm, inf_mm)
    with pytest.raises(AssertionError):
        _check_report(_wrong(rep, bug, a, e), a, e, nan_mm, inf_mm)


# ----------------------------------------------------------------------------- the renderer

COLUMNS = [Column("name"), Column("value", "right"), Column("note", min_width=12), "result"]
ROWS = [
    ("alpha", "1.0e-16", "a | b", "pass"),
    {"name": "a much longer name", "value": "abs 1.5e-15", "note": None, "result": "FAIL"},
    ("z", 3, "max|x - y| ok", "skip"),
]
CELLS = [
    ["alpha", "1.0e-16", "a | b", "pass"],
    ["a much longer name", "abs 1.5e-15", "", "FAIL"],
    ["z", "3", "max|x - y| ok", "skip"],
]
HEADERS = ["name", "value", "note", "result"]


def _widths():
    return [
        max([len(h), 12 if h == "note" else 0] + [len(r[i]) for r in CELLS])
        for i, h in enumerate(HEADERS)
    ]


def test_text_table_is_aligned_and_holds_the_cells():
    text = render_table(COLUMNS, ROWS, title=["a title"], footer=["first", "second"])
    lines = text.splitlines()
    assert lines[0] == "a title" and lines[-3:] == ["", "first", "second"]
    head, rule, body = lines[1], lines[2], lines[3:-3]
    assert rule == "-" * len(head) and len(body) == len(CELLS)
    widths = _widths()
    starts = [sum(widths[:i]) + 2 * i for i in range(len(widths))]
    for line, cells in zip([head] + body, [HEADERS] + CELLS, strict=True):
        assert line == line.rstrip()
        got = [line[s : s + w] for s, w in zip(starts, widths, strict=True)]
        assert [g.strip() for g in got] == cells
        assert got[0] == got[0].rstrip().ljust(widths[0])  # left-aligned
        assert got[1] == got[1].strip().rjust(widths[1])  # right-aligned
        assert all(line[s - 2 : s] == "  " for s in starts[1:])  # two spaces between columns


def _parse_markdown(lines):
    """Cells of each ``| a | b |`` line: split at unescaped pipes, unescape."""
    rows = []
    for line in lines:
        assert line.startswith("|") and line.endswith("|"), line
        cells = re.split(r"(?<!\\)\|", line)[1:-1]
        rows.append([c.strip().replace(r"\|", "|") for c in cells])
    return rows


def test_markdown_table_round_trips_and_is_aligned():
    md = render_table(COLUMNS, ROWS, fmt="markdown", title="a title", footer="the end")
    lines = md.splitlines()
    assert lines[:2] == ["a title", ""] and lines[-2:] == ["", "the end"]
    table = lines[2:-2]
    parsed = _parse_markdown(table)
    assert parsed[0] == HEADERS and parsed[2:] == CELLS
    assert [re.fullmatch(r":?-+:?", c) is not None for c in parsed[1]] == [True] * 4
    left = [c.startswith(":") and not c.endswith(":") for c in parsed[1]]
    assert left == [True, False, True, True]
    assert parsed[1][1].endswith(":") and not parsed[1][1].startswith(":")  # right-aligned
    assert len({len(line) for line in table}) == 1  # the source lines up
    pipes = [[m.start() for m in re.finditer(r"(?<!\\)\|", line)] for line in table]
    assert all(p == pipes[0] for p in pipes)


def test_render_table_refuses_what_it_cannot_lay_out():
    with pytest.raises(ValueError, match="fmt must be one of"):
        render_table(["a"], [("x",)], fmt="html")
    with pytest.raises(ValueError, match="align must be"):
        render_table([Column("a", "centre")], [("x",)])
    with pytest.raises(ValueError, match="one cell per column"):
        render_table(["a", "b"], [("x",)])
    with pytest.raises(ValueError, match="missing"):
        render_table(["a", "b"], [{"a": 1}])


def test_json_float():
    got = [json_float(x) for x in (1.5, np.float64(2.0), 3, None, math.inf, -math.inf, math.nan)]
    assert got == [1.5, 2.0, 3.0, None, None, None, None]
    assert json.dumps(json_float(np.float64(1e-300))) == "1e-300"


def test_verify_table_in_both_forms_has_one_row_per_case():
    ok = ArrayResult("plain", "intermediate.masked_scores", True, "r", "", None)
    bad = ok._replace(case="gqa", passed=False, message="bad")
    results = [ok, ok._replace(key="output.out"), bad]
    text = format_results(results).splitlines()
    md = format_results(results, fmt="markdown").splitlines()
    assert text[-1] == md[-1] == "verify: 1 case passed, 1 failed (3 arrays compared, 1 failed)"
    rows = _parse_markdown([line for line in md if line.startswith("|")])
    assert [r[0] for r in rows[2:]] == ["plain", "gqa"]
    assert [r[0] for r in (line.split() for line in text[2:4])] == ["plain", "gqa"]
    assert "failures:" in text and "failures:" in md


# ----------------------------------------------------------------------------- the command line


def _markdown_rows(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    return _parse_markdown(lines)[2:]  # after the header and the delimiter row


def test_check_markdown_prints_the_json_rows(capsys):
    assert main(["check", "--quick", "--quiet", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert main(["check", "--quick", "--quiet", "--markdown"]) == 0
    out = capsys.readouterr().out
    rows = _markdown_rows(out)
    assert len(rows) == len(doc["rows"]) > 50
    want = [[j["function"], j["case"], j["gradient"]] for j in doc["rows"]]
    assert [r[:3] for r in rows] == want
    assert all(r[5] == "pass" for r in rows)
    assert re.search(r"^gradcheck: \d+ passed, 0 failed$", out, flags=re.M)


def test_markdown_and_json_exclude_each_other(capsys):
    for command in (["check"], ["compare", "torch"], ["verify", str(FIXTURE)]):
        with pytest.raises(SystemExit) as exit_:
            main(command + ["--json", "--markdown"])
        assert exit_.value.code == 2
        assert "not allowed with argument" in capsys.readouterr().err


def test_compare_markdown_prints_the_conformance_rows(monkeypatch, capsys):
    row = conformance.ConformanceRow
    rows = [
        row("plain", "f", "out", "pass", 2.7e-16, "float64: ok", "zero"),
        row("plain", "f", "dq", "FAIL", 0.5, "float64: max|x| off", "zero"),
        row("softcap", "f", "-", "skip", None, "cannot", "zero"),
    ]
    monkeypatch.setattr(conformance, "run_conformance", lambda framework, selected, progress: rows)
    assert main(["compare", "torch", "--quiet", "--markdown"]) == 1
    out = capsys.readouterr().out
    assert _markdown_rows(out) == [
        ["plain", "out", "2.7e-16", "pass", "float64: ok"],
        ["plain", "dq", "5.0e-01", "FAIL", "float64: max|x| off"],
        ["softcap", "-", "", "skip", "cannot"],
    ]
    assert "compare torch: 1 passed, 1 failed, 1 skipped" in out


def test_verify_markdown_prints_one_row_per_case(capsys):
    assert main(["verify", str(FIXTURE), "--quiet", "--markdown"]) == 0
    rows = _markdown_rows(capsys.readouterr().out)
    assert len(rows) == 25 and all(r[-1] == "pass" for r in rows)
