"""Training pictures (chapter 08): loss and AP curves from ``log.jsonl`` records, predictions.

Every function takes the records of :func:`detr_edu.logs.read_log` (or tensors) and returns a
figure; nothing here trains or reads files.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from detr_edu.engine import WarmupStepSchedule
from detr_edu.logs import final_metrics, series

__all__ = ["plot_training", "plot_runs", "plot_seeded_runs", "plot_predictions", "plot_lr_schedule"]

_METRIC_COLOURS = {"AP": "tab:blue", "AP50": "tab:orange", "AR100": "tab:green"}


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _finish(fig: Figure, axes: Sequence, title: str) -> Figure:
    """The shared look of the curve figures: small ticks, a light grid, an optional title."""
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_training(
    records: Sequence[dict],
    *,
    losses: Sequence[str] = ("loss", "loss_class", "loss_bbox", "loss_giou"),
    metrics: Sequence[str] = ("AP", "AP50", "AR100"),
    smooth: int = 5,
    title: str = "",
) -> Figure:
    """Two panels of one run: losses against steps (log scale, moving average over ``smooth``
    logged points, raw values faint) and COCO metrics against training minutes."""
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(9.0, 3.2))
    for name in losses:
        steps, values = series(records, name, x="step")
        if not steps:
            continue
        (line,) = ax_loss.plot(steps, _smooth(values, smooth), label=name, lw=1.4)
        ax_loss.plot(steps, values, color=line.get_color(), alpha=0.25, lw=0.8)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("optimisation step", fontsize=8)
    ax_loss.set_ylabel("loss (weighted total, and last-layer terms)", fontsize=8)
    ax_loss.legend(fontsize=7)
    for name in metrics:
        seconds, values = series(records, name, kind="eval")
        if seconds:
            ax_ap.plot([s / 60 for s in seconds], values, "o-", label=name, color=_METRIC_COLOURS.get(name))
    ax_ap.set_xlabel("training time (min, evaluation excluded)", fontsize=8)
    ax_ap.set_ylabel("COCO metric on held-out scenes (%)", fontsize=8)
    ax_ap.set_ylim(0, 100)
    ax_ap.legend(fontsize=7)
    return _finish(fig, (ax_loss, ax_ap), title)


def plot_runs(
    runs: Mapping[str, Sequence[dict]], *, metric: str = "AP", x: str = "minutes", title: str = ""
) -> Figure:
    """Several runs on shared axes: ``metric`` (left) and the smoothed total loss (right) against
    training minutes (``x="minutes"``) or optimisation steps (``x="step"``: compares runs whose
    steps cost different times). ``runs`` maps a label to that run's records."""
    if x not in ("minutes", "step"):
        raise ValueError(f"x must be 'minutes' or 'step', got {x!r}")
    key, scale = ("elapsed_s", 1 / 60) if x == "minutes" else ("step", 1)
    fig, (ax_ap, ax_loss) = plt.subplots(1, 2, figsize=(9.0, 3.2))
    for label, records in runs.items():
        xs, values = series(records, metric, kind="eval", x=key)
        (line,) = ax_ap.plot([v * scale for v in xs], values, "o-", label=label, ms=4)
        xs, losses = series(records, "loss", x=key)
        finite = [(s, v) for s, v in zip(xs, losses, strict=True) if math.isfinite(v)]
        if finite:
            fx, fy = zip(*finite, strict=True)
            ax_loss.plot([v * scale for v in fx], _smooth(fy, 5), color=line.get_color(), label=label)
    ax_ap.set_ylabel(f"COCO {metric} on held-out scenes (%)", fontsize=8)
    ax_ap.set_ylim(bottom=0)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("total training loss (moving average)", fontsize=8)
    xlabel = "training time (min, evaluation excluded)" if x == "minutes" else "optimisation step"
    for ax in (ax_ap, ax_loss):
        ax.set_xlabel(xlabel, fontsize=8)
        ax.legend(fontsize=7)
    return _finish(fig, (ax_ap, ax_loss), title)


def plot_seeded_runs(
    variants: Mapping[str, Sequence[Sequence[dict]]], *, metric: str = "AP", title: str = ""
) -> Figure:
    """Several seeds of several variants. Left: ``metric`` against optimisation steps, one thin line
    per seed in its variant's colour. Right: each seed's final ``metric`` as a dot and the variant's
    mean ± sample standard deviation as a bar, so the spread between seeds is on the page.
    ``variants`` maps a label to the records of each of its seeds' runs."""
    fig, (ax_curve, ax_final) = plt.subplots(1, 2, figsize=(9.0, 3.2), gridspec_kw={"width_ratios": [1.6, 1]})
    for i, (label, seeds) in enumerate(variants.items()):
        colour = f"C{i}"
        finals = []
        for k, records in enumerate(seeds):
            steps, values = series(records, metric, kind="eval", x="step")
            ax_curve.plot(
                steps, values, "o-", color=colour, lw=1.0, ms=3, alpha=0.8, label=label if k == 0 else None
            )
            finals.append(final_metrics(records)[metric])
        jitter = [i + 0.12 * (k - (len(finals) - 1) / 2) for k in range(len(finals))]
        ax_final.plot(jitter, finals, "o", color=colour, ms=5, alpha=0.8)
        if len(finals) > 1:
            mean, std = statistics.fmean(finals), statistics.stdev(finals)
            ax_final.errorbar([i + 0.35], [mean], yerr=[std], fmt="s", color=colour, ms=6, capsize=4)
    ax_curve.set_xlabel("optimisation step", fontsize=8)
    ax_curve.set_ylabel(f"COCO {metric} on held-out scenes (%)", fontsize=8)
    ax_curve.set_ylim(bottom=0)
    ax_curve.legend(fontsize=7)
    ax_final.set_xticks(range(len(variants)), list(variants), rotation=20, ha="right", fontsize=7)
    ax_final.set_xlim(-0.5, len(variants) - 0.3)
    ax_final.set_ylabel(f"final {metric} (dots: seeds; square: mean ± std)", fontsize=7)
    return _finish(fig, (ax_curve, ax_final), title)


def plot_predictions(
    images: Sequence[Tensor],
    detections: Sequence[Mapping[str, Tensor]],
    *,
    targets: Sequence[Mapping[str, Tensor]] | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    columns: int = 4,
    title: str | None = None,
) -> Figure:
    """Detections on images, one panel each: predicted boxes above ``score_threshold`` (red, with
    class and score), ground truth dashed green when ``targets`` are given; ``title`` above all
    panels (the layout leaves it room, clear of the panel titles).

    Args:
        images: (3, H, W) or (1, H, W) tensors in [0, 1].
        detections: per image ``scores`` (N,), ``labels`` (N,) and ``boxes_xyxy_px`` (N, 4), what
            :func:`detr_edu.postprocess.postprocess` returns.
        targets: per image ``boxes_xyxy_px`` (G, 4) ground-truth boxes in pixels.
        class_names: label -> name (default: the label number).
    """
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    if len(detections) != len(images):
        raise ValueError(f"got {len(images)} images but {len(detections)} detections")
    n = len(images)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, det) in enumerate(zip(images, detections, strict=True)):
        ax = axes.flat[i]
        picture = image.detach().float().clamp(0, 1)
        if picture.shape[0] == 1:
            ax.imshow(picture[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(picture.permute(1, 2, 0))
        if targets is not None:
            for box in targets[i]["boxes_xyxy_px"].tolist():
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", ls="--", lw=1))
        keep = det["scores"] > score_threshold
        boxes_xyxy = det["boxes_xyxy_px"][keep]
        for box, label, score in zip(
            boxes_xyxy.tolist(), det["labels"][keep].tolist(), det["scores"][keep].tolist(), strict=True
        ):
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.2))
            name = class_names[label] if class_names is not None else str(label)
            ax.text(
                x0,
                y0 - 1,
                f"{name} {score:.2f}",
                color="white",
                fontsize=6,
                bbox={"facecolor": "red", "alpha": 0.7, "pad": 0.5, "lw": 0},
            )
        ax.set_title(f"{int(keep.sum())} detections > {score_threshold}", fontsize=7)
    if title is not None:
        fig.suptitle(title, fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / (2.3 * rows)))  # a quarter inch for the title
    else:
        fig.tight_layout()
    return fig


def plot_lr_schedule(schedule: WarmupStepSchedule, *, total_steps: int, zoom_steps: int = 100) -> Figure:
    """The learning rate of each parameter group over a run of ``total_steps`` steps (progress =
    step / total_steps), whole run (left) and its first ``zoom_steps`` (right, the warm-up)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    steps = list(range(total_steps))
    factors = [schedule.factor(s, s / total_steps) for s in steps]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 2.8))
    names = ["transformer and heads", "backbone"] + [f"group {i}" for i in range(2, len(schedule.base_lrs))]
    for ax, upto in zip(axes, (total_steps, min(zoom_steps, total_steps)), strict=True):
        for base, name in zip(schedule.base_lrs, names, strict=False):
            ax.plot(steps[:upto], [base * f for f in factors[:upto]], label=f"{name} (base {base:g})")
        ax.set_xlabel("optimisation step", fontsize=8)
        ax.set_ylabel("learning rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("whole run", fontsize=8)
    axes[1].set_title(f"first {min(zoom_steps, total_steps)} steps: the warm-up", fontsize=8)
    fig.tight_layout()
    return fig
