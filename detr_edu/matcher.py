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

Two forms of the batch's cost, with the same numbers where they overlap:

* :meth:`HungarianMatcher.cost_matrix` (and :meth:`~HungarianMatcher.cost_terms`) is DETR's
  teaching form, the one chapter 05 builds: one (B*Nq) x (all targets of the batch) matrix, of
  which only image b's own block (Nq x G_b) is used; the off-diagonal blocks (queries of image 0
  against targets of image 1) are computed and thrown away.
* :meth:`HungarianMatcher.cost_blocks`, which :meth:`~HungarianMatcher.forward` uses, pads each
  image's targets to G_max and computes only the (B, Nq, G_max) blocks, in one batched pass
  without a Python loop over images. Every entry is computed with the same operations in the
  same order as in the batch-wide form, so the blocks are equal bit for bit and the assignments
  identical (tested, also against brute force). ``benchmarks/bench_matcher.py`` measures why:
  the batch-wide form does B times the work, and on a CPU it is slower at every size measured,
  by an order of magnitude at COCO sizes; see ``benchmarks/results/matcher.md``.

Non-finite predictions are refused with a ValueError at the public entry (``validate=True``); the
cost is never ``nan_to_num``-ed, as in the official Deformable DETR (transformers'
``DeformableDetrHungarianMatcher`` replaces NaN and inf by the largest float instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from detr_edu.box_ops import batched_generalized_box_iou, box_cxcywh_to_xyxy, generalized_box_iou
from detr_edu.targets import check_targets

__all__ = ["HungarianMatcher", "focal_class_cost", "ce_class_cost"]


def focal_class_cost(logits: Tensor, labels: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal class cost ``pos - neg`` of every query for every target's class.

    ``pos(p) = alpha (1-p)^gamma (-log p)`` is the focal loss of a logit whose target is 1,
    ``neg(p) = (1-alpha) p^gamma (-log(1-p))`` the focal loss of the same logit with target 0, so
    ``pos - neg`` is the change in the focal loss when the query's ``label`` logit is switched from
    negative to positive. ``-log p`` and ``-log(1-p)`` are computed as ``-logsigmoid(x)`` and
    ``x - logsigmoid(x)``: exact where DETR-family code adds ``1e-8`` inside the log.

    Args:
        logits: (N, K) class logits (sigmoid classification, no "no object" column).
        labels: (G,) int64 target classes in [0, K).
        alpha: focal loss weight of the positive term.
        gamma: focal loss focusing exponent.

    Returns:
        (N, G) cost, lower is better.
    """
    # Every (query, class) once, then each target's column: a class shared by several targets is
    # computed once, and the value of an entry does not depend on how the targets are laid out.
    return _focal_cost_of_logit(logits.contiguous(), alpha, gamma)[:, labels]  # (N, K) -> (N, G)


def _focal_cost_of_logit(x: Tensor, alpha: float, gamma: float) -> Tensor:
    """``pos - neg`` elementwise, any shape.

    The one formula both cost forms use. Both apply it to the (B*Nq, K) logits in the same memory
    layout and pick the targets' columns afterwards: PyTorch's vectorised ``sigmoid`` and
    ``logsigmoid`` can differ in the last bit from their scalar remainder loop, so an element's
    value may depend on its position in the tensor, and equal layouts are what keeps the two forms'
    costs (and so their assignments, ties included) identical.
    """
    # Three buffers, filled in place: at DINO's size each is megabytes, and every fresh tensor costs
    # page faults as well as a pass over memory (so p is computed twice rather than kept in a fourth).
    pos = F.logsigmoid(x)  # log p, the one log
    # -log(1 - p) = x - log p. The subtraction cancels only where x << 0, where neg is ~p^(gamma+1):
    # the cost keeps full float32 precision.
    neg = torch.sub(x, pos)
    q = x.sigmoid().neg_().add_(1.0)  # 1 - p
    pos.mul_(q.pow_(gamma)).mul_(-alpha)  # alpha (1-p)^gamma (-log p)
    p = torch.sigmoid(x, out=q)  # p, reusing the buffer
    neg.mul_(p.pow_(gamma)).mul_(1.0 - alpha)  # (1-alpha) p^gamma (-log(1-p))
    return pos.sub_(neg)


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
    class_cost_type="ce")``. Follows DETR's ``models/matcher.py`` (the matching cost, solved per
    image with ``scipy.optimize.linear_sum_assignment``), computing only each image's own block of
    the cost (:meth:`cost_blocks`) instead of DETR's batch-wide matrix (:meth:`cost_matrix`, kept
    for teaching); the assignments are the same.

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

    def _validate(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> None:
        """Every check of :meth:`_check`, with one host sync when the inputs are fine.

        :meth:`_check` reads tensor values a few times per image (each read is a host sync on a
        GPU); here the same conditions are folded into one reduction, and only when it fails does
        :meth:`_check` run, to raise the first problem with its message.
        """
        if not self._inputs_ok(outputs, targets):
            self._check(outputs, targets)  # raises

    def _num_classes(self, logits: Tensor) -> int:
        # "ce": the last logit column is "no object", which is never a target's label.
        return logits.shape[-1] - 1 if self.class_cost_type == "ce" else logits.shape[-1]

    def _inputs_ok(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> bool:
        """True exactly when :meth:`_check` would pass (same conditions, no messages)."""
        logits, boxes = outputs.get("pred_logits"), outputs.get("pred_boxes")
        if logits is None or boxes is None or logits.dim() != 3 or boxes.dim() != 3:
            return False
        if boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2] or len(targets) != logits.shape[0]:
            return False
        num_queries = logits.shape[1]
        for t in targets:  # structure only: shapes and dtypes, no tensor values read
            if "labels" not in t or "boxes" not in t:
                return False
            labels, tgt_boxes = t["labels"], t["boxes"]
            if labels.dim() != 1 or labels.dtype != torch.int64 or tgt_boxes.shape != (labels.shape[0], 4):
                return False
            if labels.shape[0] > num_queries:
                return False
        device = logits.device
        labels = torch.cat([t["labels"] for t in targets]).to(device)  # (G_total,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device)  # (G_total, 4)
        # NaN fails every comparison and inf fails <= 1, so the [0, 1] test also checks finiteness.
        ok = torch.stack(
            [
                # A sum is finite only if every term is (a false alarm from overflow only sends us to
                # _check, which then passes); 15x cheaper than isfinite().all() on DINO's logits.
                torch.isfinite(logits.sum() + boxes.sum()),
                (boxes[..., 2:] >= 0).all(),
                ((tgt_boxes >= 0) & (tgt_boxes <= 1)).all(),
                ((labels >= 0) & (labels < self._num_classes(logits))).all(),
            ]
        )  # (4,)
        return bool(ok.all())  # the one host sync

    def _check(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> None:
        """The checks one by one, raising a ValueError for the first problem found."""
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
        check_targets(targets, num_classes=self._num_classes(logits))
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
        """The three unweighted cost terms for the whole batch, each (B, Nq, G_total): the teaching form.

        Column j is the j-th target of the concatenation of all images' targets; only the block of
        image b's own targets matters for image b. This is DETR's batch-wide form, which chapter 05
        teaches and the plots of :mod:`detr_edu.viz` draw; :meth:`forward` computes only the
        per-image blocks (:meth:`cost_blocks`), with the same numbers. Computed in float32, outside
        autocast.

        Args:
            outputs, targets: as :meth:`forward`.
            validate: check predictions and targets first (see :meth:`forward`).

        Returns:
            ``{"class": ..., "bbox": ..., "giou": ...}`` where ``"giou"`` is ``-GIoU``.
        """
        if validate:
            self._validate(outputs, targets)
        logits = outputs["pred_logits"]
        B, Nq, K = logits.shape
        device = logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            # Matching decides which loss terms apply; do it in full precision even under AMP.
            logits = logits.detach().float().contiguous().flatten(0, 1)  # (B*Nq, K)
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
        """The weighted matching cost for the whole batch, (B, Nq, G_total), float32: the teaching form.

        Image b's own block is ``cost_matrix(...)[b][:, offset_b : offset_b + G_b]`` with
        ``offset_b = G_0 + ... + G_(b-1)``; it equals ``cost_blocks(...)[b, :, :G_b]`` bit for bit.
        """
        terms = self.cost_terms(outputs, targets, validate=validate)
        return (
            self.cost_class * terms["class"] + self.cost_bbox * terms["bbox"] + self.cost_giou * terms["giou"]
        )  # (B, Nq, G_total)

    @torch.no_grad()
    def cost_blocks(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *, validate: bool = True
    ) -> Tensor:
        """Each image's own weighted cost, padded to the most targets of the batch: (B, Nq, G_max).

        Image b's block is ``cost_blocks(...)[b, :, :G_b]``; the padding columns hold ``inf``. The
        targets are padded to G_max and every term is computed for all images in one batched pass,
        no loop over images: the class cost of every (query, class) once (the focal ``pos - neg``,
        or ``-softmax``), each target's class then picked with one ``gather``; the L1 cost with a
        batched ``torch.cdist``; the GIoU with :func:`~detr_edu.box_ops.batched_generalized_box_iou`.
        Every entry goes through the same operations as in :meth:`cost_matrix`, so the blocks equal
        its diagonal blocks bit for bit. This is what :meth:`forward` solves. Computed in float32,
        outside autocast.

        Args:
            outputs, targets: as :meth:`forward`.
            validate: check predictions and targets first (see :meth:`forward`).

        Returns:
            (B, Nq, G_max) cost, float32, on the predictions' device.
        """
        if validate:
            self._validate(outputs, targets)
        cost = self._padded_cost(outputs, targets)  # (B, Nq, G_max)
        device = cost.device
        sizes = torch.tensor([len(t["labels"]) for t in targets], device=device)  # (B,)
        padding = torch.arange(cost.shape[-1], device=device) >= sizes[:, None]  # (B, G_max)
        return cost.masked_fill_(padding[:, None, :], float("inf"))  # (B, Nq, G_max)

    def _padded_cost(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """:meth:`cost_blocks` without checks, its padding columns left as the cost of a dummy box."""
        logits = outputs["pred_logits"]
        B, Nq, K = logits.shape
        device = logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            # Matching decides which loss terms apply; do it in full precision even under AMP.
            logits = logits.detach().float().contiguous()  # (B, Nq, K), the layout cost_matrix uses
            boxes = outputs["pred_boxes"].detach().float()  # (B, Nq, 4)
            # Padding: label 0 and the valid box (0.5, 0.5, 0.5, 0.5), so that padded columns stay finite.
            labels = pad_sequence([t["labels"] for t in targets], batch_first=True).to(device)  # (B, G_max)
            tgt_boxes = pad_sequence([t["boxes"] for t in targets], batch_first=True, padding_value=0.5).to(
                device=device, dtype=torch.float32
            )  # (B, G_max, 4)
            G_max = labels.shape[1]
            # The class cost of every (query, class) once, then each target's class picked by gather.
            if self.class_cost_type == "focal":
                per_class = _focal_cost_of_logit(logits, self.alpha, self.gamma)  # (B, Nq, K)
            else:
                per_class = logits.softmax(-1).neg_()  # (B, Nq, K)
            cost = per_class.gather(2, labels[:, None, :].expand(B, Nq, G_max))  # (B, Nq, G_max)
            giou = batched_generalized_box_iou(
                box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes), validate=False
            )  # (B, Nq, G_max); the inputs were checked once, at the entry
            # cost_matrix's sum, (class + bbox) + giou term, computed in place: the same numbers.
            cost.mul_(self.cost_class).add_(torch.cdist(boxes, tgt_boxes, p=1).mul_(self.cost_bbox))
            return cost.add_(giou.mul_(-self.cost_giou))  # (B, Nq, G_max)

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *, validate: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Computes each image's own cost block in one batched pass (:meth:`cost_blocks`), copies the
        blocks to the CPU once, and solves each with ``scipy.optimize.linear_sum_assignment``; the
        assignments are those of DETR's batch-wide matrix (:meth:`cost_matrix`), which is not built.

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
        if validate:
            self._validate(outputs, targets)
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        cost = self._padded_cost(outputs, targets).cpu().numpy()  # (B, Nq, G_max): the one host sync
        indices = []
        for b, num_targets in enumerate(sizes):
            query_idx, target_idx = linear_sum_assignment(cost[b, :, :num_targets])  # image b's block
            indices.append((torch.from_numpy(query_idx).long(), torch.from_numpy(target_idx).long()))
        return indices
