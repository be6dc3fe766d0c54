"""Checkers for chapter 04 (the forward pass): tokens and proposals, padded levels, look forward
twice, box-head parameters."""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn

from detr_edu.backbone import level_masks
from detr_edu.build import build_model
from detr_edu.config import get_preset
from detr_edu.exercises.checking import Exercise, checker
from detr_edu.masks import valid_sizes
from detr_edu.two_stage import encoder_proposals

__all__ = ["check_1", "check_2", "check_3", "check_4", "check_5"]
CHAPTER = 4


def _cpu_dino() -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # build_model draws from the global generator: leave it as it was
        torch.manual_seed(0)
        return build_model(get_preset("dino_cpu"), load_backbone_weights=False).eval()


def _level_shapes(model: nn.Module, size: int) -> torch.Tensor:
    """(L, 2) the (H_l, W_l) of every level the model's backbone makes of a size x size image."""
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, size, size)).features  # L x (1, C, H_l, W_l)
    return torch.tensor([tuple(f.shape[-2:]) for f in features])


@checker
def check_1(answer_1: int) -> None:
    """Encoder tokens (= proposals) of the CPU DINO on a 128 x 128 image."""
    ex = Exercise(CHAPTER, 1)
    expected = int(_level_shapes(_cpu_dino(), 128).prod(1).sum())  # sum of H_l * W_l
    ex.integer(
        answer_1,
        expected,
        hint="one token per pixel of *every* level the model reads, the extra stride-64 level of the "
        "neck included",
    )
    ex.correct()


@checker
def check_2(answer_2: float) -> None:
    """Width in pixels of a level-3 proposal on a 128-pixel-wide image."""
    ex = Exercise(CHAPTER, 2)
    shapes = _level_shapes(_cpu_dino(), 128)  # (L, 2)
    tokens = int(shapes.prod(1).sum())
    proposals = encoder_proposals(torch.zeros(1, tokens, dtype=torch.bool), shapes)
    expected = float(proposals.boxes_cxcywh[0, -1, 2]) * 128  # the last token is on level 3; w in px
    ex.number_close(
        answer_2,
        expected,
        rel_tol=1e-4,
        hint="proposals on level l have side 0.05 x 2^l (levels counted from 0) as a fraction of "
        "the image; the question asks for pixels",
    )
    ex.correct()


@checker
def check_3(answer_3: int) -> None:
    """Valid rows of the stride-32 level of an image 100 px high padded to 128."""
    ex = Exercise(CHAPTER, 3)
    mask = torch.ones(1, 128, 128, dtype=torch.bool)  # (B, H, W) True = padding
    mask[0, :100] = False
    level = level_masks(mask, [(128 // 32, 128 // 32)], [32])[0]  # (B, 4, 4)
    expected = int(valid_sizes(level)[0, 0])  # valid height
    ex.integer(
        answer_3,
        expected,
        hint="a row of the level is valid when its 32 pixels hold *some* of the image: round up, not down",
    )
    ex.correct()


@functools.cache  # deterministic, and a second or two on a CPU: computed once per session
def _gradient_groups(look_forward_twice: bool) -> tuple[tuple[str, bool], ...]:
    """Which box heads and decoder layers the last layer's box loss reaches (a box head per layer)."""
    model = _cpu_dino()
    model.look_forward_twice = look_forward_twice
    heads = model.heads.bbox_embed
    with torch.no_grad():  # the zero-initialised last linear would hide every gradient behind it
        heads[0].layers[-1].weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(4))
    model.heads.bbox_embed = nn.ModuleList(copy.deepcopy(h) for h in heads)  # one head per layer
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))  # (B, 3, H, W)
    model(image)["pred_boxes"].sum().backward()  # the last layer's box loss only
    groups: dict[str, bool] = {}
    for name, p in model.named_parameters():
        if name.startswith(("heads.bbox_embed", "decoder.layers")):
            key = ".".join(name.split(".")[:3])
            groups[key] = groups.get(key, False) or (p.grad is not None and bool(p.grad.abs().max() > 0))
    return tuple(groups.items())


@checker
def check_4(answer_4: str) -> None:
    """The parameter group that gets gradient from the last layer's box loss only with look forward twice."""
    ex = Exercise(CHAPTER, 4)
    name = ex.given(answer_4)
    if not isinstance(name, str):
        ex.fail(f"{ex.name} should be a group name, a string such as 'decoder.layers.0'")
    refine, lft = dict(_gradient_groups(False)), dict(_gradient_groups(True))
    if name not in refine:
        ex.fail(
            f"{name!r} is not a group of the table: names look like 'heads.bbox_embed.0' or "
            "'decoder.layers.0'"
        )
    if refine[name]:
        ex.fail(
            f"{name!r} receives that gradient with plain refinement too; look for the group that only "
            "the undetached box of look forward twice reaches (a box head, counted from 0)"
        )
    if not lft[name]:
        ex.fail(f"{name!r} receives no gradient from the last layer's box loss, with or without the flag")
    ex.correct()


@checker
def check_5(answer_5: tuple[int, int]) -> None:
    """(CPU DINO's shared box head, three per-layer box heads) in parameters."""
    ex = Exercise(CHAPTER, 5)
    shared, per_layer = (ex.as_number(a) for a in ex.sequence(answer_5, 2, form="(shared, per layer)"))
    heads = _cpu_dino().heads.bbox_embed
    one = sum(p.numel() for p in heads[0].parameters())
    expected_shared = sum(p.numel() for p in heads.parameters())  # a module listed 3 times counts once
    expected_per_layer = len(heads) * one
    if not math.isclose(shared, expected_shared):
        ex.fail(
            f"the shared head: {shared:g} is not right; count the MLP's linears (weights and biases) "
            "once, however many layers use it"
        )
    if not math.isclose(per_layer, expected_per_layer):
        ex.fail(f"the per-layer heads: {per_layer:g} is not right; one copy of the MLP per decoder layer")
    ex.correct()
