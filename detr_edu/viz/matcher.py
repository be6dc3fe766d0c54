"""Plotting for chapter 05 (the Hungarian matcher): cost heatmaps, matched pairs, match history."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from detr_edu.box_ops import box_cxcywh_to_xyxy
from detr_edu.matcher import HungarianMatcher
from detr_edu.viz.scenes import draw_scene

__all__ = [
    "plot_cost_terms",
    "draw_matches",
    "plot_matches",
    "plot_matching_view",
    "plot_class_cost_curves",
    "plot_match_history",
]

_TARGET_COLOURS = plt.get_cmap("tab10")
_LABEL_BOX = {"facecolor": "black", "alpha": 0.6, "pad": 0.8, "linewidth": 0}  # readable on any digit colour


def _mark_assignment(ax: Axes, query_idx: Tensor, target_idx: Tensor) -> None:
    for q, t in zip(query_idx.tolist(), target_idx.tolist(), strict=True):
        ax.add_patch(Rectangle((t - 0.5, q - 0.5), 1, 1, fill=False, ec="red", lw=2))


def plot_cost_terms(
    terms: dict[str, Tensor],
    total: Tensor,
    query_idx: Tensor,
    target_idx: Tensor,
    *,
    annotate: bool = True,
) -> Figure:
    """Heatmaps of each (Nq, G) cost term and of the weighted total, the assignment boxed in red.

    Args:
        terms: ``{"class": ..., "bbox": ..., "giou": ...}`` of one image, each (Nq, G).
        total: (Nq, G) weighted cost.
        query_idx, target_idx: the assignment (from :class:`HungarianMatcher`).
        annotate: write each cell's value (for small matrices).
    """
    panels = [
        ("class cost", terms["class"]),
        ("L1 cost", terms["bbox"]),
        ("-GIoU cost", terms["giou"]),
        ("total (weighted)", total),
    ]
    num_queries, num_targets = total.shape
    fig, axes = plt.subplots(1, 4, figsize=(2.2 + 1.0 * num_targets * 4, 0.55 * num_queries + 1.6))
    for ax, (name, matrix) in zip(axes, panels, strict=True):
        values = matrix.detach().cpu().numpy()
        image = ax.imshow(values, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        _mark_assignment(ax, query_idx, target_idx)
        if annotate:
            mid = (values.max() + values.min()) / 2
            for (q, t), v in np.ndenumerate(values):
                ax.text(t, q, f"{v:.2f}", ha="center", va="center", fontsize=7, color="k" if v > mid else "w")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("target j")
        ax.set_xticks(range(num_targets))
        ax.set_yticks(range(num_queries))
    axes[0].set_ylabel("query i")
    fig.suptitle("Matching cost C[i, j]; red: the Hungarian assignment (minimum total)", fontsize=10)
    fig.tight_layout()
    return fig


def draw_matches(
    ax: Axes,
    image: Tensor,
    target: dict[str, Tensor],
    pred_boxes: Tensor,
    query_idx: Tensor,
    target_idx: Tensor,
) -> None:
    """Draw a scene, its targets (solid, one colour each), the matched predictions (dashed, the
    colour of their target, joined to it by a line) and the unmatched ones (grey, "no object").

    Args:
        image: (3, H, W) in [0, 1].
        target: ``labels`` (G,), ``boxes`` (G, 4) normalised cxcywh.
        pred_boxes: (Nq, 4) normalised cxcywh of one image.
        query_idx, target_idx: the assignment.
    """
    H, W = image.shape[1:]
    draw_scene(ax, image, {"labels": target["labels"][:0], "boxes": target["boxes"][:0]})
    scale = torch.tensor([W, H, W, H], dtype=torch.float32)
    tgt_xyxy = box_cxcywh_to_xyxy(target["boxes"].float()) * scale - 0.5  # (G, 4) pixels
    pred_xyxy = box_cxcywh_to_xyxy(pred_boxes.detach().float().cpu()) * scale - 0.5  # (Nq, 4) pixels
    matched = dict(zip(query_idx.tolist(), target_idx.tolist(), strict=True))
    for q, (x0, y0, x1, y1) in enumerate(pred_xyxy.tolist()):
        if q in matched:
            continue
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="0.6", lw=0.8, ls=":"))
    for j, ((x0, y0, x1, y1), label) in enumerate(
        zip(tgt_xyxy.tolist(), target["labels"].tolist(), strict=True)
    ):
        colour = _TARGET_COLOURS(j % 10)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=2))
        ax.text(x0, max(y0 - 1, 6), f"t{j}: {label}", color=colour, fontsize=8, va="bottom", bbox=_LABEL_BOX)
    for q, j in matched.items():
        colour = _TARGET_COLOURS(j % 10)
        x0, y0, x1, y1 = pred_xyxy[q].tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.2, ls="--"))
        tx, ty = ((tgt_xyxy[j, :2] + tgt_xyxy[j, 2:]) / 2).tolist()
        ax.plot([(x0 + x1) / 2, tx], [(y0 + y1) / 2, ty], color=colour, lw=1.2)
        ax.text(x1, min(y1, H - 4), f"q{q}", color=colour, fontsize=7, bbox=_LABEL_BOX)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)


def plot_matches(
    image: Tensor,
    target: dict[str, Tensor],
    pred_boxes: Tensor,
    query_idx: Tensor,
    target_idx: Tensor,
    *,
    title: str = "",
) -> Figure:
    """One scene with its matched pairs joined by lines; see :func:`draw_matches`."""
    fig, ax = plt.subplots(figsize=(5, 5))
    draw_matches(ax, image, target, pred_boxes, query_idx, target_idx)
    ax.set_title(title or "targets (solid), matched queries (dashed), no object (grey dotted)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_matching_view(
    image: Tensor,
    target: dict[str, Tensor],
    pred_logits: Tensor,
    pred_boxes: Tensor,
    matcher: HungarianMatcher,
) -> Figure:
    """The chapter's widget view: match one image, then draw the scene with its matched pairs and
    the total cost matrix with the assignment boxed.

    Args:
        image: (3, H, W).
        target: ``labels`` (G,), ``boxes`` (G, 4) normalised cxcywh.
        pred_logits: (Nq, K), pred_boxes: (Nq, 4) normalised cxcywh, one image.
        matcher: the matcher (its weights are what the widget changes).
    """
    outputs = {"pred_logits": pred_logits[None], "pred_boxes": pred_boxes[None]}
    ((query_idx, target_idx),) = matcher(outputs, [target])
    cost = matcher.cost_matrix(outputs, [target])[0]  # (Nq, G)
    fig, (ax_img, ax_cost) = plt.subplots(1, 2, figsize=(10, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
    draw_matches(ax_img, image, target, pred_boxes, query_idx, target_idx)
    ax_img.set_title("targets (solid) and their matched queries (dashed)", fontsize=9)
    shown = ax_cost.imshow(cost.numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(shown, ax=ax_cost, fraction=0.046, pad=0.04)
    _mark_assignment(ax_cost, query_idx, target_idx)
    ax_cost.set_xlabel("target j")
    ax_cost.set_ylabel("query i")
    ax_cost.set_xticks(range(cost.shape[1]))
    ax_cost.set_title(
        f"total cost (class {matcher.cost_class:g}, L1 {matcher.cost_bbox:g}, GIoU {matcher.cost_giou:g})",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_class_cost_curves(*, alpha: float = 0.25, gamma: float = 2.0) -> Figure:
    """Class costs as functions of the predicted probability p of the target's class."""
    p = torch.linspace(1e-3, 1 - 1e-3, 400, dtype=torch.float64)
    pos = alpha * (1 - p) ** gamma * -torch.log(p)
    neg = (1 - alpha) * p**gamma * -torch.log1p(-p)
    curves = {
        "DETR (ce): -p": -p,
        "-log p (the CE loss itself)": -torch.log(p),
        f"focal pos - neg (alpha={alpha:g}, gamma={gamma:g})": pos - neg,
        "focal pos only": pos,
    }
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, values in curves.items():
        ax.plot(p.numpy(), values.numpy(), label=name)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_ylim(-2.2, 3.0)
    ax.set_xlabel("p = predicted probability of the target's class")
    ax.set_ylabel("class cost (lower = better match)")
    ax.set_title("Class costs of the matcher", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_match_history(history: Tensor, *, num_targets: int, title: str = "") -> Figure:
    """Which target each query is matched to, step by step, and how often matches switch.

    Args:
        history: (T, Nq) int64, the target index matched to each query at each step, -1 if none.
        num_targets: G, for the colour scale.
    """
    if history.dim() != 2:
        raise ValueError(f"history must be (T, Nq), got {tuple(history.shape)}")
    steps, num_queries = history.shape
    colours = ["0.92"] + [_TARGET_COLOURS(j % 10) for j in range(num_targets)]
    fig, (ax_raster, ax_rate) = plt.subplots(
        1, 2, figsize=(11, 0.22 * num_queries + 1.8), gridspec_kw={"width_ratios": [2, 1]}
    )
    ax_raster.imshow(
        (history + 1).T.numpy(),
        cmap=ListedColormap(colours),
        vmin=-0.5,
        vmax=num_targets + 0.5,
        aspect="auto",
        interpolation="nearest",
    )
    ax_raster.set_yticks(range(0, num_queries, max(1, num_queries // 10)))
    ax_raster.set_xlabel("training step")
    ax_raster.set_ylabel("query")
    ax_raster.set_title("matched target per query (colour = target, light grey = no object)", fontsize=9)
    switches = (history[1:] != history[:-1]).sum(1)  # (T-1,) queries whose match changed
    ax_rate.plot(range(1, steps), switches.numpy(), lw=1)
    ax_rate.set_xlabel("training step")
    ax_rate.set_ylabel("queries whose match changed")
    ax_rate.set_title("match switches per step", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
