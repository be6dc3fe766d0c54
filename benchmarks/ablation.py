"""Ablations of the CPU DINO on digit scenes: short runs, equal wall-clock budget, one change each.

    .venv/bin/python benchmarks/ablation.py --minutes 3

Each variant is ``python -m detr_edu.train --preset dino_cpu`` with the preset's recipe and one
change (the arguments in the table), trained for ``--minutes`` of training time on the whole
machine, one after the other, evaluated on the 500 held-out val scenes every
``--eval-every-minutes``. Logs go to ``benchmarks/results/ablation/<variant>.jsonl`` and the table
to ``benchmarks/results/ablation.md``; chapter 08 reads both. One seed per variant: differences of
a few AP points are within run-to-run noise (the table reports the baseline twice to show it).

Variants, and the question each answers:

* ``content_weights`` -- Q2: attention weights from dot products with the sampled content
  (``MultiScaleDeformableAttention(weights_from="content")``) instead of the query alone;
* ``1_level_16_points`` -- Q3: one level (stride 8) x 16 points instead of 4 levels x 4 points, the
  same samples per head (the one-level backbone stops at stride 8, so it is also a smaller model);
* ``no_aux_loss`` -- losses on the last decoder layer only;
* ``10_queries`` -- 10 queries instead of 30 (scenes hold up to 6 digits);
* ``no_denoising`` -- no contrastive denoising queries (``dn_number=0``);
* ``lr_2e-4`` -- the learning rate of the GPU recipes' order instead of 1e-3;
* ``128px`` -- the scenes at their full 128 px instead of 96.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training_runs import RESULTS, ROOT, ensure_digits, machine_description, run_and_summarise, train_command

from detr_edu.logs import final_metrics, read_log

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("dino_cpu preset (4 levels x 4 points, 30 queries, denoising, aux losses)", []),
    "content_weights": (
        "Q2: weights softmax(q . k(sample)), not from the query alone",
        ["--model-set", "weights_from=content"],
    ),
    "1_level_16_points": (
        "Q3: 1 level (stride 8) x 16 points",
        ["--model-set", "num_points=16", "backbone.levels=[2]", "backbone.num_extra_levels=0"],
    ),
    "no_aux_loss": ("losses on the last decoder layer only", ["--no-aux-loss"]),
    "10_queries": ("10 queries instead of 30", ["--num-queries", "10"]),
    "no_denoising": ("no denoising queries (dn_number 0)", ["--model-set", "dn_number=0"]),
    "lr_2e-4": ("learning rate 2e-4 instead of 1e-3", ["--lr", "2e-4"]),
    "128px": ("128-px images instead of 96", ["--image-size", "128"]),
    "baseline_again": ("baseline, second run (run-to-run noise)", []),
}
LOGS = RESULTS / "ablation"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-path", type=Path, default=ROOT / "runs" / "digits")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-every-minutes", type=float, default=1.5)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument(
        "--table-only", action="store_true", help="only rebuild ablation.md from the kept logs"
    )
    args = parser.parse_args()
    if args.table_only:
        write_table(args)
        return
    ensure_digits(args.coco_path)
    for name in args.variants:
        question, extra = VARIANTS[name]
        out = args.runs_dir / name
        # the baseline's second run uses another seed: the noise of the data order and initialisation
        seed = ["--seed", "43"] if name == "baseline_again" else []
        cmd = train_command(
            "dino_cpu",
            coco_path=args.coco_path,
            out=out,
            minutes=args.minutes,
            eval_every_minutes=args.eval_every_minutes,
            num_val=args.num_val,
            extra=[*seed, *extra],
        )
        row = run_and_summarise(cmd, out=out, keep_log_as=LOGS / f"{name}.jsonl")
        (LOGS / f"{name}.load").write_text(row["load"] + "\n", encoding="utf-8")
    write_table(args)


def write_table(args: argparse.Namespace) -> None:
    """``ablation.md`` from every variant's kept log (so a variant can be re-run alone)."""
    lines = [
        f"DINO (`dino_cpu`) ablations: {args.minutes:g} min of training each (evaluation excluded), "
        f"one after the other on {machine_description()}, {args.num_val} held-out val scenes, seed 42 "
        "(43 for the second baseline). Command: `.venv/bin/python benchmarks/ablation.py "
        f"--minutes {args.minutes:g}` (or `--variants NAME ...` to re-run some; the table is rebuilt from "
        "`ablation/*.jsonl`). `AP @ N steps`: at the first evaluation (after 1.5 min), for comparing at "
        "(roughly) equal steps when a variant is faster or slower per step.",
        "",
        "| variant | what changes | extra arguments | AP | AP50 | AR100 | steps | s/step "
        "| AP @ N steps (1st eval) | load before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (question, extra) in VARIANTS.items():
        log = LOGS / f"{name}.jsonl"
        if not log.is_file():
            continue
        records = read_log(log)
        r = final_metrics(records)
        first = next((e for e in records if e["type"] == "eval"), None)
        at_first = f"{first['AP']:.1f} @ {first['step']}" if first else "-"
        load = (LOGS / f"{name}.load").read_text().strip() if (LOGS / f"{name}.load").is_file() else "n/a"
        seed = "--seed 43 " if name == "baseline_again" else ""
        lines.append(
            f"| {name} | {question} | `{(seed + ' '.join(extra)).strip() or '-'}` | {r['AP']:.1f} | "
            f"{r['AP50']:.1f} | {r['AR100']:.1f} | {r['steps']} | {r['s_per_step']:.3f} | {at_first} | "
            f"{load} |"
        )
    table = "\n".join(lines)
    print(table)
    (RESULTS / "ablation.md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
