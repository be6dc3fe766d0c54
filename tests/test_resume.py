"""Exact resume for every CPU preset: 6 steps straight equal 3 steps + 3 resumed, loss by loss.

Reference: the uninterrupted run itself. DINO's denoiser draws its noise from its own generator,
which the state dict does not hold; the checkpoint's RNG state does (``module_generators``), and
this test fails without it (the losses of steps 4-6 differ).
"""

import json
from pathlib import Path

import pytest
import torch

from detr_edu import train
from detr_edu.build import build_model
from detr_edu.checkpoint import load_checkpoint, module_generators, rng_state, set_rng_state
from detr_edu.coco_export import export_digit_scenes
from detr_edu.config import get_preset

FAST = ["--image-size", "64", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_digit_scenes(tmp_path_factory.mktemp("digits"), num_train=4, num_val=2, seed=5)


def _train_losses(out: Path) -> list[tuple[int, dict]]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [
        (r["step"], {k: v for k, v in r.items() if k.startswith("loss")})
        for r in records
        if r["type"] == "train"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["detr_cpu", "deformable_detr_cpu", "dino_cpu"])
def test_six_steps_straight_equal_three_plus_three(preset: str, digits: Path, tmp_path: Path) -> None:
    # 4 images, 2 per step: the interruption falls in the middle of the second epoch
    common = ["--preset", preset, "--coco-path", str(digits), "--no-final-eval", *FAST]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main([*common, "--output-dir", str(straight), "--max-iters", "6"]) == 0
    assert train.main([*common, "--output-dir", str(resumed), "--max-iters", "3"]) == 0
    assert train.main([*common, "--output-dir", str(resumed), "--max-iters", "6", "--resume", "auto"]) == 0
    a, b = _train_losses(straight), _train_losses(resumed)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    for (step, la), (_, lb) in zip(a, b, strict=True):
        assert la == lb, f"{preset} step {step}: {la} != {lb}"  # bit-exact, every term
    wa = load_checkpoint(straight / "checkpoint.pth")["model"]
    wb = load_checkpoint(resumed / "checkpoint.pth")["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_model_generators_are_saved_and_restored() -> None:
    model = build_model(get_preset("dino_cpu"))
    generators = module_generators(model)
    assert list(generators) == ["denoiser"]
    state = rng_state(generators)
    first = torch.rand(3, generator=generators["denoiser"])
    set_rng_state(state, generators)
    assert torch.equal(torch.rand(3, generator=generators["denoiser"]), first)
    assert module_generators(build_model(get_preset("deformable_detr_cpu"))) == {}


def test_a_checkpoint_without_the_model_generators_is_refused() -> None:
    model = build_model(get_preset("dino_cpu"))
    state = rng_state()  # saved without the denoiser's generator
    with pytest.raises(ValueError, match=r"no random state for the model's generators \['denoiser'\]"):
        set_rng_state(state, module_generators(model))
