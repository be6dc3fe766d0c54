"""SetCriterion: the DETR-family training losses as one dictionary of named, unweighted terms.

Follows DETR (Carion et al., 2020, §3.1 and ``models/detr.py``'s ``SetCriterion``), Deformable DETR
(Zhu et al., 2021: sigmoid focal classification, two-stage encoder losses) and DINO (Zhang et al.,
2022), written from the papers and the study note "DETR Series 2.0" (§4.2-4.5), not copied.

For every set of predictions (the last decoder layer, each earlier decoder layer, the encoder's
two-stage proposals) the criterion

1. matches predictions to ground truth with the Hungarian matcher (anew for every layer),
2. computes ``loss_class`` (all queries: matched ones towards their label, the rest towards
   "no object"), ``loss_bbox`` (L1 on cxcywh) and ``loss_giou`` (1 - GIoU on xyxy) on the matched
   pairs,
3. stores them under a suffix: none for the last layer, ``_0``, ``_1``, ... for the earlier layers
   (``aux_outputs``), ``_enc`` for the encoder proposals (``enc_outputs``).

The weights are applied outside, by :func:`weighted_total`, so every term can be logged and plotted.

Where the denoising losses go (chapter 07): :meth:`SetCriterion.forward` is the only place that
decides *which* predictions are compared with *which* targets. The per-layer maths lives in
:meth:`SetCriterion.layer_losses`, which takes precomputed indices and a normaliser, so the denoising
part (fixed indices, no matcher, normalised by ``num_boxes * groups``, keys ``_dn``, ``_dn_0``, ...)
is one more method calling :meth:`layer_losses`, and one more ``losses.update(...)`` line in
``forward``, marked below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from detr_edu import box_ops
from detr_edu.denoising import DenoisingMeta
from detr_edu.errors import NonFiniteLossError
from detr_edu.targets import check_targets

__all__ = ["SetCriterion", "num_boxes_for_loss", "weighted_total", "weight_of", "LOSS_NAMES"]

# The three terms computed for every set of predictions; suffixes name the set.
LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou")

Indices = list[tuple[Tensor, Tensor]]


class Matcher(Protocol):
    """``matcher(outputs, targets, validate=False) -> indices``, e.g.
    :class:`~detr_edu.matcher.HungarianMatcher`.

    The criterion validates predictions and targets once per call and asks the matcher not to
    check them again (``validate=False``).
    """

    def __call__(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]], *, validate: bool
    ) -> Indices: ...


def _at_least_float32(x: Tensor) -> Tensor:
    """Half-precision inputs (autocast) go up to float32 for the losses; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def num_boxes_for_loss(targets: Sequence[Mapping[str, Tensor]], device: torch.device) -> float:
    """The box-loss normaliser: ground-truth boxes in the batch, averaged over workers, at least 1.

    Under ``torch.distributed`` every worker sees a different batch; summing the counts over workers
    and dividing by the world size gives every worker the same normaliser, so the gradients that
    DDP averages weigh every box equally. The clamp keeps batches without any target finite.

    Args:
        targets: one dict per image with ``labels`` of shape (G,).
        device: where the count lives (the all-reduce needs it on the backend's device).

    Returns:
        A Python float >= 1.
    """
    count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)  # sum over workers
        count = count / torch.distributed.get_world_size()
    return max(count.item(), 1.0)


def weight_of(key: str, weight_dict: Mapping[str, float]) -> float | None:
    """The weight of ``key``: its own entry, else the longest ``_``-prefix that has one.

    ``loss_giou_dn_3`` looks up ``loss_giou_dn_3``, ``loss_giou_dn``, then ``loss_giou``; so one
    entry per base loss covers every layer, and a suffix can still be given its own weight.
    """
    parts = key.split("_")
    for end in range(len(parts), 0, -1):
        prefix = "_".join(parts[:end])
        if prefix in weight_dict:
            return float(weight_dict[prefix])
    return None


def weighted_total(losses: Mapping[str, Tensor], weight_dict: Mapping[str, float]) -> Tensor:
    """The training objective: sum of ``weight * loss`` over every term of ``losses``.

    Each key's weight is its own entry in ``weight_dict`` or, failing that, the entry of its longest
    ``_``-separated prefix (``loss_bbox_3`` -> ``loss_bbox``). A loss without any weight raises
    instead of being dropped silently (give it weight 0 to log it without training on it).

    Args:
        losses: named scalar losses, as returned by :class:`SetCriterion`.
        weight_dict: e.g. ``{"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}``.

    Returns:
        A scalar tensor.
    """
    if not losses:
        raise ValueError("weighted_total got no losses")
    missing = [k for k in losses if weight_of(k, weight_dict) is None]
    if missing:
        raise ValueError(f"no weight for losses {missing}; weight_dict has keys {sorted(weight_dict)}")
    return sum(weight_of(k, weight_dict) * v for k, v in losses.items())


class SetCriterion(nn.Module):
    """Hungarian-matched set losses for DETR, Deformable DETR and DINO.

    Args:
        num_classes: number of object classes K (ids 0..K-1); "no object" is not counted.
        matcher: ``matcher(outputs, targets) -> [(query_idx, target_idx), ...]`` per image, e.g.
            :class:`detr_edu.matcher.HungarianMatcher`.
        weight_dict: weights per loss name for :meth:`total` (see :func:`weighted_total`); must
            give a weight to ``loss_class``, ``loss_bbox`` and ``loss_giou``.
        class_loss: ``"focal"`` (sigmoid focal loss; logits have K columns, Deformable DETR / DINO)
            or ``"ce"`` (softmax cross-entropy; logits have K + 1 columns, the last is "no object",
            DETR).
        eos_coef: weight of the "no object" class in the cross-entropy (DETR: 0.1); unused by focal.
        alpha: focal loss weight of positives (0.25), ``gamma``: focusing exponent (2.0).
        binary_enc_cls: classify encoder proposals as foreground/background only: every target
            label becomes 0 for the ``_enc`` terms (the caller's targets are left unchanged).
        dn_padding_in_loss: DINO's padded denoising queries take part in ``loss_class_dn*`` as
            "no object" (True, the reference code) or are left out of every loss (False); chapter 07
            (Q5) measures the difference.
        aux_loss: supervise every decoder layer (True, DETR sec. 3.2) or only the last one
            (False: ``aux_outputs`` of the predictions and of the denoising part are ignored; the
            ablation of chapter 08).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: Matcher,
        weight_dict: Mapping[str, float],
        class_loss: str = "focal",
        eos_coef: float = 0.1,
        alpha: float = 0.25,
        gamma: float = 2.0,
        binary_enc_cls: bool = False,
        dn_padding_in_loss: bool = True,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_loss not in ("focal", "ce"):
            raise ValueError(f"class_loss must be 'focal' or 'ce', got {class_loss!r}")
        if not 0.0 <= eos_coef <= 1.0:
            raise ValueError(f"eos_coef must be in [0, 1], got {eos_coef}")
        if not 0.0 <= alpha <= 1.0 or gamma < 0.0:
            raise ValueError(f"need 0 <= alpha <= 1 and gamma >= 0, got alpha={alpha}, gamma={gamma}")
        unweighted = [name for name in LOSS_NAMES if weight_of(name, weight_dict) is None]
        if unweighted:
            raise ValueError(f"weight_dict has no weight for {unweighted}; got keys {sorted(weight_dict)}")
        bad = {k: v for k, v in weight_dict.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"weights must be finite and >= 0, got {bad}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.class_loss = class_loss
        self.eos_coef = eos_coef
        self.alpha = alpha
        self.gamma = gamma
        self.binary_enc_cls = binary_enc_cls
        self.dn_padding_in_loss = dn_padding_in_loss
        self.aux_loss = aux_loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_loss={self.class_loss!r}, eos_coef={self.eos_coef}, "
            f"alpha={self.alpha}, gamma={self.gamma}, binary_enc_cls={self.binary_enc_cls}"
        )

    # ----------------------------------------------------------------------------------------------
    # Validation at the boundary
    # ----------------------------------------------------------------------------------------------
    def _check_layer(
        self, layer_outputs: Mapping[str, Tensor], num_images: int, where: str, binary: bool
    ) -> None:
        missing = [k for k in ("pred_logits", "pred_boxes") if k not in layer_outputs]
        if missing:
            raise ValueError(f"{where} is missing {missing}; it has keys {sorted(layer_outputs)}")
        logits, boxes = layer_outputs["pred_logits"], layer_outputs["pred_boxes"]
        if (
            logits.dim() != 3
            or boxes.dim() != 3
            or boxes.shape[-1] != 4
            or logits.shape[:2] != boxes.shape[:2]
        ):
            raise ValueError(
                f"{where}: need pred_logits (B, Nq, K) and pred_boxes (B, Nq, 4) with the same B, Nq; got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        for name, value in (("pred_logits", logits), ("pred_boxes", boxes)):
            if not torch.isfinite(value).all():  # before matching: the matcher would fail obscurely
                raise NonFiniteLossError(f"{where}: {name} contains NaN or inf (diverged training?)")
        if logits.shape[0] != num_images:
            raise ValueError(f"{where} has a batch of {logits.shape[0]} but there are {num_images} targets")
        extra = 1 if self.class_loss == "ce" else 0  # CE keeps a "no object" column
        allowed = {self.num_classes + extra}
        if binary:  # a foreground/background head may have a single class column
            allowed.add(1 + extra)
        if logits.shape[-1] not in allowed:
            raise ValueError(
                f"{where}: pred_logits has {logits.shape[-1]} columns; class_loss={self.class_loss!r} with "
                f"num_classes={self.num_classes} needs {sorted(allowed)}"
            )

    @staticmethod
    def _check_indices(indices: Indices, layer_outputs: Mapping[str, Tensor], targets, where: str) -> None:
        num_queries = layer_outputs["pred_logits"].shape[1]
        if len(indices) != len(targets):
            raise ValueError(
                f"{where}: matcher returned {len(indices)} index pairs for {len(targets)} images"
            )
        for i, ((q, g), t) in enumerate(zip(indices, targets, strict=True)):
            if q.shape != g.shape or q.dim() != 1:
                raise ValueError(
                    f"{where}: image {i} has query/target indices of shapes {q.shape} and {g.shape}"
                )
            if q.numel() and (q.max() >= num_queries or g.max() >= len(t["labels"])):
                raise ValueError(f"{where}: image {i} has indices out of range ({num_queries} queries)")

    # ----------------------------------------------------------------------------------------------
    # The three terms, for one set of predictions and given indices
    # ----------------------------------------------------------------------------------------------
    def _target_classes(self, logits: Tensor, targets, indices: Indices) -> Tensor:
        """(B, Nq) int64: the matched label for matched queries, K ("no object") for the rest."""
        B, Nq, width = logits.shape
        num_classes = width - 1 if self.class_loss == "ce" else width  # K of this head
        target_classes = torch.full((B, Nq), num_classes, dtype=torch.int64, device=logits.device)  # (B, Nq)
        for b, ((q, g), t) in enumerate(zip(indices, targets, strict=True)):
            target_classes[b, q.to(logits.device)] = t["labels"].to(logits.device)[g]
        return target_classes

    def loss_class(
        self, logits: Tensor, targets, indices: Indices, num_boxes: float, query_mask: Tensor | None = None
    ) -> Tensor:
        """Classification over every query.

        ``"ce"`` (DETR): softmax cross-entropy over K + 1 classes, "no object" weighted by
        ``eos_coef`` so that the many unmatched queries do not drown the few matched ones. It is the
        weighted mean over all B * Nq queries (PyTorch's ``weight=`` convention), *not* divided by
        ``num_boxes``.

        ``"focal"`` (Deformable DETR, DINO): sigmoid focal loss (Lin et al., 2017) per (query,
        class) on one-hot targets with the "no object" column dropped (an unmatched query is the
        all-zero row: every class is a negative). The reference code averages over queries, sums
        the rest, divides by ``num_boxes`` and multiplies by Nq; mean-over-queries times Nq is just
        the sum, so the loss is ``sum over all B * Nq * K terms / num_boxes``: normalised per
        ground-truth box like the box losses, not a mean (more queries add more background terms).

        Args:
            logits: (B, Nq, K) for focal, (B, Nq, K + 1) for ce.
            query_mask: (B, Nq) bool, False = leave this query out of the loss (padded denoising
                queries, chapter 07), or None (every query counts).
        """
        logits = _at_least_float32(logits)  # losses in float32 even under autocast
        target_classes = self._target_classes(logits, targets, indices)  # (B, Nq)
        if query_mask is not None and self.class_loss == "ce":
            target_classes = target_classes.masked_fill(
                ~query_mask.to(logits.device), -100
            )  # CE's ignore_index
        if self.class_loss == "ce":
            weight = logits.new_ones(logits.shape[-1])  # (K + 1,)
            weight[-1] = self.eos_coef
            return F.cross_entropy(logits.transpose(1, 2), target_classes, weight=weight)  # (B, K+1, Nq) in
        B, Nq, K = logits.shape
        one_hot = F.one_hot(target_classes, K + 1)[..., :K].to(logits.dtype)  # (B, Nq, K), no-object dropped
        loss = sigmoid_focal_loss(logits, one_hot, alpha=self.alpha, gamma=self.gamma)  # (B, Nq, K)
        if query_mask is not None:
            loss = loss * query_mask.to(loss)[..., None]  # (B, Nq, K), masked queries add nothing
        return loss.mean(1).sum() / num_boxes * Nq  # = loss.sum() / num_boxes

    def loss_boxes(
        self, boxes_cxcywh: Tensor, targets, indices: Indices, num_boxes: float
    ) -> tuple[Tensor, Tensor]:
        """L1 on (cx, cy, w, h) and 1 - GIoU on (x0, y0, x1, y1) of the matched pairs.

        Both are summed over the matched pairs and divided by ``num_boxes``, so they are per-box
        averages (over the whole, possibly distributed, batch).

        Args:
            boxes_cxcywh: (B, Nq, 4) predicted boxes.

        Returns:
            ``(loss_bbox, loss_giou)``, two scalars.
        """
        boxes_cxcywh = _at_least_float32(boxes_cxcywh)
        device = boxes_cxcywh.device
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)  # (M,)
        query_idx = torch.cat([q for q, _ in indices]).to(device)  # (M,)
        src_cxcywh = boxes_cxcywh[batch_idx, query_idx]  # (M, 4)
        tgt_cxcywh = torch.cat([t["boxes"].to(device)[g] for t, (_, g) in zip(targets, indices, strict=True)])
        tgt_cxcywh = tgt_cxcywh.to(src_cxcywh.dtype)  # (M, 4)
        loss_bbox = F.l1_loss(src_cxcywh, tgt_cxcywh, reduction="sum") / num_boxes
        src_xyxy = box_ops.box_cxcywh_to_xyxy(src_cxcywh)  # (M, 4)
        tgt_xyxy = box_ops.box_cxcywh_to_xyxy(tgt_cxcywh)  # (M, 4)
        # 1 - GIoU of each matched pair: the diagonal of the (M, M) pairwise matrix. M is the number of
        # boxes in the batch (tens), so the wasted off-diagonal work is cheap, and unlike torchvision's
        # generalized_box_iou_loss (which adds eps=1e-7 to the areas) a perfect box gives exactly 0.
        giou = box_ops.generalized_box_iou(src_xyxy, tgt_xyxy).diagonal()  # (M,)
        loss_giou = (1.0 - giou).sum() / num_boxes
        return loss_bbox, loss_giou

    def layer_losses(
        self,
        layer_outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: Indices,
        num_boxes: float,
        suffix: str = "",
        query_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The three terms for one set of predictions, given which query matches which target.

        Taking ``indices`` and ``num_boxes`` as arguments (instead of matching here) is what lets
        the denoising losses of chapter 07 reuse this method with fixed indices.

        Args:
            layer_outputs: ``{"pred_logits": (B, Nq, K), "pred_boxes": (B, Nq, 4)}``.
            targets: one dict per image, ``labels`` (G,), ``boxes`` (G, 4) cxcywh.
            indices: per image ``(query_idx, target_idx)``, two int64 (M_b,) tensors.
            num_boxes: the normaliser (see :func:`num_boxes_for_loss`).
            suffix: appended to every key (``""``, ``"_0"``, ``"_enc"``, ...).
            query_mask: (B, Nq) bool, False = leave the query out of ``loss_class``; or None.

        Returns:
            ``{"loss_class" + suffix, "loss_bbox" + suffix, "loss_giou" + suffix}`` scalars.
        """
        loss_class = self.loss_class(layer_outputs["pred_logits"], targets, indices, num_boxes, query_mask)
        loss_bbox, loss_giou = self.loss_boxes(layer_outputs["pred_boxes"], targets, indices, num_boxes)
        return {
            f"loss_class{suffix}": loss_class,
            f"loss_bbox{suffix}": loss_bbox,
            f"loss_giou{suffix}": loss_giou,
        }

    def matched_losses(
        self,
        layer_outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        num_boxes: float,
        suffix: str = "",
    ) -> dict[str, Tensor]:
        """Match ``layer_outputs`` to ``targets`` with the matcher, then :meth:`layer_losses`."""
        where = f"outputs{suffix or ' (last layer)'}"
        num_queries, most = layer_outputs["pred_logits"].shape[1], max(len(t["labels"]) for t in targets)
        if most > num_queries:
            raise ValueError(
                f"{where}: an image has {most} targets but there are only {num_queries} queries: a "
                "one-to-one matching needs at least as many queries as targets"
            )
        with torch.no_grad():  # matching picks pairs; it is not differentiated
            indices = self.matcher(layer_outputs, targets, validate=False)  # checked once in forward
        self._check_indices(indices, layer_outputs, targets, where)
        return self.layer_losses(layer_outputs, targets, indices, num_boxes, suffix)

    def denoising_losses(
        self,
        dn_outputs: Mapping[str, object],
        targets: Sequence[Mapping[str, Tensor]],
        dn_meta: DenoisingMeta,
        num_boxes: float,
    ) -> dict[str, Tensor]:
        """DINO's contrastive denoising losses (chapter 07; DN-DETR, DINO sec. 3.3; note §4.5).

        No matcher: every positive denoising query knows its target (``dn_meta.indices``, the same
        for every decoder layer). The positives are trained towards their box and label; the
        negatives (and, with ``dn_padding_in_loss``, the padded queries) towards "no object". The
        normaliser is ``num_boxes * groups``: each target is reconstructed once per group.

        Args:
            dn_outputs: ``pred_logits`` (B, Nd, K), ``pred_boxes`` (B, Nd, 4) and ``aux_outputs``.
            targets: the batch's targets.
            dn_meta: the batch's :class:`~detr_edu.denoising.DenoisingMeta` (``indices``,
                ``groups``, ``valid``).
            num_boxes: the matching losses' normaliser.

        Returns:
            ``loss_class_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` and the same with ``_dn_0``,
            ``_dn_1``, ... for the earlier decoder layers.
        """
        if not isinstance(dn_meta, DenoisingMeta):
            raise ValueError(f"dn_meta must be a DenoisingMeta, got {type(dn_meta).__name__}")
        indices, groups = dn_meta.indices, dn_meta.groups
        query_mask = None if self.dn_padding_in_loss else dn_meta.valid  # (B, Nd) or None
        layers = [(dn_outputs, "_dn")]
        if self.aux_loss:
            layers += [(aux, f"_dn_{i}") for i, aux in enumerate(dn_outputs.get("aux_outputs", []))]
        losses: dict[str, Tensor] = {}
        for layer, suffix in layers:
            where = f"outputs['dn_outputs']{suffix}"
            self._check_layer(layer, len(targets), where, binary=False)
            self._check_indices(indices, layer, targets, where)
            losses.update(self.layer_losses(layer, targets, indices, num_boxes * groups, suffix, query_mask))
        return losses

    # ----------------------------------------------------------------------------------------------
    # Every set of predictions of a forward pass
    # ----------------------------------------------------------------------------------------------
    def forward(
        self, outputs: Mapping[str, object], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """All unweighted losses of one batch.

        Args:
            outputs: ``pred_logits`` (B, Nq, K), ``pred_boxes`` (B, Nq, 4) and optionally
                ``aux_outputs`` (a list of such dicts, earlier decoder layers first) and
                ``enc_outputs`` (such a dict for the two-stage proposals).
            targets: B dicts with ``labels`` int64 (G,) and ``boxes`` (G, 4) cxcywh; G may be 0.

        Returns:
            ``loss_class``, ``loss_bbox``, ``loss_giou``, the same with ``_0``, ``_1``, ... for every
            entry of ``aux_outputs``, with ``_enc`` for ``enc_outputs`` and with ``_dn``, ``_dn_0``,
            ... for ``dn_outputs`` (see :meth:`denoising_losses`).
        """
        if len(targets) == 0:
            raise ValueError("targets is empty: need one dict per image (an image may have no boxes)")
        check_targets(targets, num_classes=self.num_classes)
        self._check_layer(outputs, len(targets), "outputs", binary=False)
        aux_outputs = outputs.get("aux_outputs", []) if self.aux_loss else []
        for i, aux in enumerate(aux_outputs):
            self._check_layer(aux, len(targets), f"outputs['aux_outputs'][{i}]", binary=False)
        if "enc_outputs" in outputs:
            self._check_layer(
                outputs["enc_outputs"], len(targets), "outputs['enc_outputs']", self.binary_enc_cls
            )

        device = outputs["pred_logits"].device
        num_boxes = num_boxes_for_loss(targets, device)

        losses = self.matched_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(aux_outputs):  # DETR §3.2: every decoder layer, matched anew
            losses.update(self.matched_losses(aux, targets, num_boxes, suffix=f"_{i}"))
        if "enc_outputs" in outputs:  # Deformable DETR two-stage: the encoder's proposals
            enc_targets = targets
            if self.binary_enc_cls:
                # New dicts with new label tensors: the caller's targets must stay as they were
                # (the denoising losses and the next iteration still need the real labels).
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self.matched_losses(outputs["enc_outputs"], enc_targets, num_boxes, suffix="_enc"))
        if "dn_outputs" in outputs:  # DINO contrastive denoising (chapter 07): fixed indices, no matcher
            losses.update(
                self.denoising_losses(outputs["dn_outputs"], targets, outputs["dn_meta"], num_boxes)
            )

        finite = torch.isfinite(torch.stack(list(losses.values())))  # one check for every term
        if not finite.all():
            not_finite = sorted(k for k, ok in zip(losses, finite.tolist(), strict=True) if not ok)
            raise NonFiniteLossError(
                f"non-finite losses {not_finite}: the predictions are finite but the loss overflowed "
                "(huge logits? a learning rate far too high?)"
            )
        return losses

    def total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``weighted_total(losses, self.weight_dict)``: the scalar to call ``backward()`` on."""
        return weighted_total(losses, self.weight_dict)
