"""Fine-tuning: start a new run from trained weights, re-initialising the class heads when the classes differ.

The most asked question on the DETR-family trackers is how to train a published (or one's own)
model on a custom COCO-format dataset. The recipe: build the model for the *new* number of classes
(the dataset's categories, remapped to 0..K-1 by :class:`detr_edu.data.CocoDetection`), load every
tensor of the trained model into it, and leave freshly initialised only the tensors whose shape
depends on K -- the class heads (``*class_embed*``) and DINO's denoising label embedding
(``*label_embed*``). Anything else that does not fit means another architecture, and is refused.

:func:`load_for_finetuning` takes a course export (:mod:`detr_edu.export`) or a training checkpoint
(:mod:`detr_edu.checkpoint`), always loaded weights-only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from detr_edu.checkpoint import CHECKPOINT_KEYS, CheckpointError, read_torch_file
from detr_edu.export import FORMAT

__all__ = ["load_for_finetuning", "is_class_tensor", "read_model_state"]


def is_class_tensor(name: str) -> bool:
    """Whether a state-dict entry's shape depends on the number of classes."""
    return "class_embed" in name or "label_embed" in name


def read_model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The model state dict of an export or a training checkpoint, and its config (``{}`` if none).

    Raises:
        FileNotFoundError, CheckpointError: a missing, unreadable or foreign file.
    """
    path = Path(path)
    data = read_torch_file(path, what="model file")
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data["model"], data.get("config", {})
    if isinstance(data, dict) and str(data.get("format", "")).startswith("detr_edu-weights-"):
        raise CheckpointError(
            f"{path}: a detr_edu export of format {data['format']!r}, made by an earlier version whose "
            f"models were not the published ones; re-export it (format {FORMAT!r}) or retrain"
        )
    if isinstance(data, dict) and all(k in data for k in CHECKPOINT_KEYS):
        return data["model"], data["config"].get("model", {})
    raise CheckpointError(
        f"{path}: neither a detr_edu training checkpoint nor an export of one (python -m detr_edu.export); "
        "a published checkpoint must be converted first"
    )


def _refuse_split_shared_tensors(model: nn.Module, source: dict, path: str | Path) -> None:
    """A tensor the model shares under several names (DINO's one head for every decoder layer) must
    come with one value: a source with different values there (e.g. the earlier per-layer DINO heads)
    would otherwise load silently, the last name winning."""
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    for group in names.values():
        given = [n for n in group if n in source]
        first = given[0] if given else None
        for other in given[1:]:
            if source[other].shape == source[first].shape and not torch.equal(source[other], source[first]):
                raise CheckpointError(
                    f"{path} has different values for {first} and {other}, which this model shares "
                    "(one tensor): it was made by another architecture (e.g. the course's earlier "
                    "DINO with a head pair per decoder layer); fine-tune from a checkpoint of this one"
                )


def load_for_finetuning(model: nn.Module, path: str | Path) -> str:
    """Load every tensor of ``path`` into ``model`` except class tensors of another shape.

    Args:
        model: the new model, built for the new dataset's number of classes.
        path: an export or a training checkpoint of the same architecture.

    Returns:
        One line saying what was loaded and what was re-initialised (for the log and stdout).

    Raises:
        CheckpointError: keys missing or unexpected, or non-class tensors of another shape (another
            architecture): all of them named.
    """
    source, _ = read_model_state(path)
    target = model.state_dict()
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    reinit, wrong = [], []
    for name in sorted(set(target) & set(source)):
        if source[name].shape != target[name].shape:
            (reinit if is_class_tensor(name) else wrong).append(name)
    _refuse_split_shared_tensors(model, source, path)
    if missing or unexpected or wrong:
        shapes = [f"{n} {tuple(source[n].shape)} vs {tuple(target[n].shape)}" for n in wrong[:5]]
        raise CheckpointError(
            f"{path} does not fit this model (another architecture?): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {shapes} "
            f"({len(missing)} / {len(unexpected)} / {len(wrong)} in all)"
        )
    state = {
        name: tensor.to(target[name].dtype) if tensor.is_floating_point() else tensor
        for name, tensor in source.items()
        if name not in reinit
    }
    model.load_state_dict({**target, **state})
    if not reinit:
        return f"fine-tuning from {path}: every tensor loaded (the same classes)"
    # a class head's rows are the classes (the denoiser's label embedding has one row more)
    first = next((n for n in reinit if "class_embed" in n), reinit[0])
    return (
        f"fine-tuning from {path}: loaded {len(state)} tensors; re-initialised {len(reinit)} class "
        f"tensors for {target[first].shape[0]} classes instead of {source[first].shape[0]} "
        f"({', '.join(reinit[:4])}{', ...' if len(reinit) > 4 else ''})"
    )
