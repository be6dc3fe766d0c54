"""The deformable transformer's stacks: encoder, decoder with refinement, and the multi-scale encoder.

Deformable DETR (Zhu et al., ICLR 2021, arXiv:2010.04159, Sec. 4.1 and Appendix A) and DINO
(Zhang et al. 2022, Sec. 3.4-3.5) share these parts; each model composes them:

* :class:`DeformableEncoder` -- ``num_layers`` :class:`~detr_edu.deformable_layers.DeformableEncoderLayer`
  s over the flattened pyramid, with every pixel's centre as its reference point;
* :class:`DeformableDecoder` -- ``num_layers`` :class:`~detr_edu.deformable_layers.DeformableDecoderLayer`
  s with optional iterative box refinement, look forward twice and query positions from the
  reference; it returns a :class:`DecoderOutput`;
* :class:`MultiScaleEncoder` -- sine positions + level embedding + :func:`~detr_edu.levels.flatten_levels`
  + :class:`DeformableEncoder`: what both models run after the backbone.

The frames (image frame vs each level's padded frame) and the valid ratios that convert between
them are explained in :mod:`detr_edu.levels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from detr_edu.backbone import FeatureMaps
from detr_edu.box_ops import apply_box_delta
from detr_edu.deformable_layers import DeformableDecoderLayer, DeformableEncoderLayer
from detr_edu.levels import FlatLevels, decoder_reference_points, encoder_reference_points, flatten_levels
from detr_edu.position import LevelEmbedding, sine_position_embedding

__all__ = [
    "DeformableEncoder",
    "DecoderOutput",
    "DeformableDecoder",
    "EncoderOutput",
    "MultiScaleEncoder",
]


class DeformableEncoder(nn.Module):
    """``num_layers`` :class:`DeformableEncoderLayer` s; computes the reference points once.

    Args:
        num_layers: depth (Deformable DETR / DINO: 6).
        embed_dim, num_heads, num_levels, num_points, weights_from, feedforward_dim, dropout: per layer.
    """

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        weights_from: str = "query",
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.embed_dim = embed_dim
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                weights_from=weights_from,
                feedforward_dim=feedforward_dim,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        src: Tensor,
        *,
        pos: Tensor | None,
        key_padding_mask: Tensor | None,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        return_all_layers: bool = False,
    ) -> Tensor:
        """Encode the flattened pyramid (the fields of :class:`FlatLevels`).

        Args:
            src: (B, Nv, C).
            pos: (B, Nv, C) sine + level embedding, or None.
            key_padding_mask: (B, Nv) bool, True = padding, or None.
            spatial_shapes: (L, 2) long.
            level_start_index: (L,) long.
            valid_ratios: (B, L, 2).
            return_all_layers: return (num_layers, B, Nv, C) instead of the last layer's output.

        Returns:
            memory (B, Nv, C).
        """
        if src.dim() != 3 or src.shape[-1] != self.embed_dim:
            raise ValueError(f"src must be (B, Nv, C={self.embed_dim}), got shape {tuple(src.shape)}")
        if valid_ratios.shape[0] != src.shape[0]:
            raise ValueError(f"valid_ratios has batch {valid_ratios.shape[0]} but src has {src.shape[0]}")
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)  # (B, Nv, L, 2)
        outputs = []
        for layer in self.layers:
            src = layer(
                src,
                pos=pos,
                reference_points=reference_points,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                key_padding_mask=key_padding_mask,
            )  # (B, Nv, C)
            outputs.append(src)
        return torch.stack(outputs) if return_all_layers else src


@dataclass
class DecoderOutput:
    """What :class:`DeformableDecoder` returns, whatever its flags.

    Attributes:
        inter_states: (Ld, B, Nq, C) each layer's output (normalised if ``post_norm``).
        inter_references: Ld tensors (B, Nq, 2|4), the reference each layer's prediction is built on,
            in the image frame: layer l's boxes for the loss are
            ``apply_box_delta(bbox_embed[l](inter_states[l]), inter_references[l])``.
            ``inter_references[0]`` is ``reference_points``; for l >= 1 it is layer l - 1's refined
            box, always 4-d (detached, or not with ``look_forward_twice``), or ``reference_points``
            again without refinement. A list, because with point references layer 0's is 2-d and
            the later ones are boxes.
        sampling: with ``return_sampling``, per layer the cross-attention's (locations
            (B, Nq, nh, L, P, 2), weights (B, Nq, nh, L, P)); else None.
    """

    inter_states: Tensor
    inter_references: list[Tensor]
    sampling: list[tuple[Tensor, Tensor]] | None = None


class DeformableDecoder(nn.Module):
    """``num_layers`` :class:`DeformableDecoderLayer` s with optional box refinement (Deformable DETR,
    DINO).

    Design decisions (all visible in :meth:`forward`):

    * **Frames.** ``reference_points`` are in the image frame (like targets and proposals); each layer
      maps them to the levels with :func:`~detr_edu.levels.decoder_reference_points`.
    * **Box refinement** (``bbox_embed`` given, Deformable DETR Sec. A.4; official
      ``DeformableTransformerDecoder.forward``): after layer l, its box head predicts
      ``box_l = apply_box_delta(bbox_embed[l](output_l), ref_l)``; ``box_l.detach()`` becomes the next
      layer's reference, so each layer's sampling is steered by, but does not backpropagate into, the
      layers before it. Without ``bbox_embed`` every layer uses the initial reference.
    * **A point reference becomes a box** after the first refinement, as in the official code: from
      layer 1 on the reference is 4-d, so later layers sample *box-relative* offsets
      (``offset / P * wh / 2``) and predict w, h relative to the previous box. (Earlier versions of
      this course kept the refined centre only; that is not the published model.)
    * **Refinement reads the raw layer output.** The box that steers the next layer is predicted
      from the layer's output *before* ``post_norm`` (official DINO, ``bbox_embed[layer_id](output)``,
      and detrex), while the boxes for the loss (:class:`~detr_edu.heads.PredictionHeads`) read the
      normalised state. Without ``post_norm`` (Deformable DETR) the two are the same.
    * **Look forward twice** (DINO Sec. 3.5): the reference returned for layer l + 1 is ``box_l``
      *undetached*, so layer l + 1's box loss also trains layer l's box head and layers. The reference
      used for sampling is detached either way; forward values are identical.
    * **Query position from the reference** (``query_pos_from_ref``, DAB-DETR / DINO): recomputed every
      layer from the current (detached) reference. ``query_pos_frame="level0"`` (official DINO,
      ``gen_sineembed_for_position(reference_points_input[:, :, 0, :])``) encodes the reference
      scaled to level 0's *padded* frame, which makes the query position depend on the padding;
      ``"image"`` (the course's padding-invariant option) encodes it in the image frame.
    * **post_norm** (DINO: True, Deformable DETR: False): one shared LayerNorm applied to each returned
      state.

    Args:
        num_layers: depth (6).
        embed_dim, num_heads, num_levels, num_points, weights_from, feedforward_dim, dropout: per layer.
        post_norm: see above.
        query_pos_frame: "level0" (official DINO) or "image" (padding-invariant), see above.
        eps: of the inverse sigmoid in the refinement (Deformable DETR 1e-5, DINO 1e-3).
    """

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        weights_from: str = "query",
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
        post_norm: bool = False,
        query_pos_frame: Literal["level0", "image"] = "level0",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if query_pos_frame not in ("level0", "image"):
            raise ValueError(f"query_pos_frame must be 'level0' or 'image', got {query_pos_frame!r}")
        self.query_pos_frame = query_pos_frame
        self.eps = eps
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                weights_from=weights_from,
                feedforward_dim=feedforward_dim,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim) if post_norm else nn.Identity()

    def forward(
        self,
        query: Tensor,
        *,
        reference_points: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        query_pos: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        bbox_embed: nn.ModuleList | None = None,
        look_forward_twice: bool = False,
        query_pos_from_ref: nn.Module | None = None,
        return_sampling: bool = False,
    ) -> DecoderOutput:
        """Decode.

        Args:
            query: (B, Nq, C) content queries.
            reference_points: (B, Nq, 2) points or (B, Nq, 4) boxes cxcywh, normalised to the unpadded
                image. Passed as given to layer 0 (detach it yourself if it must not be trained through).
            memory: (B, Nv, C); memory_mask: (B, Nv) bool True = padding, or None.
            spatial_shapes: (L, 2) long; level_start_index: (L,) long; valid_ratios: (B, L, 2).
            query_pos: (B, Nq, C) fixed query positions, or None. Exclusive with ``query_pos_from_ref``.
            self_attn_mask: (Nq, Nq) bool, True = blocked (DINO's denoising mask), or None.
            bbox_embed: one box head per layer, each mapping (B, Nq, C) -> (B, Nq, 4) deltas; enables
                box refinement.
            look_forward_twice: DINO's gradient path (needs ``bbox_embed``).
            query_pos_from_ref: module mapping references (B, Nq, 2|4) -> (B, Nq, C), e.g.
                :class:`~detr_edu.position.QueryPositionFromBox`.
            return_sampling: also return, per layer, the cross-attention's (locations, weights).

        Returns:
            A :class:`DecoderOutput` (``inter_states``, ``inter_references``, ``sampling``).
        """
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (B, Nq, C={self.embed_dim}), got shape {tuple(query.shape)}")
        B, Nq, _ = query.shape
        if (
            reference_points.dim() != 3
            or reference_points.shape[:2] != (B, Nq)
            or reference_points.shape[-1] not in (2, 4)
        ):
            raise ValueError(
                f"reference_points must be (B, Nq, 2|4) = ({B}, {Nq}, 2|4), "
                f"got shape {tuple(reference_points.shape)}"
            )
        if query_pos is not None and query_pos_from_ref is not None:
            raise ValueError("give either query_pos or query_pos_from_ref, not both")
        if query_pos is not None and query_pos.shape != query.shape:
            raise ValueError(f"query_pos {tuple(query_pos.shape)} must match query {tuple(query.shape)}")
        if bbox_embed is not None and len(bbox_embed) != self.num_layers:
            raise ValueError(
                f"bbox_embed needs one head per layer ({self.num_layers}), got {len(bbox_embed)}"
            )
        if look_forward_twice and bbox_embed is None:
            raise ValueError(
                "look_forward_twice needs bbox_embed (it changes how refined boxes are passed on)"
            )
        if self_attn_mask is not None and tuple(self_attn_mask.shape) != (Nq, Nq):
            raise ValueError(
                f"self_attn_mask must be (Nq, Nq) = ({Nq}, {Nq}), got {tuple(self_attn_mask.shape)}"
            )

        ref_sample = reference_points  # (B, Nq, 2|4) steers sampling and query_pos; detached after layer 0
        ref_pred = reference_points  # (B, Nq, 2|4) what this layer's boxes are built on (returned)
        states, references, sampling = [], [], []
        for layer_idx, layer in enumerate(self.layers):
            ref_input = decoder_reference_points(ref_sample, valid_ratios)  # (B, Nq, L, 2|4) padded frames
            if query_pos_from_ref is not None:
                # official DINO: the reference in level 0's padded frame; the course's option: the image frame
                frame = ref_input[:, :, 0] if self.query_pos_frame == "level0" else ref_sample  # (B, Nq, 2|4)
                pos = query_pos_from_ref(frame)  # (B, Nq, C)
            else:
                pos = query_pos  # (B, Nq, C) or None
            query, layer_sampling = layer(
                query,
                query_pos=pos,
                reference_points=ref_input,
                memory=memory,
                memory_mask=memory_mask,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                self_attn_mask=self_attn_mask,
                return_sampling=return_sampling,
            )  # (B, Nq, C); (locations (B, Nq, nh, L, P, 2), weights (B, Nq, nh, L, P)) or None
            if layer_sampling is not None:
                sampling.append(layer_sampling)
            states.append(self.norm(query))  # (B, Nq, C)
            references.append(ref_pred)
            if bbox_embed is not None:
                # Box refinement from the raw output; a point reference becomes a box here.
                box = apply_box_delta(bbox_embed[layer_idx](query), ref_sample, eps=self.eps)  # (B, Nq, 4)
                ref_sample = box.detach()
                # DINO: look forward twice -- the next layer's loss box keeps this layer's gradient.
                ref_pred = box if look_forward_twice else box.detach()
        return DecoderOutput(
            inter_states=torch.stack(states),  # (num_layers, B, Nq, C)
            inter_references=references,  # num_layers x (B, Nq, 2|4)
            sampling=sampling if return_sampling else None,
        )


@dataclass
class EncoderOutput:
    """What :class:`MultiScaleEncoder` returns.

    Attributes:
        flat: the flattened pyramid (src, mask, pos, spatial_shapes, level_start_index, valid_ratios).
        memory: (B, Nv, C) encoder output.
    """

    flat: FlatLevels
    memory: Tensor


class MultiScaleEncoder(nn.Module):
    """Positions + level embedding + flattening + deformable encoder (shared by Deformable DETR and DINO).

    Both models take it from here, so neither model imports the other.

    Args:
        num_levels: L.
        embed_dim: C.
        num_heads, num_layers, num_points, weights_from, feedforward_dim, dropout: of the encoder.
    """

    def __init__(
        self,
        *,
        num_levels: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        num_points: int,
        weights_from: str = "query",
        feedforward_dim: int,
        dropout: float,
        pos_temperature: float = 10000.0,
        pos_offset: float = -0.5,
    ) -> None:
        super().__init__()
        self.pos_temperature = pos_temperature
        self.pos_offset = pos_offset
        self.level_embed = LevelEmbedding(num_levels=num_levels, embed_dim=embed_dim)
        self.encoder = DeformableEncoder(
            num_layers=num_layers,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            weights_from=weights_from,
            feedforward_dim=feedforward_dim,
            dropout=dropout,
        )
        self.embed_dim = embed_dim
        self.num_levels = num_levels

    def forward(self, feature_maps: FeatureMaps) -> EncoderOutput:
        """L levels (B, C, H_l, W_l) + masks -> flattened pyramid and memory (B, Nv, C)."""
        if len(feature_maps.features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(feature_maps.features)}")
        dtype = feature_maps.features[0].dtype
        pos = [
            # sine positions of the unpadded image (Deformable DETR: pixel centres; DINO: offset 0, T = 20)
            sine_position_embedding(
                m,
                num_pos_feats=self.embed_dim // 2,
                temperature=self.pos_temperature,
                normalize=True,
                offset=self.pos_offset,
                dtype=dtype if dtype in (torch.float32, torch.float64) else torch.float32,
            )
            for m in feature_maps.masks
        ]  # L x (B, C, H_l, W_l)
        flat = flatten_levels(
            feature_maps.features, feature_maps.masks, pos, level_embed=self.level_embed.weight
        )
        memory = self.encoder(
            flat.src,
            pos=flat.pos,
            key_padding_mask=flat.mask,
            spatial_shapes=flat.spatial_shapes,
            level_start_index=flat.level_start_index,
            valid_ratios=flat.valid_ratios,
        )  # (B, Nv, C)
        return EncoderOutput(flat=flat, memory=memory)
