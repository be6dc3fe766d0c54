"""Small helpers shared by every chapter: seeding, the course's figure folder, and showing package source."""

from __future__ import annotations

import inspect
import os
import random
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "repo_root", "show_source"]


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch; return a ``torch.Generator`` seeded the same way.

    Chapters call this in their first cell so that their outputs reproduce under nbval.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def repo_root() -> Path:
    """The course's root folder (the one holding ``notebooks/`` and ``figures/``).

    Looks at ``$DETR_EDU_ROOT`` first, then walks up from the working directory, then falls back to
    the folder above the package (an editable install).
    """
    env = os.environ.get("DETR_EDU_ROOT")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "figures").is_dir() and (folder / "detr_edu").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


def _first_line_with(lines: list[str], text: str, begin: int) -> int | None:
    return next((i for i in range(begin, len(lines)) if text in lines[i]), None)


def show_source(
    obj: Callable[..., Any], *, start: str | None = None, stop: str | None = None, max_lines: int = 30
) -> str:
    """The source of a package function, method or class, to print beside a chapter's by-hand version.

    The excerpt runs from the first line containing ``start`` (default: the first line) to the first
    line at or after it containing ``stop`` (default: the last line), both included, dedented. It is
    headed by one comment line naming the file and the qualified name, e.g.
    ``# detr_edu/attention.py: scaled_dot_product_attention``.

    Args:
        obj: a function, method or class (decorators that set ``__wrapped__`` are looked through).
        start: text of the excerpt's first line.
        stop: text of the excerpt's last line.
        max_lines: the longest excerpt allowed, so that a chapter never prints a whole long function.

    Returns:
        The header line and the excerpt, joined by newlines.

    Raises:
        ValueError: ``start`` or ``stop`` is not in the source, or the excerpt is longer than
            ``max_lines``.
    """
    obj = inspect.unwrap(obj)
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    lines = textwrap.dedent(inspect.getsource(obj)).splitlines()
    first = 0 if start is None else _first_line_with(lines, start, 0)
    if first is None:
        raise ValueError(f"start text {start!r} is not in the source of {name}")
    last = len(lines) - 1 if stop is None else _first_line_with(lines, stop, first)
    if last is None:
        raise ValueError(f"stop text {stop!r} is not in the source of {name} (at or after the start line)")
    excerpt = lines[first : last + 1]
    if len(excerpt) > max_lines:
        raise ValueError(
            f"the excerpt of {name} is {len(excerpt)} lines, more than max_lines={max_lines}: "
            "narrow it with start= and stop="
        )
    path = Path(inspect.getsourcefile(obj) or "<unknown>").resolve()
    package_parent = Path(__file__).resolve().parent.parent
    shown = path.relative_to(package_parent).as_posix() if path.is_relative_to(package_parent) else path.name
    return "\n".join([f"# {shown}: {name}", *textwrap.dedent("\n".join(excerpt)).splitlines()])
