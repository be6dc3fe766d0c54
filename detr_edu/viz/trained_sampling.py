"""Chapter 04's "the trained detector's eyes": where a trained Deformable DETR / DINO samples.

* :func:`encoder_sampling` -- every encoder pixel's sampling locations and attention weights, per
  encoder layer. The encoder layers do not return them, so the layers' own attention modules are
  called again on the inputs they received (captured with forward hooks) with
  ``return_sampling=True``; the re-run's output is checked against the original one.
* :func:`decoder_trace` -- per decoder layer, every query's reference box, sampling points and
  weights, and that layer's prediction; the queries matched to the ground truth come first.
* pictures: :func:`plot_encoder_pixel`, :func:`plot_decoder_query`, and :func:`plot_learned_sampling`
  in the spirit of the Deformable DETR paper's figure of learned sampling points (all levels in one
  picture, colour = attention weight), drawn from these live tensors.
* :class:`EncoderPixelView` and :class:`DecoderQueryView`: the widgets, thin wiring of the above.

Coordinates: one image, no padding, so every level's padded frame is the image frame and every
location is a normalised (x, y) of the picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn
from torchvision.ops import box_iou

from detr_edu.box_ops import box_cxcywh_to_xyxy
from detr_edu.deformable import level_start_index_from_shapes
from detr_edu.matcher import HungarianMatcher
from detr_edu.viz.deformable import HEAD_COLOURS, initial_sampling

__all__ = [
    "EncoderSampling",
    "encoder_sampling",
    "pixel_token",
    "pixel_at",
    "initial_ring",
    "DecoderTrace",
    "decoder_trace",
    "query_order",
    "describe_pixel",
    "describe_query",
    "plot_encoder_pixel",
    "plot_decoder_query",
    "plot_learned_sampling",
    "EncoderPixelView",
    "DecoderQueryView",
]

LEVEL_COLOURS = ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown")


@dataclass(frozen=True)
class EncoderSampling:
    """Where every encoder pixel samples, in every encoder layer, for one image.

    Attributes:
        locations: (Le, Nv, nh, L, P, 2) normalised (x, y).
        weights: (Le, Nv, nh, L, P), each head's L * P weights sum to 1.
        spatial_shapes: (L, 2) long (H_l, W_l).
    """

    locations: Tensor
    weights: Tensor
    spatial_shapes: Tensor


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    try:
        return model.encoder.encoder.layers
    except AttributeError as err:
        raise ValueError(
            f"{type(model).__name__} has no deformable encoder (model.encoder.encoder.layers): "
            "use a Deformable DETR or DINO"
        ) from err


@torch.no_grad()
def encoder_sampling(model: nn.Module, image: Tensor) -> EncoderSampling:
    """Every encoder pixel's sampling points and weights, for one normalised input image (3, H, W).

    Raises:
        ValueError: the model has no deformable encoder, or the image is not (3, H, W).
        RuntimeError: re-running a layer's attention did not reproduce its output (it would mean the
            hooks saw something else than what the layer computed).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    layers = _encoder_layers(model)
    captured: list[tuple[tuple, dict, Tensor]] = []

    def keep(_module, args, kwargs, output):
        captured.append((args, kwargs, output))

    handles = [layer.self_attn.register_forward_hook(keep, with_kwargs=True) for layer in layers]
    try:
        was_training = model.training
        model.eval()
        encoded = model.encoder(model.backbone(image[None]))  # EncoderOutput
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    locations, weights = [], []
    for layer, (args, kwargs, output) in zip(layers, captured, strict=True):
        again, loc, w = layer.self_attn(*args, **{**kwargs, "return_sampling": True})
        if not torch.allclose(again, output, atol=1e-5, rtol=1e-5):
            raise RuntimeError("re-running the encoder's attention did not reproduce its output")
        locations.append(loc[0])  # (Nv, nh, L, P, 2)
        weights.append(w[0])  # (Nv, nh, L, P)
    return EncoderSampling(
        locations=torch.stack(locations),  # (Le, Nv, nh, L, P, 2)
        weights=torch.stack(weights),  # (Le, Nv, nh, L, P)
        spatial_shapes=encoded.flat.spatial_shapes.cpu(),
    )


def pixel_token(spatial_shapes: Tensor, level: int, row: int, col: int) -> int:
    """The flat token index of pixel (row, col) of ``level`` (levels flattened row-major, concatenated)."""
    L = spatial_shapes.shape[0]
    if not 0 <= level < L:
        raise ValueError(f"level must be in [0, {L}), got {level}")
    h, w = spatial_shapes[level].tolist()
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"pixel ({row}, {col}) is outside level {level} ({h} x {w})")
    return int(level_start_index_from_shapes(spatial_shapes)[level]) + row * w + col


def pixel_at(spatial_shapes: Tensor, level: int, x: float, y: float) -> tuple[int, int]:
    """The (row, col) of ``level`` under the normalised point (x, y) (clamped to the map)."""
    h, w = spatial_shapes[level].tolist()
    return min(max(int(y * h), 0), h - 1), min(max(int(x * w), 0), w - 1)


def initial_ring(spatial_shapes: Tensor, level: int, row: int, col: int, *, num_heads: int, num_points: int):
    """The same pixel's sampling points in an *untrained* layer (the paper's initial ring, uniform weights).

    Returns:
        ``(locations (nh, L, P, 2), weights (nh, L, P))``.
    """
    h, w = spatial_shapes[level].tolist()
    centre = torch.tensor([(col + 0.5) / w, (row + 0.5) / h])
    return initial_sampling(
        reference=centre, spatial_shapes=spatial_shapes, num_heads=num_heads, num_points=num_points
    )


@dataclass(frozen=True)
class DecoderTrace:
    """Every decoder layer's view of every query, for one image.

    Attributes:
        references: (Ld, Nq, 4) the reference box each layer samples around (cxcywh, normalised).
        locations: (Ld, Nq, nh, L, P, 2); weights: (Ld, Nq, nh, L, P).
        logits: (Ld, Nq, K) and boxes: (Ld, Nq, 4): each layer's prediction.
        matched_queries, matched_targets: (G,) the last layer's Hungarian matching to the target
            (empty without a target).
    """

    references: Tensor
    locations: Tensor
    weights: Tensor
    logits: Tensor
    boxes: Tensor
    matched_queries: Tensor
    matched_targets: Tensor


@torch.no_grad()
def decoder_trace(
    model: nn.Module,
    image: Tensor,
    target: dict[str, Tensor] | None = None,
    *,
    matcher: HungarianMatcher | None = None,
) -> DecoderTrace:
    """Run the model on one normalised image (3, H, W) and collect every decoder layer's sampling and
    prediction; with a ``target`` (``labels``, ``boxes``) also the last layer's matching."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    was_training = model.training
    model.eval()
    out = model(image[None], return_intermediates=True)
    model.train(was_training)
    inter = out["intermediates"]
    layers = [
        *out.get("aux_outputs", []),
        {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]},
    ]
    Nq = out["pred_logits"].shape[1]
    refs = [r[0, -Nq:] for r in inter["inter_references"]]  # Ld x (Nq, 2|4)
    refs = [
        r if r.shape[-1] == 4 else torch.cat([r, torch.zeros_like(r)], -1) for r in refs
    ]  # points: no size
    matched_q = matched_t = torch.zeros(0, dtype=torch.long)
    if target is not None:
        ((matched_q, matched_t),) = (matcher or HungarianMatcher())(
            {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}, [target]
        )
        order = matched_t.argsort()
        matched_q, matched_t = matched_q[order], matched_t[order]
    return DecoderTrace(
        references=torch.stack(refs),  # (Ld, Nq, 4)
        locations=torch.stack([loc[0, -Nq:] for loc, _ in inter["sampling"]]),  # (Ld, Nq, nh, L, P, 2)
        weights=torch.stack([w[0, -Nq:] for _, w in inter["sampling"]]),  # (Ld, Nq, nh, L, P)
        logits=torch.stack([o["pred_logits"][0] for o in layers]),  # (Ld, Nq, K)
        boxes=torch.stack([o["pred_boxes"][0] for o in layers]),  # (Ld, Nq, 4)
        matched_queries=matched_q,
        matched_targets=matched_t,
    )


def query_order(trace: DecoderTrace) -> list[int]:
    """Queries matched to the ground truth first (in target order), then the rest by their best score."""
    matched = trace.matched_queries.tolist()
    scores = trace.logits[-1].sigmoid().max(-1).values  # (Nq,)
    rest = [q for q in scores.argsort(descending=True).tolist() if q not in matched]
    return matched + rest


def _level_shares(weights: Tensor) -> list[float]:
    """(nh, L, P) -> each level's share of the total weight (the heads averaged)."""
    return (weights.sum((0, 2)) / weights.shape[0]).tolist()


def describe_pixel(enc: EncoderSampling, *, layer: int, level: int, row: int, col: int, top: int = 3) -> str:
    """The printed numbers of the encoder view: the pixel, its weight per level, its strongest samples."""
    token = pixel_token(enc.spatial_shapes, level, row, col)
    w = enc.weights[layer, token]  # (nh, L, P)
    loc = enc.locations[layer, token]  # (nh, L, P, 2)
    h, w_l = enc.spatial_shapes[level].tolist()
    lines = [
        f"encoder layer {layer}, level {level} ({h} x {w_l}) pixel (row {row}, col {col}) = token {token}",
        "weight per level (heads averaged): "
        + ", ".join(f"L{i} {s:.3f}" for i, s in enumerate(_level_shares(w))),
    ]
    flat = w.flatten()
    nh, L, P = w.shape
    for k in flat.argsort(descending=True)[:top].tolist():
        hd, lv, p = k // (L * P), (k // P) % L, k % P
        x, y = loc[hd, lv, p].tolist()
        lines.append(
            f"  head {hd} level {lv} point {p}: weight {float(flat[k]):.3f} at (x, y) = ({x:.3f}, {y:.3f})"
        )
    return "\n".join(lines)


def describe_query(
    trace: DecoderTrace,
    *,
    query: int,
    target: dict[str, Tensor] | None = None,
    class_names: list[str] | None = None,
) -> str:
    """The printed numbers of the decoder view: per layer the reference, the prediction and its IoU."""
    matched = dict(zip(trace.matched_queries.tolist(), trace.matched_targets.tolist(), strict=True))
    names = class_names or [str(k) for k in range(trace.logits.shape[-1])]
    j = matched.get(query)
    head = f"query {query}: " + (
        f"matched to target {j} (digit {names[int(target['labels'][j])]})"
        if j is not None and target is not None
        else "not matched"
    )
    lines = [head]
    for layer in range(trace.logits.shape[0]):
        prob = trace.logits[layer, query].sigmoid()  # (K,)
        k = int(prob.argmax())
        ref = ", ".join(f"{v:.3f}" for v in trace.references[layer, query].tolist())
        box = ", ".join(f"{v:.3f}" for v in trace.boxes[layer, query].tolist())
        line = f"  layer {layer}: reference ({ref}) -> box ({box}), class {names[k]} p={float(prob[k]):.3f}"
        if j is not None and target is not None:
            iou = box_iou(
                box_cxcywh_to_xyxy(trace.boxes[layer, query][None]),
                box_cxcywh_to_xyxy(target["boxes"][j][None]),
            )
            line += f", IoU {float(iou):.3f}"
        lines.append(line)
    return "\n".join(lines)


def _limits(points: Tensor) -> tuple[float, float]:
    """Axis limits that show the image and every point (N, 2), at most 1.5 image widths outside it."""
    lo = min(0.0, float(points.min()) - 0.05) if points.numel() else 0.0
    hi = max(1.0, float(points.max()) + 0.05) if points.numel() else 1.0
    return max(lo, -1.5), min(hi, 2.5)


def _show(ax: plt.Axes, image: Tensor, title: str, limits: tuple[float, float] = (0.0, 1.0)) -> None:
    """The picture in normalised coordinates; outside it (where samples read zeros) grey."""
    ax.set_facecolor("0.82")
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, 1, 1, 0), interpolation="nearest")
    ax.set_xlim(*limits)
    ax.set_ylim(limits[1], limits[0])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def _grid(ax: plt.Axes, h: int, w: int) -> None:
    for i in range(1, h):
        ax.plot([0, 1], [i / h, i / h], color="white", lw=0.3, alpha=0.5)
    for j in range(1, w):
        ax.plot([j / w, j / w], [0, 1], color="white", lw=0.3, alpha=0.5)
    ax.add_patch(Rectangle((0, 0), 1, 1, fill=False, ec="black", lw=0.8))


def _box(ax: plt.Axes, box: list[float], **style) -> None:
    cx, cy, w, h = box
    ax.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, fill=False, **style))


def plot_encoder_pixel(
    image: Tensor,
    enc: EncoderSampling,
    *,
    layer: int,
    level: int,
    row: int,
    col: int,
    head: int | None = None,
    ring: tuple[Tensor, Tensor] | None = None,
    title: str = "",
) -> Figure:
    """One encoder pixel's sampling points on every level, per head (colour), area = attention weight.

    Each panel shows the picture with that level's pixel grid; the chosen pixel is outlined on its
    level and its centre starred on all. With ``ring`` (:func:`initial_ring`), the untrained layer's
    points are drawn too, hollow. Axes are named ``"level l"`` for clicks.
    """
    token = pixel_token(enc.spatial_shapes, level, row, col)
    loc, w = enc.locations[layer, token], enc.weights[layer, token]  # (nh, L, P, 2), (nh, L, P)
    nh, L, P, _ = loc.shape
    heads = range(nh) if head is None else [head]
    w_max = float(w[list(heads)].max())
    shares = _level_shares(w)
    h0, w0 = enc.spatial_shapes[level].tolist()
    centre = ((col + 0.5) / w0, (row + 0.5) / h0)
    shown = [loc[list(heads)].reshape(-1, 2)] + (
        [ring[0][list(heads)].reshape(-1, 2)] if ring is not None else []
    )
    limits = _limits(torch.cat(shown))  # the same on every level: the points may leave the picture
    fig, axes = plt.subplots(1, L, figsize=(2.9 * L, 3.3), squeeze=False)
    for lvl, ax in enumerate(axes[0]):
        ax.set_gid(f"level {lvl}")
        h, w_l = enc.spatial_shapes[lvl].tolist()
        _show(ax, image, f"level {lvl} ({h} x {w_l}): {100 * shares[lvl]:.0f}% of the weight", limits)
        _grid(ax, h, w_l)
        if lvl == level:
            ax.add_patch(Rectangle((col / w0, row / h0), 1 / w0, 1 / h0, fill=False, ec="white", lw=2))
        if ring is not None:
            r_loc = ring[0][list(heads), lvl].reshape(-1, 2)  # (n, 2)
            ax.scatter(r_loc[:, 0], r_loc[:, 1], s=30, facecolors="none", edgecolors="white", linewidths=0.9)
        for hd in heads:
            xy = loc[hd, lvl].numpy()  # (P, 2)
            ax.scatter(
                xy[:, 0],
                xy[:, 1],
                s=6 + 140 * w[hd, lvl].numpy() / w_max,
                color=HEAD_COLOURS[hd % 10],
                edgecolors="black",
                linewidths=0.4,
            )
        ax.plot(*centre, marker="*", markersize=11, color="white", markeredgecolor="black")
    which = "all heads (colour = head)" if head is None else f"head {head}"
    extra = "; hollow white: the untrained layer's initial ring" if ring is not None else ""
    fig.suptitle(
        title
        or f"encoder layer {layer}, pixel (row {row}, col {col}) of level {level}: {which}, "
        f"area = attention weight{extra}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_decoder_query(
    image: Tensor,
    trace: DecoderTrace,
    *,
    query: int,
    target: dict[str, Tensor] | None = None,
    head: int | None = None,
    class_names: list[str] | None = None,
    title: str = "",
) -> Figure:
    """One decoder query, layer by layer: the reference box it samples around (white), its sampling
    points (colour = level, area = weight), and that layer's predicted box and class (red); the
    matched ground truth dashed green."""
    Ld, Nq, nh, L, P, _ = trace.locations.shape
    if not 0 <= query < Nq:
        raise ValueError(f"query must be in [0, {Nq}), got {query}")
    names = class_names or [str(k) for k in range(trace.logits.shape[-1])]
    matched = dict(zip(trace.matched_queries.tolist(), trace.matched_targets.tolist(), strict=True))
    heads = list(range(nh)) if head is None else [head]
    fig, axes = plt.subplots(1, Ld, figsize=(3.0 * Ld, 3.4), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        prob = trace.logits[layer, query].sigmoid()
        k = int(prob.argmax())
        _show(ax, image, f"layer {layer}: predicts {names[k]} (p = {float(prob[k]):.2f})")
        if query in matched and target is not None:
            _box(ax, target["boxes"][matched[query]].tolist(), ec="lime", ls="--", lw=1.2)
        _box(ax, trace.references[layer, query].tolist(), ec="white", lw=1.3)
        w = trace.weights[layer, query][heads]  # (n, L, P)
        w_max = float(w.max())
        for lvl in range(L):
            xy = trace.locations[layer, query][heads, lvl].reshape(-1, 2)  # (n*P, 2)
            ax.scatter(
                xy[:, 0],
                xy[:, 1],
                s=4 + 90 * w[:, lvl].reshape(-1) / w_max,
                color=LEVEL_COLOURS[lvl % len(LEVEL_COLOURS)],
                edgecolors="black",
                linewidths=0.3,
                label=f"level {lvl}" if layer == 0 else None,
            )
        _box(ax, trace.boxes[layer, query].tolist(), ec="red", lw=1.5)
    axes[0][0].legend(fontsize=6, loc="lower left", framealpha=0.6)
    status = (
        f"matched to digit {names[int(target['labels'][matched[query]])]}"
        if (query in matched and target is not None)
        else "unmatched"
    )
    fig.suptitle(
        title
        or f"decoder query {query} ({status}): reference box (white) -> prediction (red), "
        f"{'all heads' if head is None else f'head {head}'}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_learned_sampling(
    image: Tensor,
    trace: DecoderTrace,
    enc: EncoderSampling,
    target: dict[str, Tensor],
    *,
    class_names: list[str] | None = None,
    max_objects: int = 5,
    title: str = "",
) -> Figure:
    """Learned sampling points in the spirit of the Deformable DETR paper's figure: for each digit
    (columns), top row: the last decoder layer's points of the query matched to it, bottom row: the
    last encoder layer's points of the level-0 pixel at the digit's centre. All levels and heads in one
    picture, colour = attention weight; cross: reference point; red: the final box.
    """
    names = class_names or [str(k) for k in range(trace.logits.shape[-1])]
    n = min(len(trace.matched_queries), max_objects)
    if n == 0:
        raise ValueError("no matched query: pass a target with at least one box to decoder_trace")
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n + 0.8, 5.4), squeeze=False)
    h0, w0 = enc.spatial_shapes[0].tolist()
    cmap = plt.get_cmap("plasma")
    for c in range(n):
        q, j = int(trace.matched_queries[c]), int(trace.matched_targets[c])
        box = trace.boxes[-1, q].tolist()
        rows = [
            ("decoder", trace.locations[-1, q], trace.weights[-1, q], trace.references[-1, q, :2].tolist()),
        ]
        cx, cy = target["boxes"][j, :2].tolist()
        row, col = pixel_at(enc.spatial_shapes, 0, cx, cy)
        token = pixel_token(enc.spatial_shapes, 0, row, col)
        rows.append(
            (
                "encoder",
                enc.locations[-1, token],
                enc.weights[-1, token],
                [(col + 0.5) / w0, (row + 0.5) / h0],
            )
        )
        for r, (kind, loc, w, ref) in enumerate(rows):
            ax = axes[r][c]
            label = f"digit {names[int(target['labels'][j])]}"
            where = f"query {q}" if kind == "decoder" else f"pixel ({row}, {col}) of level 0"
            # the decoder's points stay near the digit: show the picture; the encoder's go far outside it
            _show(
                ax,
                image,
                f"{label}: {where}",
                (0.0, 1.0) if kind == "decoder" else _limits(loc.reshape(-1, 2)),
            )
            _box(ax, box, ec="red", lw=1.2)
            xy, wt = loc.reshape(-1, 2), w.reshape(-1)  # (nh*L*P, 2), (nh*L*P,)
            order = wt.argsort()  # heaviest on top
            sc = ax.scatter(
                xy[order, 0],
                xy[order, 1],
                c=wt[order],
                cmap=cmap,
                vmin=0,
                vmax=float(wt.max()),
                s=10 + 90 * wt[order] / float(wt.max()),
                edgecolors="black",
                linewidths=0.3,
            )
            ax.plot(*ref, marker="+", markersize=12, color="lime", markeredgewidth=2)
            if c == 0:
                ax.set_ylabel(f"{kind}\n(last layer)", fontsize=8)
    fig.colorbar(sc, ax=axes, fraction=0.02, pad=0.01, label="attention weight (of its head)")
    fig.suptitle(
        title or "where the trained DINO samples: all levels and heads, colour = weight", fontsize=10
    )
    return fig


class EncoderPixelView:
    """Widget: click a pixel of any level to see where the trained encoder samples for it.

    Args:
        model: a trained Deformable DETR / DINO.
        scenes: (display image (3, H, W) in [0, 1], model input (3, h, w) normalised) pairs.
    """

    def __init__(self, model: nn.Module, scenes: list[tuple[Tensor, Tensor]], *, dpi: int = 72) -> None:
        import ipywidgets as widgets

        from detr_edu.viz.canvas import ClickableFigure, serialised

        self.model, self.scenes = model, scenes
        self._cache: dict[int, EncoderSampling] = {}
        enc = self.sampling(0)
        Le, _, nh, L, P, _ = enc.locations.shape
        self.num_heads, self.num_points = nh, P
        h, w = enc.spatial_shapes[1].tolist()
        self.pixel = (1, h // 2, w // 2)  # level, row, col
        self.canvas = ClickableFigure(self.on_mouse, dpi=dpi)
        self.scene = widgets.Dropdown(
            options=[(f"held-out scene {i}", i) for i in range(len(scenes))], value=0, description="scene"
        )
        self.layer = widgets.ToggleButtons(
            options=[(f"encoder layer {i}", i) for i in range(Le)], value=Le - 1
        )
        self.head = widgets.Dropdown(
            options=[("all heads", -1)] + [(f"head {i}", i) for i in range(nh)], value=-1, description="head"
        )
        self.ring = widgets.Checkbox(value=False, description="compare with the untrained initial ring")
        self.text = widgets.Output()
        for control in (self.scene, self.layer, self.head, self.ring):
            control.observe(serialised(lambda _: self.redraw()), names="value")
        self.redraw()
        self.widget = widgets.VBox(
            [widgets.HBox([self.scene, self.head]), self.layer, self.ring, self.canvas.image, self.text]
        )
        self.widget.add_class("detr-edu-encoder-view")

    def sampling(self, scene: int) -> EncoderSampling:
        if scene not in self._cache:
            self._cache[scene] = encoder_sampling(self.model, self.scenes[scene][1])
        return self._cache[scene]

    def on_mouse(self, kind: str, hit) -> None:
        """A click (mouse down) on a level picks that level's pixel under the pointer."""
        if kind != "down" or hit is None or not hit.name.startswith("level "):
            return
        level = int(hit.name.split()[1])
        self.pixel = (level, *pixel_at(self.sampling(self.scene.value).spatial_shapes, level, hit.x, hit.y))
        self.redraw()

    def redraw(self) -> None:
        enc = self.sampling(self.scene.value)
        level, row, col = self.pixel
        ring = (
            initial_ring(
                enc.spatial_shapes, level, row, col, num_heads=self.num_heads, num_points=self.num_points
            )
            if self.ring.value
            else None
        )
        head = None if self.head.value < 0 else self.head.value
        self.canvas.show(
            plot_encoder_pixel(
                self.scenes[self.scene.value][0],
                enc,
                layer=self.layer.value,
                level=level,
                row=row,
                col=col,
                head=head,
                ring=ring,
            )
        )
        self.numbers = describe_pixel(enc, layer=self.layer.value, level=level, row=row, col=col)
        self.text.clear_output(wait=True)
        with self.text:
            print(self.numbers)


class DecoderQueryView:
    """Widget: pick a decoder query (those matched to digits first) and follow it layer by layer.

    Args:
        model: a trained Deformable DETR / DINO.
        scenes: (display image, model input, target) triples.
        class_names: a name per class.
    """

    def __init__(
        self,
        model: nn.Module,
        scenes: list[tuple[Tensor, Tensor, dict]],
        *,
        class_names: list[str] | None = None,
        dpi: int = 72,
    ) -> None:
        import ipywidgets as widgets

        from detr_edu.viz.canvas import serialised

        self.model, self.scenes, self.class_names = model, scenes, class_names
        self._cache: dict[int, DecoderTrace] = {}
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="auto"))
        self.dpi = dpi
        self.scene = widgets.Dropdown(
            options=[(f"held-out scene {i}", i) for i in range(len(scenes))], value=0, description="scene"
        )
        self.query = widgets.Dropdown(description="query")
        nh = self.trace(0).locations.shape[2]
        self.head = widgets.Dropdown(
            options=[("all heads", -1)] + [(f"head {i}", i) for i in range(nh)], value=-1, description="head"
        )
        self.text = widgets.Output()
        self._set_queries()
        self.scene.observe(serialised(self._on_scene), names="value")
        for control in (self.query, self.head):
            control.observe(serialised(lambda _: self.redraw()), names="value")
        self.redraw()
        self.widget = widgets.VBox([widgets.HBox([self.scene, self.query, self.head]), self.image, self.text])
        self.widget.add_class("detr-edu-decoder-view")

    def trace(self, scene: int) -> DecoderTrace:
        if scene not in self._cache:
            _, x, target = self.scenes[scene]
            self._cache[scene] = decoder_trace(self.model, x, target)
        return self._cache[scene]

    def query_options(self, scene: int) -> list[tuple[str, int]]:
        """Dropdown entries: matched queries (with their digit) first, then the others by score."""
        trace, target = self.trace(scene), self.scenes[scene][2]
        names = self.class_names or [str(k) for k in range(trace.logits.shape[-1])]
        matched = dict(zip(trace.matched_queries.tolist(), trace.matched_targets.tolist(), strict=True))
        return [
            (
                f"query {q} -> digit {names[int(target['labels'][matched[q]])]}"
                if q in matched
                else f"query {q} (unmatched)",
                q,
            )
            for q in query_order(trace)
        ]

    def _set_queries(self) -> None:
        options = self.query_options(self.scene.value)
        self.query.options = options
        self.query.value = options[0][1]

    def _on_scene(self, _change) -> None:
        self._set_queries()  # sets query.value, whose observer redraws; redraw anyway if it did not change
        self.redraw()

    def redraw(self) -> None:
        from detr_edu.viz.canvas import render_figure

        if self.query.value is None:
            return
        image, _, target = self.scenes[self.scene.value]
        trace = self.trace(self.scene.value)
        head = None if self.head.value < 0 else self.head.value
        fig = plot_decoder_query(
            image, trace, query=self.query.value, target=target, head=head, class_names=self.class_names
        )
        self.image.value, _ = render_figure(fig, dpi=self.dpi)
        plt.close(fig)
        self.numbers = describe_query(
            trace, query=self.query.value, target=target, class_names=self.class_names
        )
        self.text.clear_output(wait=True)
        with self.text:
            print(self.numbers)
