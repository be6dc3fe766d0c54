"""Checkers for chapter 02 (multi-scale deformable attention): coordinates, offsets, parameters,
the initial ring and a padding mask."""

from __future__ import annotations

import torch
from torch import Tensor

from detr_edu.deformable import (
    MultiScaleDeformableAttention,
    deformable_sampling,
    level_start_index_from_shapes,
    offsets_to_locations,
)
from detr_edu.exercises.checking import Exercise, checker

__all__ = ["check_1", "check_2", "check_3", "check_4", "check_5"]
CHAPTER = 2


@checker
def check_1(answer_1: tuple[float, float]) -> None:
    """The normalised (x, y) at which sampling a 6 x 9 level reads pixel (row 4, column 2) exactly."""
    ex = Exercise(CHAPTER, 1)
    x, y = (ex.as_number(a) for a in ex.sequence(answer_1, 2, form="(x, y)"))
    gen = torch.Generator().manual_seed(2)
    value = torch.randn(1, 54, 1, 1, generator=gen, dtype=torch.float64)  # (B, Nv, nh, hd): one 6x9 level
    loc = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)  # (B, Nq, nh, L, P, 2)
    weight = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)  # (B, Nq, nh, L, P)
    read = deformable_sampling(value, torch.tensor([[6, 9]]), loc, weight).view(())  # the sample
    if not torch.isclose(read, value[0, 4 * 9 + 2, 0, 0], rtol=0.0, atol=1e-9):
        ex.fail(
            f"{ex.name} = {answer_1!r} does not read that pixel alone: x runs along the 9 columns and y "
            "along the 6 rows, and a pixel's centre, not its corner, is where bilinear sampling "
            "reads it exactly"
        )
    ex.correct()


@checker
def check_2(answer_2: tuple[float, float]) -> None:
    """The x-offset that moves a sample from x = 0.5 to x = 0.75: 2-d reference (width 18), 4-d box
    reference (w = 0.2, P = 4)."""
    ex = Exercise(CHAPTER, 2)
    off2, off4 = (ex.as_number(a) for a in ex.sequence(answer_2, 2, form="(2-d offset, 4-d offset)"))
    shapes = torch.tensor([[12, 18]])  # one level, H x W = 12 x 18
    offset = torch.tensor([off2, 0.0]).view(1, 1, 1, 1, 1, 2)  # (B, Nq, nh, L, P, 2)
    ref2 = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)  # (B, Nq, L, 2)
    x2 = offsets_to_locations(ref2, offset, shapes)[..., 0].flatten()  # (1,)
    offsets4 = torch.zeros(1, 1, 1, 1, 4, 2)  # (B, Nq, nh, L, P=4, 2)
    offsets4[..., 0] = off4
    ref4 = torch.tensor([0.5, 0.5, 0.2, 0.2]).view(1, 1, 1, 4)  # (B, Nq, L, 4)
    x4 = offsets_to_locations(ref4, offsets4, shapes)[..., 0].flatten()  # (P,)
    if not torch.allclose(x2, torch.tensor([0.75]), atol=1e-5):
        ex.fail(
            f"the 2-d offset {off2!r} moves the sample to x = {x2.item():.4f}: "
            "with a point reference, offsets count pixels of the level"
        )
    if not torch.allclose(x4, torch.full((4,), 0.75), atol=1e-5):
        ex.fail(
            f"the 4-d offset {off4!r} moves the sample to x = {x4[0].item():.4f}: with a box reference, "
            "the offset is scaled by the box size, by 0.5 and divided by the number of points P"
        )
    ex.correct()


@checker
def check_3(answer_3: int) -> None:
    """Parameters of the offset and attention-weight linears of the COCO configuration."""
    ex = Exercise(CHAPTER, 3)
    coco = MultiScaleDeformableAttention(embed_dim=256, num_heads=8, num_levels=4, num_points=4)
    expected = sum(p.numel() for m in (coco.sampling_offsets, coco.attention_weights) for p in m.parameters())
    ex.integer(
        answer_3,
        expected,
        hint="both linears read C = 256 features; the offsets have nh x L x P x 2 outputs, "
        "the weights nh x L x P; do not forget the biases",
    )
    projections = 2 * sum(p.numel() for p in coco.value_proj.parameters())
    ex.correct(f"{expected:,} parameters vs {projections:,} in the value and output projections")


@checker
def check_4(answer_4: tuple[float, float]) -> None:
    """Initial offset (pixels) of point k = 3 (1-based) of head 1 of 8."""
    ex = Exercise(CHAPTER, 4)
    x, y = (ex.as_number(a) for a in ex.sequence(answer_4, 2, form="(x, y) in pixels"))
    layer = MultiScaleDeformableAttention(embed_dim=32, num_heads=8, num_levels=4, num_points=4)
    ring = layer.sampling_offsets.bias.detach().view(8, 4, 4, 2)  # (nh, L, P, 2): the initial offsets
    expected = ring[1, 0, 2]  # head 1, level 0, point 3 (index 2)
    if not torch.allclose(torch.tensor([x, y]), expected, atol=1e-4):
        ex.fail(
            f"{ex.name} = {answer_4!r} is not right: the direction is pushed onto the square "
            "max(|x|, |y|) = 1 (not the unit circle), and point k (1-based) sits k times as far"
        )
    ex.correct()


@checker
def check_5(answer_5: Tensor) -> None:
    """A key_padding_mask for a 1-level 4 x 6 map, image 1's last two columns padding."""
    ex = Exercise(CHAPTER, 5)
    B, H, W = 2, 4, 6
    columns = torch.arange(W)  # (W,)
    expected = (torch.arange(B)[:, None, None] == 1) & (columns[None, None, :] >= W - 2)  # (B, 1, W)
    expected = expected.expand(B, H, W).flatten(1)  # (B, Nv) row-major tokens
    mask = ex.tensor(answer_5, (B, H * W), dtype=torch.bool)
    layer = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=1, num_points=4).eval()
    gen = torch.Generator().manual_seed(5)
    shapes = torch.tensor([[H, W]])
    value = torch.randn(B, H * W, 16, generator=gen)  # (B, Nv, C)
    query = torch.randn(B, 5, 16, generator=gen)  # (B, Nq, C)
    ref = torch.rand(B, 5, 1, 2, generator=gen)  # (B, Nq, L, 2)
    with torch.no_grad():
        outs = [
            layer(
                query,
                value=v,
                reference_points=ref,
                spatial_shapes=shapes,
                level_start_index=level_start_index_from_shapes(shapes),
                key_padding_mask=mask,
            )
            for v in (value, value.masked_fill(expected[..., None], 1e3))  # garbage in the padding
        ]
    if not torch.equal(mask, expected):
        hint = (
            "tokens are the map's pixels in row-major order (token = row x 6 + column); "
            "mark image 1's padded columns on every row, and nothing of image 0"
        )
        if not torch.allclose(outs[0], outs[1]):
            hint = "garbage in the padding still changes the output: " + hint
        ex.fail(f"{ex.name} does not mark exactly the padding: {hint}")
    ex.correct("garbage in the padding does not change the output")
