"""Published weights on photographs (chapter 04): the input they expect, what they detect, where they look.

* :func:`published_input` -- an RGB photograph at the size and normalisation the published COCO
  models were evaluated with: the shorter side resized to 800 pixels, the longer at most 1333
  (DETR's ``RandomResize([800], max_size=1333)``, kept by Deformable DETR and DINO), then the
  ImageNet mean and standard deviation;
* :func:`detect` -- one photograph through a model: every (query, class) pair whose sigmoid score is
  above a threshold, with the query that made it and that query's sampling points in the last
  decoder layer;
* :func:`plot_detections` -- the detections (left) and the sampling points of the best few (right).

Works with any of the course's deformable models (``DeformableDETR``, ``DINO``): a model converted
by :func:`detr_edu.convert.load_published` or, in the tests, a tiny random one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn

from detr_edu.box_ops import box_cxcywh_to_xyxy
from detr_edu.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_shape

__all__ = ["published_input", "Detections", "detect", "plot_detections"]

LEVEL_COLOURS = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown"]


def published_input(
    image: np.ndarray | Tensor, *, min_size: int = 800, max_size: int = 1333
) -> tuple[Tensor, Tensor]:
    """A photograph as the published models expect it.

    Args:
        image: (H0, W0, 3) RGB, uint8 (0..255) or float in [0, 1] (e.g. ``skimage.data.astronaut()``).
        min_size: the shorter side after resizing (800 for the published COCO models).
        max_size: the longer side's limit (1333); the shorter side shrinks when it would be exceeded.

    Returns:
        ``(normalised, shown)``: (3, h, w) float32 ImageNet-normalised, and the same resized
        picture in [0, 1] for drawing.
    """
    pixels = torch.as_tensor(np.asarray(image))
    if pixels.dim() != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {tuple(pixels.shape)}")
    x = pixels.permute(2, 0, 1).float()  # (3, H0, W0)
    if not pixels.is_floating_point():
        x = x / 255.0
    h, w = resized_shape(x.shape[1], x.shape[2], min_size, max_size)
    shown = F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    shown = shown[0].clamp(0, 1)  # (3, h, w)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]  # (3, 1, 1)
    std = torch.tensor(IMAGENET_STD)[:, None, None]  # (3, 1, 1)
    return (shown - mean) / std, shown


@dataclass
class Detections:
    """What :func:`detect` found in one photograph, best first.

    Attributes:
        shown: (3, h, w) the resized photograph in [0, 1].
        scores: (n,) sigmoid scores above the threshold.
        labels: (n,) class index k (a column of ``pred_logits``).
        boxes_xyxy_px: (n, 4) in pixels of ``shown``.
        queries: (n,) the query that made each detection.
        locations: (n, nh, L, P, 2) that query's sampling locations in the last decoder layer, (x, y)
            normalised to the image (one unpadded image: each level's frame is the image).
        weights: (n, nh, L, P) their attention weights.
    """

    shown: Tensor
    scores: Tensor
    labels: Tensor
    boxes_xyxy_px: Tensor
    queries: Tensor
    locations: Tensor
    weights: Tensor


def detect(
    model: nn.Module,
    image: np.ndarray | Tensor,
    *,
    threshold: float = 0.5,
    min_size: int = 800,
    max_size: int = 1333,
) -> Detections:
    """Run a deformable model on one photograph at the published input size.

    Every (query, class) pair with ``sigmoid(logit) > threshold`` is a detection (the published
    post-processing keeps the top 100 pairs, then a threshold; above 0.5 the two agree).

    Args:
        model: a ``DeformableDETR`` or ``DINO`` (eval mode is set here).
        image: (H0, W0, 3) RGB photograph, see :func:`published_input`.
        threshold: score threshold.
        min_size, max_size: see :func:`published_input`.

    Returns:
        :class:`Detections`.
    """
    x, shown = published_input(image, min_size=min_size, max_size=max_size)
    param = next(model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(x[None].to(param), return_intermediates=True)
    prob = out["pred_logits"][0].float().sigmoid()  # (Nq, K)
    query, label = (prob > threshold).nonzero(as_tuple=True)  # (n,) each
    scores = prob[query, label]  # (n,)
    order = scores.argsort(descending=True)
    query, label, scores = query[order], label[order], scores[order]
    h, w = shown.shape[1:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    boxes = box_cxcywh_to_xyxy(out["pred_boxes"][0, query].float()) * scale  # (n, 4) pixels
    locations, weights = out["intermediates"]["sampling"][-1]  # (1, Nq, nh, L, P, 2), (1, Nq, nh, L, P)
    return Detections(
        shown=shown,
        scores=scores.cpu(),
        labels=label.cpu(),
        boxes_xyxy_px=boxes.clamp(min=0).minimum(scale).cpu(),
        queries=query.cpu(),
        locations=locations[0, query].float().cpu(),
        weights=weights[0, query].float().cpu(),
    )


def _label(k: int, names: Sequence[str] | None, category_ids: Sequence[int] | None) -> str:
    if names is not None and names[k]:
        return names[k]
    return f"id {category_ids[k] if category_ids is not None else k}"


def plot_detections(
    det: Detections,
    *,
    names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
    num_sampled: int = 3,
    title: str = "",
) -> Figure:
    """Left: every detection with its label and score. Right: the best ``num_sampled`` detections'
    queries and their sampling points in the last decoder layer (colour = level, area = weight).

    Args:
        det: from :func:`detect`.
        names: label name of each class index (``model.published.category_names``), or None.
        category_ids: dataset category id of each class index (``model.published.category_ids``),
            shown when there are no names.
        num_sampled: how many queries get their sampling points drawn.
        title: figure title.
    """
    h, w = det.shown.shape[1:]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2 * h / w + 0.6))
    for ax in axes:
        ax.imshow(det.shown.permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    cmap = plt.get_cmap("tab10")
    for i, (box, k, s) in enumerate(
        zip(det.boxes_xyxy_px.tolist(), det.labels.tolist(), det.scores.tolist(), strict=True)
    ):
        x0, y0, x1, y1 = box
        colour = cmap(i % 10)
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.5))
        axes[0].text(
            x0,
            y0,
            f"{_label(k, names, category_ids)} {s:.2f}",
            color="white",
            fontsize=7,
            va="bottom",
            bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "lw": 0},
        )
    axes[0].set_title(f"{len(det.scores)} detections above the threshold", fontsize=9)
    n = min(num_sampled, len(det.scores))
    w_max = float(det.weights[:n].max()) if n else 1.0
    for i in range(n):
        x0, y0, x1, y1 = det.boxes_xyxy_px[i].tolist()
        axes[1].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=cmap(i % 10), lw=1.5))
        L = det.locations.shape[2]
        for lvl in range(L):
            xy = det.locations[i, :, lvl].reshape(-1, 2)  # (nh*P, 2)
            wt = det.weights[i, :, lvl].reshape(-1)  # (nh*P,)
            axes[1].scatter(
                xy[:, 0] * w - 0.5,
                xy[:, 1] * h - 0.5,
                s=4 + 60 * wt / w_max,
                color=LEVEL_COLOURS[lvl % len(LEVEL_COLOURS)],
                edgecolors="black",
                linewidths=0.3,
                label=f"level {lvl}" if i == 0 else None,
            )
    if n:
        axes[1].legend(fontsize=7, loc="lower left")
    axes[1].set_title(f"sampling points of the best {n} queries, last decoder layer", fontsize=9)
    fig.suptitle(title or "Published weights on a photograph", fontsize=10)
    fig.tight_layout()
    return fig
