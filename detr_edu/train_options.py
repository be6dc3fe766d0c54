"""The training command's options, and what a resumed run must agree on with its checkpoint.

:func:`parse_args` is the command line of :mod:`detr_edu.train`; :func:`training_config` and
:func:`model_config` turn it into the preset's configs with the overrides applied. A resume
(``--resume``) continues *the same experiment*: :func:`check_resume_matches` refuses another preset,
other model options or other training settings than the checkpoint's, except those in
:data:`RESUME_MAY_CHANGE` (the learning rates are then applied: see
:func:`detr_edu.train.restore_training_state`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from detr_edu.config import ModelConfig, get_preset
from detr_edu.deformable import SAMPLING_KERNELS
from detr_edu.training_presets import TRAINING_PRESET_NAMES, TrainConfig, get_training_preset

__all__ = [
    "parse_args",
    "training_config",
    "model_config",
    "apply_overrides",
    "resume_path",
    "check_resume_matches",
    "check_pretrained_backbone",
    "RESUME_MAY_CHANGE",
]


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
        "--backbone-weights",
        type=Path,
        help="a torchvision ResNet state dict file (the *_r50_coco presets need one: ImageNet weights, "
        "saved with torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), PATH))",
    )
    p.add_argument(
        "--backbone-from-scratch",
        action="store_true",
        help="train an *_r50_coco preset without pretrained weights (trainable BatchNorm, nothing frozen)",
    )
    p.add_argument(
        "--finetune-from",
        type=Path,
        help="start from a trained model (an export or a training checkpoint); class heads are "
        "re-initialised when the dataset has another number of classes",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU runs)")
    p.add_argument(
        "--sampling-kernel",
        choices=SAMPLING_KERNELS,
        default="auto",
        help="deformable sampling kernel (detr_edu.deformable.deformable_sampling): 'compiled' is the "
        "fastest on CPU (torch.compile; ~20 s to compile at start); auto: the faster eager kernel",
    )
    p.add_argument(
        "--model-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override model-config fields (values parsed as JSON when they parse): num_points=16 "
        "weights_from=content backbone.levels=[2] dn_number=0 (see detr_edu.config)",
    )
    p.add_argument("--no-aux-loss", action="store_true", help="losses on the last decoder layer only")
    p.add_argument(
        "--no-dn-padding-in-loss",
        action="store_true",
        help="leave DINO's padded denoising queries out of the loss (official: 'no object' targets)",
    )
    p.add_argument("--num-train", type=int, help="use only the first N training images")
    p.add_argument("--num-val", type=int, help="evaluate on the first N validation images")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--eval-every-epochs", type=int)
    p.add_argument("--eval-every-minutes", type=float)
    p.add_argument("--no-final-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument(
        "--no-verify-images",
        action="store_true",
        help="skip decoding every image at start-up (a bad file then stops the run when first read)",
    )
    p.add_argument(
        "--allow-outside-image-dir",
        action="store_true",
        help="accept COCO file_names that point outside the image folder (.., absolute paths)",
    )
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
        "dn_padding_in_loss": False if args.no_dn_padding_in_loss else None,
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
    if args.backbone_weights is not None:
        cfg.backbone = dataclasses.replace(cfg.backbone, weights_path=str(args.backbone_weights))
    if args.backbone_from_scratch:
        # frozen BatchNorm needs pretrained statistics; from scratch every layer trains, with BatchNorm
        norm = "batch" if cfg.backbone.norm == "frozen" else cfg.backbone.norm
        cfg.backbone = dataclasses.replace(cfg.backbone, norm=norm, freeze_at=0)
    return apply_overrides(cfg, args.model_set)


def check_pretrained_backbone(args: argparse.Namespace, cfg: ModelConfig) -> None:
    """Refuse to train a frozen-BatchNorm (pretrained-by-design) backbone from random weights."""
    if cfg.backbone.norm == "frozen" and cfg.backbone.weights_path is None and args.finetune_from is None:
        raise ValueError(
            f"--preset {args.preset} trains from an ImageNet ResNet-{cfg.backbone.depth} with frozen "
            "BatchNorm: give --backbone-weights PATH (a torchvision state dict file), or "
            "--backbone-from-scratch to train every layer from random weights"
        )


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


def resume_path(args: argparse.Namespace) -> str:
    """The checkpoint to resume from: ``--resume PATH``, or for ``auto`` OUTPUT/checkpoint.pth if any."""
    if args.resume == "auto":
        auto = args.output_dir / "checkpoint.pth"
        return str(auto) if auto.is_file() else ""
    return args.resume


# Training settings a resumed run may change: the learning rates (applied, see
# restore_training_state), how long it trains and how often it evaluates, and its data workers.
# Anything else (batch size, image sizes, loss weights, ...) would make the resumed run a
# different experiment than the one its checkpoint belongs to.
RESUME_MAY_CHANGE = ("lr", "lr_backbone", "epochs", "eval_every_epochs", "eval_every_minutes", "num_workers")


def _plain(value: object) -> object:
    """JSON-comparable form (tuples and lists alike)."""
    return json.loads(json.dumps(value))


def check_resume_matches(
    args: argparse.Namespace, tcfg: TrainConfig, checkpoint: dict, path: str, *, num_classes: int
) -> None:
    """Refuse a resume whose preset, model or training settings differ from the checkpoint's.

    Raises:
        ValueError: naming the checkpoint's value and this run's for every field that differs.
    """
    saved = checkpoint["config"]
    saved_preset = saved.get("args", {}).get("preset")
    saved_model = saved["model"].get("model")
    if saved_preset is not None and saved_preset != args.preset:
        raise ValueError(
            f"{path} was written by a --preset {saved_preset} run ({saved_model}), but this run asks "
            f"for --preset {args.preset}: resume with --preset {saved_preset}, or train anew in "
            "another --output-dir"
        )
    requested = model_config(args, tcfg, num_classes=num_classes)
    mine = _plain({"model": type(requested).__name__, **dataclasses.asdict(requested)})
    theirs = _plain(saved["model"])
    model_diff = _differences(theirs, mine)
    if model_diff:
        raise ValueError(
            f"{path} holds a model with {model_diff} (checkpoint vs this run's options): resume with "
            "the model options it was trained with (--num-queries, --backbone-norm, --model-set), or "
            "train anew in another --output-dir"
        )
    # a field added after the checkpoint was written counts as its default (what that run used)
    saved_train = {
        f.name: f.default
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING and f.name not in saved.get("train", {})
    }
    saved_train.update(saved.get("train", {}))
    train_diff = _differences(
        {k: v for k, v in _plain(saved_train).items() if k not in RESUME_MAY_CHANGE},
        {k: v for k, v in _plain(dataclasses.asdict(tcfg)).items() if k not in RESUME_MAY_CHANGE},
    )
    if train_diff:
        raise ValueError(
            f"{path} was trained with {train_diff} (checkpoint vs this run): a resumed run may change "
            f"only {', '.join(RESUME_MAY_CHANGE)}; train anew in another --output-dir for the rest"
        )


def _differences(saved: dict, mine: dict, prefix: str = "") -> str:
    """``"num_queries 30 vs 10, backbone.norm 'batch' vs 'group'"`` for the fields that differ."""
    parts = []
    for key in sorted(set(saved) | set(mine)):
        a, b = saved.get(key), mine.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{key}.")
            if inner:
                parts.append(inner)
        elif a != b:
            parts.append(f"{prefix}{key} {json.dumps(a)} vs {json.dumps(b)}")
    return ", ".join(parts)
