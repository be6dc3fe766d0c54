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
    "batched_generalized_box_iou",
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


def batched_generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor, *, validate: bool = True) -> Tensor:
    """Pairwise GIoU within each image of a batch, (B, N, 4) x (B, M, 4) -> (B, N, M).

    Image b's slice equals ``torchvision.ops.generalized_box_iou(boxes1_xyxy[b], boxes2_xyxy[b])``
    bit for bit: the same operations per element, in the same order (tested). It is written per
    coordinate into four preallocated buffers instead of calling torchvision (which also accepts
    leading dimensions), because torchvision allocates a fresh (B, N, M) or (B, N, M, 2) tensor for
    each of its operations; at DINO's matching size (16 x 900 x 50) those are megabytes each, and on
    one CPU thread this version is several times faster there.

    Args:
        boxes1_xyxy: (B, N, 4) boxes.
        boxes2_xyxy: (B, M, 4) boxes, same B.
        validate: refuse non-finite and degenerate boxes first, as :func:`generalized_box_iou` does
            (four host syncs). The matcher validates its inputs once at its entry and passes False.

    Returns:
        (B, N, M) GIoU in [-1, 1]; no gradient (refused for inputs that require one).
    """
    if boxes1_xyxy.dim() != 3 or boxes2_xyxy.dim() != 3 or boxes1_xyxy.shape[0] != boxes2_xyxy.shape[0]:
        raise ValueError(
            f"need boxes1_xyxy (B, N, 4) and boxes2_xyxy (B, M, 4) with the same B, got "
            f"{tuple(boxes1_xyxy.shape)} and {tuple(boxes2_xyxy.shape)}"
        )
    _check_last_dim(boxes1_xyxy, "boxes1_xyxy")
    _check_last_dim(boxes2_xyxy, "boxes2_xyxy")
    if torch.is_grad_enabled() and (boxes1_xyxy.requires_grad or boxes2_xyxy.requires_grad):
        raise ValueError(
            "batched_generalized_box_iou writes into preallocated buffers and has no gradient (it is the "
            "matcher's cost); for a loss use generalized_box_iou, or call it under torch.no_grad()"
        )
    if validate:
        check_boxes_xyxy(boxes1_xyxy, "boxes1_xyxy")
        check_boxes_xyxy(boxes2_xyxy, "boxes2_xyxy")
    x0a, y0a, x1a, y1a = boxes1_xyxy[..., None].unbind(-2)  # each (B, N, 1)
    x0b, y0b, x1b, y1b = boxes2_xyxy[:, None].unbind(-1)  # each (B, 1, M)
    area1 = (x1a - x0a) * (y1a - y0a)  # (B, N, 1)
    area2 = (x1b - x0b) * (y1b - y0b)  # (B, 1, M)
    # Four (B, N, M) buffers, written with out= and in place: at the matcher's sizes each is megabytes,
    # and a fresh tensor per operation costs page faults as well as a pass over memory.
    shape = (boxes1_xyxy.shape[0], boxes1_xyxy.shape[1], boxes2_xyxy.shape[1])
    inter, encl, tmp1, tmp2 = (boxes1_xyxy.new_empty(shape) for _ in range(4))  # each (B, N, M)
    # Intersection: (min of right edges - max of left edges), clamped at 0, times the same in y.
    torch.sub(torch.minimum(x1a, x1b, out=inter), torch.maximum(x0a, x0b, out=tmp1), out=inter).clamp_(min=0)
    torch.sub(torch.minimum(y1a, y1b, out=tmp1), torch.maximum(y0a, y0b, out=tmp2), out=tmp1).clamp_(min=0)
    inter.mul_(tmp1)  # (B, N, M)
    # The smallest box enclosing both: (max of right edges - min of left edges), clamped as torchvision.
    torch.sub(torch.maximum(x1a, x1b, out=encl), torch.minimum(x0a, x0b, out=tmp1), out=encl).clamp_(min=0)
    torch.sub(torch.maximum(y1a, y1b, out=tmp1), torch.minimum(y0a, y0b, out=tmp2), out=tmp1).clamp_(min=0)
    encl.mul_(tmp1)  # (B, N, M)
    union = torch.add(area1, area2, out=tmp1).sub_(inter)  # (B, N, M)
    iou = inter.div_(union)  # (B, N, M); overwrites inter
    return iou.sub_(torch.sub(encl, union, out=tmp2).div_(encl))  # (B, N, M): IoU - (|E| - |A u B|) / |E|


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
