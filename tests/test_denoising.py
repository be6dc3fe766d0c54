"""Tests of contrastive denoising: the attention mask (vs a brute-force loop), the mask's effect on a
full DINO (perturbation invariance), noise bounds, label flip rate, layout and group count, batches
without targets, and the ``_dn`` losses of SetCriterion (vs a hand-written focal loss)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from detr_edu.box_ops import box_cxcywh_to_xyxy
from detr_edu.config import BackboneConfig, DINOConfig
from detr_edu.criterion import SetCriterion
from detr_edu.denoising import (
    PAD_BOX,
    ContrastiveDenoising,
    DenoisingMeta,
    denoising_attn_mask,
    denoising_groups,
    denoising_indices,
    make_noised_targets,
    noise_boxes,
    noise_labels,
)
from detr_edu.dino import DINO
from detr_edu.matcher import HungarianMatcher

K = 5


def _targets(counts: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for G in counts:
        centre = torch.rand(G, 2, generator=g) * 0.5 + 0.25
        size = torch.rand(G, 2, generator=g) * 0.2 + 0.1
        out.append({"labels": torch.randint(0, K, (G,), generator=g), "boxes": torch.cat([centre, size], -1)})
    return out


def _brute_force_mask(groups: int, single_pad: int, Nq: int) -> torch.Tensor:
    Nd = 2 * groups * single_pad
    mask = torch.zeros(Nd + Nq, Nd + Nq, dtype=torch.bool)
    for i in range(Nd + Nq):
        for j in range(Nd + Nq):
            i_dn, j_dn = i < Nd, j < Nd
            if not i_dn and j_dn:
                mask[i, j] = True  # matching must not see denoising
            elif i_dn and j_dn and i // (2 * single_pad) != j // (2 * single_pad):
                mask[i, j] = True  # groups must not see each other
    return mask


@pytest.mark.parametrize("seed", range(5))
def test_mask_matches_brute_force_for_random_batches(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
    counts[0] = max(counts[0], 1)
    dn_number = int(torch.randint(1, 12, (1,), generator=g))
    Nq = int(torch.randint(0, 6, (1,), generator=g))
    noised = make_noised_targets(
        _targets(counts, seed),
        dn_number=dn_number,
        num_classes=K,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        generator=g,
    )
    mask = denoising_attn_mask(groups=noised.groups, single_pad=noised.single_pad, num_queries=Nq)
    Nd = noised.num_queries
    assert torch.equal(mask, _brute_force_mask(noised.groups, noised.single_pad, Nq))
    assert mask[Nd:, :Nd].all()  # matching -> denoising blocked
    assert not mask[:, Nd:].any()  # everyone sees the matching queries
    assert not mask.diagonal().any()  # no query is blind to itself (softmax over nothing)


def test_groups_layout_and_indices() -> None:
    g = torch.Generator().manual_seed(0)
    targets = _targets([3, 1, 0])
    noised = make_noised_targets(
        targets, dn_number=60, num_classes=K, label_noise_ratio=0.0, box_noise_scale=0.0, generator=g
    )
    # dn_number 60 >= 50: 60 // 3 = 20 groups of 2 x 3 queries
    assert (noised.groups, noised.single_pad, noised.num_queries) == (20, 3, 120)
    assert noised.labels.shape == (3, 120) and noised.boxes_cxcywh.shape == (3, 120, 4)
    assert noised.positive.tolist() == ([True] * 3 + [False] * 3) * 20
    assert noised.valid[0].all() and not noised.valid[2].any()
    assert noised.valid[1].tolist() == [True, False, False] * 40
    # padded queries: label -1, box (0.5, 0.5, 0.5, 0.5)
    assert (noised.labels[~noised.valid] == -1).all()
    assert (noised.boxes_cxcywh[~noised.valid] == PAD_BOX).all()
    # without noise every real slot is an exact copy of its target (positives and negatives)
    for b, t in enumerate(targets):
        q, j = noised.indices[b]
        assert len(q) == 20 * len(t["labels"])
        torch.testing.assert_close(noised.boxes_cxcywh[b, q], t["boxes"][j])
        assert torch.equal(noised.labels[b, q], t["labels"][j])
        assert noised.positive[q].all()
        torch.testing.assert_close(noised.boxes_cxcywh[b, q + 3], t["boxes"][j])  # the negative copy


def test_group_count() -> None:
    """DINO's rule (prepare_for_cdn): dn_number doubled; from 100 on divided by 2 x the most targets,
    below it taken as the group count."""
    assert denoising_groups(100, 7) == 14
    assert denoising_groups(50, 9) == 5
    assert denoising_groups(60, 100) == 1  # more targets than the budget: still one group
    assert denoising_groups(49, 9) == 98  # the small-dn_number branch: 2 x dn_number groups
    assert denoising_groups(5, 1) == 10
    assert denoising_groups(100, 0) == 0
    with pytest.raises(ValueError, match="dn_number must be >= 1"):
        denoising_groups(0, 3)


def test_indices_vs_loop() -> None:
    indices = denoising_indices([2, 0, 3], groups=2, single_pad=3)
    for (q, j), G in zip(indices, [2, 0, 3], strict=True):
        expected = [(g * 6 + t, t) for g in range(2) for t in range(G)]
        assert list(zip(q.tolist(), j.tolist(), strict=True)) == expected
    with pytest.raises(ValueError, match="4 targets but single_pad is 3"):
        denoising_indices([4], groups=1, single_pad=3)


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_box_noise_bounds(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    N = 4000
    boxes = torch.cat([torch.rand(N, 2, generator=g), torch.rand(N, 2, generator=g) * 0.5 + 0.01], -1)
    negative = torch.arange(N) % 2 == 1
    moved = noise_boxes(boxes, negative, box_noise_scale=scale, generator=g) - box_cxcywh_to_xyxy(boxes)
    half = (boxes[:, 2:] / 2).repeat(1, 2) * scale  # (N, 4)
    ratio = moved.abs() / half  # (N, 4) in units of lambda * half side
    assert (ratio[~negative] < 1 + 1e-5).all()
    assert (ratio[negative] >= 1 - 1e-5).all() and (ratio[negative] < 2 + 1e-5).all()
    # both signs, and the whole range is used
    assert (moved > 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert ratio[~negative].max() > 0.99 and ratio[negative].min() < 1.01 and ratio[negative].max() > 1.99


def test_noised_boxes_are_valid_and_inside_the_image() -> None:
    g = torch.Generator().manual_seed(1)
    noised = make_noised_targets(
        _targets([6, 2]), dn_number=60, num_classes=K, label_noise_ratio=0.5, box_noise_scale=1.0, generator=g
    )
    xyxy = box_cxcywh_to_xyxy(noised.boxes_cxcywh)
    assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
    assert (noised.boxes_cxcywh[..., 2:] >= 0).all()


def test_label_flip_rate() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (200_000,), generator=g)
    noisy = noise_labels(labels, label_noise_ratio=0.5, num_classes=K, generator=g)
    # redrawn with probability 0.25, to a *different* class with probability (K - 1) / K of that
    changed = (noisy != labels).float().mean().item()
    assert changed == pytest.approx(0.25 * (K - 1) / K, abs=0.005)
    assert noisy.min() >= 0 and noisy.max() < K
    assert torch.equal(noise_labels(labels, label_noise_ratio=0.0, num_classes=K, generator=g), labels)
    with pytest.raises(ValueError, match="label_noise_ratio"):
        noise_labels(labels, label_noise_ratio=1.5, num_classes=K, generator=g)


def test_noise_is_seeded() -> None:
    a = ContrastiveDenoising(num_classes=K, embed_dim=8, seed=3)(_targets([2, 3]), num_queries=4)
    b = ContrastiveDenoising(num_classes=K, embed_dim=8, seed=3)(_targets([2, 3]), num_queries=4)
    torch.testing.assert_close(a.boxes_cxcywh, b.boxes_cxcywh)


def test_no_targets_switch_denoising_off() -> None:
    denoiser = ContrastiveDenoising(num_classes=K, embed_dim=8)
    assert denoiser(_targets([0, 0]), num_queries=4) is None
    out = _tiny_dino(denoiser).train()(torch.rand(2, 3, 64, 64), targets=_targets([0, 0]))
    assert "dn_outputs" not in out


def test_denoiser_outputs() -> None:
    denoiser = ContrastiveDenoising(num_classes=K, embed_dim=8, dn_number=50)
    assert denoiser.label_embed.weight.shape == (K + 1, 8)  # official: dn_labelbook_size + 1 rows of width C
    dn = denoiser(_targets([2, 1]), num_queries=5)
    # single_pad 2, groups 50 // 2 = 25, Nd = 2 * groups * single_pad = 100
    assert dn.content.shape == (2, 100, 8) and dn.boxes_cxcywh.shape == (2, 100, 4)
    assert dn.attn_mask.shape == (105, 105) and dn.attn_mask.dtype == torch.bool
    assert (dn.content[~dn.meta.valid] == 0).all()  # padded queries have no content
    assert dn.meta.groups == 25 and dn.meta.single_pad == 2 and dn.meta.pad_size == 100


def test_bad_inputs() -> None:
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"boxes_cxcywh must be \(N, 4\)"):
        noise_boxes(torch.rand(3, 2), torch.zeros(3, dtype=torch.bool), box_noise_scale=1.0, generator=g)
    with pytest.raises(ValueError, match="negative must be bool"):
        noise_boxes(torch.rand(3, 4), torch.zeros(2, dtype=torch.bool), box_noise_scale=1.0, generator=g)
    with pytest.raises(ValueError, match="box_noise_scale must be >= 0"):
        noise_boxes(torch.rand(3, 4), torch.zeros(3, dtype=torch.bool), box_noise_scale=-1.0, generator=g)
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] must be \(G, 4\)"):
        make_noised_targets(
            [{"labels": torch.tensor([1]), "boxes": torch.rand(2, 4)}],
            dn_number=4,
            num_classes=K,
            label_noise_ratio=0.5,
            box_noise_scale=1.0,
            generator=g,
        )
    with pytest.raises(ValueError, match="targets is empty"):
        make_noised_targets(
            [], dn_number=4, num_classes=K, label_noise_ratio=0.5, box_noise_scale=1.0, generator=g
        )
    with pytest.raises(ValueError, match="label_noise_ratio"):
        ContrastiveDenoising(num_classes=K, embed_dim=8, label_noise_ratio=2.0)


def _tiny_dino(denoiser: ContrastiveDenoising | None) -> DINO:
    torch.manual_seed(0)
    cfg = DINOConfig(
        num_classes=K,
        embed_dim=32,
        num_heads=4,
        num_encoder_layers=1,
        num_decoder_layers=3,
        feedforward_dim=64,
        num_queries=8,
        backbone=BackboneConfig(depth=10, levels=(2, 3, 4), num_extra_levels=1, num_groups=8),
    )
    return DINO.from_config(cfg, denoiser=denoiser)


def test_mask_hides_denoising_queries_from_matching_queries_in_dino() -> None:
    """Perturbing the denoising queries leaves the matching outputs unchanged -- unless the mask is off."""
    denoiser = ContrastiveDenoising(num_classes=K, embed_dim=32, dn_number=6)
    model = _tiny_dino(denoiser).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = _targets([3, 1])
    with torch.no_grad():
        plain = model(images)
        dn = denoiser(targets, num_queries=8)
        other = denoiser(targets, num_queries=8)  # new noise, same layout
        other.content = other.content + torch.randn(
            other.content.shape, generator=torch.Generator().manual_seed(1)
        )
        outs = [model(images, denoising=d) for d in (dn, other)]
        unmasked = [
            model(images, denoising=type(d)(d.content, d.boxes_cxcywh, torch.zeros_like(d.attn_mask), d.meta))
            for d in (dn, other)
        ]
    for out in outs:
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(out[key], plain[key], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[0]["dn_outputs"]["pred_boxes"], outs[1]["dn_outputs"]["pred_boxes"])
    assert (unmasked[0]["pred_logits"] - unmasked[1]["pred_logits"]).abs().max() > 1e-3


def _criterion(padding_in_loss: bool = True) -> SetCriterion:
    return SetCriterion(
        num_classes=K,
        matcher=HungarianMatcher(),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        dn_padding_in_loss=padding_in_loss,
    )


def test_dino_dn_losses_present_finite_and_trainable() -> None:
    model = _tiny_dino(ContrastiveDenoising(num_classes=K, embed_dim=32, dn_number=6)).train()
    targets = _targets([3, 1])
    out = model(torch.rand(2, 3, 64, 64), targets=targets)
    losses = _criterion()(out, targets)
    for suffix in ("_dn", "_dn_0", "_dn_1"):
        for name in ("loss_class", "loss_bbox", "loss_giou"):
            assert torch.isfinite(losses[name + suffix])
    assert "loss_class_dn_2" not in losses  # 3 decoder layers: the last plus two aux
    _criterion().total(losses).backward()
    assert model.denoiser.label_embed.weight.grad.abs().sum() > 0


def test_dn_losses_vs_hand_written_focal_loss() -> None:
    """Fixed indices, negatives and (optionally) padding as "no object", normalised by num_boxes * groups."""
    g = torch.Generator().manual_seed(0)
    targets = _targets([3, 1])
    noised = make_noised_targets(
        targets, dn_number=6, num_classes=K, label_noise_ratio=0.5, box_noise_scale=1.0, generator=g
    )
    B, Nd = noised.labels.shape
    logits = torch.randn(B, Nd, K, generator=g, dtype=torch.float64)
    boxes = torch.rand(B, Nd, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25
    boxes = torch.cat([boxes, torch.full_like(boxes, 0.2)], -1)
    dn_outputs = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}
    meta = DenoisingMeta(
        groups=noised.groups,
        single_pad=noised.single_pad,
        pad_size=noised.num_queries,
        indices=noised.indices,
        valid=noised.valid,
        positive=noised.positive,
    )
    one_hot = torch.zeros(B, Nd, K, dtype=torch.float64)
    for b, (q, j) in enumerate(noised.indices):
        one_hot[b, q, targets[b]["labels"][j]] = 1.0  # positives only: negatives/padding stay all-zero
    per_query = sigmoid_focal_loss(logits, one_hot, alpha=0.25, gamma=2.0).sum(-1)  # (B, Nd)
    normaliser = 4 * noised.groups  # 4 targets, each reconstructed once per group
    for padding_in_loss in (True, False):
        losses = _criterion(padding_in_loss).denoising_losses(dn_outputs, targets, meta, num_boxes=4.0)
        keep = torch.ones_like(noised.valid) if padding_in_loss else noised.valid
        expected = per_query[keep].sum() / normaliser
        torch.testing.assert_close(losses["loss_class_dn"], expected)
    l1 = sum(
        (boxes[b, q] - targets[b]["boxes"][j].double()).abs().sum() for b, (q, j) in enumerate(noised.indices)
    )
    torch.testing.assert_close(losses["loss_bbox_dn"], l1 / normaliser)
    with pytest.raises(ValueError, match="dn_meta must be a DenoisingMeta"):
        _criterion().denoising_losses(dn_outputs, targets, {"groups": 1}, num_boxes=4.0)


def test_viz_mask_categories_and_figures() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detr_edu.viz.denoising import (
        BLOCKED,
        DN_MATCH,
        DN_OWN_GROUP,
        MATCH_MATCH,
        mask_categories,
        plot_denoising_mask,
    )

    mask = denoising_attn_mask(groups=2, single_pad=2, num_queries=3)
    cat = mask_categories(mask, 8)
    assert (cat[8:, 8:] == MATCH_MATCH).all() and (cat[:8, 8:] == DN_MATCH).all()
    assert (cat[8:, :8] == BLOCKED).all() and (cat[:4, 4:8] == BLOCKED).all()
    assert (cat[:4, :4] == DN_OWN_GROUP).all() and (cat[4:8, 4:8] == DN_OWN_GROUP).all()
    with pytest.raises(ValueError, match="square bool"):
        mask_categories(mask.float(), 8)
    plt.close(plot_denoising_mask(mask, groups=2, single_pad=2))


def test_viz_denoising_view_follows_the_group_rule() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    from matplotlib.patches import Rectangle

    from detr_edu.viz.denoising import _SLOT_COLOURS, denoising_view

    def positives_drawn(ax) -> int:
        return sum(
            isinstance(p, Rectangle)
            and not p.get_fill()
            and to_hex(p.get_edgecolor()) == _SLOT_COLOURS["positive"]
            for p in ax.patches
        )

    # dn_number < 50: 2 * dn_number groups whatever the targets; only the first groups_drawn are drawn
    fig = denoising_view(dn_number=20, digits_a=2, digits_b=1, groups_drawn=3)
    image_0, image_1, mask_ax = fig.axes
    assert "= 40\n" in mask_ax.get_title() and "40 x 2 x pad 2 = 160 dn" in mask_ax.get_title()
    assert positives_drawn(image_0) == 2 * 3 and positives_drawn(image_1) == 1 * 3
    assert len(mask_ax.get_xticks()) <= 9 + 1  # every k-th group named, plus "matching"
    plt.close(fig)
    # dn_number >= 50: dn_number // single_pad groups
    fig = denoising_view(dn_number=50, digits_a=6, digits_b=2)
    assert "50 // 6 = 8\n" in fig.axes[2].get_title()
    assert positives_drawn(fig.axes[0]) == 6 * 2
    plt.close(fig)
    with pytest.raises(ValueError, match="groups_drawn"):
        denoising_view(groups_drawn=0)
