"""Plotting for chapter 07 (contrastive denoising): noised queries, the attention mask, Q5 curves."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from detr_edu.box_ops import box_cxcywh_to_xyxy
from detr_edu.denoising import NoisedTargets, denoising_attn_mask, make_noised_targets
from detr_edu.scenes import make_scene
from detr_edu.viz.scenes import draw_scene

__all__ = [
    "mask_categories",
    "draw_denoising_mask",
    "plot_denoising_mask",
    "draw_noised_queries",
    "plot_noised_queries",
    "denoising_view",
    "plot_mask_invariance",
    "plot_padding_runs",
]

# Categories of a (query, key) pair of the decoder's self-attention.
BLOCKED, MATCH_MATCH, DN_OWN_GROUP, DN_MATCH = 0, 1, 2, 3
_CATEGORY_COLOURS = ["#3a3a3a", "#7fb3e6", "#8fd18f", "#e6d27f"]
_CATEGORY_NAMES = [
    "blocked",
    "matching -> matching",
    "denoising -> own group",
    "denoising -> matching",
]
# Slot kinds along the axes
_SLOT_COLOURS = {"positive": "#2ca02c", "negative": "#d62728", "padded": "#bbbbbb", "matching": "#1f77b4"}


def mask_categories(attn_mask: Tensor, pad_size: int) -> Tensor:
    """Label every (query, key) pair of a denoising mask with its category (for colouring).

    Args:
        attn_mask: (Nd + Nq, Nd + Nq) bool, True = blocked, denoising queries first.
        pad_size: Nd.

    Returns:
        int64 (Nd + Nq, Nd + Nq): 0 blocked, 1 matching -> matching, 2 denoising -> own group,
        3 denoising -> matching.
    """
    if attn_mask.dim() != 2 or attn_mask.shape[0] != attn_mask.shape[1] or attn_mask.dtype != torch.bool:
        raise ValueError(
            f"attn_mask must be a square bool matrix, got {attn_mask.dtype} {tuple(attn_mask.shape)}"
        )
    if not 0 <= pad_size <= attn_mask.shape[0]:
        raise ValueError(f"pad_size must be in [0, {attn_mask.shape[0]}], got {pad_size}")
    N = attn_mask.shape[0]
    is_dn = torch.arange(N) < pad_size  # (N,)
    cat = torch.full((N, N), MATCH_MATCH, dtype=torch.int64)
    cat[is_dn[:, None] & is_dn[None, :]] = DN_OWN_GROUP
    cat[is_dn[:, None] & ~is_dn[None, :]] = DN_MATCH
    cat[attn_mask.cpu()] = BLOCKED
    return cat


def _slot_kinds(noised: NoisedTargets | None, pad_size: int, num_queries: int, image: int) -> list[str]:
    kinds = []
    for s in range(pad_size):
        if noised is not None and not bool(noised.valid[image, s]):
            kinds.append("padded")
        else:
            pad = noised.single_pad if noised is not None else 1
            kinds.append("positive" if (s % (2 * pad)) < pad else "negative")
    return kinds + ["matching"] * num_queries


def draw_denoising_mask(
    ax: Axes,
    attn_mask: Tensor,
    *,
    groups: int,
    single_pad: int,
    noised: NoisedTargets | None = None,
    image: int = 0,
    annotate: bool = True,
    legend: bool = True,
) -> None:
    """Draw the self-attention mask with its blocks coloured and labelled.

    Rows are the queries that attend, columns the keys they read. Thin strips along the top and left
    show what each slot holds in image ``image`` (positive, negative, padded, matching).

    Args:
        ax: where to draw.
        attn_mask: (Nd + Nq, Nd + Nq) bool, True = blocked.
        groups, single_pad: the denoising layout.
        noised: the batch's :class:`NoisedTargets` (to mark padded slots), or None.
        image: which image's padding to mark.
        annotate: write the block names on the blocks.
        legend: add the colour legend.
    """
    Nd = 2 * groups * single_pad
    N = attn_mask.shape[0]
    Nq = N - Nd
    cat = mask_categories(attn_mask, Nd).numpy()
    ax.imshow(cat, cmap=ListedColormap(_CATEGORY_COLOURS), vmin=-0.5, vmax=3.5, interpolation="nearest")
    # slot strips
    strip = max(1.0, 0.035 * N)
    kinds = _slot_kinds(noised, Nd, Nq, image)
    for i, kind in enumerate(kinds):
        colour = _SLOT_COLOURS[kind]
        ax.add_patch(Rectangle((i - 0.5, -0.5 - strip), 1, strip, color=colour, clip_on=False, lw=0))
        ax.add_patch(Rectangle((-0.5 - strip, i - 0.5), strip, 1, color=colour, clip_on=False, lw=0))
    # group boundaries (thick) and positive/negative boundaries (thin)
    for g in range(groups + 1):
        edge = g * 2 * single_pad - 0.5
        ax.axhline(edge, color="white", lw=1.6)
        ax.axvline(edge, color="white", lw=1.6)
    for g in range(groups):
        mid = g * 2 * single_pad + single_pad - 0.5
        ax.axhline(mid, color="white", lw=0.5, ls=":", xmax=1)
        ax.axvline(mid, color="white", lw=0.5, ls=":")
    # ticks: one per part
    ticks, names = [], []
    for g in range(groups):
        ticks += [
            g * 2 * single_pad + (single_pad - 1) / 2,
            g * 2 * single_pad + single_pad + (single_pad - 1) / 2,
        ]
        names += [f"g{g}+", f"g{g}-"]
    if Nq:
        ticks.append(Nd + (Nq - 1) / 2)
        names.append("matching")
    small = 7 if groups <= 6 else 5
    ax.set_xticks(ticks, names, rotation=90 if groups > 3 else 0, fontsize=small)
    ax.set_yticks(ticks, names, fontsize=small)
    ax.tick_params(axis="y", pad=12)  # clear the slot strip on the left
    ax.set_xlim(-0.5 - strip, N - 0.5)
    ax.set_ylim(N - 0.5, -0.5 - strip)
    ax.set_xlabel("key (is read);  gk+ / gk-: positive / negative part of group k")
    ax.set_ylabel("query (attends)")
    if annotate:
        fs = 7
        if Nq and Nd:
            ax.text(
                Nd + Nq / 2 - 0.5,
                Nd / 2 - 0.5,
                "dn -> matching\nallowed",
                ha="center",
                va="center",
                fontsize=fs,
            )
            ax.text(
                Nd / 2 - 0.5,
                Nd + Nq / 2 - 0.5,
                "matching -> dn\nBLOCKED\n(would see\nthe answers)",
                ha="center",
                va="center",
                fontsize=fs,
                color="white",
            )
        if Nq:
            ax.text(
                Nd + Nq / 2 - 0.5,
                Nd + Nq / 2 - 0.5,
                "matching ->\nmatching",
                ha="center",
                va="center",
                fontsize=fs,
            )
        if groups >= 1 and single_pad:
            s = 2 * single_pad
            ax.text(s / 2 - 0.5, s / 2 - 0.5, "own\ngroup", ha="center", va="center", fontsize=fs)
        if groups >= 2:
            s = 2 * single_pad
            ax.text(
                1.5 * s - 0.5,
                s / 2 - 0.5,
                "other\ngroup:\nblocked",
                ha="center",
                va="center",
                fontsize=fs,
                color="white",
            )
    if legend:
        handles = [Patch(color=c, label=n) for c, n in zip(_CATEGORY_COLOURS, _CATEGORY_NAMES, strict=True)]
        handles += [
            Patch(color=_SLOT_COLOURS[k], label=f"image {image} slot: {k}")
            for k in ("positive", "negative", "padded", "matching")
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)


def plot_denoising_mask(
    attn_mask: Tensor,
    *,
    groups: int,
    single_pad: int,
    noised: NoisedTargets | None = None,
    image: int = 0,
    title: str = "",
) -> Figure:
    """The decoder self-attention mask of one batch, blocks labelled (see :func:`draw_denoising_mask`)."""
    fig, ax = plt.subplots(figsize=(7.6, 5.6))
    draw_denoising_mask(ax, attn_mask, groups=groups, single_pad=single_pad, noised=noised, image=image)
    Nd = 2 * groups * single_pad
    ax.set_title(
        title
        or f"Self-attention mask: {groups} groups x (pos + neg) x pad {single_pad} = {Nd} dn queries, "
        f"{attn_mask.shape[0] - Nd} matching",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def draw_noised_queries(
    ax: Axes,
    image: Tensor,
    target: dict[str, Tensor],
    noised: NoisedTargets,
    *,
    index: int = 0,
    groups: list[int] | None = None,
) -> None:
    """Draw image ``index`` of the batch with its ground truth (white) and its denoising queries:
    positives green (solid), negatives red (dashed), with their (possibly flipped) labels.

    Args:
        ax: where to draw.
        image: (3, H, W) in [0, 1]; target: its ground truth.
        noised: the batch's noised targets.
        index: the image's position in the batch.
        groups: which groups to draw (default: all).
    """
    draw_scene(ax, image, target)
    H, W = image.shape[1:]
    pad = noised.single_pad
    chosen = range(noised.groups) if groups is None else groups
    for g in chosen:
        for s in range(2 * pad):
            q = g * 2 * pad + s
            if not bool(noised.valid[index, q]):
                continue
            positive = s < pad
            x0, y0, x1, y1 = box_cxcywh_to_xyxy(noised.boxes_cxcywh[index, q]).tolist()
            colour = _SLOT_COLOURS["positive" if positive else "negative"]
            ax.add_patch(
                Rectangle(
                    (x0 * W - 0.5, y0 * H - 0.5),
                    (x1 - x0) * W,
                    (y1 - y0) * H,
                    fill=False,
                    ec=colour,
                    lw=1.0,
                    ls="-" if positive else "--",
                )
            )
            true_label = int(target["labels"][s % pad])
            label = int(noised.labels[index, q])
            flipped = "*" if label != true_label else ""
            ax.text(
                x1 * W - 0.5,
                y1 * H - 0.5,
                f"{label}{flipped}",
                color=colour,
                fontsize=7,
                ha="right",
                va="bottom",
            )


def plot_noised_queries(
    scenes: list[tuple[Tensor, dict[str, Tensor]]], noised: NoisedTargets, *, groups: list[int] | None = None
) -> Figure:
    """Every image of the batch with its ground truth and its positive and negative queries."""
    fig, axes = plt.subplots(1, len(scenes), figsize=(3.2 * len(scenes), 3.4), squeeze=False)
    for b, (ax, (image, target)) in enumerate(zip(axes[0], scenes, strict=True)):
        draw_noised_queries(ax, image, target, noised, index=b, groups=groups)
        G = len(target["labels"])
        ax.set_title(f"image {b}: {G} targets, {noised.single_pad - G} padded slots per part", fontsize=8)
    handles = [
        Patch(fill=False, ec="black", label="ground truth (white)"),
        Patch(fill=False, ec=_SLOT_COLOURS["positive"], label="positive (noise < 1x)"),
        Patch(fill=False, ec=_SLOT_COLOURS["negative"], ls="--", label="negative (noise 1x-2x)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    shown = f"all {noised.groups} groups" if groups is None else f"group(s) {list(groups)} of {noised.groups}"
    fig.suptitle(f"Denoising queries, {shown}; label* = label changed by label noise", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def denoising_view(
    dn_number: int = 50,
    digits_a: int = 6,
    digits_b: int = 2,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
    num_queries: int = 10,
    seed: int = 0,
    groups_drawn: int = 2,
) -> Figure:
    """Widget view: two scenes with ``digits_a`` and ``digits_b`` digits, the noised queries of their
    first ``groups_drawn`` groups and the batch's attention mask (all groups; image 1's padded slots
    marked), for the given denoising settings.

    The group count follows DINO's rule (:func:`detr_edu.denoising.denoising_groups`): from
    ``dn_number = 50`` on it is ``dn_number // single_pad``, below it ``2 * dn_number`` whatever the
    targets, so it can reach 98 groups; drawing every group's boxes would hide the scene, and with
    more than 8 groups the mask's lines and ticks mark every k-th group only.
    """
    if digits_a < 0 or digits_b < 0 or max(digits_a, digits_b) == 0:
        raise ValueError(f"need digit counts >= 0, not both 0; got {digits_a}, {digits_b}")
    if groups_drawn < 1:
        raise ValueError(f"groups_drawn must be >= 1, got {groups_drawn}")
    scenes = []
    for i, n in enumerate((digits_a, digits_b)):
        if n:
            scenes.append(make_scene(seed=seed, index=i, min_digits=n, max_digits=n))
        else:  # an empty scene: the image of a 1-digit scene with no target
            image, _ = make_scene(seed=seed, index=i, min_digits=1, max_digits=1)
            scenes.append(
                (image * 0, {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)})
            )
    targets = [t for _, t in scenes]
    noised = make_noised_targets(
        targets,
        dn_number=dn_number,
        num_classes=10,
        label_noise_ratio=label_noise_ratio,
        box_noise_scale=box_noise_scale,
        generator=torch.Generator().manual_seed(seed),
    )
    groups, pad = noised.groups, noised.single_pad
    mask = denoising_attn_mask(groups=groups, single_pad=pad, num_queries=num_queries)
    shown = list(range(min(groups_drawn, groups)))
    fig = plt.figure(figsize=(12, 4.4))
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 1.5])
    for b in range(2):
        ax = fig.add_subplot(grid[0, b])
        draw_noised_queries(ax, *scenes[b], noised, index=b, groups=shown)
        drawn = f"group 0 of {groups}" if len(shown) == 1 else f"groups 0-{len(shown) - 1} of {groups}"
        ax.set_title(f"image {b}: {len(targets[b]['labels'])} targets ({drawn} drawn)", fontsize=9)
    ax = fig.add_subplot(grid[0, 2])
    draw_denoising_mask(
        ax, mask, groups=groups, single_pad=pad, noised=noised, image=1, annotate=groups <= 4, legend=False
    )
    if groups > 8:  # a line and a tick per part would cover the mask: mark every k-th group only
        step = -(-groups // 8)
        for line in list(ax.lines):
            line.remove()
        for edge in [g * 2 * pad - 0.5 for g in range(0, groups, step)] + [noised.num_queries - 0.5]:
            ax.axhline(edge, color="white", lw=0.8)
            ax.axvline(edge, color="white", lw=0.8)
        ticks = [g * 2 * pad + pad - 0.5 for g in range(0, groups, step)]
        names = [f"g{g}" for g in range(0, groups, step)]
        ticks.append(noised.num_queries + (num_queries - 1) / 2)
        names.append("matching")
        ax.set_xticks(ticks, names, rotation=90, fontsize=6)
        ax.set_yticks(ticks, names, fontsize=6)
    if dn_number >= 50:
        rule = f"{dn_number} // {pad}" if dn_number >= pad else f"max(1, {dn_number} // {pad})"
    else:
        rule = f"2 x {dn_number} (dn_number < 50)"
    ax.set_title(
        f"mask: groups = {rule} = {groups}\n{groups} x 2 x pad {pad} = {noised.num_queries} dn + "
        f"{num_queries} matching\n(strips: image 1's slots; grey = padded)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_mask_invariance(changes: dict[str, float]) -> Figure:
    """Bar chart: largest change of the matching queries' outputs when the denoising queries change."""
    fig, ax = plt.subplots(figsize=(6, 2.6))
    names = list(changes)
    values = [max(v, 1e-12) for v in changes.values()]
    ax.barh(names, values, color=["#2ca02c" if n.startswith("with ") else "#d62728" for n in names])
    ax.set_xscale("log")
    ax.set_xlim(1e-12, 10)
    for y, v in enumerate(changes.values()):
        ax.text(max(v, 1e-12) * 1.5, y, f"{v:.1e}", va="center", fontsize=8)
    ax.set_xlabel("max |change| of matching-query logits and boxes (0 shown at 1e-12)")
    ax.set_title("Perturb the denoising queries: do the matching queries notice?", fontsize=9)
    fig.tight_layout()
    return fig


def plot_padding_runs(runs: list[dict], *, window: int = 25) -> Figure:
    """Q5: matching-query training objective and ``loss_class_dn`` of the runs of
    ``benchmarks/bench_dn_padding.py``, with and without padded queries in the loss (moving average)."""
    if not runs:
        raise ValueError("need at least one run")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))

    def smooth(values: list[float]) -> np.ndarray:
        v = np.asarray(values, dtype=float)
        w = min(window, len(v))
        return np.convolve(v, np.ones(w) / w, mode="valid")

    for r in runs:
        colour = "#1f77b4" if r["padding_in_loss"] else "#ff7f0e"
        style = ["-", "--", ":", "-."][r["seed"] % 4]
        label = f"{'padding in loss' if r['padding_in_loss'] else 'padding left out'}, seed {r['seed']}"
        axes[0].plot(smooth(r["curve"]), color=colour, ls=style, label=label, lw=1.2)
        axes[1].plot(smooth(r["dn_class_curve"]), color=colour, ls=style, label=label, lw=1.2)
    axes[0].set_title("matching queries: weighted training objective", fontsize=9)
    axes[1].set_title("loss_class_dn (as each variant defines it)", fontsize=9)
    for ax in axes:
        ax.set_xlabel(f"step (moving average over {window})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
