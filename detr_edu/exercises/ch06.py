"""Checkers for chapter 06 (losses): the focal class loss by hand, GIoU, counting the loss terms,
normalising by the number of boxes."""

from __future__ import annotations

import torch

from detr_edu import box_ops
from detr_edu.criterion import SetCriterion
from detr_edu.exercises.checking import Exercise, checker
from detr_edu.matcher import HungarianMatcher

__all__ = ["check_1", "check_2", "check_3", "check_4"]
CHAPTER = 6
WEIGHTS = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # Deformable DETR's, as in the chapter


def _criterion(num_classes: int) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, class_cost_type="focal")
    return SetCriterion(num_classes=num_classes, matcher=matcher, weight_dict=WEIGHTS)


@checker
def check_1(answer_1: float) -> None:
    """Focal loss_class with Nq = 4, K = 3, one object, every logit 0."""
    ex = Exercise(CHAPTER, 1)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    outputs = {"pred_logits": torch.zeros(1, 4, 3), "pred_boxes": torch.full((1, 4, 4), 0.3)}  # (B, Nq, K)
    expected = _criterion(3)(outputs, targets)["loss_class"].item()
    ex.number_close(
        answer_1,
        expected,
        rel_tol=1e-4,
        hint="every one of the Nq x K entries is a binary problem: one positive entry (weight alpha), "
        "the others negative (weight 1 - alpha), each times (1 - p_t)^gamma x log 2; the sum is "
        "divided by the number of boxes, not by the number of entries",
    )
    ex.correct()


@checker
def check_2(answer_2: float) -> None:
    """GIoU of (0.5, 0.5, 0.2, 0.2) and (0.8, 0.5, 0.2, 0.2) (cxcywh)."""
    ex = Exercise(CHAPTER, 2)
    boxes_xyxy = box_ops.box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.8, 0.5, 0.2, 0.2]]))
    expected = box_ops.generalized_box_iou(boxes_xyxy[:1], boxes_xyxy[1:])[0, 0].item()
    ex.number_close(
        answer_2,
        expected,
        rel_tol=1e-4,
        hint="GIoU = IoU - (|E| - |A u B|) / |E|; boxes that do not overlap get a negative GIoU, "
        "and the question asks for the GIoU, not the loss 1 - GIoU",
    )
    ex.correct()


@checker
def check_3(answer_3: int) -> None:
    """Terms returned by the criterion: 6 decoder layers, two-stage encoder losses, no denoising."""
    ex = Exercise(CHAPTER, 3)
    gen = torch.Generator().manual_seed(6)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]])}
    ]

    def layer() -> dict:  # one set of predictions: (B=1, Nq=5, K=3) logits and (B, Nq, 4) boxes
        return {
            "pred_logits": torch.randn(1, 5, 3, generator=gen),
            "pred_boxes": torch.rand(1, 5, 4, generator=gen),
        }

    outputs = {**layer(), "aux_outputs": [layer() for _ in range(5)], "enc_outputs": layer()}
    expected = len(_criterion(3)(outputs, targets))
    ex.integer(
        answer_3,
        expected,
        hint="three terms (class, L1, GIoU) for every set of predictions: each of the decoder layers "
        "(the last one without suffix) and the encoder's proposals",
    )
    ex.correct()


@checker
def check_4(answer_4: float) -> None:
    """loss_bbox of a batch of an image with 3 objects (0.3 alone) and one with 1 object (0.1 alone)."""
    ex = Exercise(CHAPTER, 4)
    centres = torch.tensor([[0.2, 0.2], [0.5, 0.5], [0.8, 0.8]])  # (3, 2) three well-separated objects
    a_boxes = torch.cat([centres, torch.full((3, 2), 0.1)], -1)  # (3, 4) cxcywh
    b_boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]])  # (1, 4)
    far = torch.tensor([[0.95, 0.05, 0.05, 0.05]])  # (1, 4) a query nothing should match
    preds_a = torch.cat([a_boxes + torch.tensor([0.1, 0.1, 0.05, 0.05]), far])  # (4, 4): L1 0.3 per box
    preds_b = torch.cat([b_boxes + torch.tensor([0.1, 0.0, 0.0, 0.0]), far.expand(3, 4)])  # (4, 4): L1 0.1
    t_a = {"labels": torch.tensor([0, 1, 2]), "boxes": a_boxes}
    t_b = {"labels": torch.tensor([1]), "boxes": b_boxes}
    criterion = _criterion(3)

    def loss_bbox(preds: list[torch.Tensor], targets: list[dict]) -> float:
        outputs = {
            "pred_logits": torch.zeros(len(preds), 4, 3),
            "pred_boxes": torch.stack(preds),
        }  # (B, Nq, ...)
        return criterion(outputs, targets)["loss_bbox"].item()

    alone = (loss_bbox([preds_a], [t_a]), loss_bbox([preds_b], [t_b]))
    if abs(alone[0] - 0.3) > 1e-5 or abs(alone[1] - 0.1) > 1e-5:
        raise RuntimeError(f"the checker's own images give {alone}, not (0.3, 0.1): please report it")
    expected = loss_bbox([preds_a, preds_b], [t_a, t_b])
    ex.number_close(
        answer_4,
        expected,
        rel_tol=1e-4,
        hint="the batch sums the L1 of every matched box and divides by the number of boxes in the "
        "batch: each box weighs the same, not each image",
    )
    ex.correct()
