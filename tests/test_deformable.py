"""Tests for detr_edu.deformable: the grid_sample core against a hand-written bilinear loop, its
coordinate conventions, float64 gradcheck, and the layer's initialisation, masking and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detr_edu.deformable import (
    MultiScaleDeformableAttention,
    deformable_samples,
    deformable_sampling,
    deformable_sampling_naive,
    level_start_index_from_shapes,
    offsets_to_locations,
)
from detr_edu.levels import flatten_levels

# Non-square levels of different aspect ratios, including a 1-pixel-wide one.
SHAPES = torch.tensor([[3, 5], [4, 2], [2, 3], [1, 1]])


def _inputs(B=2, Nq=3, nh=2, hd=3, P=2, shapes=SHAPES, seed=0, dtype=torch.float64, margin=0.3):
    """Random value, locations (partly outside [0, 1] by ``margin``) and weights."""
    g = torch.Generator().manual_seed(seed)
    L = shapes.shape[0]
    Nv = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(B, Nv, nh, hd, generator=g, dtype=dtype)
    locations = torch.rand(B, Nq, nh, L, P, 2, generator=g, dtype=dtype) * (1 + 2 * margin) - margin
    weights = torch.rand(B, Nq, nh, L, P, generator=g, dtype=dtype)
    return value, shapes, locations, weights


def test_core_matches_naive_loop_float64():
    value, shapes, locations, weights = _inputs()
    outside = ((locations < 0) | (locations > 1)).any(-1)
    assert outside.any() and (~outside).any()  # the case really mixes inside and outside samples
    out = deformable_sampling(value, shapes, locations, weights)
    ref = deformable_sampling_naive(value, shapes, locations, weights)
    assert out.shape == (2, 3, 2 * 3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_core_matches_naive_loop_float32_many_points():
    value, shapes, locations, weights = _inputs(B=1, Nq=4, nh=3, hd=2, P=4, dtype=torch.float32, seed=3)
    out = deformable_sampling(value, shapes, locations, weights)
    torch.testing.assert_close(out, deformable_sampling_naive(value, shapes, locations, weights))


def test_pixel_centre_returns_pixel_exactly():
    value, shapes, _, _ = _inputs(B=1, Nq=1, nh=1, hd=4, P=1)
    starts = level_start_index_from_shapes(shapes).tolist()
    for lvl, (h, w) in enumerate(shapes.tolist()):
        for i in range(h):
            for j in range(w):
                loc = torch.zeros(1, 1, 1, len(shapes), 1, 2, dtype=torch.float64)
                loc[..., 0], loc[..., 1] = (j + 0.5) / w, (i + 0.5) / h
                weights = torch.zeros(1, 1, 1, len(shapes), 1, dtype=torch.float64)
                weights[0, 0, 0, lvl, 0] = 1.0
                out = deformable_sampling(value, shapes, loc, weights)
                # Exact up to the rounding of (j + 0.5) / w through [-1, 1] and back (~1e-16).
                torch.testing.assert_close(
                    out[0, 0], value[0, starts[lvl] + i * w + j, 0], rtol=0, atol=1e-14
                )


def test_zero_padding_outside_the_map():
    shapes = torch.tensor([[2, 3]])
    value = torch.ones(1, 6, 1, 1, dtype=torch.float64)
    weights = torch.ones(1, 3, 1, 1, 1, dtype=torch.float64)
    loc = torch.tensor([[0.5, -0.5], [1.0, 0.5], [0.0, 0.0]], dtype=torch.float64).view(1, 3, 1, 1, 1, 2)
    out = deformable_sampling(value, shapes, loc, weights)[0, :, 0]
    # Far outside -> 0; on the right edge (half a pixel outside the last centre) -> half of a constant
    # map; at the top-left corner -> a quarter (only one of four neighbours is inside).
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 0.25], dtype=torch.float64))


def test_single_level_single_point_zero_offset_is_bilinear_at_reference():
    """One level, one point, zero offset: the layer's core is grid_sample at the reference point."""
    g = torch.Generator().manual_seed(1)
    shapes = torch.tensor([[5, 7]])
    B, Nq, nh, hd = 2, 6, 2, 3
    value = torch.randn(B, 35, nh, hd, generator=g, dtype=torch.float64)
    ref = torch.rand(B, Nq, 1, 2, generator=g, dtype=torch.float64)
    offsets = torch.zeros(B, Nq, nh, 1, 1, 2, dtype=torch.float64)
    loc = offsets_to_locations(ref, offsets, shapes)  # (B, Nq, nh, 1, 1, 2)
    weights = torch.ones(B, Nq, nh, 1, 1, dtype=torch.float64)  # softmax over one sample
    out = deformable_sampling(value, shapes, loc, weights)
    # Independent reference: torch's grid_sample on each head's map, sampled at the reference points.
    maps = value.view(B, 5, 7, nh, hd).permute(0, 3, 4, 1, 2)  # (B, nh, hd, H, W)
    expected = []
    for head in range(nh):
        grid = (2 * ref[:, :, 0] - 1)[:, :, None, :]  # (B, Nq, 1, 2)
        expected.append(F.grid_sample(maps[:, head], grid, align_corners=False)[..., 0].transpose(1, 2))
    torch.testing.assert_close(out, torch.cat(expected, dim=-1))


def test_gradcheck_value_locations_weights():
    value, shapes, locations, weights = _inputs(B=1, Nq=2, nh=2, hd=2, P=2)
    # Random locations almost surely avoid integer pixel positions, where bilinear sampling has a kink.
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, loc, w: deformable_sampling(v, shapes, loc, w), inputs, eps=1e-6, atol=1e-5
    )


def test_gradients_match_naive_loop():
    value, shapes, locations, weights = _inputs(B=1, Nq=2, nh=2, hd=3, P=2, seed=5)
    grads = []
    for fn in (deformable_sampling, deformable_sampling_naive):
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = fn(leaves[0], shapes, leaves[1], leaves[2])
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads.append([t.grad for t in leaves])
    for fast, slow in zip(*grads, strict=True):
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_flatten_levels_layout_and_start_index():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, h, w, generator=g) for h, w in SHAPES.tolist()]
    flat = flatten_levels(feats)  # no masks, no positions: chapter 02's bare feature maps
    value, shapes, start = flat.src, flat.spatial_shapes, flat.level_start_index
    assert flat.pos is None and not flat.mask.any() and bool((flat.valid_ratios == 1).all())
    assert value.shape == (2, 15 + 8 + 6 + 1, 4)
    assert torch.equal(shapes, SHAPES)
    assert start.tolist() == [0, 15, 23, 29]
    # Row-major: token start + i * W + j is pixel (i, j) of that level.
    assert torch.equal(value[:, 15 + 3 * 2 + 1], feats[1][:, :, 3, 1])


def test_offsets_normalised_per_level_for_2d_reference():
    shapes = torch.tensor([[8, 16], [4, 8]])
    ref = torch.full((1, 1, 2, 2), 0.5)
    offsets = torch.zeros(1, 1, 1, 2, 1, 2)
    offsets[..., 0] = 1.0  # one pixel to the right on every level
    loc = offsets_to_locations(ref, offsets, shapes)
    torch.testing.assert_close(loc[0, 0, 0, :, 0, 0] - 0.5, torch.tensor([1 / 16, 1 / 8]))


def test_offsets_scaled_by_box_for_4d_reference():
    shapes = torch.tensor([[8, 16], [4, 8]])
    P = 4
    ref = torch.tensor([0.5, 0.4, 0.2, 0.1]).expand(1, 1, 2, 4)
    offsets = torch.zeros(1, 1, 1, 2, P, 2)
    offsets[..., 0], offsets[..., 1] = float(P), -float(P)  # the largest initial ring offset
    loc = offsets_to_locations(ref, offsets, shapes)
    # Offset P in box units reaches the box edge (cx + w/2, cy - h/2) on every level.
    torch.testing.assert_close(loc[0, 0, 0, :, 0], torch.tensor([[0.6, 0.35], [0.6, 0.35]]))


def test_initialisation_ring_and_uniform_weights():
    nh, L, P = 8, 3, 4
    attn = MultiScaleDeformableAttention(embed_dim=32, num_heads=nh, num_levels=L, num_points=P)
    bias = attn.sampling_offsets.bias.view(nh, L, P, 2)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    # Point p of every head lies on the square of half-side p + 1, the same on every level.
    torch.testing.assert_close(bias.abs().amax(-1), torch.arange(1.0, P + 1).expand(nh, L, P))
    torch.testing.assert_close(bias, bias[:, :1].expand_as(bias))
    # Head h points along angle 2 pi h / nh.
    angles = torch.atan2(bias[:, 0, 0, 1], bias[:, 0, 0, 0]) % (2 * math.pi)
    torch.testing.assert_close(angles, torch.arange(nh) * (2 * math.pi / nh))
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0


def _layer_inputs(B=2, C=16, L=4, seed=0, ref_dim=2):
    g = torch.Generator().manual_seed(seed)
    shapes = SHAPES[:L]
    Nv = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(B, Nv, C, generator=g)
    query = torch.randn(B, 5, C, generator=g)
    ref = torch.rand(B, 5, L, ref_dim, generator=g)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    return query, value, ref, shapes, level_start_index_from_shapes(shapes)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_layer_matches_manual_composition(ref_dim):
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(embed_dim=16, num_heads=4, num_levels=4, num_points=3, dropout=0.0)
    # Random offset and weight projections so that the test does not only see the initial ring.
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.5)
    query, value, ref, shapes, start = _layer_inputs(ref_dim=ref_dim)
    pos = torch.randn_like(query)
    out, loc, weights = attn(
        query,
        value=value,
        query_pos=pos,
        reference_points=ref,
        spatial_shapes=shapes,
        level_start_index=start,
        return_sampling=True,
    )
    B, Nq, C = query.shape
    q = query + pos
    offsets = attn.sampling_offsets(q).view(B, Nq, 4, 4, 3, 2)
    w = attn.attention_weights(q).view(B, Nq, 4, 12).softmax(-1).view(B, Nq, 4, 4, 3)
    if ref_dim == 2:
        wh = shapes.flip(-1).float()  # (L, 2) as (W, H)
        expected_loc = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    else:
        expected_loc = ref[:, :, None, :, None, :2] + offsets * ref[:, :, None, :, None, 2:] * 0.5 / 3
    v = attn.value_proj(value).view(B, -1, 4, 4)
    expected = query + attn.output_proj(deformable_sampling_naive(v, shapes, expected_loc, w))
    torch.testing.assert_close(loc, expected_loc)
    torch.testing.assert_close(weights, w)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(B, Nq, 4))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_samples_are_the_naive_loop_one_sample_at_a_time():
    value, shapes, locations, weights = _inputs(B=1, Nq=2, nh=2, hd=3, P=2)
    samples = deformable_samples(value, shapes, locations)  # (B, Nq, nh, L, P, hd)
    L, P = shapes.shape[0], 2
    for lvl in range(L):
        for p in range(P):
            one_hot = torch.zeros_like(weights)
            one_hot[:, :, :, lvl, p] = 1.0
            expected = deformable_sampling_naive(value, shapes, locations, one_hot).view(1, 2, 2, 3)
            torch.testing.assert_close(samples[:, :, :, lvl, p], expected)
    # and their weighted sum is the core
    summed = (samples * weights[..., None]).sum((3, 4)).flatten(2)  # (B, Nq, nh*hd)
    torch.testing.assert_close(summed, deformable_sampling(value, shapes, locations, weights))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_content_weights_match_manual_composition(ref_dim):
    """weights_from="content": softmax over the L*P samples of q_h . k_h(sample) / sqrt(hd), checked
    with the naive bilinear loop sampling the key map one point at a time."""
    torch.manual_seed(0)
    nh, L, P, C = 4, 4, 3, 16
    hd = C // nh
    attn = MultiScaleDeformableAttention(
        embed_dim=C, num_heads=nh, num_levels=L, num_points=P, dropout=0.0, weights_from="content"
    ).double()
    assert not hasattr(attn, "attention_weights")  # no unused parameters
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    query, value, ref, shapes, start = (
        t.double() if t.is_floating_point() else t for t in _layer_inputs(ref_dim=ref_dim)
    )
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[1, -5:] = True  # some padding in the second image
    out, loc, weights = attn(
        query,
        value=value,
        reference_points=ref,
        spatial_shapes=shapes,
        level_start_index=start,
        key_padding_mask=mask,
        return_sampling=True,
    )
    B, Nq, _ = query.shape
    v = attn.value_proj(value).masked_fill(mask[..., None], 0.0).view(B, -1, nh, hd)
    k = attn.key_proj(value).masked_fill(mask[..., None], 0.0).view(B, -1, nh, hd)
    q = attn.query_proj(query).view(B, Nq, nh, hd)
    logits = torch.zeros(B, Nq, nh, L, P, dtype=torch.float64)
    for lvl in range(L):
        for p in range(P):
            one_hot = torch.zeros(B, Nq, nh, L, P, dtype=torch.float64)
            one_hot[..., lvl, p] = 1.0
            k_s = deformable_sampling_naive(k, shapes, loc, one_hot).view(B, Nq, nh, hd)
            logits[..., lvl, p] = (q * k_s).sum(-1) / math.sqrt(hd)
    w = logits.flatten(3).softmax(-1).view(B, Nq, nh, L, P)
    expected = query + attn.output_proj(deformable_sampling_naive(v, shapes, loc, w))
    torch.testing.assert_close(weights, w)
    torch.testing.assert_close(out, expected)


def test_content_weights_gradcheck_float64():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(
        embed_dim=8, num_heads=2, num_levels=2, num_points=2, dropout=0.0, weights_from="content"
    ).double()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.3)
    shapes = torch.tensor([[3, 4], [2, 2]])
    value = torch.randn(1, 16, 8, dtype=torch.float64, requires_grad=True)
    query = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(1, 3, 2, 2, dtype=torch.float64) * 0.8 + 0.1

    def f(query, value):
        return attn(
            query,
            value=value,
            reference_points=ref,
            spatial_shapes=shapes,
            level_start_index=level_start_index_from_shapes(shapes),
        )

    assert torch.autograd.gradcheck(f, (query, value))
    with pytest.raises(ValueError, match="weights_from"):
        MultiScaleDeformableAttention(embed_dim=8, num_heads=2, weights_from="keys")


def test_self_attention_defaults_value_and_identity_to_query():
    attn = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=4, num_points=2).eval()
    _, value, _, shapes, start = _layer_inputs()
    ref = torch.rand(2, value.shape[1], 4, 2, generator=torch.Generator().manual_seed(2))
    a = attn(value, reference_points=ref, spatial_shapes=shapes, level_start_index=start)
    b = attn(
        value,
        value=value,
        identity=value,
        reference_points=ref,
        spatial_shapes=shapes,
        level_start_index=start,
    )
    torch.testing.assert_close(a, b)


def test_padded_values_never_leak():
    attn = MultiScaleDeformableAttention(embed_dim=16, num_heads=4, num_levels=4, num_points=3).eval()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=2.0)  # spread samples over the maps
    query, value, ref, shapes, start = _layer_inputs()
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[0, 3:11] = True  # part of the first level of image 0
    mask[1, 20:] = True  # the smaller levels of image 1
    kwargs = dict(reference_points=ref, spatial_shapes=shapes, level_start_index=start, key_padding_mask=mask)
    out = attn(query, value=value, **kwargs)
    garbage = value.masked_fill(mask[..., None], 1e6)  # whatever sits in the padding
    torch.testing.assert_close(attn(query, value=garbage, **kwargs), out)
    # And the mask does change the result (the samples do reach padded tokens).
    unmasked = attn(query, value=value, reference_points=ref, spatial_shapes=shapes, level_start_index=start)
    assert not torch.allclose(out, unmasked)


def test_dropout_only_on_the_projected_output():
    attn = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=4, num_points=2, dropout=1.0)
    query, value, ref, shapes, start = _layer_inputs()
    identity = torch.randn_like(query)
    out = attn(
        query,
        value=value,
        identity=identity,
        reference_points=ref,
        spatial_shapes=shapes,
        level_start_index=start,
    )
    torch.testing.assert_close(out, identity)  # dropout p=1 leaves only the identity


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiScaleDeformableAttention(embed_dim=10, num_heads=4)
    attn = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=4, num_points=2)
    query, value, ref, shapes, start = _layer_inputs()
    ok = dict(value=value, reference_points=ref, spatial_shapes=shapes, level_start_index=start)
    with pytest.raises(ValueError, match="sum to 30 tokens but value has 29"):
        attn(query, **{**ok, "value": value[:, :-1]})
    with pytest.raises(ValueError, match="reference_points must be"):
        attn(query, **{**ok, "reference_points": torch.rand(2, 5, 4, 3)})
    with pytest.raises(ValueError, match="num_levels=4"):
        attn(query, **{**ok, "spatial_shapes": shapes[:3]})
    with pytest.raises(ValueError, match="Nq=5, L=4"):
        attn(query, **{**ok, "reference_points": ref[:, :, :3]})
    with pytest.raises(ValueError, match="level_start_index"):
        attn(query, **{**ok, "level_start_index": start + 1})
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        attn(query, **ok, key_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="query must be"):
        attn(query[..., :8], **ok)

    value4, shapes4, loc, weights = _inputs()
    with pytest.raises(ValueError, match="sum to 30 tokens but value has 29"):
        deformable_sampling(value4[:, :-1], shapes4, loc, weights)
    with pytest.raises(ValueError, match="has 4 levels"):
        deformable_sampling(value4[:, :29], shapes4[:3], loc, weights)
    with pytest.raises(ValueError, match="attention_weights must be"):
        deformable_sampling(value4, shapes4, loc, weights[..., :1])
    with pytest.raises(ValueError, match="integers"):
        deformable_sampling(value4, shapes4.float(), loc, weights)
    with pytest.raises(ValueError, match="reference_points must be"):
        offsets_to_locations(torch.rand(2, 3, 4, 3), torch.zeros(2, 3, 2, 4, 2, 2), shapes4)
    with pytest.raises(ValueError, match="every level must be"):
        flatten_levels([torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, 2)])


# --- chapter 02 pictures (detr_edu.viz.deformable): the computing helpers against hand counts, and
# the plotting functions as smoke tests (each returns a figure with the expected panels).


def test_image_pyramid_halves_rounding_up_and_keeps_the_mean():
    from detr_edu.viz.deformable import image_pyramid

    image = torch.rand(3, 100, 150, generator=torch.Generator().manual_seed(0))
    pyramid = image_pyramid(image, base_hw=(50, 75), num_levels=4)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(50, 75), (25, 38), (13, 19), (7, 10)]
    torch.testing.assert_close(pyramid[0].mean(), image.mean())  # area resizing by an exact factor
    with pytest.raises(ValueError, match="image must be"):
        image_pyramid(image[0], base_hw=(4, 4), num_levels=2)


def test_initial_sampling_is_the_ring_around_the_reference():
    from detr_edu.viz.deformable import initial_sampling

    shapes = torch.tensor([[8, 16], [4, 8]])
    ref = torch.tensor([0.5, 0.25])
    locs, weights = initial_sampling(reference=ref, spatial_shapes=shapes, num_heads=4, num_points=3)
    assert locs.shape == (4, 2, 3, 2) and weights.shape == (4, 2, 3)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 6))
    # Head 0 points right: point k at k pixels of each level.
    expected_x = 0.5 + torch.arange(1.0, 4.0)[None] / torch.tensor([[16.0], [8.0]])  # (L, P)
    torch.testing.assert_close(locs[0, :, :, 0], expected_x)
    torch.testing.assert_close(locs[0, :, :, 1], torch.full((2, 3), 0.25))
    box_locs, _ = initial_sampling(
        reference=torch.tensor([0.5, 0.5, 0.4, 0.2]), spatial_shapes=shapes, num_points=3
    )
    assert float((box_locs[..., 0] - 0.5).abs().max()) <= 0.2 + 1e-6  # inside the box
    with pytest.raises(ValueError, match="reference must be"):
        initial_sampling(reference=torch.zeros(3), spatial_shapes=shapes)


def test_pixels_read_and_coverage_count_bilinear_neighbours():
    from detr_edu.viz.deformable import coverage_fraction, pixels_read

    shapes = torch.tensor([[4, 4], [2, 2]])
    centre = torch.tensor([[0.375, 0.375], [0.25, 0.25]]).view(2, 1, 2)  # pixel centres on both levels
    corner = torch.tensor([[0.5, 0.5], [0.5, 0.5]]).view(2, 1, 2)  # between four pixels on both
    outside = torch.tensor([[1.5, 0.5], [-0.6, 0.5]]).view(2, 1, 2)
    assert pixels_read(centre, shapes) == [1, 1]
    assert pixels_read(corner, shapes) == [4, 4]
    assert pixels_read(outside, shapes) == [0, 0]
    # Level 1's pixel (0, 0) covers a quarter of the image; level 0's pixel (1, 1) lies inside it.
    assert coverage_fraction(centre, shapes) == pytest.approx(0.25)
    assert coverage_fraction(corner, shapes) == pytest.approx(1.0)


def test_plotting_functions_return_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detr_edu.viz.deformable import (
        image_pyramid,
        plot_conventions,
        plot_cost,
        plot_coverage,
        plot_offset_normalisation,
        sampling_view,
    )

    pyramid = image_pyramid(torch.rand(3, 32, 48), base_hw=(16, 24), num_levels=3)
    figures = [
        (plot_conventions(torch.arange(6.0).view(2, 3)), 2),
        (sampling_view(pyramid), 3),
        (sampling_view(pyramid, head=1, level=2, box=True, num_points=2), 2),  # panel + colour bar
        (plot_offset_normalisation(pyramid, torch.ones(2, 3, 2), reference=torch.tensor([0.5, 0.5])), 6),
        (plot_coverage({"a": [(4, 0.1, 0.2), (8, 0.2, 0.4)]}), 2),
        (plot_cost([10, 20], {"x": [1.0, 2.0]}, {"x": [1.0, 4.0]}), 2),
    ]
    for fig, n_axes in figures:
        assert len(fig.axes) == n_axes
        plt.close(fig)
    with pytest.raises(ValueError, match="head must be"):
        sampling_view(pyramid, head=9)
