"""Pictures of chapter 04 (the forward pass): feature levels, masks, proposals, reference paths, sampling.

Pure functions: tensors in, a matplotlib figure out. Images are (3, H, W) in [0, 1] (not normalised);
boxes are normalised cxcywh relative to the image's own size ``(h, w)``; pixel coordinates put pixel
centres on integers (imshow's convention), so a normalised x maps to ``x * w - 0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

__all__ = [
    "plot_feature_levels",
    "plot_proposals",
    "plot_reference_path",
    "plot_query_sampling",
    "plot_mixed_query_selection",
    "plot_gradient_flow",
    "plot_model_costs",
]

LEVEL_COLOURS = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown"]


def _show_image(ax: Axes, image: Tensor, size: tuple[int, int] | None = None) -> None:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) in [0, 1], got shape {tuple(image.shape)}")
    if size is not None:
        image = image[:, : size[0], : size[1]]
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_box(ax: Axes, box_cxcywh: Sequence[float], size: tuple[int, int], **style) -> None:
    h, w = size
    cx, cy, bw, bh = (float(v) for v in box_cxcywh)
    ax.add_patch(
        Rectangle(((cx - bw / 2) * w - 0.5, (cy - bh / 2) * h - 0.5), bw * w, bh * h, fill=False, **style)
    )


def plot_feature_levels(
    features: Sequence[Tensor], masks: Sequence[Tensor], images: Tensor, *, strides: Sequence[int]
) -> Figure:
    """Mean ``|activation|`` of every level for every image of a padded batch, padding hatched.

    Args:
        features: L maps (B, C, H_l, W_l).
        masks: L masks (B, H_l, W_l), True = padding.
        images: (B, 3, H, W) in [0, 1], the padded batch as displayed.
        strides: stride of every level.
    """
    if len(features) != len(masks) or len(features) != len(strides):
        raise ValueError(f"got {len(features)} levels, {len(masks)} masks and {len(strides)} strides")
    B, L = images.shape[0], len(features)
    fig, axes = plt.subplots(B, L + 1, figsize=(2.1 * (L + 1), 2.2 * B), squeeze=False)
    for b in range(B):
        _show_image(axes[b, 0], images[b])
        axes[b, 0].set_title(f"image {b} (padded batch)", fontsize=8)
        for lvl, (f, m) in enumerate(zip(features, masks, strict=True)):
            ax = axes[b, lvl + 1]
            energy = f[b].abs().mean(0).detach().cpu().numpy()  # (H_l, W_l)
            ax.imshow(energy, cmap="viridis")
            pad = np.ma.masked_where(~m[b].cpu().numpy(), np.ones_like(energy))
            ax.imshow(pad, cmap="Greys", alpha=0.6, vmin=0, vmax=1.5)
            H_l, W_l = energy.shape
            valid_h, valid_w = int((~m[b][:, 0]).sum()), int((~m[b][0]).sum())
            ax.set_title(
                f"level {lvl}: stride {strides[lvl]}\n{H_l}x{W_l}, valid {valid_h}x{valid_w}", fontsize=8
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Backbone + neck: mean |feature| per level (grey = padding)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_proposals(
    image: Tensor,
    size: tuple[int, int],
    boxes_cxcywh: Tensor,
    levels: Tensor,
    *,
    title: str = "",
    ax: Axes | None = None,
) -> Figure:
    """Selected two-stage proposals on the (padded) image, coloured by the level they come from.

    Args:
        image: (3, H, W) the padded image in [0, 1]; the valid part is ``size = (h, w)``.
        size: the image's valid (h, w) in pixels; boxes are normalised to it.
        boxes_cxcywh: (K, 4) selected boxes.
        levels: (K,) level of each selected box.
        title: axes title.
        ax: draw into this axes instead of a new figure.
    """
    fig = ax.figure if ax is not None else plt.figure(figsize=(4.2, 4.2))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    _show_image(ax, image)
    h, w = size
    H, W = image.shape[1:]
    if (h, w) != (H, W):
        ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, ec="white", ls="--", lw=1.0))
        ax.text(w - 1, h + 2, "padding ->", color="white", fontsize=7, ha="right", va="top")
    for box, lvl in zip(boxes_cxcywh.tolist(), levels.tolist(), strict=True):
        _draw_box(ax, box, size, ec=LEVEL_COLOURS[lvl % len(LEVEL_COLOURS)], lw=1.0, alpha=0.9)
    for lvl in sorted(set(levels.tolist())):
        ax.plot([], [], color=LEVEL_COLOURS[lvl % len(LEVEL_COLOURS)], label=f"level {lvl}")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=9)
    return fig


def plot_reference_path(
    image: Tensor, size: tuple[int, int], references: Tensor, queries: Sequence[int], *, title: str = ""
) -> Figure:
    """The reference box of a few queries through the decoder layers (the refinement path).

    Args:
        image: (3, H, W) in [0, 1].
        size: valid (h, w).
        references: (S, Nq, 4) boxes per step: the initial reference, then every layer's box.
        queries: which queries to draw.
        title: figure title.
    """
    S = references.shape[0]
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    _show_image(ax, image, size)
    h, w = size
    cmap = plt.get_cmap("tab10")
    for n, q in enumerate(queries):
        colour = cmap(n % 10)
        path = references[:, q].detach().cpu()  # (S, 4)
        for s in range(S):
            _draw_box(
                ax,
                path[s].tolist(),
                size,
                ec=colour,
                lw=0.6 + 1.4 * s / max(S - 1, 1),
                alpha=0.35 + 0.65 * s / max(S - 1, 1),
                ls="--" if s == 0 else "-",
            )
        ax.plot(
            path[:, 0] * w - 0.5, path[:, 1] * h - 0.5, "-o", color=colour, ms=3, lw=1, label=f"query {q}"
        )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or "Reference boxes, layer by layer (dashed: initial, thick: last)", fontsize=9)
    return fig


def plot_query_sampling(
    image: Tensor,
    size: tuple[int, int],
    reference_box: Tensor,
    locations: Tensor,
    weights: Tensor,
    level_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    *,
    title: str = "",
) -> Figure:
    """One query of one decoder layer: its reference box and its sampling points, one panel per level.

    Each panel draws the level's pixel grid (one cell per feature pixel), so the same box-relative
    pattern is seen landing on finer or coarser cells.

    Args:
        image: (3, H, W) the padded image in [0, 1].
        size: valid (h, w).
        reference_box: (4,) normalised cxcywh (image frame).
        locations: (nh, L, P, 2) sampling locations in each level's padded frame, (x, y) in [0, 1].
        weights: (nh, L, P) attention weights (marker area).
        level_shapes: padded (H_l, W_l) per level; strides: per level (padded frame -> pixels).
        title: figure title.
    """
    nh, L, P, _ = locations.shape
    if weights.shape != (nh, L, P) or len(level_shapes) != L or len(strides) != L:
        raise ValueError(
            f"locations {tuple(locations.shape)}, weights {tuple(weights.shape)}, "
            f"{len(level_shapes)} shapes and {len(strides)} strides do not describe the same L levels"
        )
    fig, axes = plt.subplots(1, L, figsize=(2.6 * L, 2.9), squeeze=False)
    H, W = image.shape[1:]
    w_max = float(weights.max())
    for lvl, ax in enumerate(axes[0]):
        _show_image(ax, image)
        H_l, W_l = level_shapes[lvl]
        s = strides[lvl]
        for i in range(1, H_l):
            ax.axhline(i * s - 0.5, color="white", lw=0.3, alpha=0.5)
        for j in range(1, W_l):
            ax.axvline(j * s - 0.5, color="white", lw=0.3, alpha=0.5)
        _draw_box(ax, reference_box.tolist(), size, ec="white", lw=1.5)
        xy = locations[:, lvl].reshape(-1, 2).detach().cpu()  # (nh*P, 2)
        wt = weights[:, lvl].reshape(-1).detach().cpu()  # (nh*P,)
        ax.scatter(
            xy[:, 0] * W_l * s - 0.5,
            xy[:, 1] * H_l * s - 0.5,
            s=6 + 60 * wt / w_max,
            color=LEVEL_COLOURS[lvl % len(LEVEL_COLOURS)],
            edgecolors="black",
            linewidths=0.3,
        )
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.set_title(f"level {lvl}: stride {s}, {nh}x{P} points", fontsize=8)
    fig.suptitle(title or "Reference box (white) and sampling points per level", fontsize=10)
    fig.tight_layout()
    return fig


def plot_mixed_query_selection(
    image: Tensor, size: tuple[int, int], anchors_cxcywh: Tensor, content: Tensor, query_pos: Tensor
) -> Figure:
    """DINO's mixed query selection: anchors from the proposals, content learnable.

    Args:
        image: (3, H, W) in [0, 1]; size: valid (h, w).
        anchors_cxcywh: (Nq, 4) detached top-K proposals (the *position* part).
        content: (Nq, C) the learnable content queries (``tgt_embed``).
        query_pos: (Nq, C) query positions computed from the anchors (sine + MLP); drawn minus their
            mean over the queries (each channel's untrained offset would otherwise show as stripes).
    """
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    _show_image(axes[0], image, size)
    for box in anchors_cxcywh.tolist():
        _draw_box(axes[0], box, size, ec="yellow", lw=0.8)
    axes[0].set_title("anchors = top-K proposals\n(from the encoder, detached)", fontsize=9)
    for ax, mat, name, cmap in (
        (
            axes[1],
            query_pos - query_pos.mean(0, keepdim=True),
            "query_pos = MLP(sine(anchor)), recomputed\nevery layer; minus its mean over queries",
            "coolwarm",
        ),
        (axes[2], content, "content = tgt_embed.weight\n(learnable, same for every image)", "PiYG"),
    ):
        m = mat.detach().cpu()
        lim = float(m.abs().max())
        ax.imshow(m.numpy(), aspect="auto", cmap=cmap, vmin=-lim, vmax=lim)
        ax.set_xlabel("channel")
        ax.set_ylabel("query")
        ax.set_title(name, fontsize=9)
    fig.suptitle("DINO's decoder queries: position from proposals, content learned", fontsize=10)
    fig.tight_layout()
    return fig


def plot_gradient_flow(table: dict[str, dict[str, bool]], *, title: str = "") -> Figure:
    """Which parameter groups receive gradient (rows) in each setting (columns).

    Args:
        table: ``{setting: {group: receives_gradient}}``, every setting with the same groups.
        title: figure title.
    """
    settings = list(table)
    if not settings:
        raise ValueError("table is empty")
    groups = list(table[settings[0]])
    grid = np.array([[table[s][g] for s in settings] for g in groups], dtype=float)  # (groups, settings)
    fig, ax = plt.subplots(figsize=(1.6 + 1.7 * len(settings), 0.8 + 0.32 * len(groups)))
    ax.imshow(grid, cmap="Greens", vmin=-0.3, vmax=2.0, aspect="auto")
    for i in range(len(groups)):
        for j in range(len(settings)):
            ax.text(j, i, "yes" if grid[i, j] else "no", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(settings)), settings, fontsize=8)
    ax.set_yticks(range(len(groups)), groups, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_model_costs(
    names: Sequence[str], milliseconds: Sequence[float], parameters_m: Sequence[float]
) -> Figure:
    """Bar charts of forward time per image and parameter count for several models."""
    if not (len(names) == len(milliseconds) == len(parameters_m)):
        raise ValueError("names, milliseconds and parameters_m need the same length")
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    colours = LEVEL_COLOURS[: len(names)]
    axes[0].barh(list(names), list(milliseconds), color=colours)
    axes[0].set_xlabel("forward time per image (ms, CPU)")
    axes[1].barh(list(names), list(parameters_m), color=colours)
    axes[1].set_xlabel("parameters (millions)")
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle("Cost per image at 128 px (course CPU presets)", fontsize=10)
    fig.tight_layout()
    return fig
