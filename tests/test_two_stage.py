"""Tests of detr_edu.two_stage: proposals per encoder pixel, validity, top-K selection."""

from __future__ import annotations

import pytest
import torch

from detr_edu.backbone import level_masks
from detr_edu.two_stage import TwoStageProposer, encoder_proposals


def _flat_mask(valid_hw: list[tuple[int, int]], shapes: list[tuple[int, int]]) -> torch.Tensor:
    """(B, Nv) padding mask for images whose valid size per level is given (top-left rectangles)."""
    rows = []
    for h, w in valid_hw:
        levels = []
        for H, W in shapes:
            m = torch.ones(H, W, dtype=torch.bool)
            m[: min(h, H), : min(w, W)] = False
            levels.append(m.flatten())
            h, w = (h + 1) // 2, (w + 1) // 2
        rows.append(torch.cat(levels))
    return torch.stack(rows)


def test_proposals_brute_force() -> None:
    shapes = [(6, 8), (3, 4), (2, 2)]
    spatial_shapes = torch.tensor(shapes)
    mask = _flat_mask([(6, 8), (4, 5)], shapes)
    props = encoder_proposals(mask, spatial_shapes, base_size=0.05, border=0.01)
    assert props.boxes_cxcywh.shape == (2, 6 * 8 + 3 * 4 + 2 * 2, 4)
    for b in range(2):
        k = 0
        for lvl, (H, W) in enumerate(shapes):
            m = mask[b, k : k + H * W].view(H, W)
            vh, vw = int((~m[:, 0]).sum()), int((~m[0]).sum())
            for i in range(H):
                for j in range(W):
                    expected = [(j + 0.5) / vw, (i + 0.5) / vh, 0.05 * 2**lvl, 0.05 * 2**lvl]
                    torch.testing.assert_close(props.boxes_cxcywh[b, k], torch.tensor(expected))
                    inside = all(0.01 < v < 0.99 for v in expected)
                    assert bool(props.valid[b, k]) == (inside and not bool(m[i, j]))
                    assert int(props.level[k]) == lvl
                    k += 1


def test_near_border_proposals_are_invalid() -> None:
    # one level of 100 x 100: centres at 0.005 and 0.995 are closer than 0.01 to the border
    mask = torch.zeros(1, 100 * 100, dtype=torch.bool)
    props = encoder_proposals(mask, torch.tensor([[100, 100]]))
    valid = props.valid.view(100, 100)
    assert not valid[0].any() and not valid[-1].any() and not valid[:, 0].any() and not valid[:, -1].any()
    assert valid[1:-1, 1:-1].all()


def test_proposals_are_normalised_to_the_valid_image() -> None:
    """A padded image gets the same proposal boxes on its valid pixels as the image alone."""
    shapes_alone, shapes_pad = [(5, 6), (3, 3)], [(8, 8), (4, 4)]
    alone = encoder_proposals(_flat_mask([(5, 6)], shapes_alone), torch.tensor(shapes_alone))
    padded_mask = _flat_mask([(5, 6)], shapes_pad)
    padded = encoder_proposals(padded_mask, torch.tensor(shapes_pad))
    torch.testing.assert_close(padded.boxes_cxcywh[~padded_mask], alone.boxes_cxcywh[0])


def test_selection_never_picks_padding() -> None:
    """With ``exclude_invalid`` (the course's option) padded tokens carry huge features (they would win
    an unmasked top-K); none is ever selected."""
    torch.manual_seed(0)
    shapes = [(8, 8), (4, 4), (2, 2)]
    mask = _flat_mask([(8, 8), (3, 5), (6, 2)], shapes)
    proposer = TwoStageProposer(embed_dim=32, num_classes=5, num_queries=12, exclude_invalid=True)
    memory = torch.randn(3, mask.shape[1], 32)
    memory[mask] = 1e4 * torch.randn(int(mask.sum()), 32)
    out = proposer(memory, mask, torch.tensor(shapes))
    assert out.topk_index.shape == (3, 12)
    assert out.proposals.valid.gather(1, out.topk_index).all()
    assert not mask.gather(1, out.topk_index).any()
    assert torch.isfinite(out.boxes_cxcywh).all()
    # scores are sorted and the gathered rows are the right ones
    scores = out.scores.gather(1, out.topk_index)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    for b in range(3):
        torch.testing.assert_close(out.topk_logits[b], out.logits[b, out.topk_index[b]])
        torch.testing.assert_close(out.topk_boxes_cxcywh[b], out.boxes_cxcywh[b, out.topk_index[b]])
        torch.testing.assert_close(out.topk_memory[b], out.memory[b, out.topk_index[b]])
    enc = out.enc_outputs()
    assert enc["pred_logits"].shape == (3, 12, 5) and enc["pred_boxes"].shape == (3, 12, 4)
    enc = out.enc_outputs(all_tokens=True)
    assert enc["pred_logits"].shape == (3, mask.shape[1], 5)


def test_published_selection_can_pick_padding_and_gives_it_unit_boxes() -> None:
    """The published rule (no exclusion): the zeroed padded memory scores too and is selected here;
    an invalid token's proposal is +inf in logit space, so its box is exactly 1; ``exclude_invalid``
    on the same memory selects none."""
    torch.manual_seed(0)
    shapes = [(8, 8), (4, 4)]
    mask = _flat_mask([(3, 3)], shapes)
    memory = torch.randn(1, mask.shape[1], 32)
    published = TwoStageProposer(embed_dim=32, num_classes=5, num_queries=8)
    torch.manual_seed(1)
    course = TwoStageProposer(embed_dim=32, num_classes=5, num_queries=8, exclude_invalid=True)
    course.load_state_dict(published.state_dict())
    out = published(memory, mask, torch.tensor(shapes))
    assert mask.gather(1, out.topk_index).any()
    invalid = ~out.proposals.valid
    assert (out.boxes_cxcywh[invalid] == 1).all() and torch.isfinite(out.scores).all()
    kept = course(memory, mask, torch.tensor(shapes))
    assert not mask.gather(1, kept.topk_index).any()


def test_class0_score_ranks_by_the_first_logit() -> None:
    """Deformable DETR ranks by ``logits[..., 0]`` (its class-agnostic encoder head), DINO by the max."""
    torch.manual_seed(0)
    shapes = [(6, 6)]
    mask = torch.zeros(2, 36, dtype=torch.bool)
    memory = torch.randn(2, 36, 16)
    first = TwoStageProposer(embed_dim=16, num_classes=4, num_queries=5, score="class0")
    best = TwoStageProposer(embed_dim=16, num_classes=4, num_queries=5, score="max")
    best.load_state_dict(first.state_dict())
    a, b = first(memory, mask, torch.tensor(shapes)), best(memory, mask, torch.tensor(shapes))
    torch.testing.assert_close(a.scores, a.logits[..., 0])
    torch.testing.assert_close(b.scores, b.logits.max(-1).values)
    assert not torch.equal(a.topk_index, b.topk_index)


def test_level_masks_feed_proposals() -> None:
    """Masks from backbone.level_masks flattened are accepted and give the expected valid counts."""
    image_mask = torch.ones(1, 64, 64, dtype=torch.bool)
    image_mask[0, :40, :24] = False
    masks = level_masks(image_mask, [(8, 8), (4, 4)], [8, 16])
    flat = torch.cat([m.flatten(1) for m in masks], 1)
    props = encoder_proposals(flat, torch.tensor([[8, 8], [4, 4]]))
    assert int((~flat).sum()) == 5 * 3 + 3 * 2
    assert not (props.valid & flat).any()


def test_errors() -> None:
    proposer = TwoStageProposer(embed_dim=16, num_classes=3, num_queries=10, exclude_invalid=True)
    mask = torch.zeros(1, 4 * 4, dtype=torch.bool)
    mask.view(1, 4, 4)[:, 2:] = True
    with pytest.raises(ValueError, match="needs num_queries=10 valid encoder positions"):
        proposer(torch.randn(1, 16, 16), mask, torch.tensor([[4, 4]]))
    with pytest.raises(ValueError, match="sum to 16 tokens but the mask has 15"):
        encoder_proposals(torch.zeros(1, 15, dtype=torch.bool), torch.tensor([[4, 4]]))
    with pytest.raises(ValueError, match=r"padding_mask must be \(B, Nv\) bool"):
        encoder_proposals(torch.zeros(1, 16), torch.tensor([[4, 4]]))
    with pytest.raises(ValueError, match="disagree"):
        proposer(torch.randn(1, 15, 16), torch.zeros(1, 16, dtype=torch.bool), torch.tensor([[4, 4]]))
    published = TwoStageProposer(embed_dim=16, num_classes=3, num_queries=20)
    with pytest.raises(ValueError, match="needs num_queries=20 encoder positions"):
        published(torch.randn(1, 16, 16), mask, torch.tensor([[4, 4]]))
    with pytest.raises(ValueError, match="score must be"):
        TwoStageProposer(embed_dim=16, num_classes=3, num_queries=10, score="best")
