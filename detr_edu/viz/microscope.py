"""Chapter 02's sampling microscope: one query of a multi-scale deformable attention layer, with every
sampling point movable and every weight editable, and what the layer computes from them.

The computation follows the layer (:class:`~detr_edu.deformable.MultiScaleDeformableAttention`) step
by step, but with the offsets and weights *given* instead of predicted:

1. :func:`predicted_pattern` -- the offsets and weights the layer's own linear maps predict from a
   query (the starting point, and the "move the query" mode);
2. :func:`move_point` / :func:`set_weight` -- the learner's edits (a head's weights stay a
   distribution: the other samples of the head share what is left, in their proportions);
3. :func:`read_out` -- locations, each sample's bilinear value, each head's weighted sum and the
   layer's output ``query + output_proj(heads)``; with the predicted pattern it equals the layer's
   forward pass (``tests/test_viz_microscope.py``);
4. :func:`bilinear_corners` -- the four pixels one sample reads, with their weights.

For the photograph the chapter uses a *colour layer* (:func:`colour_layer`): 3 channels per head and
identity value / output projections, so that what a head samples is a colour you can see.
:class:`SamplingMicroscope` is the widget: thin wiring of these functions to a clickable figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from detr_edu.deformable import (
    MultiScaleDeformableAttention,
    deformable_samples,
    level_start_index_from_shapes,
    offsets_to_locations,
)
from detr_edu.position import box_sine_embedding
from detr_edu.viz.deformable import HEAD_COLOURS

__all__ = [
    "SamplingPattern",
    "Corners",
    "Readout",
    "colour_layer",
    "pyramid_tokens",
    "pyramid_query",
    "predicted_pattern",
    "pattern_locations",
    "move_point",
    "set_weight",
    "nearest_point",
    "bilinear_corners",
    "read_out",
    "describe",
    "plot_microscope",
    "SamplingMicroscope",
]


@dataclass(frozen=True)
class SamplingPattern:
    """One query's sampling pattern, in the units the layer predicts.

    Attributes:
        reference: (2,) normalised (x, y), the same on every level.
        offsets: (nh, L, P, 2) in pixels of each level (the layer divides by (W_l, H_l)).
        weights: (nh, L, P), each head's L * P weights sum to 1.
    """

    reference: Tensor
    offsets: Tensor
    weights: Tensor


@dataclass(frozen=True)
class Corners:
    """The four pixels one bilinear sample reads (zero padding: pixels outside the map read 0).

    Attributes:
        rows, cols: (4,) long, the corners' pixel indices (may lie outside the map).
        weights: (4,) the bilinear weights (sum to 1).
        inside: (4,) bool, whether the corner is a pixel of the map.
    """

    rows: Tensor
    cols: Tensor
    weights: Tensor
    inside: Tensor


@dataclass(frozen=True)
class Readout:
    """What the layer computes from a pattern, for one query.

    Attributes:
        locations: (nh, L, P, 2) normalised sampling locations.
        samples: (nh, L, P, hd) the bilinearly sampled value (after ``value_proj``) of each point.
        heads: (nh, hd) each head's weighted sum of its samples.
        output: (C,) the layer's output for the query, ``query + output_proj(heads)``.
    """

    locations: Tensor
    samples: Tensor
    heads: Tensor
    output: Tensor


def colour_layer(
    *, num_heads: int = 8, num_levels: int = 4, num_points: int = 4, std: float = 0.4, seed: int = 0
) -> MultiScaleDeformableAttention:
    """A deformable attention layer whose samples are colours: C = 3 * nh, identity value and output
    projections, and offset / weight linears with random N(0, std^2) weights (the paper's initial
    ring stays in their biases), so that different queries predict different patterns.
    """
    gen = torch.Generator().manual_seed(seed)
    C = 3 * num_heads
    layer = MultiScaleDeformableAttention(
        embed_dim=C, num_heads=num_heads, num_levels=num_levels, num_points=num_points, dropout=0.0
    )
    with torch.no_grad():
        layer.sampling_offsets.weight.copy_(
            torch.randn(layer.sampling_offsets.weight.shape, generator=gen) * std
        )
        layer.attention_weights.weight.copy_(
            torch.randn(layer.attention_weights.weight.shape, generator=gen) * std
        )
        for proj in (layer.value_proj, layer.output_proj):
            proj.weight.copy_(torch.eye(C))
            proj.bias.zero_()
    return layer.eval()


def pyramid_tokens(pyramid: list[Tensor], *, num_heads: int) -> tuple[Tensor, Tensor]:
    """A pyramid of RGB images as the colour layer's value: every head sees the RGB channels.

    Returns:
        ``(value (Nv, 3 * nh), spatial_shapes (L, 2))``, levels flattened row-major and concatenated.
    """
    shapes = torch.tensor([list(p.shape[-2:]) for p in pyramid], dtype=torch.long)  # (L, 2)
    flat = torch.cat([p.flatten(1).T for p in pyramid])  # (Nv, 3)
    return flat.repeat(1, num_heads), shapes  # (Nv, 3 * nh)


def pyramid_query(pyramid: list[Tensor], x: float, y: float, *, num_heads: int) -> tuple[Tensor, Tensor]:
    """A query standing at (x, y) of the photograph: its content is the colour there (level 0,
    bilinear, repeated per head), its position the sine features of (x, y).

    Returns:
        ``(query (C,), query_pos (C,))`` with C = 3 * nh.
    """
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise ValueError(f"(x, y) must be normalised to [0, 1], got ({x}, {y})")
    grid = torch.tensor([[[[2 * x - 1, 2 * y - 1]]]], dtype=pyramid[0].dtype)  # (1, 1, 1, 2)
    colour = F.grid_sample(pyramid[0][None], grid, align_corners=False).view(3)  # (3,)
    C = 3 * num_heads
    if C % 4:
        raise ValueError(f"3 * num_heads must be divisible by 4 for the sine position, got {C}")
    pos = box_sine_embedding(torch.tensor([x, y]), num_pos_feats=C // 2, temperature=20.0)  # (C,)
    return colour.repeat(num_heads), pos


@torch.no_grad()
def predicted_pattern(
    layer: MultiScaleDeformableAttention, query: Tensor, *, reference: Tensor, query_pos: Tensor | None = None
) -> SamplingPattern:
    """The offsets and weights the layer's linear maps predict from ``query + query_pos``.

    Args:
        layer: a layer with ``weights_from="query"``.
        query, query_pos: (C,).
        reference: (2,) normalised point.
    """
    if layer.weights_from != "query":
        raise ValueError("the microscope edits query-predicted weights: the layer needs weights_from='query'")
    if query.shape != (layer.embed_dim,):
        raise ValueError(f"query must be (C={layer.embed_dim},), got shape {tuple(query.shape)}")
    if reference.shape != (2,):
        raise ValueError(f"reference must be a (2,) point, got shape {tuple(reference.shape)}")
    q = query if query_pos is None else query + query_pos  # (C,)
    nh, L, P = layer.num_heads, layer.num_levels, layer.num_points
    offsets = layer.sampling_offsets(q).view(nh, L, P, 2)  # (nh, L, P, 2)
    weights = layer.attention_weights(q).view(nh, L * P).softmax(-1).view(nh, L, P)  # (nh, L, P)
    return SamplingPattern(reference=reference.float(), offsets=offsets, weights=weights)


def pattern_locations(pattern: SamplingPattern, spatial_shapes: Tensor) -> Tensor:
    """(nh, L, P, 2) normalised locations: reference + offsets / (W_l, H_l), as the layer computes them."""
    nh, L, P, _ = pattern.offsets.shape
    ref = pattern.reference.view(1, 1, 1, 2).expand(1, 1, L, 2)  # (B=1, Nq=1, L, 2)
    return offsets_to_locations(ref, pattern.offsets[None, None], spatial_shapes)[0, 0]  # (nh, L, P, 2)


def _check_index(pattern: SamplingPattern, head: int, level: int, point: int) -> None:
    nh, L, P, _ = pattern.offsets.shape
    for name, value, size in (("head", head, nh), ("level", level, L), ("point", point, P)):
        if not 0 <= value < size:
            raise ValueError(f"{name} must be in [0, {size}), got {value}")


def move_point(
    pattern: SamplingPattern,
    *,
    head: int,
    level: int,
    point: int,
    offset: tuple[float, float] | None = None,
    location: tuple[float, float] | None = None,
    spatial_shapes: Tensor | None = None,
) -> SamplingPattern:
    """A copy of ``pattern`` with one point moved: to ``offset`` (dx, dy) in level pixels, or to the
    normalised image ``location`` (x, y) (needs ``spatial_shapes`` to convert)."""
    _check_index(pattern, head, level, point)
    if (offset is None) == (location is None):
        raise ValueError("give exactly one of offset (level pixels) or location (normalised x, y)")
    if location is not None:
        if spatial_shapes is None:
            raise ValueError("a location needs spatial_shapes to convert it to level pixels")
        h, w = spatial_shapes[level].tolist()
        dx = (location[0] - float(pattern.reference[0])) * w
        dy = (location[1] - float(pattern.reference[1])) * h
    else:
        dx, dy = offset
    offsets = pattern.offsets.clone()
    offsets[head, level, point] = torch.tensor([dx, dy], dtype=offsets.dtype)
    return replace(pattern, offsets=offsets)


def set_weight(
    pattern: SamplingPattern, *, head: int, level: int, point: int, weight: float
) -> SamplingPattern:
    """A copy with one sample's weight set to ``weight``; the head's other L * P - 1 samples share
    ``1 - weight`` in their current proportions (equally if they all had weight 0), so the head's
    weights still sum to 1, as the layer's softmax guarantees."""
    _check_index(pattern, head, level, point)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    w = pattern.weights[head].clone().flatten()  # (L * P,)
    P = pattern.weights.shape[-1]
    k = level * P + point
    others = torch.ones_like(w, dtype=torch.bool)
    others[k] = False
    rest = w[others].sum()
    if rest > 0:
        w[others] *= (1.0 - weight) / rest
    else:
        w[others] = (1.0 - weight) / others.sum()
    w[k] = weight
    weights = pattern.weights.clone()
    weights[head] = w.view_as(weights[head])
    return replace(pattern, weights=weights)


def nearest_point(
    locations: Tensor, x: float, y: float, *, level: int, heads: list[int] | None = None
) -> tuple[int, int, float]:
    """The point of ``level`` nearest to (x, y): ``(head, point, distance)`` (normalised units).

    Args:
        locations: (nh, L, P, 2).
        heads: search only these heads (default: all).
    """
    nh, L, P, _ = locations.shape
    if not 0 <= level < L:
        raise ValueError(f"level must be in [0, {L}), got {level}")
    heads = list(range(nh)) if heads is None else heads
    xy = locations[heads, level]  # (len(heads), P, 2)
    d = ((xy - torch.tensor([x, y], dtype=xy.dtype)) ** 2).sum(-1).sqrt()  # (len(heads), P)
    i = int(d.argmin())
    return heads[i // P], i % P, float(d.flatten()[i])


def bilinear_corners(location: Tensor, shape: tuple[int, int]) -> Corners:
    """The four pixels a sample at normalised ``location`` (x, y) reads on an (H, W) map, and their
    weights: pixel centres at ((j + 0.5) / W, (i + 0.5) / H), ``grid_sample(align_corners=False)``."""
    if location.shape != (2,):
        raise ValueError(f"location must be (2,), got shape {tuple(location.shape)}")
    h, w = shape
    x_px = float(location[0]) * w - 0.5  # pixel centres at integers
    y_px = float(location[1]) * h - 0.5
    x0, y0 = math.floor(x_px), math.floor(y_px)
    fx, fy = x_px - x0, y_px - y0
    rows = torch.tensor([y0, y0, y0 + 1, y0 + 1])
    cols = torch.tensor([x0, x0 + 1, x0, x0 + 1])
    weights = torch.tensor([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dtype=torch.float64)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return Corners(rows=rows, cols=cols, weights=weights, inside=inside)


@torch.no_grad()
def read_out(
    layer: MultiScaleDeformableAttention,
    pattern: SamplingPattern,
    *,
    query: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
) -> Readout:
    """Everything the layer computes for one query from a given pattern.

    Args:
        layer: the layer (its ``value_proj`` and ``output_proj`` are used).
        pattern: offsets and weights (e.g. :func:`predicted_pattern`, then edited).
        query: (C,) the query *before* its position (the identity connection adds it).
        value: (Nv, C) the flattened levels, the layer's input value.
        spatial_shapes: (L, 2) long.
    """
    nh = layer.num_heads
    C = layer.embed_dim
    if value.dim() != 2 or value.shape[1] != C:
        raise ValueError(f"value must be (Nv, C={C}), got shape {tuple(value.shape)}")
    if tuple(pattern.offsets.shape[:3]) != (nh, layer.num_levels, layer.num_points):
        raise ValueError(
            f"pattern is {tuple(pattern.offsets.shape[:3])} (nh, L, P) but the layer has "
            f"{(nh, layer.num_levels, layer.num_points)}"
        )
    locations = pattern_locations(pattern, spatial_shapes)  # (nh, L, P, 2)
    v = layer.value_proj(value).view(1, -1, nh, C // nh)  # (B=1, Nv, nh, hd)
    samples = deformable_samples(v, spatial_shapes, locations[None, None])[0, 0]  # (nh, L, P, hd)
    heads = (samples * pattern.weights[..., None]).sum((1, 2))  # (nh, hd)
    output = query + layer.output_proj(heads.flatten())  # (C,)
    return Readout(locations=locations, samples=samples, heads=heads, output=output)


def describe(
    pattern: SamplingPattern,
    readout: Readout,
    spatial_shapes: Tensor,
    *,
    head: int,
    level: int,
    point: int,
    value: Tensor,
    baseline: Readout | None = None,
) -> str:
    """The numbers of one selected sample, as the widget prints them.

    Args:
        value: (Nv, C) the flattened levels (the corners' values are read from it, head ``head``'s channels).
        baseline: a readout to compare the output with (the layer's own prediction).
    """
    _check_index(pattern, head, level, point)
    h, w = spatial_shapes[level].tolist()
    nh, L, P, hd = readout.samples.shape
    start = int(level_start_index_from_shapes(spatial_shapes)[level])
    loc = readout.locations[head, level, point]
    dx, dy = pattern.offsets[head, level, point].tolist()
    lines = [
        f"head {head}, level {level} ({h} x {w}), point {point}: offset ({dx:+.2f}, {dy:+.2f}) level px, "
        f"weight {float(pattern.weights[head, level, point]):.3f}",
        f"location (x, y) = ({float(loc[0]):.4f}, {float(loc[1]):.4f})",
    ]
    corners = bilinear_corners(loc, (h, w))
    for r, c, cw, ok in zip(
        corners.rows.tolist(),
        corners.cols.tolist(),
        corners.weights.tolist(),
        corners.inside.tolist(),
        strict=True,
    ):
        pixel = value[start + r * w + c, head * hd : (head + 1) * hd] if ok else torch.zeros(hd)
        shown = ", ".join(f"{v:.3f}" for v in pixel.tolist())
        lines.append(
            f"  corner (row {r:3d}, col {c:3d}) weight {cw:.3f} value ({shown}){'' if ok else ' outside: 0'}"
        )
    fmt = lambda t: "(" + ", ".join(f"{v:.3f}" for v in t.tolist()) + ")"  # noqa: E731
    lines.append(f"sampled value {fmt(readout.samples[head, level, point])}")
    lines.append(f"head {head} output (weighted sum of its {L * P} samples) {fmt(readout.heads[head])}")
    lines.append(f"layer output: |output| = {float(readout.output.norm()):.4f}")
    if baseline is not None:
        lines.append(
            f"|output - the layer's own prediction| = {float((readout.output - baseline.output).norm()):.4f}"
        )
    return "\n".join(lines)


def _show_level(ax: plt.Axes, image: Tensor, title: str) -> None:
    h, w = image.shape[-2:]
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, 1, 1, 0), interpolation="nearest")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_aspect(h / w)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)


def plot_microscope(
    pyramid: list[Tensor],
    pattern: SamplingPattern,
    readout: Readout,
    *,
    head: int,
    level: int,
    point: int,
    baseline: Readout | None = None,
    title: str = "",
) -> Figure:
    """The microscope's picture.

    Top row: every head's points on the four levels (colour = head, area = weight), the reference
    (star), the selected point ringed. Bottom row: the selected point's neighbourhood on its level
    at pixel scale, with the four bilinear corners and their weights; each head's samples as colour
    swatches (width = weight) with the head's output at the right; the layer's output channels, now
    (bars) and as the layer predicted them (black ticks).

    The level axes are named ``"level l"``: :func:`~detr_edu.viz.canvas.render_figure` reports clicks
    on them by that name.
    """
    _check_index(pattern, head, level, point)
    nh, L, P, _ = pattern.offsets.shape
    shapes = [tuple(p.shape[-2:]) for p in pyramid]
    fig = plt.figure(figsize=(12.5, 6.4))
    grid = fig.add_gridspec(2, 4, height_ratios=[1.0, 1.05])
    w_max = float(pattern.weights.max())
    for lvl in range(L):
        ax = fig.add_subplot(grid[0, lvl])
        ax.set_gid(f"level {lvl}")
        h, w = shapes[lvl]
        share = float(pattern.weights[:, lvl].sum() / nh)
        _show_level(ax, pyramid[lvl], f"level {lvl}: {h} x {w}, {100 * share:.0f}% of the weight")
        for hd in range(nh):
            xy = readout.locations[hd, lvl].numpy()  # (P, 2)
            size = 8 + 140 * pattern.weights[hd, lvl].numpy() / w_max
            ax.scatter(
                xy[:, 0], xy[:, 1], s=size, color=HEAD_COLOURS[hd % 10], edgecolors="black", linewidths=0.4
            )
        ref = pattern.reference.tolist()
        ax.plot(ref[0], ref[1], marker="*", markersize=12, color="white", markeredgecolor="black")
        if lvl == level:
            x, y = readout.locations[head, level, point].tolist()
            ax.plot(
                x, y, "o", markersize=14, markerfacecolor="none", markeredgecolor="white", markeredgewidth=2
            )
            ax.plot(
                x, y, "o", markersize=17, markerfacecolor="none", markeredgecolor="black", markeredgewidth=1
            )

    # the selected point at pixel scale: its level around it, the four corners and their weights
    ax = fig.add_subplot(grid[1, 0])
    h, w = shapes[level]
    loc = readout.locations[head, level, point]
    corners = bilinear_corners(loc, (h, w))
    x_px, y_px = float(loc[0]) * w - 0.5, float(loc[1]) * h - 0.5
    img = F.pad(pyramid[level], (3, 3, 3, 3))  # zero padding, as the sampler sees outside the map
    ax.imshow(
        img.permute(1, 2, 0).clamp(0, 1).numpy(),
        extent=(-3.5, w + 2.5, h + 2.5, -3.5),
        interpolation="nearest",
    )
    ax.axvspan(-3.5, -0.5, color="grey", alpha=0.25)
    ax.axvspan(w - 0.5, w + 2.5, color="grey", alpha=0.25)
    ax.axhspan(-3.5, -0.5, color="grey", alpha=0.25)
    ax.axhspan(h - 0.5, h + 2.5, color="grey", alpha=0.25)
    cx, cy = min(max(x_px, -2.0), w + 1.0), min(max(y_px, -2.0), h + 1.0)
    ax.set_xlim(cx - 2.5, cx + 2.5)
    ax.set_ylim(cy + 2.5, cy - 2.5)
    for r, c, cw in zip(corners.rows.tolist(), corners.cols.tolist(), corners.weights.tolist(), strict=True):
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="white", lw=1 + 3 * cw))
        ax.text(
            c,
            r,
            f"{cw:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0},
        )
    ax.plot(x_px, y_px, "x", color=HEAD_COLOURS[head % 10], markersize=10, markeredgewidth=2.5)
    ax.set_title(f"head {head}, level {level}, point {point}: the 4 corners read", fontsize=8)
    ax.set_xlabel("column (level pixels; grey: outside, reads 0)", fontsize=7)
    ax.tick_params(labelsize=6)

    # each head's samples as colour swatches, width = weight, and the head output
    ax = fig.add_subplot(grid[1, 1:3])
    samples = readout.samples.clamp(0, 1)  # (nh, L, P, hd)
    for hd in range(nh):
        left = 0.0
        for lvl in range(L):
            for p in range(P):
                width = float(pattern.weights[hd, lvl, p])
                colour = (
                    samples[hd, lvl, p, :3].tolist()
                    if samples.shape[-1] >= 3
                    else [samples[hd, lvl, p, 0]] * 3
                )
                selected = (hd, lvl, p) == (head, level, point)
                ax.add_patch(
                    Rectangle(
                        (left, hd - 0.4),
                        width,
                        0.8,
                        color=colour,
                        ec="white" if selected else "black",
                        lw=2.5 if selected else 0.3,
                    )
                )
                left += width
        out_colour = readout.heads[hd, :3].clamp(0, 1).tolist() if readout.heads.shape[-1] >= 3 else [0.5] * 3
        ax.add_patch(Rectangle((1.08, hd - 0.4), 0.2, 0.8, color=out_colour, ec="black", lw=0.6))
    ax.axvline(1.04, color="black", lw=0.6)
    ax.set_xlim(0, 1.3)
    ax.set_ylim(nh - 0.5, -0.5)
    ax.set_yticks(range(nh), [f"head {h}" for h in range(nh)], fontsize=7)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0, 1.18], ["0", "0.25", "0.5", "0.75", "1", "output"], fontsize=7)
    ax.set_xlabel("each head's samples, width = weight (they sum to 1); right: the weighted sum", fontsize=7)
    ax.set_title("what each head reads", fontsize=8)

    # the layer output for this query: bars now, ticks as the layer predicted
    ax = fig.add_subplot(grid[1, 3])
    C = readout.output.numel()
    hd_dim = C // nh
    colours = [
        ("tab:red", "tab:green", "tab:blue")[c % 3] if hd_dim == 3 else HEAD_COLOURS[(c // hd_dim) % 10]
        for c in range(C)
    ]
    ax.bar(range(C), readout.output.numpy(), color=colours)
    if baseline is not None:
        ax.scatter(
            range(C), baseline.output.numpy(), marker="_", s=60, color="black", label="layer's prediction"
        )
        ax.legend(fontsize=6, loc="upper right")
    ax.set_xlabel("output channel (3 per head: R, G, B)" if hd_dim == 3 else "output channel", fontsize=7)
    ax.set_title("the layer's output for this query", fontsize=8)
    ax.tick_params(labelsize=6)
    fig.suptitle(title or "the sampling microscope", fontsize=10)
    fig.tight_layout()
    return fig


class SamplingMicroscope:
    """The chapter 02 widget: drag any sampling point, edit its offset and weight, or move the query.

    Thin wiring: every number comes from :func:`predicted_pattern`, :func:`move_point`,
    :func:`set_weight` and :func:`read_out`; :meth:`on_mouse` and the control callbacks only decide
    which of them to call. ``widget`` is what the notebook displays.

    Args:
        pyramid: L images (3, H_l, W_l) in [0, 1], the value of the layer.
        layer: a colour layer (:func:`colour_layer`), C = 3 * nh.
        x, y: the query's starting position (normalised).
    """

    MODES = ("move a point", "move the query")

    def __init__(
        self,
        pyramid: list[Tensor],
        layer: MultiScaleDeformableAttention,
        *,
        x: float = 0.45,
        y: float = 0.4,
        dpi: int = 72,
    ) -> None:
        import ipywidgets as widgets

        from detr_edu.viz.canvas import ClickableFigure, serialised

        self.pyramid = pyramid
        self.layer = layer
        self.value, self.shapes = pyramid_tokens(pyramid, num_heads=layer.num_heads)  # (Nv, C), (L, 2)
        self.selected = (0, 0, 0)  # head, level, point
        self.canvas = ClickableFigure(self.on_mouse, dpi=dpi)
        nh, L, P = layer.num_heads, layer.num_levels, layer.num_points
        self.mode = widgets.ToggleButtons(options=self.MODES, value=self.MODES[0], description="mouse")
        self.head = widgets.IntSlider(value=0, min=0, max=nh - 1, description="head")
        self.level = widgets.IntSlider(value=0, min=0, max=L - 1, description="level")
        self.point = widgets.IntSlider(value=0, min=0, max=P - 1, description="point")
        self.dx = widgets.FloatSlider(value=0.0, min=-12.0, max=12.0, step=0.1, description="dx (px)")
        self.dy = widgets.FloatSlider(value=0.0, min=-12.0, max=12.0, step=0.1, description="dy (px)")
        self.weight = widgets.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="weight")
        self.reset = widgets.Button(description="reset to the layer's prediction")
        self.text = widgets.Output()
        self._syncing = False
        for control in (self.head, self.level, self.point):
            control.observe(serialised(self._on_select), names="value")
        for control in (self.dx, self.dy):
            control.observe(serialised(self._on_offset), names="value")
        self.weight.observe(serialised(self._on_weight), names="value")
        self.mode.observe(serialised(lambda _: self.redraw()), names="value")
        self._pressed_at = (0.0, 0.0)
        self.reset.on_click(serialised(lambda _: self.set_query(*self.query_xy)))
        self.set_query(x, y)
        controls = widgets.VBox(
            [
                self.mode,
                widgets.HBox([self.head, self.level, self.point]),
                widgets.HBox([self.dx, self.dy, self.weight]),
                self.reset,
            ]
        )
        self.widget = widgets.VBox([controls, self.canvas.image, self.text])
        self.widget.add_class("detr-edu-microscope")

    # --- state changes (each ends in redraw) ---
    def set_query(self, x: float, y: float) -> None:
        """Put the query at (x, y): the pattern becomes what the layer predicts there."""
        self.query_xy = (min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0))
        self.query, self.query_pos = pyramid_query(
            self.pyramid, *self.query_xy, num_heads=self.layer.num_heads
        )
        self.pattern = predicted_pattern(
            self.layer, self.query, reference=torch.tensor(self.query_xy), query_pos=self.query_pos
        )
        self.baseline = self._read(self.pattern)
        self.redraw()

    def _read(self, pattern: SamplingPattern) -> Readout:
        return read_out(self.layer, pattern, query=self.query, value=self.value, spatial_shapes=self.shapes)

    def on_mouse(self, kind: str, hit) -> None:
        """Mouse down on a level: pick the nearest point there (or move the query); drag: move it.

        The release also moves the point when the pointer has moved since the press (moves are
        throttled, so the last one may arrive before the release); a click without a move only selects.
        """
        if hit is None or not hit.name.startswith("level "):
            return
        level = int(hit.name.split()[1])
        if self.mode.value == self.MODES[1]:
            if kind in ("down", "move"):
                self.set_query(hit.x, hit.y)
            return
        if kind == "down":
            locations = pattern_locations(self.pattern, self.shapes)
            head, point, _ = nearest_point(locations, hit.x, hit.y, level=level)
            self.selected = (head, level, point)
            self._pressed_at = (hit.x, hit.y)
        else:
            head, lvl, point = self.selected
            still = (
                kind == "up" and abs(hit.x - self._pressed_at[0]) + abs(hit.y - self._pressed_at[1]) < 1e-3
            )
            if lvl != level or still:
                return
            self.pattern = move_point(
                self.pattern,
                head=head,
                level=level,
                point=point,
                location=(hit.x, hit.y),
                spatial_shapes=self.shapes,
            )
        self.redraw()

    def _on_select(self, _change) -> None:
        if not self._syncing:
            self.selected = (self.head.value, self.level.value, self.point.value)
            self.redraw()

    def _on_offset(self, _change) -> None:
        if not self._syncing:
            head, level, point = self.selected
            self.pattern = move_point(
                self.pattern, head=head, level=level, point=point, offset=(self.dx.value, self.dy.value)
            )
            self.redraw()

    def _on_weight(self, _change) -> None:
        if not self._syncing:
            head, level, point = self.selected
            self.pattern = set_weight(
                self.pattern, head=head, level=level, point=point, weight=self.weight.value
            )
            self.redraw()

    def redraw(self) -> None:
        head, level, point = self.selected
        readout = self._read(self.pattern)
        self._syncing = True  # show the selected point's numbers in the controls without acting on them
        try:
            self.head.value, self.level.value, self.point.value = head, level, point
            dx, dy = self.pattern.offsets[head, level, point].tolist()
            self.dx.value, self.dy.value = round(dx, 1), round(dy, 1)
            self.weight.value = round(float(self.pattern.weights[head, level, point]), 2)
        finally:
            self._syncing = False
        x, y = self.query_xy
        fig = plot_microscope(
            self.pyramid,
            self.pattern,
            readout,
            head=head,
            level=level,
            point=point,
            baseline=self.baseline,
            title=f"query at ({x:.2f}, {y:.2f}); mouse: {self.mode.value}",
        )
        self.canvas.show(fig)
        self.numbers = f"query at (x, y) = ({x:.3f}, {y:.3f})\n" + describe(
            self.pattern,
            readout,
            self.shapes,
            head=head,
            level=level,
            point=point,
            value=self.value,
            baseline=self.baseline,
        )
        self.text.clear_output(wait=True)
        with self.text:
            print(self.numbers)
