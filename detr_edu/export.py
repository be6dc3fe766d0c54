"""Trained weights to ship and to load: a model-only, half-precision copy of a training checkpoint.

A training checkpoint (:mod:`detr_edu.checkpoint`) carries the optimiser's two Adam moments, so it is
three times the model; in float32 the course's ``dino_cpu`` model alone is 28 MB. The exported file
keeps what inference needs -- the weights in float16 (14 MB), the model config, the category ids --
plus where it came from (training step, the final COCO metrics of the run's log). It is loaded
with ``torch.load(..., weights_only=True)`` and cast back to float32: the rounding changes the
predicted boxes by about 1e-3 of the image size (``tests/test_training_tools.py``,
``test_export_is_half_the_size_and_predicts_the_same_boxes``, bounds it).

The course ships one such file, the ``dino_cpu`` model trained for 10 minutes on digit scenes
(chapter 08), made by::

    python -m detr_edu.coco_export --out runs/digits --train 4000 --val 500 --seed 0
    python -m detr_edu.train --preset dino_cpu --coco-path runs/digits --output-dir runs/dino_cpu \\
        --budget-minutes 10 --num-val 500
    python -m detr_edu.export --checkpoint runs/dino_cpu/checkpoint.pth \\
        --log runs/dino_cpu/log.jsonl --out detr_edu/weights/dino_cpu_digits.pth

and :func:`load_shipped` returns it ready to use.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from detr_edu.build import build_model
from detr_edu.checkpoint import (
    CheckpointError,
    atomic_save,
    is_training_checkpoint,
    load_checkpoint,
    read_torch_file,
)
from detr_edu.config import ModelConfig, config_from_dict, config_to_dict
from detr_edu.logs import final_metrics, read_log

__all__ = ["export_weights", "save_weights", "load_weights", "load_shipped", "SHIPPED_WEIGHTS", "FORMAT"]

# 2: the models follow the official semantics (shared DINO heads, 4-d refined references, ...);
# a format-1 file was made by the earlier, detrex-style models and is refused with that reason
FORMAT = "detr_edu-weights-2"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "dino_cpu_digits.pth"


def export_weights(
    checkpoint_path: str | Path,
    out_path: str | Path,
    *,
    log_path: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the model of a training checkpoint to ``out_path`` (atomically), floats cast to ``dtype``.

    Args:
        checkpoint_path: a ``checkpoint.pth`` written by :mod:`detr_edu.train`.
        out_path: destination file.
        log_path: the run's ``log.jsonl``; its final metrics are stored under ``"metrics"``.
        dtype: torch.float16 (default), torch.bfloat16 or torch.float32.

    Raises:
        CheckpointError: ``out_path`` is the input or another training checkpoint (an export keeps
            no optimiser state, so overwriting one would lose the run), or the input is unreadable.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    out_path = Path(out_path)
    if out_path.exists() and out_path.resolve() == Path(checkpoint_path).resolve():
        raise CheckpointError(
            f"{out_path}: refusing to overwrite the checkpoint being exported (an export has no "
            "optimiser state: --resume would fail); choose another --out"
        )
    if is_training_checkpoint(out_path):
        raise CheckpointError(
            f"{out_path}: refusing to overwrite a training checkpoint with model-only weights; "
            "choose another --out"
        )
    checkpoint = load_checkpoint(checkpoint_path)
    return save_weights(
        checkpoint["model"],
        out_path,
        config=config_from_dict(checkpoint["config"]["model"]),
        category_ids=list(checkpoint["category_ids"]),
        extra={
            "train_config": checkpoint["config"].get("train", {}),
            "step": int(checkpoint["step"]),
            "metrics": final_metrics(read_log(log_path)) if log_path is not None else {},
        },
        dtype=dtype,
    )


def save_weights(
    state: dict,
    out_path: str | Path,
    *,
    config: ModelConfig,
    category_ids: list[int],
    extra: dict | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a model's state dict in the course's weights format (atomically), floats cast to ``dtype``.

    Used by :func:`export_weights` (trained checkpoints) and :mod:`detr_edu.convert` (published
    ones). ``extra`` entries (``train_config``, ``step``, ``metrics``, ``source``, ...) are stored
    beside the weights.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if is_training_checkpoint(out_path):
        raise CheckpointError(
            f"{out_path}: refusing to overwrite a training checkpoint with model-only weights; "
            "choose another --out"
        )
    weights = {
        "format": FORMAT,
        "model": {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
        "config": config_to_dict(config),
        "category_ids": [int(c) for c in category_ids],
        "train_config": {},
        "step": 0,
        "metrics": {},
        **(extra or {}),
    }
    return atomic_save(weights, out_path)


def load_weights(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model an exported file describes, in float32 and eval mode, and the file's other entries.

    Returns:
        ``(model, info)`` with ``info`` holding ``category_ids`` (label k <-> dataset category id),
        ``config``, ``train_config``, ``step`` and ``metrics``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a file written by :func:`export_weights`.
    """
    path = Path(path)
    weights = read_torch_file(path, what="weights file", map_location=map_location)
    if isinstance(weights, dict) and weights.get("format") == "detr_edu-weights-1":
        raise ValueError(
            f"{path} was exported by an earlier version of the course whose models were not the "
            "published ones (per-layer DINO heads, point references after refinement); re-export it "
            "from its training checkpoint with python -m detr_edu.export, or retrain"
        )
    if not isinstance(weights, dict) or weights.get("format") != FORMAT:
        raise ValueError(f"{path} is not a detr_edu weights file (format {FORMAT!r}); see detr_edu.export")
    model = build_model(config_from_dict(weights["config"]), load_backbone_weights=False)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights["model"].items()})
    model.eval()
    info = {
        k: weights.get(k) for k in ("category_ids", "config", "train_config", "step", "metrics", "source")
    }
    return model, info


def load_shipped() -> tuple[nn.Module, dict]:
    """The ``dino_cpu`` model trained on digit scenes that ships with the course (see module doc)."""
    return load_weights(SHIPPED_WEIGHTS)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Export the model of a training checkpoint (float16, model only)."
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint.pth of detr_edu.train")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--log", type=Path, help="the run's log.jsonl (final metrics are stored with the weights)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    args = p.parse_args(argv)
    try:
        out = export_weights(args.checkpoint, args.out, log_path=args.log, dtype=getattr(torch, args.dtype))
    except (ValueError, OSError) as err:  # a missing, foreign or unreadable file: a message, not a traceback
        p.exit(2, f"detr_edu.export: error: {err}\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
