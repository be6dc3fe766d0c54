"""DINO (Zhang et al. 2022, "DINO: DETR with Improved DeNoising Anchor Boxes"), from the course's blocks.

What DINO keeps from Deformable DETR: the backbone and neck, the multi-scale deformable encoder
(:class:`~detr_edu.deformable_transformer.MultiScaleEncoder`, shared with Deformable DETR), two-stage
proposals and box refinement.
What it adds, each a few lines of :meth:`DINO.forward_features`:

* **Mixed query selection** (sec. 3.4): the top-K encoder proposals give the decoder its reference
  boxes (detached *anchors*), while the content queries stay learnable parameters
  (``tgt_embed``). (Deformable DETR's two-stage derives the content from the proposals too;
  ``mixed_query_selection=False`` gives "pure query selection": content = the selected, detached
  encoder features.)
* **Query position from the box** (DAB-DETR): every decoder layer recomputes its query position
  from its current reference box (:class:`~detr_edu.position.QueryPositionFromBox`).
* **Look forward twice** (sec. 3.5): layer i's box loss also trains layer i - 1 through the
  undetached previous box (:class:`~detr_edu.deformable_transformer.DeformableDecoder`).
* **Contrastive denoising** (sec. 3.3) plugs in through
  :class:`~detr_edu.denoising.DenoisingQueries`, built by
  :class:`detr_edu.denoising.ContrastiveDenoising` (chapter 07); everything of denoising lives in
  :mod:`detr_edu.denoising`.

Official semantics (IDEA-Research/DINO, ``models/dino/dino.py`` and
``models/dino/deformable_transformer.py`` with ``config/DINO/DINO_4scale.py``) are the default:

* one class head and one box head **shared by every decoder layer** (``dec_pred_class_embed_share``
  and ``dec_pred_bbox_embed_share`` are True); the encoder's pair starts as copies of them
  (``two_stage_*_embed_share`` False). detrex's DINO gives every layer its own pair.
* the image sine embedding with **temperature 20 and no -0.5 offset** (``PositionEmbeddingSineHW``);
  detrex uses Deformable DETR's (10000, -0.5).
* proposals ranked by their **best class** logit; padding and border tokens are not excluded.
* the refinement box that steers the next layer is predicted from the decoder layer's raw output,
  the boxes for the loss from the normalised one; the query position is computed from the
  reference in level 0's padded frame; logits of references use ``inverse_sigmoid`` with eps 1e-3.

``padding_invariant=True`` is the course's option (exact level masks, masked neck, no proposal from
padding or the border, query positions in the image frame); chapter 04 measures it.

The denoising hook. ``forward(images, masks, targets=targets)`` asks ``self.denoiser`` (a module
given at construction, chapter 07's generator, only in training mode) for a
:class:`~detr_edu.denoising.DenoisingQueries`;
a caller can also pass ``denoising=`` directly (e.g. to perturb the denoising queries). The Nd
denoising queries are put *before* the Nq matching queries: their content and reference boxes are
concatenated, the decoder's self-attention uses ``attn_mask`` ((Nd + Nq)^2, True = blocked), and the
outputs are split again -- the last Nq rows are the usual outputs, the first Nd rows go to
``outputs["dn_outputs"]`` (same keys, with its own ``aux_outputs``) and ``denoising.meta`` (a
:class:`~detr_edu.denoising.DenoisingMeta`) to ``outputs["dn_meta"]`` for the loss.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from detr_edu.backbone import Backbone, FeatureMaps
from detr_edu.config import DINOConfig
from detr_edu.deformable_transformer import DeformableDecoder, MultiScaleEncoder
from detr_edu.denoising import DenoisingQueries, split_outputs
from detr_edu.heads import PredictionHeads
from detr_edu.position import QueryPositionFromBox
from detr_edu.targets import check_targets
from detr_edu.two_stage import TwoStageProposer

__all__ = ["DINO", "INVERSE_SIGMOID_EPS"]

#: DINO's ``util/misc.py:inverse_sigmoid`` clamps at 1e-3 (Deformable DETR's at 1e-5).
INVERSE_SIGMOID_EPS = 1e-3


class DINO(nn.Module):
    """DINO: two-stage, box refinement, mixed query selection, look forward twice; denoising hook.

    Args:
        backbone: a :class:`Backbone` (L levels).
        num_classes: K.
        embed_dim: C.
        num_heads: nh.
        num_encoder_layers, num_decoder_layers: depths.
        feedforward_dim: FFN width (2048 in DINO).
        dropout: transformer dropout (0.0 in DINO).
        num_queries: Nq matching queries (900 in DINO).
        num_points: P per head and level.
        weights_from: "query" (the paper) or "content" (dot products with the samples; chapter 08, Q2).
        look_forward_twice: DINO's gradient path for refined boxes.
        mixed_query_selection: learnable content queries (True, DINO) or content from the selected
            encoder features (False, "pure query selection").
        denoiser: chapter 07's denoising-query generator, called in training mode when targets are
            given; None disables denoising.
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
        feedforward_dim: int = 2048,
        dropout: float = 0.0,
        num_queries: int = 900,
        num_points: int = 4,
        weights_from: str = "query",
        look_forward_twice: bool = True,
        mixed_query_selection: bool = True,
        denoiser: nn.Module | None = None,
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
            pos_temperature=20.0,  # official DINO: PositionEmbeddingSineHW(temperatureH=W=20)
            pos_offset=0.0,
        )
        # official DINO: one class head and one box head shared by every decoder layer
        self.heads = PredictionHeads(
            embed_dim=embed_dim,
            num_classes=num_classes,
            num_layers=num_decoder_layers,
            share=True,
            eps=INVERSE_SIGMOID_EPS,
        )
        self.proposer = TwoStageProposer(
            embed_dim=embed_dim,
            num_classes=num_classes,
            num_queries=num_queries,
            score="max",
            exclude_invalid=padding_invariant,
            # the encoder's pair starts as copies of the decoder's (two_stage_*_embed_share = False)
            class_embed=copy.deepcopy(self.heads.class_embed[0]),
            bbox_embed=copy.deepcopy(self.heads.bbox_embed[0]),
            eps=INVERSE_SIGMOID_EPS,
        )
        # DINO: mixed query selection -- content queries stay learnable (anchors come from proposals)
        self.tgt_embed = nn.Embedding(num_queries, embed_dim) if mixed_query_selection else None
        self.decoder = DeformableDecoder(
            num_layers=num_decoder_layers,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=L,
            num_points=num_points,
            weights_from=weights_from,
            feedforward_dim=feedforward_dim,
            dropout=dropout,
            post_norm=True,  # DINO normalises every returned decoder state
            query_pos_frame="image" if padding_invariant else "level0",
            eps=INVERSE_SIGMOID_EPS,
        )
        self.query_pos_head = QueryPositionFromBox(
            embed_dim=embed_dim, box_dim=4
        )  # DAB/DINO: box -> query_pos
        self.denoiser = denoiser
        self.padding_invariant = padding_invariant
        self.embed_dim = embed_dim
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.look_forward_twice = look_forward_twice
        self.mixed_query_selection = mixed_query_selection

    @classmethod
    def from_config(cls, cfg: DINOConfig, *, denoiser: nn.Module | None = None) -> DINO:
        """Build from a :class:`detr_edu.config.DINOConfig`.

        Contrastive denoising is on only when a denoiser is given, e.g.
        ``DINO.from_config(cfg, denoiser=ContrastiveDenoising.from_config(cfg))`` with
        :class:`detr_edu.denoising.ContrastiveDenoising` (chapter 07), which reads ``cfg.dn_number``,
        ``cfg.label_noise_ratio`` and ``cfg.box_noise_scale``.
        """
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
            look_forward_twice=cfg.look_forward_twice,
            mixed_query_selection=cfg.mixed_query_selection,
            denoiser=denoiser,
            padding_invariant=cfg.padding_invariant,
        )

    def forward(
        self,
        images: Tensor,
        masks: Tensor | None = None,
        *,
        targets: list[dict] | None = None,
        denoising: DenoisingQueries | None = None,
        return_intermediates: bool = False,
    ) -> dict:
        """images (B, 3, H, W), masks (B, H, W) bool True = padding (None: no padding) -> outputs.

        Args:
            images, masks: the padded batch.
            targets: ground truth, used only to build denoising queries (training mode + denoiser).
            denoising: explicit denoising queries (overrides the denoiser).
            return_intermediates: add ``intermediates`` (see :meth:`forward_features`).

        Returns:
            ``pred_logits`` (B, Nq, K), ``pred_boxes`` (B, Nq, 4), ``aux_outputs``, ``enc_outputs``;
            with denoising also ``dn_outputs`` and ``dn_meta``.
        """
        feature_maps = self.backbone(images, masks)
        if denoising is None and targets is not None and self.denoiser is not None and self.training:
            # the label embedding would fail deep inside F.embedding on an id outside [0, K)
            check_targets(targets, num_classes=self.num_classes)
            denoising = self.denoiser(targets, num_queries=self.num_queries)
        return self.forward_features(
            feature_maps, denoising=denoising, return_intermediates=return_intermediates
        )

    def forward_features(
        self,
        feature_maps: FeatureMaps,
        *,
        denoising: DenoisingQueries | None = None,
        return_intermediates: bool = False,
    ) -> dict:
        """Everything after the backbone (see the module docstring for the denoising hook).

        With ``return_intermediates`` the outputs gain ``intermediates``: ``flat``, ``memory``,
        ``enc_state`` (:class:`~detr_edu.two_stage.TwoStageOutput`), ``enc_reference`` (B, Nq, 4),
        ``init_reference`` (B, Nd + Nq, 4), ``inter_states`` (Ld, B, Nd + Nq, C),
        ``inter_references`` (Ld tensors (B, Nd + Nq, 4)) and ``sampling`` (per layer (locations, weights)).
        """
        enc = self.encoder(feature_maps)
        flat, memory = enc.flat, enc.memory
        B = memory.shape[0]
        first = self.proposer(memory, flat.mask, flat.spatial_shapes)
        # DINO: mixed query selection -- positions from the top-K proposals, detached (anchors) ...
        reference = first.topk_boxes_cxcywh.detach()  # (B, Nq, 4)
        if self.tgt_embed is not None:
            # ... content from learnable embeddings
            query = self.tgt_embed.weight[None].expand(B, -1, -1)  # (B, Nq, C)
        else:
            query = first.topk_memory.detach()  # (B, Nq, C) pure query selection
        attn_mask = None
        pad_size = 0
        if denoising is not None:
            pad_size = self._check_denoising(denoising, B)
            query = torch.cat([denoising.content, query], dim=1)  # (B, Nd + Nq, C)
            reference = torch.cat([denoising.boxes_cxcywh, reference], dim=1)  # (B, Nd + Nq, 4)
            attn_mask = denoising.attn_mask  # (Nd + Nq, Nd + Nq)
        decoded = self.decoder(
            query,
            reference_points=reference,
            memory=memory,
            memory_mask=flat.mask,
            spatial_shapes=flat.spatial_shapes,
            level_start_index=flat.level_start_index,
            valid_ratios=flat.valid_ratios,
            self_attn_mask=attn_mask,
            bbox_embed=self.heads.bbox_embed,  # box refinement
            look_forward_twice=self.look_forward_twice,  # DINO: look forward twice
            query_pos_from_ref=self.query_pos_head,
            return_sampling=return_intermediates,
        )
        inter_states = decoded.inter_states  # (Ld, B, Nd + Nq, C)
        inter_references = decoded.inter_references  # Ld x (B, Nd + Nq, 4)
        out = self.heads(inter_states, inter_references)
        if denoising is not None:
            dn_out, out = split_outputs(out, pad_size)
            out["dn_outputs"] = dn_out
            out["dn_meta"] = denoising.meta
        out["enc_outputs"] = first.enc_outputs()
        if return_intermediates:
            out["intermediates"] = {
                "flat": flat,
                "memory": memory,
                "enc_state": first,
                "enc_reference": first.topk_boxes_cxcywh.detach(),
                "init_reference": reference,
                "inter_states": inter_states,
                "inter_references": inter_references,
                "sampling": decoded.sampling,
            }
        return out

    def _check_denoising(self, dn: DenoisingQueries, batch_size: int) -> int:
        Nd, C, Nq = dn.num_queries, self.embed_dim, self.num_queries
        if dn.content.shape != (batch_size, Nd, C):
            raise ValueError(
                f"denoising.content must be (B, Nd, C) = ({batch_size}, Nd, {C}), "
                f"got {tuple(dn.content.shape)}"
            )
        if dn.boxes_cxcywh.shape != (batch_size, Nd, 4):
            raise ValueError(
                f"denoising.boxes_cxcywh must be (B, Nd, 4) = ({batch_size}, {Nd}, 4), "
                f"got {tuple(dn.boxes_cxcywh.shape)}"
            )
        if dn.attn_mask.shape != (Nd + Nq, Nd + Nq) or dn.attn_mask.dtype != torch.bool:
            raise ValueError(
                f"denoising.attn_mask must be bool (Nd + Nq, Nd + Nq) = ({Nd + Nq}, {Nd + Nq}), got "
                f"{dn.attn_mask.dtype} {tuple(dn.attn_mask.shape)}"
            )
        return Nd
