"""The Hungarian matcher: a one-to-one assignment of queries to ground-truth boxes.

DETR (Carion et al., 2020, Sec. 3.1 and ``models/matcher.py``) scores every (query, target) pair
with a matching cost and picks the assignment of minimum total cost with the Hungarian algorithm;
queries left unassigned are supervised as "no object". Deformable DETR (Zhu et al., 2021) and DINO
(Zhang et al., 2023) keep the algorithm and swap the class cost for one built from the sigmoid
focal loss. The cost of assigning query i to target j is::

    C[i, j] = cost_class * class_cost[i, j]
            + cost_bbox  * || box_i - box_j ||_1          (cxcywh, normalised)
            - cost_giou  * GIoU(box_i, box_j)              (xyxy)

with ``class_cost`` either DETR's ``-softmax(logits)[i, label_j]`` (``"ce"``) or the focal cost
``pos(p) - neg(p)`` at ``p = sigmoid(logit[i, label_j])`` (``"focal"``), where
``pos(p) = alpha (1-p)^gamma (-log p)`` and ``neg(p) = (1-alpha) p^gamma (-log(1-p))`` are the two
terms of the sigmoid focal loss. Chapter 05 shows that ``pos - neg`` is *exactly* how much the
image's total focal loss grows when query i becomes the positive for class label_j, so that
Hungarian matching on this cost minimises the real loss (the note's Q6).

The cost is built for the whole batch at once, (B*Nq) x (all targets of the batch), then split per
image, as DETR and the note do; the off-diagonal blocks (query of image 0 vs target of image 1) are
computed and thrown away. ``benchmarks/bench_matcher.py`` measures what that costs against a
per-image loop: slightly faster at the course's sizes, B times more work -- and far slower on CPU --
at DINO's COCO size (16 images x 900 queries x 50 targets); see ``benchmarks/results/matcher.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detr_edu.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from detr_edu.targets import check_targets

__all__ = ["HungarianMatcher", "focal_class_cost", "ce_class_cost"]


def focal_class_cost(logits: Tensor, labels: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal class cost ``pos - neg`` of every query for every target's class.

    ``pos(p) = alpha (1-p)^gamma (-log p)`` is the focal loss of a logit whose target is 1,
    ``neg(p) = (1-alpha) p^gamma (-log(1-p))`` the focal loss of the same logit with target 0, so
    ``pos - neg`` is the change in the focal loss when the query's ``label`` logit is switched from
    negative to positive. ``-log p`` and ``-log(1-p)`` are computed as ``softplus(-x)`` and
    ``softplus(x)``: exact where DETR-family code adds ``1e-8`` inside the log.

    Args:
        logits: (N, K) class logits (sigmoid classification, no "no object" column).
        labels: (G,) int64 target classes in [0, K).
        alpha: focal loss weight of the positive term.
        gamma: focal loss focusing exponent.

    Returns:
        (N, G) cost, lower is better.
    """
    logits = logits[:, labels]  # (N, G): the logit of each target's class, for every query
    p = logits.sigmoid()  # (N, G)
    pos = alpha * (1.0 - p) ** gamma * F.softplus(-logits)  # (N, G)   softplus(-x) = -log p
    neg = (1.0 - alpha) * p**gamma * F.softplus(logits)  # (N, G)   softplus(x) = -log(1 - p)
    return pos - neg  # (N, G)


def ce_class_cost(logits: Tensor, labels: Tensor) -> Tensor:
    """DETR's class cost ``-softmax(logits)[label]``.

    DETR uses the probability rather than the log-probability of the cross-entropy loss because
    it is bounded, like the box costs, and matched better in their experiments (DETR, Sec. 3.1).

    Args:
        logits: (N, K) logits over K-1 classes plus DETR's "no object" class in the last column.
        labels: (G,) int64 target classes in [0, K-1).

    Returns:
        (N, G) cost in [-1, 0], lower is better.
    """
    return -logits.softmax(-1)[:, labels]  # (N, G)


class HungarianMatcher(nn.Module):
    """One-to-one matching of predictions to targets, per image, at minimum total cost.

    Defaults are Deformable DETR's and DINO's (focal class cost; weights 2, 5, 2; alpha 0.25,
    gamma 2). DETR's matcher is ``HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2,
    class_cost_type="ce")``. Follows DETR's ``models/matcher.py`` (the batched cost matrix, split
    per image and solved with ``scipy.optimize.linear_sum_assignment``).

    Args:
        cost_class: weight of the class cost.
        cost_bbox: weight of the L1 distance between cxcywh boxes.
        cost_giou: weight of the negative generalized IoU.
        class_cost_type: ``"focal"`` (sigmoid logits, K classes) or ``"ce"`` (softmax logits whose
            last column is "no object").
        alpha: focal cost alpha (``"focal"`` only).
        gamma: focal cost gamma (``"focal"`` only).
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost_type: str = "focal",
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if class_cost_type not in ("focal", "ce"):
            raise ValueError(f"class_cost_type must be 'focal' or 'ce', got {class_cost_type!r}")
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class + cost_bbox + cost_giou == 0:
            raise ValueError(
                f"cost weights must be >= 0 and not all 0, got class={cost_class}, bbox={cost_bbox}, "
                f"giou={cost_giou}"
            )
        if not 0.0 <= alpha <= 1.0 or gamma < 0:
            raise ValueError(f"need 0 <= alpha <= 1 and gamma >= 0, got alpha={alpha}, gamma={gamma}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_cost_type = class_cost_type
        self.alpha = alpha
        self.gamma = gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"class_cost_type={self.class_cost_type!r}, alpha={self.alpha}, gamma={self.gamma}"
        )

    def _check(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> None:
        if "pred_logits" not in outputs or "pred_boxes" not in outputs:
            raise ValueError(f"outputs need 'pred_logits' and 'pred_boxes', got keys {sorted(outputs)}")
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if (
            logits.dim() != 3
            or boxes.dim() != 3
            or boxes.shape[-1] != 4
            or logits.shape[:2] != boxes.shape[:2]
        ):
            raise ValueError(
                "pred_logits must be (B, Nq, K) and pred_boxes (B, Nq, 4) with the same B and Nq, got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]} images")
        if not (torch.isfinite(logits).all() and torch.isfinite(boxes).all()):
            raise ValueError("pred_logits or pred_boxes contain non-finite values (NaN or inf)")
        if (boxes[..., 2:] < 0).any():
            raise ValueError("pred_boxes has negative widths or heights (boxes must be cxcywh)")
        # "ce": the last logit column is "no object", which is never a target's label.
        num_classes = logits.shape[-1] - 1 if self.class_cost_type == "ce" else logits.shape[-1]
        check_targets(targets, num_classes=num_classes)
        num_queries = logits.shape[1]
        for b, target in enumerate(targets):
            if len(target["labels"]) > num_queries:
                raise ValueError(
                    f"targets[{b}] has {len(target['labels'])} boxes but there are only {num_queries} "
                    "queries: a one-to-one matching needs at least as many queries as targets"
                )

    @torch.no_grad()
    def cost_terms(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *, validate: bool = True
    ) -> dict[str, Tensor]:
        """The three unweighted cost terms for the whole batch, each (B, Nq, G_total).

        Column j is the j-th target of the concatenation of all images' targets; only the block of
        image b's own targets matters for image b. Computed in float32, outside autocast.

        Args:
            outputs, targets: as :meth:`forward`.
            validate: check predictions and targets first (see :meth:`forward`).

        Returns:
            ``{"class": ..., "bbox": ..., "giou": ...}`` where ``"giou"`` is ``-GIoU``.
        """
        if validate:
            self._check(outputs, targets)
        logits = outputs["pred_logits"]
        B, Nq, K = logits.shape
        device = logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            # Matching decides which loss terms apply; do it in full precision even under AMP.
            logits = logits.detach().float().flatten(0, 1)  # (B*Nq, K)
            boxes = outputs["pred_boxes"].detach().float().flatten(0, 1)  # (B*Nq, 4)
            labels = torch.cat([t["labels"] for t in targets]).to(device)  # (G_total,)
            tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(
                device=device, dtype=torch.float32
            )  # (G_total, 4)
            if self.class_cost_type == "focal":
                cost_class = focal_class_cost(
                    logits, labels, alpha=self.alpha, gamma=self.gamma
                )  # (B*Nq, G_total)
            else:
                cost_class = ce_class_cost(logits, labels)  # (B*Nq, G_total)
            cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)  # (B*Nq, G_total)
            cost_giou = -generalized_box_iou(
                box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)
            )  # (B*Nq, G_total)
        G_total = labels.shape[0]
        return {
            "class": cost_class.view(B, Nq, G_total),
            "bbox": cost_bbox.view(B, Nq, G_total),
            "giou": cost_giou.view(B, Nq, G_total),
        }

    @torch.no_grad()
    def cost_matrix(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *, validate: bool = True
    ) -> Tensor:
        """The weighted matching cost for the whole batch, (B, Nq, G_total), float32."""
        terms = self.cost_terms(outputs, targets, validate=validate)
        return (
            self.cost_class * terms["class"] + self.cost_bbox * terms["bbox"] + self.cost_giou * terms["giou"]
        )  # (B, Nq, G_total)

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *, validate: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: ``pred_logits`` (B, Nq, K) and ``pred_boxes`` (B, Nq, 4) normalised cxcywh;
                other keys (``aux_outputs``, ...) are ignored.
            targets: B dicts with ``labels`` int64 (G_b,) and ``boxes`` (G_b, 4) normalised cxcywh.
            validate: check shapes, finiteness and labels first (True, the public entry point).
                :class:`~detr_edu.criterion.SetCriterion` validates once per step and passes False.

        Returns:
            B pairs ``(query_idx, target_idx)``, int64 tensors of length G_b on the CPU: query
            ``query_idx[k]`` is matched to target ``target_idx[k]``; query indices are sorted.
        """
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            if validate:
                self._check(outputs, targets)
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        cost = self.cost_matrix(outputs, targets, validate=validate).cpu()  # (B, Nq, G_total)
        indices = []
        for b, block in enumerate(cost.split(sizes, dim=-1)):  # block: (B, Nq, G_b)
            query_idx, target_idx = linear_sum_assignment(block[b].numpy())  # image b's own targets only
            indices.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64),
                    torch.as_tensor(target_idx, dtype=torch.int64),
                )
            )
        return indices
