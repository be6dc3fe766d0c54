"""Training throughput of the published recipes: images/s and peak memory of each ``*_r50_coco`` step.

Runs the course's real training step (:func:`detr_edu.engine.train_step`: forward under AMP, the
matcher and losses in float32, backward, clipping, AdamW) on synthetic COCO-sized batches -- the
per-GPU batch of each published recipe, images of 800 x 1066 pixels (COCO's typical size after the
recipe's resize), 7 random boxes per image -- on the GPU it finds, or the CPU otherwise::

    python benchmarks/gpu_throughput.py                          # every r50 preset, table to results/
    python benchmarks/gpu_throughput.py --presets dino_r50_coco --steps 200   # (gpu_check.sh)
    python benchmarks/gpu_throughput.py --smoke                  # the same code on CPU, tiny, < 1 min

The backbone is a random ResNet-50 whose BatchNorm statistics are calibrated on random images
first (so that its frozen BatchNorm keeps activations at the scale of a pretrained network); no
weights are downloaded. Throughput does not depend on the weights' values.

Writes a markdown table (``--out``, default ``benchmarks/results/gpu_throughput.md``) and the same
numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detr_edu import train  # noqa: E402
from detr_edu.build import build_model  # noqa: E402
from detr_edu.config import get_preset  # noqa: E402
from detr_edu.data import Batch  # noqa: E402
from detr_edu.engine import WarmupStepSchedule, default_amp, train_step  # noqa: E402
from detr_edu.training_presets import get_training_preset  # noqa: E402
from detr_edu.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

PRESETS = ("detr_r50_coco", "deformable_detr_r50_coco", "dino_r50_coco")


def calibrated_resnet50(path: Path, *, images: int, size: int, seed: int = 0) -> Path:
    """A random torchvision ResNet-50 with BatchNorm statistics measured on random images, saved."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet50()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(images, 3, size, size))
    torch.save(net.state_dict(), path)
    return path


def synthetic_batch(batch_size: int, height: int, width: int, *, num_classes: int, device, gen) -> Batch:
    """Normalised random images and 7 random boxes per image (normalised cxcywh inside the image)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    images = (torch.rand(batch_size, 3, height, width, generator=gen) - mean) / std  # (B, 3, H, W)
    targets = []
    for _ in range(batch_size):
        wh = torch.rand(7, 2, generator=gen) * 0.3 + 0.05  # (7, 2)
        centre = wh / 2 + torch.rand(7, 2, generator=gen) * (1 - wh)  # (7, 2) boxes inside the image
        targets.append(
            {
                "boxes": torch.cat([centre, wh], dim=-1).to(device),  # (7, 4) cxcywh
                "labels": torch.randint(0, num_classes, (7,), generator=gen).to(device),  # (7,)
            }
        )
    masks = torch.zeros(batch_size, height, width, dtype=torch.bool)
    return Batch(images=images.to(device), masks=masks.to(device), targets=targets)


def measure(preset: str, args: argparse.Namespace, weights: Path, device: torch.device) -> dict:
    tcfg = get_training_preset(preset)
    mcfg = get_preset(preset, num_classes=80)
    mcfg.backbone = dataclasses.replace(mcfg.backbone, weights_path=str(weights))
    torch.manual_seed(0)
    model = build_model(mcfg).to(device).train()
    criterion = train.build_criterion(mcfg, tcfg)
    groups = train.param_groups(model, tcfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay)
    schedule = WarmupStepSchedule(base_lrs=[g["lr"] for g in groups])
    amp = default_amp(device) if args.amp == "auto" else args.amp
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    batch_size = args.batch_size or tcfg.batch_size
    gen = torch.Generator().manual_seed(1)
    batch = synthetic_batch(batch_size, args.height, args.width, num_classes=80, device=device, gen=gen)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        logged = train_step(
            model,
            criterion,
            batch,
            optimizer,
            schedule=schedule,
            step=step,
            progress=0.0,
            amp=amp,
            scaler=scaler,
            clip_max_norm=tcfg.clip_max_norm,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(logged["loss"])
    times.sort()
    median = times[len(times) // 2]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f"{peak:.1f} GiB (GPU, allocated)"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        memory = f"{peak:.1f} GiB (process peak RSS, all presets so far)"
    return {
        "preset": preset,
        "batch_per_gpu": batch_size,
        "published_total_batch": tcfg.batch_size * tcfg.published_world_size,
        "image": f"{args.height}x{args.width}",
        "amp": amp,
        "steps_timed": len(times),
        "s_per_step_median": median,
        "images_per_s": batch_size / median,
        "peak_memory": memory,
        "peak_memory_gib": peak,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(rows: list[dict], device: torch.device, args: argparse.Namespace) -> str:
    lines = [
        f"Training throughput of the published recipes on {machine(device)} "
        f"(`python benchmarks/gpu_throughput.py{' --smoke' if args.smoke else ''}`; synthetic "
        f"{args.height}x{args.width} images, 7 boxes each, 80 classes; median of {args.steps} timed steps "
        f"after {args.warmup} warm-up steps).",
        "",
        "| preset | batch / GPU (published total) | AMP | images/s | s/step | peak memory "
        "| loss first -> last |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['preset']}` | {r['batch_per_gpu']} ({r['published_total_batch']}) | {r['amp']} | "
            f"{r['images_per_s']:.2f} | {r['s_per_step_median']:.3f} | {r['peak_memory']} | "
            f"{r['loss_first']:.2f} -> {r['loss_last']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1066)
    p.add_argument("--batch-size", type=int, help="images per step (default: the recipe's per-GPU batch)")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_throughput.md")
    p.add_argument("--smoke", action="store_true", help="CPU, 256x320 images, batch 1, 1 + 1 steps")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.height, args.width, args.batch_size, args.steps, args.warmup = 256, 320, 1, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        weights = calibrated_resnet50(Path(tmp) / "resnet50.pth", images=4 if args.smoke else 16, size=224)
        rows = []
        for preset in args.presets:
            rows.append(measure(preset, args, weights, device))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows, device, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine(device), "rows": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
