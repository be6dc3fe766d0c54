"""The deformable transformer: levels, reference points, valid ratios, refinement (chapter 03).

Deformable DETR (Zhu et al., ICLR 2021, arXiv:2010.04159, Sec. 4.1 and Appendix A) replaces the
attention over pixels by :class:`~detr_edu.deformable.MultiScaleDeformableAttention`, which samples a
few points around a *reference point* on every level of a feature pyramid. Assembling it needs:

* :func:`flatten_levels` -- L maps (B, C, H_l, W_l) with their padding masks and positions become one
  token sequence (B, Nv, C) with ``spatial_shapes``, ``level_start_index`` and ``valid_ratios``;
* :func:`valid_ratios_from_mask` -- the fraction of each level that the unpadded image covers;
* :func:`encoder_reference_points` -- every pixel's centre, on every level, as reference points;
* :func:`decoder_reference_points` -- a decoder query's point/box (relative to the unpadded image)
  mapped into each level's padded frame;
* :func:`apply_box_delta` -- ``sigmoid(delta + inverse_sigmoid(reference))``, the box a head predicts;
* :class:`DeformableEncoderLayer` / :class:`DeformableEncoder`, :class:`DeformableDecoderLayer` /
  :class:`DeformableDecoder` -- post-norm blocks, the decoder with optional iterative box refinement,
  look forward twice and query positions from the reference (DINO, Zhang et al. 2022, Sec. 3.4-3.5).

Frames. Two normalised coordinate frames exist and must not be confused:

* the **image frame**: [0, 1] spans the unpadded image. Targets, predicted boxes, two-stage proposals
  and the decoder's ``reference_points`` live here, and the sine positions (normalised by the valid
  size) too.
* the **padded frame of level l**: [0, 1] spans the whole padded map of level l. Sampling
  (``grid_sample``) lives here.

A valid ratio ``r_l = (valid_W_l / W_l, valid_H_l / H_l)`` converts image frame -> padded frame of
level l: ``p_padded = p_image * r_l``. With it, an image padded inside a batch is processed exactly as
the same image alone (tested in ``tests/test_deformable_transformer.py``). Chapter 03 answers the
source note's Q4 (do valid ratios cancel?) with the algebra in :func:`encoder_reference_points`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detr_edu.attention import MultiheadAttention
from detr_edu.box_ops import inverse_sigmoid
from detr_edu.deformable import MultiScaleDeformableAttention
from detr_edu.transformer import FFN

__all__ = [
    "FlatLevels",
    "flatten_levels",
    "valid_ratios_from_mask",
    "encoder_reference_points",
    "decoder_reference_points",
    "apply_box_delta",
    "DeformableEncoderLayer",
    "DeformableEncoder",
    "DeformableDecoderLayer",
    "DeformableDecoder",
]


@dataclass
class FlatLevels:
    """A feature pyramid flattened into one token sequence (what the deformable encoder consumes).

    Attributes:
        src: (B, Nv, C) features, level 0 first, each level row-major (token = row * W_l + column).
        mask: (B, Nv) bool, True = padding.
        pos: (B, Nv, C) positional embedding (plus the level embedding when one was given).
        spatial_shapes: (L, 2) long (H_l, W_l).
        level_start_index: (L,) long, index of each level's first token.
        valid_ratios: (B, L, 2) float (x, y): fraction of each level's width/height that is image.
    """

    src: Tensor
    mask: Tensor
    pos: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor


def valid_ratios_from_mask(mask: Tensor) -> Tensor:
    """Fraction of a padded map covered by the image, per image: (B, H, W) mask -> (B, 2) (x, y).

    Images are padded at the bottom and the right (DETR's ``NestedTensor`` convention), so the valid
    width is the number of valid pixels in the first row and the valid height that in the first column.
    The mask must be exactly that top-left rectangle; anything else raises ``ValueError``.

    Args:
        mask: (B, H, W) bool, True = padding.

    Returns:
        (B, 2) float32 ratios ``(valid_W / W, valid_H / H)`` in (0, 1].
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean (B, H, W) tensor, got {mask.dtype} {tuple(mask.shape)}")
    B, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)  # (B,)
    valid_w = (~mask[:, 0, :]).sum(1)  # (B,)
    if (valid_h == 0).any() or (valid_w == 0).any():
        raise ValueError("every image needs at least one valid pixel: its mask is all padding")
    rows = torch.arange(H, device=mask.device)[None, :, None] < valid_h[:, None, None]  # (B, H, 1)
    cols = torch.arange(W, device=mask.device)[None, None, :] < valid_w[:, None, None]  # (B, 1, W)
    if not torch.equal(~mask, rows & cols):
        raise ValueError("mask must mark a top-left valid rectangle (images padded at bottom/right only)")
    return torch.stack([valid_w.float() / W, valid_h.float() / H], dim=-1)  # (B, 2)


def flatten_levels(
    features: list[Tensor],
    masks: list[Tensor],
    pos: list[Tensor],
    level_embed: Tensor | None = None,
) -> FlatLevels:
    """Flatten L levels of features, masks and positions into one sequence.

    Args:
        features: L tensors (B, C, H_l, W_l).
        masks: L tensors (B, H_l, W_l) bool, True = padding.
        pos: L tensors (B, C, H_l, W_l) positional embeddings (e.g. :func:`~detr_edu.position.
            sine_position_embedding` of each level's mask).
        level_embed: (L, C) learnable level vectors added to level l's positions, or None (already
            added, or a single level).

    Returns:
        :class:`FlatLevels` with src (B, Nv, C), mask (B, Nv), pos (B, Nv, C), spatial_shapes (L, 2),
        level_start_index (L,), valid_ratios (B, L, 2).
    """
    if not features or not (len(features) == len(masks) == len(pos)):
        raise ValueError(
            f"features, masks and pos need the same non-zero number of levels, got "
            f"{len(features)}, {len(masks)}, {len(pos)}"
        )
    L = len(features)
    B, C = features[0].shape[:2]
    if level_embed is not None and tuple(level_embed.shape) != (L, C):
        raise ValueError(f"level_embed must be (L, C) = ({L}, {C}), got {tuple(level_embed.shape)}")
    src_flat, mask_flat, pos_flat, shapes = [], [], [], []
    for lvl, (f, m, p) in enumerate(zip(features, masks, pos, strict=True)):
        if f.dim() != 4 or f.shape[:2] != (B, C):
            raise ValueError(
                f"features[{lvl}] has shape {tuple(f.shape)}; every level must be (B={B}, C={C}, H, W)"
            )
        H, W = f.shape[-2:]
        if tuple(m.shape) != (B, H, W) or m.dtype != torch.bool:
            raise ValueError(
                f"masks[{lvl}] must be bool (B, H, W) = ({B}, {H}, {W}), got {m.dtype} {tuple(m.shape)}"
            )
        if p.shape != f.shape:
            raise ValueError(
                f"pos[{lvl}] has shape {tuple(p.shape)} but features[{lvl}] has {tuple(f.shape)}"
            )
        shapes.append((H, W))
        src_flat.append(f.flatten(2).transpose(1, 2))  # (B, H*W, C)
        mask_flat.append(m.flatten(1))  # (B, H*W)
        p = p.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if level_embed is not None:
            p = p + level_embed[lvl][None, None, :]  # (B, H*W, C): tells the levels apart
        pos_flat.append(p)
    device = features[0].device
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)  # (L, 2)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]  # (L,)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])  # (L,)
    valid_ratios = torch.stack([valid_ratios_from_mask(m) for m in masks], dim=1)  # (B, L, 2)
    return FlatLevels(
        src=torch.cat(src_flat, 1),  # (B, Nv, C)
        mask=torch.cat(mask_flat, 1),  # (B, Nv)
        pos=torch.cat(pos_flat, 1),  # (B, Nv, C)
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        valid_ratios=valid_ratios.to(features[0].dtype),
    )


def _check_shapes_and_ratios(spatial_shapes: Tensor, valid_ratios: Tensor) -> None:
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[-1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2), got shape {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if valid_ratios.dim() != 3 or valid_ratios.shape[1:] != (L, 2):
        raise ValueError(f"valid_ratios must be (B, L={L}, 2), got shape {tuple(valid_ratios.shape)}")


def encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Every pixel's centre, on every level, as the encoder's reference points (Deformable DETR).

    Pixel (i, j) of level l (padded size H_l x W_l, valid ratio r_l) is first put in the *image frame*
    of its own level, ``((j + 0.5) / (r_l,x W_l), (i + 0.5) / (r_l,y H_l))``, then mapped into the padded
    frame of every level l' by multiplying with ``r_l'``.

    Q4 of the source note, the algebra (x only; y is the same):

    * same level (l' = l): ``(j + 0.5) / (r_l W_l) * r_l = (j + 0.5) / W_l`` -- the ratios cancel exactly;
      the point is the pixel's own centre, as if no valid ratio existed.
    * other levels: ``(j + 0.5) / W_l * r_l' / r_l``. Writing ``r_l = V_l / W_l`` with V_l the valid
      width, the point in pixels of level l' is ``(j + 0.5) * V_l' / V_l``: it depends only on the valid
      sizes, i.e. exactly what the image alone (no padding, ratio 1, map size V_l) would compute. Without
      the ratios it would be ``(j + 0.5) * W_l' / W_l``, which differs whenever the levels' valid sizes
      are not in the same proportion as their padded sizes -- always the case with rounding
      (``V_l = ceil(w / stride_l)``). The ratios do not cancel here; they make padding invisible.

    Reference points of padded pixels are meaningless (their outputs are never used).

    Args:
        spatial_shapes: (L, 2) long (H_l, W_l).
        valid_ratios: (B, L, 2) (x, y), from :func:`valid_ratios_from_mask`.

    Returns:
        (B, Nv, L, 2) normalised (x, y) in each level's padded frame; for valid pixels in [0, 1].
    """
    _check_shapes_and_ratios(spatial_shapes, valid_ratios)
    dtype, device = valid_ratios.dtype, valid_ratios.device
    points = []
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        ys = torch.arange(H, dtype=dtype, device=device) + 0.5  # (H,) pixel centres
        xs = torch.arange(W, dtype=dtype, device=device) + 0.5  # (W,)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        ref_x = grid_x.reshape(1, -1) / (valid_ratios[:, lvl, 0:1] * W)  # (B, H*W) image frame
        ref_y = grid_y.reshape(1, -1) / (valid_ratios[:, lvl, 1:2] * H)  # (B, H*W)
        points.append(torch.stack([ref_x, ref_y], dim=-1))  # (B, H*W, 2)
    ref = torch.cat(points, dim=1)  # (B, Nv, 2) image frame of each pixel's own level
    return ref[:, :, None, :] * valid_ratios[:, None, :, :]  # (B, Nv, L, 2) padded frame of every level


def decoder_reference_points(reference_points: Tensor, valid_ratios: Tensor) -> Tensor:
    """Decoder references (image frame) -> each level's padded frame: multiply by the valid ratios.

    A point ``(x, y)`` is scaled by ``r_l``; a box ``(cx, cy, w, h)`` by ``(r_l,x, r_l,y, r_l,x, r_l,y)``
    (its size shrinks with the frame, so deformable attention's box-relative offsets stay inside the box
    on the image). Nothing divides first, so nothing cancels: dropping the ratios would sample at
    ``p / r_l`` of where the box is, i.e. wrong by a factor as large as the padding. In pixels of level l
    the point is ``p * V_l``, identical to the image alone.

    Args:
        reference_points: (B, Nq, 2) points or (B, Nq, 4) boxes, normalised to the unpadded image.
        valid_ratios: (B, L, 2) (x, y).

    Returns:
        (B, Nq, L, 2 or 4).
    """
    if reference_points.dim() != 3 or reference_points.shape[-1] not in (2, 4):
        raise ValueError(
            f"reference_points must be (B, Nq, 2) or (B, Nq, 4), got shape {tuple(reference_points.shape)}"
        )
    if (
        valid_ratios.dim() != 3
        or valid_ratios.shape[-1] != 2
        or valid_ratios.shape[0] != reference_points.shape[0]
    ):
        raise ValueError(
            f"valid_ratios must be (B={reference_points.shape[0]}, L, 2), got shape {tuple(valid_ratios.shape)}"
        )
    ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
    return reference_points[:, :, None, :] * ratios[:, None, :, :]  # (B, Nq, L, 2|4)


def apply_box_delta(delta: Tensor, reference: Tensor) -> Tensor:
    """The box a head predicts on top of a reference: ``sigmoid(delta + inverse_sigmoid(reference))``.

    Deltas live in inverse-sigmoid (logit) space, so any delta gives a box inside [0, 1] and a zero
    delta returns the reference. A 2-d reference (a point) only anchors the centre; the size is then
    ``sigmoid(delta[..., 2:])`` (Deformable DETR's box head on point references).

    Args:
        delta: (..., 4) output of a box head.
        reference: (..., 4) boxes or (..., 2) points, normalised, same leading shape.

    Returns:
        (..., 4) boxes cxcywh in [0, 1].
    """
    if delta.shape[-1] != 4 or reference.shape[-1] not in (2, 4) or delta.shape[:-1] != reference.shape[:-1]:
        raise ValueError(
            f"delta must be (..., 4) and reference (..., 2|4) with the same leading shape, got "
            f"{tuple(delta.shape)} and {tuple(reference.shape)}"
        )
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()  # (..., 4)
    centre = delta[..., :2] + inverse_sigmoid(reference)  # (..., 2)
    return torch.cat([centre, delta[..., 2:]], dim=-1).sigmoid()  # (..., 4)


class DeformableEncoderLayer(nn.Module):
    """Deformable encoder layer: deformable self-attention over all levels, norm, FFN, norm (post-norm).

    Every pixel of every level is a query; its reference point is its own centre (on every level, see
    :func:`encoder_reference_points`); the value is the whole flattened pyramid.

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
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """One decoder step.

        Args:
            query: (B, Nq, C).
            query_pos: (B, Nq, C) or None.
            reference_points: (B, Nq, L, 2 or 4) already in each level's padded frame
                (:func:`decoder_reference_points`).
            memory: (B, Nv, C) encoder output.
            memory_mask: (B, Nv) bool, True = padding, or None.
            spatial_shapes: (L, 2) long; level_start_index: (L,) long.
            self_attn_mask: (Nq, Nq) bool, True = blocked, or None.
            return_sampling: also return the cross-attention's sampling locations (B, Nq, nh, L, P, 2)
                and weights (B, Nq, nh, L, P).

        Returns:
            (B, Nq, C), plus locations and weights when ``return_sampling``.
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
        query, sampling = (out[0], out[1:]) if return_sampling else (out, ())  # (B, Nq, C)
        query = self.norm2(query)  # (B, Nq, C)
        query = self.norm3(self.ffn(query))  # (B, Nq, C)
        return (query, *sampling) if return_sampling else query


class DeformableDecoder(nn.Module):
    """``num_layers`` :class:`DeformableDecoderLayer` s with optional box refinement (Deformable DETR,
    DINO).

    Design decisions (all visible in :meth:`forward`):

    * **Frames.** ``reference_points`` are in the image frame (like targets and proposals); each layer
      maps them to the levels with :func:`decoder_reference_points`.
    * **Box refinement** (``bbox_embed`` given, Deformable DETR Sec. A.4): after layer l, its box head
      predicts ``box_l = apply_box_delta(bbox_embed[l](state_l), ref_l)``; ``box_l.detach()`` becomes the
      next layer's reference (its first 2 numbers when the references are points), so each layer's
      sampling is steered by, but does not backpropagate into, the layers before it. Without
      ``bbox_embed`` every layer uses the initial reference.
    * **Point references stay points.** Deformable DETR's code turns a 2-d reference into a 4-d box
      after the first refinement; here a 2-d reference stays 2-d (the refined centre), so that every
      layer samples the same way and ``inter_references`` has one shape. Use 4-d references (two-stage,
      DINO) for box-shaped sampling.
    * **Look forward twice** (DINO Sec. 3.5): the reference returned for layer l + 1 is ``box_l``
      *undetached*, so layer l + 1's box loss also trains layer l's box head and layers. The reference
      used for sampling is detached either way; forward values are identical.
    * **Query position from the reference** (``query_pos_from_ref``, DAB-DETR / DINO): recomputed every
      layer from the current (detached) reference *in the image frame*. (DINO's code encodes the
      reference already scaled to level 0's padded frame, which makes the query position depend on the
      padding; the image frame keeps padded and unpadded images identical.)
    * **post_norm** (DINO: True, Deformable DETR: False): one shared LayerNorm applied to each returned
      state; the box heads see the normalised state, the next layer the un-normalised one.

    Args:
        num_layers: depth (6).
        embed_dim, num_heads, num_levels, num_points, weights_from, feedforward_dim, dropout: per layer.
        post_norm: see above.
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
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
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
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
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
            ``inter_states`` (num_layers, B, Nq, C): each layer's output (normalised if ``post_norm``);
            ``inter_references`` (num_layers, B, Nq, 2|4): the reference each layer's prediction is built
            on, in the image frame: layer l's boxes for the loss are
            ``apply_box_delta(bbox_embed[l](inter_states[l]), inter_references[l])`` (the same boxes the
            decoder refines with). ``inter_references[0]`` is ``reference_points``; for l >= 1 it is layer
            l - 1's box (detached, or not with ``look_forward_twice``), or ``reference_points`` again
            without refinement. With ``return_sampling``, a third item: a list of (locations, weights).
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
                f"reference_points must be (B, Nq, 2|4) = ({B}, {Nq}, 2|4), got shape {tuple(reference_points.shape)}"
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

        D = reference_points.shape[-1]
        ref_sample = reference_points  # (B, Nq, D) steers sampling and query_pos; detached after layer 0
        ref_pred = reference_points  # (B, Nq, D) what this layer's boxes are built on (returned)
        states, references, sampling = [], [], []
        for lvl_idx, layer in enumerate(self.layers):
            pos = (
                query_pos_from_ref(ref_sample) if query_pos_from_ref is not None else query_pos
            )  # (B, Nq, C)
            ref_input = decoder_reference_points(ref_sample, valid_ratios)  # (B, Nq, L, D) padded frames
            out = layer(
                query,
                query_pos=pos,
                reference_points=ref_input,
                memory=memory,
                memory_mask=memory_mask,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                self_attn_mask=self_attn_mask,
                return_sampling=return_sampling,
            )
            if return_sampling:
                query, locations, weights = out  # (B, Nq, C), (B, Nq, nh, L, P, 2), (B, Nq, nh, L, P)
                sampling.append((locations, weights))
            else:
                query = out  # (B, Nq, C)
            state = self.norm(query)  # (B, Nq, C)
            states.append(state)
            references.append(ref_pred)
            if bbox_embed is not None:
                # Box refinement: this layer's box, built on the (detached) reference it sampled with.
                box = apply_box_delta(bbox_embed[lvl_idx](state), ref_sample)[..., :D]  # (B, Nq, D)
                ref_sample = box.detach()
                # DINO: look forward twice -- the next layer's loss box keeps this layer's gradient.
                ref_pred = box if look_forward_twice else box.detach()
        inter_states = torch.stack(states)  # (num_layers, B, Nq, C)
        inter_references = torch.stack(references)  # (num_layers, B, Nq, D)
        if return_sampling:
            return inter_states, inter_references, sampling
        return inter_states, inter_references
