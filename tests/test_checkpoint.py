"""Checkpoints: atomic writes, weights-only loading, exact RNG round trip, the lr schedule's state.

References: the bytes of the previous checkpoint (atomicity), ``torch.load``'s own refusal of
arbitrary objects (safety), fresh random draws after restoring (RNG), a closed-form schedule.
"""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from detr_edu import checkpoint as ckpt
from detr_edu.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from detr_edu.engine import WarmupStepSchedule


def _checkpoint(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": WarmupStepSchedule(base_lrs=[1e-3], warmup_iters=5).state_dict(),
        "scaler": None,
        "epoch": 3,
        "step": 17,
        "rng": rng_state(),
        "config": {"model": {"model": "DINOConfig", "levels": (2, 3, 4)}, "train": {"lr": 1e-4}},
        "category_ids": [1, 2, 3],
    }


def test_round_trip_weights_only(tmp_path: Path) -> None:
    data = _checkpoint(0.5)
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pth", data)
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["model"], data["model"])
    assert loaded["optimizer"]["state"][0]["step"] == data["optimizer"]["state"][0]["step"]
    assert loaded["epoch"] == 3 and loaded["step"] == 17 and loaded["category_ids"] == [1, 2, 3]
    assert not (tmp_path / "run" / "checkpoint.pth.tmp").exists()


def test_interrupted_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "checkpoint.pth", _checkpoint(0.5))
    before = path.read_bytes()

    def crash(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of torch.save

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _checkpoint(0.9))
    assert path.read_bytes() == before
    torch.testing.assert_close(
        load_checkpoint(path)["model"]["weight"], torch.full((2, 3), 0.5), atol=2e-3, rtol=0
    )


class _Evil:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_weights_only_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    data = _checkpoint(0.1)
    data["extra"] = _Evil()
    torch.save(data, path)  # written without our checks, as a foreign file would be
    with pytest.raises(CheckpointError, match="refused: the checkpoint holds objects other than tensors"):
        load_checkpoint(path)


def test_missing_keys_and_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint lacks \['step', 'rng'\]"):
        save_checkpoint(
            tmp_path / "c.pth", {k: v for k, v in _checkpoint(0.1).items() if k not in ("rng", "step")}
        )
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a detr_edu training checkpoint"):
        load_checkpoint(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing.pth")


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in NumPy's state
    data = _checkpoint(0.1)
    data["rng"] = rng_state()
    expected = _draws()
    path = save_checkpoint(tmp_path / "c.pth", data)
    _draws()  # move every generator on
    set_rng_state(load_checkpoint(path)["rng"])
    assert _draws() == expected


def test_schedule_factor_and_state() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 1.0}])
    sched = WarmupStepSchedule(base_lrs=[1e-3, 1e-4], warmup_iters=10, drop=0.8, gamma=0.1)
    assert sched.factor(0, 0.0) == pytest.approx(0.001)
    assert sched.factor(5, 0.1) == pytest.approx(0.001 + 0.999 * 0.5)
    assert sched.factor(10, 0.5) == 1.0 and sched.factor(100, 0.8) == pytest.approx(0.1)
    sched.step(opt, 100, 0.9)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-5])
    other = WarmupStepSchedule(base_lrs=[0.0, 0.0])
    other.load_state_dict(sched.state_dict())
    assert other == sched
    with pytest.raises(ValueError, match="2 base lrs for 1 param groups"):
        sched.step(torch.optim.SGD(model.parameters(), lr=0.1), 0, 0.0)
