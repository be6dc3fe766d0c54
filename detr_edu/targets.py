"""Validation of ground-truth targets, once, at the public entry points that receive them.

A target is one dict per image: ``labels`` int64 (G,) class ids in [0, K) and ``boxes`` (G, 4)
normalised cxcywh. The matcher, the criterion and DINO's denoising all read targets; each public
entry point (``HungarianMatcher.forward``, ``SetCriterion.forward``, ``DINO.forward`` with targets)
calls :func:`check_targets` once, and the internal calls between them skip it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["check_targets"]


def check_targets(targets: Sequence[Mapping[str, Tensor]], *, num_classes: int | None = None) -> None:
    """Raise a ValueError naming the image and the problem for malformed targets.

    Args:
        targets: one dict per image with ``labels`` int64 (G,) and ``boxes`` (G, 4) cxcywh, every
            number in [0, 1] (normalised by the image size); G may be 0.
        num_classes: K; when given, every label must lie in [0, K).
    """
    for b, target in enumerate(targets):
        missing = [k for k in ("labels", "boxes") if k not in target]
        if missing:
            raise ValueError(
                f"targets[{b}] is missing {missing}: each target needs 'labels' and 'boxes' "
                f"(it has keys {sorted(target)})"
            )
        labels, boxes = target["labels"], target["boxes"]
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(
                f"targets[{b}]['labels'] must be int64 of shape (G,), "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        if boxes.shape != (labels.shape[0], 4):
            raise ValueError(
                f"targets[{b}]['boxes'] must have shape (G, 4) = ({labels.shape[0]}, 4) to match its "
                f"labels, got {tuple(boxes.shape)}"
            )
        if not torch.isfinite(boxes).all():
            raise ValueError(f"targets[{b}]['boxes'] contains non-finite values")
        if (boxes[:, 2:] < 0).any():
            raise ValueError(f"targets[{b}]['boxes'] has negative widths or heights (boxes must be cxcywh)")
        if boxes.numel() and (boxes.min() < 0 or boxes.max() > 1):
            raise ValueError(
                f"targets[{b}]['boxes'] must be cxcywh normalised to [0, 1] by the image size, got "
                f"values in [{float(boxes.min()):.3g}, {float(boxes.max()):.3g}] (boxes in pixels?)"
            )
        if num_classes is not None and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"targets[{b}]['labels'] must lie in [0, {num_classes}) (num_classes={num_classes}), "
                f"got ids {sorted(set(labels.tolist()))}"
            )
