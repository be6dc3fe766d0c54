"""Each CPU preset, trained with the production step (``engine.train_step``, the preset's criterion,
optimiser groups and schedule), must memorise two digit scenes: the total loss falls by 10x and, in
eval mode, every ground-truth digit is found with the right label at IoU > 0.7.

Reference: the ground truth itself (a model that cannot overfit two images cannot learn).
"""

from __future__ import annotations

import pytest
import torch

from detr_edu import train
from detr_edu.box_ops import box_cxcywh_to_xyxy, box_iou
from detr_edu.build import build_model
from detr_edu.coco_export import export_digit_scenes
from detr_edu.data import build_coco, collate_detection
from detr_edu.engine import WarmupStepSchedule, train_step
from detr_edu.postprocess import postprocess
from detr_edu.training_presets import get_training_preset
from detr_edu.transforms import make_transforms
from detr_edu.utils import seed_everything

STEPS = {"detr_cpu": 300, "deformable_detr_cpu": 300, "dino_cpu": 200}


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory: pytest.TempPathFactory):
    root = export_digit_scenes(tmp_path_factory.mktemp("digits"), num_train=2, num_val=0, seed=3)
    dataset = build_coco(root, "train", transforms=make_transforms(train=False, sizes=[96], max_size=None))
    return collate_detection([dataset[0], dataset[1]])


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(STEPS))
def test_preset_overfits_two_scenes(preset: str, two_scenes) -> None:
    seed_everything(0)
    tcfg = get_training_preset(preset)
    mcfg = train.model_config(
        train.parse_args(["--preset", preset, "--output-dir", "x"]), tcfg, num_classes=10
    )
    model = build_model(mcfg)
    criterion = train.build_criterion(mcfg, tcfg)
    optimizer = torch.optim.AdamW(train.param_groups(model, tcfg), weight_decay=tcfg.weight_decay)
    schedule = WarmupStepSchedule(
        base_lrs=[tcfg.lr, tcfg.lr_backbone], warmup_iters=tcfg.warmup_iters, drop=1.0
    )
    model.train()
    losses = []
    for step in range(STEPS[preset]):
        logged = train_step(
            model,
            criterion,
            two_scenes,
            optimizer,
            schedule=schedule,
            step=step,
            progress=step / STEPS[preset],
            clip_max_norm=tcfg.clip_max_norm,
        )
        losses.append(logged["loss"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 10, f"{preset}: loss {first:.2f} -> {last:.2f}"
    model.eval()
    with torch.no_grad():
        outputs = model(two_scenes.images, two_scenes.masks)
    sizes = torch.tensor([[96, 96]] * 2)
    score_type = "softmax" if getattr(mcfg, "no_object_class", False) else "sigmoid"
    for det, target in zip(
        postprocess(outputs, sizes, num_top=20, score_type=score_type), two_scenes.targets, strict=True
    ):
        gt_xyxy = box_cxcywh_to_xyxy(target["boxes"]) * 96  # (G, 4) pixels
        top = det["scores"] > 0.3
        iou = box_iou(gt_xyxy, det["boxes_xyxy_px"][top])  # (G, n)
        same_label = target["labels"][:, None] == det["labels"][top][None, :]  # (G, n)
        best = (iou * same_label).max(1).values if top.any() else torch.zeros(len(gt_xyxy))
        assert (best > 0.7).all(), f"{preset}: best IoU per digit {best.tolist()}"
