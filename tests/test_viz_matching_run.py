"""Chapter 05's matching over training (detr_edu.viz.matching_run): the shipped recording, the
matchings recomputed from it (against the matcher called scene by scene), and the flip count
(against a hand count on a tiny history)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from detr_edu.matcher import HungarianMatcher
from detr_edu.viz.matching_run import (
    MATCHING_RUN,
    RUN_NAMES,
    count_flips,
    load_matching_run,
    match_over_training,
    matching_timeline,
    plot_matching_over_training,
    scene_targets,
)


@pytest.fixture(scope="module")
def record():
    return load_matching_run()


def test_the_recording_is_light_and_complete(record):
    assert MATCHING_RUN.stat().st_size < 1_000_000
    assert tuple(record.runs) == RUN_NAMES
    assert record.scene_split == "val"
    steps = record.runs["DINO"].steps
    for run in record.runs.values():
        torch.testing.assert_close(run.steps, steps)
        S, N, Nq, K = run.pred_logits.shape
        assert (S, N) == (len(steps), len(record.scene_indices)) and K == 10
        assert run.pred_boxes.shape == (S, N, Nq, 4) and 0 <= float(run.pred_boxes.min())
        assert run.loss[-20:].mean() < run.loss[:20].mean()  # the runs trained
    assert record.runs["DINO without denoising"].model_set == {"dn_number": 0}


def test_match_over_training_equals_the_matcher_per_scene(record):
    scenes = scene_targets(record)
    targets = [t for _, t in scenes]
    matcher = HungarianMatcher()
    run = record.runs["Deformable DETR"]
    matched = match_over_training(run, targets, matcher)
    for s in (0, len(run.steps) - 1):
        for n in (0, 5):
            out = {"pred_logits": run.pred_logits[s, n][None], "pred_boxes": run.pred_boxes[s, n][None]}
            ((q, t),) = matcher(out, [targets[n]])
            G = len(targets[n]["labels"])
            assert matched[s, n, t].tolist() == q.tolist()
            assert (matched[s, n, G:] == -1).all()


def test_count_flips_by_hand():
    history = torch.tensor(
        [
            [[3, 7, -1], [1, -1, -1]],
            [[3, 8, -1], [2, -1, -1]],  # two flips
            [[3, 8, -1], [2, -1, -1]],  # none
            [[8, 3, -1], [2, -1, -1]],  # two (a swap)
        ]
    )  # (S=4, N=2, Gmax=3)
    assert count_flips(history).tolist() == [2, 0, 2]
    with pytest.raises(ValueError, match="S >= 2"):
        count_flips(history[:1])


def test_timeline_and_view(record):
    scenes = scene_targets(record)
    matcher = HungarianMatcher()
    timeline = matching_timeline(record, [t for _, t in scenes], matcher)
    assert timeline.num_targets == sum(len(t["labels"]) for _, t in scenes)
    for name in RUN_NAMES:
        flips = timeline.flips[name]
        assert flips.shape == (len(record.runs[name].steps) - 1,)
        assert 0 <= int(flips.min()) and int(flips.max()) <= timeline.num_targets
    fig = plot_matching_over_training(record, timeline, scenes, matcher, checkpoint=2, scene=1)
    assert len([ax for ax in fig.axes if ax.get_title().startswith("cost matrix")]) == 3
    plt.close(fig)
    with pytest.raises(ValueError, match="checkpoint must be"):
        plot_matching_over_training(record, timeline, scenes, matcher, checkpoint=99)


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="matching_checkpoints.py"):
        load_matching_run(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"format": 2}, bad)
    with pytest.raises(ValueError, match="not a matching-checkpoints recording"):
        load_matching_run(bad)
