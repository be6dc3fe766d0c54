"""DETR vs Deformable DETR vs DINO for the same wall-clock training budget on digit scenes.

    .venv/bin/python benchmarks/train_budget.py --coco-path data/digits --minutes 10

Exports the scenes first if ``--coco-path`` does not hold them (4,000 train / 500 val, seed 0),
then runs ``python -m detr_edu.train --preset P --budget-minutes M`` for each preset, one after the
other, and copies each run's ``log.jsonl`` (one JSON object per line: ``train`` every 10 steps,
``eval`` with COCO AP/AP50/AR every ``--eval-every-minutes`` of training time) to
``benchmarks/results/train_budget/<preset>.jsonl``. The budget counts training time only:
evaluation pauses the clock, so every model gets the same time to learn.

A summary table (final AP/AP50/AR100, steps done, seconds per step, the machine's load average
before and after) is printed and written to ``benchmarks/results/train_budget.md``. The machine is
shared: the load average tells how many other processes competed for the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRESETS = ("detr_cpu", "deformable_detr_cpu", "dino_cpu")


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _ensure_data(path: Path, num_train: int, num_val: int) -> None:
    if (path / "annotations" / "instances_val2017.json").is_file():
        return
    subprocess.run(
        [sys.executable, "-m", "detr_edu.coco_export", "--out", str(path), "--train", str(num_train),
         "--val", str(num_val), "--seed", "0"],
        check=True,
    )  # fmt: skip


def _finish(run: tuple, rows: list[dict]) -> None:
    """Wait for one training process, keep its log, and add its summary row."""
    preset, out, load_before, t0, process = run
    if process.wait() != 0:
        raise RuntimeError(f"training {preset} failed with exit status {process.returncode}")
    wall = time.perf_counter() - t0
    shutil.copy(out / "log.jsonl", RESULTS / "train_budget" / f"{preset}.jsonl")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    end = next(r for r in records if r["type"] == "end")
    last = evals[-1] if evals else {}
    rows.append(
        {
            "preset": preset,
            "AP": last.get("AP", float("nan")),
            "AP50": last.get("AP50", float("nan")),
            "AR100": last.get("AR100", float("nan")),
            "steps": end["step"],
            "s/step": end["elapsed_s"] / max(end["step"], 1),
            "wall_min": wall / 60.0,
            "load": f"{load_before} -> {_load()}",
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-path", type=Path, default=ROOT / "runs" / "digits")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--eval-every-minutes", type=float, default=2.0)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument(
        "--parallel", action="store_true", help="run the presets at the same time (same machine conditions)"
    )
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "train_budget")
    parser.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for detr_edu.train"
    )
    args = parser.parse_args()
    _ensure_data(args.coco_path, 4000, 500)
    (RESULTS / "train_budget").mkdir(parents=True, exist_ok=True)
    rows = []
    launched = []
    for preset in args.presets:
        out = args.runs_dir / preset
        if out.exists():
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "detr_edu.train", "--preset", preset, "--coco-path", str(args.coco_path),
               "--output-dir", str(out), "--budget-minutes", str(args.minutes), "--eval-every-minutes",
               str(args.eval_every_minutes), "--num-val", str(args.num_val), "--no-progress", *args.extra]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        launched.append((preset, out, _load(), time.perf_counter(), subprocess.Popen(cmd)))
        if not args.parallel:
            _finish(launched[-1], rows)
    if args.parallel:
        for run in launched:
            _finish(run, rows)
    header = (
        "| preset | AP | AP50 | AR100 | steps | s/step | wall min | load avg (1/5/15 min) before -> after |"
    )
    lines = [
        f"Training budget {args.minutes} min per model (evaluation excluded), {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, val scenes: {args.num_val}, "
        f"{'run at the same time' if args.parallel else 'run one after the other'}, extra: {args.extra}.",
        "",
        header,
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['AR100']:.2f} | {r['steps']} | "
            f"{r['s/step']:.2f} | {r['wall_min']:.1f} | {r['load']} |"
        )
    table = "\n".join(lines)
    print(table)
    (RESULTS / "train_budget.md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
