"""The one table renderer of the command line: aligned text or Markdown, and JSON numbers.

* :func:`render_table` -- columns (:class:`Column`: header, alignment, minimum width, dict key)
  and rows (sequences or dicts) as an aligned plain-text table, or as a GitHub-flavoured
  Markdown table whose source is aligned too, with title lines above and footer lines below.
  ``attention-ref check`` (``attention_ref.oracle.check.format_table``), ``compare torch|jax``
  (``attention_ref.oracle.conformance.format_rows``) and ``verify``
  (:func:`attention_ref.golden.format_results`) print their tables with it; ``--markdown`` picks
  the Markdown form.
* :func:`json_float` -- a number for ``--json``: JSON has no inf or NaN, so they become null.

Layer 4 (oracle); imports nothing from attention_ref.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence, Union

__all__ = ["FORMATS", "Column", "render_table", "json_float"]

#: The formats of :func:`render_table`.
FORMATS = ("text", "markdown")
#: Cell separator of the text form.
_GAP = "  "


class Column(NamedTuple):
    """One column of a table: its header, how its cells align, and where a dict row keeps them."""

    header: str  #: the header cell
    align: str = "left"  #: "left" or "right"; numbers read best right-aligned
    min_width: int = 0  #: the column is at least this wide (and as wide as its widest cell)
    key: str | None = None  #: the key of a dict row holding this column's cells (default: header)


#: A column given as a bare header is a left-aligned :class:`Column`.
ColumnLike = Union[Column, str]


def _lines(text: str | Sequence[str]) -> list[str]:
    return text.splitlines() if isinstance(text, str) else [str(line) for line in text]


def _text(cell: Any) -> str:
    """A cell's text: None is empty; a line break would split the row, so it becomes a space."""
    return "" if cell is None else " ".join(str(cell).splitlines())


def _cells(columns: list[Column], row: Sequence[Any] | Mapping[str, Any]) -> list[str]:
    if isinstance(row, Mapping):
        keys = [c.header if c.key is None else c.key for c in columns]
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(
                f"a dict row must hold every column's key; {missing} missing from {sorted(row)}"
            )
        return [_text(row[k]) for k in keys]
    if isinstance(row, (str, bytes)) or len(row) != len(columns):
        raise ValueError(
            f"a row must be a dict or hold one cell per column ({len(columns)}); got {row!r}"
        )
    return [_text(cell) for cell in row]


def _pad(text: str, width: int, align: str) -> str:
    return text.rjust(width) if align == "right" else text.ljust(width)


def render_table(
    columns: Sequence[ColumnLike],
    rows: Sequence[Sequence[Any] | Mapping[str, Any]],
    *,
    fmt: str = "text",
    title: str | Sequence[str] = (),
    footer: str | Sequence[str] = (),
) -> str:
    r"""Render rows as an aligned text table or a Markdown table, with title and footer lines.

    Text: the header, a rule of ``-`` as long as it, one line per row; cells are padded to
    their column's width and separated by two spaces; trailing spaces are dropped. Markdown:
    ``| a | b |`` lines, a delimiter row giving each column's alignment (``:---`` left,
    ``---:`` right), ``|`` in a cell escaped as ``\|``, and the cells padded so that the source
    lines up as well. Title lines come first (in Markdown, followed by a blank line); footer
    lines come last, after a blank line, in both forms as given.

    Parameters
    ----------
    columns : sequence of Column or str
        A string is a left-aligned column of that header.
    rows : sequence of sequences or dicts
        A sequence holds one cell per column, in order; a dict holds the cells by
        :attr:`Column.key` (the header by default). A cell is printed with ``str()``; None is
        an empty cell.
    fmt : {"text", "markdown"}
    title, footer : str or sequence of str
        Lines above and below the table; a string may hold several lines.

    Returns
    -------
    str
        No final newline.

    Raises
    ------
    ValueError
        For an unknown ``fmt`` or alignment, or a row that does not fit the columns.

    Examples
    --------
    >>> from attention_ref.oracle.tables import Column, render_table
    >>> cols = ["case", Column("rel error", "right"), "result"]
    >>> rows = [("plain", "2.7e-16", "pass"),
    ...         {"case": "gqa", "rel error": "1.0e-3", "result": "FAIL"}]
    >>> print(render_table(cols, rows, footer="1 passed, 1 failed"))
    case   rel error  result
    ------------------------
    plain    2.7e-16  pass
    gqa       1.0e-3  FAIL
    <BLANKLINE>
    1 passed, 1 failed
    >>> print(render_table(cols, rows, fmt="markdown"))
    | case  | rel error | result |
    |:------|----------:|:-------|
    | plain |   2.7e-16 | pass   |
    | gqa   |    1.0e-3 | FAIL   |
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}; got {fmt!r}")
    cols = [c if isinstance(c, Column) else Column(str(c)) for c in columns]
    bad = [c.align for c in cols if c.align not in ("left", "right")]
    if bad:
        raise ValueError(f"a column's align must be 'left' or 'right'; got {bad[0]!r}")
    body = [_cells(cols, row) for row in rows]
    heads = [_text(c.header) for c in cols]
    if fmt == "markdown":
        body = [[cell.replace("|", r"\|") for cell in row] for row in body]
        heads = [h.replace("|", r"\|") for h in heads]
    widths = [
        max([len(h), c.min_width] + [len(r[i]) for r in body])
        for i, (c, h) in enumerate(zip(cols, heads, strict=True))
    ]
    padded = [
        [_pad(s, w, c.align) for s, w, c in zip(cells, widths, cols, strict=True)]
        for cells in [heads] + body
    ]
    head_lines = _lines(title)
    if fmt == "text":
        lines = [_GAP.join(cells).rstrip() for cells in padded]
        table = lines[:1] + ["-" * len(lines[0])] + lines[1:]
    else:
        lines = ["| " + " | ".join(cells) + " |" for cells in padded]
        rule = [
            "-" * (w + 1) + ":" if c.align == "right" else ":" + "-" * (w + 1)
            for w, c in zip(widths, cols, strict=True)
        ]
        table = lines[:1] + ["|" + "|".join(rule) + "|"] + lines[1:]
        head_lines += [""] if head_lines else []
    tail = _lines(footer)
    return "\n".join(head_lines + table + ([""] + tail if tail else []))


def json_float(x: float | None) -> float | None:
    """``x`` as a float for JSON, or None when it is None, inf or NaN (JSON has neither).

    Parameters
    ----------
    x : float or None

    Returns
    -------
    float or None

    Examples
    --------
    >>> import json
    >>> from attention_ref.oracle.tables import json_float
    >>> json.dumps([json_float(1e-16), json_float(float("inf")), json_float(float("nan"))])
    '[1e-16, null, null]'
    """
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
