"""ViT-style patches of a real photograph, and where one patch attends when the projections are the
identity (so attention weights are pure similarity). Used by chapter 01's pictures and widget."""

from __future__ import annotations

import torch
from torch import Tensor

from detr_edu.attention import expand_key_padding_mask, scaled_dot_product_attention

__all__ = ["image_to_patches", "patch_attention_map"]


def image_to_patches(image: Tensor, patch_size: int) -> tuple[Tensor, tuple[int, int]]:
    """Cut a (3, H, W) image into non-overlapping patches, as a ViT does.

    The image is cropped to a multiple of ``patch_size``. Features are channel-major: the first
    p*p numbers of a patch are its red pixels, then green, then blue -- so splitting the feature
    vector into 3 heads gives one colour channel per head.

    Returns:
        patches (N, 3*p*p) with N = gh*gw, and the grid (gh, gw).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    _, H, W = image.shape
    if patch_size <= 0 or H < patch_size or W < patch_size:
        raise ValueError(f"patch_size {patch_size} does not fit an image of size {H}x{W}")
    gh, gw = H // patch_size, W // patch_size
    x = image[:, : gh * patch_size, : gw * patch_size]  # (3, gh*p, gw*p)
    x = x.reshape(3, gh, patch_size, gw, patch_size)  # (3, gh, p, gw, p)
    x = x.permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * patch_size * patch_size)  # (N, 3*p*p)
    return x, (gh, gw)


def patch_attention_map(
    image: Tensor,
    *,
    patch_size: int,
    query_rc: tuple[int, int],
    head: int | None = None,
    num_heads: int = 3,
    temperature: float = 1.0,
    pad_cols: int = 0,
    mask_padding: bool = True,
) -> Tensor:
    """Attention weights of one query patch over every patch, with identity q/k/v projections.

    Features are standardised per dimension over the image's real patches, so the dot product
    q.k / sqrt(d) measures similarity of appearance. ``pad_cols`` appends that many columns of zero
    (padding) patches on the right, as when this image sits in a batch with a wider one;
    ``mask_padding`` hides them with a key padding mask.

    Args:
        head: which of ``num_heads`` equal slices of the feature vector to use (``None``: all of
            it, one head). With the default 3 heads, head h is colour channel h.
        temperature: divides the scores; low = peaked, high = flat.

    Returns:
        weights (gh, gw + pad_cols), summing to 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if pad_cols < 0:
        raise ValueError(f"pad_cols must be >= 0, got {pad_cols}")
    patches, (gh, gw) = image_to_patches(image, patch_size)  # (N, D)
    row, col = query_rc
    if not (0 <= row < gh and 0 <= col < gw):
        raise ValueError(f"query patch {query_rc} is outside the {gh}x{gw} grid of real patches")
    mean, std = patches.mean(0), patches.std(0).clamp(min=1e-6)  # statistics of real patches only
    feats = (patches - mean) / std  # (N, D)
    grid = feats.reshape(gh, gw, -1)  # (gh, gw, D)
    if pad_cols:
        pad = ((torch.zeros_like(patches[:1]) - mean) / std).expand(gh * pad_cols, -1)  # zero pixels
        grid = torch.cat([grid, pad.reshape(gh, pad_cols, -1)], dim=1)  # (gh, gw + pad, D)
    D = grid.shape[-1]
    if head is not None:
        if D % num_heads != 0 or not (0 <= head < num_heads):
            raise ValueError(f"head {head} invalid for {num_heads} heads over {D} features")
        hd = D // num_heads
        grid = grid[..., head * hd : (head + 1) * hd]  # (gh, gw + pad, hd)
    keys = grid.reshape(1, -1, grid.shape[-1])  # (1, Nk, d)
    query = grid[row, col].reshape(1, 1, -1)  # (1, 1, d)
    attn_mask = None
    if pad_cols and mask_padding:
        key_padding_mask = torch.zeros(gh, gw + pad_cols, dtype=torch.bool)
        key_padding_mask[:, gw:] = True
        attn_mask = expand_key_padding_mask(key_padding_mask.reshape(1, -1), 1)  # (1, 1, Nk)
    scale = keys.shape[-1] ** -0.5 / temperature
    _, weights = scaled_dot_product_attention(query, keys, keys, attn_mask=attn_mask, scale=scale)
    return weights.reshape(gh, gw + pad_cols)  # (gh, gw + pad)
