"""Tests for detr_edu.deformable_transformer: levels, reference points, valid ratios, encoder, decoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_edu.box_ops import apply_box_delta
from detr_edu.deformable_transformer import DecoderOutput, DeformableDecoder, DeformableEncoder
from detr_edu.levels import (
    decoder_reference_points,
    encoder_reference_points,
    flatten_levels,
    valid_ratios_from_mask,
)
from detr_edu.position import QueryPositionFromBox, sine_position_embedding
from detr_edu.transformer import MLP

C, NH, P = 16, 4, 2
PADDED = [(16, 16), (8, 8), (4, 4)]  # a 128 x 128 padded batch at strides 8, 16, 32
ALONE = [(12, 13), (6, 7), (3, 4)]  # a 90 x 100 image alone: ceil(90 / s), ceil(100 / s)


def rect_mask(B_hw: tuple[int, int, int], valid: list[tuple[int, int]]) -> torch.Tensor:
    """(B, H, W) mask, True outside each image's top-left (h, w) rectangle."""
    B, H, W = B_hw
    mask = torch.ones(B, H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(valid):
        mask[b, :h, :w] = False
    return mask


def make_levels(B_shapes, valid_per_image, gen, level_embed=None, features=None):
    """Features (given or random), rectangle masks, sine positions, flattened."""
    B = len(valid_per_image)
    feats, masks, pos = [], [], []
    for lvl, (H, W) in enumerate(B_shapes):
        f = torch.randn(B, C, H, W, generator=gen) if features is None else features[lvl]
        m = rect_mask((B, H, W), [v[lvl] for v in valid_per_image])
        feats.append(f)
        masks.append(m)
        pos.append(sine_position_embedding(m, num_pos_feats=C // 2, offset=-0.5))
    return flatten_levels(feats, masks, pos, level_embed)


def encoder(num_layers=2):
    return DeformableEncoder(
        num_layers=num_layers, embed_dim=C, num_heads=NH, num_levels=3, num_points=P, feedforward_dim=32
    ).eval()


def decoder(num_layers=3, post_norm=True, query_pos_frame="level0"):
    return DeformableDecoder(
        num_layers=num_layers,
        embed_dim=C,
        num_heads=NH,
        num_levels=3,
        num_points=P,
        feedforward_dim=32,
        post_norm=post_norm,
        query_pos_frame=query_pos_frame,
    ).eval()


def randomize(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random weights everywhere (the paper's init zeroes some layers, which would hide bugs)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


# ---------------------------------------------------------------- flattening and valid ratios


def test_flatten_levels_against_per_level_loop():
    gen = torch.Generator().manual_seed(0)
    level_embed = torch.randn(3, C, generator=gen)
    flat = make_levels(PADDED, [PADDED, ALONE], gen, level_embed)
    assert flat.src.shape == (2, 256 + 64 + 16, C)
    assert flat.mask.shape == (2, 336) and flat.pos.shape == (2, 336, C)
    assert flat.spatial_shapes.tolist() == [list(s) for s in PADDED]
    assert flat.level_start_index.tolist() == [0, 256, 320]
    # Token index start_l + row * W_l + col holds pixel (row, col) of level l, and its mask.
    feats = [
        flat.src[:, s : s + h * w].transpose(1, 2).reshape(2, C, h, w)
        for s, (h, w) in zip([0, 256, 320], PADDED, strict=True)
    ]
    for lvl, (h, w) in enumerate(PADDED):
        for row, col in [(0, 0), (h - 1, 0), (1, w - 1)]:
            idx = [0, 256, 320][lvl] + row * w + col
            torch.testing.assert_close(flat.src[:, idx], feats[lvl][:, :, row, col])
            assert bool(flat.mask[1, idx]) == (row >= ALONE[lvl][0] or col >= ALONE[lvl][1])
    # Positions carry the level embedding.
    m = rect_mask((2, 4, 4), [(4, 4), (3, 4)])
    expected = (
        sine_position_embedding(m, num_pos_feats=C // 2, offset=-0.5).flatten(2).transpose(1, 2)
        + level_embed[2]
    )
    torch.testing.assert_close(flat.pos[:, 320:], expected)
    # Valid ratios: valid size / padded size, (x, y) order.
    expected_ratios = torch.tensor([[w / W, h / H] for (h, w), (H, W) in zip(ALONE, PADDED, strict=True)])
    torch.testing.assert_close(flat.valid_ratios[1], expected_ratios)
    torch.testing.assert_close(flat.valid_ratios[0], torch.ones(3, 2))


def test_valid_ratios_from_mask_brute_force_and_errors():
    mask = rect_mask((3, 5, 7), [(5, 7), (2, 3), (5, 1)])
    expected = torch.tensor([[1.0, 1.0], [3 / 7, 2 / 5], [1 / 7, 1.0]])
    torch.testing.assert_close(valid_ratios_from_mask(mask), expected)
    with pytest.raises(ValueError, match="top-left"):
        bad = mask.clone()
        bad[0, 0, 0] = True  # a hole is not bottom/right padding
        valid_ratios_from_mask(bad)
    with pytest.raises(ValueError, match="all padding"):
        valid_ratios_from_mask(torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        valid_ratios_from_mask(mask.float())


def test_flatten_levels_errors():
    f = [torch.zeros(1, C, 4, 4)]
    m = [torch.zeros(1, 4, 4, dtype=torch.bool)]
    with pytest.raises(ValueError, match="same non-zero number of levels"):
        flatten_levels(f, m, [])
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        flatten_levels(f, [torch.zeros(1, 4, 5, dtype=torch.bool)], f)
    with pytest.raises(ValueError, match=r"pos\[0\]"):
        flatten_levels(f, m, [torch.zeros(1, C, 4, 5)])
    with pytest.raises(ValueError, match="level_embed must be"):
        flatten_levels(f, m, f, torch.zeros(2, C))


# ---------------------------------------------------------------- reference points


def test_encoder_reference_points_pixel_centres_and_range():
    gen = torch.Generator().manual_seed(1)
    flat = make_levels(PADDED, [PADDED, ALONE], gen)
    ref = encoder_reference_points(flat.spatial_shapes, flat.valid_ratios)
    assert ref.shape == (2, 336, 3, 2)
    for b in range(2):
        for lvl, (H, W) in enumerate(PADDED):
            start = flat.level_start_index[lvl]
            for row in range(H):
                for col in range(W):
                    idx = start + row * W + col
                    # Same level: the ratios cancel, the point is the pixel centre in the padded frame.
                    own = ref[b, idx, lvl]
                    assert abs(own[0].item() - (col + 0.5) / W) < 1e-6
                    assert abs(own[1].item() - (row + 0.5) / H) < 1e-6
                    if not flat.mask[b, idx]:
                        assert 0.0 <= ref[b, idx].min() and ref[b, idx].max() <= 1.0
    # Across levels, in pixels of level l': (col + 0.5) * V_l' / V_l -- the valid sizes only.
    V = torch.tensor([[w, h] for h, w in ALONE], dtype=torch.float32)  # (L, 2) (x, y)
    idx = 5 * 16 + 9  # level 0, row 5, col 9
    px = ref[1, idx] * torch.tensor(
        [[w, h] for h, w in PADDED], dtype=torch.float32
    )  # (L, 2) in level pixels
    torch.testing.assert_close(px, torch.tensor([9.5, 5.5]) * V / V[0])


def test_encoder_reference_points_without_padding_is_the_plain_grid():
    shapes = torch.tensor([[3, 5], [2, 2]])
    ref = encoder_reference_points(shapes, torch.ones(1, 2, 2))
    grid0 = torch.tensor([[(j + 0.5) / 5, (i + 0.5) / 3] for i in range(3) for j in range(5)])
    torch.testing.assert_close(ref[0, :15, 0], grid0)
    torch.testing.assert_close(ref[0, :15, 1], grid0)  # same normalised point on the other level
    with pytest.raises(ValueError, match="valid_ratios must be"):
        encoder_reference_points(shapes, torch.ones(1, 3, 2))


def test_decoder_reference_points_scale_by_ratios():
    ratios = torch.tensor([[[0.5, 0.25], [1.0, 0.5]]])  # (B=1, L=2, 2)
    pts = torch.tensor([[[0.4, 0.8]]])
    torch.testing.assert_close(
        decoder_reference_points(pts, ratios), torch.tensor([[[[0.2, 0.2], [0.4, 0.4]]]])
    )
    boxes = torch.tensor([[[0.4, 0.8, 0.2, 0.4]]])
    out = decoder_reference_points(boxes, ratios)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.2, 0.2, 0.1, 0.1]))
    with pytest.raises(ValueError, match="reference_points must be"):
        decoder_reference_points(torch.zeros(1, 2, 3), ratios)
    with pytest.raises(ValueError, match="valid_ratios must be"):
        decoder_reference_points(pts, torch.ones(2, 2, 2))


def test_apply_box_delta():
    gen = torch.Generator().manual_seed(2)
    ref = torch.rand(2, 5, 4, generator=gen) * 0.8 + 0.1
    torch.testing.assert_close(apply_box_delta(torch.zeros(2, 5, 4), ref), ref)
    delta = torch.randn(2, 5, 4, generator=gen)
    logit = torch.log(ref / (1 - ref))
    torch.testing.assert_close(apply_box_delta(delta, ref), torch.sigmoid(delta + logit))
    out2 = apply_box_delta(delta, ref[..., :2])
    torch.testing.assert_close(out2[..., :2], torch.sigmoid(delta[..., :2] + logit[..., :2]))
    torch.testing.assert_close(out2[..., 2:], torch.sigmoid(delta[..., 2:]))
    with pytest.raises(ValueError, match="delta must be"):
        apply_box_delta(delta[..., :3], ref)


# ---------------------------------------------------------------- padded vs alone


def alone_and_padded(gen):
    """The same 90 x 100 image's pyramid alone (B=1) and as image 1 of a padded 128 x 128 batch."""
    level_embed = torch.randn(3, C, generator=gen)
    alone_feats = [torch.randn(1, C, h, w, generator=gen) for h, w in ALONE]
    padded_feats = []
    for (H, W), (h, w), f in zip(PADDED, ALONE, alone_feats, strict=True):
        big = torch.randn(2, C, H, W, generator=gen) * 5  # garbage in the padding: must not matter
        big[1, :, :h, :w] = f[0]
        padded_feats.append(big)
    alone = make_levels(ALONE, [ALONE], gen, level_embed, alone_feats)
    padded = make_levels(PADDED, [PADDED, ALONE], gen, level_embed, padded_feats)
    return alone, padded


def valid_tokens(flat, b):
    return ~flat.mask[b]


def run_encoder(enc, flat, valid_ratios=None):
    return enc(
        flat.src,
        pos=flat.pos,
        key_padding_mask=flat.mask,
        spatial_shapes=flat.spatial_shapes,
        level_start_index=flat.level_start_index,
        valid_ratios=flat.valid_ratios if valid_ratios is None else valid_ratios,
    )


def test_encoder_padded_equals_alone_on_valid_region():
    gen = torch.Generator().manual_seed(3)
    alone, padded = alone_and_padded(gen)
    enc = randomize(encoder(), gen)
    with torch.no_grad():
        out_alone = run_encoder(enc, alone)  # (1, Nv_alone, C)
        out_padded = run_encoder(enc, padded)  # (2, Nv, C)
    torch.testing.assert_close(out_padded[1][valid_tokens(padded, 1)], out_alone[0], atol=1e-5, rtol=1e-5)
    # Q4: without valid ratios the padded image samples elsewhere on the other levels.
    with torch.no_grad():
        out_no_ratio = run_encoder(enc, padded, torch.ones_like(padded.valid_ratios))
    gap = (out_no_ratio[1][valid_tokens(padded, 1)] - out_alone[0]).abs().max()
    assert gap > 1e-2


def test_decoder_padded_equals_alone_with_refinement():
    gen = torch.Generator().manual_seed(4)
    alone, padded = alone_and_padded(gen)
    enc = randomize(encoder(), gen)
    # the course's padding-invariant query positions (image frame); official DINO's level-0 frame is not
    dec = randomize(decoder(query_pos_frame="image"), gen)
    heads = randomize(
        nn.ModuleList(MLP(input_dim=C, hidden_dim=C, output_dim=4, num_layers=2) for _ in range(3)), gen
    )
    qpos = randomize(QueryPositionFromBox(embed_dim=C, box_dim=4), gen)
    Nq = 6
    query = torch.randn(1, Nq, C, generator=gen)
    ref = torch.rand(1, Nq, 4, generator=gen) * 0.6 + 0.2
    outs = {}
    with torch.no_grad():
        for name, flat, b in (("alone", alone, 0), ("padded", padded, 1)):
            memory = run_encoder(enc, flat)
            B = flat.src.shape[0]
            decoded = dec(
                query.expand(B, -1, -1),
                reference_points=ref.expand(B, -1, -1),
                memory=memory,
                memory_mask=flat.mask,
                spatial_shapes=flat.spatial_shapes,
                level_start_index=flat.level_start_index,
                valid_ratios=flat.valid_ratios,
                bbox_embed=heads,
                query_pos_from_ref=qpos,
            )
            outs[name] = [t[:, b] for t in (decoded.inter_states, torch.stack(decoded.inter_references))]
    for a, p in zip(outs["alone"], outs["padded"], strict=True):
        torch.testing.assert_close(p, a, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs["alone"][1][1], outs["alone"][1][0])  # refinement moved the boxes


# ---------------------------------------------------------------- decoder semantics and gradients


def decode(dec, flat, memory, query, ref, **kwargs):
    """(inter_states, inter_references), and the sampling too when it is asked for."""
    out = dec(
        query,
        reference_points=ref,
        memory=memory,
        memory_mask=flat.mask,
        spatial_shapes=flat.spatial_shapes,
        level_start_index=flat.level_start_index,
        valid_ratios=flat.valid_ratios,
        **kwargs,
    )
    assert isinstance(out, DecoderOutput) and (out.sampling is not None) == kwargs.get(
        "return_sampling", False
    )
    refs = out.inter_references
    refs = torch.stack(refs) if len({r.shape for r in refs}) == 1 else refs  # (Ld, B, Nq, D) when uniform
    if out.sampling is not None:
        return out.inter_states, refs, out.sampling
    return out.inter_states, refs


def test_every_parameter_gets_a_gradient():
    gen = torch.Generator().manual_seed(5)
    flat = make_levels(PADDED, [PADDED, ALONE], gen)
    enc, dec = encoder().train(), decoder().train()
    heads = nn.ModuleList(MLP(input_dim=C, hidden_dim=C, output_dim=4, num_layers=2) for _ in range(3))
    qpos = QueryPositionFromBox(embed_dim=C, box_dim=4)
    memory = run_encoder(enc, flat)
    query = torch.randn(2, 5, C, generator=gen)
    ref = torch.rand(2, 5, 4, generator=gen) * 0.6 + 0.2
    states, refs = decode(dec, flat, memory, query, ref, bbox_embed=heads, query_pos_from_ref=qpos)
    boxes = torch.stack(
        [apply_box_delta(heads[i](states[i]), refs[i]) for i in range(3)]
    )  # as chapter 04 does
    (boxes.sum() + states.pow(2).mean()).backward()
    for module in (enc, dec, heads, qpos):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_refinement_references_and_look_forward_twice():
    """Without post_norm the refined reference is the loss box of the layer before (Deformable DETR);
    with it (DINO) the reference is refined from the raw output, the loss box from the normalised one."""
    gen = torch.Generator().manual_seed(6)
    flat = make_levels(PADDED, [PADDED, ALONE], gen)
    memory = torch.randn(2, flat.src.shape[1], C, generator=gen)
    dec = randomize(decoder(post_norm=False), gen)
    heads = randomize(
        nn.ModuleList(MLP(input_dim=C, hidden_dim=C, output_dim=4, num_layers=2) for _ in range(3)), gen
    )
    query = torch.randn(2, 5, C, generator=gen)
    ref = torch.rand(2, 5, 4, generator=gen) * 0.6 + 0.2

    # Without refinement every layer is built on the initial reference.
    _, refs = decode(dec, flat, memory, query, ref)
    torch.testing.assert_close(refs, ref.expand(3, -1, -1, -1))

    grads, values = {}, {}
    for lft in (False, True):
        dec.zero_grad()
        heads.zero_grad()
        states, refs = decode(dec, flat, memory, query, ref, bbox_embed=heads, look_forward_twice=lft)
        boxes = [apply_box_delta(heads[i](states[i]), refs[i]) for i in range(3)]
        torch.testing.assert_close(refs[1], boxes[0].detach())  # layer 1 is built on layer 0's box
        torch.testing.assert_close(refs[2], boxes[1].detach())
        boxes[1].sum().backward()  # layer 1's box loss only
        values[lft] = torch.stack(boxes).detach()
        grads[lft] = heads[0].layers[0].weight.grad
    torch.testing.assert_close(values[False], values[True])  # same forward values
    normed = randomize(decoder(post_norm=True), torch.Generator().manual_seed(6))
    states, refs = decode(normed, flat, memory, query, ref, bbox_embed=heads)
    assert not torch.allclose(refs[1], apply_box_delta(heads[0](states[0]), refs[0]))  # raw, not normed
    assert grads[False] is None or grads[False].abs().sum() == 0  # detached: layer 0's head untouched
    assert grads[True].abs().sum() > 0  # DINO: look forward twice trains layer 0's head from layer 1


def test_point_references_become_boxes():
    """Official Deformable DETR: after the first refinement a point reference is the refined 4-d box
    (its w, h the head's sigmoid), so later layers sample box-relative offsets."""
    gen = torch.Generator().manual_seed(7)
    flat = make_levels(PADDED, [PADDED, ALONE], gen)
    memory = torch.randn(2, flat.src.shape[1], C, generator=gen)
    heads = randomize(
        nn.ModuleList(MLP(input_dim=C, hidden_dim=C, output_dim=4, num_layers=2) for _ in range(3)), gen
    )
    points = torch.rand(2, 5, 2, generator=gen) * 0.6 + 0.2
    dec = randomize(decoder(post_norm=False), gen)
    states, refs, sampling = decode(
        dec, flat, memory, torch.randn(2, 5, C), points, bbox_embed=heads, return_sampling=True
    )
    assert states.shape == (3, 2, 5, C)
    assert [tuple(r.shape) for r in refs] == [(2, 5, 2), (2, 5, 4), (2, 5, 4)]
    torch.testing.assert_close(refs[0], points)
    torch.testing.assert_close(refs[1], apply_box_delta(heads[0](states[0]), points).detach())
    assert len(sampling) == 3


def test_self_attn_mask_isolates_groups():
    gen = torch.Generator().manual_seed(8)
    flat = make_levels(PADDED, [PADDED, ALONE], gen)
    memory = torch.randn(2, flat.src.shape[1], C, generator=gen)
    dec = randomize(decoder(), gen)
    heads = randomize(
        nn.ModuleList(MLP(input_dim=C, hidden_dim=C, output_dim=4, num_layers=2) for _ in range(3)), gen
    )
    query = torch.randn(2, 6, C, generator=gen)
    ref = torch.rand(2, 6, 4, generator=gen) * 0.6 + 0.2
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = group[:, None] != group[None, :]  # (Nq, Nq) True = blocked: two groups that cannot see each other
    query2 = query.clone()
    query2[:, 3:] += 1.0  # change group 1 only
    with torch.no_grad():
        s1, r1 = decode(dec, flat, memory, query, ref, self_attn_mask=mask, bbox_embed=heads)
        s2, r2 = decode(dec, flat, memory, query2, ref, self_attn_mask=mask, bbox_embed=heads)
        s3, _ = decode(dec, flat, memory, query2, ref, bbox_embed=heads)
    torch.testing.assert_close(s1[:, :, :3], s2[:, :, :3])
    torch.testing.assert_close(r1[:, :, :3], r2[:, :, :3])
    assert not torch.allclose(s1[:, :, :3], s3[:, :, :3])  # unmasked, group 0 sees the change


def test_return_sampling_locations_within_reference_frame():
    gen = torch.Generator().manual_seed(9)
    flat = make_levels(PADDED, [PADDED, ALONE], gen)
    memory = torch.randn(2, flat.src.shape[1], C, generator=gen)
    states, refs, sampling = decode(
        decoder(), flat, memory, torch.randn(2, 5, C), torch.rand(2, 5, 4), return_sampling=True
    )
    assert len(sampling) == 3
    locations, weights = sampling[0]
    assert locations.shape == (2, 5, NH, 3, P, 2) and weights.shape == (2, 5, NH, 3, P)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 5, NH))


def test_decoder_errors():
    gen = torch.Generator().manual_seed(10)
    flat = make_levels(PADDED, [PADDED, ALONE], gen)
    memory = torch.randn(2, flat.src.shape[1], C, generator=gen)
    dec = decoder()
    q, ref = torch.randn(2, 5, C), torch.rand(2, 5, 4)
    with pytest.raises(ValueError, match="reference_points must be"):
        decode(dec, flat, memory, q, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="query must be"):
        decode(dec, flat, memory, torch.randn(2, 5, C + 1), ref)
    with pytest.raises(ValueError, match="not both"):
        decode(dec, flat, memory, q, ref, query_pos=q, query_pos_from_ref=QueryPositionFromBox(embed_dim=C))
    with pytest.raises(ValueError, match="one head per layer"):
        decode(dec, flat, memory, q, ref, bbox_embed=nn.ModuleList([nn.Linear(C, 4)]))
    with pytest.raises(ValueError, match="look_forward_twice needs bbox_embed"):
        decode(dec, flat, memory, q, ref, look_forward_twice=True)
    with pytest.raises(ValueError, match="self_attn_mask must be"):
        decode(dec, flat, memory, q, ref, self_attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="sum to"):  # from the deformable attention's own checks
        decode(dec, flat, memory[:, :-1], q, ref)
    with pytest.raises(ValueError, match="src must be"):
        encoder()(
            flat.src[..., :-1],
            pos=None,
            key_padding_mask=None,
            spatial_shapes=flat.spatial_shapes,
            level_start_index=flat.level_start_index,
            valid_ratios=flat.valid_ratios,
        )
    with pytest.raises(ValueError, match="num_layers"):
        DeformableEncoder(num_layers=0)
