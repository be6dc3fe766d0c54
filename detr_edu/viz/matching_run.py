"""Chapter 05's "matching over training": how the Hungarian assignment settles, or flips, as real
detectors train.

The data are light checkpoints of three short runs written by ``benchmarks/matching_checkpoints.py``
(Deformable DETR, DINO, DINO without denoising; same seed, data and recipe): at a handful of steps,
the last decoder layer's class logits and boxes (float16) on a few fixed held-out digit scenes. The
scenes' targets are rebuilt with :func:`detr_edu.scenes.make_scene`; cost matrices and matchings are
computed here, live, with the package's :class:`~detr_edu.matcher.HungarianMatcher`.

A *flip* is a ground-truth digit whose matched query (its slot index, 0..Nq-1) differs between two
consecutive checkpoints -- DN-DETR's measure of matching instability (Li et al. 2022, Sec. 3.2),
taken between checkpoints instead of epochs. In DINO the slots are the encoder's top-K proposals in
rank order, each with its own learned content embedding, so a flip there means the digit is now
served by another rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from detr_edu.matcher import HungarianMatcher
from detr_edu.scenes import make_scene

__all__ = [
    "MATCHING_RUN",
    "RUN_NAMES",
    "RunCheckpoints",
    "MatchingRecord",
    "load_matching_run",
    "scene_targets",
    "match_over_training",
    "count_flips",
    "MatchingTimeline",
    "matching_timeline",
    "plot_matching_over_training",
]

MATCHING_RUN = Path(__file__).resolve().parents[1] / "recordings" / "matching_checkpoints.pt"
RUN_NAMES = ("Deformable DETR", "DINO", "DINO without denoising")
RUN_COLOURS = {"Deformable DETR": "tab:blue", "DINO": "tab:red", "DINO without denoising": "tab:orange"}


@dataclass
class RunCheckpoints:
    """One run's light checkpoints.

    Attributes:
        name: e.g. "DINO".
        preset: the model preset it trained (``model_set``: the config fields changed).
        steps: (S,) the training step of each checkpoint.
        pred_logits: (S, N, Nq, K) float32 (stored as float16) on the N held-out scenes.
        pred_boxes: (S, N, Nq, 4) normalised cxcywh.
        loss: (steps,) the weighted training loss of every step.
        seconds: the run's wall-clock time.
    """

    name: str
    preset: str
    model_set: dict
    steps: Tensor
    pred_logits: Tensor
    pred_boxes: Tensor
    loss: Tensor
    seconds: float


@dataclass
class MatchingRecord:
    """The recording: the runs, and which held-out scenes their predictions are on."""

    runs: dict[str, RunCheckpoints]
    scene_seed: int
    scene_split: str
    scene_indices: list[int]
    image_size: int
    machine: str


def load_matching_run(path: str | Path = MATCHING_RUN) -> MatchingRecord:
    """Read a recording written by ``benchmarks/matching_checkpoints.py``.

    Raises:
        FileNotFoundError: no file at ``path`` (it is shipped with the package; re-make it with the script).
        ValueError: the file is not such a recording.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no recording; make one with benchmarks/matching_checkpoints.py")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != 1 or "runs" not in data:
        raise ValueError(f"{path}: not a matching-checkpoints recording (format 1)")
    runs = {}
    for name, r in data["runs"].items():
        S = len(r["steps"])
        if r["pred_logits"].shape[0] != S or r["pred_boxes"].shape[:3] != r["pred_logits"].shape[:3]:
            raise ValueError(f"{path}: run {name!r} has inconsistent shapes")
        runs[name] = RunCheckpoints(
            name=name,
            preset=r["preset"],
            model_set=dict(r["model_set"]),
            steps=r["steps"].long(),
            pred_logits=r["pred_logits"].float(),
            pred_boxes=r["pred_boxes"].float(),
            loss=r["loss"].float(),
            seconds=float(r["seconds"]),
        )
    scenes = data["scenes"]
    return MatchingRecord(
        runs=runs,
        scene_seed=int(scenes["seed"]),
        scene_split=str(scenes["split"]),
        scene_indices=[int(i) for i in scenes["indices"]],
        image_size=int(scenes["size"]),
        machine=str(data.get("machine", "")),
    )


def scene_targets(record: MatchingRecord) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """The recording's held-out scenes, rebuilt: (image (3, 128, 128), target) per scene.

    Boxes are normalised, so they hold for the 96-px input the predictions were made on as well.
    """
    return [
        make_scene(seed=record.scene_seed, index=i, split=record.scene_split) for i in record.scene_indices
    ]


@torch.no_grad()
def match_over_training(
    run: RunCheckpoints, targets: list[dict[str, Tensor]], matcher: HungarianMatcher
) -> Tensor:
    """The matched query of every target at every checkpoint.

    Args:
        run: the checkpoints (N scenes).
        targets: N targets with ``labels`` (G_n,) and ``boxes`` (G_n, 4).
        matcher: the matcher (the training recipe's: costs 2, 5, 2).

    Returns:
        (S, N, Gmax) long: query index matched to target j of scene n at checkpoint s; -1 where scene
        n has fewer than Gmax targets.
    """
    S, N = run.pred_logits.shape[:2]
    if len(targets) != N:
        raise ValueError(f"{len(targets)} targets for {N} recorded scenes")
    g_max = max(len(t["labels"]) for t in targets)
    out = torch.full((S, N, g_max), -1, dtype=torch.long)  # (S, N, Gmax)
    for s in range(S):
        outputs = {"pred_logits": run.pred_logits[s], "pred_boxes": run.pred_boxes[s]}  # (N, Nq, K|4)
        for n, (q, t) in enumerate(matcher(outputs, targets)):
            out[s, n, t] = q
    return out


def count_flips(query_for_target: Tensor) -> Tensor:
    """(S - 1,) how many targets change their matched query between checkpoints s and s + 1.

    Args:
        query_for_target: (S, N, Gmax) from :func:`match_over_training` (-1 = no target there).
    """
    if query_for_target.dim() != 3 or query_for_target.shape[0] < 2:
        raise ValueError(f"need (S >= 2, N, Gmax), got {tuple(query_for_target.shape)}")
    valid = query_for_target[0] >= 0  # (N, Gmax)
    changed = query_for_target[1:] != query_for_target[:-1]  # (S - 1, N, Gmax)
    return (changed & valid).flatten(1).sum(1)  # (S - 1,)


@dataclass
class MatchingTimeline:
    """Everything the view draws for every run: matchings at every checkpoint and the flips.

    Attributes:
        steps: run name -> (S,) steps.
        matched: run name -> (S, N, Gmax) from :func:`match_over_training`.
        flips: run name -> (S - 1,) from :func:`count_flips`.
        num_targets: digits over all N scenes (the most flips an interval can have).
    """

    steps: dict[str, Tensor]
    matched: dict[str, Tensor]
    flips: dict[str, Tensor]
    num_targets: int


def matching_timeline(
    record: MatchingRecord, targets: list[dict[str, Tensor]], matcher: HungarianMatcher
) -> MatchingTimeline:
    """Match every run at every checkpoint, and count the flips between consecutive ones."""
    matched = {name: match_over_training(run, targets, matcher) for name, run in record.runs.items()}
    return MatchingTimeline(
        steps={name: run.steps for name, run in record.runs.items()},
        matched=matched,
        flips={name: count_flips(m) for name, m in matched.items()},
        num_targets=sum(len(t["labels"]) for t in targets),
    )


def _draw_scene(ax: plt.Axes, image: Tensor, target: dict, boxes: Tensor, query_idx: Tensor, changed: Tensor):
    """Scene, dashed green truth, each matched query's box (red where the match just flipped)."""
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, 1, 1, 0))
    for j, (cx, cy, w, h) in enumerate(target["boxes"].tolist()):
        ax.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, fill=False, ec="lime", ls="--", lw=1.2))
        q = int(query_idx[j])
        pcx, pcy, pw, ph = boxes[q].tolist()
        colour = "red" if bool(changed[j]) else "white"
        ax.add_patch(Rectangle((pcx - pw / 2, pcy - ph / 2), pw, ph, fill=False, ec=colour, lw=1.5))
        ax.plot([cx, pcx], [cy, pcy], color=colour, lw=0.8)
        ax.text(pcx - pw / 2, pcy - ph / 2, f"q{q}", color=colour, fontsize=7, va="bottom")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_matching_over_training(
    record: MatchingRecord,
    timeline: MatchingTimeline,
    scenes: list[tuple[Tensor, dict[str, Tensor]]],
    matcher: HungarianMatcher,
    *,
    checkpoint: int,
    scene: int = 0,
) -> Figure:
    """The view: for each run side by side, the scene with its matched pairs at ``checkpoint`` (a
    red box: the digit's match changed since the previous checkpoint), the cost matrix of that scene
    (the matched cells outlined), and below, the flips between consecutive checkpoints of every run
    over all recorded scenes, with the chosen checkpoint marked.

    Args:
        record, timeline: from :func:`load_matching_run` and :func:`matching_timeline`.
        scenes: the recorded scenes (:func:`scene_targets`).
        matcher: the matcher whose cost matrix is drawn (the one the timeline used).
        checkpoint: index into the runs' checkpoints (0..S-1).
        scene: index into the recorded scenes.
    """
    names = list(record.runs)
    S = len(next(iter(record.runs.values())).steps)
    if not 0 <= checkpoint < S:
        raise ValueError(f"checkpoint must be in [0, {S}), got {checkpoint}")
    if not 0 <= scene < len(scenes):
        raise ValueError(f"scene must be in [0, {len(scenes)}), got {scene}")
    image, target = scenes[scene]
    G = len(target["labels"])
    fig = plt.figure(figsize=(3.6 * len(names), 8.4))
    grid = fig.add_gridspec(3, len(names), height_ratios=[1.0, 1.0, 0.75])
    for c, name in enumerate(names):
        run = record.runs[name]
        step = int(run.steps[checkpoint])
        q_idx = timeline.matched[name][checkpoint, scene, :G]  # (G,)
        before = timeline.matched[name][max(checkpoint - 1, 0), scene, :G]  # (G,)
        changed = q_idx != before  # (G,)
        ax = fig.add_subplot(grid[0, c])
        _draw_scene(ax, image, target, run.pred_boxes[checkpoint, scene], q_idx, changed)
        ax.set_title(f"{name}\nstep {step}: {int(changed.sum())} of {G} matches changed", fontsize=9)
        outputs = {
            "pred_logits": run.pred_logits[checkpoint, scene][None],
            "pred_boxes": run.pred_boxes[checkpoint, scene][None],
        }
        cost = matcher.cost_matrix(outputs, [target])[0]  # (Nq, G)
        ax2 = fig.add_subplot(grid[1, c])
        im = ax2.imshow(cost.T.numpy(), aspect="auto", cmap="viridis_r")
        for j, q in enumerate(q_idx.tolist()):
            ax2.add_patch(Rectangle((q - 0.5, j - 0.5), 1, 1, fill=False, ec="red", lw=1.6))
        ax2.set_yticks(range(G), [f"digit {int(v)}" for v in target["labels"]], fontsize=7)
        ax2.set_xlabel("query", fontsize=8)
        ax2.tick_params(labelsize=7)
        ax2.set_title("cost matrix (red: matched)", fontsize=9)
        fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    ax3 = fig.add_subplot(grid[2, :])
    for name in names:
        steps = timeline.steps[name]
        flips = timeline.flips[name]
        ax3.plot(
            steps[1:].numpy(),
            flips.numpy(),
            "o-",
            color=RUN_COLOURS.get(name),
            label=f"{name}: {int(flips.sum())}",
        )
    ax3.axvline(int(record.runs[names[0]].steps[checkpoint]), color="grey", ls="--", lw=1)
    ax3.set_xlabel("training step (flips counted from the previous checkpoint)", fontsize=8)
    ax3.set_ylabel(f"flips (of {timeline.num_targets} digits)", fontsize=8)
    ax3.set_title(f"matches that changed between checkpoints, {len(scenes)} held-out scenes", fontsize=9)
    ax3.legend(fontsize=7, title="total flips", title_fontsize=7)
    ax3.tick_params(labelsize=7)
    ax3.grid(alpha=0.3)
    fig.tight_layout()
    return fig
