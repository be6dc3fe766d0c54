"""Checkers for chapter 01 (attention): masked weights, parameter counts, mask shapes, memory."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from detr_edu.attention import SelfAttention, attention_matrix_bytes, scaled_dot_product_attention
from detr_edu.exercises.checking import Exercise, checker

__all__ = ["check_1", "check_2", "check_3", "check_4"]
CHAPTER = 1


@checker
def check_1(answer_1: Callable[[Tensor], Tensor]) -> None:
    """Query 0's output when keys 2-4 are blocked and keys 0 and 1 score equally, as a function of v."""
    ex = Exercise(CHAPTER, 1)
    gen = torch.Generator().manual_seed(1)
    q = torch.zeros(1, 4)  # (Nq, d): every score is 0 ...
    k = torch.randn(5, 4, generator=gen)  # (Nk, d)
    k[1] = k[0]  # ... and keys 0 and 1 would score equally anyway
    v = torch.randn(5, 3, generator=gen)  # (Nk, dv)
    mask = torch.tensor([[False, False, True, True, True]])  # (Nq, Nk) True = blocked
    expected = scaled_dot_product_attention(q, k, v, attn_mask=mask)[0][0]  # (dv,)
    got = ex.call(answer_1, v.clone())
    ex.tensor_close(
        got,
        expected,
        hint="blocked keys get weight exactly 0, and the remaining weights still sum to 1",
    )
    ex.correct()


@checker
def check_2(answer_2: int) -> None:
    """Parameters of SelfAttention(dim=256, num_heads=8)."""
    ex = Exercise(CHAPTER, 2)
    expected = sum(p.numel() for p in SelfAttention(dim=256, num_heads=8).parameters())
    ex.integer(
        answer_2,
        expected,
        hint="count both linears, the fused qkv (256 -> 3 x 256) and the output projection, "
        "each with its weight matrix and its bias vector",
    )
    ex.correct()


@checker
def check_3(answer_3: tuple[int, ...]) -> None:
    """Shape of key_padding_mask for cross-attention: B = 2, 100 queries, a 25 x 38 memory."""
    ex = Exercise(CHAPTER, 3)
    memory = torch.zeros(2, 25 * 38, 8)  # (B, Nk, C): the flattened feature map the queries attend to
    expected = tuple(memory.shape[:2])  # one flag per key: (B, Nk)
    got = ex.given(answer_3)
    if not isinstance(got, tuple | list | torch.Size) or not all(isinstance(n, int) for n in got):
        ex.fail(f"{ex.name} should be a shape, a tuple of ints such as (2, 3), got {got!r}")
    if tuple(got) != expected:
        ex.fail(
            f"{ex.name} = {tuple(got)} is not right: the mask flags keys, not queries, "
            "and the keys are the feature map's pixels flattened into one axis (B, number of keys)"
        )
    ex.correct()


@checker
def check_4(answer_4: float) -> None:
    """Factor by which the attention matrix grows when the image side doubles (same stride)."""
    ex = Exercise(CHAPTER, 4)
    tokens = 25 * 38  # any map: doubling the side gives 4x the tokens
    expected = attention_matrix_bytes(1, 8, 4 * tokens, 4 * tokens) / attention_matrix_bytes(
        1, 8, tokens, tokens
    )
    ex.number_close(
        answer_4,
        expected,
        hint="doubling the side multiplies the number of tokens by the area factor, "
        "and the matrix has one entry per (query, key) pair",
    )
    ex.correct()
