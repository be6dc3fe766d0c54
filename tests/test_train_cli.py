"""The training command: two iterations on an exported folder, exact resume, --eval, errors.

References: the uninterrupted run's own loss sequence (resume), the checkpoint bytes before a
failing run (non-finite loss), weights-only loading of what the CLI wrote.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_edu import train
from detr_edu.checkpoint import load_checkpoint
from detr_edu.coco_export import export_digit_scenes

# Small and fast: the course's DETR at 64 px, 2 images per step.
FAST = ["--image-size", "64", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_digit_scenes(tmp_path_factory.mktemp("digits"), num_train=4, num_val=2, seed=5)


def _log(out: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [rec for rec in lines if rec["type"] == kind]


@pytest.mark.slow
def test_cli_two_iterations_dino(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "detr_edu.train",
        "--preset",
        "dino_cpu",
        "--coco-path",
        str(digits),
        "--output-dir",
        str(out),
        "--max-iters",
        "2",
        *FAST,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = _log(out, "train")
    assert [s["step"] for s in steps] == [1, 2]
    assert {"loss", "loss_class", "loss_bbox_enc", "loss_giou_0", "lr", "grad_norm"} <= set(steps[0])
    evals = _log(out, "eval")
    assert len(evals) == 1 and 0.0 <= evals[0]["AP"] <= 100.0
    assert _log(out, "end")[0]["reason"] == "max_iters"
    ckpt = load_checkpoint(out / "checkpoint.pth")  # weights_only=True
    assert ckpt["step"] == 2 and ckpt["category_ids"] == list(range(1, 11))
    assert ckpt["config"]["model"]["model"] == "DINOConfig"


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(digits: Path, tmp_path: Path) -> None:
    common = ["--preset", "detr_cpu", "--coco-path", str(digits), "--epochs", "2", "--no-final-eval", *FAST]
    assert train.main([*common, "--output-dir", str(tmp_path / "whole")]) == 0
    # interrupted in the middle of the first epoch, then resumed twice
    part = str(tmp_path / "part")
    assert train.main([*common, "--output-dir", part, "--max-iters", "1"]) == 0
    assert train.main([*common, "--output-dir", part, "--max-iters", "3", "--resume", "auto"]) == 0
    assert train.main([*common, "--output-dir", part, "--resume", "auto"]) == 0
    whole = _log(tmp_path / "whole", "train")
    parts = _log(Path(part), "train")
    assert [s["step"] for s in parts] == [s["step"] for s in whole] == [1, 2, 3, 4]
    for a, b in zip(whole, parts, strict=True):
        for key in ("loss", "loss_class", "loss_bbox", "loss_giou", "lr", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    w = load_checkpoint(tmp_path / "whole" / "checkpoint.pth")["model"]
    p = load_checkpoint(Path(part) / "checkpoint.pth")["model"]
    torch.testing.assert_close(p, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_eval_checkpoint_and_non_finite_stop(digits: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    common = ["--preset", "detr_cpu", "--coco-path", str(digits), "--output-dir", str(out), *FAST]
    assert train.main([*common, "--max-iters", "1", "--no-final-eval"]) == 0
    capsys.readouterr()
    assert train.main([*common, "--eval", "--resume", str(out / "checkpoint.pth")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"AP", "AP50", "AR100"} <= set(printed)

    # a criterion whose box loss turns NaN: the run stops naming the term; the checkpoint survives
    before = (out / "checkpoint.pth").read_bytes()
    real = train.build_criterion

    def poisoned(mcfg, tcfg):
        criterion = real(mcfg, tcfg)
        forward = criterion.forward

        def nan_bbox(outputs, targets):
            losses = forward(outputs, targets)
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
            return losses

        criterion.forward = nan_bbox
        return criterion

    monkeypatch.setattr(train, "build_criterion", poisoned)
    assert train.main([*common, "--resume", "auto", "--max-iters", "3"]) == 1
    assert (
        "non-finite loss at step 1" in capsys.readouterr().err
        and "loss_bbox" in _log(out, "error")[0]["message"]
    )
    assert (out / "checkpoint.pth").read_bytes() == before


def test_cli_errors(digits: Path, tmp_path: Path) -> None:
    common = ["--preset", "detr_cpu", "--output-dir", str(tmp_path / "r"), *FAST]
    with pytest.raises(ValueError, match="needs CUDA"):
        train.main([*common, "--coco-path", str(digits), "--amp", "fp16", "--device", "cpu"])
    with pytest.raises(ValueError, match="give --coco-path"):
        train.main(common)
    with pytest.raises(ValueError, match="--eval needs a checkpoint"):
        train.main([*common, "--coco-path", str(digits), "--eval"])
