"""Chapter 01 pictures: masks, patch attention on a photograph, and the cost of dense attention."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter
from torch import Tensor

from detr_edu.attention import expand_key_padding_mask
from detr_edu.patches import patch_attention_map

__all__ = ["plot_masks", "plot_patch_attention", "plot_attention_cost"]


def plot_masks(attn_mask: Tensor, key_padding_mask: Tensor) -> Figure:
    """Draw an (Nq, Nk) attn_mask, a (B, Nk) key_padding_mask and the (B, Nq, Nk) mask it expands to.

    Dark = blocked (True). The key padding mask has one row per *image*, one column per *key*.
    """
    B, Nk = key_padding_mask.shape
    Nq = attn_mask.shape[0]
    expanded = expand_key_padding_mask(key_padding_mask, Nq)  # (B, Nq, Nk)
    fig, axes = plt.subplots(1, 2 + B, figsize=(3.0 * (2 + B), 2.4), layout="constrained")
    panels = [
        (attn_mask, f"attn_mask (Nq={Nq}, Nk={Nk})", "key", "query"),
        (key_padding_mask, f"key_padding_mask (B={B}, Nk={Nk})", "key", "image"),
    ] + [(expanded[b], f"image {b}: expanded (Nq, Nk)", "key", "query") for b in range(B)]
    for ax, (m, title, xl, yl) in zip(axes, panels, strict=True):
        ax.imshow(m.numpy().astype(float), cmap="Greys", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.set_xticks(np.arange(-0.5, m.shape[1]), minor=True)
        ax.set_yticks(np.arange(-0.5, m.shape[0]), minor=True)
        ax.grid(which="minor", color="tab:blue", linewidth=0.5)
        ax.tick_params(labelsize=7, which="both", length=0)
    fig.suptitle("Boolean masks: dark = True = blocked", fontsize=10)
    return fig


def plot_patch_attention(
    image: Tensor,
    *,
    patch_size: int = 32,
    query_row: int = 4,
    query_col: int = 6,
    head: str = "all",
    temperature: float = 1.0,
    pad_cols: int = 0,
    mask_padding: bool = True,
) -> Figure:
    """The photograph with the query patch outlined, and the attention weights of that patch.

    ``head`` is "all" (one head over every feature) or "R", "G", "B" (3 heads, one colour each).
    Padding columns (zero pixels) are drawn hatched; with ``mask_padding`` they get no weight.
    """
    heads = {"all": None, "R": 0, "G": 1, "B": 2}
    if head not in heads:
        raise ValueError(f"head must be one of {list(heads)}, got {head!r}")
    weights = patch_attention_map(
        image,
        patch_size=patch_size,
        query_rc=(query_row, query_col),
        head=heads[head],
        temperature=temperature,
        pad_cols=pad_cols,
        mask_padding=mask_padding,
    )  # (gh, gw + pad)
    gh, gw_all = weights.shape
    gw = gw_all - pad_cols
    p = patch_size
    shown = torch.zeros(3, gh * p, gw_all * p)
    shown[:, :, : gw * p] = image[:, : gh * p, : gw * p]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    axes[0].imshow(shown.permute(1, 2, 0).numpy())
    axes[0].set_title("query patch (yellow); padding hatched", fontsize=9)
    im = axes[1].imshow(weights.numpy(), cmap="magma", extent=(0, gw_all * p, gh * p, 0))
    axes[1].imshow(shown.permute(1, 2, 0).numpy(), alpha=0.25, extent=(0, gw_all * p, gh * p, 0))
    pad_share = float(weights[:, gw:].sum()) if pad_cols else 0.0
    axes[1].set_title(
        f"attention weights (head={head}, T={temperature:g})\nshare on padding: {pad_share:.1%}", fontsize=9
    )
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.add_patch(
            Rectangle((query_col * p, query_row * p), p, p, fill=False, edgecolor="yellow", linewidth=2)
        )
        if pad_cols:
            ax.add_patch(
                Rectangle((gw * p, 0), pad_cols * p, gh * p, fill=False, hatch="//", edgecolor="tab:cyan")
            )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_attention_cost(lengths: list[int], seconds: list[float], matrix_bytes: list[int]) -> Figure:
    """Log-log plot of measured time and attention-matrix memory against sequence length N."""
    n = np.asarray(lengths, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, values, label in (
        (axes[0], np.asarray(seconds) * 1e3, "forward time (ms)"),
        (axes[1], np.asarray(matrix_bytes) / 2**20, "attention matrix (MiB)"),
    ):
        ax.loglog(n, values, "o-", label="measured")
        ax.loglog(n, values[-1] * (n / n[-1]) ** 2, "--", color="grey", label="~ N^2")
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel(label)
        # one plain label per measured length; log axes' minor labels (3x10^2, 4x10^2, ...) collide
        ax.xaxis.set_major_locator(FixedLocator(n))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{int(v):,}" for v in n]))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Dense self-attention cost grows with N^2", fontsize=10)
    fig.tight_layout()
    return fig
