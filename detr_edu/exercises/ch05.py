"""Checkers for chapter 05 (the Hungarian matcher): constants in the cost, DETR's exact class cost,
held-out digits, how much class weight changes a match."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from detr_edu.exercises.checking import Exercise, checker
from detr_edu.matcher import HungarianMatcher
from detr_edu.scenes import DigitScenes, digit_split

__all__ = ["check_1", "check_2", "check_3", "check_4", "CLASS_WEIGHTS"]
CHAPTER = 5
CLASS_WEIGHTS = [0.5 * i for i in range(21)]  # exercise 4's grid: 0, 0.5, ..., 10


def _pairs(cost: Tensor) -> set[tuple[int, int]]:
    rows, cols = linear_sum_assignment(cost.numpy())
    return set(zip(rows.tolist(), cols.tolist(), strict=True))


@checker
def check_1(answer_1: Callable[[Tensor, Tensor], bool]) -> None:
    """``answer_1(cost, add)``: does adding ``add`` change the optimal assignment of ``cost``?"""
    ex = Exercise(CHAPTER, 1)
    gen = torch.Generator().manual_seed(11)
    cases = []
    for _ in range(40):
        cost = torch.randn(6, 3, generator=gen)  # (Nq, G): more queries than targets
        cases.append((cost, torch.randn(1, 3, generator=gen)))  # a constant per target (column)
        cases.append((cost, torch.randn(6, 1, generator=gen)))  # a constant per query (row)
    for cost, add in cases:
        expected = _pairs(cost) != _pairs(cost + add)
        got = ex.call(answer_1, cost.clone(), add.clone())
        if not isinstance(got, bool | Tensor) or bool(got) != expected:
            kind = "a column (per-target)" if add.shape[0] == 1 else "a row (per-query)"
            ex.fail(
                f"with {kind} constant your function says {got!r}, but the assignment "
                f"{'does' if expected else 'does not'} change; compare the matched (query, target) pairs, "
                "not only the targets' order or the total cost"
            )
    ex.correct("a column constant never changes the assignment; a row constant can when Nq > G")


@checker
def check_2(answer_2: Callable[..., Tensor]) -> None:
    """``answer_2(logits, labels, eos_coef)``: the (Nq, G) change of DETR's weighted CE loss."""
    ex = Exercise(CHAPTER, 2)
    gen = torch.Generator().manual_seed(12)
    Nq, K = 5, 3
    logits = torch.randn(Nq, K + 1, generator=gen, dtype=torch.float64)  # (Nq, K + 1), last = no object
    labels = torch.tensor([2, 0, 2])  # (G,)
    for eos_coef in (0.1, 0.5):
        weight = torch.tensor([1.0] * K + [eos_coef], dtype=torch.float64)  # (K + 1,)

        def loss(assignment: dict[int, int], weight: Tensor = weight) -> Tensor:  # query -> target
            classes = torch.full((Nq,), K)  # (Nq,)
            for q, j in assignment.items():
                classes[q] = labels[j]
            return F.cross_entropy(logits, classes, weight=weight, reduction="sum")

        base = loss({})
        expected = torch.stack(
            [torch.stack([loss({q: j}) - base for j in range(len(labels))]) for q in range(Nq)]
        )  # (Nq, G)
        got = ex.call(answer_2, logits.clone(), labels.clone(), eos_coef)
        ex.tensor_close(
            got,
            expected,
            atol=1e-6,
            hint=f"with eos_coef = {eos_coef}: the change has two parts, the new positive's "
            '-log p(class) and the "no object" term that query no longer pays (weighted by eos_coef)',
        )
    ex.correct()


@functools.cache  # drawing 100 scenes takes a moment: once per session
def _validation_digits_used() -> frozenset[int]:
    scenes = DigitScenes(100, seed=0, split="val")
    return frozenset(i for k in range(len(scenes)) for i in scenes[k][1]["digit_ids"].tolist())


@checker
def check_3(answer_3: int) -> None:
    """Different digit images used by DigitScenes(100, seed=0, split="val")."""
    ex = Exercise(CHAPTER, 3)
    used = _validation_digits_used()
    if not used <= set(digit_split("val").tolist()):
        raise RuntimeError("the validation scenes use training digits: the package's split is broken")
    ex.integer(
        answer_3,
        len(used),
        hint="count each digit image once, however many scenes (or places in a scene) use it",
    )
    ex.correct("and they are all validation digits, none from training")


@checker
def check_4(answer_4: float | None, scene_logits: Tensor, scene_boxes: Tensor, target: dict) -> None:
    """Smallest class weight of CLASS_WEIGHTS whose matched queries differ from class weight 0's
    (box weights 5 and 2), or None; for the chapter's scene ``scene_logits`` (Nq, K), ``scene_boxes``
    (Nq, 4) and ``target``."""
    ex = Exercise(CHAPTER, 4)
    outputs = {"pred_logits": scene_logits[None], "pred_boxes": scene_boxes[None]}  # (1, Nq, ...)

    def matched(weight: float) -> list[int]:
        matcher = HungarianMatcher(cost_class=weight, cost_bbox=5.0, cost_giou=2.0)
        ((queries, _),) = matcher(outputs, [target])
        return sorted(queries.tolist())

    geometric = matched(0.0)
    expected = next((w for w in CLASS_WEIGHTS if matched(w) != geometric), None)
    if answer_4 is Ellipsis:
        ex.given(answer_4)
    if expected is None:
        if answer_4 is not None:
            ex.fail(f"{ex.name} = {answer_4!r}, but at that weight the matched queries do not change")
        ex.correct()
        return
    if answer_4 is None:
        ex.fail("None is not right: some class weight of the grid does change the matched queries")
    value = ex.as_number(answer_4)
    if value not in CLASS_WEIGHTS:
        ex.fail(f"{ex.name} = {answer_4!r} is not on the grid 0, 0.5, 1, ..., 10")
    if matched(value) == geometric:
        ex.fail(f"{ex.name} = {answer_4!r}: at that weight the matched queries are still the geometric ones")
    if value != expected:
        ex.fail(
            f"{ex.name} = {answer_4!r} changes the match, but a smaller weight of the grid already does: "
            "walk the grid upwards from 0 and stop at the first change"
        )
    ex.correct()
