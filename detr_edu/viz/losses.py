"""Chapter 06 pictures: loss curves, box-loss sweeps, every loss term of a batch, matched predictions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from detr_edu.box_ops import box_cxcywh_to_xyxy
from detr_edu.criterion import LOSS_NAMES, weight_of

__all__ = [
    "plot_curves",
    "plot_background_share",
    "plot_loss_terms",
    "draw_matches",
    "plot_loss_history",
]


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_curves(
    x: Tensor,
    curves: Mapping[str, Tensor],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    shade: Tensor | None = None,
    shade_label: str = "",
    logy: bool = False,
    ax: Axes | None = None,
    styles: Mapping[str, Mapping[str, object]] | None = None,
) -> Figure:
    """Line plot of named curves over a shared x axis, optionally shading where ``shade`` is True.

    Args:
        x: (N,) abscissae.
        curves: name -> (N,) values.
        shade: (N,) bool; the x ranges where it is True are shaded (e.g. "boxes do not overlap").
        ax: draw into this axes (to compose panels); a new figure otherwise.
        styles: name -> matplotlib line keywords (``color``, ``ls``, ``lw``): keep one colour per
            quantity across panels, and draw a curve that coincides with another dashed on top.

    Returns:
        The figure holding the axes.
    """
    ax = _new_axes(ax, (4.5, 3.2))
    xs = x.detach().cpu().numpy()
    for name, values in curves.items():
        if values.shape != x.shape:
            raise ValueError(f"curve {name!r} has shape {tuple(values.shape)} but x has {tuple(x.shape)}")
        ax.plot(xs, values.detach().cpu().numpy(), label=name, **dict((styles or {}).get(name, {})))
    if shade is not None:
        mask = shade.detach().cpu().numpy().astype(bool)
        ax.fill_between(
            xs, 0, 1, where=mask, color="0.85", transform=ax.get_xaxis_transform(), label=shade_label
        )
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax.figure


def plot_background_share(shares: Mapping[str, float], *, title: str, ax: Axes | None = None) -> Figure:
    """Horizontal bars: the fraction of a classification loss that comes from background queries.

    Args:
        shares: loss name -> share in [0, 1].
    """
    ax = _new_axes(ax, (4.5, 0.5 + 0.45 * len(shares)))
    names = list(shares)
    values = np.array([float(shares[n]) for n in names])
    if ((values < 0) | (values > 1)).any():
        raise ValueError(f"shares must lie in [0, 1], got {dict(shares)}")
    y = np.arange(len(names))
    ax.barh(y, values, color="tab:gray", label="background queries")
    ax.barh(y, 1 - values, left=values, color="tab:orange", label="matched queries")
    for yi, v in zip(y, values, strict=True):
        ax.text(0.02, yi, f"{v:.0%}", va="center", color="white", fontsize=9)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the classification loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return ax.figure


def plot_loss_terms(
    losses: Mapping[str, Tensor | float], *, weight_dict: Mapping[str, float] | None = None, title: str = ""
) -> Figure:
    """Grouped bars of every loss term: one group per set of predictions (suffix), one bar per loss.

    Keys are ``loss_<name><suffix>``, e.g. ``loss_giou_enc``; groups are ordered encoder first, then
    the decoder layers ``_0``, ``_1``, ..., then the last layer (no suffix). With ``weight_dict``
    the bars show ``weight * loss`` (the loss's longest-prefix weight, as in ``weighted_total``).
    """
    groups: dict[str, dict[str, float]] = {}
    for key, value in losses.items():
        base = next((name for name in LOSS_NAMES if key.startswith(name)), None)
        if base is None:
            raise ValueError(f"unknown loss key {key!r}; expected one of {LOSS_NAMES} plus a suffix")
        value = float(value)
        if weight_dict is not None:
            weight = weight_of(key, weight_dict)
            if weight is None:
                raise ValueError(f"no weight for {key!r} in weight_dict")
            value *= weight
        groups.setdefault(key[len(base) :], {})[base] = value

    def order(suffix: str) -> tuple[int, int]:
        if suffix == "_enc":
            return (0, 0)
        if suffix == "":
            return (2, 0)
        return (1, int(suffix.rsplit("_", 1)[1])) if suffix.rsplit("_", 1)[1].isdigit() else (1, 10**6)

    suffixes = sorted(groups, key=order)
    labels = {"": "last", "_enc": "enc"} | {s: f"layer {s[1:]}" for s in suffixes if s not in ("", "_enc")}
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(suffixes), 3.2))
    width = 0.8 / len(LOSS_NAMES)
    x = np.arange(len(suffixes))
    for i, name in enumerate(LOSS_NAMES):
        heights = [groups[s].get(name, 0.0) for s in suffixes]
        ax.bar(x + (i - (len(LOSS_NAMES) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, [labels[s] for s in suffixes])
    ax.set_ylabel("weighted loss" if weight_dict is not None else "loss (unweighted)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def draw_matches(
    image: Tensor,
    target: Mapping[str, Tensor],
    pred_boxes_cxcywh: Tensor,
    indices: tuple[Tensor, Tensor] | None = None,
    *,
    pred_labels: Tensor | None = None,
    pred_scores: Tensor | None = None,
    title: str = "",
    ax: Axes | None = None,
) -> Figure:
    """An image with its ground truth (green) and predictions (orange), matched pairs joined.

    Args:
        image: (3, H, W) in [0, 1].
        target: ``labels`` (G,), ``boxes`` (G, 4) normalised cxcywh.
        pred_boxes_cxcywh: (Nq, 4) normalised; with ``indices`` only the matched queries are drawn.
        indices: ``(query_idx, target_idx)`` of this image, as the matcher returns them.
        pred_labels, pred_scores: (Nq,) class and score written next to each drawn prediction.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if pred_boxes_cxcywh.dim() != 2 or pred_boxes_cxcywh.shape[1] != 4:
        raise ValueError(f"pred_boxes_cxcywh must be (Nq, 4), got {tuple(pred_boxes_cxcywh.shape)}")
    ax = _new_axes(ax, (3.2, 3.4))
    H, W = image.shape[1:]
    scale = torch.tensor([W, H, W, H], dtype=torch.float32)
    ax.imshow(image.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy())

    def box(ax, xyxy, colour, style="-"):
        x0, y0, x1, y1 = xyxy.tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.5, ls=style))

    gt_px = box_cxcywh_to_xyxy(target["boxes"].detach().float().cpu()) * scale  # (G, 4)
    for g, xyxy in enumerate(gt_px):
        box(ax, xyxy, "lime")
        ax.text(xyxy[0], xyxy[1] - 1, str(int(target["labels"][g])), color="lime", fontsize=8, va="bottom")
    preds_cxcywh = pred_boxes_cxcywh.detach().float().cpu()
    queries = range(len(preds_cxcywh)) if indices is None else indices[0].tolist()
    pred_px = box_cxcywh_to_xyxy(preds_cxcywh) * scale  # (Nq, 4)
    for q in queries:
        box(ax, pred_px[q], "orange", "--")
        text = [str(int(pred_labels[q]))] if pred_labels is not None else []
        text += [f"{float(pred_scores[q]):.2f}"] if pred_scores is not None else []
        if text:
            ax.text(
                pred_px[q, 2], pred_px[q, 3], " ".join(text), color="orange", fontsize=7, va="top", ha="right"
            )
    if indices is not None:  # join centres of matched pairs
        for q, g in zip(indices[0].tolist(), indices[1].tolist(), strict=True):
            (cq, rq), (cg, rg) = (
                (preds_cxcywh[q, :2] * scale[:2]).tolist(),
                (target["boxes"][g, :2] * scale[:2]).tolist(),
            )
            ax.plot([cq, cg], [rq, rg], color="white", lw=1, alpha=0.8)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return ax.figure


def plot_loss_history(
    history: Mapping[str, Sequence[float]], *, title: str = "", logy: bool = True, ax: Axes | None = None
) -> Figure:
    """Named loss curves over training steps (log scale by default)."""
    ax = _new_axes(ax, (4.5, 3.2))
    for name, values in history.items():
        ax.plot(np.arange(len(values)), np.asarray(values, dtype=float), label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax.figure
