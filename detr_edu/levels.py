"""Levels: a feature pyramid as one token sequence, its valid ratios, and reference points (chapter 03).

Deformable attention (:mod:`detr_edu.deformable`) samples a few points around a *reference point* on
every level of a pyramid. Before any layer runs, the pyramid is laid out and the frames are fixed:

* :func:`flatten_levels` -- L maps (B, C, H_l, W_l), with their padding masks and positions, become one
  token sequence (B, Nv, C) with ``spatial_shapes``, ``level_start_index`` and ``valid_ratios``;
* :func:`valid_ratios_from_mask` -- the fraction of each level that the unpadded image covers;
* :func:`encoder_reference_points` -- every pixel's centre, on every level, as reference points;
* :func:`decoder_reference_points` -- a decoder query's point/box (relative to the unpadded image)
  mapped into each level's padded frame.

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
from torch import Tensor

from detr_edu.deformable import level_start_index_from_shapes
from detr_edu.masks import valid_sizes

__all__ = [
    "FlatLevels",
    "flatten_levels",
    "valid_ratios_from_mask",
    "encoder_reference_points",
    "decoder_reference_points",
]


@dataclass
class FlatLevels:
    """A feature pyramid flattened into one token sequence (what the deformable encoder consumes).

    Attributes:
        src: (B, Nv, C) features, level 0 first, each level row-major (token = row * W_l + column).
        mask: (B, Nv) bool, True = padding.
        pos: (B, Nv, C) positional embedding (plus the level embedding when one was given), or
            None when no positions were given (chapter 02 flattens bare feature maps).
        spatial_shapes: (L, 2) long (H_l, W_l).
        level_start_index: (L,) long, index of each level's first token.
        valid_ratios: (B, L, 2) float (x, y): fraction of each level's width/height that is image.
    """

    src: Tensor
    mask: Tensor
    pos: Tensor | None
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor


def valid_ratios_from_mask(mask: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fraction of a padded map covered by the image, per image: (B, H, W) mask -> (B, 2) (x, y).

    The valid size comes from :func:`detr_edu.masks.valid_sizes` (images padded at the bottom and the
    right; the mask must be exactly that top-left rectangle, else ``ValueError``),
    flipped from its (h, w) order into the (x, y) order of sampling coordinates.

    Args:
        mask: (B, H, W) bool, True = padding.
        dtype: of the result (the model's: a float32 ratio cast to float64 is not the float64 ratio).

    Returns:
        (B, 2) ratios ``(valid_W / W, valid_H / H)`` in (0, 1].
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean (B, H, W) tensor, got {mask.dtype} {tuple(mask.shape)}")
    if (~mask).flatten(1).any(1).logical_not().any():
        raise ValueError("every image needs at least one valid pixel: its mask is all padding")
    H, W = mask.shape[-2:]
    size_xy = valid_sizes(mask).flip(-1).to(dtype)  # (B, 2) valid (w, h)
    return size_xy / torch.tensor([W, H], dtype=dtype, device=mask.device)  # (B, 2) (x, y)


def flatten_levels(
    features: list[Tensor],
    masks: list[Tensor] | None = None,
    pos: list[Tensor] | None = None,
    level_embed: Tensor | None = None,
) -> FlatLevels:
    """Flatten L levels of features (and their masks and positions) into one token sequence.

    Each level is flattened row-major (token index = row * W_l + column) and the levels are
    concatenated, level 0 first: the layout every deformable-attention call reads.

    Args:
        features: L tensors (B, C, H_l, W_l), same B and C.
        masks: L tensors (B, H_l, W_l) bool, True = padding; None: nothing is padded.
        pos: L tensors (B, C, H_l, W_l) positional embeddings (e.g. :func:`~detr_edu.position.
            sine_position_embedding` of each level's mask), or None (no positions).
        level_embed: (L, C) learnable level vectors added to level l's positions, or None (already
            added, or a single level). Needs ``pos``.

    Returns:
        :class:`FlatLevels` with src (B, Nv, C), mask (B, Nv), pos (B, Nv, C) or None,
        spatial_shapes (L, 2), level_start_index (L,), valid_ratios (B, L, 2).
    """
    if not features:
        raise ValueError("features must hold at least one level")
    B, C = features[0].shape[:2]
    for lvl, f in enumerate(features):
        if f.dim() != 4 or f.shape[:2] != (B, C):
            raise ValueError(
                f"features[{lvl}] has shape {tuple(f.shape)}; every level must be (B={B}, C={C}, H, W)"
            )
    L = len(features)
    device = features[0].device
    if masks is None:
        masks = [torch.zeros(B, *f.shape[-2:], dtype=torch.bool, device=device) for f in features]
    if len(masks) != L or (pos is not None and len(pos) != L):
        raise ValueError(
            f"features, masks and pos need the same non-zero number of levels, got "
            f"{L}, {len(masks)}, {len(pos) if pos is not None else None}"
        )
    if level_embed is not None and (pos is None or tuple(level_embed.shape) != (L, C)):
        raise ValueError(
            f"level_embed must be (L, C) = ({L}, {C}) and needs pos, got "
            f"{tuple(level_embed.shape)} with pos={'given' if pos is not None else None}"
        )
    for lvl, (f, m) in enumerate(zip(features, masks, strict=True)):
        H, W = f.shape[-2:]
        if tuple(m.shape) != (B, H, W) or m.dtype != torch.bool:
            raise ValueError(
                f"masks[{lvl}] must be bool (B, H, W) = ({B}, {H}, {W}), got {m.dtype} {tuple(m.shape)}"
            )
        if pos is not None and pos[lvl].shape != f.shape:
            raise ValueError(
                f"pos[{lvl}] has shape {tuple(pos[lvl].shape)} but features[{lvl}] has {tuple(f.shape)}"
            )
    src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)  # (B, Nv, C)
    mask = torch.cat([m.flatten(1) for m in masks], 1)  # (B, Nv)
    flat_pos = None
    if pos is not None:
        per_level = [p.flatten(2).transpose(1, 2) for p in pos]  # L x (B, H_l*W_l, C)
        if level_embed is not None:
            # tells the levels apart: level l's vector added to every token of level l
            per_level = [p + level_embed[lvl][None, None, :] for lvl, p in enumerate(per_level)]
        flat_pos = torch.cat(per_level, 1)  # (B, Nv, C)
    spatial_shapes = torch.tensor([f.shape[-2:] for f in features], dtype=torch.long, device=device)  # (L, 2)
    dtype = features[0].dtype if features[0].is_floating_point() else torch.float32
    valid_ratios = torch.stack([valid_ratios_from_mask(m, dtype=dtype) for m in masks], dim=1)  # (B, L, 2)
    return FlatLevels(
        src=src,
        mask=mask,
        pos=flat_pos,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index_from_shapes(spatial_shapes),
        valid_ratios=valid_ratios,
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
            f"valid_ratios must be (B={reference_points.shape[0]}, L, 2), "
            f"got shape {tuple(valid_ratios.shape)}"
        )
    ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
    return reference_points[:, :, None, :] * ratios[:, None, :, :]  # (B, Nq, L, 2|4)
