"""Deformable DETR (Zhu et al. 2021), from the course's blocks, with its two ablation flags.

The forward pass, as the study note "DETR Series 2.0" lists it (§2.2), one line each in
:meth:`DeformableDETR.forward_features`:

1. backbone + neck: L levels (B, C, H_l, W_l) and their padding masks (:mod:`detr_edu.backbone`);
2. sine positions of each level (pixel-centre convention, ``offset=-0.5``, temperature 10000) plus a learnable
   level embedding, all flattened into one sequence
   (:class:`~detr_edu.deformable_transformer.MultiScaleEncoder`, shared with DINO);
3. the deformable encoder: every pixel attends to P points per level around itself;
4. initial queries and reference points:

   * one-stage: ``nn.Embedding(Nq, 2C)`` split into query position and content, and a reference
     *point* ``sigmoid(Linear(query_pos))`` (2-d);
   * ``two_stage``: the encoder proposes boxes (:class:`detr_edu.two_stage.TwoStageProposer`),
     ranked by the encoder head's class-0 logit (trained class-agnostic); the top-K, detached,
     become 4-d reference boxes, and their sine embedding in (x, y, w, h) order
     (``get_proposal_pos_embed``), through Linear + LayerNorm, gives both query position and content;

5. the deformable decoder; with ``box_refine`` every layer refines the previous layer's box with
   its own (deep-copied) box head, the refined box -- 4-d from the first layer on, also when the
   initial reference is a point -- detached, being the next layer's reference;
6. the heads re-applied to every decoder layer's output for the (auxiliary) losses.

Outputs: ``pred_logits``, ``pred_boxes``, ``aux_outputs``, and ``enc_outputs`` with ``two_stage``
(every encoder token, as the official code: train it with ``SetCriterion(binary_enc_cls=True)``).

These are the semantics of the official code (fundamentalvision/Deformable-DETR,
``models/deformable_detr.py`` and ``models/deformable_transformer.py``) and of transformers'
``DeformableDetrForObjectDetection``, which load into this class with :func:`detr_edu.convert.from_hf`
and agree to float64 round-off (``tests/test_parity_hf.py``). ``padding_invariant=True`` switches
on the course's option: exact level masks and a masked neck (:mod:`detr_edu.backbone`) and no
proposal from padding or the border (:mod:`detr_edu.two_stage`); chapter 04 measures what it changes.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from detr_edu.backbone import Backbone, FeatureMaps
from detr_edu.config import DeformableDETRConfig
from detr_edu.deformable_transformer import DeformableDecoder, MultiScaleEncoder
from detr_edu.heads import PredictionHeads
from detr_edu.position import box_sine_embedding
from detr_edu.two_stage import TwoStageOutput, TwoStageProposer

__all__ = ["DeformableDETR"]


class DeformableDETR(nn.Module):
    """Deformable DETR with the ablation flags of its paper (Table 1): box refinement and two-stage.

    Args:
        backbone: a :class:`Backbone` whose levels (backbone + extra) number ``num_levels``.
        num_classes: K.
        embed_dim: C.
        num_heads: nh.
        num_encoder_layers, num_decoder_layers: depths.
        feedforward_dim: FFN width (1024 in the paper).
        dropout: transformer dropout.
        num_queries: Nq (300 in the paper).
        num_points: P per head and level.
        weights_from: "query" (the paper) or "content" (dot products with the samples; chapter 08, Q2).
        box_refine: iterative box refinement (one box head per decoder layer).
        two_stage: encoder proposals as the decoder's reference boxes and queries. Without
            ``box_refine`` the encoder's heads are the decoder's shared heads (official); with it,
            their own copies.
        padding_invariant: the course's option (see the module docstring); False = the published
            model.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        num_classes: int,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
        num_queries: int = 300,
        num_points: int = 4,
        weights_from: str = "query",
        box_refine: bool = False,
        two_stage: bool = False,
        padding_invariant: bool = False,
    ) -> None:
        super().__init__()
        L = backbone.num_levels
        self.backbone = backbone
        self.encoder = MultiScaleEncoder(
            num_levels=L,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_layers=num_encoder_layers,
            num_points=num_points,
            weights_from=weights_from,
            feedforward_dim=feedforward_dim,
            dropout=dropout,
        )
        self.decoder = DeformableDecoder(
            num_layers=num_decoder_layers,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=L,
            num_points=num_points,
            weights_from=weights_from,
            feedforward_dim=feedforward_dim,
            dropout=dropout,
            post_norm=False,  # Deformable DETR has no final decoder norm
        )
        # box refinement: one head pair per decoder layer (deep copies); else one shared pair. A point
        # reference's first box has no size to refine: its w, h bias starts at -2 (official init).
        self.heads = PredictionHeads(
            embed_dim=embed_dim,
            num_classes=num_classes,
            num_layers=num_decoder_layers,
            share=not box_refine,
            first_layer_wh_bias=0.0 if two_stage else -2.0,
        )
        if two_stage:
            # official: the encoder heads are clone number Ld of the decoder's (shared without refinement)
            first_class, first_box = self.heads.class_embed[0], self.heads.bbox_embed[0]
            self.proposer = TwoStageProposer(
                embed_dim=embed_dim,
                num_classes=num_classes,
                num_queries=num_queries,
                score="class0",
                exclude_invalid=padding_invariant,
                class_embed=copy.deepcopy(first_class) if box_refine else first_class,
                bbox_embed=copy.deepcopy(first_box) if box_refine else first_box,
            )
            # Deformable DETR two-stage: query position and content from the proposal box's sine embedding
            self.pos_trans = nn.Linear(2 * embed_dim, 2 * embed_dim)
            self.pos_trans_norm = nn.LayerNorm(2 * embed_dim)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * embed_dim)  # (position, content) per query
            self.reference_points = nn.Linear(embed_dim, 2)  # query position -> reference point (x, y)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        self.embed_dim = embed_dim
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.box_refine = box_refine
        self.two_stage = two_stage
        self.padding_invariant = padding_invariant

    @classmethod
    def from_config(cls, cfg: DeformableDETRConfig) -> DeformableDETR:
        """Build from a :class:`detr_edu.config.DeformableDETRConfig`."""
        return cls(
            backbone=Backbone.from_config(
                cfg.backbone, embed_dim=cfg.embed_dim, padding_invariant=cfg.padding_invariant
            ),
            num_classes=cfg.num_classes,
            embed_dim=cfg.embed_dim,
            num_heads=cfg.num_heads,
            num_encoder_layers=cfg.num_encoder_layers,
            num_decoder_layers=cfg.num_decoder_layers,
            feedforward_dim=cfg.feedforward_dim,
            dropout=cfg.dropout,
            num_queries=cfg.num_queries,
            num_points=cfg.num_points,
            weights_from=cfg.weights_from,
            box_refine=cfg.box_refine,
            two_stage=cfg.two_stage,
            padding_invariant=cfg.padding_invariant,
        )

    def forward(
        self,
        images: Tensor,
        masks: Tensor | None = None,
        *,
        targets: list[dict] | None = None,
        return_intermediates: bool = False,
    ) -> dict:
        """images (B, 3, H, W), masks (B, H, W) bool True = padding (None: no padding) -> outputs.

        Args:
            images, masks: the padded batch.
            targets: accepted so that every model is called the same way in training
                (``model(images, masks, targets=targets)``); Deformable DETR does not use them.
            return_intermediates: add ``intermediates`` (see :meth:`forward_features`).

        Returns:
            ``pred_logits`` (B, Nq, K), ``pred_boxes`` (B, Nq, 4) cxcywh, ``aux_outputs`` (earlier
            layers), ``enc_outputs`` (two-stage); with ``return_intermediates`` also
            ``intermediates`` (see :meth:`forward_features`).
        """
        return self.forward_features(self.backbone(images, masks), return_intermediates=return_intermediates)

    def forward_features(self, feature_maps: FeatureMaps, *, return_intermediates: bool = False) -> dict:
        """Everything after the backbone.

        With ``return_intermediates`` the outputs gain ``intermediates``: ``flat`` (FlatLevels),
        ``memory`` (B, Nv, C), ``inter_states`` (Ld, B, Nq, C), ``init_reference`` (B, Nq, 2|4),
        ``inter_references`` (Ld tensors (B, Nq, 2|4)), ``sampling`` (per layer (locations, weights)) and, for
        two-stage, ``enc_state`` (:class:`~detr_edu.two_stage.TwoStageOutput`) and ``enc_reference``.
        """
        enc = self.encoder(feature_maps)
        flat, memory = enc.flat, enc.memory
        B = memory.shape[0]
        first: TwoStageOutput | None = None
        if self.two_stage:
            first = self.proposer(memory, flat.mask, flat.spatial_shapes)
            # the first stage is not trained through the decoder's reference boxes
            reference = first.topk_boxes_cxcywh.detach()  # (B, Nq, 4)
            # get_proposal_pos_embed: the proposal's (x, y, w, h) in that order
            sine = box_sine_embedding(reference, num_pos_feats=self.embed_dim // 2, order="xy")  # (B, Nq, 2C)
            query_pos, query = self.pos_trans_norm(self.pos_trans(sine)).split(
                self.embed_dim, dim=-1
            )  # (B, Nq, C) x2
        else:
            query_pos, query = self.query_embed.weight.split(self.embed_dim, dim=-1)  # (Nq, C) x2
            query_pos = query_pos[None].expand(B, -1, -1)  # (B, Nq, C)
            query = query[None].expand(B, -1, -1)  # (B, Nq, C)
            reference = self.reference_points(query_pos).sigmoid()  # (B, Nq, 2) points in the image frame
        decoded = self.decoder(
            query,
            reference_points=reference,
            memory=memory,
            memory_mask=flat.mask,
            spatial_shapes=flat.spatial_shapes,
            level_start_index=flat.level_start_index,
            valid_ratios=flat.valid_ratios,
            query_pos=query_pos,
            bbox_embed=self.heads.bbox_embed if self.box_refine else None,  # Deformable DETR: box refinement
            return_sampling=return_intermediates,
        )
        inter_states = decoded.inter_states  # (Ld, B, Nq, C)
        inter_references = decoded.inter_references  # Ld x (B, Nq, 2|4)
        out = self.heads(inter_states, inter_references)
        if first is not None:
            out["enc_outputs"] = first.enc_outputs(all_tokens=True)  # official: every token, class-agnostic
        if return_intermediates:
            out["intermediates"] = {
                "flat": flat,
                "memory": memory,
                "inter_states": inter_states,
                "init_reference": reference,
                "inter_references": inter_references,
                "sampling": decoded.sampling,
                "enc_state": first,
                "enc_reference": reference if first is not None else None,
            }
        return out
