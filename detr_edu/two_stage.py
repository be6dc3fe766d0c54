"""Two-stage proposals: the encoder proposes boxes that become the decoder's reference boxes.

Deformable DETR (Zhu et al. 2021, sec. 4.1 "two-stage Deformable DETR" and appendix A.4) and DINO
(Zhang et al. 2022, sec. 3.3-3.4):

1. every valid encoder pixel gets a *proposal*: a box centred on the pixel, of side
   ``base_size * 2**level`` (0.05 of the image on the finest level, doubling per level) --
   :func:`encoder_proposals`;
2. positions that are padding, or whose proposal lies too close to the border, are *invalid*
   (the reference code keeps only boxes with every coordinate in (0.01, 0.99));
3. the memory is projected (Linear + LayerNorm), and an extra class head and box head predict a
   score per class and a box delta on top of the proposal, in inverse-sigmoid space;
4. the top-K positions are selected -- :class:`TwoStageProposer` -- ranked by

   * ``score="class0"``: the first class logit. Official Deformable DETR
     (``models/deformable_transformer.py:DeformableTransformer.forward``, ``enc_outputs_class[..., 0]``)
     and transformers: its encoder head is trained class-agnostic (every target is class 0 in the
     ``_enc`` loss), so logit 0 is an objectness score;
   * ``score="max"``: the best class logit. Official DINO (``enc_outputs_class_unselected.max(-1)``)
     and detrex.

Invalid positions, as the official code does (the default, ``exclude_invalid=False``): their memory
is zeroed and their proposal is ``inf`` in logit space, so their box is exactly 1 everywhere, and
their score stays finite -- with enough padding or border tokens they can be selected. With
``exclude_invalid=True`` (the course's option) they get a score of ``-inf`` before the top-K, so a
proposal never comes from padding, and every box stays finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from detr_edu.heads import box_from_delta, make_box_head, make_class_head
from detr_edu.masks import valid_sizes

__all__ = ["encoder_proposals", "Proposals", "TwoStageOutput", "TwoStageProposer"]


@dataclass
class Proposals:
    """One proposal per flattened encoder token.

    Attributes:
        boxes_cxcywh: (B, Nv, 4) normalised to each image's valid (unpadded) size.
        valid: (B, Nv) bool, False for padding and near-border proposals.
        level: (Nv,) long, the level of every token.
    """

    boxes_cxcywh: Tensor
    valid: Tensor
    level: Tensor


def encoder_proposals(
    padding_mask: Tensor,
    spatial_shapes: Tensor,
    *,
    base_size: float = 0.05,
    border: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> Proposals:
    """A box per encoder pixel, centred on it, its side growing by level.

    Centres are pixel centres normalised by the image's *valid* size on that level
    (``(j + 0.5) / W_valid``), so that they are in the same coordinates as the targets (normalised
    to the unpadded image).

    Args:
        padding_mask: (B, Nv) bool, True = padding (the flattened level masks).
        spatial_shapes: (L, 2) long (H_l, W_l).
        base_size: side of the proposals on level 0, as a fraction of the image.
        border: proposals with any coordinate outside (border, 1 - border) are invalid.
        dtype: of the boxes (the model's).

    Returns:
        :class:`Proposals`.
    """
    if padding_mask.dim() != 2 or padding_mask.dtype != torch.bool:
        raise ValueError(
            f"padding_mask must be (B, Nv) bool, got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2), got {tuple(spatial_shapes.shape)}")
    B, Nv = padding_mask.shape
    num_tokens = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if num_tokens != Nv:
        raise ValueError(
            f"spatial_shapes {spatial_shapes.tolist()} sum to {num_tokens} tokens but the mask has {Nv}"
        )
    device = padding_mask.device
    boxes, levels = [], []
    start = 0
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        mask_l = padding_mask[:, start : start + H * W].view(B, H, W)  # (B, H, W)
        # the flattened level masks come from a validated image mask: no rectangle check here
        valid_h, valid_w = valid_sizes(mask_l, check=False).clamp(min=1).to(dtype).unbind(-1)  # (B,) each
        ys = torch.arange(H, device=device, dtype=dtype) + 0.5  # (H,) pixel centres
        xs = torch.arange(W, device=device, dtype=dtype) + 0.5  # (W,)
        cy = ys[None, :, None] / valid_h[:, None, None]  # (B, H, 1)
        cx = xs[None, None, :] / valid_w[:, None, None]  # (B, 1, W)
        cx, cy = torch.broadcast_tensors(cx, cy)  # (B, H, W) each
        side = torch.full_like(cx, base_size * 2.0**lvl)  # (B, H, W)
        boxes.append(torch.stack([cx, cy, side, side], dim=-1).view(B, H * W, 4))  # (B, H*W, 4)
        levels.append(torch.full((H * W,), lvl, device=device, dtype=torch.long))
        start += H * W
    boxes_cxcywh = torch.cat(boxes, dim=1)  # (B, Nv, 4)
    inside = ((boxes_cxcywh > border) & (boxes_cxcywh < 1 - border)).all(-1)  # (B, Nv)
    return Proposals(boxes_cxcywh=boxes_cxcywh, valid=inside & ~padding_mask, level=torch.cat(levels))


@dataclass
class TwoStageOutput:
    """What the first stage hands to the decoder and to the loss.

    Attributes:
        memory: (B, Nv, C) projected encoder memory (Linear + LayerNorm).
        logits: (B, Nv, K) class logits of every token.
        boxes_cxcywh: (B, Nv, 4) refined proposal of every token.
        proposals: the :class:`Proposals` before refinement.
        scores: (B, Nv) selection score (class-0 or best class logit; ``-inf`` where invalid with
            ``exclude_invalid``).
        topk_index: (B, Nq) indices of the selected tokens, best first.
        topk_logits: (B, Nq, K), topk_boxes_cxcywh: (B, Nq, 4), topk_memory: (B, Nq, C) -- the
            selected rows (not detached: the encoder loss trains through them).
    """

    memory: Tensor
    logits: Tensor
    boxes_cxcywh: Tensor
    proposals: Proposals
    scores: Tensor
    topk_index: Tensor
    topk_logits: Tensor
    topk_boxes_cxcywh: Tensor
    topk_memory: Tensor

    def enc_outputs(self, *, all_tokens: bool = False) -> dict:
        """The ``enc_outputs`` entry of a model's outputs, for the ``_enc`` loss.

        Official DINO computes the encoder loss on the K selected proposals (``all_tokens=False``,
        its ``interm_outputs``); official Deformable DETR on every token (``all_tokens=True``, its
        ``enc_outputs``, with class-agnostic labels: ``SetCriterion(binary_enc_cls=True)``).
        """
        if all_tokens:
            return {"pred_logits": self.logits, "pred_boxes": self.boxes_cxcywh}
        return {"pred_logits": self.topk_logits, "pred_boxes": self.topk_boxes_cxcywh}


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, Nv, D), index (B, Nq) -> (B, Nq, D)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


class TwoStageProposer(nn.Module):
    """The first stage: project memory, score and refine every proposal, select the top K.

    Args:
        embed_dim: C.
        num_classes: K classes of the extra class head.
        num_queries: how many proposals to select.
        base_size: proposal side on level 0.
        border: see :func:`encoder_proposals`.
        score: "class0" (Deformable DETR) or "max" (DINO), see the module docstring.
        exclude_invalid: the course's option: padding and border tokens are never selected.
        class_embed, bbox_embed: the "extra pair" of heads, when the model owns them (official
            Deformable DETR without box refinement shares them with the decoder; DINO starts them
            as copies of the decoder's). None: fresh heads.
        eps: of the inverse sigmoid (used with ``exclude_invalid``; the published path takes the
            exact logit of each valid proposal).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_classes: int,
        num_queries: int,
        base_size: float = 0.05,
        border: float = 0.01,
        score: Literal["class0", "max"] = "max",
        exclude_invalid: bool = False,
        class_embed: nn.Module | None = None,
        bbox_embed: nn.Module | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if score not in ("class0", "max"):
            raise ValueError(f"score must be 'class0' or 'max', got {score!r}")
        self.memory_proj = nn.Linear(embed_dim, embed_dim)
        self.memory_norm = nn.LayerNorm(embed_dim)
        # the "extra pair" of heads on the encoder output (Deformable DETR appendix A.4)
        self.class_embed = (
            class_embed
            if class_embed is not None
            else make_class_head(embed_dim=embed_dim, num_classes=num_classes)
        )
        self.bbox_embed = bbox_embed if bbox_embed is not None else make_box_head(embed_dim=embed_dim)
        self.num_queries = num_queries
        self.base_size = base_size
        self.border = border
        self.score = score
        self.exclude_invalid = exclude_invalid
        self.eps = eps

    def forward(self, memory: Tensor, padding_mask: Tensor, spatial_shapes: Tensor) -> TwoStageOutput:
        """Score and select proposals.

        Args:
            memory: (B, Nv, C) encoder output.
            padding_mask: (B, Nv) bool, True = padding.
            spatial_shapes: (L, 2) long.

        Returns:
            :class:`TwoStageOutput`.
        """
        if memory.dim() != 3 or memory.shape[:2] != padding_mask.shape:
            raise ValueError(
                f"memory (B, Nv, C) {tuple(memory.shape)} and padding_mask (B, Nv) "
                f"{tuple(padding_mask.shape)} disagree"
            )
        proposals = encoder_proposals(
            padding_mask, spatial_shapes, base_size=self.base_size, border=self.border, dtype=memory.dtype
        )
        if self.exclude_invalid:
            num_valid = proposals.valid.sum(1)  # (B,)
            if (num_valid < self.num_queries).any():
                raise ValueError(
                    f"two-stage selection needs num_queries={self.num_queries} valid encoder positions "
                    f"per image, but an image has only {int(num_valid.min())} (images too small for this "
                    "many queries)"
                )
        elif memory.shape[1] < self.num_queries:
            raise ValueError(
                f"two-stage selection needs num_queries={self.num_queries} encoder positions, but the "
                f"batch has only {memory.shape[1]} (images too small for this many queries)"
            )
        out_memory = memory.masked_fill(~proposals.valid[..., None], 0.0)  # (B, Nv, C) invalid -> 0
        out_memory = self.memory_norm(self.memory_proj(out_memory))  # (B, Nv, C)
        logits = self.class_embed(out_memory)  # (B, Nv, K)
        delta = self.bbox_embed(out_memory)  # (B, Nv, 4)
        if self.exclude_invalid:
            boxes = box_from_delta(delta, proposals.boxes_cxcywh, eps=self.eps)  # (B, Nv, 4) finite
        else:
            # the published path: exact logits, +inf where invalid, so an invalid box is exactly 1
            p = proposals.boxes_cxcywh
            logit = torch.log(p / (1 - p)).masked_fill(
                ~proposals.valid[..., None], float("inf")
            )  # (B, Nv, 4)
            boxes = (delta + logit).sigmoid()  # (B, Nv, 4)
        scores = logits[..., 0] if self.score == "class0" else logits.max(-1).values  # (B, Nv)
        if self.exclude_invalid:
            scores = scores.masked_fill(~proposals.valid, float("-inf"))  # (B, Nv)
        topk_index = scores.topk(self.num_queries, dim=1).indices  # (B, Nq)
        return TwoStageOutput(
            memory=out_memory,
            logits=logits,
            boxes_cxcywh=boxes,
            proposals=proposals,
            scores=scores,
            topk_index=topk_index,
            topk_logits=_gather(logits, topk_index),  # (B, Nq, K)
            topk_boxes_cxcywh=_gather(boxes, topk_index),  # (B, Nq, 4)
            topk_memory=_gather(out_memory, topk_index),  # (B, Nq, C)
        )
