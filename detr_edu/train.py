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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from detr_edu.build import build_model
from detr_edu.checkpoint import load_checkpoint, module_generators, rng_state, save_checkpoint, set_rng_state
from detr_edu.coco_eval import CocoEvaluator
from detr_edu.config import DeformableDETRConfig, ModelConfig, config_from_dict
from detr_edu.criterion import SetCriterion
from detr_edu.data import CocoDetection, coco_paths, collate_detection
from detr_edu.deformable import set_sampling_kernel
from detr_edu.distributed import DistContext, barrier, cleanup, init_distributed
from detr_edu.engine import WarmupStepSchedule, default_amp, evaluate, train_step, unwrap
from detr_edu.errors import NonFiniteLossError
from detr_edu.finetune import load_for_finetuning
from detr_edu.matcher import HungarianMatcher
from detr_edu.train_options import (
    apply_overrides,
    check_pretrained_backbone,
    check_resume_matches,
    model_config,
    parse_args,
    resume_path,
    training_config,
)
from detr_edu.training_presets import TrainConfig
from detr_edu.transforms import make_transforms
from detr_edu.utils import seed_everything

__all__ = [
    "cli",
    "main",
    "parse_args",
    "apply_overrides",
    "build_criterion",
    "param_groups",
    "ResumableSampler",
]


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
        dn_padding_in_loss=tcfg.dn_padding_in_loss,
        # official two-stage Deformable DETR trains its encoder head class-agnostic (every token)
        binary_enc_cls=isinstance(mcfg, DeformableDETRConfig) and mcfg.two_stage,
    )


# official Deformable DETR / DINO (main.py, lr_linear_proj_names): these train at lr x lr_linear_proj_mult
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def param_groups(model: nn.Module, tcfg: TrainConfig) -> list[dict]:
    """Named AdamW groups: ``transformer`` at ``lr``, ``backbone`` at ``lr_backbone`` (DETR sec. 4),
    and with ``lr_linear_proj_mult != 1`` a ``linear_proj`` group (deformable attention's
    ``sampling_offsets`` and the one-stage ``reference_points``) at ``lr * lr_linear_proj_mult``, as
    the official Deformable DETR and DINO train them. Frozen parameters are in no group."""
    split = tcfg.lr_linear_proj_mult != 1.0
    groups: dict[str, list] = {"transformer": [], "backbone": [], "linear_proj": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(param)
        elif split and any(part in name for part in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(param)
        else:
            groups["transformer"].append(param)
    lrs = {
        "transformer": tcfg.lr,
        "backbone": tcfg.lr_backbone,
        "linear_proj": tcfg.lr * tcfg.lr_linear_proj_mult,
    }
    names = ["transformer", "backbone"] + (["linear_proj"] if split else [])
    return [{"name": n, "params": groups[n], "lr": lrs[n]} for n in names]


def _fused_ok(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel exists for this device (CPU and CUDA do)."""
    return device.type in ("cpu", "cuda")


def describe_groups(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float]) -> list[dict]:
    """Each optimiser group's name, base learning rate and parameter count (the log's first line)."""
    return [
        {"name": g.get("name", str(i)), "lr": lr, "params": sum(p.numel() for p in g["params"])}
        for i, (g, lr) in enumerate(zip(optimizer.param_groups, base_lrs, strict=True))
    ]


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
    train_tf = make_transforms(
        train=True, sizes=tcfg.train_sizes, max_size=tcfg.max_size, flip=tcfg.flip, crop=tcfg.crop
    )
    val_tf = make_transforms(train=False, sizes=[tcfg.eval_size], max_size=tcfg.max_size)
    outside = args.allow_outside_image_dir
    train = None
    if not args.eval:
        train = CocoDetection(
            image_dir=train_images,
            annotation_file=train_ann,
            transforms=train_tf,
            seed=args.seed,
            allow_outside_image_dir=outside,
        )
    val = CocoDetection(
        image_dir=val_images,
        annotation_file=val_ann,
        transforms=val_tf,
        seed=args.seed,
        allow_outside_image_dir=outside,
    )
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


@dataclass
class Progress:
    """The counters of a run: saved in every checkpoint, restored by a resume.

    ``elapsed_s`` counts training time only (the clock of ``--budget-minutes``);
    ``next_eval_s`` is when the next timed evaluation is due; ``last_eval_step`` avoids evaluating
    the same weights twice at the end.
    """

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    elapsed_s: float = 0.0
    next_eval_s: float = 0.0
    last_eval_step: int = -1


@dataclass
class Run:
    """Everything a training or evaluation run holds, built once by :func:`build_run`."""

    args: argparse.Namespace
    ctx: DistContext
    tcfg: TrainConfig
    mcfg: ModelConfig
    model: nn.Module
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    schedule: WarmupStepSchedule
    scaler: torch.amp.GradScaler | None
    amp: str
    base_lrs: list[float]
    category_ids: list[int]
    val_ds: CocoDetection
    val_loader: DataLoader
    logger: _Logger
    resume: str

    @property
    def score_type(self) -> str:
        return "softmax" if getattr(self.mcfg, "no_object_class", False) else "sigmoid"


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m detr_edu.train``: :func:`main`, with every input problem reported in one line.

    A bad COCO folder, image, checkpoint or option is a message on stderr naming the file and the
    cause, and exit status 2 (1 is a non-finite loss, 0 success) -- not a traceback.
    """
    try:
        return main(argv)
    except (ValueError, OSError) as err:  # CocoFormatError, CheckpointError, FileNotFoundError, ...
        print(f"detr_edu.train: error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status (0 ok, 1 non-finite loss).

    Raises:
        ValueError, OSError: bad input (see :func:`cli`, which turns them into one-line messages).
    """
    args = parse_args(argv)
    ctx = init_distributed(args.device)
    try:
        return _run(args, ctx)
    finally:
        cleanup()


def _run(args: argparse.Namespace, ctx: DistContext) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    train_ds, run, checkpoint = build_run(args, ctx)
    if args.eval:
        return evaluate_only(run)
    progress = Progress()
    if checkpoint is not None:
        progress, overrides = restore_training_state(run, checkpoint)
        run.logger(
            {"type": "resume", "checkpoint": run.resume, "step": progress.step, **overrides}, echo=True
        )
    elif ctx.is_main:
        run.logger({"type": "config", **config_record(run)})
    assert train_ds is not None  # for type checkers: not --eval
    try:
        stop = train(run, train_ds, progress)
    except NonFiniteLossError as err:
        if ctx.is_main:
            record = {"type": "error", "step": progress.step, "elapsed_s": round(progress.elapsed_s, 2)}
            run.logger({**record, "message": str(err)})
            print(f"error: {err}", file=sys.stderr)
        return 1
    save(run, progress)  # before the evaluation: whatever happens there, the training is kept
    if not args.no_final_eval and progress.last_eval_step != progress.step:
        eval_and_log(run, progress)
        save(run, progress)
    run.logger(
        {
            "type": "end",
            "reason": stop,
            "epoch": progress.epoch,
            "step": progress.step,
            "elapsed_s": round(progress.elapsed_s, 2),
        },
        echo=True,
    )
    return 0


def build_run(args: argparse.Namespace, ctx: DistContext) -> tuple[CocoDetection | None, Run, dict | None]:
    """Data, model, criterion and optimiser of a run, and the checkpoint to resume from (if any)."""
    amp = args.amp if args.amp != "auto" else default_amp(ctx.device)
    if amp == "fp16" and ctx.device.type != "cuda":
        raise ValueError(f"--amp fp16 needs CUDA; this run is on {ctx.device} (use --amp bf16 or off)")
    tcfg = training_config(args)
    train_ds, val_ds = _datasets(args, tcfg)
    category_ids = val_ds.category_ids
    if args.finetune_from is not None and (args.resume or args.eval):
        raise ValueError(
            "--finetune-from starts a new run from trained weights; it cannot be combined with "
            "--resume or --eval (resume or evaluate the fine-tuning run's own checkpoint instead)"
        )
    resume = resume_path(args)
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(resume, map_location="cpu")
        if list(checkpoint["category_ids"]) != category_ids:
            raise ValueError(
                f"{resume} was trained on category ids {list(checkpoint['category_ids'])}, "
                f"the data has {category_ids}: to train this model on other classes, start a new run "
                f"with --finetune-from {resume} (the class heads are re-initialised)"
            )
        if not args.eval:  # --eval takes the checkpoint's model as it is
            check_resume_matches(args, tcfg, checkpoint, resume, num_classes=len(category_ids))
        mcfg = config_from_dict(checkpoint["config"]["model"])
    elif args.eval:
        raise ValueError(
            "--eval needs a checkpoint: --resume PATH (or --resume auto with one in --output-dir)"
        )
    else:
        mcfg = model_config(args, tcfg, num_classes=len(category_ids))
        check_pretrained_backbone(args, mcfg)

    seed_everything(args.seed)  # same seed on every rank: identical initial weights
    from_file = checkpoint is not None or args.finetune_from is not None
    model = build_model(mcfg, load_backbone_weights=not from_file).to(ctx.device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    elif args.finetune_from is not None:
        note = load_for_finetuning(model, args.finetune_from)
        if ctx.is_main:
            print(note, flush=True)
    set_sampling_kernel(model, args.sampling_kernel)  # not a weight: a resumed run may change it
    groups = param_groups(model, tcfg)
    base_lrs = [g["lr"] for g in groups]
    # fused=True: one kernel per step for all parameters instead of ~10 per parameter (on the CPU
    # preset 41 -> 8 ms of a ~200 ms step, measured in benchmarks/results/step_profile.md); same
    # AdamW update, rounded in another order.
    optimizer = torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay, fused=_fused_ok(ctx.device))
    schedule = WarmupStepSchedule(
        base_lrs=base_lrs,
        warmup_iters=tcfg.warmup_iters,
        drop=tcfg.lr_drop,
        gamma=tcfg.lr_gamma,
    )
    val_set = _first(val_ds, args.num_val)
    if len(val_set) == 0 and (args.eval or not args.no_final_eval):
        raise ValueError(
            f"the validation set {val_ds.annotation_file} has no images"
            f"{f' (--num-val {args.num_val})' if args.num_val is not None else ''}: nothing to evaluate; "
            "give a validation set with images, or train with --no-final-eval"
        )
    if not args.no_verify_images:  # a truncated file stops the run now, not mid-epoch
        show = not args.no_progress and ctx.is_main
        if train_ds is not None:
            used = range(len(_first(train_ds, args.num_train)))
            train_ds.verify_images(used, progress=show and len(used) > 1000)
        val_ds.verify_images(range(len(val_set)), progress=show and len(val_set) > 1000)
    val_share = Subset(val_set, range(ctx.rank, len(val_set), ctx.world_size))
    val_loader = DataLoader(
        val_share,
        batch_size=tcfg.batch_size,
        shuffle=False,
        collate_fn=collate_detection,
        num_workers=tcfg.num_workers,
        persistent_workers=tcfg.num_workers > 0,
        # its own generator: an evaluation must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(args.seed),
    )
    if ctx.is_main:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    run = Run(
        args=args,
        ctx=ctx,
        tcfg=tcfg,
        mcfg=mcfg,
        model=model,
        criterion=build_criterion(mcfg, tcfg),
        optimizer=optimizer,
        schedule=schedule,
        scaler=torch.amp.GradScaler("cuda") if amp == "fp16" else None,
        amp=amp,
        base_lrs=base_lrs,
        category_ids=category_ids,
        val_ds=val_ds,
        val_loader=val_loader,
        logger=_Logger(args.output_dir / "log.jsonl", ctx.is_main),
        resume=resume,
    )
    return train_ds, run, checkpoint


def restore_training_state(run: Run, checkpoint: dict) -> tuple[Progress, dict]:
    """Optimiser, schedule, scaler, counters and every random state of a checkpoint (exact resume).

    Learning rates given on the command line (``--lr``, ``--lr-backbone``) replace the saved ones:
    the advice after a non-finite loss is to lower the learning rate and resume. Returns the
    progress and, for the log, the overrides applied (``{"lr_override": {...}}`` or ``{}``).
    """
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.schedule.load_state_dict(checkpoint["scheduler"])
    if run.scaler is not None and checkpoint["scaler"] is not None:
        run.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"], module_generators(run.model))
    overrides = {}
    wanted = list(run.base_lrs)
    if wanted != run.schedule.base_lrs:
        overrides["lr_override"] = {"from": list(run.schedule.base_lrs), "to": wanted}
        run.schedule.base_lrs = wanted
    return Progress(**checkpoint["extra"]["state"]), overrides


def config_record(run: Run) -> dict:
    """The run's settings as plain data: the log's first line and every checkpoint's ``config``."""
    return {
        "model": {"model": type(run.mcfg).__name__, **dataclasses.asdict(run.mcfg)},
        "train": dataclasses.asdict(run.tcfg),
        "param_groups": describe_groups(run.optimizer, run.base_lrs),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items()},
        "world_size": run.ctx.world_size,
    }


def run_eval(run: Run) -> dict[str, float]:
    """COCO metrics of the model on the validation share of this process (gathered by the evaluator)."""
    evaluator = CocoEvaluator(coco_json=run.val_ds.coco_json, category_ids=run.category_ids)
    return evaluate(
        run.model, run.val_loader, evaluator, device=run.ctx.device, amp=run.amp, score_type=run.score_type
    )


def evaluate_only(run: Run) -> int:
    """``--eval``: evaluate the resumed checkpoint, log and print its metrics."""
    t0 = time.perf_counter()
    metrics = run_eval(run)
    eval_s = round(time.perf_counter() - t0, 2)
    run.logger({"type": "eval", "checkpoint": run.resume, **metrics, "eval_s": eval_s}, echo=True)
    if run.ctx.is_main:
        print(json.dumps({"checkpoint": run.resume, **metrics}))
    return 0


def eval_and_log(run: Run, progress: Progress) -> None:
    """Evaluate now and write an ``"eval"`` log line (training time excluded from ``elapsed_s``)."""
    t0 = time.perf_counter()
    metrics = run_eval(run)
    progress.last_eval_step = progress.step
    record = {
        "type": "eval",
        "epoch": progress.epoch,
        "step": progress.step,
        "elapsed_s": round(progress.elapsed_s, 2),
    }
    run.logger({**record, **metrics, "eval_s": round(time.perf_counter() - t0, 2)}, echo=True)


def save(run: Run, progress: Progress) -> None:
    """Write OUTPUT/checkpoint.pth atomically (rank 0), with every state an exact resume needs."""
    if run.ctx.is_main:
        model = unwrap(run.model)
        save_checkpoint(
            run.args.output_dir / "checkpoint.pth",
            {
                "model": model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.schedule.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                "epoch": progress.epoch,
                "step": progress.step,
                "rng": rng_state(module_generators(model)),
                "config": config_record(run),
                "category_ids": run.category_ids,
                "extra": {"state": dataclasses.asdict(progress)},
            },
        )
    barrier()


@dataclass
class RunLength:
    """How long a run trains: a wall-clock budget (seconds of training time), or a number of steps."""

    budget_s: float | None
    total_steps: int | None

    def fraction(self, progress: Progress) -> float:
        """The fraction of the training done (the lr schedule's ``progress``)."""
        if self.budget_s:
            return progress.elapsed_s / self.budget_s
        return progress.step / self.total_steps


def train(run: Run, train_ds: CocoDetection, progress: Progress) -> str:
    """Train from ``progress`` until the budget, ``--max-iters`` or the epochs end; return why it stopped.

    Raises:
        NonFiniteLossError: from :func:`~detr_edu.engine.train_step`; nothing was updated or saved.
    """
    args, ctx, tcfg = run.args, run.ctx, run.tcfg
    train_set = _first(train_ds, args.num_train)
    sampler = ResumableSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, seed=args.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=tcfg.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_detection,
        num_workers=tcfg.num_workers,
        persistent_workers=tcfg.num_workers > 0,
        pin_memory=ctx.device.type == "cuda",
        # its own generator: creating an iterator must not draw from the global RNG, or a resumed
        # run would be one draw off the uninterrupted one
        generator=torch.Generator().manual_seed(args.seed),
    )
    iters_per_epoch = len(sampler.dataset) // ctx.world_size // tcfg.batch_size
    if iters_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training images give no full batch of {tcfg.batch_size} per process "
            f"({ctx.world_size} processes)"
        )
    budget_s = args.budget_minutes * 60.0 if args.budget_minutes else None
    length = RunLength(budget_s=budget_s, total_steps=None if budget_s else tcfg.epochs * iters_per_epoch)
    ddp_model = (
        nn.parallel.DistributedDataParallel(
            run.model,
            device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
            # with transformer_levels some backbone stages feed no level and never get a gradient
            find_unused_parameters=run.mcfg.backbone.transformer_levels is not None,
        )
        if ctx.distributed
        else run.model
    )
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    bar = tqdm(
        total=length.total_steps,
        initial=progress.step,
        disable=args.no_progress or not ctx.is_main,
        desc=args.preset,
        dynamic_ncols=True,
    )
    smoothed: dict[str, float] = {}  # the bar's display of the main losses
    try:
        while True:
            if budget_s is None and progress.epoch >= tcfg.epochs:
                return "epochs"
            sampler.set_epoch(progress.epoch)
            train_ds.set_epoch(progress.epoch)  # the augmentations of this epoch
            sampler.skip = progress.step_in_epoch * tcfg.batch_size
            stop = train_epoch(run, ddp_model, train_loader, progress, length, bar, smoothed)
            if stop is not None:
                return stop
    finally:
        bar.close()


def train_epoch(
    run: Run,
    ddp_model: nn.Module,
    loader: DataLoader,
    progress: Progress,
    length: RunLength,
    bar: tqdm,
    smoothed: dict[str, float],
) -> str | None:
    """Train on the rest of the current epoch; return why training stopped, or None at the epoch's end."""
    args, tcfg = run.args, run.tcfg
    epoch = progress.epoch
    sums: dict[str, float] = {}
    steps = 0
    tick = time.perf_counter()
    for batch in loader:
        batch = batch.to(run.ctx.device)
        logged = train_step(
            ddp_model,
            run.criterion,
            batch,
            run.optimizer,
            schedule=run.schedule,
            step=progress.step,
            progress=length.fraction(progress),
            amp=run.amp,
            scaler=run.scaler,
            clip_max_norm=tcfg.clip_max_norm,
        )
        progress.elapsed_s += time.perf_counter() - tick
        progress.step += 1
        progress.step_in_epoch += 1
        steps += 1
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v
        _update_bar(bar, smoothed, logged)
        if args.log_every and progress.step % args.log_every == 0:
            run.logger(
                {
                    "type": "train",
                    "epoch": epoch,
                    "step": progress.step,
                    "elapsed_s": round(progress.elapsed_s, 3),
                    **logged,
                }
            )
        stop = _stop_reason(args, length, progress)
        if stop is None and tcfg.eval_every_minutes and progress.elapsed_s >= progress.next_eval_s:
            if progress.step > 1:  # not before any training
                save(run, progress)  # before the evaluation: whatever happens there, the training is kept
                eval_and_log(run, progress)
                save(run, progress)
            progress.next_eval_s = progress.elapsed_s + tcfg.eval_every_minutes * 60.0
        if stop is not None:
            return stop
        tick = time.perf_counter()
    end_epoch(run, progress, {k: v / max(steps, 1) for k, v in sums.items()}, length)
    return None


def _stop_reason(args: argparse.Namespace, length: RunLength, progress: Progress) -> str | None:
    if length.budget_s is not None and progress.elapsed_s >= length.budget_s:
        return "budget"
    if args.max_iters and progress.step >= args.max_iters:
        return "max_iters"
    return None


def _update_bar(bar: tqdm, smoothed: dict[str, float], logged: dict[str, float]) -> None:
    """Advance the bar; update ``smoothed`` (the main losses, exponentially smoothed) and show it."""
    for k in ("loss", "loss_class", "loss_bbox", "loss_giou"):
        smoothed[k] = logged[k] if k not in smoothed else 0.9 * smoothed[k] + 0.1 * logged[k]
    bar.update(1)
    bar.set_postfix({k: f"{v:.3f}" for k, v in smoothed.items()})


def end_epoch(run: Run, progress: Progress, means: dict[str, float], length: RunLength) -> None:
    """A complete epoch: log its mean losses, evaluate when due (epoch-based runs), checkpoint."""
    epoch = progress.epoch
    progress.epoch += 1
    progress.step_in_epoch = 0
    run.logger(
        {
            "type": "epoch",
            "epoch": epoch,
            "step": progress.step,
            "elapsed_s": round(progress.elapsed_s, 2),
            **means,
        },
        echo=True,
    )
    tcfg = run.tcfg
    evaluate_now = (
        length.budget_s is None
        and not tcfg.eval_every_minutes
        and (progress.epoch % tcfg.eval_every_epochs == 0 and progress.epoch < tcfg.epochs)
    )
    save(run, progress)
    if evaluate_now:
        eval_and_log(run, progress)
        save(run, progress)


if __name__ == "__main__":
    raise SystemExit(cli())
