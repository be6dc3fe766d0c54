"""Prediction heads: a class head (one Linear) and a box head (3-layer MLP) per decoder layer.

Deformable DETR (Zhu et al. 2021, sec. 4.1 and appendix A.4) and DINO (Zhang et al. 2022) predict
a box as a *delta in inverse-sigmoid space* added to the layer's reference:
``box = sigmoid(bbox_embed(h) + inverse_sigmoid(reference))``. With 2-d reference points only the
centre gets the offset; without a reference (DETR) the box is simply ``sigmoid(bbox_embed(h))``.

* ``share=True``: one class head and one box head serve every decoder layer (DETR, plain
  Deformable DETR); the ``ModuleList`` holds the same module L times.
* ``share=False``: deep copies, one pair per layer (box refinement: each layer refines the box of
  the layer before with its own head, like the stages of Cascade R-CNN).

Initialisation (as the official Deformable DETR, ``models/deformable_detr.py:DeformableDETR.__init__``):
the class bias starts at ``-log((1 - p) / p)`` with p = 0.01, so that the sigmoid focal loss starts
with every query saying "background"; the box head's last layer starts at zero, so that a layer's
first prediction *is* its reference. Where the first layer's reference is a *point* (one-stage
Deformable DETR) or there is none (DETR), its height/width bias starts at -2 (boxes of
sigmoid(-2) ~ 0.12 of the image): ``first_layer_wh_bias=-2``. With deep copies only layer 0's head
gets it (the official code sets it on ``bbox_embed[0]`` after cloning); two-stage and DINO keep 0.
"""

from __future__ import annotations

import copy
import math

from torch import Tensor, nn

from detr_edu.box_ops import apply_box_delta
from detr_edu.transformer import MLP

__all__ = ["make_class_head", "make_box_head", "box_from_delta", "PredictionHeads"]


def make_class_head(*, embed_dim: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    """``Linear(C, K)`` with the focal-loss prior bias ``-log((1 - p) / p)`` (RetinaNet, Lin et al. 2017)."""
    head = nn.Linear(embed_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
    return head


def make_box_head(*, embed_dim: int, num_layers: int = 3) -> MLP:
    """3-layer MLP ``C -> C -> C -> 4`` whose last layer starts at zero (predicts zero deltas)."""
    head = MLP(input_dim=embed_dim, hidden_dim=embed_dim, output_dim=4, num_layers=num_layers)
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return head


def _last_linear(head: nn.Module) -> nn.Linear:
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1]


def box_from_delta(delta: Tensor, reference: Tensor | None, *, eps: float = 1e-5) -> Tensor:
    """Box from a head's output: ``sigmoid(delta + inverse_sigmoid(reference))``.

    The reference case is :func:`detr_edu.box_ops.apply_box_delta` (chapter 03);
    ``reference=None`` (DETR, no reference) gives ``sigmoid(delta)``.

    Args:
        delta: (..., 4) box head output (logit space).
        reference: (..., 4) normalised box, (..., 2) normalised point (only the centre is offset),
            or None.
        eps: of the inverse sigmoid (Deformable DETR 1e-5, DINO 1e-3).

    Returns:
        (..., 4) normalised cxcywh.
    """
    if reference is None:
        return delta.sigmoid()  # (..., 4)
    return apply_box_delta(delta, reference, eps=eps)  # (..., 4)


class PredictionHeads(nn.Module):
    """Class and box heads for every decoder layer, shared or deep-copied.

    Args:
        embed_dim: C.
        num_classes: K (logits per query; sigmoid, no "no object" column unless the caller adds one).
        num_layers: decoder layers.
        share: one pair for all layers (True) or a deep copy per layer (False, box refinement).
        prior_prob: initial foreground probability of the class head.
        box_has_reference: whether boxes are predicted relative to reference points. If False (DETR),
            the box head's height/width bias starts at -2.
        first_layer_wh_bias: initial height/width bias of layer 0's box head (-2 where layer 0's
            reference is a point: one-stage Deformable DETR; see the module docstring).
        eps: of the inverse sigmoid that puts a reference into logit space.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_classes: int,
        num_layers: int,
        share: bool,
        prior_prob: float = 0.01,
        box_has_reference: bool = True,
        first_layer_wh_bias: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        class_head = make_class_head(embed_dim=embed_dim, num_classes=num_classes, prior_prob=prior_prob)
        box_head = make_box_head(embed_dim=embed_dim)
        wh_bias = -2.0 if not box_has_reference else first_layer_wh_bias
        if share:
            self.class_embed = nn.ModuleList([class_head] * num_layers)
            self.bbox_embed = nn.ModuleList([box_head] * num_layers)
        else:
            self.class_embed = nn.ModuleList([copy.deepcopy(class_head) for _ in range(num_layers)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(box_head) for _ in range(num_layers)])
        if wh_bias:
            nn.init.constant_(_last_linear(self.bbox_embed[0]).bias[2:], wh_bias)
        self.eps = eps
        self.num_layers = num_layers
        self.share = share

    def forward(self, inter_states: Tensor, references: list[Tensor | None]) -> dict:
        """Predict from every decoder layer.

        Args:
            inter_states: (Ld, B, Nq, C) every decoder layer's output (normalised).
            references: Ld tensors (B, Nq, 2|4) -- the reference each layer's box is a delta of
                (for box refinement: the previous layer's box) -- or Ld ``None`` (DETR).

        Returns:
            ``{"pred_logits": (B, Nq, K), "pred_boxes": (B, Nq, 4), "aux_outputs": [...]}`` with the
            last layer at the top level and every earlier layer in ``aux_outputs``.
        """
        if inter_states.dim() != 4 or inter_states.shape[0] != self.num_layers:
            raise ValueError(
                f"inter_states must be (Ld={self.num_layers}, B, Nq, C), got {tuple(inter_states.shape)}"
            )
        if len(references) != self.num_layers:
            raise ValueError(f"need {self.num_layers} references (one per layer), got {len(references)}")
        layers = []
        for i, (h, ref) in enumerate(zip(inter_states, references, strict=True)):
            logits = self.class_embed[i](h)  # (B, Nq, K)
            boxes = box_from_delta(self.bbox_embed[i](h), ref, eps=self.eps)  # (B, Nq, 4)
            layers.append({"pred_logits": logits, "pred_boxes": boxes})
        out = dict(layers[-1])
        out["aux_outputs"] = layers[:-1]
        return out
