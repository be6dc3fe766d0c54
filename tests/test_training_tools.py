"""Chapter 08's tools: log reading, curves, weight export, the CLI's ablation switches
(``--model-set``, ``--no-aux-loss``) and the criterion's ``aux_loss`` flag.

References: hand-written log files; the float32 model the export came from; the criterion with
aux losses on (whose last-layer terms must be unchanged when they are switched off).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from detr_edu import train  # noqa: E402
from detr_edu.build import build_model  # noqa: E402
from detr_edu.checkpoint import save_checkpoint  # noqa: E402
from detr_edu.config import get_preset  # noqa: E402
from detr_edu.criterion import SetCriterion  # noqa: E402
from detr_edu.engine import WarmupStepSchedule  # noqa: E402
from detr_edu.export import FORMAT, export_weights, load_weights  # noqa: E402
from detr_edu.logs import compare_seeds, final_metrics, read_log, series  # noqa: E402
from detr_edu.matcher import HungarianMatcher  # noqa: E402
from detr_edu.postprocess import postprocess  # noqa: E402
from detr_edu.viz.training import (  # noqa: E402
    plot_lr_schedule,
    plot_predictions,
    plot_runs,
    plot_seeded_runs,
    plot_training,
)

RECORDS = [
    {"type": "config", "model": {}, "train": {}},
    {"type": "train", "step": 10, "elapsed_s": 5.0, "loss": 10.0, "loss_class": 1.0},
    {"type": "train", "step": 20, "elapsed_s": 10.0, "loss": 8.0, "loss_class": 0.8},
    {"type": "eval", "step": 20, "elapsed_s": 10.0, "AP": 5.0, "AP50": 9.0, "AP75": 4.0, "AR100": 12.0},
    {"type": "train", "step": 30, "elapsed_s": 15.0, "loss": 6.0, "loss_class": 0.6},
    {"type": "eval", "step": 40, "elapsed_s": 20.0, "AP": 7.5, "AP50": 12.0, "AP75": 6.0, "AR100": 15.0},
    {"type": "end", "reason": "budget", "step": 40, "elapsed_s": 20.0},
]


def _write_log(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_read_log_series_and_final_metrics(tmp_path: Path) -> None:
    records = read_log(_write_log(tmp_path / "log.jsonl", RECORDS))
    assert records == RECORDS
    assert series(records, "loss") == ([5.0, 10.0, 15.0], [10.0, 8.0, 6.0])
    assert series(records, "loss", x="step") == ([10, 20, 30], [10.0, 8.0, 6.0])
    assert series(records, "AP", kind="eval") == ([10.0, 20.0], [5.0, 7.5])
    final = final_metrics(records)
    assert final == {
        "AP": 7.5,
        "AP50": 12.0,
        "AP75": 6.0,
        "AR100": 15.0,
        "steps": 40,
        "elapsed_s": 20.0,
        "s_per_step": 0.5,
    }
    # a run that never evaluated: NaN metrics, length from its last record
    unevaluated = final_metrics(RECORDS[:3])
    assert math.isnan(unevaluated["AP"]) and unevaluated["steps"] == 20


def test_read_log_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[1]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        read_log(bad)
    bad.write_text(json.dumps({"type": "nonsense"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object"):
        read_log(bad)
    with pytest.raises(FileNotFoundError):
        read_log(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no record with a step"):
        final_metrics(RECORDS[:1])


def test_plots_return_figures_with_the_logged_data() -> None:
    fig = plot_training(RECORDS, title="run")
    ax_loss, ax_ap = fig.axes
    assert list(ax_loss.lines[1].get_ydata()) == [10.0, 8.0, 6.0]  # the raw (faint) total loss
    assert list(ax_ap.lines[0].get_ydata()) == [5.0, 7.5]
    assert list(ax_ap.lines[0].get_xdata()) == pytest.approx([10 / 60, 20 / 60])
    fig = plot_runs({"a": RECORDS, "b": RECORDS[:4]})
    assert [line.get_label() for line in fig.axes[0].lines] == ["a", "b"]
    fig = plot_runs({"a": RECORDS}, x="step")
    assert list(fig.axes[0].lines[0].get_xdata()) == [20, 40]
    with pytest.raises(ValueError, match="minutes"):
        plot_runs({"a": RECORDS}, x="epoch")
    fig = plot_seeded_runs({"a": [RECORDS, RECORDS[:4]], "b": [RECORDS]})
    ax_curve, ax_final = fig.axes
    assert [list(line.get_ydata()) for line in ax_curve.lines] == [[5.0, 7.5], [5.0], [5.0, 7.5]]
    assert [list(line.get_xdata()) for line in ax_curve.lines][0] == [20, 40]  # against steps
    dots = [list(line.get_ydata()) for line in ax_final.lines if line.get_marker() == "o"]
    assert dots == [[7.5, 5.0], [7.5]]  # each seed's final AP
    assert len(ax_final.containers) == 1  # mean ± std only where there are two seeds or more
    images = [torch.rand(3, 32, 32), torch.rand(3, 32, 32)]
    dets = [
        {
            "scores": torch.tensor([0.9, 0.2]),
            "labels": torch.tensor([3, 1]),
            "boxes_xyxy_px": torch.tensor([[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 5.0, 5.0]]),
        },
        {
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.long),
            "boxes_xyxy_px": torch.zeros(0, 4),
        },
    ]
    targets = [
        {"boxes_xyxy_px": torch.tensor([[1.0, 2.0, 11.0, 12.0]])},
        {"boxes_xyxy_px": torch.zeros(0, 4)},
    ]
    fig = plot_predictions(images, dets, targets=targets, score_threshold=0.5)
    assert len(fig.axes[0].patches) == 2  # one ground truth + one detection above the threshold
    assert fig.axes[0].texts[0].get_text() == "3 0.90"
    with pytest.raises(ValueError, match="targets"):
        plot_predictions(images, dets, targets=targets[:1])
    # a figure title sits clear of every panel title (it used to be drawn over them)
    long = "decoder layer 2: red = predictions above 0.5, dashed green = ground truth"
    fig = plot_predictions(images * 4, dets * 4, targets=targets * 4, title=long)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top = fig._suptitle.get_window_extent(renderer)
    assert all(not top.overlaps(ax.title.get_window_extent(renderer)) for ax in fig.axes if ax.get_title())
    fig = plot_lr_schedule(
        WarmupStepSchedule(base_lrs=[1e-3, 2e-4], warmup_iters=20, drop=0.8), total_steps=100
    )
    lr = list(fig.axes[0].lines[0].get_ydata())
    assert lr[0] == pytest.approx(1e-6) and lr[20] == pytest.approx(1e-3) and lr[80] == pytest.approx(1e-4)
    assert list(fig.axes[0].lines[1].get_ydata())[50] == pytest.approx(2e-4)


def _training_checkpoint(path: Path, preset: str = "detr_cpu") -> tuple[torch.nn.Module, Path]:
    """A training checkpoint of a random model (DETR: no top-k selection, so that an untrained
    model's near-tied proposal scores cannot reorder the queries between float32 and float16)."""
    torch.manual_seed(0)
    cfg = get_preset(preset, num_classes=10)
    model = build_model(cfg).eval()
    import dataclasses

    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "optimizer": {},
            "scheduler": None,
            "scaler": None,
            "epoch": 0,
            "step": 7,
            "rng": {},
            "config": {
                "model": {"model": type(cfg).__name__, **dataclasses.asdict(cfg)},
                "train": {"lr": 1e-3},
            },
            "category_ids": list(range(1, 11)),
        },
    )
    return model, path


def test_export_is_half_the_size_and_predicts_the_same_boxes(tmp_path: Path) -> None:
    model, ckpt = _training_checkpoint(tmp_path / "checkpoint.pth")
    log = _write_log(tmp_path / "log.jsonl", RECORDS)
    out = export_weights(ckpt, tmp_path / "w.pth", log_path=log)
    params = sum(p.numel() for p in model.parameters())
    assert out.stat().st_size < 2.2 * params + 1_000_000  # two bytes per parameter, plus buffers
    loaded, info = load_weights(out)
    assert type(loaded) is type(model)
    assert info["category_ids"] == list(range(1, 11)) and info["step"] == 7 and info["metrics"]["AP"] == 7.5
    assert all(p.dtype == torch.float32 for p in loaded.parameters()) and not loaded.training
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    # float16 weights: boxes move by well under a pixel of a 96-px image
    assert (expected["pred_boxes"] - got["pred_boxes"]).abs().max() < 3e-3
    sizes = torch.tensor([[96, 96], [96, 96]])
    top = postprocess(expected, sizes, num_top=5)[0]["labels"]
    assert torch.equal(top, postprocess(got, sizes, num_top=5)[0]["labels"])


def test_export_errors(tmp_path: Path) -> None:
    _, ckpt = _training_checkpoint(tmp_path / "checkpoint.pth", "dino_cpu")
    loaded, _ = load_weights(export_weights(ckpt, tmp_path / "dino.pth", dtype=torch.bfloat16))
    assert loaded.denoiser is not None  # DINO comes back with its denoising generator
    with pytest.raises(ValueError, match="dtype"):
        export_weights(ckpt, tmp_path / "w.pth", dtype=torch.int8)
    with pytest.raises(ValueError, match=FORMAT):
        load_weights(ckpt)  # a training checkpoint is not an exported file
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "nothing.pth")
    from detr_edu.export import main as export_main

    with pytest.raises(SystemExit) as exit_info:  # the CLI: a one-line message and status 2, no traceback
        export_main(["--checkpoint", str(tmp_path / "nothing.pth"), "--out", str(tmp_path / "o.pth")])
    assert exit_info.value.code == 2


def test_model_set_overrides_and_errors() -> None:
    cfg = get_preset("dino_cpu", num_classes=10)
    new = train.apply_overrides(
        cfg, ["num_points=16", "backbone.levels=[2]", "weights_from=content", "dn_number=0"]
    )
    assert (new.num_points, new.backbone.levels, new.weights_from, new.dn_number) == (16, (2,), "content", 0)
    assert (cfg.num_points, cfg.backbone.levels, cfg.weights_from) == (4, (2, 3, 4), "query")  # untouched
    for items, message in (
        (["nope=1"], "no field 'nope'"),
        (["backbone.nope=1"], "no field 'nope'"),
        (["num_points"], "KEY=VALUE"),
        (["decoder.x=1"], "only fields"),
        (["num_points=abc"], "expected int"),
        (["num_points=true"], "expected int"),
        (["look_forward_twice=1"], "expected bool"),
    ):
        with pytest.raises(ValueError, match=message):
            train.apply_overrides(cfg, items)
    args = train.parse_args(
        ["--preset", "dino_cpu", "--output-dir", "x", "--no-aux-loss", "--model-set", "dn_number=5"]
    )
    tcfg = train.training_config(args)
    assert tcfg.aux_loss is False and train.model_config(args, tcfg, 10).dn_number == 5
    assert train.build_criterion(train.model_config(args, tcfg, 10), tcfg).aux_loss is False


def test_aux_loss_off_keeps_only_the_last_layer_terms() -> None:
    torch.manual_seed(0)

    def layer(B=2, Nq=5, K=3):
        return {"pred_logits": torch.randn(B, Nq, K), "pred_boxes": torch.rand(B, Nq, 4) * 0.5 + 0.25}

    outputs = {**layer(), "aux_outputs": [layer(), layer()], "enc_outputs": layer()}
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    kwargs = {
        "num_classes": 3,
        "matcher": HungarianMatcher(),
        "weight_dict": {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    }
    with_aux = SetCriterion(**kwargs)(outputs, targets)
    without = SetCriterion(**kwargs, aux_loss=False)(outputs, targets)
    assert set(with_aux) - set(without) == {
        f"loss_{t}_{i}" for t in ("class", "bbox", "giou") for i in (0, 1)
    }
    for key, value in without.items():
        torch.testing.assert_close(value, with_aux[key])


def test_dn_padding_flag_reaches_the_criterion_and_old_checkpoints_still_resume() -> None:
    """``--no-dn-padding-in-loss`` (Q5) sets the criterion's flag; a checkpoint written before the
    field existed counts as the official default (True), so it resumes without it and refuses it."""
    from detr_edu.train_options import check_resume_matches

    base = ["--preset", "dino_cpu", "--output-dir", "x"]
    on = train.training_config(train.parse_args(base))
    off_args = train.parse_args([*base, "--no-dn-padding-in-loss"])
    off = train.training_config(off_args)
    assert on.dn_padding_in_loss is True and off.dn_padding_in_loss is False
    assert train.build_criterion(train.model_config(off_args, off, 10), off).dn_padding_in_loss is False
    assert train.build_criterion(train.model_config(off_args, on, 10), on).dn_padding_in_loss is True
    args = train.parse_args(base)
    saved_train = dataclasses.asdict(on)
    del saved_train["dn_padding_in_loss"]  # as written by the course before the option
    mcfg = train.model_config(args, on, 10)
    checkpoint = {
        "config": {
            "args": {"preset": "dino_cpu"},
            "model": {"model": type(mcfg).__name__, **dataclasses.asdict(mcfg)},
            "train": saved_train,
        }
    }
    check_resume_matches(args, on, checkpoint, "ckpt.pth", num_classes=10)  # no error
    with pytest.raises(ValueError, match="dn_padding_in_loss true vs false"):
        check_resume_matches(off_args, off, checkpoint, "ckpt.pth", num_classes=10)


def test_compare_seeds_is_welch_mean_std_and_standard_error() -> None:
    import numpy as np

    a, b = [80.8, 78.1, 83.0], [70.0, 75.5, 71.2, 73.3]
    c = compare_seeds(a, b)
    assert c.mean == pytest.approx(np.mean(a)) and c.std == pytest.approx(np.std(a, ddof=1))
    assert c.baseline_std == pytest.approx(np.std(b, ddof=1))
    assert c.difference == pytest.approx(np.mean(a) - np.mean(b))
    se = math.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 4)
    assert c.standard_error == pytest.approx(se)
    with pytest.raises(ValueError, match="at least two seeds"):
        compare_seeds([1.0], b)
