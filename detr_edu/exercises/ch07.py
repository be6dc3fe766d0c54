"""Checkers for chapter 07 (contrastive denoising): group arithmetic, the mask as one broadcast
expression, positives vs negatives, padding."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from detr_edu import box_ops
from detr_edu.denoising import denoising_attn_mask, denoising_groups, make_noised_targets
from detr_edu.exercises.checking import Exercise, checker
from detr_edu.scenes import DigitScenes

__all__ = ["check_1", "check_2", "check_3", "check_4", "group_of_slots"]
CHAPTER = 7


@checker
def check_1(answer_1: tuple[int, int, int]) -> None:
    """(groups, denoising queries, allowed mask entries): dn_number 100, 12 objects, 900 queries."""
    ex = Exercise(CHAPTER, 1)
    groups, queries, allowed = (
        ex.as_number(a) for a in ex.sequence(answer_1, 3, form="(groups, denoising queries, allowed entries)")
    )
    expected_groups = denoising_groups(100, 12)
    mask = denoising_attn_mask(groups=expected_groups, single_pad=12, num_queries=900)  # (Nd + Nq, Nd + Nq)
    expected = (expected_groups, mask.shape[0] - 900, int((~mask).sum()))  # True = blocked
    if groups != expected[0]:
        ex.fail(
            f"{groups:g} groups is not right: from dn_number = 50 on, the groups are dn_number // single_pad"
        )
    if queries != expected[1]:
        ex.fail(
            f"{queries:g} denoising queries is not right: each group holds a positive *and* a "
            "negative copy of every slot"
        )
    if allowed != expected[2]:
        ex.fail(
            f"{allowed:g} allowed entries is not right: count matching -> matching, each group -> its own "
            "group, and denoising -> matching (the mask's True entries are the blocked ones)"
        )
    ex.correct()


def group_of_slots(groups: int, single_pad: int, num_queries: int) -> Tensor:
    """(Nd + Nq,) the group of every query slot, -1 for the matching queries (exercise 2's input)."""
    denoising = torch.arange(2 * groups * single_pad) // (2 * single_pad)  # (Nd,)
    return torch.cat([denoising, torch.full((num_queries,), -1)])  # (Nd + Nq,)


@checker
def check_2(answer_2: Callable[[Tensor], Tensor]) -> None:
    """``answer_2(group_of)``: the whole attention mask (True = blocked) from the slots' groups."""
    ex = Exercise(CHAPTER, 2)
    for groups, single_pad, num_queries in ((4, 2, 5), (3, 1, 4), (2, 3, 7)):
        expected = denoising_attn_mask(groups=groups, single_pad=single_pad, num_queries=num_queries)
        got = ex.call(answer_2, group_of_slots(groups, single_pad, num_queries))
        ex.tensor_close(
            got,
            expected,
            hint=f"for groups = {groups}, single_pad = {single_pad}, Nq = {num_queries}: rows are the "
            "queries that attend, columns the keys; a pair is blocked (True) only when the key is a "
            "denoising slot of another group; denoising queries may see the matching ones",
        )
    ex.correct()


def positive_beats_negative(num_targets: int = 5000, *, seed: int = 3) -> tuple[float, float, float]:
    """(fraction of pairs where the positive has the higher IoU, mean IoU of positives, of negatives):
    each target's positive and negative copy in the same group, box_noise_scale 1, 2 groups."""
    gen = torch.Generator().manual_seed(seed)
    per_image = 100  # many targets per image: fast, and the pairs do not depend on the batching
    targets = [
        {
            "labels": torch.zeros(per_image, dtype=torch.int64),
            "boxes": torch.cat(
                [
                    torch.rand(per_image, 2, generator=gen) * 0.6 + 0.2,
                    torch.rand(per_image, 2, generator=gen) * 0.3 + 0.05,
                ],
                -1,
            ),  # (G, 4) cxcywh
        }
        for _ in range(num_targets // per_image)
    ]
    noised = make_noised_targets(
        targets, dn_number=1, num_classes=10, label_noise_ratio=0.5, box_noise_scale=1.0, generator=gen
    )
    B, groups = len(targets), noised.groups
    boxes = noised.boxes_cxcywh.view(B, groups, 2, per_image, 4)  # (B, groups, pos/neg, G, 4)
    truth = box_ops.box_cxcywh_to_xyxy(torch.stack([t["boxes"] for t in targets]))  # (B, G, 4)
    iou = torch.stack(
        [
            torch.stack(
                [
                    box_ops.box_iou(box_ops.box_cxcywh_to_xyxy(boxes[b, k, s]), truth[b]).diagonal()
                    for s in (0, 1)
                ]
            )
            for b in range(B)
            for k in range(groups)
        ]
    )  # (B * groups, 2, G)
    positive, negative = iou[:, 0], iou[:, 1]
    return (
        (positive > negative).float().mean().item(),
        positive.mean().item(),
        negative.mean().item(),
    )


@checker
def check_3(answer_3: float) -> None:
    """Fraction (2 decimals) of (positive, negative) pairs in which the positive has the higher IoU."""
    ex = Exercise(CHAPTER, 3)
    measured, iou_pos, iou_neg = positive_beats_negative()
    ex.number_close(
        answer_3,
        measured,
        rel_tol=0.0,
        abs_tol=0.007,  # two decimals (0.005) and the sampling noise of 10,000 pairs
        hint="measure it: for every target and group compare the IoU of the positive copy with the "
        "truth to that of its negative partner, and give the fraction of pairs the positive wins "
        "(a fraction between 0 and 1, two decimals)",
    )
    ex.correct(f"mean IoU of the positives {iou_pos:.3f}, of the negatives {iou_neg:.3f}")


@checker
def check_4(answer_4: float) -> None:
    """Fraction (3 decimals) of padded denoising queries for DigitScenes(8, seed=0), dn_number 100."""
    ex = Exercise(CHAPTER, 4)
    targets = [DigitScenes(8, seed=0)[i][1] for i in range(8)]
    noised = make_noised_targets(
        targets,
        dn_number=100,
        num_classes=10,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    expected = (~noised.valid).float().mean().item()  # (B, Nd) -> the padded share
    ex.number_close(
        answer_4,
        expected,
        rel_tol=0.0,
        abs_tol=1.5e-3,
        hint="every image gets 2 x groups x single_pad slots and fills 2 x groups x G of them: give the "
        "*padded* share, over all images of the batch",
    )
    ex.correct(f"digit counts {[len(t['labels']) for t in targets]}")
