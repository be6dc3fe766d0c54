"""Multi-scale deformable attention, in pure PyTorch (chapter 02).

Deformable attention (Zhu et al., "Deformable DETR", ICLR 2021, arXiv:2010.04159, Sec. 4.1) has no
keys: every query predicts, from its own features alone, P sampling offsets per head and level around
a reference point, plus one weight per sample. The output is the weighted sum of the (projected) value
maps bilinearly sampled at those locations. It is deformable convolution with a learned, query-
dependent kernel shape rather than attention in the dot-product sense.

Three public pieces, each with one job:

* :func:`deformable_sampling_grid` -- the sampling core, one ``F.grid_sample`` call per level, no
  loops over heads or points (the role of ``ms_deform_attn_core_pytorch`` in the Deformable-DETR
  repository, written from the paper's equations); :func:`deformable_sampling` is the production
  entry point that checks once and picks the fastest exact kernel (this one or one of
  :mod:`detr_edu.sampling_kernels`);
* :func:`deformable_sampling_naive` -- the same core as an explicit loop over every sample with
  hand-written bilinear interpolation: slow, obviously correct, the reference the tests compare to;
* :class:`MultiScaleDeformableAttention` -- the layer: projections, offsets and weights from the
  query, reference points of size 2 or 4, initialisation of the paper.

Coordinate conventions (tested in ``tests/test_deformable.py``):

* sampling locations are normalised (x, y) in [0, 1] over the whole map: (0, 0) is the top-left
  *corner* of the top-left pixel, (1, 1) the bottom-right corner of the bottom-right pixel;
* pixel (row i, column j) of an H x W map has its centre at ((j + 0.5) / W, (i + 0.5) / H), and a
  location exactly at a pixel centre returns that pixel's value exactly;
* this is ``grid_sample(..., align_corners=False)`` after mapping [0, 1] -> [-1, 1] by ``2 * loc - 1``;
* bilinear interpolation with zero padding: a corner outside the map contributes zero, so a location
  half a pixel outside the map fades linearly to zero and farther locations return zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_edu.sampling_kernels import run_compiled, sampling_bag, sampling_compiled, sampling_gather

__all__ = [
    "SAMPLING_KERNELS",
    "deformable_sampling",
    "deformable_sampling_grid",
    "set_sampling_kernel",
    "deformable_sampling_naive",
    "deformable_samples",
    "level_start_index_from_shapes",
    "offsets_to_locations",
    "MultiScaleDeformableAttention",
]


def _check_sampling_inputs(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> None:
    """Raise ``ValueError`` naming the shapes when the sampling inputs do not fit together."""
    if value.dim() != 4:
        raise ValueError(f"value must be (B, Nv, nh, hd), got shape {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"spatial_shapes must be (L, 2) rows of (H, W), got shape {tuple(spatial_shapes.shape)}"
        )
    if spatial_shapes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"spatial_shapes must hold integers (H, W), got dtype {spatial_shapes.dtype}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (B, Nq, nh, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    B, Nv, nh, _ = value.shape
    num_tokens = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if num_tokens != Nv:
        raise ValueError(
            f"spatial_shapes {spatial_shapes.tolist()} sum to {num_tokens} tokens but value has {Nv} "
            f"(value shape {tuple(value.shape)})"
        )
    Bs, Nq, nhs, Ls, P, _ = sampling_locations.shape
    if (Bs, nhs) != (B, nh):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} must share batch and heads with "
            f"value {tuple(value.shape)}"
        )
    if Ls != spatial_shapes.shape[0]:
        raise ValueError(
            f"sampling_locations has {Ls} levels (shape {tuple(sampling_locations.shape)}) but "
            f"spatial_shapes has {spatial_shapes.shape[0]}"
        )
    if tuple(attention_weights.shape) != (B, Nq, nh, Ls, P):
        raise ValueError(
            f"attention_weights must be (B, Nq, nh, L, P) = {(B, Nq, nh, Ls, P)}, got "
            f"{tuple(attention_weights.shape)}"
        )


SAMPLING_KERNELS = ("auto", "grid", "bag", "gather", "compiled")


def deformable_sampling(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    kernel: str = "auto",
) -> Tensor:
    """Bilinearly sample every level at the given locations and sum the samples with the weights.

    out[b, q, h*hd:(h+1)*hd] = sum_{l, p} weights[b, q, h, l, p] *
    bilinear(value_l[b, :, h], loc[b, q, h, l, p])

    The production entry point: checks the inputs once, then runs one of the exact kernels (all agree
    with :func:`deformable_sampling_naive` to float64 rounding; speed in chapter 02 section 5 and
    ``benchmarks/results/vs_transformers.md``):

    * ``"grid"``: :func:`deformable_sampling_grid`, one ``grid_sample`` per level (the official
      ``ms_deform_attn_core_pytorch`` idea, and what transformers runs on CPU);
    * ``"bag"``: :func:`~detr_edu.sampling_kernels.sampling_bag`, bilinear corners precomputed and
      summed by ``F.embedding_bag``;
    * ``"gather"``: :func:`~detr_edu.sampling_kernels.sampling_gather`, the same corners indexed and
      summed in plain PyTorch (memory ~ every corner's channels; the form that is compiled);
    * ``"compiled"``: the gather form through ``torch.compile`` (fastest everywhere measured; compiles
      on first use and per new shape; falls back to ``"auto"`` with one warning where it cannot);
    * ``"auto"`` (default): the faster eager kernel for the shape -- ``"bag"`` when the value map is
      large and has many more tokens than there are queries (``Nv >= 4096`` and ``Nv >= 8 Nq``: a
      decoder on COCO-sized maps), ``"grid"`` otherwise.

    Args:
        value: (B, Nv, nh, hd), the levels flattened row-major and concatenated, Nv = sum H_l * W_l.
        spatial_shapes: (L, 2) integer (H, W) of each level, in the order of ``value``.
        sampling_locations: (B, Nq, nh, L, P, 2) normalised (x, y), [0, 1] inside the map.
        attention_weights: (B, Nq, nh, L, P); usually softmax-normalised over (L, P), but any
            weights are allowed.
        kernel: one of :data:`SAMPLING_KERNELS`.

    Returns:
        (B, Nq, nh * hd), heads concatenated along the channels.
    """
    _check_sampling_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    _check_kernel(kernel)
    return _sample(value, spatial_shapes, sampling_locations, attention_weights, kernel=kernel)


def _check_kernel(kernel: str) -> None:
    if kernel not in SAMPLING_KERNELS:
        raise ValueError(f"sampling kernel must be one of {SAMPLING_KERNELS}, got {kernel!r}")


def _sample(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    kernel: str,
) -> Tensor:
    """:func:`deformable_sampling` without the input checks (for callers that made the inputs)."""
    if kernel == "compiled":
        out = sampling_compiled(value, spatial_shapes, sampling_locations, attention_weights)
        if out is not None:
            return out
        kernel = "auto"
    if kernel == "auto":
        Nv, Nq = value.shape[1], sampling_locations.shape[1]
        kernel = "bag" if Nv >= 4096 and Nv >= 8 * Nq else "grid"
    if kernel == "bag":
        return sampling_bag(value, spatial_shapes, sampling_locations, attention_weights)
    if kernel == "gather":
        return sampling_gather(value, spatial_shapes, sampling_locations, attention_weights)
    return _sampling_grid(value, spatial_shapes, sampling_locations, attention_weights)


def deformable_sampling_grid(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The core with ``F.grid_sample``, one call per level (the form chapter 02 teaches).

    out[b, q, h*hd:(h+1)*hd] = sum_{l, p} weights[b, q, h, l, p] *
    bilinear(value_l[b, :, h], loc[b, q, h, l, p])

    One ``F.grid_sample`` call per level covers all batches, heads, queries and points at once
    (heads are folded into the batch dimension), so the only Python loop is over the L levels.
    Conventions: see the module docstring (``align_corners=False``, zero padding).

    Args:
        value: (B, Nv, nh, hd), the levels flattened row-major and concatenated, Nv = sum H_l * W_l.
        spatial_shapes: (L, 2) integer (H, W) of each level, in the order of ``value``.
        sampling_locations: (B, Nq, nh, L, P, 2) normalised (x, y), [0, 1] inside the map.
        attention_weights: (B, Nq, nh, L, P); usually softmax-normalised over (L, P), but any
            weights are allowed.

    Returns:
        (B, Nq, nh * hd), heads concatenated along the channels.
    """
    _check_sampling_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    return _sampling_grid(value, spatial_shapes, sampling_locations, attention_weights)


def _sampling_grid(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """:func:`deformable_sampling_grid` without the input checks."""
    B, Nv, nh, hd = value.shape
    _, Nq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]

    # Heads join the batch so that one grid_sample call serves all of them. One copy of the whole
    # value here; the per-level slices below are then views (the last dim is contiguous).
    value = value.permute(0, 2, 3, 1).reshape(B * nh, hd, Nv)  # (B*nh, hd, Nv)
    value_levels = value.split([h * w for h, w in shapes], dim=-1)  # L x (B*nh, hd, H_l*W_l)
    # grid_sample wants [-1, 1]; with align_corners=False, -1 and +1 are the outer pixel edges,
    # which is exactly the [0, 1] convention of the locations.
    grids = 2 * sampling_locations - 1  # (B, Nq, nh, L, P, 2)
    grids = grids.transpose(1, 2).flatten(0, 1)  # (B*nh, Nq, L, P, 2)
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # (B*nh, Nq, L, P)

    out = value.new_zeros(B * nh, hd, Nq)  # (B*nh, hd, Nq)
    for lvl, (h, w) in enumerate(shapes):
        value_l = value_levels[lvl].view(B * nh, hd, h, w)  # (B*nh, hd, H_l, W_l)
        # The sampled points form a (Nq, P) "image" per (batch, head).
        sampled = F.grid_sample(
            value_l, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B*nh, hd, Nq, P)
        # Accumulating level by level keeps one level's weighted product alive at a time instead of
        # stacking all L levels (a full (B*nh, hd, Nq, L*P) copy) before the sum.
        out = out + (sampled * weights[:, None, :, lvl]).sum(-1)  # (B*nh, hd, Nq)
    out = out.view(B, nh * hd, Nq)  # (B, nh*hd, Nq)
    return out.transpose(1, 2).contiguous()  # (B, Nq, nh*hd)


def deformable_samples(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor) -> Tensor:
    """Every bilinear sample on its own, not yet summed: what :func:`deformable_sampling` weighs.

    ``deformable_sampling(value, shapes, loc, w)`` equals ``(deformable_samples(value, shapes, loc) *
    w[..., None]).sum((3, 4))`` with the heads concatenated; this form is needed when the weights
    depend on the samples themselves (``MultiScaleDeformableAttention(weights_from="content")``).
    It keeps all ``L * P`` samples alive at once, so it costs ``L * P`` times the memory of the sum.

    Args:
        value: (B, Nv, nh, hd), as :func:`deformable_sampling`.
        spatial_shapes: (L, 2) integer (H, W) of each level.
        sampling_locations: (B, Nq, nh, L, P, 2) normalised (x, y).

    Returns:
        (B, Nq, nh, L, P, hd).
    """
    B, Nq, nh, L, P, _ = sampling_locations.shape
    _check_sampling_inputs(value, spatial_shapes, sampling_locations, value.new_zeros(B, Nq, nh, L, P))
    hd = value.shape[-1]
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value = value.permute(0, 2, 3, 1).reshape(B * nh, hd, -1)  # (B*nh, hd, Nv)
    value_levels = value.split([h * w for h, w in shapes], dim=-1)  # L x (B*nh, hd, H_l*W_l)
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (B*nh, Nq, L, P, 2)
    samples = [
        F.grid_sample(
            value_levels[lvl].view(B * nh, hd, h, w),
            grids[:, :, lvl],
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # (B*nh, hd, Nq, P)
        for lvl, (h, w) in enumerate(shapes)
    ]
    samples = torch.stack(samples, dim=3)  # (B*nh, hd, Nq, L, P)
    samples = samples.view(B, nh, hd, Nq, L, P)  # (B, nh, hd, Nq, L, P)
    return samples.permute(0, 3, 1, 4, 5, 2)  # (B, Nq, nh, L, P, hd)


def deformable_sampling_naive(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The same computation as :func:`deformable_sampling`, one sample at a time (the reference).

    Every sample is interpolated by hand: the location in pixel units is ``x_px = x * W - 0.5``
    (pixel centres sit at integers), its four neighbouring pixels get the bilinear weights
    ``(1 - fx)(1 - fy)``, ``fx (1 - fy)``, ``(1 - fx) fy`` and ``fx fy``, and neighbours outside the
    map contribute zero. Differentiable in all three tensor inputs. Slow by design (a Python loop
    over B * Nq * nh * L * P samples): use it on small inputs only.

    Args and Returns: as :func:`deformable_sampling`.
    """
    _check_sampling_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    B, _, nh, hd = value.shape
    _, Nq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = level_start_index_from_shapes(spatial_shapes).tolist()

    rows = []
    for b in range(B):
        for q in range(Nq):
            heads = []
            for head in range(nh):
                acc = value.new_zeros(hd)  # (hd,)
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(P):
                        x_px = sampling_locations[b, q, head, lvl, p, 0] * w - 0.5  # scalar tensor
                        y_px = sampling_locations[b, q, head, lvl, p, 1] * h - 0.5
                        x0, y0 = math.floor(x_px.item()), math.floor(y_px.item())
                        fx, fy = x_px - x0, y_px - y0  # fractional parts, carry the location gradient
                        corners = (
                            (y0, x0, (1 - fx) * (1 - fy)),
                            (y0, x0 + 1, fx * (1 - fy)),
                            (y0 + 1, x0, (1 - fx) * fy),
                            (y0 + 1, x0 + 1, fx * fy),
                        )
                        sample = value.new_zeros(hd)  # (hd,)
                        for yy, xx, c in corners:
                            if 0 <= yy < h and 0 <= xx < w:  # zero padding outside the map
                                sample = sample + c * value[b, starts[lvl] + yy * w + xx, head]
                        acc = acc + attention_weights[b, q, head, lvl, p] * sample
                heads.append(acc)
            rows.append(torch.cat(heads))  # (nh*hd,)
    return torch.stack(rows).view(B, Nq, nh * hd)  # (B, Nq, nh*hd)


def level_start_index_from_shapes(spatial_shapes: Tensor) -> Tensor:
    """Index of each level's first token in the flattened sequence: (L,) long, starting at 0."""
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]  # (L,)
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]).long()  # (L,)


def _at_least_float32(x: Tensor) -> Tensor:
    """Half-precision tensors (autocast) go up to float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def offsets_to_locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor) -> Tensor:
    """Turn predicted offsets into sampling locations around reference points.

    * 2-d reference points (x, y): offsets are in *pixels of each level*: divided by that level's
      (W, H), so offset (1, 0) moves one pixel right on every level (a step that covers twice the
      image fraction on a level half as wide).
    * 4-d reference points (cx, cy, w, h): offsets are in *box units*: scaled by
      ``(w, h) * 0.5 / P``, so with offsets up to P in magnitude the points stay inside the box and
      the spread grows with the box, not with the level's resolution.

    Args:
        reference_points: (B, Nq, L, 2) or (B, Nq, L, 4), normalised.
        offsets: (B, Nq, nh, L, P, 2) in (x, y) order.
        spatial_shapes: (L, 2) integer (H, W).

    Returns:
        sampling_locations: (B, Nq, nh, L, P, 2), normalised (x, y).
    """
    if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
        raise ValueError(
            "reference_points must be (B, Nq, L, 2) or (B, Nq, L, 4), got shape "
            f"{tuple(reference_points.shape)}"
        )
    B, Nq, nh, L, P, _ = offsets.shape
    if tuple(reference_points.shape[:3]) != (B, Nq, L):
        raise ValueError(
            f"reference_points {tuple(reference_points.shape)} must be (B, Nq, L, 2|4) "
            f"= ({B}, {Nq}, {L}, 2|4) to match offsets {tuple(offsets.shape)}"
        )
    if spatial_shapes.shape[0] != L:
        raise ValueError(f"offsets have {L} levels but spatial_shapes has {spatial_shapes.shape[0]}")
    ref = reference_points[:, :, None, :, None, :]  # (B, Nq, 1, L, 1, 2|4)
    if reference_points.shape[-1] == 2:
        # (W, H) per level, in the (x, y) order of the offsets.
        normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2)
        return ref + offsets / normalizer[None, None, None, :, None, :]  # (B, Nq, nh, L, P, 2)
    return ref[..., :2] + offsets / P * ref[..., 2:] * 0.5  # (B, Nq, nh, L, P, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3).

    For each query: ``nh * L * P`` offsets and ``nh * L * P`` weights come from one linear layer each
    applied to ``query + query_pos``; the weights are softmax-normalised over the ``L * P`` samples of
    each head; the value is projected, padded tokens are zeroed, the core samples and sums, and the
    output projection, dropout and identity connection finish: ``identity + dropout(proj(...))``.

    ``weights_from="content"`` is the variant chapter 02 asks about (Q2) and chapter 08 trains: the
    offsets still come from the query alone, but the weights are dot products with what the samples
    *contain*, ``softmax_{l,p}(q_h . k_h(loc_{h,l,p}) / sqrt(hd))`` with ``q = W_q query`` and the key
    map ``k = W_k value`` sampled at the same locations as the value (sampling is linear per pixel,
    so this is ``W_k`` applied to the bilinearly sampled input). It samples twice the channels and
    keeps every sample alive (:func:`deformable_samples`); padded tokens and points outside the map
    read a zero key (logit 0). Not in the paper; the name and the formula are this course's.

    Args:
        embed_dim: C, channels of query and value.
        num_heads: nh; C must be divisible by it.
        num_levels: L, feature levels.
        num_points: P, sampling points per head and level.
        dropout: dropout on the projected output, before the identity connection.
        weights_from: "query" (the paper: a linear layer of the query) or "content" (see above).
        sampling_kernel: which exact kernel samples (:func:`deformable_sampling`'s ``kernel``; change it
            on a built model with :func:`set_sampling_kernel`). Not a weight: checkpoints ignore it.
            ``weights_from="content"`` keeps every sample (:func:`deformable_samples`, ``grid_sample``)
            and does not use it.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.1,
        weights_from: str = "query",
        sampling_kernel: str = "auto",
    ) -> None:
        super().__init__()
        _check_kernel(sampling_kernel)
        self.sampling_kernel = sampling_kernel
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if weights_from not in ("query", "content"):
            raise ValueError(f"weights_from must be 'query' or 'content', got {weights_from!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.weights_from = weights_from
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        if weights_from == "query":
            self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        else:
            self.query_proj = nn.Linear(embed_dim, embed_dim)
            self.key_proj = nn.Linear(embed_dim, embed_dim)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's initialisation (Deformable DETR, Appendix A.2 / its ``_reset_parameters``).

        * offsets: zero weight; the bias puts head ``h``'s points on the direction at angle
          ``2 pi h / nh`` pushed onto the square's border (``max(|x|, |y|) = 1``), point ``p`` at distance
          ``p + 1`` -- a ring of rays that grows with the point index, the same on every level;
        * attention weights: zero weight and bias, so the softmax starts uniform over the L * P samples
          (``weights_from="content"``: Xavier-uniform query and key projections, zero bias);
        * value and output projections: Xavier-uniform weight, zero bias.
        """
        nh, L, P = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(nh, dtype=torch.float64) * (2 * math.pi / nh)  # (nh,)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (nh, 2) unit vectors
        directions = directions / directions.abs().max(-1, keepdim=True).values  # (nh, 2) on the square
        scales = torch.arange(1, P + 1, dtype=torch.float64)  # (P,) point p at distance p + 1
        bias = directions[:, None, None, :] * scales[None, None, :, None]  # (nh, 1, P, 2)
        bias = bias.expand(nh, L, P, 2)  # (nh, L, P, 2)
        self.sampling_offsets.bias.copy_(bias.reshape(-1))
        if self.weights_from == "query":
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
        else:  # dot-product weights: Xavier like the other projections (logits start small, not 0)
            for proj in (self.query_proj, self.key_proj):
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        *,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        return_sampling: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Attend from each query to a few sampled points of every level.

        Args:
            query: (B, Nq, C).
            value: (B, Nv, C) flattened levels; ``None`` means self-attention (value = query).
            identity: (B, Nq, C) added to the output; ``None`` means ``query`` (before query_pos).
            query_pos: (B, Nq, C) added to the query before predicting offsets and weights; never
                added to the value.
            key_padding_mask: (B, Nv) bool, True marks padding; those value tokens are zeroed after
                the value projection so that no sample reads them.
            reference_points: (B, Nq, L, 2) normalised (x, y), or (B, Nq, L, 4) normalised boxes
                (cx, cy, w, h); see :func:`offsets_to_locations`.
            spatial_shapes: (L, 2) long (H, W) of each level.
            level_start_index: (L,) long, first token of each level in ``value``.
            return_sampling: also return the sampling locations and attention weights (for pictures).

        Returns:
            (B, Nq, C); or ``(out, sampling_locations (B, Nq, nh, L, P, 2), attention_weights
            (B, Nq, nh, L, P))`` when ``return_sampling``.
        """
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (B, Nq, C={self.embed_dim}), got shape {tuple(query.shape)}")
        if value.dim() != 3 or value.shape[0] != query.shape[0] or value.shape[-1] != self.embed_dim:
            raise ValueError(
                f"value must be (B={query.shape[0]}, Nv, C={self.embed_dim}), got shape {tuple(value.shape)}"
            )
        if query_pos is not None:
            query = query + query_pos  # (B, Nq, C)
        B, Nq, _ = query.shape
        Nv = value.shape[1]
        nh, L, P = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.dim() != 2 or spatial_shapes.shape != (L, 2):
            raise ValueError(
                f"spatial_shapes must be (L={L}, 2) for a layer built with num_levels={L}, got shape "
                f"{tuple(spatial_shapes.shape)}"
            )
        num_tokens = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
        if num_tokens != Nv:
            raise ValueError(
                f"spatial_shapes {spatial_shapes.tolist()} sum to {num_tokens} tokens but value has {Nv}"
            )
        if not torch.equal(
            level_start_index.to(spatial_shapes.device), level_start_index_from_shapes(spatial_shapes)
        ):
            raise ValueError(
                f"level_start_index {level_start_index.tolist()} does not match spatial_shapes "
                f"{spatial_shapes.tolist()} "
                f"(expected {level_start_index_from_shapes(spatial_shapes).tolist()})"
            )
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "reference_points must be (B, Nq, L, 2) or (B, Nq, L, 4), got shape "
                f"{tuple(reference_points.shape)}"
            )
        if tuple(reference_points.shape[:3]) != (B, Nq, L):
            raise ValueError(
                f"reference_points {tuple(reference_points.shape)} must be (B={B}, Nq={Nq}, L={L}, 2|4)"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, Nv):
            raise ValueError(
                f"key_padding_mask must be (B, Nv) = {(B, Nv)}, got {tuple(key_padding_mask.shape)}"
            )

        hd = self.embed_dim // nh
        source = value
        value = self.value_proj(source)  # (B, Nv, C)
        if key_padding_mask is not None:
            # Zero padded tokens: bilinear samples near the padding then read zeros, never padding.
            value = value.masked_fill(key_padding_mask[..., None], 0.0)  # (B, Nv, C)
        value = value.view(B, Nv, nh, hd)  # (B, Nv, nh, hd)
        offsets = self.sampling_offsets(query).view(B, Nq, nh, L, P, 2)  # (B, Nq, nh, L, P, 2)
        if self.weights_from == "query":
            weights = self.attention_weights(query).view(B, Nq, nh, L * P)  # (B, Nq, nh, L*P)
            # Under autocast the locations, weights and bilinear sampling run in float32: a bf16
            # number has 8 significant bits, so locations in [0.5, 1) move in steps of 2^-8 = 0.004
            # (0.8 px on a 200-px level), enough to blur every sample; the Linear layers stay in bf16.
            with torch.autocast(value.device.type, enabled=False):
                value, offsets, weights = (_at_least_float32(t) for t in (value, offsets, weights))
                reference_points = _at_least_float32(reference_points)
                fused = None
                if self.sampling_kernel == "compiled":  # locations, softmax and sampling in one graph
                    fused = run_compiled(
                        "layer core", _layer_core, value, offsets, weights, reference_points, spatial_shapes
                    )
                if fused is not None:
                    out, locations, weights = fused
                else:
                    out, locations, weights = _layer_core(
                        value, offsets, weights, reference_points, spatial_shapes, kernel=self.sampling_kernel
                    )
        else:
            locations = offsets_to_locations(reference_points, offsets, spatial_shapes)  # (B,Nq,nh,L,P,2)
            key = self.key_proj(source)  # (B, Nv, C)
            if key_padding_mask is not None:
                key = key.masked_fill(key_padding_mask[..., None], 0.0)  # (B, Nv, C)
            both = torch.cat([value, key.view(B, Nv, nh, hd)], dim=-1)  # (B, Nv, nh, 2*hd)
            samples = deformable_samples(both, spatial_shapes, locations)  # (B, Nq, nh, L, P, 2*hd)
            v_s, k_s = samples.split(hd, dim=-1)  # 2 x (B, Nq, nh, L, P, hd)
            q = self.query_proj(query).view(B, Nq, nh, 1, 1, hd)  # (B, Nq, nh, 1, 1, hd)
            logits = (q * k_s).sum(-1) / math.sqrt(hd)  # (B, Nq, nh, L, P)
            weights = logits.view(B, Nq, nh, L * P).softmax(-1).view(B, Nq, nh, L, P)  # (B, Nq, nh, L, P)
            out = (v_s * weights[..., None]).sum((3, 4)).reshape(B, Nq, nh * hd)  # (B, Nq, C)
        out = identity + self.dropout(self.output_proj(out))  # (B, Nq, C)
        if return_sampling:
            return out, locations, weights
        return out


def _layer_core(
    value: Tensor,
    offsets: Tensor,
    logits: Tensor,
    reference_points: Tensor,
    spatial_shapes: Tensor,
    *,
    kernel: str = "gather",
) -> tuple[Tensor, Tensor, Tensor]:
    """Locations, softmax weights and the sampled sum of one layer (compiled whole for ``"compiled"``).

    Args: value (B, Nv, nh, hd); offsets (B, Nq, nh, L, P, 2); logits (B, Nq, nh, L*P);
    reference_points (B, Nq, L, 2|4); spatial_shapes (L, 2).

    Returns:
        out (B, Nq, nh*hd), locations (B, Nq, nh, L, P, 2), weights (B, Nq, nh, L, P).
    """
    B, Nq, nh, L, P, _ = offsets.shape
    locations = offsets_to_locations(reference_points, offsets, spatial_shapes)  # (B, Nq, nh, L, P, 2)
    weights = logits.softmax(-1).view(B, Nq, nh, L, P)  # (B, Nq, nh, L, P) sum to 1 per head
    out = _sample(value, spatial_shapes, locations, weights, kernel=kernel)  # (B, Nq, nh*hd)
    return out, locations, weights


def set_sampling_kernel(model: nn.Module, kernel: str) -> int:
    """Set the sampling kernel of every :class:`MultiScaleDeformableAttention` in ``model``.

    Returns the number of layers changed (0 for a model without deformable attention, e.g. DETR).
    """
    _check_kernel(kernel)
    layers = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    for layer in layers:
        layer.sampling_kernel = kernel
    return len(layers)
