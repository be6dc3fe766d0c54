"""Checkers for chapter 03 (assembling the transformer): valid ratios, flattening, sine embeddings,
reference points."""

from __future__ import annotations

from collections.abc import Callable

import torch

from detr_edu.exercises.checking import Exercise, checker
from detr_edu.levels import encoder_reference_points, flatten_levels, valid_ratios_from_mask
from detr_edu.position import resize_mask, sine_position_embedding

__all__ = ["check_1", "check_2", "check_3", "check_4", "check_5"]
CHAPTER = 3


@checker
def check_1(answer_1: float) -> None:
    """Valid ratio (x) on the stride-16 level of an image 70 px wide padded to 128."""
    ex = Exercise(CHAPTER, 1)
    mask = torch.ones(1, 128, 128, dtype=torch.bool)  # (B, H, W) True = padding
    mask[0, :, :70] = False
    expected = valid_ratios_from_mask(resize_mask(mask, (128 // 16, 128 // 16)))[0, 0].item()  # x ratio
    ex.number_close(
        answer_1,
        expected,
        hint="the ratio is counted in whole pixels of the level: how many of its 8 columns hold "
        "some of the image (a partly covered column counts as valid)?",
    )
    ex.correct()


@checker
def check_2(answer_2: int) -> None:
    """Token index of pixel (row 2, column 3) of level 1 for shapes [[16, 16], [8, 8], [4, 4]]."""
    ex = Exercise(CHAPTER, 2)
    shapes = [(16, 16), (8, 8), (4, 4)]
    probe = [torch.zeros(1, 1, h, w) for h, w in shapes]  # L x (B, C=1, H_l, W_l)
    probe[1][0, 0, 2, 3] = 1.0  # mark the pixel
    flat = flatten_levels(probe, [torch.zeros(1, h, w, dtype=torch.bool) for h, w in shapes], probe)
    expected = int(flat.src[0, :, 0].argmax())  # (Nv,) -> where the mark landed
    ex.integer(
        answer_2,
        expected,
        hint="level 1 starts after all of level 0's tokens, and inside a level tokens are row-major "
        "(index = row x width + column)",
    )
    ex.correct()


@checker
def check_3(answer_3: Callable[[int], float]) -> None:
    """The y-part of the sine embedding dotted with itself, as a function of F."""
    ex = Exercise(CHAPTER, 3)
    for F in (8, 16, 64):
        e = sine_position_embedding(torch.zeros(1, 5, 5, dtype=torch.bool), num_pos_feats=F)  # (B, 2F, H, W)
        y_part = e[0, :F, 2, 2]  # (F,) the first F channels encode y
        expected = float(y_part @ y_part)
        got = ex.call(answer_3, F)
        ex.number_close(
            got,
            expected,
            rel_tol=1e-4,
            hint=f"for F = {F} your function gives {got!r}; the F channels come in (sin, cos) pairs "
            "of the same frequency, and sin^2 + cos^2 = 1",
        )
    ex.correct()


@checker
def check_4(answer_4: float) -> None:
    """x (in level-2 pixels) of the encoder reference point of level 0's column 12 (valid widths 13, 4)."""
    ex = Exercise(CHAPTER, 4)
    shapes = torch.tensor([[16, 16], [8, 8], [4, 4]])
    ratios = torch.tensor([[[13 / 16, 1.0], [7 / 8, 1.0], [4 / 4, 1.0]]])  # (B, L, 2) valid (x, y) ratios
    points = encoder_reference_points(shapes, ratios)  # (B, Nv, L, 2)
    expected = points[0, 12, 2, 0].item() * 4  # level 0, row 0, column 12 -> level 2, in pixels
    ex.number_close(
        answer_4,
        expected,
        hint="take the pixel centre (j + 0.5) as a fraction of level 0's *valid* width, then scale it "
        "by level 2's valid width",
    )
    ex.correct()


@checker
def check_5(answer_5: int) -> None:
    """Numbers returned by encoder_reference_points for B = 2 and levels 16x16, 8x8, 4x4, 2x2."""
    ex = Exercise(CHAPTER, 5)
    shapes = torch.tensor([[16, 16], [8, 8], [4, 4], [2, 2]])
    ratios = torch.ones(2, 4, 2)  # (B, L, 2)
    expected = encoder_reference_points(shapes, ratios).numel()  # (B, Nv, L, 2)
    ex.integer(
        answer_5,
        expected,
        hint="every token of every image gets one (x, y) point on *every* level: (B, Nv, L, 2)",
    )
    ex.correct()
