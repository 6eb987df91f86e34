"""The documentation builds, warning-free, offline, and its examples run.

1. ``python -m sphinx -W -b html docs <tmp>`` succeeds: MyST pages, the API reference from the
   docstrings, every warning an error.
2. The built pages load no script from the network: MathJax is the copy vendored under
   ``docs/_static/mathjax``, and the pages with math load exactly that file.
3. Every name in ``attention_ref.__all__`` (and the public names of ``attention_ref.gradcheck``)
   is documented on the API page.
4. The ``python`` code blocks of ``docs/oracle.md`` and ``docs/stability.md`` run, top to bottom
   in one namespace per page, as the README's example does in ``test_cli_and_readme.py``. The
   block that imports torch runs where torch is installed (and must, under
   ``ATTENTION_REF_REQUIRE_TORCH=1``).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import require_torch

import attention_ref

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MATHJAX = DOCS / "_static" / "mathjax"
#: The MathJax component the pages load (docs/conf.py's mathjax_path, relative to _static).
MATHJAX_FILE = "mathjax/tex-chtml-full.js"
#: The build measured ~4 s on the 2-core CI machine; a build 15x slower means something changed
#: (a page pulling in a network fetch that waits for a timeout, an extension gone wrong).
BUILD_SECONDS_MAX = 60
#: The pages whose ```python blocks must run.
EXAMPLE_PAGES = (
    "oracle.md",
    "stability.md",
)  # adapters, golden, exact, decoding_and_varlen: run by their own tests
#: Public functions whose docstring has no Examples section yet (a library docstring to fix).
EXAMPLES_TO_WRITE: set[str] = set()
GRADCHECK_PUBLIC = (
    "error_report",
    "ErrorReport",
    "numerical_vjp",
    "check_vjp",
    "check_directional",
    "complex_step_vjp",
    "check_complex_step",
    "GradCheckResult",
    "fd_noise_floor",
    "FD_EPS",
    "FD_RTOL",
    "FD_NOISE_FACTOR",
    "CS_STEP",
    "CS_RTOL",
)


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """The docs built once for this module: ``sphinx-build -W -b html docs <tmp>``."""
    out = tmp_path_factory.mktemp("html")
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(out / ".doctrees"),
            str(DOCS),
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    assert seconds < BUILD_SECONDS_MAX, f"the docs took {seconds:.0f} s to build"
    return out


class _Assets(HTMLParser):
    """The ``src`` of every <script> and <img>, and the ``href`` of every stylesheet <link>."""

    def __init__(self):
        super().__init__()
        self.scripts: list[str] = []
        self.loaded: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
            self.loaded.append(a["src"])
        elif tag in ("img", "iframe") and a.get("src"):
            self.loaded.append(a["src"])
        elif tag == "link" and "stylesheet" in (a.get("rel") or "") and a.get("href"):
            self.loaded.append(a["href"])


def _assets(page: Path) -> _Assets:
    parser = _Assets()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_every_page_is_built(html):
    pages = {
        p.relative_to(DOCS).with_suffix(".html").as_posix()
        for p in DOCS.rglob("*.md")
        if "_static" not in p.parts and "_build" not in p.parts
    }
    assert {
        "index.html",
        "api.html",
        "stability.html",
        "oracle.html",
        "notation.html",
        "conventions.html",
        "derivations/attention.html",
    } <= pages
    missing = sorted(p for p in pages if not (html / p).is_file())
    assert not missing, f"pages not built: {missing}"


def test_pages_load_nothing_from_the_network(html):
    remote = {}
    for page in sorted(html.rglob("*.html")):
        urls = [u for u in _assets(page).loaded if re.match(r"(?i)^(https?:)?//", u)]
        if urls:
            remote[page.relative_to(html).as_posix()] = urls
    assert not remote, f"pages load remote assets (the docs must render offline): {remote}"


def test_math_pages_load_the_vendored_mathjax(html):
    page = html / "derivations" / "attention.html"
    scripts = [s.split("?", 1)[0] for s in _assets(page).scripts]
    mathjax = [s for s in scripts if "mathjax" in s.lower() or "tex-" in s]
    assert mathjax == [f"../_static/{MATHJAX_FILE}"], scripts
    shipped = html / "_static" / MATHJAX_FILE
    assert shipped.read_bytes() == (DOCS / "_static" / MATHJAX_FILE).read_bytes()
    # MathJax's CHTML output loads its fonts from [mathjax]/output/chtml/fonts/woff-v2 at run time.
    fonts = list((shipped.parent / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert len(fonts) >= 20, fonts


def test_vendored_mathjax_is_small_and_licensed():
    size = sum(p.stat().st_size for p in MATHJAX.rglob("*") if p.is_file())
    assert size < 4 * 2**20, f"docs/_static/mathjax is {size / 2**20:.1f} MiB"
    assert "Apache License" in (MATHJAX / "LICENSE").read_text(encoding="utf-8")
    assert "mathjax@3" in (MATHJAX / "README.md").read_text(encoding="utf-8")


def test_equations_show_their_labels(html):
    """(A5) on the page and in links, as the code cites it, not Sphinx's running count (5)."""
    attention = (html / "derivations" / "attention.html").read_text(encoding="utf-8")
    assert '<span class="eqno">(A5)' in attention and 'id="equation-a5"' in attention
    assert '<span class="eqno">(5)' not in attention
    stability = (html / "stability.html").read_text(encoding="utf-8")
    assert re.search(r'href="derivations/softmax.html#equation-s1"[^>]*>\(S1\)', stability)


def _api_entries(api: str) -> dict[str, str]:
    """Documented object id -> its HTML, up to the next documented object."""
    starts = [
        (m.start(), m.group(1))
        for m in re.finditer(r'<dt class="sig sig-object py" id="([^"]+)"', api)
    ]
    return {
        name: api[start:end]
        for (start, name), (end, _) in zip(starts, starts[1:] + [(len(api), "")], strict=True)
    }


def test_api_page_documents_every_public_name(html):
    entries = _api_entries((html / "api.html").read_text(encoding="utf-8"))
    names = [f"attention_ref.{n}" for n in attention_ref.__all__ if n != "gradcheck"]
    names += [f"attention_ref.gradcheck.{n}" for n in GRADCHECK_PUBLIC]
    missing = [n for n in names if n not in entries]
    assert not missing, f"not documented on the API page: {missing}"
    assert 'id="module-attention_ref.gradcheck"' in (html / "api.html").read_text(encoding="utf-8")


def test_every_public_function_shows_its_example(html):
    """The docstrings' Examples sections (run as doctests by pytest) render on the API page."""
    entries = _api_entries((html / "api.html").read_text(encoding="utf-8"))
    functions = [
        f"attention_ref.{n}"
        for n in attention_ref.__all__
        if inspect.isfunction(getattr(attention_ref, n))
    ]
    functions += [
        f"attention_ref.gradcheck.{n}"
        for n in GRADCHECK_PUBLIC
        if inspect.isfunction(getattr(attention_ref.gradcheck, n))
    ]
    assert len(functions) > 20, functions
    without = {n.rsplit(".", 1)[1] for n in functions if 'rubric">Examples' not in entries[n]}
    assert without <= EXAMPLES_TO_WRITE, (
        f"public functions without an Examples section: {sorted(without)}"
    )


def _python_blocks(page: str) -> list[str]:
    text = (DOCS / page).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_page_examples_run(page):
    blocks = _python_blocks(page)
    assert blocks, f"docs/{page} has no python code blocks"
    needs_torch = [b for b in blocks if re.search(r"^import torch", b, flags=re.M)]
    if needs_torch:
        require_torch()  # skips without torch, fails under ATTENTION_REF_REQUIRE_TORCH=1
    namespace: dict = {"__name__": f"docs_{Path(page).stem}"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/{page} (python block {i})", "exec"), namespace)


def test_oracle_examples_run_without_torch():
    """Every block of the oracle guide but the PyTorch one runs on NumPy alone."""
    namespace: dict = {"__name__": "docs_oracle"}
    ran = 0
    for i, block in enumerate(_python_blocks("oracle.md"), start=1):
        if re.search(r"^import torch", block, flags=re.M):
            continue
        exec(compile(block, f"docs/oracle.md (python block {i})", "exec"), namespace)
        ran += 1
    assert ran >= 5
