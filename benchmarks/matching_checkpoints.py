"""Light checkpoints of three short training runs, for chapter 05's "matching over training" view.

Trains, one after the other and from the same seed, on the same digit scenes and with chapter 08's CPU
recipe (``training_presets``: AdamW lr 1e-3, backbone 2e-4, batch 4, 96 px, 20-step warm-up, clipping
0.1, the step decay at 80 % of the run):

* Deformable DETR with box refinement (``deformable_detr_cpu``),
* DINO (``dino_cpu``, contrastive denoising on),
* DINO without denoising (``dino_cpu`` with ``dn_number=0``: nothing else changes, see ``build.py``).

Every ``--every`` steps (and before the first) it stores *only what the view needs*: the last decoder
layer's predictions -- class logits and boxes, float16 -- on a few fixed held-out scenes (val split:
digit images no training scene contains). The chapter rebuilds those scenes' targets with
``make_scene`` and computes the cost matrices and the matchings live, with ``HungarianMatcher``.

Usage (about 5 minutes on 2 cores)::

    .venv/bin/python benchmarks/matching_checkpoints.py            # writes detr_edu/recordings/...
    .venv/bin/python benchmarks/matching_checkpoints.py --steps 20 --every 10 --out /tmp/x.pt  # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import torch

from detr_edu import train
from detr_edu.build import build_model
from detr_edu.config import get_preset
from detr_edu.data import collate_detection
from detr_edu.engine import WarmupStepSchedule, train_step
from detr_edu.scenes import DigitScenes, make_scene
from detr_edu.training_presets import get_training_preset
from detr_edu.transforms import make_transforms
from detr_edu.utils import seed_everything
from detr_edu.viz.matching_run import MATCHING_RUN, RUN_NAMES

# name -> (preset, model-config overrides)
RUNS = {
    "Deformable DETR": ("deformable_detr_cpu", {}),
    "DINO": ("dino_cpu", {}),
    "DINO without denoising": ("dino_cpu", {"dn_number": 0}),
}
assert tuple(RUNS) == RUN_NAMES


def held_out_images(indices: list[int], *, seed: int, size: int) -> torch.Tensor:
    """The fixed held-out scenes, transformed as for evaluation: (N, 3, size, size)."""
    tf = make_transforms(train=False, sizes=[size], max_size=None)
    return torch.stack([tf(*make_scene(seed=seed, index=i, split="val"))[0] for i in indices])


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last decoder layer's (logits (N, Nq, K), boxes (N, Nq, 4)) in eval mode, as float16."""
    was_training = model.training
    model.eval()
    out = model(images)
    model.train(was_training)
    return out["pred_logits"].half(), out["pred_boxes"].half()


def run(
    name: str, *, steps: int, every: int, images: torch.Tensor, num_train: int, seed: int
) -> dict[str, object]:
    preset, overrides = RUNS[name]
    tcfg = get_training_preset(preset)
    mcfg = dataclasses.replace(get_preset(tcfg.model_preset), **overrides)
    seed_everything(seed)
    model = build_model(mcfg).train()
    criterion = train.build_criterion(mcfg, tcfg)
    optimizer = torch.optim.AdamW(train.param_groups(model, tcfg), weight_decay=tcfg.weight_decay)
    schedule = WarmupStepSchedule(
        base_lrs=[g["lr"] for g in optimizer.param_groups], warmup_iters=tcfg.warmup_iters, drop=tcfg.lr_drop
    )
    scenes = DigitScenes(num_train, seed=seed, split="train")
    tf = make_transforms(train=True, sizes=list(tcfg.train_sizes), max_size=tcfg.max_size, flip=tcfg.flip)
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    recorded_steps, logits, boxes, losses = [], [], [], []
    start = time.perf_counter()
    for step in range(steps + 1):
        if step % every == 0:
            lg, bx = predict(model, images)
            recorded_steps.append(step)
            logits.append(lg)
            boxes.append(bx)
            print(f"{name}: step {step}", flush=True)
        if step == steps:
            break
        first = step * tcfg.batch_size % num_train
        batch = collate_detection(
            [tf(*scenes[int(order[(first + i) % num_train])]) for i in range(tcfg.batch_size)]
        )
        logged = train_step(
            model,
            criterion,
            batch,
            optimizer,
            schedule=schedule,
            step=step,
            progress=step / steps,
            clip_max_norm=tcfg.clip_max_norm,
        )
        losses.append(logged["loss"])
    return {
        "preset": preset,
        "model_set": overrides,
        "steps": torch.tensor(recorded_steps),  # (S,)
        "pred_logits": torch.stack(logits),  # (S, N, Nq, K) float16
        "pred_boxes": torch.stack(boxes),  # (S, N, Nq, 4) float16
        "loss": torch.tensor(losses, dtype=torch.float32),  # (steps,) weighted total per step
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--scenes", type=int, default=16, help="held-out scenes whose predictions are kept")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=MATCHING_RUN)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    indices = list(range(args.scenes))
    images = held_out_images(indices, seed=args.seed, size=96)  # (N, 3, 96, 96)
    runs = {
        name: run(
            name, steps=args.steps, every=args.every, images=images, num_train=args.num_train, seed=args.seed
        )
        for name in RUNS
    }
    record = {
        "format": 1,
        "scenes": {"seed": args.seed, "split": "val", "indices": indices, "size": 96},
        "train": {"steps": args.steps, "every": args.every, "num_train": args.num_train, "seed": args.seed},
        "machine": f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}",
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    for name, r in runs.items():
        print(
            f"{name}: {r['seconds']:.0f} s, loss {r['loss'][:20].mean():.2f} -> {r['loss'][-20:].mean():.2f}"
        )


if __name__ == "__main__":
    main()
