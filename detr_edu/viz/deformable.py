"""Chapter 02 pictures: where multi-scale deformable attention samples, and what it costs.

Everything is drawn in normalised image coordinates (x right, y down, [0, 1] x [0, 1]), so every
level of a pyramid lines up with the photograph whatever its resolution. The helpers that compute
(pyramid, the layer's initial pattern, pixels read, coverage) are separate from the functions that
draw, and are tested in ``tests/test_deformable.py``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter
from torch import Tensor

from detr_edu.deformable import (
    MultiScaleDeformableAttention,
    deformable_sampling,
    level_start_index_from_shapes,
)

__all__ = [
    "HEAD_COLOURS",
    "image_pyramid",
    "initial_sampling",
    "pixels_read",
    "coverage_fraction",
    "plot_conventions",
    "plot_sampling_points",
    "sampling_view",
    "plot_offset_normalisation",
    "plot_coverage",
    "plot_cost",
]

HEAD_COLOURS = plt.get_cmap("tab10").colors


def image_pyramid(image: Tensor, *, base_hw: tuple[int, int], num_levels: int) -> list[Tensor]:
    """Area-resize a (3, H, W) image to ``base_hw``, then halve (rounding up) ``num_levels - 1`` times.

    Stands in for a backbone's stride-8/16/32/64 maps: level l has ceil(H_0 / 2^l) rows, as a
    stride-2 convolution with padding produces (hence 25 x 38 -> 13 x 19 on COCO-sized inputs).
    Returns a list of (3, H_l, W_l) tensors.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    levels = [F.interpolate(image[None], size=base_hw, mode="area")[0]]  # (3, H0, W0)
    for _ in range(num_levels - 1):
        h, w = levels[-1].shape[-2:]
        levels.append(F.interpolate(levels[-1][None], size=(-(-h // 2), -(-w // 2)), mode="area")[0])
    return levels


@torch.no_grad()
def initial_sampling(
    *,
    reference: Tensor,
    spatial_shapes: Tensor,
    num_heads: int = 8,
    num_points: int = 4,
    offset_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Sampling locations and weights of a freshly initialised layer for one query.

    Builds :class:`MultiScaleDeformableAttention` with the paper's initialisation, multiplies the
    offset bias by ``offset_scale`` (a stand-in for what training does to the ring) and runs it on a
    zero query, so the offsets are exactly the initial ring and the weights exactly uniform.

    Args:
        reference: (2,) point (x, y) or (4,) box (cx, cy, w, h), normalised; used on every level.
        spatial_shapes: (L, 2) long (H, W).

    Returns:
        ``(locations (nh, L, P, 2), weights (nh, L, P))``.
    """
    if reference.shape not in ((2,), (4,)):
        raise ValueError(f"reference must be (2,) or (4,), got shape {tuple(reference.shape)}")
    L = spatial_shapes.shape[0]
    layer = MultiScaleDeformableAttention(
        embed_dim=4 * num_heads, num_heads=num_heads, num_levels=L, num_points=num_points, dropout=0.0
    )
    layer.sampling_offsets.bias.mul_(offset_scale)
    Nv = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    query = torch.zeros(1, 1, 4 * num_heads)  # (B, Nq, C)
    value = torch.zeros(1, Nv, 4 * num_heads)  # (B, Nv, C)
    ref = reference.float().expand(1, 1, L, reference.shape[0])  # (B, Nq, L, 2|4)
    _, locations, weights = layer(
        query,
        value=value,
        reference_points=ref,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index_from_shapes(spatial_shapes),
        return_sampling=True,
    )
    return locations[0, 0], weights[0, 0]  # (nh, L, P, 2), (nh, L, P)


def _read_masks(locations: Tensor, spatial_shapes: Tensor) -> list[Tensor]:
    """Per level, a (H_l, W_l) bool map of the pixels that receive a nonzero bilinear weight."""
    masks = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        xy = locations[..., lvl, :, :].reshape(-1, 2).double()  # (n, 2) all samples of this level
        x_px = xy[:, 0] * w - 0.5  # pixel centres at integers
        y_px = xy[:, 1] * h - 0.5
        x0, y0 = x_px.floor().long(), y_px.floor().long()
        fx, fy = x_px - x0, y_px - y0
        mask = torch.zeros(h, w, dtype=torch.bool)
        for dy, dx, c in (
            (0, 0, (1 - fx) * (1 - fy)),
            (0, 1, fx * (1 - fy)),
            (1, 0, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            yy, xx = y0 + dy, x0 + dx
            keep = (c > 0) & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            mask[yy[keep], xx[keep]] = True
        masks.append(mask)
    return masks


def pixels_read(locations: Tensor, spatial_shapes: Tensor) -> list[int]:
    """How many distinct pixels of each level the samples read (nonzero bilinear weight, inside the map).

    Args:
        locations: (..., L, P, 2) normalised (x, y), e.g. (nh, L, P, 2) for one query.
        spatial_shapes: (L, 2) long (H, W).
    """
    return [int(m.sum()) for m in _read_masks(locations, spatial_shapes)]


def coverage_fraction(locations: Tensor, spatial_shapes: Tensor) -> float:
    """Fraction of the image area covered by the pixels the samples read, over all levels.

    A level-l pixel covers a (1 / W_l) x (1 / H_l) rectangle of the image; the union of the read
    pixels' rectangles is rasterised on the finest level's grid (level 0 must be the finest).
    """
    masks = _read_masks(locations, spatial_shapes)
    h0, w0 = masks[0].shape
    union = torch.zeros(h0, w0, dtype=torch.bool)
    ys = (torch.arange(h0) + 0.5) / h0  # fine pixel centres, normalised
    xs = (torch.arange(w0) + 0.5) / w0
    for mask in masks:
        h, w = mask.shape
        rows = (ys * h).long().clamp(max=h - 1)  # the level-l pixel holding each fine centre
        cols = (xs * w).long().clamp(max=w - 1)
        union |= mask[rows][:, cols]
    return float(union.float().mean())


def _show_level(ax: plt.Axes, level_image: Tensor, title: str) -> None:
    h, w = level_image.shape[-2:]
    ax.imshow(level_image.permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, 1, 1, 0), interpolation="nearest")
    ax.set_aspect(h / w)
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def _draw_reference(ax: plt.Axes, reference: Tensor) -> None:
    ref = reference.tolist()
    if len(ref) == 4:
        cx, cy, bw, bh = ref
        ax.add_patch(
            Rectangle((cx - bw / 2, cy - bh / 2), bw, bh, fill=False, edgecolor="white", linewidth=1.5)
        )
    ax.plot(ref[0], ref[1], marker="*", markersize=13, color="white", markeredgecolor="black")


def plot_conventions(grid: Tensor) -> Figure:
    """Coordinate conventions of the sampler on a small (H, W) map.

    Left: the map in normalised coordinates, each pixel centre labelled with its (x, y); the top
    axis gives the ``grid_sample`` coordinate 2 x - 1. Right: values sampled along the middle row,
    from outside the left edge to outside the right edge: exact at pixel centres, linear between,
    fading to zero within half a pixel outside (zero padding), zero beyond.
    """
    if grid.dim() != 2:
        raise ValueError(f"grid must be (H, W), got shape {tuple(grid.shape)}")
    h, w = grid.shape
    grid = grid.double()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1.3]})
    ax.imshow(grid.numpy(), extent=(0, 1, 1, 0), cmap="viridis", interpolation="nearest")
    ax.set_aspect(h / w)
    for i in range(h):
        for j in range(w):
            x, y = (j + 0.5) / w, (i + 0.5) / h
            ax.plot(x, y, "o", color="white", markersize=4)
            ax.annotate(
                f"({x:.3g}, {y:.3g})",
                (x, y),
                textcoords="offset points",
                xytext=(0, -11),
                ha="center",
                fontsize=6,
                color="white",
            )
    ax.set_xlabel("x (normalised); dots: pixel centres ((j + 0.5) / W, (i + 0.5) / H)", fontsize=8)
    ax.set_ylabel("y (normalised)", fontsize=8)
    top = ax.secondary_xaxis("top", functions=(lambda x: 2 * x - 1, lambda u: (u + 1) / 2))
    top.set_xlabel("grid_sample x = 2 x - 1 (align_corners=False)", fontsize=8)
    ax.tick_params(labelsize=7)
    top.tick_params(labelsize=7)

    row = h // 2
    xs = torch.linspace(-0.4, 1.4, 361, dtype=torch.float64)
    loc = torch.stack([xs, torch.full_like(xs, (row + 0.5) / h)], dim=-1).view(1, -1, 1, 1, 1, 2)
    value = grid.reshape(1, h * w, 1, 1)  # (B, Nv, nh, hd)
    sampled = deformable_sampling(
        value, torch.tensor([[h, w]]), loc, torch.ones(1, xs.numel(), 1, 1, 1, dtype=torch.float64)
    )
    ax2.plot(xs.numpy(), sampled.view(-1).numpy(), color="tab:blue", label="bilinear sample (zero padding)")
    centres = (torch.arange(w) + 0.5) / w
    ax2.plot(centres.numpy(), grid[row].numpy(), "o", color="black", label=f"pixel values of row {row}")
    for edge in (0.0, 1.0):
        ax2.axvline(edge, color="grey", linestyle="--", linewidth=0.8)
    ax2.axvspan(-0.4, 0.0, color="grey", alpha=0.12)
    ax2.axvspan(1.0, 1.4, color="grey", alpha=0.12, label="outside the map")
    ax2.set_xlabel("x (normalised)", fontsize=8)
    ax2.set_ylabel("sampled value", fontsize=8)
    ax2.set_title(f"sampling along row {row}: linear between centres, zero outside", fontsize=9)
    ax2.legend(fontsize=7, loc="upper right")
    ax2.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def plot_sampling_points(
    pyramid: list[Tensor],
    locations: Tensor,
    weights: Tensor,
    *,
    reference: Tensor,
    head: int | None = None,
    levels: list[int] | None = None,
    title: str = "",
) -> Figure:
    """Every head's sampling points on every level, drawn over the photograph at that level's resolution.

    With all heads (``head=None``) the colour says the head and the dot area the attention weight;
    with one head the colour and the area both say the weight. The star is the reference point (the
    same on every level); a 4-d reference also draws its box.

    Args:
        pyramid: L images (3, H_l, W_l) in [0, 1].
        locations: (nh, L, P, 2) normalised (x, y) for one query.
        weights: (nh, L, P).
        reference: (2,) or (4,), normalised.
        head: draw only this head.
        levels: draw only these levels (default: all).
    """
    nh, L, P, _ = locations.shape
    if len(pyramid) != L or tuple(weights.shape) != (nh, L, P):
        raise ValueError(
            f"pyramid has {len(pyramid)} levels, locations {tuple(locations.shape)}, weights "
            f"{tuple(weights.shape)}: need L images and (nh, L, P) weights"
        )
    if head is not None and not 0 <= head < nh:
        raise ValueError(f"head must be in [0, {nh}), got {head}")
    levels = list(range(L)) if levels is None else levels
    heads = range(nh) if head is None else [head]
    w_max = float(weights[list(heads)].max())
    fig, axes = plt.subplots(1, len(levels), figsize=(3.3 * len(levels), 3.0), squeeze=False)
    for ax, lvl in zip(axes[0], levels, strict=True):
        h, w = pyramid[lvl].shape[-2:]
        _show_level(ax, pyramid[lvl], f"level {lvl}: {h} x {w}")
        _draw_reference(ax, reference)
        for hd in heads:
            xy = locations[hd, lvl].numpy()  # (P, 2)
            wt = weights[hd, lvl].numpy()  # (P,)
            size = 12 + 110 * wt / w_max
            if head is None:
                ax.scatter(
                    xy[:, 0],
                    xy[:, 1],
                    s=size,
                    color=HEAD_COLOURS[hd % 10],
                    edgecolors="black",
                    linewidths=0.4,
                )
            else:
                sc = ax.scatter(
                    xy[:, 0],
                    xy[:, 1],
                    s=size,
                    c=wt,
                    cmap="plasma",
                    vmin=0,
                    vmax=w_max,
                    edgecolors="black",
                    linewidths=0.4,
                )
        if head is not None and lvl == levels[-1]:
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    what = "all heads (colour = head)" if head is None else f"head {head} (colour = weight)"
    uniform = bool(torch.allclose(weights, weights.flatten()[0].expand_as(weights)))
    area = "dot area = attention weight" + (f" (all equal here: 1/{L * P})" if uniform else "")
    fig.suptitle(f"{title} -- {what}, {area}", fontsize=10)
    fig.tight_layout()
    return fig


def sampling_view(
    pyramid: list[Tensor],
    *,
    x: float = 0.5,
    y: float = 0.5,
    head: int = -1,
    level: int = -1,
    num_points: int = 4,
    offset_scale: float = 1.0,
    box: bool = False,
    box_w: float = 0.3,
    box_h: float = 0.3,
    num_heads: int = 8,
) -> Figure:
    """The chapter's widget view: the initial sampling pattern of one query, redrawn from its settings.

    ``head=-1`` and ``level=-1`` mean all; ``box`` switches from a 2-d reference point (offsets in
    each level's pixels) to a 4-d box (offsets in box units, ``w, h * 0.5 / P``).
    """
    shapes = torch.tensor([list(p.shape[-2:]) for p in pyramid], dtype=torch.long)  # (L, 2)
    reference = torch.tensor([x, y, box_w, box_h] if box else [x, y])
    locations, weights = initial_sampling(
        reference=reference,
        spatial_shapes=shapes,
        num_heads=num_heads,
        num_points=num_points,
        offset_scale=offset_scale,
    )
    kind = f"4-d box w={box_w:.2f}, h={box_h:.2f}" if box else "2-d point"
    return plot_sampling_points(
        pyramid,
        locations,
        weights,
        reference=reference,
        head=None if head < 0 else head,
        levels=None if level < 0 else [level],
        title=f"P={num_points}, offset x{offset_scale:g}, {kind}",
    )


def plot_offset_normalisation(pyramid: list[Tensor], offsets_px: Tensor, *, reference: Tensor) -> Figure:
    """The same predicted offsets with per-level normalisation (top) and one normalisation by the
    finest level (bottom), drawn on every level with the level's pixel grid.

    Args:
        pyramid: L images (3, H_l, W_l), level 0 the finest.
        offsets_px: (nh, P, 2) offsets as the linear layer predicts them (the same on every level).
        reference: (2,) normalised point.
    """
    shapes = torch.tensor([list(p.shape[-2:]) for p in pyramid], dtype=torch.long)  # (L, 2)
    L = len(pyramid)
    wh = shapes.flip(-1).double()  # (L, 2) as (W, H)
    per_level = reference.double() + offsets_px.double()[:, None] / wh[None, :, None, :]  # (nh, L, P, 2)
    finest = reference.double() + offsets_px.double()[:, None] / wh[0]  # (nh, 1, P, 2)
    finest = finest.expand(-1, L, -1, -1)  # (nh, L, P, 2)
    rows = [
        ("offsets / (W_l, H_l) of each level", per_level),
        ("offsets / (W_0, H_0) on every level", finest),
    ]
    fig, axes = plt.subplots(2, L, figsize=(3.2 * L, 5.6))
    for r, (name, locs) in enumerate(rows):
        counts = pixels_read(locs, shapes)
        for lvl in range(L):
            ax = axes[r, lvl]
            h, w = shapes[lvl].tolist()
            _show_level(ax, pyramid[lvl], f"level {lvl} ({h}x{w}): reads {counts[lvl]} px")
            for j in range(1, w):
                ax.axvline(j / w, color="white", linewidth=0.3, alpha=0.6)
            for i in range(1, h):
                ax.axhline(i / h, color="white", linewidth=0.3, alpha=0.6)
            for hd in range(locs.shape[0]):
                xy = locs[hd, lvl].numpy()
                ax.scatter(
                    xy[:, 0], xy[:, 1], s=14, color=HEAD_COLOURS[hd % 10], edgecolors="black", linewidths=0.3
                )
            ax.plot(*reference.tolist(), marker="*", markersize=10, color="white", markeredgecolor="black")
            if lvl == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(
        "Q1: the same offsets (the initial ring, 1..P pixels) normalised per level vs by the finest level",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_coverage(results: dict[str, list[tuple[int, float, float]]]) -> Figure:
    """Q3: coverage and reach against samples per head, one line per way of adding samples.

    Args:
        results: name -> list of (samples per head L * P, coverage fraction, reach) rows, where
            reach is the largest distance of a sample from the reference (normalised units).
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for name, rows in results.items():
        k, cov, reach = zip(*rows, strict=True)
        ax1.plot(k, cov, "o-", label=name)
        ax2.plot(k, reach, "o-", label=name)
    ax1.set_ylabel("fraction of the image read", fontsize=8)
    ax2.set_ylabel("reach (normalised image units)", fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xlabel("samples per head (L x P)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    ax1.set_title("area the query can see", fontsize=9)
    ax2.set_title("farthest sample from the reference", fontsize=9)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_cost(
    tokens: list[int], seconds: dict[str, list[float]], megabytes: dict[str, list[float]]
) -> Figure:
    """Time and memory of forward+backward against the number of tokens (every token a query).

    Args:
        tokens: Nv values (x axis).
        seconds: method -> time per forward+backward (nan where not run).
        megabytes: method -> memory in MB (nan where not run).
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for name in seconds:
        ax1.plot(tokens, seconds[name], "o-", label=name)
    for name in megabytes:
        ax2.plot(tokens, megabytes[name], "o-", label=name)
    for ax, label in ((ax1, "seconds (forward + backward)"), (ax2, "MB saved for backward")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(tokens, [str(n) for n in tokens])  # label the measured sizes only
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens Nv (= queries Nq, encoder)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    ax1.set_title("time", fontsize=9)
    ax2.set_title("activation memory", fontsize=9)
    fig.tight_layout()
    return fig
