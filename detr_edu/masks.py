"""Padding masks: the valid (unpadded) size of every image of a batch, in one place.

A batch of images of different sizes is padded at the bottom and the right (DETR's
``NestedTensor`` convention); its mask is True on padding. Everything that needs to know how
much of a map is image -- the per-level masks of the backbone, the valid ratios of the deformable
transformer, the two-stage proposals -- asks :func:`valid_sizes`, which returns ``(h, w)`` in
pixels. Code that wants ``(x, y)`` order (valid ratios) flips it where it says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["valid_sizes"]


def valid_sizes(masks: Tensor, *, check: bool = True) -> Tensor:
    """Each image's valid (unpadded) size from a padding mask.

    The valid height is the number of valid pixels in the first column and the valid width that in
    the first row. With ``check`` the mask must be exactly that top-left rectangle with at least one
    valid pixel, and anything else raises; pass ``check=False`` only where the mask was validated
    already (a model's internal levels), since the check reads the whole mask.

    Args:
        masks: (B, H, W) bool, True = padding.
        check: validate the rectangle (see above).

    Returns:
        (B, 2) long: valid (h, w) of each image.
    """
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a boolean (B, H, W) tensor, got {masks.dtype} {tuple(masks.shape)}")
    valid = ~masks  # (B, H, W)
    h = valid[:, :, 0].sum(1)  # (B,) rows whose first pixel is valid
    w = valid[:, 0, :].sum(1)  # (B,) columns whose first pixel is valid
    if check:
        H, W = masks.shape[-2:]
        rows = torch.arange(H, device=masks.device)[None, :, None] < h[:, None, None]  # (B, H, 1)
        cols = torch.arange(W, device=masks.device)[None, None, :] < w[:, None, None]  # (B, 1, W)
        if not torch.equal(valid, rows & cols):
            raise ValueError(
                "masks must pad images at the bottom/right only (valid region = top-left rectangle)"
            )
        if (h == 0).any() or (w == 0).any():
            raise ValueError(
                f"an image of the batch has no valid pixel (valid sizes h={h.tolist()}, w={w.tolist()})"
            )
    return torch.stack([h, w], dim=1)  # (B, 2)
