"""The two layers of the deformable transformer (Deformable DETR, Zhu et al. 2021, sec. 4.1).

* :class:`DeformableEncoderLayer` -- every pixel of every level is a query: deformable
  self-attention over the whole pyramid, then an FFN, each followed by a LayerNorm (post-norm);
* :class:`DeformableDecoderLayer` -- the few object queries attend to each other densely
  (optionally masked: DINO's denoising groups), then read the memory through deformable
  cross-attention around their reference points, then an FFN; post-norm after each.

The stacks that run them, with reference points, refinement and look forward twice, are in
:mod:`detr_edu.deformable_transformer`.
"""

from __future__ import annotations

from torch import Tensor, nn

from detr_edu.attention import MultiheadAttention
from detr_edu.deformable import MultiScaleDeformableAttention
from detr_edu.transformer import FFN

__all__ = ["DeformableEncoderLayer", "DeformableDecoderLayer"]


class DeformableEncoderLayer(nn.Module):
    """Deformable encoder layer: deformable self-attention over all levels, norm, FFN, norm (post-norm).

    Every pixel of every level is a query; its reference point is its own centre (on every level, see
    :func:`~detr_edu.levels.encoder_reference_points`); the value is the whole flattened pyramid.

    Args:
        embed_dim: C.
        num_heads: nh.
        num_levels: L.
        num_points: P sampling points per head and level.
        weights_from: "query" (the paper) or "content" (dot products with the samples; chapter 08, Q2).
        feedforward_dim: FFN hidden width (Deformable DETR: 1024).
        dropout: after attention and in the FFN.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        weights_from: str = "query",
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            weights_from=weights_from,
            dropout=dropout,
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim=embed_dim, feedforward_dim=feedforward_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        src: Tensor,
        *,
        pos: Tensor | None,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """src (B, Nv, C), pos (B, Nv, C), reference_points (B, Nv, L, 2), mask (B, Nv) -> (B, Nv, C)."""
        src = self.self_attn(
            src,
            value=src,
            query_pos=pos,
            key_padding_mask=key_padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )  # (B, Nv, C) = src + dropout(attn)
        src = self.norm1(src)  # (B, Nv, C)
        return self.norm2(self.ffn(src))  # (B, Nv, C)


class DeformableDecoderLayer(nn.Module):
    """Deformable decoder layer: dense self-attention, norm, deformable cross-attention, norm, FFN, norm.

    The queries are few (Nq = 100-900), so they attend to each other densely (optionally masked: DINO's
    denoising groups pass ``self_attn_mask``); they read the memory through deformable attention around
    their reference points.

    Args: as :class:`DeformableEncoderLayer`.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        weights_from: str = "query",
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(
            embed_dim=embed_dim, num_heads=num_heads, attn_drop=dropout, proj_drop=dropout
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            weights_from=weights_from,
            dropout=dropout,
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim=embed_dim, feedforward_dim=feedforward_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        query: Tensor,
        *,
        query_pos: Tensor | None,
        reference_points: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        self_attn_mask: Tensor | None = None,
        return_sampling: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """One decoder step.

        Args:
            query: (B, Nq, C).
            query_pos: (B, Nq, C) or None.
            reference_points: (B, Nq, L, 2 or 4) already in each level's padded frame
                (:func:`~detr_edu.levels.decoder_reference_points`).
            memory: (B, Nv, C) encoder output.
            memory_mask: (B, Nv) bool, True = padding, or None.
            spatial_shapes: (L, 2) long; level_start_index: (L,) long.
            self_attn_mask: (Nq, Nq) bool, True = blocked, or None.
            return_sampling: also return the cross-attention's sampling locations (B, Nq, nh, L, P, 2)
                and weights (B, Nq, nh, L, P).

        Returns:
            ``(query (B, Nq, C), sampling)`` with ``sampling = (locations, weights)`` when
            ``return_sampling``, else None.
        """
        query = self.self_attn(
            query, query_pos=query_pos, key_pos=query_pos, attn_mask=self_attn_mask
        )  # (B, Nq, C)
        query = self.norm1(query)  # (B, Nq, C)
        out = self.cross_attn(
            query,
            value=memory,
            query_pos=query_pos,
            key_padding_mask=memory_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            return_sampling=return_sampling,
        )
        query, sampling = (out[0], (out[1], out[2])) if return_sampling else (out, None)  # (B, Nq, C)
        query = self.norm2(query)  # (B, Nq, C)
        query = self.norm3(self.ffn(query))  # (B, Nq, C)
        return query, sampling
