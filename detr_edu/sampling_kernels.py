"""Fast kernels for the deformable sampling core (chapter 02, section 5): the same sum, computed three ways.

:func:`detr_edu.deformable.deformable_sampling` computes, for every (batch, query, head),

    out = sum over levels l, points p, bilinear corners c of  attn[l, p] * bilinear_c * value[row_c]

and picks one of the kernels here (or its own ``grid_sample`` form) to do it. All of them are exact:
they agree with the naive loop to float64 rounding and pass ``gradcheck`` (``tests/test_deformable.py``).

* **corners** (:func:`corner_rows_and_weights`): the four neighbouring pixels of every sample as rows
  of the value table ``value.reshape(B * Nv * nh, hd)`` -- the value is *not* copied or permuted: row
  ``(b * Nv + token) * nh + head`` already holds head ``head``'s channels of that token -- and their
  weights ``attn * bilinear * inside``. A corner outside its level gets weight 0 (zero padding) and a
  clamped row that exists, so every index is valid.
* **"gather"** (:func:`sampling_gather`): index the table with those rows and sum. Plain PyTorch; in
  eager mode it materialises every corner's channels (``B*Nq*nh*L*P*4 x hd``), so it is the
  memory-hungry form -- and the form ``torch.compile`` turns into one fused loop.
* **"bag"** (:func:`sampling_bag`): the same rows and weights through ``F.embedding_bag(mode="sum")``,
  a fused gather-multiply-add that never materialises the corners. Fastest in eager mode where the
  value map is much larger than the queries (a decoder on COCO-sized maps: 300 queries, 19,947 tokens).
* **"compiled"** (:func:`sampling_compiled`): :func:`sampling_gather` through ``torch.compile``
  (Inductor writes one C++ loop for the forward and one for the backward, no intermediate tensors);
  ``MultiScaleDeformableAttention`` with this kernel compiles its locations, softmax and sampling as
  one graph (``detr_edu.deformable._layer_core``).
  The fastest everywhere measured (``benchmarks/bench_vs_transformers.py``), at a price: ~20 s of
  compilation in a fresh process and a few seconds per new input shape, and a C++ compiler on the
  machine. Where compilation fails it warns once and falls back to the eager choice.

The official Deformable-DETR repository samples with a CUDA extension (``MSDeformAttnFunction``) and
keeps ``ms_deform_attn_core_pytorch`` (``grid_sample`` per level, then stack, multiply, sum) as its
CPU reference; transformers 5.x runs that same ``grid_sample`` form on CPU
(``transformers:models/deformable_detr/modeling_deformable_detr.py:MultiScaleDeformableAttention``).
The corner-table formulation here is this course's; the idea of precomputing bilinear corners and
gathering is the one every CUDA kernel of the field uses (e.g. the official ``ms_deform_im2col_bilinear``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "corner_rows_and_weights",
    "sampling_gather",
    "sampling_bag",
    "sampling_compiled",
    "run_compiled",
]

# Corner c of a sample reads pixel (x0 + _DX[c], y0 + _DY[c]); its bilinear weight along x is fx when
# _DX[c] == 1 and 1 - fx otherwise (likewise y).
_DX = (0, 1, 0, 1)
_DY = (0, 0, 1, 1)


def corner_rows_and_weights(
    spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor, *, num_tokens: int
) -> tuple[Tensor, Tensor]:
    """Rows of the value table and weights of the four bilinear corners of every sample.

    Args:
        spatial_shapes: (L, 2) integer (H, W) of each level.
        sampling_locations: (B, Nq, nh, L, P, 2) normalised (x, y), as in ``deformable_sampling``.
        attention_weights: (B, Nq, nh, L, P).
        num_tokens: Nv, the number of value tokens per image (sum of H * W).

    Returns:
        rows: (B, Nq, nh, L * P * 4) long, rows of ``value.reshape(B * Nv * nh, hd)``;
        weights: (B, Nq, nh, L * P * 4), ``attn * bilinear * inside`` (0 for corners outside a level).
    """
    B, Nq, nh, L, P, _ = sampling_locations.shape
    device = sampling_locations.device
    wh = spatial_shapes.flip(-1).view(L, 1, 2)  # (L, 1, 2) long (W, H) of each level
    # Pixel coordinates: pixel centres at integers (x_px = x * W - 0.5, align_corners=False).
    pixel = sampling_locations * wh.to(sampling_locations.dtype) - 0.5  # (B, Nq, nh, L, P, 2)
    floor = pixel.detach().floor()  # (B, Nq, nh, L, P, 2) no gradient through the integer part
    frac = pixel - floor  # (B, Nq, nh, L, P, 2) carries the location gradient
    floor = floor.long()
    dx = torch.tensor(_DX, device=device)  # (4,)
    dy = torch.tensor(_DY, device=device)
    x = floor[..., 0:1] + dx  # (B, Nq, nh, L, P, 4)
    y = floor[..., 1:2] + dy  # (B, Nq, nh, L, P, 4)
    width, height = wh[..., 0:1], wh[..., 1:2]  # (L, 1, 1) each
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)  # (B, Nq, nh, L, P, 4)
    fx, fy = frac[..., 0:1], frac[..., 1:2]  # (B, Nq, nh, L, P, 1)
    bilinear = torch.where(dx.bool(), fx, 1 - fx) * torch.where(dy.bool(), fy, 1 - fy)  # (..., 4)
    weights = bilinear * (attention_weights[..., None] * inside)  # (B, Nq, nh, L, P, 4)

    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]  # (L,)
    starts = (areas.cumsum(0) - areas).view(L, 1, 1)  # (L, 1, 1) first token of each level
    token = starts + y.clamp(min=0).minimum(height - 1) * width + x.clamp(min=0).minimum(width - 1)
    batch = torch.arange(B, device=device).view(B, 1, 1, 1, 1, 1) * num_tokens  # (B, 1, 1, 1, 1, 1)
    head = torch.arange(nh, device=device).view(1, 1, nh, 1, 1, 1)  # (1, 1, nh, 1, 1, 1)
    rows = (batch + token) * nh + head  # (B, Nq, nh, L, P, 4) rows of the (B*Nv*nh, hd) table
    return rows.view(B, Nq, nh, L * P * 4), weights.reshape(B, Nq, nh, L * P * 4)


def sampling_gather(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The core as one gather and one weighted sum (value (B, Nv, nh, hd) -> (B, Nq, nh * hd)).

    No input checks (``deformable_sampling`` runs them once); eager memory ~ ``B*Nq*nh*L*P*4*hd``.
    """
    B, Nv, nh, hd = value.shape
    Nq = sampling_locations.shape[1]
    rows, weights = corner_rows_and_weights(
        spatial_shapes, sampling_locations, attention_weights, num_tokens=Nv
    )  # (B, Nq, nh, K) each, K = L*P*4
    corners = value.reshape(B * Nv * nh, hd)[rows]  # (B, Nq, nh, K, hd)
    out = (corners * weights[..., None]).sum(3)  # (B, Nq, nh, hd)
    return out.reshape(B, Nq, nh * hd)


def sampling_bag(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The core through ``F.embedding_bag``: one bag of L*P*4 weighted corners per (b, q, head)."""
    B, Nv, nh, hd = value.shape
    Nq = sampling_locations.shape[1]
    rows, weights = corner_rows_and_weights(
        spatial_shapes, sampling_locations, attention_weights, num_tokens=Nv
    )  # (B, Nq, nh, K) each
    out = F.embedding_bag(
        rows.view(B * Nq * nh, -1),
        value.reshape(B * Nv * nh, hd),
        per_sample_weights=weights.reshape(B * Nq * nh, -1),
        mode="sum",
    )  # (B*Nq*nh, hd), bags in (b, q, head) order: the output layout needs no permute
    return out.view(B, Nq, nh * hd)


_compiled: dict[str, Callable] = {}  # torch.compile'd functions, made on first use, by name
_compile_failed = False


def run_compiled(name: str, fn: Callable, *args: Tensor) -> object | None:
    """``torch.compile(fn)(*args)`` (compiled once per ``name``); None where the compiler does not work.

    ``dynamic=None``: the first shape is compiled static; a dimension seen to change (the decoder's
    query count with denoising groups, another image size) is recompiled as dynamic once. A compiler
    failure (no C++ compiler, an unsupported platform) warns once and returns None, and every later
    call returns None at once, so the caller falls back to its eager kernel; any other error is
    raised as usual.
    """
    global _compile_failed
    if _compile_failed:
        return None
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=None, fullgraph=True)
    # Compiling for the CPU on a CUDA build of torch logs "No CUDA runtime is found" once: noise here.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _compiled[name](*args)
    except (TorchDynamoException, InductorError) as error:
        _compile_failed = True
        first_line = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(
            f"torch.compile of the deformable sampling kernel failed ({type(error).__name__}: {first_line}); "
            "using the eager kernel from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    finally:
        quiet.setLevel(level)


def sampling_compiled(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor | None:
    """:func:`sampling_gather` compiled by ``torch.compile``; None where the compiler does not work here."""
    return run_compiled(
        "sampling", sampling_gather, value, spatial_shapes, sampling_locations, attention_weights
    )
