"""DDP on CPU: a 2-process ``torchrun`` (gloo) step equals the single-process step on the same images.

With 2 processes x 2 images the distributed sampler gives each worker half of the first 4 images
of the shuffled epoch; the single process takes all 4. The losses are sums normalised by the
number of boxes averaged over workers (``num_boxes_for_loss``), and the logged losses and the
gradients are averaged over workers, so the first step's loss and gradient norm must agree. The
backbone uses GroupNorm here: BatchNorm's statistics would differ between a batch of 4 and two
batches of 2 (that difference is real, and is what SyncBatchNorm exists for).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detr_edu.coco_export import export_digit_scenes

ARGS = [
    "--preset",
    "detr_cpu",
    "--image-size",
    "64",
    "--backbone-norm",
    "group",
    "--max-iters",
    "1",
    "--log-every",
    "1",
    "--no-final-eval",
    "--no-progress",
    "--num-workers",
    "0",
    "--seed",
    "3",
]


def _first_step(out: Path) -> dict:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(rec for rec in lines if rec["type"] == "train")


@pytest.mark.slow
def test_two_process_torchrun_matches_single_process(tmp_path: Path) -> None:
    digits = export_digit_scenes(tmp_path / "digits", num_train=8, num_val=2, seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    cmd = [
        sys.executable,
        "-m",
        "detr_edu.train",
        *ARGS,
        "--coco-path",
        str(digits),
        "--output-dir",
        str(single),
        "--batch-size",
        "4",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    ddp = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "detr_edu.train",
        *ARGS,
        "--coco-path",
        str(digits),
        "--output-dir",
        str(ddp),
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = _first_step(single), _first_step(ddp)
    for key in ("loss", "loss_class", "loss_bbox", "loss_giou", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    config = next(json.loads(line) for line in (ddp / "log.jsonl").read_text().splitlines())
    assert config["type"] == "config" and config["world_size"] == 2
    # rank 0 alone writes: one log line per step, not two
    assert sum('"type": "train"' in line for line in (ddp / "log.jsonl").read_text().splitlines()) == 1
