"""Shared by ``train_budget.py`` and ``ablation.py``: run ``python -m detr_edu.train`` for a fixed
wall-clock budget, keep its log, and summarise it as one table row."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from detr_edu.logs import final_metrics, read_log

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. ``"1.9 2.0 2.1"`` (how many processes wanted a core)."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def ensure_digits(path: Path, *, num_train: int = 4000, num_val: int = 500, seed: int = 0) -> None:
    """Export the digit scenes to ``path`` unless they are already there."""
    if (path / "annotations" / "instances_val2017.json").is_file():
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "detr_edu.coco_export",
            "--out",
            str(path),
            "--train",
            str(num_train),
            "--val",
            str(num_val),
            "--seed",
            str(seed),
        ],
        check=True,
    )


def train_command(
    preset: str,
    *,
    coco_path: Path,
    out: Path,
    minutes: float,
    eval_every_minutes: float,
    num_val: int,
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "detr_edu.train",
        "--preset",
        preset,
        "--coco-path",
        str(coco_path),
        "--output-dir",
        str(out),
        "--budget-minutes",
        str(minutes),
        "--eval-every-minutes",
        str(eval_every_minutes),
        "--num-val",
        str(num_val),
        "--no-progress",
        *extra,
    ]


def run_and_summarise(cmd: list[str], *, out: Path, keep_log_as: Path) -> dict:
    """Run one training command (``out`` is emptied first), copy its log to ``keep_log_as`` and
    return the final metrics plus wall time and the load average before and after."""
    if out.exists():
        shutil.rmtree(out)
    keep_log_as.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), flush=True)
    load_before, t0 = load_average(), time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    shutil.copy(out / "log.jsonl", keep_log_as)
    row = final_metrics(read_log(out / "log.jsonl"))
    row.update(wall_min=wall / 60.0, load=f"{load_before} -> {load_average()}")
    return row


def machine_description() -> str:
    """E.g. ``2 CPU cores (x86_64), torch 2.14.1, 2 threads``: the first line of every results table."""
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
