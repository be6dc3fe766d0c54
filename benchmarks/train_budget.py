"""DETR vs Deformable DETR vs DINO for the same wall-clock training budget on digit scenes.

    .venv/bin/python benchmarks/train_budget.py --minutes 10

Exports the scenes first if ``--coco-path`` does not hold them (4,000 train / 500 val, seed 0),
then runs ``python -m detr_edu.train --preset P --budget-minutes M`` for each preset, one after the
other with the whole machine (all three use the same training recipe, ``detr_edu.training_presets``),
and copies each run's ``log.jsonl`` (``train`` lines every 10 steps, ``eval`` lines with COCO
AP/AP50/AR every ``--eval-every-minutes`` of training time) to
``benchmarks/results/train_budget/<preset>.jsonl``. The budget counts training time only:
evaluation pauses the clock, so every model gets the same time to learn. Chapter 08 plots the logs.

A summary table (final AP/AP50/AR100, steps done, seconds per step, the machine's load average
before and after) is printed and written to ``benchmarks/results/train_budget.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training_runs import RESULTS, ROOT, ensure_digits, machine_description, run_and_summarise, train_command

PRESETS = ("detr_cpu", "deformable_detr_cpu", "dino_cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-path", type=Path, default=ROOT / "runs" / "digits")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--eval-every-minutes", type=float, default=2.0)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "train_budget")
    parser.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for detr_edu.train"
    )
    args = parser.parse_args()
    ensure_digits(args.coco_path)
    rows = []
    for preset in args.presets:
        out = args.runs_dir / preset
        cmd = train_command(
            preset,
            coco_path=args.coco_path,
            out=out,
            minutes=args.minutes,
            eval_every_minutes=args.eval_every_minutes,
            num_val=args.num_val,
            extra=args.extra,
        )
        row = run_and_summarise(cmd, out=out, keep_log_as=RESULTS / "train_budget" / f"{preset}.jsonl")
        rows.append({"preset": preset, **row})
    lines = [
        f"Training budget {args.minutes:g} min per model (evaluation excluded), run one after the other on "
        f"{machine_description()}, {args.num_val} held-out val scenes, 4,000 train scenes "
        f"(`coco_export --seed 0`), extra arguments: {args.extra or 'none'}.",
        "",
        "| preset | AP | AP50 | AR100 | steps | s/step | wall min | load avg (1/5/15 min) before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AR100']:.1f} | {r['steps']} | "
            f"{r['s_per_step']:.3f} | {r['wall_min']:.1f} | {r['load']} |"
        )
    table = "\n".join(lines)
    print(table)
    (RESULTS / "train_budget.md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
