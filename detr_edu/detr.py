"""DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers"), from the course's blocks.

Pixels -> boxes in five steps, each a line of :meth:`DETR.forward_features`:

1. backbone + neck: one feature level (B, C, H, W) and its padding mask (B, H, W);
2. a fixed 2-D sine position embedding of the *unpadded* image (:mod:`detr_edu.position`);
3. a dense transformer encoder over the H*W tokens (every pixel attends to every pixel);
4. a dense decoder: ``num_queries`` learned object queries (``nn.Embedding`` weights used as
   the query *positions*, content starting at zero) attend to each other and to the memory;
5. a shared class head and box head on every decoder layer (auxiliary outputs). DETR has no
   reference points: the box head predicts the box directly, ``sigmoid(MLP(h))``.

The course's default head is sigmoid/focal with K logits (as the other two models); the paper's
softmax head with a K+1-th "no object" logit is ``no_object_class=True``.
"""

from __future__ import annotations

from torch import Tensor, nn

from detr_edu.backbone import Backbone, FeatureMaps
from detr_edu.config import DETRConfig
from detr_edu.heads import PredictionHeads
from detr_edu.position import PositionEmbeddingSine
from detr_edu.transformer import TransformerDecoder, TransformerEncoder

__all__ = ["DETR"]


class DETR(nn.Module):
    """DETR: single-scale dense transformer with learned queries.

    Args:
        backbone: a :class:`Backbone` with one output level and ``embed_dim`` channels.
        num_classes: K.
        embed_dim: C.
        num_heads: nh.
        num_encoder_layers, num_decoder_layers: depths.
        feedforward_dim: FFN width.
        dropout: transformer dropout.
        num_queries: Nq.
        no_object_class: add the "no object" logit (K + 1 outputs, softmax; the paper's head).
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
        dropout: float = 0.1,
        num_queries: int = 100,
        no_object_class: bool = False,
    ) -> None:
        super().__init__()
        if backbone.num_levels != 1:
            raise ValueError(f"DETR uses a single feature level, the backbone gives {backbone.num_levels}")
        self.backbone = backbone
        self.position = PositionEmbeddingSine(num_pos_feats=embed_dim // 2, normalize=True)
        self.encoder = TransformerEncoder(
            num_layers=num_encoder_layers,
            embed_dim=embed_dim,
            num_heads=num_heads,
            feedforward_dim=feedforward_dim,
            dropout=dropout,
        )
        self.decoder = TransformerDecoder(
            num_layers=num_decoder_layers,
            embed_dim=embed_dim,
            num_heads=num_heads,
            feedforward_dim=feedforward_dim,
            dropout=dropout,
            post_norm=True,
        )
        self.query_embed = nn.Embedding(num_queries, embed_dim)  # learned object queries (positions)
        self.heads = PredictionHeads(
            embed_dim=embed_dim,
            num_classes=num_classes + int(no_object_class),
            num_layers=num_decoder_layers,
            share=True,
            box_has_reference=False,
            prior_prob=1.0 / (num_classes + 1) if no_object_class else 0.01,
        )
        self.embed_dim = embed_dim
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.no_object_class = no_object_class

    @classmethod
    def from_config(cls, cfg: DETRConfig) -> DETR:
        """Build from a :class:`detr_edu.config.DETRConfig`."""
        # DETR keeps the course's padding-invariant backbone (the published DETR is not mapped here)
        backbone = Backbone.from_config(cfg.backbone, embed_dim=cfg.embed_dim, padding_invariant=True)
        return cls(
            backbone=backbone,
            num_classes=cfg.num_classes,
            embed_dim=cfg.embed_dim,
            num_heads=cfg.num_heads,
            num_encoder_layers=cfg.num_encoder_layers,
            num_decoder_layers=cfg.num_decoder_layers,
            feedforward_dim=cfg.feedforward_dim,
            dropout=cfg.dropout,
            num_queries=cfg.num_queries,
            no_object_class=cfg.no_object_class,
        )

    def forward(
        self, images: Tensor, masks: Tensor | None = None, *, targets: list[dict] | None = None
    ) -> dict:
        """images (B, 3, H, W), masks (B, H, W) bool True = padding (None: no padding) -> outputs.

        ``targets`` is accepted so that every model is called the same way in training
        (``model(images, masks, targets=targets)``); DETR does not use them.

        Returns:
            ``{"pred_logits": (B, Nq, K), "pred_boxes": (B, Nq, 4) cxcywh, "aux_outputs": [...]}``
            (K + 1 logits with ``no_object_class``).
        """
        return self.forward_features(self.backbone(images, masks))

    def forward_features(self, feature_maps: FeatureMaps) -> dict:
        """Everything after the backbone (what must not depend on padding)."""
        src = feature_maps.features[0]  # (B, C, H, W)
        mask = feature_maps.masks[0]  # (B, H, W)
        B = src.shape[0]
        pos = self.position(mask).flatten(2).transpose(1, 2)  # (B, H*W, C)
        src = src.flatten(2).transpose(1, 2)  # (B, H*W, C)
        mask = mask.flatten(1)  # (B, H*W)
        memory = self.encoder(src, pos=pos, key_padding_mask=mask)  # (B, H*W, C)
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)  # (B, Nq, C)
        content = query_pos.new_zeros(query_pos.shape)  # (B, Nq, C) DETR: content starts at zero
        inter_states = self.decoder(
            content, memory, query_pos=query_pos, memory_pos=pos, memory_key_padding_mask=mask
        )  # (Ld, B, Nq, C)
        return self.heads(inter_states, [None] * inter_states.shape[0])
