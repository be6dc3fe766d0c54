"""The course against HuggingFace transformers, side by side: sampling core, matcher, training.

Three comparisons in one run (transformers is a benchmark-only dependency, pinned like the parity
tests; every time is a median of calls interleaved between the sides, on one thread):

1. **Sampling core**, forward + backward: ``detr_edu.deformable.deformable_sampling`` with its default
   eager kernel (``"auto"``) and with ``kernel="compiled"`` (``torch.compile``), against transformers'
   ``MultiScaleDeformableAttention`` core (its CPU path: ``grid_sample`` per level, stack, multiply,
   sum), at the course's training shapes, the earlier course shapes and COCO shapes. Peak memory of
   one forward + backward in a fresh process per side (``VmHWM`` reset after the warm-up call, minus
   the resident memory just before the call).
2. **Matcher**: ``benchmarks/bench_matcher.py`` (the package's per-image blocks against transformers'
   ``DeformableDetrHungarianMatcher`` and a per-image loop).
3. **Training**: ``deformable_detr_cpu`` against transformers' ``DeformableDetrForObjectDetection``
   built to the same sizes (C 128, 8 heads, 2 + 3 layers, FFN 512, 30 queries, 4 levels x 4 points,
   box refinement, one-block-per-stage ResNet with trainable BatchNorm) and recipe (the preset's
   AdamW groups, warm-up and schedule, clipping 0.1, losses class 2 / L1 5 / GIoU 2 on every decoder
   layer, the same batches in the same order), trained for the same wall-clock budget *at the same
   time*, one process per core (``taskset``), one thread each; then COCO AP on the 500 validation
   scenes. Also the steady-state step time of each side, alone on a core, and ``dino_cpu``'s.

Run: ``.venv/bin/python benchmarks/bench_vs_transformers.py [--minutes 10] [--only core matcher train]``
(needs ``runs/digits``: ``python -m detr_edu.coco_export --out runs/digits --train 4000 --val 500``);
writes ``benchmarks/results/vs_transformers.md`` (and ``.json``). Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

# name -> (B, Nq or None for "every token a query", nh, hd, level shapes, P)
COCO = [(100, 150), (50, 75), (25, 38), (13, 19)]
OLD_COURSE = [(32, 32), (16, 16), (8, 8), (4, 4)]
TRAINING = [(12, 12), (6, 6), (3, 3), (2, 2)]
CORE_SHAPES = {
    "training decoder (B 4, 30 queries, hd 16)": (4, 30, 8, 16, TRAINING, 4),
    "training encoder (B 4, 193 tokens, hd 16)": (4, None, 8, 16, TRAINING, 4),
    "course 32x32 decoder (B 2, 100 queries)": (2, 100, 8, 32, OLD_COURSE, 4),
    "course 32x32 encoder (B 2, 1,360 tokens)": (2, None, 8, 32, OLD_COURSE, 4),
    "COCO decoder (B 2, 300 queries)": (2, 300, 8, 32, COCO, 4),
    "COCO encoder (B 2, 19,947 tokens)": (2, None, 8, 32, COCO, 4),
}
SIDES = ("transformers", "course auto", "course compiled")


# ----------------------------------------------------------------------------- sampling core
def _core_inputs(case: str, *, seed: int = 0):
    B, nq, nh, hd, shapes, P = CORE_SHAPES[case]
    g = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes)
    nv = int((spatial[:, 0] * spatial[:, 1]).sum())
    nq = nv if nq is None else nq
    value = torch.randn(B, nv, nh, hd, generator=g).requires_grad_()
    loc = (torch.rand(B, nq, nh, len(shapes), P, 2, generator=g) * 1.1 - 0.05).requires_grad_()
    weights = torch.rand(B, nq, nh, len(shapes), P, generator=g).softmax(-1).requires_grad_()
    return value, spatial, loc, weights


def _core_fn(side: str):
    from detr_edu.deformable import deformable_sampling

    if side == "transformers":
        from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

        core = MultiScaleDeformableAttention()

        def hf(value, spatial, loc, weights):
            starts = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
            shapes = [(int(h), int(w)) for h, w in spatial.tolist()]
            return core(value, spatial, shapes, starts, loc, weights, 64)

        return hf
    kernel = side.split()[1]
    return lambda value, spatial, loc, weights: deformable_sampling(
        value, spatial, loc, weights, kernel=kernel
    )


def _fwd_bwd(fn, inputs) -> float:
    value, spatial, loc, weights = inputs
    for t in (value, loc, weights):
        t.grad = None
    t0 = time.perf_counter()
    fn(value, spatial, loc, weights).sum().backward()
    return time.perf_counter() - t0


def _peak_child(side: str, case: str) -> None:
    """Print the peak memory (bytes) of one forward+backward, after a warm-up call (and compilation)."""
    torch.set_num_threads(1)
    fn = _core_fn(side)
    inputs = _core_inputs(case)
    _fwd_bwd(fn, inputs)  # warm-up: compilation, allocator caches
    for t in (inputs[0], inputs[2], inputs[3]):
        t.grad = torch.zeros_like(t)  # gradients exist before the measurement on both sides
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _rss()
    _fwd_bwd(fn, inputs)
    print(json.dumps({"peak_bytes": _hwm() - before}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bench_core(repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    fns = {side: _core_fn(side) for side in SIDES}
    rows = []
    for case in CORE_SHAPES:
        inputs = _core_inputs(case)
        out = {side: fns[side](*inputs) for side in SIDES}  # warm-up (compiles) and agreement
        for side in SIDES[1:]:
            torch.testing.assert_close(out[side], out["transformers"], rtol=1e-3, atol=1e-4)  # float32 sums
        big = "COCO encoder" in case
        times = {side: [] for side in SIDES}
        for _ in range(max(3, repeats // 3) if big else repeats):
            for side in SIDES:
                times[side].append(_fwd_bwd(fns[side], inputs))
        med = {side: statistics.median(v) for side, v in times.items()}
        peaks = {}
        for side in SIDES:
            res = subprocess.run(
                ["taskset", "-c", "0", sys.executable, __file__, "--peak-child", side, case],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks[side] = json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]
        rows.append(
            {"case": case, "median_s": med, "peak_bytes": peaks, "repeats": len(times["transformers"])}
        )
        print(case, {k: round(1e3 * v, 2) for k, v in med.items()}, flush=True)
    return rows


def core_markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | transformers | course auto | speed-up | course compiled | speed-up "
        "| peak memory auto / compiled vs transformers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, p = r["median_s"], r["peak_bytes"]
        hf = m["transformers"]
        lines.append(
            f"| {r['case']} | {1e3 * hf:.1f} ms | {1e3 * m['course auto']:.1f} ms | "
            f"{hf / m['course auto']:.2f}x | {1e3 * m['course compiled']:.1f} ms | "
            f"**{hf / m['course compiled']:.2f}x** | "
            f"{p['course auto'] / p['transformers']:.2f} / {p['course compiled'] / p['transformers']:.2f} "
            f"({p['transformers'] / 2**20:.1f} MiB) |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training
DATA = ROOT / "runs" / "digits"


def _course_run(preset: str, output_dir: Path, *, kernel: str):
    from detr_edu.deformable import set_sampling_kernel
    from detr_edu.distributed import init_distributed
    from detr_edu.train import build_run
    from detr_edu.train_options import parse_args

    if not (DATA / "annotations" / "instances_train2017.json").exists():
        raise SystemExit(
            f"no digit scenes at {DATA}: make them with "
            "`python -m detr_edu.coco_export --out runs/digits --train 4000 --val 500 --seed 0`"
        )
    args = parse_args(
        ["--preset", preset, "--coco-path", str(DATA), "--output-dir", str(output_dir)]
        + ["--device", "cpu", "--amp", "off", "--no-verify-images", "--no-progress"]
    )
    train_ds, run, _ = build_run(args, init_distributed("cpu"))
    set_sampling_kernel(run.model, kernel)  # (also what --sampling-kernel does)
    return train_ds, run


class HFDetector(torch.nn.Module):
    """transformers' DeformableDetrForObjectDetection behind the course's ``model(images, masks)`` call."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, images, masks, targets=None):
        out = self.hf(pixel_values=images, pixel_mask=(~masks).long())
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}


def build_hf(mcfg) -> torch.nn.Module:
    """transformers' Deformable DETR at the course preset's sizes, its backbone trained like ours."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(
        depths=[1, 1, 1, 1],
        layer_type="basic",
        hidden_sizes=[64, 128, 256, 512],
        embedding_size=64,
        out_features=["stage2", "stage3", "stage4"],
    )
    cfg = DeformableDetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=mcfg.embed_dim,
        encoder_layers=mcfg.num_encoder_layers,
        decoder_layers=mcfg.num_decoder_layers,
        encoder_attention_heads=mcfg.num_heads,
        decoder_attention_heads=mcfg.num_heads,
        encoder_ffn_dim=mcfg.feedforward_dim,
        decoder_ffn_dim=mcfg.feedforward_dim,
        encoder_n_points=mcfg.num_points,
        decoder_n_points=mcfg.num_points,
        num_feature_levels=4,
        num_queries=mcfg.num_queries,
        num_labels=mcfg.num_classes,
        with_box_refine=mcfg.box_refine,
        two_stage=mcfg.two_stage,
        auxiliary_loss=True,
        dropout=mcfg.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        class_cost=2,
        bbox_cost=5,
        giou_cost=2,
        bbox_loss_coefficient=5,
        giou_loss_coefficient=2,
        focal_alpha=0.25,
    )
    model = DeformableDetrForObjectDetection(cfg)
    # transformers freezes the backbone's BatchNorm (right for ImageNet weights); the course's CPU
    # preset trains from scratch with trainable BatchNorm, so the comparison puts trainable ones back.
    # transformers also freezes every backbone weight whose name is not a timm ResNet's layer2-4
    # (with its own ResNet backbone: all 12 convolutions); the course's preset trains them all.
    for param in model.parameters():
        param.requires_grad_(True)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child).__name__.endswith("FrozenBatchNorm2d"):
                setattr(parent, name, torch.nn.BatchNorm2d(child.weight.shape[0]))
    return model


def _hf_loss(out, weights: dict[str, float]) -> torch.Tensor:
    """The recipe's weighted total from transformers' loss terms (``loss_ce`` is its focal class loss)."""
    total = 0.0
    for key, value in out.loss_dict.items():
        base = key.rsplit("_", 1)[0] if key[-1].isdigit() else key
        total = (
            total
            + {"loss_ce": weights["class"], "loss_bbox": weights["bbox"], "loss_giou": weights["giou"]}.get(
                base, 0.0
            )
            * value
        )
    return total


def _train_child(side: str, minutes: float, out_path: Path, preset: str, step_times: int) -> None:
    """Train one side for ``minutes`` of wall-clock time (or time ``step_times`` steps), then evaluate."""
    from torch.utils.data import DataLoader

    from detr_edu.coco_eval import CocoEvaluator
    from detr_edu.data import collate_detection
    from detr_edu.engine import evaluate, train_step
    from detr_edu.train import ResumableSampler

    torch.set_num_threads(1)
    kernel = side.split()[1] if side.startswith("course") else "auto"
    train_ds, run = _course_run(preset, Path(f"/tmp/bench_vs_hf_{os.getpid()}"), kernel=kernel)
    tcfg = run.tcfg
    if side == "transformers":
        torch.manual_seed(42)
        hf = build_hf(run.mcfg)
        model = HFDetector(hf).train()
        groups = [
            {"params": [p for n, p in hf.named_parameters() if "backbone" not in n], "lr": tcfg.lr},
            {"params": [p for n, p in hf.named_parameters() if "backbone" in n], "lr": tcfg.lr_backbone},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay, fused=True)
        weights = {"class": tcfg.loss_weights["loss_class"], "bbox": tcfg.loss_weights["loss_bbox"]}
        weights["giou"] = tcfg.loss_weights["loss_giou"]
    else:
        model, optimizer = run.model.train(), run.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sampler = ResumableSampler(train_ds, num_replicas=1, rank=0, seed=42)
    loader = DataLoader(
        train_ds,
        batch_size=tcfg.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_detection,
        generator=torch.Generator().manual_seed(42),
    )
    budget = minutes * 60.0
    step, elapsed, times = 0, 0.0, []
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        tick = time.perf_counter()
        for batch in loader:
            progress = min(elapsed / budget, 1.0) if budget else 0.5
            t0 = time.perf_counter()
            if side == "transformers":
                run.schedule.step(optimizer, step, progress)
                labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in batch.targets]
                out = hf(pixel_values=batch.images, pixel_mask=(~batch.masks).long(), labels=labels)
                total = _hf_loss(out, weights)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, tcfg.clip_max_norm)
                optimizer.step()
            else:
                train_step(
                    model,
                    run.criterion,
                    batch,
                    optimizer,
                    schedule=run.schedule,
                    step=step,
                    progress=progress,
                    clip_max_norm=tcfg.clip_max_norm,
                )
            times.append(time.perf_counter() - t0)
            step += 1
            elapsed += time.perf_counter() - tick
            tick = time.perf_counter()
            if (step_times and step >= step_times) or (not step_times and elapsed >= budget):
                break
        else:
            epoch += 1
            continue
        break
    result = {
        "side": side,
        "preset": preset,
        "steps": step,
        "elapsed_s": elapsed,
        "median_step_s": statistics.median(times[3:] if len(times) > 6 else times),
        "params": sum(p.numel() for p in params),
    }
    if not step_times:
        evaluator = CocoEvaluator(coco_json=run.val_ds.coco_json, category_ids=run.category_ids)
        t0 = time.perf_counter()
        metrics = evaluate(model, run.val_loader, evaluator, device=torch.device("cpu"), score_type="sigmoid")
        result.update(AP=metrics["AP"], AP50=metrics["AP50"], eval_s=time.perf_counter() - t0)
    out_path.write_text(json.dumps(result))


def _spawn(side: str, core: int, *, minutes: float, preset: str, step_times: int, tag: str):
    out = Path(f"/tmp/bench_vs_hf_{tag}_{side.replace(' ', '_')}.json")
    out.unlink(missing_ok=True)
    cmd = ["taskset", "-c", str(core), sys.executable, __file__, "--train-child", side]
    cmd += ["--minutes", str(minutes), "--preset", preset, "--step-times", str(step_times), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env), out


def _collect(procs) -> list[dict]:
    results = []
    for proc, out in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"training child {proc.args} failed with status {proc.returncode}")
        results.append(json.loads(out.read_text()))
    return results


def bench_training(minutes: float, step_times: int) -> dict:
    load = {"start": os.getloadavg()}
    # Steady-state step time, each side alone on core 0 (the other core idle), then the concurrent run.
    alone = []
    for preset, sides in (
        ("deformable_detr_cpu", ("transformers", "course auto", "course compiled")),
        ("dino_cpu", ("course auto", "course compiled")),
    ):
        for side in sides:
            alone += _collect([_spawn(side, 0, minutes=0, preset=preset, step_times=step_times, tag="alone")])
            print("alone", alone[-1], flush=True)
    together = _collect(
        [
            _spawn(
                "course compiled",
                0,
                minutes=minutes,
                preset="deformable_detr_cpu",
                step_times=0,
                tag="budget",
            ),
            _spawn(
                "transformers", 1, minutes=minutes, preset="deformable_detr_cpu", step_times=0, tag="budget"
            ),
        ]
    )
    print("together", together, flush=True)
    load["end"] = os.getloadavg()
    return {"alone": alone, "together": together, "load": load, "minutes": minutes}


def training_markdown(res: dict) -> str:
    alone = {(r["preset"], r["side"]): r for r in res["alone"]}
    hf = alone[("deformable_detr_cpu", "transformers")]["median_step_s"]
    lines = [
        "| preset | side | parameters | median step, alone on a core | steps/s vs transformers |",
        "|---|---|---:|---:|---:|",
    ]
    for (preset, side), r in alone.items():
        ratio = f"{hf / r['median_step_s']:.2f}x" if preset == "deformable_detr_cpu" else "n/a"
        lines.append(f"| {preset} | {side} | {r['params']:,} | {1e3 * r['median_step_s']:.1f} ms | {ratio} |")
    t = {r["side"]: r for r in res["together"]}
    c, h = t["course compiled"], t["transformers"]
    lines += [
        "",
        f"Both trained at the same time for {res['minutes']:g} minutes, one per core, one thread each "
        "(load average at start / end: "
        f"{' / '.join(', '.join(f'{x:.2f}' for x in res['load'][k]) for k in ('start', 'end'))}):",
        "",
        "| side | steps in the budget | steps vs transformers | AP | AP50 |",
        "|---|---:|---:|---:|---:|",
        f"| course (`--sampling-kernel compiled`) | {c['steps']} | **{c['steps'] / h['steps']:.2f}x** | "
        f"{c['AP']:.1f} | {c['AP50']:.1f} |",
        f"| transformers | {h['steps']} | 1.00x | {h['AP']:.1f} | {h['AP50']:.1f} |",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only", nargs="+", choices=("core", "matcher", "train"), default=["core", "matcher", "train"]
    )
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--step-times", type=int, default=40, help="steps timed per side for the step-time table")
    p.add_argument("--peak-child", nargs=2, metavar=("SIDE", "CASE"), help=argparse.SUPPRESS)
    p.add_argument("--train-child", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="deformable_detr_cpu", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak_child:
        _peak_child(*args.peak_child)
        return
    if args.train_child:
        _train_child(args.train_child, args.minutes, args.out, args.preset, args.step_times)
        return

    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "vs_transformers.json"
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    saved["machine"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "load_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
    }

    def measured(section: str) -> None:  # each section says when it was measured (runs may differ)
        saved.setdefault("measured", {})[section] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "load": os.getloadavg(),
        }

    if "core" in args.only:
        measured("core")
        saved["core"] = bench_core(args.repeats)
    if "matcher" in args.only:
        import bench_matcher

        measured("matcher")
        saved["matcher"] = bench_matcher.run(repeats=5, threads=1)
        saved["matcher_md"] = bench_matcher.markdown(saved["matcher"])
    if "train" in args.only:
        measured("train")
        saved["train"] = bench_training(args.minutes, args.step_times)
    saved["machine"]["load_at_end"] = os.getloadavg()
    json_path.write_text(json.dumps(saved, indent=1, default=str))
    write_markdown(saved)


def write_markdown(saved: dict) -> None:
    m = saved["machine"]
    parts = [
        "# The course against transformers",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, {m['cpus']} CPU cores, one thread per side; "
        "last run: "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_at_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in m['load_at_end'])} ({m['date']}). Written by "
        "`.venv/bin/python benchmarks/bench_vs_transformers.py`. Ratios > 1: the course is faster.",
    ]
    when = saved.get("measured", {})

    def provenance(section: str) -> list[str]:
        if section not in when:
            return []
        w = when[section]
        return [
            f"Measured {w['date']} (load average at its start {', '.join(f'{x:.2f}' for x in w['load'])}).",
            "",
        ]

    if "core" in saved:
        parts += [
            "",
            "## Sampling core, forward + backward",
            "",
            *provenance("core"),
            "Medians of calls interleaved between the three sides; peak memory of one call in a fresh "
            "process per side. `course auto` is the default eager kernel (`grid_sample` per level, or "
            "`embedding_bag` over precomputed bilinear corners when the map is large and the queries few); "
            '`course compiled` is `kernel="compiled"` (the corner gather through `torch.compile`).',
            "",
            core_markdown(saved["core"]),
        ]
    if "matcher_md" in saved:
        parts += ["", "## Matcher", "", *provenance("matcher"), saved["matcher_md"]]
    if "train" in saved:
        parts += [
            "",
            "## Training, `deformable_detr_cpu`",
            "",
            *provenance("train"),
            training_markdown(saved["train"]),
        ]
    (RESULTS / "vs_transformers.md").write_text("\n".join(parts) + "\n")
    print((RESULTS / "vs_transformers.md").read_text())


if __name__ == "__main__":
    main()
