"""Positional embeddings: where a token sits, written into its channels (chapter 03).

Attention is permutation-invariant: without positions a transformer sees a bag of pixels. Three
embeddings, one job each:

* :func:`sine_position_embedding` / :class:`PositionEmbeddingSine` -- a fixed 2-D sine embedding of
  every pixel of a (padded) feature map, computed from the padding mask so that coordinates are
  relative to the *unpadded* image (DETR, Carion et al. 2020, Sec. 3.2 and its
  ``PositionEmbeddingSine``; the sine/cosine pairs of Vaswani et al. 2017, Sec. 3.5, one set per axis);
* :class:`LevelEmbedding` -- one learnable vector per feature level, added to the pixels of that level
  so that tokens of different scales are distinguishable after flattening (Deformable DETR, Zhu et
  al. 2021, Sec. 4.1 "scale-level embedding");
* :func:`box_sine_embedding` / :class:`QueryPositionFromBox` -- a decoder query's position computed
  from its reference point or box: sine features of (x, y[, w, h]) followed by a 2-layer MLP
  (DAB-DETR, Liu et al. 2022, Sec. 4.2; DINO, Zhang et al. 2022, uses the same).

Channel layout (shared by both sine functions, so that they agree): ``F = num_pos_feats`` channels per
coordinate, coordinates in the order **y, x** (then w, h for boxes) -- DETR's order, kept so that a
box centre's embedding equals the pixel embedding at that point. Inside one coordinate's block,
channel ``2k`` is ``sin(t / T^(2k/F))`` and channel ``2k + 1`` is ``cos(t / T^(2k/F))`` (a sin/cos pair
shares one frequency), where ``t`` is the coordinate scaled to ``[0, scale]`` and ``T`` the temperature.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_edu.transformer import MLP

__all__ = [
    "sine_position_embedding",
    "PositionEmbeddingSine",
    "LevelEmbedding",
    "box_sine_embedding",
    "QueryPositionFromBox",
    "resize_mask",
]


def _sine_features(coords: Tensor, num_pos_feats: int, temperature: float) -> Tensor:
    """Scaled coordinates (...,) -> interleaved sin/cos features (..., F), the layout of the module doc."""
    if num_pos_feats <= 0 or num_pos_feats % 2 != 0:
        raise ValueError(f"num_pos_feats must be a positive even number, got {num_pos_feats}")
    k = torch.arange(num_pos_feats // 2, dtype=coords.dtype, device=coords.device)  # (F/2,)
    freqs = temperature ** (2 * k / num_pos_feats)  # (F/2,) wavelengths grow geometrically
    angles = coords[..., None] / freqs  # (..., F/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., F): sin, cos, sin, cos, ...


def sine_position_embedding(
    mask: Tensor,
    *,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    offset: float = 0.0,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """2-D sine positional embedding of a padded batch, from its padding mask.

    Pixel (i, j) of image b gets the coordinates ``y = #valid pixels above and including it in column j``
    and ``x = #valid pixels left of and including it in row i`` (cumulative sums of the valid mask: for
    images padded at the bottom/right these are simply ``i + 1`` and ``j + 1``). With ``normalize``,
    ``y <- (y + offset) / (H_valid + eps) * scale`` where ``H_valid`` is the column's valid height, so the
    unpadded image spans ``[0, scale]`` whatever the padding: an image alone and the same image padded
    in a batch get the same embedding on their pixels.

    Which reference uses which offset:

    * DETR (``models/position_encoding.py``): ``offset = 0``, so the last valid pixel sits exactly at
      ``scale`` and the first at ``scale / H``: coordinates of the pixel's *far edge*.
    * Deformable DETR (``models/position_encoding.py``, and transformers' ``DeformableDetr``):
      ``offset = -0.5``, so pixel i sits at ``(i + 0.5) / H * scale``: the pixel *centre*, the same
      convention as its reference points and as ``grid_sample(align_corners=False)``. Then
      :func:`box_sine_embedding` of a pixel's normalised centre reproduces that pixel's embedding
      (up to ``eps``).
    * DINO (official, ``models/dino/position_encoding.py:PositionEmbeddingSineHW``): ``offset = 0``
      and ``temperature = 20`` (``pe_temperatureH = pe_temperatureW = 20`` in ``DINO_4scale.py``).
      detrex's DINO configs use Deformable DETR's ``offset = -0.5`` and ``temperature = 10000``
      instead.

    Padded pixels get a zero embedding (the reference implementations leave unused values there;
    nothing ever reads them because padded keys are masked).

    Args:
        mask: (B, H, W) bool, True = padding.
        num_pos_feats: F, channels per axis (even); the output has 2F channels.
        temperature: T, the longest wavelength's base.
        normalize: scale coordinates by the valid size (else raw pixel counts are used).
        scale: the range of normalised coordinates (2 pi: one full turn of the slowest channel).
        offset: added to the cumulative count before normalising (see above).
        eps: avoids division by zero in fully padded rows/columns.
        dtype: of the result (the model's; float32 by default).

    Returns:
        (B, 2F, H, W): channels [0, F) encode y, [F, 2F) encode x.
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a boolean (B, H, W) tensor (True = padding), got {mask.dtype} {tuple(mask.shape)}"
        )
    valid = (~mask).to(dtype)  # (B, H, W)
    y = valid.cumsum(1)  # (B, H, W) rows counted down each column
    x = valid.cumsum(2)  # (B, H, W) columns counted along each row
    if normalize:
        y = (y + offset) / (y[:, -1:, :] + eps) * scale  # (B, H, W) in (0, scale]
        x = (x + offset) / (x[:, :, -1:] + eps) * scale  # (B, H, W)
    pos_y = _sine_features(y, num_pos_feats, temperature)  # (B, H, W, F)
    pos_x = _sine_features(x, num_pos_feats, temperature)  # (B, H, W, F)
    pos = torch.cat([pos_y, pos_x], dim=-1).permute(0, 3, 1, 2)  # (B, 2F, H, W)
    return pos * valid[:, None]  # (B, 2F, H, W) zero on padding


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A padding mask (B, H, W) resized to a feature level's (h, w) by nearest-neighbour sampling.

    DETR's backbone does the same (``F.interpolate(mask[None].float(), size).bool()``): output pixel
    (i, j) copies input pixel (floor(i * H / h), floor(j * W / w)), so an image w pixels wide padded to
    W keeps ``ceil(w * w_l / W)`` valid columns on a level of width w_l -- the count a stride-s
    convolution with padding produces, and the reason valid ratios differ slightly between levels.

    Args:
        mask: (B, H, W) bool, True = padding.
        size: (h, w) of the level.

    Returns:
        (B, h, w) bool.
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean (B, H, W) tensor, got {mask.dtype} {tuple(mask.shape)}")
    resized = F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")  # (B, 1, h, w)
    return resized[:, 0].bool()  # (B, h, w)


class PositionEmbeddingSine(nn.Module):
    """Module form of :func:`sine_position_embedding` (no parameters), for use inside models.

    Args: as :func:`sine_position_embedding`; ``num_pos_feats`` is usually ``embed_dim // 2``.
    """

    def __init__(
        self,
        *,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """mask (B, H, W) bool True = padding -> (B, 2F, H, W)."""
        return sine_position_embedding(
            mask,
            num_pos_feats=self.num_pos_feats,
            temperature=self.temperature,
            normalize=self.normalize,
            scale=self.scale,
            offset=self.offset,
        )

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, offset={self.offset}"


class LevelEmbedding(nn.Module):
    """One learnable C-vector per feature level (Deformable DETR's "scale-level embedding").

    After flattening, a token of level 0 and one of level 3 at the same relative position would carry
    the same sine embedding; adding ``weight[l]`` to every position of level ``l`` tells them apart.
    Initialised from N(0, 1) as in Deformable DETR.

    Args:
        num_levels: L.
        embed_dim: C.
    """

    def __init__(self, *, num_levels: int, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_levels, embed_dim))  # (L, C)
        nn.init.normal_(self.weight)

    def forward(self, pos: list[Tensor]) -> list[Tensor]:
        """Add level l's vector to the (B, C, H_l, W_l) positional map of level l, for every level."""
        if len(pos) != self.weight.shape[0]:
            raise ValueError(
                f"got {len(pos)} levels of positions but the embedding has {self.weight.shape[0]}"
            )
        return [
            p + self.weight[lvl][None, :, None, None] for lvl, p in enumerate(pos)
        ]  # L x (B, C, H_l, W_l)


def box_sine_embedding(
    boxes: Tensor,
    *,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    order: Literal["yx", "xy"] = "yx",
) -> Tensor:
    """Sine features of normalised points (x, y) or boxes (cx, cy, w, h).

    ``order="yx"``: the coordinates are reordered to ``(y, x)`` or ``(cy, cx, w, h)`` so that the
    first 2F channels follow the image embedding's (y, x) layout: for a pixel centre ``(x, y)`` this
    equals :func:`sine_position_embedding` with ``offset=-0.5`` at that pixel (DINO's
    ``gen_sineembed_for_position`` makes the same choice: its query positions use this order).
    ``order="xy"`` keeps ``(cx, cy, w, h)`` as given: Deformable DETR's two-stage
    ``get_proposal_pos_embed`` (``models/deformable_transformer.py``) embeds the proposals so.

    Args:
        boxes: (..., 2) points or (..., 4) boxes, normalised to [0, 1].
        num_pos_feats: F channels per coordinate.
        temperature: T.
        scale: coordinates are multiplied by it (2 pi, as the image embedding).
        order: "yx" (DINO's query positions) or "xy" (Deformable DETR's two-stage proposals).

    Returns:
        (..., D * F) with D = 2 or 4.
    """
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"boxes must end in 2 (x, y) or 4 (cx, cy, w, h), got shape {tuple(boxes.shape)}")
    if order not in ("yx", "xy"):
        raise ValueError(f"order must be 'yx' or 'xy', got {order!r}")
    if order == "yx":
        index = [1, 0] if boxes.shape[-1] == 2 else [1, 0, 2, 3]  # (y, x) first, as the image embedding
        boxes = boxes[..., index]  # (..., D)
    coords = boxes * scale  # (..., D)
    feats = _sine_features(coords, num_pos_feats, temperature)  # (..., D, F)
    return feats.flatten(-2)  # (..., D*F)


class QueryPositionFromBox(nn.Module):
    """A decoder query's positional embedding from its reference box: sine features -> 2-layer MLP.

    DAB-DETR's idea ("dynamic anchor boxes", Liu et al. 2022, Sec. 4.2): the query position is a
    function of the current reference box, recomputed every decoder layer as the box is refined, so
    that the position the query attends with always matches the box it predicts. DINO keeps it.

    Args:
        embed_dim: C; each coordinate gets C/2 sine channels, so the MLP's input is D * C / 2.
        box_dim: D = 4 for boxes (two-stage, DINO) or 2 for points.
        temperature: T of the sine features.
    """

    def __init__(self, *, embed_dim: int = 256, box_dim: int = 4, temperature: float = 10000.0) -> None:
        super().__init__()
        if box_dim not in (2, 4):
            raise ValueError(f"box_dim must be 2 or 4, got {box_dim}")
        if embed_dim % 4 != 0:
            raise ValueError(f"embed_dim must be divisible by 4 (C/2 even sine channels), got {embed_dim}")
        self.box_dim = box_dim
        self.num_pos_feats = embed_dim // 2
        self.temperature = temperature
        self.mlp = MLP(
            input_dim=box_dim * embed_dim // 2, hidden_dim=embed_dim, output_dim=embed_dim, num_layers=2
        )

    def forward(self, boxes: Tensor) -> Tensor:
        """boxes (B, Nq, D) normalised -> query_pos (B, Nq, C)."""
        if boxes.shape[-1] != self.box_dim:
            raise ValueError(f"expected boxes ending in {self.box_dim}, got shape {tuple(boxes.shape)}")
        sine = box_sine_embedding(
            boxes, num_pos_feats=self.num_pos_feats, temperature=self.temperature
        )  # (B, Nq, D*C/2)
        return self.mlp(sine)  # (B, Nq, C)
