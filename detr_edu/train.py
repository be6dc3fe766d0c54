"""Train or evaluate DETR, Deformable DETR or DINO on a COCO-format folder.

On the CPU, on digit scenes (chapter 08)::

    python -m detr_edu.coco_export --out data/digits --train 4000 --val 500 --seed 0
    python -m detr_edu.train --preset dino_cpu --coco-path data/digits --output-dir runs/dino \\
        --budget-minutes 10

On one GPU, and on 8 GPUs with ``torchrun`` (the same script, unchanged)::

    python -m detr_edu.train --preset dino_r50_coco --coco-path /data/coco --output-dir runs/dino_r50
    torchrun --nproc_per_node=8 -m detr_edu.train --preset dino_r50_coco --coco-path /data/coco \\
        --output-dir runs/dino_r50

Resume after an interruption with ``--resume auto`` (the last checkpoint of ``--output-dir``);
evaluate a checkpoint on any COCO folder with ``--eval --resume PATH``.

Outputs in ``--output-dir`` (rank 0 only): ``checkpoint.pth`` (rewritten atomically at every epoch
end, evaluation and stop) and ``log.jsonl``: one JSON object per line with ``"type"`` one of
``"train"`` (every ``--log-every`` steps), ``"epoch"``, ``"eval"`` (COCO AP, AP50, ... in percent)
and ``"end"``. ``elapsed_s`` counts training time only (evaluation and checkpoint writing are
excluded), the clock that ``--budget-minutes`` and ``eval_every_minutes`` use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from detr_edu.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from detr_edu.coco_eval import CocoEvaluator
from detr_edu.config import ModelConfig, build_model, config_from_dict, get_preset
from detr_edu.criterion import SetCriterion
from detr_edu.data import CocoDetection, coco_paths, collate_detection
from detr_edu.dino import DINO
from detr_edu.distributed import DistContext, barrier, cleanup, init_distributed
from detr_edu.engine import NonFiniteLossError, WarmupStepSchedule, evaluate, train_step, unwrap
from detr_edu.matcher import HungarianMatcher
from detr_edu.training_presets import TRAINING_PRESET_NAMES, TrainConfig, get_training_preset
from detr_edu.transforms import make_transforms
from detr_edu.utils import seed_everything

__all__ = ["main", "parse_args", "apply_overrides", "build_criterion", "param_groups", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first ``skip`` indices of its epoch (mid-epoch resume).

    The order of an epoch is a function of (seed, epoch) only, so a run resumed after k batches
    replays the same order and drops what it has already trained on.
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train or evaluate a DETR-family detector on a COCO-format folder."
    )
    p.add_argument("--preset", required=True, choices=TRAINING_PRESET_NAMES, help="model + training preset")
    p.add_argument("--coco-path", type=Path, help="COCO folder: train2017/, val2017/, annotations/")
    p.add_argument("--train-images", type=Path, help="training image folder (instead of --coco-path)")
    p.add_argument("--train-annotations", type=Path, help="training annotation json")
    p.add_argument("--val-images", type=Path, help="validation image folder")
    p.add_argument("--val-annotations", type=Path, help="validation annotation json")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--resume", default="", help="'auto' (OUTPUT_DIR/checkpoint.pth if present) or a path")
    p.add_argument("--eval", action="store_true", help="only evaluate (the --resume checkpoint) and exit")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--budget-minutes", type=float, help="train for this much wall-clock training time")
    p.add_argument("--max-iters", type=int, default=0, help="stop (with a checkpoint) after this many steps")
    p.add_argument("--batch-size", type=int, help="images per step per process")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-backbone", type=float)
    p.add_argument("--warmup-iters", type=int)
    p.add_argument("--lr-drop", type=float, help="fraction of the training after which lr x 0.1")
    p.add_argument("--image-size", type=int, help="train and evaluate at this shorter side (one size)")
    p.add_argument("--num-queries", type=int, help="override the model's number of queries")
    p.add_argument("--backbone-norm", choices=("batch", "group"), help="override the backbone's norm layer")
    p.add_argument(
        "--model-set", nargs="+", default=[], metavar="KEY=VALUE",
        help="override model-config fields (values parsed as JSON when they parse): num_points=16 "
        "weights_from=content backbone.levels=[2] dn_number=0 (see detr_edu.config)",
    )  # fmt: skip
    p.add_argument("--no-aux-loss", action="store_true", help="losses on the last decoder layer only")
    p.add_argument("--num-train", type=int, help="use only the first N training images")
    p.add_argument("--num-val", type=int, help="evaluate on the first N validation images")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--eval-every-epochs", type=int)
    p.add_argument("--eval-every-minutes", type=float)
    p.add_argument("--no-final-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--log-every", type=int, default=10, help="a 'train' log line every N steps (0: none)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--amp", choices=("auto", "off", "bf16", "fp16"), default="auto", help="auto: bf16 on CUDA"
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def training_config(args: argparse.Namespace) -> TrainConfig:
    """The preset's :class:`TrainConfig` with the command-line overrides applied."""
    cfg = get_training_preset(args.preset)
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_backbone": args.lr_backbone,
        "warmup_iters": args.warmup_iters,
        "lr_drop": args.lr_drop,
        "num_workers": args.num_workers,
        "eval_every_epochs": args.eval_every_epochs,
        "eval_every_minutes": args.eval_every_minutes,
        "aux_loss": False if args.no_aux_loss else None,
    }
    if args.image_size is not None:
        overrides.update(train_sizes=(args.image_size,), eval_size=args.image_size, max_size=None)
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def model_config(args: argparse.Namespace, tcfg: TrainConfig, num_classes: int) -> ModelConfig:
    cfg = get_preset(tcfg.model_preset, num_classes=num_classes)
    if args.num_queries is not None:
        cfg.num_queries = args.num_queries
    if args.backbone_norm is not None:
        cfg.backbone = dataclasses.replace(cfg.backbone, norm=args.backbone_norm)
    return apply_overrides(cfg, args.model_set)


def apply_overrides(cfg: ModelConfig, items: Sequence[str]) -> ModelConfig:
    """A copy of ``cfg`` with ``KEY=VALUE`` items applied (``backbone.KEY`` for the backbone).

    Values are parsed as JSON when they parse (``16``, ``[2]``, ``true``, ``"content"``) and kept as
    strings otherwise (``weights_from=content``). Unknown keys raise ``ValueError`` naming the valid
    ones; the dataclasses' own checks (``__post_init__``) run again on the result.
    """
    cfg = dataclasses.replace(cfg)
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--model-set wants KEY=VALUE items, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target_name, _, field_name = key.rpartition(".")
        if target_name not in ("", "backbone"):
            raise ValueError(
                f"--model-set key {key!r}: only fields of the model or of 'backbone.' are settable"
            )
        target = cfg.backbone if target_name else cfg
        names = {f.name for f in dataclasses.fields(target)}
        if field_name not in names or (not target_name and field_name == "backbone"):
            raise ValueError(
                f"--model-set: {type(target).__name__} has no field {field_name!r}; fields: {sorted(names)}"
            )
        if isinstance(value, list):
            value = tuple(value)
        current = getattr(target, field_name)
        expected = float if isinstance(current, float) else type(current)
        numeric_ok = expected is float and type(value) is int  # 2 for 2.0
        wrong = not (isinstance(value, expected) or numeric_ok) or (
            expected is int and isinstance(value, bool)
        )
        if current is not None and wrong:
            raise ValueError(
                f"--model-set {key}={raw}: expected {expected.__name__} (like {json.dumps(current)}), "
                f"got {type(value).__name__}"
            )
        if target_name:
            cfg.backbone = dataclasses.replace(cfg.backbone, **{field_name: value})
        else:
            cfg = dataclasses.replace(cfg, **{field_name: value})
    return cfg


def build_criterion(mcfg: ModelConfig, tcfg: TrainConfig) -> SetCriterion:
    """The Hungarian matcher + :class:`SetCriterion` a training preset describes."""
    ce = getattr(mcfg, "no_object_class", False)
    if ce != (tcfg.class_loss == "ce"):
        raise ValueError(
            f"model preset {tcfg.model_preset!r} has no_object_class={ce} but the training preset uses "
            f"class_loss={tcfg.class_loss!r}; softmax heads need 'ce', sigmoid heads 'focal'"
        )
    matcher = HungarianMatcher(
        cost_class=tcfg.cost_class,
        cost_bbox=tcfg.cost_bbox,
        cost_giou=tcfg.cost_giou,
        class_cost_type="ce" if ce else "focal",
    )
    return SetCriterion(
        num_classes=mcfg.num_classes,
        matcher=matcher,
        weight_dict=tcfg.loss_weights,
        class_loss=tcfg.class_loss,
        eos_coef=tcfg.eos_coef,
        aux_loss=tcfg.aux_loss,
    )


def param_groups(model: nn.Module, tcfg: TrainConfig) -> list[dict]:
    """Two AdamW groups: the backbone at ``lr_backbone``, everything else at ``lr`` (DETR sec. 4)."""
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(param)
    return [{"params": rest, "lr": tcfg.lr}, {"params": backbone, "lr": tcfg.lr_backbone}]


def _datasets(args: argparse.Namespace, tcfg: TrainConfig) -> tuple[CocoDetection | None, CocoDetection]:
    if args.coco_path is not None:
        train_images, train_ann = coco_paths(args.coco_path, "train")
        val_images, val_ann = coco_paths(args.coco_path, "val")
    else:
        train_images, train_ann = args.train_images, args.train_annotations
        val_images, val_ann = args.val_images, args.val_annotations
    if (
        val_images is None
        or val_ann is None
        or (not args.eval and (train_images is None or train_ann is None))
    ):
        raise ValueError(
            "give --coco-path, or --train-images/--train-annotations and --val-images/--val-annotations"
        )
    train_tf = make_transforms(train=True, sizes=tcfg.train_sizes, max_size=tcfg.max_size, flip=tcfg.flip)
    val_tf = make_transforms(train=False, sizes=[tcfg.eval_size], max_size=tcfg.max_size)
    train = None
    if not args.eval:
        train = CocoDetection(
            image_dir=train_images, annotation_file=train_ann, transforms=train_tf, seed=args.seed
        )
    val = CocoDetection(image_dir=val_images, annotation_file=val_ann, transforms=val_tf, seed=args.seed)
    if train is not None and train.category_ids != val.category_ids:
        raise ValueError(f"train and val category ids differ: {train.category_ids} vs {val.category_ids}")
    return train, val


def _first(dataset: CocoDetection, n: int | None):
    return dataset if n is None else Subset(dataset, range(min(n, len(dataset))))


class _Logger:
    """JSON lines into OUTPUT/log.jsonl (rank 0 only); eval/epoch/end lines also go to stdout."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def __call__(self, record: dict, *, echo: bool = False) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if echo:
            tqdm.write(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status (0 ok, 1 non-finite loss)."""
    args = parse_args(argv)
    ctx = init_distributed(args.device)
    try:
        return _run(args, ctx)
    finally:
        cleanup()


def _run(args: argparse.Namespace, ctx: DistContext) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = args.amp if args.amp != "auto" else ("bf16" if ctx.device.type == "cuda" else "off")
    if amp != "off" and ctx.device.type != "cuda":
        raise ValueError(f"--amp {amp} needs CUDA; this run is on {ctx.device} (use --amp off)")
    tcfg = training_config(args)
    train_ds, val_ds = _datasets(args, tcfg)
    category_ids = val_ds.category_ids

    checkpoint = None
    resume = args.resume
    if resume == "auto":
        auto = args.output_dir / "checkpoint.pth"
        resume = str(auto) if auto.is_file() else ""
    if resume:
        checkpoint = load_checkpoint(resume, map_location="cpu")
        mcfg = config_from_dict(checkpoint["config"]["model"])
        if list(checkpoint["category_ids"]) != category_ids:
            raise ValueError(
                f"{resume} was trained on category ids {list(checkpoint['category_ids'])}, the data has {category_ids}"
            )
    elif args.eval:
        raise ValueError(
            "--eval needs a checkpoint: --resume PATH (or --resume auto with one in --output-dir)"
        )
    else:
        mcfg = model_config(args, tcfg, num_classes=len(category_ids))

    seed_everything(args.seed)  # same seed on every rank: identical initial weights
    model = build_model(mcfg).to(ctx.device)
    with_targets = isinstance(model, DINO)  # DINO builds its denoising queries from the targets
    score_type = "softmax" if getattr(mcfg, "no_object_class", False) else "sigmoid"
    criterion = build_criterion(mcfg, tcfg)
    optimizer = torch.optim.AdamW(param_groups(model, tcfg), weight_decay=tcfg.weight_decay)
    schedule = WarmupStepSchedule(
        base_lrs=[tcfg.lr, tcfg.lr_backbone],
        warmup_iters=tcfg.warmup_iters,
        drop=tcfg.lr_drop,
        gamma=tcfg.lr_gamma,
    )
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    state = {
        "epoch": 0,
        "step": 0,
        "step_in_epoch": 0,
        "elapsed_s": 0.0,
        "next_eval_s": 0.0,
        "last_eval_step": -1,
    }
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if not args.eval:
            optimizer.load_state_dict(checkpoint["optimizer"])
            schedule.load_state_dict(checkpoint["scheduler"])
            if scaler is not None and checkpoint["scaler"] is not None:
                scaler.load_state_dict(checkpoint["scaler"])
            state.update(checkpoint["extra"]["state"])
            set_rng_state(checkpoint["rng"])

    val_share = Subset(
        _first(val_ds, args.num_val), range(ctx.rank, len(_first(val_ds, args.num_val)), ctx.world_size)
    )
    val_loader = DataLoader(val_share, batch_size=tcfg.batch_size, shuffle=False, collate_fn=collate_detection,
                            num_workers=tcfg.num_workers)  # fmt: skip
    logger = _Logger(args.output_dir / "log.jsonl", ctx.is_main)
    if ctx.is_main:
        args.output_dir.mkdir(parents=True, exist_ok=True)

    def run_eval() -> dict:
        evaluator = CocoEvaluator(coco_json=val_ds.coco_json, category_ids=category_ids)
        return evaluate(model, val_loader, evaluator, device=ctx.device, amp=amp, score_type=score_type)

    if args.eval:
        t0 = time.perf_counter()
        metrics = run_eval()
        logger(
            {"type": "eval", "checkpoint": resume, **metrics, "eval_s": round(time.perf_counter() - t0, 2)},
            echo=True,
        )
        if not ctx.is_main:
            return 0
        print(json.dumps({"checkpoint": resume, **metrics}))
        return 0

    assert train_ds is not None  # for type checkers: not --eval
    train_set = _first(train_ds, args.num_train)
    sampler = ResumableSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=tcfg.batch_size, sampler=sampler, drop_last=True,
                              collate_fn=collate_detection, num_workers=tcfg.num_workers,
                              pin_memory=ctx.device.type == "cuda",
                              # its own generator: creating an iterator must not draw from the global
                              # RNG, or a resumed run would be one draw off the uninterrupted one
                              generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    iters_per_epoch = len(sampler.dataset) // ctx.world_size // tcfg.batch_size
    if iters_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training images give no full batch of {tcfg.batch_size} per process "
            f"({ctx.world_size} processes)"
        )
    budget_s = args.budget_minutes * 60.0 if args.budget_minutes else None
    total_steps = None if budget_s else tcfg.epochs * iters_per_epoch
    ddp_model = (
        nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
        )
        if ctx.distributed
        else model
    )
    config_record = {
        "model": {"model": type(mcfg).__name__, **dataclasses.asdict(mcfg)},
        "train": dataclasses.asdict(tcfg),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "world_size": ctx.world_size,
    }

    def save() -> None:
        if ctx.is_main:
            save_checkpoint(
                args.output_dir / "checkpoint.pth",
                {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": state["epoch"],
                    "step": state["step"],
                    "rng": rng_state(),
                    "config": config_record,
                    "category_ids": category_ids,
                    "extra": {"state": dict(state)},
                },
            )
        barrier()

    def eval_and_log() -> None:
        t0 = time.perf_counter()
        metrics = run_eval()
        state["last_eval_step"] = state["step"]
        record = {
            "type": "eval",
            "epoch": state["epoch"],
            "step": state["step"],
            "elapsed_s": round(state["elapsed_s"], 2),
        }
        logger({**record, **metrics, "eval_s": round(time.perf_counter() - t0, 2)}, echo=True)

    def progress() -> float:
        return state["elapsed_s"] / budget_s if budget_s else state["step"] / total_steps

    if ctx.is_main and checkpoint is None:
        logger({"type": "config", **config_record})
    bar = tqdm(total=total_steps, initial=state["step"], disable=args.no_progress or not ctx.is_main,
               desc=args.preset, dynamic_ncols=True)  # fmt: skip
    stop = None
    running: dict[str, float] = {}
    try:
        while stop is None:
            epoch = state["epoch"]
            if budget_s is None and epoch >= tcfg.epochs:
                stop = "epochs"
                break
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)  # the augmentations of this epoch
            sampler.skip = state["step_in_epoch"] * tcfg.batch_size
            epoch_sums: dict[str, float] = {}
            epoch_steps = 0
            tick = time.perf_counter()
            for batch in train_loader:
                batch = batch.to(ctx.device)
                logged = train_step(
                    ddp_model, criterion, batch, optimizer, schedule=schedule, step=state["step"],
                    progress=progress(), with_targets=with_targets, amp=amp, scaler=scaler,
                    clip_max_norm=tcfg.clip_max_norm,
                )  # fmt: skip
                now = time.perf_counter()
                state["elapsed_s"] += now - tick
                state["step"] += 1
                state["step_in_epoch"] += 1
                epoch_steps += 1
                for k, v in logged.items():
                    epoch_sums[k] = epoch_sums.get(k, 0.0) + v
                    running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v  # smoothed for the bar
                bar.update(1)
                bar.set_postfix(
                    {k: f"{running[k]:.3f}" for k in ("loss", "loss_class", "loss_bbox", "loss_giou")}
                )
                if args.log_every and state["step"] % args.log_every == 0:
                    logger({"type": "train", "epoch": epoch, "step": state["step"],
                            "elapsed_s": round(state["elapsed_s"], 3), **logged})  # fmt: skip
                if budget_s is not None and state["elapsed_s"] >= budget_s:
                    stop = "budget"
                elif args.max_iters and state["step"] >= args.max_iters:
                    stop = "max_iters"
                if stop is None and tcfg.eval_every_minutes and state["elapsed_s"] >= state["next_eval_s"]:
                    if state["step"] > 1:  # not before any training
                        eval_and_log()
                        save()
                    state["next_eval_s"] = state["elapsed_s"] + tcfg.eval_every_minutes * 60.0
                if stop is not None:
                    break
                tick = time.perf_counter()
            if stop is None:  # a complete epoch
                means = {k: v / max(epoch_steps, 1) for k, v in epoch_sums.items()}
                state["epoch"] += 1
                state["step_in_epoch"] = 0
                logger({"type": "epoch", "epoch": epoch, "step": state["step"],
                        "elapsed_s": round(state["elapsed_s"], 2), **means}, echo=True)  # fmt: skip
                evaluate_now = (
                    budget_s is None
                    and not tcfg.eval_every_minutes
                    and (state["epoch"] % tcfg.eval_every_epochs == 0 and state["epoch"] < tcfg.epochs)
                )
                if evaluate_now:
                    eval_and_log()
                save()
    except NonFiniteLossError as err:
        bar.close()
        if ctx.is_main:
            logger({"type": "error", "step": state["step"], "message": str(err)})
            print(f"error: {err}", file=sys.stderr)
        return 1
    bar.close()
    if not args.no_final_eval and state["last_eval_step"] != state["step"]:
        eval_and_log()
    save()
    logger({"type": "end", "reason": stop, "epoch": state["epoch"], "step": state["step"],
            "elapsed_s": round(state["elapsed_s"], 2)}, echo=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
