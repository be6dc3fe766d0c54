"""The note's Q2, Q3 and Q5 answered by training: several seeds per variant, equal steps, one core each.

    .venv/bin/python benchmarks/seeded_ablation.py            # 5 variants x 3 seeds: 92 min on 2 cores
    .venv/bin/python benchmarks/seeded_ablation.py --table-only

Every run is ``python -m detr_edu.train --preset dino_cpu`` with the preset's recipe, on the first
3,000 of the 4,000 digit scenes for 2 epochs: 1,500 steps of batch 4, the learning rate x0.1 after
80 % of them, then COCO AP on the 500 held-out scenes (and every 2 minutes of training on the way,
for the curves). Variants are compared at **equal steps**, not equal time: a slower variant is not
penalised for its speed (its seconds per step are reported beside). Two runs go at once, each pinned
to its own core with one thread (``taskset``), so a run never shares a core; a run's AP does not
depend on its speed, its s/step is that of a machine with both cores busy.

Variants (one change each from the baseline):

* ``baseline`` -- ``dino_cpu``: 4 levels x 4 points, offsets and weights from the query alone, the
  padded denoising queries in the loss (the official code);
* ``content_weights`` -- Q2: attention weights ``softmax(q . k(sample))`` from the sampled content
  (``MultiScaleDeformableAttention(weights_from="content")``) instead of a linear map of the query;
* ``one_level_16_points`` -- Q3: the same backbone and neck, but only the stride-8 level reaches the
  transformer (``backbone.transformer_levels=[0]``), with 16 points instead of 4, so every head
  still reads 16 samples per query;
* ``dn_padding_out`` -- Q5: the padded denoising queries left out of every loss
  (``--no-dn-padding-in-loss``);
* ``one_level_stride16_16_points`` -- Q3 again with the stride-16 level instead (deeper features,
  a coarser map: 6 x 6 tokens at 96 px).

Seeds change the initialisation, the data order and the noise. The table gives each variant's mean
and sample standard deviation over its seeds, the seeds' range, and the difference from the
baseline's mean with its standard error, ``sqrt(s_a^2 / n_a + s_b^2 / n_b)``. Logs are kept in
``benchmarks/results/seeded_ablation/``; the table goes to ``benchmarks/results/seeded_ablation.md``
and chapters 07 and 08 read both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from training_runs import RESULTS, ROOT, ensure_digits, load_average, machine_description, train_command

from detr_edu.logs import compare_seeds, final_metrics, read_log

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("dino_cpu: 4 levels x 4 points, query-only weights, padding in the dn loss", []),
    "content_weights": (
        "Q2: weights softmax(q . k(sample)) instead of Linear(q)",
        ["--model-set", "weights_from=content"],
    ),
    "one_level_16_points": (
        "Q3: same backbone, only the stride-8 level to the transformer, 16 points",
        ["--model-set", "num_points=16", "backbone.transformer_levels=[0]"],
    ),
    "dn_padding_out": ("Q5: padded denoising queries left out of the loss", ["--no-dn-padding-in-loss"]),
    "one_level_stride16_16_points": (
        "Q3: same backbone, only the stride-16 level to the transformer, 16 points",
        ["--model-set", "num_points=16", "backbone.transformer_levels=[1]"],
    ),
}
SEEDS = (42, 43, 44)
LOGS = RESULTS / "seeded_ablation"
NUM_TRAIN, EPOCHS = 3000, 2  # 1,500 steps of batch 4


def job_command(name: str, seed: int, *, args: argparse.Namespace) -> list[str]:
    extra = [
        "--seed", str(seed), "--threads", "1", "--num-train", str(NUM_TRAIN), "--epochs", str(EPOCHS),
        *VARIANTS[name][1],
    ]  # fmt: skip
    out = args.runs_dir / f"{name}_seed{seed}"
    cmd = train_command(
        "dino_cpu",
        coco_path=args.coco_path,
        out=out,
        minutes=0.0,
        eval_every_minutes=args.eval_every_minutes,
        num_val=args.num_val,
        extra=extra,
    )
    # no wall-clock budget: the run is its epochs (train_command always passes one)
    i = cmd.index("--budget-minutes")
    return cmd[:i] + cmd[i + 2 :]


def run_all(args: argparse.Namespace) -> None:
    """Two runs at a time, one per core; the next job starts on whichever core frees first."""
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]
    free_cores, running = [0, 1], {}
    LOGS.mkdir(parents=True, exist_ok=True)
    while jobs or running:
        while jobs and free_cores:
            name, seed = jobs.pop(0)
            core = free_cores.pop(0)
            cmd = ["taskset", "-c", str(core), *job_command(name, seed, args=args)]
            out = args.runs_dir / f"{name}_seed{seed}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            print(f"[core {core}] $ {' '.join(cmd)}", flush=True)
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            running[proc] = (name, seed, core, out, time.perf_counter(), load_average())
        time.sleep(2.0)
        for proc in [p for p in running if p.poll() is not None]:
            name, seed, core, out, t0, load0 = running.pop(proc)
            free_cores.append(core)
            if proc.returncode != 0:
                raise SystemExit(
                    f"{name} seed {seed} failed ({proc.returncode}): {proc.stderr.read()[-2000:]}"
                )
            stem = LOGS / f"{name}_seed{seed}"
            stem.with_suffix(".jsonl").write_text(
                (out / "log.jsonl").read_text(encoding="utf-8"), encoding="utf-8"
            )
            meta = {
                "core": core,
                "wall_s": round(time.perf_counter() - t0, 1),
                "load": f"{load0} -> {load_average()}",
            }
            stem.with_suffix(".meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
            print(f"[core {core}] {name} seed {seed} done in {meta['wall_s']:.0f} s", flush=True)


def collect() -> dict[str, list[dict]]:
    """Final metrics of every kept log, per variant (seeds in order)."""
    runs: dict[str, list[dict]] = {}
    for name in VARIANTS:
        for seed in SEEDS:
            log = LOGS / f"{name}_seed{seed}.jsonl"
            if log.is_file():
                row = final_metrics(read_log(log))
                row["seed"] = seed
                runs.setdefault(name, []).append(row)
    return runs


def write_table() -> str:
    runs = collect()
    base = [r["AP"] for r in runs.get("baseline", [])]
    lines = [
        f"DINO (`dino_cpu`), {EPOCHS} epochs of the first {NUM_TRAIN:,} digit scenes (1,500 steps of batch "
        f"4, lr x0.1 after 80 %), seeds {', '.join(map(str, SEEDS))}; two runs at a time on "
        f"{machine_description().rsplit(',', 1)[0]}, each run pinned to its own core with one thread; "
        "COCO AP on the 500 "
        "held-out scenes. Command: `.venv/bin/python benchmarks/seeded_ablation.py` (`--table-only` "
        "rebuilds this table from `seeded_ablation/*.jsonl`). mean ± sample std over seeds; Δ AP = variant "
        "mean - baseline mean ± its standard error.",
        "",
        "| variant | what changes | AP per seed | AP mean ± std | AP50 mean ± std | AR100 mean ± std "
        "| Δ AP vs baseline | steps | s/step (both cores busy) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (what, _) in VARIANTS.items():
        rows = runs.get(name)
        if not rows or len(rows) < 2 or len(base) < 2:
            continue
        ap = compare_seeds([r["AP"] for r in rows], base)
        ap50 = compare_seeds([r["AP50"] for r in rows], base)
        ar = compare_seeds([r["AR100"] for r in rows], base)
        delta = "-" if name == "baseline" else f"{ap.difference:+.1f} ± {ap.standard_error:.1f}"
        steps = "/".join(sorted({str(r["steps"]) for r in rows}))
        sps = statistics.fmean(r["s_per_step"] for r in rows)
        lines.append(
            f"| {name} | {what} | {' / '.join(f'{a:.1f}' for a in ap.values)} | {ap.mean:.1f} ± {ap.std:.1f} "
            f"| {ap50.mean:.1f} ± {ap50.std:.1f} | {ar.mean:.1f} ± {ar.std:.1f} | {delta} | {steps} "
            f"| {sps:.3f} |"
        )
    table = "\n".join(lines)
    (RESULTS / "seeded_ablation.md").write_text(table + "\n", encoding="utf-8")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-path", type=Path, default=ROOT / "runs" / "digits")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--eval-every-minutes", type=float, default=2.0)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "seeded_ablation")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from the kept logs")
    args = parser.parse_args()
    if not args.table_only:
        ensure_digits(args.coco_path)
        run_all(args)
    print(write_table())


if __name__ == "__main__":
    main()
