"""Tests of detr_edu.backbone: ResNet levels, exact level masks, the masked neck, the frozen-BN pitfall."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from detr_edu.backbone import (
    Backbone,
    ChannelMapper,
    MaskedGroupNorm,
    ResNetBackbone,
    check_images,
    level_masks,
)
from detr_edu.config import BackboneConfig
from detr_edu.masks import valid_sizes


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "depth, channels", [(10, [128, 256, 512]), (18, [128, 256, 512]), (50, [512, 1024, 2048])]
)
def test_resnet_levels_shapes(depth: int, channels: list[int]) -> None:
    net = ResNetBackbone(depth=depth, levels=(2, 3, 4)).eval()
    feats = net(torch.randn(1, 3, 64, 96, generator=_gen()))
    assert net.out_channels == channels
    assert net.strides == [8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, [8, 16, 32], strict=True)
    ]


def test_resnet_matches_torchvision_with_loaded_weights(tmp_path) -> None:
    """Weights saved from torchvision's resnet18 give exactly torchvision's stage outputs."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    net = ResNetBackbone(depth=18, levels=(1, 2, 3, 4), weights_path=path).eval()
    x = torch.randn(2, 3, 64, 64, generator=_gen(1))
    with torch.no_grad():
        feats = net(x)
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        expected = []
        for stage in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
            h = stage(h)
            expected.append(h)
    for f, e in zip(feats, expected, strict=True):
        torch.testing.assert_close(f, e)


def test_weights_path_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        ResNetBackbone(depth=18, weights_path=tmp_path / "missing.pth")
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit ResNet-18"):
        ResNetBackbone(depth=18, weights_path=path)


def test_bad_constructor_args() -> None:
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNetBackbone(depth=20)
    with pytest.raises(ValueError, match="levels must be increasing"):
        ResNetBackbone(depth=18, levels=(3, 2))
    with pytest.raises(ValueError, match="norm must be"):
        ResNetBackbone(depth=18, norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_groups=32 must divide embed_dim=48"):
        ChannelMapper(in_channels=[64], embed_dim=48)


def test_check_images_errors() -> None:
    with pytest.raises(ValueError, match="must have 3 channels, got 1"):
        check_images(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="batch is empty"):
        check_images(torch.zeros(0, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        check_images(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="floating point"):
        check_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="masks must be"):
        check_images(torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        check_images(torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8))


def test_valid_sizes_and_non_rectangular_masks() -> None:
    masks = torch.ones(2, 10, 12, dtype=torch.bool)
    masks[0, :7, :5] = False
    masks[1] = False
    assert valid_sizes(masks).tolist() == [[7, 5], [10, 12]]
    masks[1, 0, 0] = True  # padding at the top-left: not the collate convention
    with pytest.raises(ValueError, match="bottom/right"):
        valid_sizes(masks)
    with pytest.raises(ValueError, match="no valid pixel"):
        valid_sizes(torch.ones(1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("h, w", [(33, 47), (64, 64), (17, 90), (1, 5)])
def test_level_masks_match_the_convolution_arithmetic(h: int, w: int) -> None:
    """The valid size of each level equals the feature size of the image alone (brute force)."""
    net = ResNetBackbone(depth=10, levels=(1, 2, 3, 4)).eval()
    with torch.no_grad():
        alone = net(torch.zeros(1, 3, h, w))
    H, W = 96, 96
    masks = torch.ones(1, H, W, dtype=torch.bool)
    masks[0, :h, :w] = False
    shapes = [((H + s - 1) // s, (W + s - 1) // s) for s in net.strides]
    for m, f in zip(level_masks(masks, shapes, net.strides), alone, strict=True):
        assert valid_sizes(m).tolist() == [list(f.shape[-2:])]


def test_masked_group_norm_is_group_norm_without_padding() -> None:
    norm = MaskedGroupNorm(4, 16)
    nn.init.normal_(norm.weight, generator=_gen(2))
    nn.init.normal_(norm.bias, generator=_gen(3))
    ref = nn.GroupNorm(4, 16)
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(2, 16, 5, 7, generator=_gen())
    torch.testing.assert_close(norm(x), ref(x))
    torch.testing.assert_close(norm(x, torch.zeros(2, 5, 7, dtype=torch.bool)), ref(x))


def test_masked_group_norm_padded_equals_alone() -> None:
    norm = MaskedGroupNorm(4, 16)
    nn.init.normal_(norm.bias, generator=_gen(3))
    x = torch.randn(1, 16, 5, 7, generator=_gen())
    padded = torch.randn(1, 16, 9, 8, generator=_gen(1)) * 100  # garbage in the padding
    padded[..., :5, :7] = x
    mask = torch.ones(1, 9, 8, dtype=torch.bool)
    mask[0, :5, :7] = False
    out = norm(padded, mask)
    torch.testing.assert_close(out[..., :5, :7], norm(x))
    assert (out[..., 5:, :] == 0).all() and (out[..., :, 7:] == 0).all()


def test_neck_padded_equals_alone() -> None:
    """Given the same backbone features (zero- or garbage-padded), the neck ignores the padding."""
    torch.manual_seed(0)
    neck = ChannelMapper(in_channels=[8, 16], embed_dim=32, num_extra_levels=2, num_groups=8)
    strides = [8, 16, 32, 64]
    f_alone = [torch.randn(1, 8, 5, 6, generator=_gen(1)), torch.randn(1, 16, 3, 3, generator=_gen(2))]
    m_alone = level_masks(torch.zeros(1, 40, 48, dtype=torch.bool), [(5, 6), (3, 3), (2, 2), (1, 1)], strides)
    out_alone = neck(f_alone, m_alone)
    big = torch.ones(1, 80, 96, dtype=torch.bool)
    big[0, :40, :48] = False
    m_pad = level_masks(big, [(10, 12), (5, 6), (3, 3), (2, 2)], strides)
    f_pad = [torch.randn(1, 8, 10, 12, generator=_gen(3)), torch.randn(1, 16, 5, 6, generator=_gen(4))]
    f_pad[0][..., :5, :6] = f_alone[0]
    f_pad[1][..., :3, :3] = f_alone[1]
    out_pad = neck(f_pad, m_pad)
    for a, p in zip(out_alone, out_pad, strict=True):
        h, w = a.shape[-2:]
        torch.testing.assert_close(p[..., :h, :w], a)


def test_backbone_outputs_and_masks() -> None:
    """The course's padding-invariant backbone: exact level masks, padded pixels zero after the neck;
    the published one (default) resizes the image mask, which is off by one on the last level here."""
    model = Backbone(
        depth=10, levels=(2, 3, 4), embed_dim=64, num_extra_levels=1, padding_invariant=True
    ).eval()
    images = torch.randn(2, 3, 64, 96, generator=_gen())
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, 40:] = True
    masks[1, :, 50:] = True
    fm = model(images, masks)
    assert model.strides == [8, 16, 32, 64]
    assert [tuple(f.shape) for f in fm.features] == [
        (2, 64, 8, 12),
        (2, 64, 4, 6),
        (2, 64, 2, 3),
        (2, 64, 1, 2),
    ]
    assert [valid_sizes(m)[1].tolist() for m in fm.masks] == [[5, 7], [3, 4], [2, 2], [1, 1]]
    for f, m in zip(fm.features, fm.masks, strict=True):
        assert (f.permute(0, 2, 3, 1)[m] == 0).all()  # padded pixels are zero after the masked neck
    published = Backbone(depth=10, levels=(2, 3, 4), embed_dim=64, num_extra_levels=1).eval()
    published.load_state_dict(model.state_dict())
    fp = published(images, masks)
    # 50 valid columns of 96: nearest resizing to 2 columns keeps column 48, so 2 "valid" (exact: 1)
    assert [valid_sizes(m)[1].tolist() for m in fp.masks] == [[5, 7], [3, 4], [2, 2], [1, 2]]
    torch.testing.assert_close(fp.features[0][0], fm.features[0][0])  # the unpadded image: same
    assert not torch.allclose(fp.features[0][1], fm.features[0][1])  # the padded one: GroupNorm over padding


def _residual_branch_grads(net: ResNetBackbone) -> list[float]:
    """Largest |grad| of the first conv of every residual branch."""
    return [float(block.conv1.weight.grad.abs().max()) for stage in net.stages for block in stage]


def test_frozen_batchnorm_with_zero_init_kills_every_residual_branch() -> None:
    """The chapter's pitfall: frozen BN + zero-initialised last BN = dead residual branches, forever."""
    torch.manual_seed(0)
    frozen = ResNetBackbone(depth=10, levels=(4,), norm="frozen", zero_init_residual=True)
    frozen(torch.randn(2, 3, 64, 64, generator=_gen()))[0].square().mean().backward()
    assert max(_residual_branch_grads(frozen)) == 0.0  # no parameter of a branch can ever learn
    assert all(not p.requires_grad for n, p in frozen.named_buffers() if n.endswith("bn2.weight"))
    # with trainable BatchNorm the zero gamma itself gets a gradient, so the branch wakes up
    torch.manual_seed(0)
    trainable = ResNetBackbone(depth=10, levels=(4,), norm="batch", zero_init_residual=True)
    trainable(torch.randn(2, 3, 64, 64, generator=_gen()))[0].square().mean().backward()
    gammas = [float(block.bn2.weight.grad.abs().max()) for stage in trainable.stages for block in stage]
    assert min(gammas) > 0.0


@pytest.mark.slow
def test_frozen_batchnorm_without_zero_init_does_not_normalise() -> None:
    """Frozen random statistics (mean 0, var 1) are the identity: in a ResNet-50 activations grow."""
    x = torch.randn(2, 3, 64, 64, generator=_gen())
    stds = {}
    for norm in ("frozen", "batch"):
        torch.manual_seed(0)
        net = ResNetBackbone(depth=50, levels=(4,), norm=norm)
        with torch.no_grad():
            stds[norm] = float(net(x)[0].std())
    assert stds["batch"] < 3
    assert stds["frozen"] > 5 * stds["batch"]


def test_config_checks_freeze_at() -> None:
    # (training a frozen-BatchNorm backbone without weights is refused by the training command:
    # tests/test_gpu_recipes.py)
    with pytest.raises(ValueError, match="freeze_at must be in 0..4"):
        BackboneConfig(freeze_at=5)


@pytest.mark.parametrize("padding_invariant", [False, True])
def test_transformer_levels_hand_on_the_same_maps(padding_invariant: bool) -> None:
    """Q3's option: the same ResNet and neck; only the chosen pyramid levels (and their masks and
    strides) reach the transformer, bit for bit what the full backbone computes for them."""
    full = Backbone(depth=10, levels=(2, 3, 4), embed_dim=32, padding_invariant=padding_invariant).eval()
    some = Backbone(
        depth=10,
        levels=(2, 3, 4),
        embed_dim=32,
        padding_invariant=padding_invariant,
        transformer_levels=(0, 3),
    ).eval()
    some.load_state_dict(full.state_dict())  # the same parameters: nothing is removed
    assert some.num_levels == 2 and some.strides == [8, 64] and some.pyramid_strides == full.strides
    images = torch.randn(2, 3, 64, 80, generator=_gen())
    masks = torch.zeros(2, 64, 80, dtype=torch.bool)
    masks[1, :, 45:] = True
    with torch.no_grad():
        a, b = full(images, masks), some(images, masks)
    for i, j in ((0, 0), (3, 1)):
        assert torch.equal(a.features[i], b.features[j])
        assert torch.equal(a.masks[i], b.masks[j])
    assert len(b.features) == len(b.masks) == 2


def test_transformer_levels_config_and_model() -> None:
    from detr_edu.build import build_model
    from detr_edu.config import get_preset

    for bad in [(), (1, 0), (0, 0), (-1,), (4,)]:
        with pytest.raises(ValueError, match="transformer_levels must be increasing indices into the 4"):
            BackboneConfig(levels=(2, 3, 4), num_extra_levels=1, transformer_levels=bad)
    cfg = get_preset("dino_cpu")
    cfg.backbone = BackboneConfig(**{**cfg.backbone.__dict__, "transformer_levels": [0]})
    cfg.num_points = 16
    assert cfg.backbone.transformer_levels == (0,) and cfg.backbone.num_levels == 1
    model = build_model(cfg).eval()
    # one level of 16 points per head: the offsets layer predicts nh * 1 * 16 * 2 numbers
    offsets = [m for n, m in model.named_modules() if n.endswith("sampling_offsets")]
    assert offsets and all(m.out_features == cfg.num_heads * 1 * 16 * 2 for m in offsets)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64, generator=_gen()))
    assert out["pred_boxes"].shape == (1, cfg.num_queries, 4)
