"""Sphinx configuration of the attention_ref documentation.

Build (offline, warnings are errors)::

    pip install -e ".[docs]"
    python -m sphinx -W -b html docs docs/_build/html

``tests/test_docs_build.py`` runs the same build in the test suite.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from docutils import nodes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's package, installed or not

import attention_ref  # noqa: E402

# -- Project ------------------------------------------------------------------------------------

project = "attention_ref"
author = "the attention_ref authors"
copyright = "the attention_ref authors, MIT licence"
version = release = attention_ref.__version__

# -- Sources ------------------------------------------------------------------------------------

extensions = [
    "myst_parser",  # the pages are MyST Markdown
    "sphinx.ext.autodoc",  # API reference from the docstrings (docs/api.md)
    "numpydoc",  # the docstrings are numpydoc style
    "sphinx.ext.mathjax",  # math, rendered by the vendored MathJax below
]
# Every page is Markdown; ".rst" is listed for the reStructuredText that autodoc and numpydoc
# generate internally (numpydoc's autosummary warns without it). No .rst page exists.
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]  # _static (html_static_path) is never read as pages

# MyST: $...$ and $$...$$ math (dollarmath), LaTeX environments (amsmath), and anchors for
# links like [conventions](conventions.md#weight-layout).
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# -- API reference ------------------------------------------------------------------------------

autodoc_member_order = "bysource"
# Signatures show names and defaults; the types and shapes are in each docstring's Parameters
# (the annotations, ArrayLike | None etc., would expand into long unions).
autodoc_typehints = "none"
# numpydoc: the NamedTuple fields and dataclass methods are listed by autodoc's :members:, so
# numpydoc adds no second (autosummary) list of class members.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_show_inherited_class_members = False
numpydoc_xref_param_type = False

# Every cross-reference must resolve (a misspelt :func:`sdpa_forwrd` in a docstring fails the
# build), except those to other libraries' objects: without intersphinx (the build is offline)
# they cannot resolve, and stay plain text.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(numpy|scipy|torch|jax)(\..*)?")]

# -- HTML ---------------------------------------------------------------------------------------

html_theme = "alabaster"  # ships with Sphinx: no theme download
html_static_path = ["_static"]
html_title = f"attention_ref {release}"
html_theme_options = {
    "description": "NumPy ground truth for multi-head attention",
    "fixed_sidebar": True,
    "page_width": "1240px",  # room for the wide tables (conventions) and the code lines
    "body_max_width": "960px",
    "code_font_size": "0.85em",
    "show_relbars": True,
}

# MathJax 3 from docs/_static/mathjax (see the README there), never a CDN: the pages render
# offline. A relative mathjax_path is relative to the built _static directory.
mathjax_path = "mathjax/tex-chtml-full.js"
# The MathJax 3 configuration (set here so that myst-parser updates this one, not Sphinx 9's
# mathjax4_config): only elements of these classes are typeset, so a stray "\(" or "$$" in
# prose or code is left alone. The value is myst-parser's default.
mathjax3_config = {
    "options": {"processHtmlClass": "tex2jax_process|mathjax_process|math|output_area"},
}

# -- Equation numbers ---------------------------------------------------------------------------

#: A derivation page's equation label: a letter naming the page and a number, (A5), (L2).
EQUATION_LABEL = re.compile(r"[A-Z]+\d+")


def _number_equations_by_label(app, doctree) -> None:
    """Show a labelled equation as its own label, (A5), instead of Sphinx's per-page count (5).

    The code cites ``(A5)``; a reader should find ``(A5)`` next to the equation and in every
    ``{eq}`A5``` reference. MyST registers ``$$ ... $$ (A5)`` with the math domain as the next
    number of its page; this replaces that number, on the node and in the domain, by the label.
    (``numfig`` stays off, so Sphinx prints the number as stored.)
    """
    domain = app.env.get_domain("math")
    for node in doctree.findall(nodes.math_block):
        label = node.get("label")
        if label and EQUATION_LABEL.fullmatch(label) and label in domain.equations:
            node["number"] = label
            domain.equations[label] = (domain.equations[label][0], label)


# -- Doc comments -------------------------------------------------------------------------------

#: A ``|`` outside a ````literal````.
_BAR = re.compile(r"(``.*?``)|\|")


def _escape_bars_in_doc_comments(app, what, name, obj, options, lines) -> None:
    """Read ``#:`` doc comments' bars as text: ``max |actual - expected|`` is an absolute value.

    NamedTuple fields and module constants are documented by ``#:`` comments written as plain
    prose, where ``|x|`` means an absolute value; reStructuredText would read it as a
    substitution reference and fail the build. Function and class docstrings are left as they
    are (they are numpydoc, i.e. reStructuredText).
    """
    if what in ("attribute", "data"):
        lines[:] = [_BAR.sub(lambda m: m.group(1) or r"\|", line) for line in lines]


def setup(app):
    app.connect("doctree-read", _number_equations_by_label)
    app.connect("autodoc-process-docstring", _escape_bars_in_doc_comments)
