"""Tests for detr_edu.position: sine embeddings against a per-pixel formula, level and box embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from detr_edu.position import (
    LevelEmbedding,
    PositionEmbeddingSine,
    QueryPositionFromBox,
    box_sine_embedding,
    resize_mask,
    sine_position_embedding,
)


def direct_sine(t: float, F: int, T: float = 10000.0) -> torch.Tensor:
    """One coordinate's F channels, written out: sin/cos pairs sharing frequency T^(2k/F)."""
    out = torch.empty(F, dtype=torch.float64)
    for c in range(F):
        freq = T ** (2 * (c // 2) / F)
        out[c] = math.sin(t / freq) if c % 2 == 0 else math.cos(t / freq)
    return out


@pytest.mark.parametrize("offset", [0.0, -0.5])
def test_sine_embedding_equals_per_pixel_formula(offset):
    F = 6
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, :, :] = False
    mask[1, :3, :2] = False  # image 1 is 3 x 2 inside a 4 x 5 canvas
    pos = sine_position_embedding(mask, num_pos_feats=F, offset=offset)
    assert pos.shape == (2, 2 * F, 4, 5)
    for b, (h, w) in enumerate([(4, 5), (3, 2)]):
        for i in range(4):
            for j in range(5):
                if i >= h or j >= w:
                    assert pos[b, :, i, j].abs().max() == 0  # padding gets zeros
                    continue
                y = (i + 1 + offset) / (h + 1e-6) * 2 * math.pi
                x = (j + 1 + offset) / (w + 1e-6) * 2 * math.pi
                expected = torch.cat([direct_sine(y, F), direct_sine(x, F)]).float()
                torch.testing.assert_close(pos[b, :, i, j], expected, atol=1e-5, rtol=1e-5)


def test_sine_embedding_unnormalised_uses_pixel_counts():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = sine_position_embedding(mask, num_pos_feats=4, normalize=False)
    torch.testing.assert_close(pos[0, :4, 1, 2], direct_sine(2.0, 4).float())  # y = row + 1
    torch.testing.assert_close(pos[0, 4:, 1, 2], direct_sine(3.0, 4).float())  # x = column + 1


def test_padded_equals_alone_on_valid_region():
    alone = sine_position_embedding(torch.zeros(1, 5, 7, dtype=torch.bool), num_pos_feats=8, offset=-0.5)
    mask = torch.ones(1, 9, 11, dtype=torch.bool)
    mask[0, :5, :7] = False
    padded = sine_position_embedding(mask, num_pos_feats=8, offset=-0.5)
    torch.testing.assert_close(padded[:, :, :5, :7], alone)


def test_module_matches_function_and_self_similarity_is_highest():
    mask = torch.zeros(1, 1, 32, dtype=torch.bool)
    module = PositionEmbeddingSine(num_pos_feats=32, offset=-0.5)
    pos = module(mask)
    torch.testing.assert_close(pos, sine_position_embedding(mask, num_pos_feats=32, offset=-0.5))
    row = pos[0, 32:, 0, :].T  # (W, F) x-channels along the row
    sim = row @ row.T  # (W, W)
    assert torch.equal(sim.argmax(1), torch.arange(32))  # every pixel is most similar to itself


def test_box_sine_embedding_matches_image_embedding_at_pixel_centres():
    H, W, F = 4, 6, 8
    img = sine_position_embedding(torch.zeros(1, H, W, dtype=torch.bool), num_pos_feats=F, offset=-0.5)
    centres = torch.tensor(
        [[(j + 0.5) / W, (i + 0.5) / H] for i in range(H) for j in range(W)]
    )  # (H*W, 2) x, y
    emb = box_sine_embedding(centres, num_pos_feats=F)  # (H*W, 2F)
    torch.testing.assert_close(emb, img[0].flatten(1).T, atol=1e-5, rtol=1e-5)


def test_box_sine_embedding_layout_for_boxes():
    box = torch.tensor([0.2, 0.7, 0.3, 0.1])  # cx, cy, w, h
    emb = box_sine_embedding(box, num_pos_feats=4, temperature=20.0)
    two_pi = 2 * math.pi
    expected = torch.cat(
        [direct_sine(v * two_pi, 4, 20.0) for v in (0.7, 0.2, 0.3, 0.1)]
    ).float()  # y, x, w, h
    torch.testing.assert_close(emb, expected)


def test_level_embedding_adds_one_vector_per_level():
    torch.manual_seed(0)
    emb = LevelEmbedding(num_levels=2, embed_dim=3)
    pos = [torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 1, 1)]
    out = emb(pos)
    torch.testing.assert_close(out[0][0, :, 1, 0], emb.weight[0].detach())
    torch.testing.assert_close(out[1][0, :, 0, 0], 1 + emb.weight[1].detach())
    with pytest.raises(ValueError, match="levels"):
        emb(pos[:1])


def test_query_position_from_box_shapes_and_gradient():
    torch.manual_seed(0)
    head = QueryPositionFromBox(embed_dim=16, box_dim=4)
    boxes = torch.rand(2, 5, 4, requires_grad=True)
    out = head(boxes)
    assert out.shape == (2, 5, 16)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert boxes.grad.abs().sum() > 0
    assert QueryPositionFromBox(embed_dim=16, box_dim=2)(torch.rand(2, 5, 2)).shape == (2, 5, 16)


def test_resize_mask_keeps_ceil_of_valid_fraction():
    mask = torch.ones(1, 128, 128, dtype=torch.bool)
    mask[0, :90, :100] = False
    for size in [(16, 16), (8, 8), (4, 4), (2, 2)]:
        small = resize_mask(mask, size)
        h, w = size
        # nearest: output pixel j copies input pixel floor(j * 128 / w)
        brute = torch.stack(
            [torch.stack([mask[0, i * 128 // h, j * 128 // w] for j in range(w)]) for i in range(h)]
        )
        assert torch.equal(small[0], brute)
        assert int((~small[0, 0]).sum()) == math.ceil(100 * w / 128)
        assert int((~small[0, :, 0]).sum()) == math.ceil(90 * h / 128)


def test_bad_inputs():
    with pytest.raises(ValueError, match="boolean"):
        sine_position_embedding(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="even"):
        sine_position_embedding(torch.zeros(1, 2, 2, dtype=torch.bool), num_pos_feats=5)
    with pytest.raises(ValueError, match="must end in 2"):
        box_sine_embedding(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="box_dim"):
        QueryPositionFromBox(embed_dim=16, box_dim=3)
    with pytest.raises(ValueError, match="expected boxes ending in 4"):
        QueryPositionFromBox(embed_dim=16)(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="boolean"):
        resize_mask(torch.zeros(1, 4, 4), (2, 2))
