"""Small helpers shared by every chapter: seeding and the course's figure folder."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["seed_everything", "repo_root"]


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
