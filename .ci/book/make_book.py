"""Write the offline book's sources (Jupyter Book 1) from the executed chapters.

Usage: ``python .ci/book/make_book.py SRC_DIR`` (``.ci/build-book`` calls it, then builds SRC_DIR).

What it writes into SRC_DIR:
- ``_config.yml`` (copied from this folder) and ``_toc.yml``: intro, the chapters in course order
  (every ``notebooks/NN_*.ipynb``), the API reference;
- ``intro.md``: the chapter list, with each chapter's title (its first heading);
- ``notebooks/``: copies of the chapters as committed (executed, with outputs: nothing is re-run),
  changed in two ways for a reader without a kernel. Widget cells (code calling ``interact(``, or
  tagged ``widget``) lose
  their widget output, which needs a kernel and a CDN and stays blank offline, and are followed by
  the widget's static figures from ``figures/``: the ones the markdown before the widget names in
  the paragraph that talks about the widget, kernel or static view (``figures/02_widget_*.png``
  patterns are expanded). Mentions of ``figures/X.png`` in the text become links to the file;
- ``figures/``: a copy of ``figures/`` (so ``../figures/X.png`` from a chapter resolves);
- ``api/``: one autodoc page per ``detr_edu`` module that some chapter imports.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FIGURE_REF = re.compile(r"figures/(\d\d_[A-Za-z0-9_*\-]+\.png)")
WIDGET_WORDS = re.compile(r"widget|kernel|static", re.IGNORECASE)


def chapters() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def is_widget_cell(cell: nbformat.NotebookNode) -> bool:
    """A cell that shows a widget: it calls ``interact(``, or it is tagged ``widget`` (a widget built
    by a package class, such as chapter 02's sampling microscope)."""
    return cell.cell_type == "code" and (
        "interact(" in cell.source or "widget" in cell.get("metadata", {}).get("tags", [])
    )


def title(nb: nbformat.NotebookNode, fallback: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, re.MULTILINE)
            if match:
                return match.group(1).strip()
    return fallback


def expand(names: list[str], available: list[str]) -> list[str]:
    """Figure names (patterns allowed) -> existing file names, in order, without repeats."""
    out: list[str] = []
    for name in names:
        for match in sorted(fnmatch.filter(available, name)) if "*" in name else [name]:
            if match in available and match not in out:
                out.append(match)
    return out


def widget_figures(cells: list[nbformat.NotebookNode], index: int, available: list[str]) -> list[str]:
    """The static figures that stand for the widget in ``cells[index]``.

    The chapters' convention: the markdown just before a widget says where its static figure is
    ("readers without a kernel see ..."). Take the nearest markdown cell before the widget (at most
    three cells back) that names figures; from it the paragraphs about the widget (mentioning
    widget, kernel or static); if none does, every figure it names.
    """
    for j in range(index - 1, max(-1, index - 4), -1):
        cell = cells[j]
        if cell.cell_type != "markdown" or not FIGURE_REF.search(cell.source):
            continue
        paragraphs = re.split(r"\n\s*\n", cell.source)
        about = [p for p in paragraphs if FIGURE_REF.search(p) and WIDGET_WORDS.search(p)]
        names = [m for p in (about or paragraphs) for m in FIGURE_REF.findall(p)]
        return expand(names, available)
    return []


def widget_markdown(names: list[str]) -> str:
    """A note and the static figures, in a ``widget-static`` container (tests/test_book.py finds it)."""
    lines = [
        "````{container} widget-static",
        "```{note}",
        "The widget above needs a running kernel: open the chapter in JupyterLab to use it. "
        + (
            "Its static view:"
            if len(names) == 1
            else "Its static views:"
            if names
            else "(No static view found.)"
        ),
        "```",
    ]
    for name in names:
        lines += [
            "```{figure} ../figures/" + name,
            ":figclass: widget-static-figure",
            "",
            f"`figures/{name}`",
            "```",
        ]
    lines.append("````")
    return "\n".join(lines)


def link_figure_mentions(text: str, available: list[str]) -> str:
    """`figures/X.png` (in backticks) in the text -> a link to the file."""

    def link(match: re.Match) -> str:
        name = match.group(1)
        return f"[`figures/{name}`](../figures/{name})" if name in available else match.group(0)

    return re.sub(r"`figures/(\d\d_[A-Za-z0-9_\-]+\.png)`", link, text)


def prepare_chapter(source: Path, target: Path, available: list[str]) -> dict:
    nb = nbformat.read(source, as_version=4)
    nb.metadata.pop("widgets", None)  # widget state: would pull the widget JavaScript from a CDN
    cells, widgets = [], []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            cell.source = link_figure_mentions(cell.source, available)
        cells.append(cell)
        if cell.cell_type == "code" and not is_widget_cell(cell):
            # widgets drawn by library code (tqdm's notebook progress bar): keep their text fallback
            for output in cell.outputs:
                output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
            cell.outputs = [o for o in cell.outputs if o.get("output_type") == "stream" or o.get("data")]
        if is_widget_cell(cell):
            cell.outputs = [
                o for o in cell.outputs if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})
            ]
            names = widget_figures(nb.cells, index, available)
            widgets.append(names)
            cells.append(nbformat.v4.new_markdown_cell(widget_markdown(names)))
    nb.cells = cells
    nbformat.write(nb, target)
    return {"widgets": widgets}


def used_modules(notebooks: list[Path]) -> list[str]:
    found: set[str] = set()
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                found.update(re.findall(r"(?:from|import)\s+(detr_edu(?:\.\w+)*)", cell.source))
    return sorted(found)


def write_api(src: Path, modules: list[str]) -> list[str]:
    (src / "api").mkdir()
    pages = []
    for module in modules:
        page = f"api/{module}"
        (src / f"{page}.md").write_text(
            f"# `{module}`\n\n```{{eval-rst}}\n.. automodule:: {module}\n   :members:\n"
            "   :show-inheritance:\n```\n"
        )
        pages.append(page)
    (src / "api" / "index.md").write_text(
        "# API reference\n\nThe `detr_edu` modules that the chapters import, with their docstrings.\n"
    )
    return pages


def main(src: Path) -> None:
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    shutil.copytree(ROOT / "figures", src / "figures")
    available = sorted(p.name for p in (src / "figures").glob("*.png"))
    shutil.copy2(HERE / "_config.yml", src / "_config.yml")

    notebooks = chapters()
    toc_chapters, intro_rows = [], []
    for path in notebooks:
        info = prepare_chapter(path, src / "notebooks" / path.name, available)
        toc_chapters.append(f"notebooks/{path.stem}")
        nb = nbformat.read(path, as_version=4)
        intro_rows.append(f"- [{title(nb, path.stem)}](notebooks/{path.stem}.ipynb)")
        for names in info["widgets"]:
            print(f"{path.name}: widget -> {', '.join(names) or 'NO STATIC FIGURE'}")
    api_pages = write_api(src, used_modules(notebooks))

    (src / "intro.md").write_text(
        "# detr-edu\n\n"
        "An interactive course that builds DETR, Deformable DETR and DINO from blocks, with the\n"
        "`detr_edu` package every chapter imports. This is the offline book: the chapters as executed,\n"
        "with the static figure of every widget beside it (widgets need a running kernel: open the\n"
        "chapters in JupyterLab for them).\n\n## Chapters\n\n" + "\n".join(intro_rows) + "\n\n"
        "## Reference\n\n- [API reference](api/index.md)\n"
    )
    toc = ["format: jb-book", "root: intro", "parts:", "  - caption: Chapters", "    chapters:"]
    toc += [f"      - file: {c}" for c in toc_chapters]
    toc += ["  - caption: Reference", "    chapters:", "      - file: api/index", "        sections:"]
    toc += [f"          - file: {p}" for p in api_pages]
    (src / "_toc.yml").write_text("\n".join(toc) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_book.py SRC_DIR")
    main(Path(sys.argv[1]).resolve())
