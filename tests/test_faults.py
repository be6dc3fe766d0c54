"""Faults an instructor meets with the training CLI: work is never lost, resume is honest, and every
file problem is one line naming the file and the cause (exit status 2), never a traceback.

One test per case of the reliability review (numbered as there). References: real files (truncated,
empty, random bytes, 16-bit PNG, a crafted pickle), a real full device (``/dev/full``) where the
machine has one, the checkpoint's bytes before and after, and the CLI's exit status and stderr.
Case 6 (DINO's exact resume) is ``tests/test_resume.py``.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_edu import export, train
from detr_edu.build import build_model
from detr_edu.checkpoint import CheckpointError, atomic_save, load_checkpoint
from detr_edu.coco_export import export_digit_scenes
from detr_edu.config import BackboneConfig, DINOConfig
from detr_edu.criterion import SetCriterion
from detr_edu.data import CocoDetection, CocoFormatError, coco_paths
from detr_edu.logs import final_metrics, read_log
from detr_edu.matcher import HungarianMatcher

FAST = ["--image-size", "64", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    """A fresh digit-scene COCO folder per test (tests damage it)."""
    return export_digit_scenes(tmp_path / "digits", num_train=4, num_val=2, seed=5)


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``train.cli`` in-process; return (exit status, stderr)."""
    capsys.readouterr()
    rc = train.cli(list(args))
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err and "weights_only" not in err and "weights_only=False" not in err
    return lines[0]


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in read_log(out / "log.jsonl") if r["type"] == kind]


def _empty_val(root: Path) -> None:
    ann = coco_paths(root, "val")[1]
    data = json.loads(ann.read_text())
    data["images"], data["annotations"] = [], []
    ann.write_text(json.dumps(data))


def _train(digits: Path, out: Path, *extra: str, preset: str = "detr_cpu") -> list[str]:
    return ["--preset", preset, "--coco-path", str(digits), "--output-dir", str(out), *FAST, *extra]


# ---------------------------------------------------------------- work is never lost


def test_01_empty_validation_set_is_refused_at_start_up(digits: Path, tmp_path: Path, capsys) -> None:
    _empty_val(digits)
    out = tmp_path / "run"
    rc, err = _cli(capsys, *_train(digits, out, "--max-iters", "3"))
    line = _one_line(err)
    assert rc == 2 and "instances_val2017.json has no images" in line and "--no-final-eval" in line
    assert not (out / "checkpoint.pth").exists()
    # without an evaluation the same run trains, and its checkpoint is written
    assert train.cli(_train(digits, out, "--max-iters", "3", "--no-final-eval")) == 0
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 3


def test_01_the_checkpoint_is_written_before_the_final_evaluation(
    digits: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(train, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train.main(_train(digits, out, "--max-iters", "3"))
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 3  # steps 1-3 are kept


def test_02_export_refuses_to_overwrite_its_input_or_a_training_checkpoint(
    digits: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert train.cli(_train(digits, out, "--max-iters", "1", "--no-final-eval")) == 0
    ckpt = out / "checkpoint.pth"
    before = ckpt.read_bytes()
    for target in (ckpt, Path(os.path.relpath(ckpt))):  # the same file under another spelling too
        with pytest.raises(SystemExit) as exit_info:
            export.main(["--checkpoint", str(ckpt), "--out", str(target)])
        assert exit_info.value.code == 2
        assert "refusing to overwrite the checkpoint being exported" in _one_line(capsys.readouterr().err)
    other = tmp_path / "other.pth"
    other.write_bytes(before)  # another run's training checkpoint
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(ckpt), "--out", str(other)])
    assert "refusing to overwrite a training checkpoint" in _one_line(capsys.readouterr().err)
    assert ckpt.read_bytes() == before and other.read_bytes() == before
    assert export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "w.pth")]) == 0


def test_03_a_truncated_image_stops_the_run_before_the_first_step(
    digits: Path, tmp_path: Path, capsys
) -> None:
    image = sorted((digits / "train2017").glob("*.png"))[2]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    rc, err = _cli(capsys, *_train(digits, out, "--max-iters", "3"))
    line = _one_line(err)
    assert rc == 2 and str(image) in line and "cannot decode" in line
    assert not (out / "log.jsonl").exists() or not _records(out, "train")


# ---------------------------------------------------------------- resume is honest


def test_04_resume_with_another_preset_is_refused_naming_both(digits: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train.cli(_train(digits, out, "--max-iters", "1", "--no-final-eval")) == 0
    before = (out / "checkpoint.pth").read_bytes()
    for other in ("dino_cpu", "detr_r50_coco"):
        rc, err = _cli(capsys, *_train(digits, out, "--resume", "auto", preset=other))
        line = _one_line(err)
        assert rc == 2 and "--preset detr_cpu run (DETRConfig)" in line and f"--preset {other}" in line
    rc, err = _cli(capsys, *_train(digits, out, "--resume", "auto", "--num-queries", "12"))
    assert rc == 2 and "num_queries 30 vs 12" in _one_line(err)
    rc, err = _cli(capsys, *_train(digits, out, "--resume", "auto", "--image-size", "96"))
    assert rc == 2 and "eval_size 64 vs 96" in _one_line(err)
    assert (out / "checkpoint.pth").read_bytes() == before


def test_05_a_learning_rate_given_on_resume_is_applied_and_logged(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train.cli(_train(digits, out, "--max-iters", "2", "--no-final-eval")) == 0
    assert (
        train.cli(
            _train(digits, out, "--max-iters", "4", "--no-final-eval", "--resume", "auto", "--lr", "1e-6")
        )
        == 0
    )
    (resume,) = _records(out, "resume")
    assert resume["step"] == 2 and resume["lr_override"]["to"][0] == 1e-6
    after = [r for r in _records(out, "train") if r["step"] > 2]
    assert [r["step"] for r in after] == [3, 4] and all(r["lr"] <= 1e-6 for r in after)
    assert load_checkpoint(out / "checkpoint.pth")["scheduler"]["base_lrs"][0] == 1e-6


# ---------------------------------------------------------------- errors that are one line


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "code"])
def test_07_unreadable_checkpoints_are_one_line_everywhere(
    damage: str, digits: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert train.cli(_train(digits, out, "--max-iters", "1", "--no-final-eval")) == 0
    ckpt = out / "checkpoint.pth"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 3])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "random":
        ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    else:  # a pickle that would run code, saved as a torch file

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))

        torch.save({"model": Evil()}, ckpt)
    expected = {
        "truncated": "truncated or not a torch file",
        "empty": "is empty (0 bytes)",
        "random": "truncated or not a torch file",
        "code": "refused: the checkpoint holds objects other than tensors",
    }[damage]
    for args in (["--resume", str(ckpt)], ["--eval", "--resume", str(ckpt)]):
        rc, err = _cli(capsys, *_train(digits, out, *args))
        line = _one_line(err)
        assert rc == 2 and str(ckpt) in line and expected in line, line
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "w.pth")])
    line = _one_line(capsys.readouterr().err)
    assert exit_info.value.code == 2 and str(ckpt) in line and expected in line


def test_07_the_command_line_itself_prints_one_line(digits: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint.pth"
    ckpt.write_bytes(b"not a checkpoint")
    cmd = [
        sys.executable,
        "-m",
        "detr_edu.train",
        *_train(digits, tmp_path / "r", "--eval", "--resume", str(ckpt)),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert _one_line(result.stderr).startswith(f"detr_edu.train: error: {ckpt}: not a readable checkpoint")


def _full_disk_save(tmp_path: Path, monkeypatch, real_device: bool) -> Path:
    path = tmp_path / "checkpoint.pth"
    atomic_save({"step": 1}, path)
    if real_device:  # the kernel's own ENOSPC: every write to /dev/full fails with it
        os.symlink("/dev/full", path.with_name(path.name + ".tmp"))
    else:

        def no_space(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", no_space)
    return path


@pytest.mark.parametrize("real_device", [True, False])
def test_08_a_full_disk_is_reported_as_such_and_leaves_nothing_behind(
    real_device: bool, tmp_path: Path, monkeypatch
) -> None:
    if real_device and not Path("/dev/full").exists():
        pytest.skip("this machine has no /dev/full")
    path = _full_disk_save(tmp_path, monkeypatch, real_device)
    with pytest.raises(CheckpointError, match="no space left on the device") as info:
        atomic_save({"model": torch.zeros(1 << 20)}, path)
    assert str(path) in str(info.value) and "enforce fail" not in str(info.value)
    assert (
        not path.with_name(path.name + ".tmp").exists()
        and not path.with_name(path.name + ".tmp").is_symlink()
    )
    assert torch.load(path, weights_only=True) == {"step": 1}  # the previous file is intact


def test_09_the_log_of_a_stopped_run_reads_and_exports(digits: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    assert train.cli(_train(digits, out, "--max-iters", "1", "--no-final-eval")) == 0
    real = train.build_criterion

    def poisoned(mcfg, tcfg):
        criterion = real(mcfg, tcfg)
        forward = criterion.forward
        criterion.forward = lambda o, t: {**forward(o, t), "loss_bbox": torch.tensor(float("nan"))}
        return criterion

    monkeypatch.setattr(train, "build_criterion", poisoned)
    assert train.cli(_train(digits, out, "--resume", "auto", "--max-iters", "3")) == 1
    (error,) = _records(out, "error")
    assert error["step"] == 1 and "loss_bbox" in error["message"]
    assert final_metrics(read_log(out / "log.jsonl"))["steps"] == 1
    assert (
        export.main(
            [
                "--checkpoint",
                str(out / "checkpoint.pth"),
                "--log",
                str(out / "log.jsonl"),
                "--out",
                str(tmp_path / "w.pth"),
            ]
        )
        == 0
    )


def test_10_eval_on_an_empty_validation_set_names_the_file(digits: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train.cli(_train(digits, out, "--max-iters", "1", "--no-final-eval")) == 0
    _empty_val(digits)
    rc, err = _cli(capsys, *_train(digits, out, "--eval", "--resume", "auto"))
    assert rc == 2 and "instances_val2017.json has no images" in _one_line(err)


def test_11_a_label_outside_the_classes_is_a_clear_error_in_dino() -> None:
    torch.manual_seed(0)
    cfg = DINOConfig(
        num_classes=4,
        embed_dim=32,
        num_heads=4,
        num_encoder_layers=1,
        num_decoder_layers=2,
        feedforward_dim=64,
        num_queries=8,
        dn_number=4,
        backbone=BackboneConfig(depth=10, levels=(2, 3, 4), num_extra_levels=1, num_groups=8),
    )
    model = build_model(cfg).train()
    targets = [{"labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must lie in \[0, 4\).*got ids \[7\]"):
        model(torch.zeros(1, 3, 64, 64), targets=targets)


# ---------------------------------------------------------------- silent wrong data


def _one_image_dataset(tmp_path: Path, pixels: np.ndarray, mode: str | None = None) -> CocoDetection:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(pixels, mode=mode).save(
        folder / "a.tif" if pixels.dtype == np.float32 else folder / "a.png"
    )
    name = "a.tif" if pixels.dtype == np.float32 else "a.png"
    h, w = pixels.shape[:2]
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": name, "width": w, "height": h}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}],
                "categories": [{"id": 1, "name": "x"}],
            }
        )
    )
    return CocoDetection(image_dir=folder, annotation_file=ann)


def test_12_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    grey = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257  # 0 .. 65535
    ds = _one_image_dataset(tmp_path, grey)
    with Image.open(tmp_path / "images" / "a.png") as pil:
        assert pil.mode == "I;16"
    image = ds.load_image(0)  # (3, 16, 16)
    expected = torch.from_numpy(grey.astype(np.float32) / 65535.0)
    torch.testing.assert_close(image, expected.expand(3, -1, -1))
    assert 0.45 < float(image.mean()) < 0.55  # not the all-white of PIL's convert("RGB")
    ds.verify_images()


def test_12_floating_point_images_are_refused(tmp_path: Path) -> None:
    ds = _one_image_dataset(tmp_path, np.random.default_rng(0).random((16, 16), dtype=np.float32), mode="F")
    with pytest.raises(
        CocoFormatError, match=r"a\.tif: image id 1: pixel format \(PIL mode\) F is not supported"
    ):
        ds.verify_images()


def test_13_boxes_outside_the_unit_square_are_refused_by_matcher_and_criterion() -> None:
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[1.7, 0.5, 5.0, 0.2]])}]
    outputs = {"pred_logits": torch.zeros(1, 5, 3), "pred_boxes": torch.full((1, 5, 4), 0.5)}
    message = r"targets\[0\]\['boxes'\] must be cxcywh normalised to \[0, 1\].*\[0.2, 5\]"
    with pytest.raises(ValueError, match=message):
        HungarianMatcher()(outputs, targets)
    criterion = SetCriterion(
        num_classes=3,
        matcher=HungarianMatcher(),
        weight_dict={"loss_class": 1, "loss_bbox": 5, "loss_giou": 2},
    )
    with pytest.raises(ValueError, match=message):
        criterion(outputs, targets)


@pytest.mark.parametrize("file_name", ["../outside.png", "ABSOLUTE"])
def test_14_file_names_stay_inside_the_image_folder(file_name: str, tmp_path: Path, capsys) -> None:
    root = export_digit_scenes(tmp_path / "digits", num_train=4, num_val=2, seed=5)
    outside = tmp_path / "digits" / "outside.png"
    first = sorted((root / "train2017").glob("*.png"))[0]
    outside.write_bytes(first.read_bytes())
    name = str(outside) if file_name == "ABSOLUTE" else file_name
    ann = coco_paths(root, "train")[1]
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = name
    ann.write_text(json.dumps(data))
    rc, err = _cli(capsys, *_train(root, tmp_path / "run", "--max-iters", "1", "--no-final-eval"))
    line = _one_line(err)
    assert rc == 2 and f"file_name {name!r}, which points outside the image folder" in line
    args = _train(root, tmp_path / "run", "--max-iters", "1", "--no-final-eval", "--allow-outside-image-dir")
    assert train.cli(args) == 0
