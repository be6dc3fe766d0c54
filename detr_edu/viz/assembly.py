"""Chapter 03 pictures: sine channels, position similarity, padded levels, reference points, valid ratios."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from detr_edu.box_ops import box_cxcywh_to_xyxy
from detr_edu.levels import FlatLevels, encoder_reference_points

__all__ = [
    "plot_sine_channels",
    "plot_position_similarity",
    "plot_padded_levels",
    "plot_flat_sequence",
    "plot_encoder_reference_points",
    "plot_sampling_with_without_ratios",
]

_LEVEL_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def _check_chw(x: Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be (C, H, W), got shape {tuple(x.shape)}")


def plot_sine_channels(pos: Tensor, channels: Sequence[int]) -> Figure:
    """Show a few channels of one image's positional embedding (2F, H, W) side by side.

    Channels [0, F) encode y (they vary down the image), [F, 2F) encode x.
    """
    _check_chw(pos, "pos")
    F2 = pos.shape[0]
    if any(not 0 <= c < F2 for c in channels):
        raise ValueError(f"channels must lie in [0, {F2}), got {list(channels)}")
    fig, axes = plt.subplots(1, len(channels), figsize=(2.2 * len(channels), 2.6), squeeze=False)
    for ax, c in zip(axes[0], channels, strict=True):
        axis, k = ("y", c) if c < F2 // 2 else ("x", c - F2 // 2)
        kind = "sin" if k % 2 == 0 else "cos"
        ax.imshow(pos[c].detach().cpu().numpy(), cmap="RdBu", vmin=-1, vmax=1)
        ax.set_title(f"ch {c}: {kind}, {axis}, k={k // 2}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Sine positional embedding: low channels turn fast, high channels slowly", fontsize=10)
    fig.tight_layout()
    return fig


def plot_position_similarity(pos: Tensor, row: int, col: int) -> Figure:
    """Dot product of pixel (row, col)'s embedding with every pixel's: (2F, H, W) -> an (H, W) map.

    For sine embeddings ``sin a sin b + cos a cos b = cos(a - b)``, so the map depends only on the
    displacement from (row, col) and peaks there: positions near each other have similar embeddings.
    """
    _check_chw(pos, "pos")
    _, H, W = pos.shape
    if not (0 <= row < H and 0 <= col < W):
        raise ValueError(f"(row, col) = ({row}, {col}) outside the {H} x {W} map")
    sim = torch.einsum("c,chw->hw", pos[:, row, col], pos).detach().cpu().numpy()  # (H, W)
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    im = axes[0].imshow(sim, cmap="viridis")
    axes[0].plot([col], [row], marker="x", color="red", markersize=8)
    axes[0].set_title(f"<pos({row},{col}), pos(i,j)>", fontsize=9)
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    axes[1].plot(np.arange(W), sim[row], label=f"along row {row}")
    axes[1].plot(np.arange(H), sim[:, col], label=f"along column {col}")
    axes[1].axvline(col, color="tab:blue", linestyle=":")
    axes[1].axvline(row, color="tab:orange", linestyle=":")
    axes[1].set_xlabel("pixel index")
    axes[1].set_ylabel("dot product")
    axes[1].legend(fontsize=8)
    axes[1].set_title("a peak at the query's own position", fontsize=9)
    fig.tight_layout()
    return fig


def _show_image(ax, image: Tensor) -> None:
    ax.imshow(image.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy())


def plot_padded_levels(images: Tensor, level_masks: list[Tensor], strides: Sequence[int]) -> Figure:
    """A padded batch (B, 3, H, W) and each level's padding mask (B, H_l, W_l): one row per image.

    Padding is dark in the masks (True = padded). The image panel outlines the unpadded image.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if len(level_masks) != len(strides):
        raise ValueError(f"{len(level_masks)} masks but {len(strides)} strides")
    B = images.shape[0]
    L = len(level_masks)
    fig, axes = plt.subplots(B, L + 1, figsize=(2.6 * (L + 1), 2.3 * B), squeeze=False)
    for b in range(B):
        _show_image(axes[b, 0], images[b])
        axes[b, 0].set_title(f"image {b}: padded {images.shape[2]}x{images.shape[3]}", fontsize=8)
        for lvl, (m, s) in enumerate(zip(level_masks, strides, strict=True)):
            ax = axes[b, lvl + 1]
            mb = m[b].cpu().numpy().astype(float)
            ax.imshow(mb, cmap="Greys", vmin=0, vmax=1.6)
            h, w = mb.shape
            vh, vw = int((m[b][:, 0] == 0).sum()), int((m[b][0] == 0).sum())
            ax.set_title(f"level {lvl} (stride {s}): {h}x{w}, valid {vh}x{vw}", fontsize=8)
            ax.set_xticks(np.arange(-0.5, w), minor=True)
            ax.set_yticks(np.arange(-0.5, h), minor=True)
            ax.grid(which="minor", color="white", linewidth=0.4)
            ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        axes[b, 0].set_xticks([])
        axes[b, 0].set_yticks([])
    fig.suptitle("Padding masks per level (dark = padding)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_flat_sequence(flat: FlatLevels) -> Figure:
    """The flattened (B, Nv) padding mask as strips, level boundaries at ``level_start_index``."""
    mask = flat.mask.cpu().numpy().astype(float)  # (B, Nv)
    B, Nv = mask.shape
    fig, ax = plt.subplots(figsize=(10.0, 0.6 + 0.5 * B))
    ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.6, aspect="auto", interpolation="nearest")
    for lvl, s in enumerate(flat.level_start_index.tolist()):
        h, w = flat.spatial_shapes[lvl].tolist()
        colour = _LEVEL_COLOURS[lvl % len(_LEVEL_COLOURS)]
        ax.axvline(s - 0.5, color=colour, linewidth=2, label=f"level {lvl}: {h}x{w}, start {s}")
    ax.set_yticks(range(B))
    ax.set_yticklabels([f"image {b}" for b in range(B)], fontsize=8)
    ax.set_xlabel(f"token index (Nv = {Nv}); dark = padding; coloured lines = level_start_index")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_encoder_reference_points(
    spatial_shapes: Tensor, valid_ratios: Tensor, *, batch_index: int, source_level: int
) -> Figure:
    """Where the reference points of ``source_level``'s valid pixels land on every level.

    Top row: with the valid ratios (what the encoder uses); bottom row: with all ratios set to 1.
    Each panel is one level's padded grid in its own pixel units, valid region shaded; a dot is one
    source pixel's reference point on that level.
    """
    L = spatial_shapes.shape[0]
    if not 0 <= source_level < L:
        raise ValueError(f"source_level must lie in [0, {L}), got {source_level}")
    vr = valid_ratios[batch_index : batch_index + 1]  # (1, L, 2)
    starts = torch.cat([spatial_shapes.new_zeros(1), (spatial_shapes[:, 0] * spatial_shapes[:, 1]).cumsum(0)])
    H0, W0 = spatial_shapes[source_level].tolist()
    vw0, vh0 = (vr[0, source_level] * torch.tensor([W0, H0], dtype=vr.dtype)).round().long().tolist()
    rows = [i * W0 + j for i in range(vh0) for j in range(vw0)]  # valid pixels of the source level
    fig, axes = plt.subplots(2, L, figsize=(2.6 * L, 5.0), squeeze=False)
    for r, (name, ratios) in enumerate((("with valid ratios", vr), ("ratios set to 1", torch.ones_like(vr)))):
        ref = encoder_reference_points(spatial_shapes, ratios)[0]  # (Nv, L, 2)
        pts = ref[starts[source_level] + torch.tensor(rows)]  # (n, L, 2)
        for lvl in range(L):
            ax = axes[r, lvl]
            H, W = spatial_shapes[lvl].tolist()
            vw, vh = (vr[0, lvl] * torch.tensor([W, H], dtype=vr.dtype)).round().tolist()
            ax.add_patch(Rectangle((-0.5, -0.5), W, H, facecolor="0.85", edgecolor="black"))
            ax.add_patch(
                Rectangle((-0.5, -0.5), vw, vh, facecolor="white", edgecolor="tab:green", linewidth=1.5)
            )
            px = (
                pts[:, lvl].detach().cpu() * torch.tensor([W, H]) - 0.5
            )  # (n, 2) in pixel units, centres at integers
            ax.scatter(px[:, 0], px[:, 1], s=6, color=_LEVEL_COLOURS[source_level % len(_LEVEL_COLOURS)])
            ax.set_xlim(-0.7, W - 0.3)
            ax.set_ylim(H - 0.3, -0.7)
            ax.set_aspect("equal")
            ax.set_xticks(range(W))
            ax.set_yticks(range(H))
            ax.tick_params(labelsize=6)
            ax.set_title(f"{name}\non level {lvl} ({H}x{W}, valid {int(vh)}x{int(vw)})", fontsize=8)
    fig.suptitle(
        f"Encoder reference points of level {source_level}'s valid pixels (image {batch_index}); "
        "grey = padding, white = valid",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_sampling_with_without_ratios(
    image: Tensor,
    valid_hw: tuple[int, int],
    box_cxcywh: Tensor,
    locations_with: Tensor,
    locations_without: Tensor,
) -> Figure:
    """Where a decoder query samples on a padded image, with and without valid ratios.

    Args:
        image: (3, H, W) the padded canvas.
        valid_hw: (h, w) of the unpadded image inside it (top-left).
        box_cxcywh: (4,) the query's reference box, normalised to the *unpadded* image.
        locations_with / locations_without: (nh, L, P, 2) sampling locations, normalised to each level's
            padded frame (which is the canvas when the canvas is a multiple of every stride).
    """
    _check_chw(image, "image")
    _, H, W = image.shape
    h, w = valid_hw
    scale = torch.tensor([W, H], dtype=locations_with.dtype)
    box_xyxy = box_cxcywh_to_xyxy(box_cxcywh) * torch.tensor([w, h, w, h], dtype=box_cxcywh.dtype)  # pixels
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.6))
    for ax, name, loc in (
        (axes[0], "with valid ratios (p * r_l)", locations_with),
        (axes[1], "without (p used as padded-frame coordinate)", locations_without),
    ):
        _show_image(ax, image)
        ax.add_patch(
            Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="white", linestyle="--", linewidth=1)
        )
        x0, y0, x1, y1 = box_xyxy.tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=2))
        L = loc.shape[1]
        for lvl in range(L):
            px = (loc[:, lvl].reshape(-1, 2).detach().cpu() * scale).numpy()  # (nh*P, 2) pixels
            ax.scatter(
                px[:, 0] - 0.5,
                px[:, 1] - 0.5,
                s=10,
                color=_LEVEL_COLOURS[lvl % len(_LEVEL_COLOURS)],
                label=f"level {lvl}",
            )
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Decoder sampling points for one reference box (yellow); dashed = unpadded image", fontsize=10
    )
    fig.tight_layout()
    return fig
