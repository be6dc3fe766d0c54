"""The trained DINO that ships with the course (``detr_edu/weights/dino_cpu_digits.pth``, made by the
commands in :mod:`detr_edu.export`): small enough to ship, loads with ``weights_only=True``, and
still detects -- re-evaluated here with pycocotools on held-out scenes it was not trained on.

Reference: the ground truth of freshly exported val scenes (seed 0, the held-out digits).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from detr_edu.coco_eval import CocoEvaluator
from detr_edu.coco_export import export_digit_scenes
from detr_edu.data import build_coco, collate_detection
from detr_edu.dino import DINO
from detr_edu.engine import evaluate
from detr_edu.export import SHIPPED_WEIGHTS, load_shipped
from detr_edu.transforms import make_transforms


def test_shipped_file_is_small_and_describes_itself() -> None:
    assert SHIPPED_WEIGHTS.is_file(), "run the commands in detr_edu/export.py to make it"
    assert SHIPPED_WEIGHTS.stat().st_size <= 20 * 2**20
    model, info = load_shipped()
    assert isinstance(model, DINO) and not model.training
    assert info["category_ids"] == list(range(1, 11))
    assert info["train_config"]["model_preset"] == "dino_cpu"
    assert info["metrics"]["AP"] >= 30.0 and info["metrics"]["AP50"] >= 50.0  # the run's own final evaluation


@pytest.mark.slow
def test_shipped_model_detects_held_out_digits(tmp_path: Path) -> None:
    root = export_digit_scenes(tmp_path / "digits", num_train=0, num_val=100, seed=0)
    val = build_coco(root, "val", transforms=make_transforms(train=False, sizes=[96], max_size=None))
    loader = DataLoader(Subset(val, range(100)), batch_size=10, collate_fn=collate_detection)
    model, _ = load_shipped()
    metrics = evaluate(
        model,
        loader,
        CocoEvaluator(coco_json=val.coco_json, category_ids=val.category_ids),
        device=torch.device("cpu"),
    )
    assert metrics["AP"] >= 30.0 and metrics["AP50"] >= 50.0, metrics
