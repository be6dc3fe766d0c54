"""Box conversions and overlaps.

Thin, validated wrappers around ``torchvision.ops`` (the library does the maths), plus
``inverse_sigmoid`` and :func:`apply_box_delta`, with which DETR-family box heads predict a box as
a delta in logit space on top of a reference.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import ops

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "inverse_sigmoid",
    "apply_box_delta",
    "check_boxes_xyxy",
]


def _check_last_dim(boxes: Tensor, name: str) -> None:
    if boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have 4 numbers in its last dimension, got shape {tuple(boxes.shape)}")


def box_cxcywh_to_xyxy(boxes_cxcywh: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1), any leading shape."""
    _check_last_dim(boxes_cxcywh, "boxes_cxcywh")
    shape = boxes_cxcywh.shape
    return ops.box_convert(boxes_cxcywh.reshape(-1, 4), "cxcywh", "xyxy").reshape(shape)


def box_xyxy_to_cxcywh(boxes_xyxy: Tensor) -> Tensor:
    """(x0, y0, x1, y1) -> (cx, cy, w, h), any leading shape."""
    _check_last_dim(boxes_xyxy, "boxes_xyxy")
    shape = boxes_xyxy.shape
    return ops.box_convert(boxes_xyxy.reshape(-1, 4), "xyxy", "cxcywh").reshape(shape)


def check_boxes_xyxy(boxes_xyxy: Tensor, name: str = "boxes_xyxy") -> None:
    """Raise a clear ValueError for non-finite or degenerate (x1 < x0 or y1 < y0) boxes."""
    _check_last_dim(boxes_xyxy, name)
    if not torch.isfinite(boxes_xyxy).all():
        raise ValueError(f"{name} contains non-finite values")
    bad = (boxes_xyxy[..., 2:] < boxes_xyxy[..., :2]).any(-1)
    if bad.any():
        first = boxes_xyxy.reshape(-1, 4)[bad.reshape(-1)][0].tolist()
        raise ValueError(f"{name} has {int(bad.sum())} degenerate boxes (x1 < x0 or y1 < y0), e.g. {first}")


def box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise IoU, (N, 4) x (M, 4) -> (N, M). Uses ``torchvision.ops.box_iou``."""
    check_boxes_xyxy(boxes1_xyxy, "boxes1_xyxy")
    check_boxes_xyxy(boxes2_xyxy, "boxes2_xyxy")
    return ops.box_iou(boxes1_xyxy, boxes2_xyxy)


def generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise GIoU = IoU - (enclosing area - union) / enclosing area, (N, 4) x (M, 4) -> (N, M).

    Uses ``torchvision.ops.generalized_box_iou``; degenerate boxes raise a ValueError first
    (torchvision would silently return nonsense for them).
    """
    check_boxes_xyxy(boxes1_xyxy, "boxes1_xyxy")
    check_boxes_xyxy(boxes2_xyxy, "boxes2_xyxy")
    return ops.generalized_box_iou(boxes1_xyxy, boxes2_xyxy)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), clamped so that 0 and 1 map to finite values: log(x / (1 - x))."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def apply_box_delta(delta: Tensor, reference: Tensor, *, eps: float = 1e-5) -> Tensor:
    """The box a head predicts on top of a reference: ``sigmoid(delta + inverse_sigmoid(reference))``.

    Deltas live in inverse-sigmoid (logit) space, so any delta gives a box inside [0, 1] and a zero
    delta returns the reference. A 2-d reference (a point) only anchors the centre; the size is then
    ``sigmoid(delta[..., 2:])`` (Deformable DETR's box head on point references).

    Args:
        delta: (..., 4) output of a box head.
        reference: (..., 4) boxes or (..., 2) points, normalised, same leading shape.
        eps: of :func:`inverse_sigmoid` (Deformable DETR's ``util/misc.py``: 1e-5; DINO's: 1e-3).

    Returns:
        (..., 4) boxes cxcywh in [0, 1].
    """
    if delta.shape[-1] != 4 or reference.shape[-1] not in (2, 4) or delta.shape[:-1] != reference.shape[:-1]:
        raise ValueError(
            f"delta must be (..., 4) and reference (..., 2|4) with the same leading shape, got "
            f"{tuple(delta.shape)} and {tuple(reference.shape)}"
        )
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference, eps=eps)).sigmoid()  # (..., 4)
    centre = delta[..., :2] + inverse_sigmoid(reference, eps=eps)  # (..., 2)
    return torch.cat([centre, delta[..., 2:]], dim=-1).sigmoid()  # (..., 4)
