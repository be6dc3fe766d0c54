"""The offline book (``.ci/build-book``, Jupyter Book 1): it builds without the network, has a page
for every chapter in course order, shows each chapter's pictures and, for every widget, the widget's
static figure from ``figures/``, and has the API reference of the modules the chapters import.

Slow (a Sphinx build of every chapter): deselect with ``-m 'not slow'``.
"""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("jupyter_book", reason="the book needs jupyter-book<2 (dev extra)")

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURE_NAME = re.compile(r"figures/(\d\d_[A-Za-z0-9_\-]+\.png)")

pytestmark = pytest.mark.slow


class Page(HTMLParser):
    """The parts of a book page the tests look at: images, links, scripts, ids, widget blocks."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts: list[str] = []
        self.ids: set[str] = set()
        self.widget_blocks: list[list[str]] = []  # images inside each .widget-static container
        self._depth_in_widget = 0
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "div":
            if self._depth_in_widget:
                self._depth_in_widget += 1
            elif "widget-static" in (a.get("class") or "").split():
                self._depth_in_widget = 1
                self.widget_blocks.append([])
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])
            if self._depth_in_widget:
                self.widget_blocks[-1].append(a["src"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._depth_in_widget:
            self._depth_in_widget -= 1


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the book once into a temporary folder; returns its html folder."""
    out = tmp_path_factory.mktemp("book")
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "build-book"), str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = out / "_build" / "html"
    assert (html / "index.html").is_file()
    return html


def _widget_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Cells that show a widget: they call ``interact(`` or are tagged ``widget``."""
    return [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        and ("interact(" in c.source or "widget" in c.get("metadata", {}).get("tags", []))
    ]


def _picture_outputs(nb: nbformat.NotebookNode) -> int:
    """Image outputs of the executed chapter, widget views not counted (they need a kernel)."""
    return sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
        and "application/vnd.jupyter.widget-view+json" not in o.get("data", {})
    )


def test_chapters_in_course_order(book: Path) -> None:
    links = Page(book / "intro.html").links
    chapter_links = [link for link in links if re.match(r"^notebooks/\d\d_.*\.html", link)]
    first_seen = list(dict.fromkeys(link.split("#")[0] for link in chapter_links))
    assert first_seen == [f"notebooks/{p.stem}.html" for p in CHAPTERS]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_page_shows_its_figures(book: Path, chapter: Path) -> None:
    page_path = book / "notebooks" / f"{chapter.stem}.html"
    assert page_path.is_file(), f"no page for {chapter.name}"
    page = Page(page_path)
    nb = nbformat.read(chapter, as_version=4)

    # every picture on the page is there, and at least every picture the executed chapter drew
    for src in page.images:
        assert (page_path.parent / src).resolve().is_file(), f"{chapter.stem}: broken image {src}"
    assert len(page.images) >= _picture_outputs(nb), f"{chapter.stem}: pictures missing from the page"

    # every figures/X.png the chapter's text names exists and is shown or linked on the page
    named = sorted({m for c in nb.cells if c.cell_type == "markdown" for m in FIGURE_NAME.findall(c.source)})
    missing = [n for n in named if not (ROOT / "figures" / n).is_file()]
    assert not missing, f"{chapter.stem} names figures that figures/ does not have: {missing}"
    on_page = {Path(u.split("#")[0]).name for u in page.images + page.links}
    not_shown = [n for n in named if n not in on_page]
    assert not not_shown, f"{chapter.stem}: named figures not shown or linked on the page: {not_shown}"

    # every widget is followed by its static figures, the same files as figures/
    widgets = _widget_cells(nb)
    assert len(page.widget_blocks) == len(widgets), f"{chapter.stem}: {len(widgets)} widgets"
    for block in page.widget_blocks:
        assert block, f"{chapter.stem}: a widget without a static figure"
        for src in block:
            name = Path(src).name
            assert re.match(rf"^{chapter.stem[:2]}_.*\.png$", name), f"{chapter.stem}: {name}"
            assert filecmp.cmp(page_path.parent / src, ROOT / "figures" / name, shallow=False)


def test_api_reference_documents_modules_the_chapters_use(book: Path) -> None:
    used = set()
    for chapter in CHAPTERS:
        nb = nbformat.read(chapter, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                used.update(re.findall(r"(?:from|import)\s+(detr_edu(?:\.\w+)*)", c.source))
    assert "detr_edu.attention" in used
    for module in sorted(used):
        page = book / "api" / f"{module}.html"
        assert page.is_file(), f"no API page for {module}"
        assert f"module-{module}" in Page(page).ids, f"{module}: autodoc did not import it"
    attention = Page(book / "api" / "detr_edu.attention.html")
    assert "detr_edu.attention.scaled_dot_product_attention" in attention.ids


def test_pages_need_no_network_but_for_math(book: Path) -> None:
    """Everything is local except MathJax (no local copy exists; offline, formulas show as TeX)."""
    for page in [book / "intro.html", *sorted((book / "notebooks").glob("*.html"))]:
        remote = [s for s in Page(page).scripts if s.startswith(("http:", "https:", "//"))]
        assert all("mathjax" in s for s in remote), f"{page.name}: remote scripts {remote}"
        assert "widget-view+json" not in page.read_text(encoding="utf-8")
