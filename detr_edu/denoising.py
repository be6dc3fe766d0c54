"""Contrastive denoising (CDN): decoder queries that know the answer, and the mask that hides them.

DN-DETR (Li et al., 2022) feeds the decoder noised copies of the ground truth as extra queries and
trains it to reconstruct the originals; DINO (Zhang et al., 2022, sec. 3.3) makes it *contrastive*:
every ground-truth box gets a **positive** copy (small noise, trained to reconstruct the box and
label) and a **negative** copy (larger noise, trained to say "no object"). Written from the papers
and the study note "DETR Series 2.0" (§3 and §4.5), not copied from an implementation.

This module owns everything of contrastive denoising: the noised targets, the queries and their
attention mask (:class:`DenoisingQueries`), the bookkeeping the loss needs (:class:`DenoisingMeta`)
and the split of the decoder's outputs (:func:`split_outputs`). DINO (:mod:`detr_edu.dino`) only
concatenates the queries in front of its own and calls :func:`split_outputs`; the loss
(:meth:`detr_edu.criterion.SetCriterion.denoising_losses`) reads the :class:`DenoisingMeta`.

Layout of the Nd = 2 * groups * single_pad denoising queries of a batch (they come *before* the Nq
matching queries, see :mod:`detr_edu.dino`)::

    | group 0                         | group 1                         | ...
    | pos: single_pad | neg: single_pad | pos: single_pad | neg: single_pad | ...

Names are the official code's (``prepare_for_cdn``): ``single_pad`` is the size of one part of a
group and ``pad_size`` the total, Nd (``DenoisingMeta.pad_size``, the official ``dn_meta["pad_size"]``).
``single_pad`` is the largest number of targets of an image of the batch: an image with fewer targets
fills its remaining slots with **padded** queries (zero content, reference box (0.5, 0.5, 0.5, 0.5)
= sigmoid(0), as in the reference code, where the padding is zero in logit space).
The group count follows the official rule (IDEA-Research/DINO,
``models/dino/dn_components.py:prepare_for_cdn``; detrex's ``projects/dino/modeling/dino.py`` always
divides, ``max(1, dn_number // single_pad)``, the course's earlier rule): for ``dn_number >= 50``,
``groups = max(1, dn_number // single_pad)``, so ``dn_number`` is the number of *positive* queries
(Nd is about ``2 * dn_number``); for a smaller ``dn_number`` the official code takes
``2 * dn_number`` groups whatever the targets (its ``dn_number * 2 < 100`` branch), and so does
:func:`denoising_groups`.

Noise (DINO's rules, seeded by a :class:`torch.Generator`):

* labels: each label is redrawn uniformly from the K classes with probability
  ``label_noise_ratio * 0.5`` (so it actually changes with probability
  ``label_noise_ratio * 0.5 * (K - 1) / K``);
* boxes: every corner coordinate of the (x0, y0, x1, y1) box moves by ``s * u * half side *
  box_noise_scale`` with a random sign s, and ``u`` uniform in [0, 1) for positives, [1, 2) for
  negatives; then clamped to the image. A negative's corners may cross (x0 > x1); as in the
  official code the box is left crossed, and the decoder's reference is
  ``sigmoid(inverse_sigmoid(box, eps=1e-3))`` (DINO feeds ``inverse_sigmoid`` of the noised boxes
  to its decoder, which applies the sigmoid): every coordinate is clamped into [~0.001, ~0.999]
  and a crossed, negative width becomes ~0.001.

The label embedding has ``num_classes + 1`` rows of width C (the decoder's width, 256 in DINO):
the official ``label_enc = nn.Embedding(dn_labelbook_size + 1, hidden_dim)`` with
``dn_labelbook_size = num_classes``. Row K is never looked up by DINO (it is DN-DETR's "unknown"
class). The study note's width of 128 is wrong (chapter 07).

The self-attention mask (True = blocked) lets a denoising query see its own group and the matching
queries, and nothing else; the matching queries see only each other (:func:`denoising_attn_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from detr_edu.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from detr_edu.config import DINOConfig

__all__ = [
    "DenoisingMeta",
    "DenoisingQueries",
    "Denoiser",
    "split_outputs",
    "NoisedTargets",
    "ContrastiveDenoising",
    "denoising_groups",
    "noise_labels",
    "noise_boxes",
    "make_noised_targets",
    "denoising_attn_mask",
    "denoising_indices",
]


@dataclass
class DenoisingMeta:
    """What the denoising loss needs to know about a batch's denoising queries.

    Attributes:
        groups: number of groups.
        single_pad: queries per half-group (the largest target count of an image of the batch).
        pad_size: Nd = 2 * groups * single_pad, the number of denoising queries.
        indices: per image ``(query_idx, target_idx)`` int64 of the positive queries: the loss's
            fixed "matching" (the same for every decoder layer).
        valid: (B, Nd) bool, False for padded queries.
        positive: (Nd,) bool, True for the positive half of each group.
    """

    groups: int
    single_pad: int
    pad_size: int
    indices: list[tuple[Tensor, Tensor]]
    valid: Tensor
    positive: Tensor


@dataclass
class DenoisingQueries:
    """Extra decoder queries that know the answer, put before the Nq matching queries.

    Attributes:
        content: (B, Nd, C) content of the denoising queries (label embeddings).
        boxes_cxcywh: (B, Nd, 4) their reference boxes (noised ground truth), normalised.
        attn_mask: (Nd + Nq, Nd + Nq) bool, True = blocked, denoising queries first.
        meta: what the loss needs (:class:`DenoisingMeta`); DINO passes it on as
            ``outputs["dn_meta"]``.
    """

    content: Tensor
    boxes_cxcywh: Tensor
    attn_mask: Tensor
    meta: DenoisingMeta

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


class Denoiser(Protocol):
    """What DINO calls in training: ``denoiser(targets, num_queries=Nq) -> DenoisingQueries | None``.

    It returns ``None`` when denoising is off for this batch (e.g. no targets at all).
    """

    def __call__(self, targets: list[dict], *, num_queries: int) -> DenoisingQueries | None: ...


def split_outputs(outputs: dict, pad_size: int) -> tuple[dict, dict]:
    """Split per-query outputs into (denoising part: first ``pad_size`` queries, matching part: the rest).

    Applied to ``pred_logits``, ``pred_boxes`` and each entry of ``aux_outputs``.
    """

    def split(layer: dict) -> tuple[dict, dict]:
        dn = {k: layer[k][:, :pad_size] for k in ("pred_logits", "pred_boxes")}  # (B, Nd, .)
        match = {k: layer[k][:, pad_size:] for k in ("pred_logits", "pred_boxes")}  # (B, Nq, .)
        return dn, match

    dn, match = split(outputs)
    aux = [split(a) for a in outputs.get("aux_outputs", [])]
    dn["aux_outputs"] = [a[0] for a in aux]
    match["aux_outputs"] = [a[1] for a in aux]
    return dn, match


# Reference box of a padded denoising query: sigmoid(0) in every coordinate (the reference code
# leaves padding at zero in logit space).
PAD_BOX = 0.5
# DINO's util/misc.py:inverse_sigmoid eps, applied to the noised boxes it feeds to the decoder
DN_EPS = 1e-3


def denoising_groups(dn_number: int, single_pad: int) -> int:
    """Number of denoising groups, by DINO's rule (0 when ``single_pad`` is 0).

    ``prepare_for_cdn`` doubles ``dn_number`` (positives and negatives); from 100 on it divides by
    ``2 * single_pad``, below it keeps the doubled number as the group count::

        dn_number >= 50:  max(1, dn_number // single_pad)
        dn_number <  50:  2 * dn_number

    Args:
        dn_number: DINO's ``dn_number`` (100).
        single_pad: the largest number of targets of an image of the batch.
    """
    if dn_number < 1:
        raise ValueError(f"dn_number must be >= 1, got {dn_number}")
    if single_pad < 0:
        raise ValueError(f"single_pad must be >= 0, got {single_pad}")
    if single_pad == 0:
        return 0
    doubled = 2 * dn_number
    if doubled >= 100:
        return max(1, doubled // (2 * single_pad))
    return doubled


def noise_labels(
    labels: Tensor, *, label_noise_ratio: float, num_classes: int, generator: torch.Generator
) -> Tensor:
    """Redraw each label uniformly from ``num_classes`` with probability ``label_noise_ratio * 0.5``.

    Args:
        labels: int64 (N,) class ids.
        label_noise_ratio: DINO's ratio (0.5); the redraw probability is half of it.
        num_classes: K.
        generator: the source of randomness (CPU).

    Returns:
        int64 (N,) noised labels on ``labels.device``.
    """
    if not 0.0 <= label_noise_ratio <= 1.0:
        raise ValueError(f"label_noise_ratio must be in [0, 1], got {label_noise_ratio}")
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 (N,), got {labels.dtype} {tuple(labels.shape)}")
    N = labels.shape[0]
    redraw = torch.rand(N, generator=generator) < label_noise_ratio * 0.5  # (N,)
    random_labels = torch.randint(0, num_classes, (N,), generator=generator)  # (N,)
    return torch.where(redraw.to(labels.device), random_labels.to(labels.device), labels)  # (N,)


def noise_boxes(
    boxes_cxcywh: Tensor, negative: Tensor, *, box_noise_scale: float, generator: torch.Generator
) -> Tensor:
    """Move every corner of every box by a random signed fraction of half the box side.

    The displacement of each corner coordinate is ``sign * u * (w/2 or h/2) * box_noise_scale``
    with ``u`` in [0, 1) for positives and [1, 2) for negatives (DINO, sec. 3.3: positives lie
    within lambda_1, negatives between lambda_1 and lambda_2 = 2 lambda_1).

    Args:
        boxes_cxcywh: (N, 4) ground-truth boxes.
        negative: (N,) bool, True for negative copies.
        box_noise_scale: lambda (1.0 in DINO); 0 leaves the boxes unchanged.
        generator: the source of randomness (CPU).

    Returns:
        (N, 4) noised boxes **xyxy, unclamped and possibly crossed** (so that the bounds can be
        checked); :func:`make_noised_targets` clamps them.
    """
    if boxes_cxcywh.dim() != 2 or boxes_cxcywh.shape[-1] != 4:
        raise ValueError(f"boxes_cxcywh must be (N, 4), got {tuple(boxes_cxcywh.shape)}")
    if negative.shape != boxes_cxcywh.shape[:1] or negative.dtype != torch.bool:
        raise ValueError(
            f"negative must be bool (N,) = ({boxes_cxcywh.shape[0]},), "
            f"got {negative.dtype} {tuple(negative.shape)}"
        )
    if box_noise_scale < 0:
        raise ValueError(f"box_noise_scale must be >= 0, got {box_noise_scale}")
    N = boxes_cxcywh.shape[0]
    half_side = (boxes_cxcywh[:, 2:] / 2).repeat(1, 2)  # (N, 4): w/2, h/2, w/2, h/2
    sign = torch.randint(0, 2, (N, 4), generator=generator) * 2.0 - 1.0  # (N, 4) in {-1, 1}
    u = torch.rand(N, 4, generator=generator) + negative.cpu()[:, None].float()  # (N, 4): [0,1) or [1,2)
    shift = (sign * u).to(boxes_cxcywh) * half_side * box_noise_scale  # (N, 4)
    return box_cxcywh_to_xyxy(boxes_cxcywh) + shift  # (N, 4) xyxy


@dataclass
class NoisedTargets:
    """The denoising targets of a batch, before any embedding (what the figures draw).

    Attributes:
        labels: int64 (B, Nd) noised labels; -1 for padded queries.
        boxes_cxcywh: (B, Nd) x 4 noised reference boxes in [0, 1]; ``PAD_BOX`` for padded queries.
        valid: bool (B, Nd), False for padded queries.
        positive: bool (Nd,), True for the positive half of each group.
        groups: number of groups; single_pad: queries per part (the largest target count).
        indices: per image ``(query_idx, target_idx)`` of the positive queries (the loss's fixed
            "matching"), int64.
    """

    labels: Tensor
    boxes_cxcywh: Tensor
    valid: Tensor
    positive: Tensor
    groups: int
    single_pad: int
    indices: list[tuple[Tensor, Tensor]]

    @property
    def num_queries(self) -> int:
        return self.labels.shape[1]


def denoising_indices(
    target_counts: list[int], *, groups: int, single_pad: int
) -> list[tuple[Tensor, Tensor]]:
    """Fixed (query_idx, target_idx) pairs of the positive denoising queries, per image.

    Target j of an image is reconstructed by query ``g * 2 * single_pad + j`` of every group g.

    Args:
        target_counts: G of every image of the batch.
        groups, single_pad: see :func:`denoising_groups`.

    Returns:
        Per image, two int64 (groups * G,) tensors, like a matcher's output.
    """
    out = []
    for G in target_counts:
        if G > single_pad:
            raise ValueError(f"an image has {G} targets but single_pad is {single_pad}")
        target_idx = torch.arange(G).repeat(groups)  # (groups * G,)
        query_idx = (torch.arange(groups) * 2 * single_pad).repeat_interleave(G) + target_idx  # (groups * G,)
        out.append((query_idx, target_idx))
    return out


def make_noised_targets(
    targets: list[dict],
    *,
    dn_number: int,
    num_classes: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    generator: torch.Generator,
) -> NoisedTargets | None:
    """Positive and negative noised copies of every target, padded to the largest image.

    Args:
        targets: B dicts with ``labels`` int64 (G,) and ``boxes`` (G, 4) cxcywh.
        dn_number, num_classes, label_noise_ratio, box_noise_scale: see :class:`ContrastiveDenoising`.
        generator: the source of all the noise (CPU).

    Returns:
        A :class:`NoisedTargets`, or ``None`` when no image of the batch has a target (denoising off).
    """
    if not targets:
        raise ValueError("targets is empty: need one dict per image")
    counts = [int(t["labels"].shape[0]) for t in targets]
    for i, t in enumerate(targets):
        if t["boxes"].shape != (counts[i], 4):
            raise ValueError(
                f"targets[{i}]['boxes'] must be (G, 4) = ({counts[i]}, 4), got {tuple(t['boxes'].shape)}"
            )
    single_pad = max(counts)
    if single_pad == 0:
        return None  # no ground truth anywhere: nothing to denoise
    groups = denoising_groups(dn_number, single_pad)
    B, Nd = len(targets), 2 * groups * single_pad
    device, dtype = targets[0]["boxes"].device, targets[0]["boxes"].dtype
    # Slot s of a group: s < single_pad is the positive copy of target s, else the negative of s - single_pad.
    slot = torch.arange(Nd) % (2 * single_pad)  # (Nd,)
    positive = slot < single_pad  # (Nd,)
    target_of_slot = slot % single_pad  # (Nd,)
    labels = torch.full((B, Nd), -1, dtype=torch.int64, device=device)  # (B, Nd)
    boxes_cxcywh = torch.full((B, Nd, 4), PAD_BOX, dtype=dtype, device=device)  # (B, Nd, 4)
    valid = torch.zeros(B, Nd, dtype=torch.bool, device=device)  # (B, Nd)
    for b, t in enumerate(targets):
        G = counts[b]
        if G == 0:
            continue  # every denoising query of this image is padding
        keep = target_of_slot < G  # (Nd,) slots holding a real target of image b
        src = target_of_slot[keep]  # (2 * groups * G,) which target each real slot copies
        noisy_labels = noise_labels(
            t["labels"][src.to(device)],
            label_noise_ratio=label_noise_ratio,
            num_classes=num_classes,
            generator=generator,
        )  # (2 * groups * G,)
        noisy_xyxy = noise_boxes(
            t["boxes"][src.to(device)].to(dtype),
            ~positive[keep],
            box_noise_scale=box_noise_scale,
            generator=generator,
        )  # (2 * groups * G, 4)
        noisy_xyxy = noisy_xyxy.clamp(0.0, 1.0)  # crossed negatives stay crossed (official)
        # the decoder's reference: DINO's inverse_sigmoid (eps 1e-3) of the box, then the sigmoid
        noisy_cxcywh = inverse_sigmoid(
            box_xyxy_to_cxcywh(noisy_xyxy), eps=DN_EPS
        ).sigmoid()  # (2 * groups * G, 4)
        keep_dev = keep.to(device)
        labels[b, keep_dev] = noisy_labels
        boxes_cxcywh[b, keep_dev] = noisy_cxcywh
        valid[b, keep_dev] = True
    return NoisedTargets(
        labels=labels,
        boxes_cxcywh=boxes_cxcywh,
        valid=valid,
        positive=positive.to(device),
        groups=groups,
        single_pad=single_pad,
        indices=denoising_indices(counts, groups=groups, single_pad=single_pad),
    )


def denoising_attn_mask(
    *, groups: int, single_pad: int, num_queries: int, device: torch.device | None = None
) -> Tensor:
    """The decoder's self-attention mask with the Nd denoising queries first (True = blocked).

    Row = the query that attends, column = the key it reads:

    * matching rows never read denoising columns (they would see the answer, and they do not have
      it at inference);
    * a denoising row reads its own group and every matching column, never another group (each
      group must solve its own reconstruction, as if it were alone).

    Args:
        groups, single_pad: the layout (Nd = 2 * groups * single_pad).
        num_queries: Nq matching queries.
        device: where the mask lives.

    Returns:
        bool (Nd + Nq, Nd + Nq).
    """
    if groups < 0 or single_pad < 0 or num_queries < 0:
        raise ValueError(
            f"groups, single_pad and num_queries must be >= 0, got {groups}, {single_pad}, {num_queries}"
        )
    Nd = 2 * groups * single_pad
    group_of = torch.arange(Nd, device=device) // (2 * max(single_pad, 1))  # (Nd,)
    mask = torch.zeros(Nd + num_queries, Nd + num_queries, dtype=torch.bool, device=device)
    mask[Nd:, :Nd] = True  # matching -> denoising: blocked
    mask[:Nd, :Nd] = group_of[:, None] != group_of[None, :]  # group -> other group: blocked
    return mask  # (Nd + Nq, Nd + Nq)


class ContrastiveDenoising(nn.Module):
    """DINO's denoising-query generator; the ``denoiser`` that :class:`detr_edu.dino.DINO` calls.

    Holds the label embedding (the content of a denoising query is the embedding of its noised
    label) and a seeded generator for the noise. The generator's state is part of a training
    checkpoint (:func:`detr_edu.checkpoint.module_generators` finds it), so a resumed run draws the
    same noise as an uninterrupted one.

    Args:
        num_classes: K.
        embed_dim: C, the width of the label embedding (the decoder's width).
        dn_number: DINO's ``dn_number`` (100); groups by :func:`denoising_groups`.
        label_noise_ratio: labels are redrawn with probability half of it (DINO: 0.5).
        box_noise_scale: lambda of the box noise. This class's default, 1.0, is detrex's; the
            official DINO-4scale value, 0.4, is :class:`~detr_edu.config.DINOConfig`'s default.
        seed: seed of the noise generator.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        embed_dim: int,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or embed_dim < 1:
            raise ValueError(f"num_classes and embed_dim must be >= 1, got {num_classes}, {embed_dim}")
        denoising_groups(dn_number, 1)  # validates dn_number
        if not 0.0 <= label_noise_ratio <= 1.0 or box_noise_scale < 0:
            raise ValueError(
                "need 0 <= label_noise_ratio <= 1 and box_noise_scale >= 0, "
                f"got {label_noise_ratio}, {box_noise_scale}"
            )
        # official: nn.Embedding(dn_labelbook_size + 1, hidden_dim); row K is never looked up
        self.label_embed = nn.Embedding(num_classes + 1, embed_dim)
        self.num_classes = num_classes
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, cfg: DINOConfig, *, seed: int = 0) -> ContrastiveDenoising:
        """From a :class:`detr_edu.config.DINOConfig` (``dn_number``, ``label_noise_ratio``, ...)."""
        return cls(
            num_classes=cfg.num_classes,
            embed_dim=cfg.embed_dim,
            dn_number=cfg.dn_number,
            label_noise_ratio=cfg.label_noise_ratio,
            box_noise_scale=cfg.box_noise_scale,
            seed=seed,
        )

    def reset_parameters(self) -> None:
        """Re-draw the label embedding from the global generator (``nn.Embedding``'s own init)."""
        self.label_embed.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"dn_number={self.dn_number}, label_noise_ratio={self.label_noise_ratio}, "
            f"box_noise_scale={self.box_noise_scale}"
        )

    def forward(self, targets: list[dict], *, num_queries: int) -> DenoisingQueries | None:
        """Denoising queries for a batch, or ``None`` when the batch has no target at all.

        Args:
            targets: B dicts with ``labels`` int64 (G,) and ``boxes`` (G, 4) cxcywh.
            num_queries: Nq matching queries (for the size of the attention mask).

        Returns:
            :class:`DenoisingQueries` whose ``meta`` is a :class:`DenoisingMeta`.
        """
        noised = make_noised_targets(
            targets,
            dn_number=self.dn_number,
            num_classes=self.num_classes,
            label_noise_ratio=self.label_noise_ratio,
            box_noise_scale=self.box_noise_scale,
            generator=self.generator,
        )
        if noised is None:
            return None
        weight = self.label_embed.weight  # (K + 1, C)
        content = self.label_embed(noised.labels.clamp(min=0).to(weight.device))  # (B, Nd, C)
        content = content * noised.valid[..., None].to(content)  # padded queries: zero content
        return DenoisingQueries(
            content=content,
            boxes_cxcywh=noised.boxes_cxcywh.to(device=weight.device, dtype=weight.dtype),  # (B, Nd, 4)
            attn_mask=denoising_attn_mask(
                groups=noised.groups,
                single_pad=noised.single_pad,
                num_queries=num_queries,
                device=weight.device,
            ),  # (Nd + Nq, Nd + Nq)
            meta=DenoisingMeta(
                groups=noised.groups,
                single_pad=noised.single_pad,
                pad_size=noised.num_queries,
                indices=noised.indices,
                valid=noised.valid,
                positive=noised.positive,
            ),
        )
