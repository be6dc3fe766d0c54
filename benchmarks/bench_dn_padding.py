"""Q5 of the study note: should DINO's padded denoising queries be left out of the loss?

In a batch whose images hold different numbers of targets, every image gets ``single_pad`` (the
largest count) denoising slots per group and part; the slots of the smaller images are *padded*
queries (zero content, reference box (0.5, 0.5, 0.5, 0.5)). The reference code keeps them in the
denoising classification loss as "no object"; the alternative drops them from every loss.

This script trains a tiny DINO (C = 64, 1 encoder + 2 decoder layers, 64-px digit scenes with 1-6
digits, batch 8, so about 40 % of the denoising queries are padding) for a few hundred steps with
both losses, from the same initialisation, data and noise, for several seeds, and reports:

* the training objective of the matching queries (what inference uses) over the last 50 steps,
* validation losses and box quality of the matching queries on held-out scenes (eval mode, no
  denoising), and
* the mean foreground score (max class probability) the last decoder layer gives to positive,
  negative and padded denoising queries on a training batch.

Run: ``.venv/bin/python benchmarks/bench_dn_padding.py`` (4 seeds x 2 variants x 250 steps: 30-45 minutes on
2 busy CPU cores; ``--seeds 0`` for one pair).
Writes ``benchmarks/results/dn_padding.md`` (the table) and ``benchmarks/results/dn_padding.json``
(the table's numbers and the loss curves, read by chapter 07).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from detr_edu.box_ops import box_cxcywh_to_xyxy, box_iou
from detr_edu.config import BackboneConfig, DINOConfig
from detr_edu.criterion import SetCriterion
from detr_edu.denoising import ContrastiveDenoising
from detr_edu.dino import DINO
from detr_edu.matcher import HungarianMatcher
from detr_edu.scenes import DigitScenes, collate_scenes

WEIGHTS = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
SCENE_OPTIONS = {"image_size": 64, "min_digit_size": 10, "max_digit_size": 24}
VARIANTS = {"padding in loss (reference)": True, "padding left out": False}


def tiny_dino_config() -> DINOConfig:
    """A DINO small enough to train a few hundred steps on a busy CPU in minutes."""
    return DINOConfig(
        num_classes=10,
        embed_dim=64,
        num_heads=4,
        num_encoder_layers=1,
        num_decoder_layers=2,
        feedforward_dim=128,
        num_queries=20,
        num_points=2,
        dn_number=20,
        backbone=BackboneConfig(depth=10, levels=(2, 3), num_extra_levels=1, num_groups=16),
    )


def matching_objective(losses: dict[str, torch.Tensor]) -> float:
    """Weighted sum of the matching queries' terms (everything but the ``_dn`` ones)."""
    return sum(WEIGHTS["_".join(k.split("_")[:2])] * v.item() for k, v in losses.items() if "_dn" not in k)


@torch.no_grad()
def evaluate(model: DINO, criterion: SetCriterion, val: list) -> dict[str, float]:
    """Last-layer matching losses, mean IoU and correct-class rate of the Hungarian-matched pairs."""
    model.eval()
    images, targets = collate_scenes(val)
    out = model(images)
    last = {k: out[k] for k in ("pred_logits", "pred_boxes")}
    losses = criterion(last, targets)
    ious, correct = [], []
    for b, (q, g) in enumerate(criterion.matcher(last, targets)):
        pred_xyxy = box_cxcywh_to_xyxy(out["pred_boxes"][b, q])  # (M, 4)
        true_xyxy = box_cxcywh_to_xyxy(targets[b]["boxes"][g])  # (M, 4)
        iou = box_iou(pred_xyxy, true_xyxy).diagonal()  # (M,)
        ious.append(iou)
        right = out["pred_logits"][b, q].argmax(-1) == targets[b]["labels"][g]  # (M,)
        correct.append(right & (iou > 0.5))
    model.train()
    return {
        "val_loss_class": losses["loss_class"].item(),
        "val_loss_bbox": losses["loss_bbox"].item(),
        "val_loss_giou": losses["loss_giou"].item(),
        "val_mean_iou": torch.cat(ious).mean().item(),
        "val_hit_rate": torch.cat(correct).float().mean().item(),
    }


@torch.no_grad()
def denoising_scores(model: DINO, images: torch.Tensor, targets: list) -> dict[str, float]:
    """Mean max class probability of positive / negative / padded denoising queries (last layer)."""
    out = model(images, targets=targets)
    meta = out["dn_meta"]
    score = out["dn_outputs"]["pred_logits"].sigmoid().amax(-1)  # (B, Nd)
    valid, positive = meta.valid, meta.positive[None].expand_as(meta.valid)  # (B, Nd) each
    return {
        "score_positive": score[valid & positive].mean().item(),
        "score_negative": score[valid & ~positive].mean().item(),
        "score_padded": score[~valid].mean().item(),
        "padded_fraction": (~valid).float().mean().item(),
    }


def train_one(seed: int, padding_in_loss: bool, steps: int, batch_size: int, val: list) -> dict:
    torch.manual_seed(seed)
    cfg = tiny_dino_config()
    model = DINO.from_config(cfg, denoiser=ContrastiveDenoising.from_config(cfg, seed=seed)).train()
    criterion = SetCriterion(
        num_classes=cfg.num_classes,
        matcher=HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        weight_dict=WEIGHTS,
        dn_padding_in_loss=padding_in_loss,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    data = DigitScenes(steps * batch_size, seed=1000 + seed, **SCENE_OPTIONS)
    curve, dn_curve = [], []
    start = time.perf_counter()
    for step in range(steps):
        images, targets = collate_scenes([data[step * batch_size + i] for i in range(batch_size)])
        losses = criterion(model(images, targets=targets), targets)
        total = criterion.total(losses)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # DINO's clip
        optimizer.step()
        curve.append(matching_objective(losses))
        dn_curve.append(losses["loss_class_dn"].item())
    seconds = time.perf_counter() - start
    result = {
        "seed": seed,
        "padding_in_loss": padding_in_loss,
        "train_matching_last50": sum(curve[-50:]) / len(curve[-50:]),
        "seconds": seconds,
        "curve": curve,
        "dn_class_curve": dn_curve,
    }
    result.update(evaluate(model, criterion, val))
    result.update(denoising_scores(model, images, targets))
    return result


def markdown(runs: list[dict], steps: int, batch_size: int) -> str:
    cols = [
        ("train_matching_last50", "train matching objective (last 50 steps)"),
        ("val_loss_class", "val loss_class"),
        ("val_loss_bbox", "val loss_bbox"),
        ("val_loss_giou", "val loss_giou"),
        ("val_mean_iou", "val mean IoU"),
        ("val_hit_rate", "val hit rate"),
        ("score_positive", "score pos. dn"),
        ("score_negative", "score neg. dn"),
        ("score_padded", "score padded dn"),
    ]
    lines = [
        "Q5: tiny DINO (C=64, 1+2 layers, 20 queries, dn_number 20), 64-px digit scenes, "
        f"batch {batch_size}, {steps} AdamW steps (lr 2e-4), same init/data/noise per seed. "
        "Padded dn queries: "
        f"{100 * runs[0]['padded_fraction']:.0f} % of the denoising queries of the last batch.",
        "",
        "| variant | seed | " + " | ".join(name for _, name in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in runs:
        variant = [k for k, v in VARIANTS.items() if v == r["padding_in_loss"]][0]
        lines.append(f"| {variant} | {r['seed']} | " + " | ".join(f"{r[k]:.3f}" for k, _ in cols) + " |")
    for variant, flag in VARIANTS.items():
        sel = [r for r in runs if r["padding_in_loss"] == flag]
        lines.append(
            f"| **{variant}, mean** | {len(sel)} seeds | "
            + " | ".join(f"{sum(r[k] for r in sel) / len(sel):.3f}" for k, _ in cols)
            + " |"
        )
    lines += [
        "",
        "hit rate: share of ground-truth boxes whose Hungarian-matched prediction has the right class "
        "and IoU > 0.5. score: mean max class probability of the last decoder layer on the last "
        "training batch.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    val = [DigitScenes(64, seed=7, split="val", **SCENE_OPTIONS)[i] for i in range(64)]
    runs = []
    for seed in args.seeds:
        for variant, flag in VARIANTS.items():
            run = train_one(seed, flag, args.steps, args.batch_size, val)
            print(
                f"seed {seed} {variant}: {run['seconds']:.0f} s, val hit rate {run['val_hit_rate']:.3f}",
                flush=True,
            )
            runs.append(run)
    table = markdown(runs, args.steps, args.batch_size)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dn_padding.md").write_text(table)
    meta = {"steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds}
    (args.out / "dn_padding.json").write_text(json.dumps({"config": meta, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
