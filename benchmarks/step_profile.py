"""Where a training step's time goes: torch.profiler's top operators of a CPU preset's step, before/after.

Builds the preset's run exactly as ``python -m detr_edu.train`` does (model, criterion, AdamW groups),
times ``--steps`` steps of ``detr_edu.engine.train_step`` on the digit scenes (median, one thread),
then profiles 5 more and appends the top operators by self time to
``benchmarks/results/step_profile.md``. ``--root`` runs another checkout's package (e.g. a worktree of
an earlier commit: ``git worktree add /tmp/before <commit>``), so the same script measures before and
after a change on the same machine.

Run: ``.venv/bin/python benchmarks/step_profile.py --preset deformable_detr_cpu [--kernel compiled]
[--root /tmp/before] [--label before]`` (needs ``runs/digits``; nothing else running).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="deformable_detr_cpu")
    p.add_argument("--kernel", default="auto", help="--sampling-kernel (ignored by checkouts without one)")
    p.add_argument("--root", type=Path, default=HERE, help="the checkout whose detr_edu is measured")
    p.add_argument("--label", default="after")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--out", type=Path, default=HERE / "benchmarks" / "results" / "step_profile.md")
    args = p.parse_args()
    sys.path.insert(0, str(args.root))
    os.chdir(args.root)

    import torch
    from torch.profiler import profile

    import detr_edu
    from detr_edu.data import collate_detection
    from detr_edu.distributed import init_distributed
    from detr_edu.engine import train_step
    from detr_edu.train import build_run
    from detr_edu.train_options import parse_args

    torch.set_num_threads(1)
    if not (HERE / "runs" / "digits" / "annotations" / "instances_train2017.json").exists():
        raise SystemExit(
            f"no digit scenes at {HERE / 'runs' / 'digits'}: make them with "
            "`python -m detr_edu.coco_export --out runs/digits --train 4000 --val 500 --seed 0`"
        )
    argv = ["--preset", args.preset, "--coco-path", str(HERE / "runs" / "digits"), "--device", "cpu"]
    argv += ["--output-dir", "/tmp/step_profile", "--no-verify-images", "--amp", "off"]
    try:
        from detr_edu.deformable import set_sampling_kernel  # noqa: F401 -- only newer checkouts
    except ImportError:
        kernel = "n/a (this checkout has one kernel)"
    else:
        kernel = args.kernel
        argv += ["--sampling-kernel", args.kernel]
    train_ds, run, _ = build_run(parse_args(argv), init_distributed("cpu"))
    run.model.train()
    batches = [collate_detection([train_ds[4 * i + j] for j in range(4)]) for i in range(args.steps)]

    def step(i: int) -> None:
        train_step(
            run.model,
            run.criterion,
            batches[i % len(batches)],
            run.optimizer,
            schedule=run.schedule,
            step=100 + i,
            progress=0.1,
            clip_max_norm=run.tcfg.clip_max_norm,
        )

    for i in range(3):  # warm-up (and compilation)
        step(i)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    with profile() as prof:
        for i in range(5):
            step(i)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    commit = subprocess.run(
        ["git", "-C", str(args.root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    fused = bool(run.optimizer.param_groups[0].get("fused"))
    lines = [
        "",
        f"## {args.preset}, {args.label} (commit {commit}, sampling kernel {kernel}, AdamW fused: {fused})",
        "",
        f"Median step {1e3 * statistics.median(times):.1f} ms over {args.steps} steps (batch 4, one thread; "
        f"`{Path(detr_edu.__file__).parent}`); profile of 5 steps, top operators by self time:",
        "",
        "| operator | self time per step | share | calls per step |",
        "|---|---:|---:|---:|",
    ]
    for e in events[: args.rows]:
        name = e.key if len(e.key) < 60 else e.key[:57] + "..."
        lines.append(
            f"| `{name}` | {e.self_cpu_time_total / 5e3:.1f} ms | {e.self_cpu_time_total / total:.0%} | "
            f"{e.count / 5:g} |"
        )
    text = "\n".join(lines) + "\n"
    if not args.out.exists():
        args.out.write_text(
            "# Training-step profiles, before and after\n\nWritten by `benchmarks/step_profile.py` (see its "
            "docstring); each section is one run of it.\n"
        )
    with args.out.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
