"""Plotting for the digit scenes of :mod:`detr_edu.scenes`: an image with its labelled boxes."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from detr_edu.box_ops import box_cxcywh_to_xyxy

__all__ = ["draw_scene", "plot_scenes"]


def draw_scene(ax: Axes, image: Tensor, target: dict[str, Tensor], *, colour: str = "white") -> None:
    """Draw ``image`` (3, H, W) in [0, 1] on ``ax`` with ``target``'s boxes and digit labels."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    H, W = image.shape[1:]
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    boxes_xyxy = box_cxcywh_to_xyxy(target["boxes"])  # (G, 4) normalised
    for (x0, y0, x1, y1), label in zip(boxes_xyxy.tolist(), target["labels"].tolist(), strict=True):
        # Box edges are pixel edges; imshow puts pixel centres on integers, hence the -0.5.
        ax.add_patch(
            Rectangle(
                (x0 * W - 0.5, y0 * H - 0.5), (x1 - x0) * W, (y1 - y0) * H, fill=False, ec=colour, lw=1.2
            )
        )
        ax.text(x0 * W - 0.5, y0 * H - 1.5, str(label), color=colour, fontsize=8, va="bottom")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_scenes(scenes: list[tuple[Tensor, dict[str, Tensor]]], *, ncols: int = 4, title: str = "") -> Figure:
    """A grid of scenes, each with its tight boxes and labels."""
    if not scenes:
        raise ValueError("need at least one scene to plot")
    nrows = -(-len(scenes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.5 * nrows), squeeze=False)
    for ax in axes.flat[len(scenes) :]:
        ax.axis("off")
    for ax, (image, target) in zip(axes.flat, scenes, strict=False):
        draw_scene(ax, image, target)
        ax.set_title(f"{len(target['labels'])} digits: {target['labels'].tolist()}", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
