"""Plotting for the course: pure functions that take tensors and return matplotlib figures.

One module per chapter topic (``viz.attention``, ``viz.deformable``, ...). Widgets in the notebooks
are thin ``ipywidgets.interact`` wrappers around these functions; every widget view also has a
static figure written with :func:`save_figure`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.figure

from detr_edu.utils import repo_root

__all__ = ["save_figure", "figures_dir"]


def figures_dir() -> Path:
    """The course's ``figures/`` folder (created if missing)."""
    path = repo_root() / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig: matplotlib.figure.Figure, name: str, dpi: int = 90) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` (no timestamp metadata, so reruns are byte-stable)."""
    if not name or "/" in name or name.endswith(".png"):
        raise ValueError(f"figure name must be a bare name like '01_masks', got {name!r}")
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path
