"""Checkers for chapter 08 (training): steps of a GPU schedule, reading the training logs, the size
of the shipped weights."""

from __future__ import annotations

import math

from torch.utils.data import DataLoader, DistributedSampler

from detr_edu.exercises.checking import Exercise, checker
from detr_edu.export import SHIPPED_WEIGHTS, load_shipped
from detr_edu.logs import series

__all__ = ["check_1", "check_2", "check_3", "first_minutes"]
CHAPTER = 8


@checker
def check_1(answer_1: tuple[int, int]) -> None:
    """(steps per epoch, steps in 12 epochs): COCO train2017, 8 GPUs x 2 images."""
    ex = Exercise(CHAPTER, 1)
    per_epoch, total = (ex.as_number(a) for a in ex.sequence(answer_1, 2, form="(per epoch, 12 epochs)"))
    images = range(118_287)  # the loader only needs the dataset's length
    sampler = DistributedSampler(images, num_replicas=8, rank=0, shuffle=False)  # pads to a multiple of 8
    expected = len(DataLoader(images, batch_size=2, sampler=sampler))  # keeps the last partial batch
    if per_epoch != expected:
        ex.fail(
            f"{per_epoch:g} steps per epoch is not right: each process sees its share of the images "
            "(the sampler pads the dataset to a multiple of the 8 processes) in batches of 2, and the "
            "last partial batch still makes a step: round up at both divisions"
        )
    if total != 12 * expected:
        ex.fail(f"{total:g} steps in 12 epochs is not right: the epochs all have the same number of steps")
    ex.correct()


def first_minutes(records: list[dict], key: str = "AP50", level: float = 20.0) -> float | None:
    """Training minutes at the first evaluation whose ``key`` reaches ``level``, or None."""
    for seconds, value in zip(*series(records, key, kind="eval"), strict=True):
        if value >= level:
            return seconds / 60
    return None


@checker
def check_2(answer_2: dict, runs: dict[str, list[dict]]) -> None:
    """{label: minutes at the first evaluation with AP50 >= 20, or None} for the chapter's ``runs``
    (label -> the records of its log.jsonl)."""
    ex = Exercise(CHAPTER, 2)
    answer = ex.given(answer_2)
    if not isinstance(answer, dict):
        ex.fail(f"{ex.name} should be a dict {{label: minutes or None}}, got {type(answer).__name__}")
    if set(answer) != set(runs):
        ex.fail(f"{ex.name} should have one entry per run, the keys {sorted(runs)}; got {sorted(answer)}")
    for label, records in runs.items():
        expected, got = first_minutes(records), answer[label]
        if expected is None:
            if got is not None:
                ex.fail(f"{label}: {got!r} is not right: does that run's AP50 ever reach 20?")
            continue
        if got is None or isinstance(got, bool) or not isinstance(got, int | float):
            ex.fail(f"{label}: {got!r} is not right: that run does reach AP50 >= 20 (give minutes, a number)")
        if not math.isclose(got, expected, abs_tol=0.051):  # one decimal is enough
            ex.fail(
                f"{label}: {got!r} is not right: take the *first* evaluation whose AP50 (not AP) reaches 20, "
                "and turn its elapsed_s (seconds of training) into minutes"
            )
    ex.correct()


@checker
def check_3(answer_3: tuple[float, float]) -> None:
    """(bytes of the shipped model's floating tensors in float32, their float16 share of the file)."""
    ex = Exercise(CHAPTER, 3)
    float32_bytes, fraction = (
        ex.as_number(a) for a in ex.sequence(answer_3, 2, form="(float32 bytes, fraction of the file)")
    )
    model, _ = load_shipped()
    elements = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    if not math.isclose(float32_bytes, 4 * elements, rel_tol=1e-9):
        ex.fail(
            f"{float32_bytes:g} bytes is not right: count the elements of every floating tensor of "
            "state_dict() (parameters and the BatchNorm buffers), 4 bytes each in float32"
        )
    expected = 2 * elements / SHIPPED_WEIGHTS.stat().st_size
    if not math.isclose(fraction, expected, abs_tol=5e-3):
        ex.fail(
            f"the fraction {fraction:g} is not right: the file holds the weights in float16 (2 bytes "
            "each); divide by the file's size in bytes"
        )
    ex.correct(f"float32 {float32_bytes / 2**20:.1f} MiB; the weights are {fraction:.1%} of the shipped file")
