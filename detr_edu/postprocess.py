"""Post-processing: model outputs -> scored, labelled boxes in pixels, per image.

Sigmoid heads (Deformable DETR, DINO; and this course's DETR): every (query, class) pair is a
candidate with score ``sigmoid(logit)``; the top-k pairs over queries x classes are kept, so one
query may contribute two labels (Deformable DETR's ``PostProcess``). No NMS: the set loss already
taught the queries not to duplicate each other.

Softmax heads (the original DETR, K + 1 logits with a last "no object" column): one label per
query, the best real class, with its softmax probability.

Boxes are normalised to each image's own (unpadded) size, so they are scaled by that size, not by
the padded batch size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from detr_edu.box_ops import box_cxcywh_to_xyxy

__all__ = ["postprocess"]


def postprocess(
    outputs: dict,
    image_sizes: Tensor,
    *,
    num_top: int = 100,
    score_type: Literal["sigmoid", "softmax"] = "sigmoid",
    clip: bool = True,
) -> list[dict[str, Tensor]]:
    """Turn ``pred_logits`` / ``pred_boxes`` into detections.

    Args:
        outputs: a model's outputs (``pred_logits`` (B, Nq, K), ``pred_boxes`` (B, Nq, 4) cxcywh).
        image_sizes: (B, 2) each image's (h, w) in pixels (before padding).
        num_top: detections kept per image (sigmoid: at most Nq * K; softmax: at most Nq).
        score_type: ``"sigmoid"`` (top-k over queries x classes) or ``"softmax"`` (last logit is
            "no object"; one label per query).
        clip: clip boxes to the image.

    Returns:
        one dict per image, sorted by decreasing score: ``scores`` (n,), ``labels`` (n,) int64,
        ``boxes_xyxy_px`` (n, 4) in pixels.
    """
    logits, boxes_cxcywh = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3 or boxes_cxcywh.shape != (*logits.shape[:2], 4):
        raise ValueError(
            f"pred_logits must be (B, Nq, K) and pred_boxes (B, Nq, 4), got {tuple(logits.shape)} and "
            f"{tuple(boxes_cxcywh.shape)}"
        )
    B, Nq, K = logits.shape
    if image_sizes.shape != (B, 2):
        raise ValueError(
            f"image_sizes must be (B, 2) = ({B}, 2) rows of (h, w), got {tuple(image_sizes.shape)}"
        )
    if num_top < 1:
        raise ValueError(f"num_top must be >= 1, got {num_top}")
    if score_type == "sigmoid":
        prob = logits.sigmoid().flatten(1)  # (B, Nq*K)
        k = min(num_top, Nq * K)
        scores, flat = prob.topk(k, dim=1)  # (B, k) each, sorted
        query = torch.div(flat, K, rounding_mode="floor")  # (B, k) which query
        labels = flat % K  # (B, k) which class
    elif score_type == "softmax":
        if K < 2:
            raise ValueError("softmax scores need K + 1 >= 2 logits (the last one is 'no object')")
        prob = logits.softmax(-1)[..., :-1]  # (B, Nq, K-1) drop "no object"
        best, best_label = prob.max(-1)  # (B, Nq) each
        k = min(num_top, Nq)
        scores, query = best.topk(k, dim=1)  # (B, k)
        labels = torch.gather(best_label, 1, query)  # (B, k)
    else:
        raise ValueError(f"score_type must be 'sigmoid' or 'softmax', got {score_type!r}")
    boxes = torch.gather(boxes_cxcywh, 1, query[..., None].expand(-1, -1, 4))  # (B, k, 4)
    boxes_xyxy = box_cxcywh_to_xyxy(boxes)  # (B, k, 4) normalised
    h, w = image_sizes.to(boxes.dtype).unbind(1)  # (B,) each
    scale = torch.stack([w, h, w, h], dim=1)[:, None, :]  # (B, 1, 4)
    boxes_xyxy_px = boxes_xyxy * scale  # (B, k, 4) pixels
    if clip:
        boxes_xyxy_px = torch.minimum(boxes_xyxy_px.clamp(min=0), scale)  # (B, k, 4)
    return [{"scores": scores[b], "labels": labels[b], "boxes_xyxy_px": boxes_xyxy_px[b]} for b in range(B)]
