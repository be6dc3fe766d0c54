"""Tests of the three detectors (DETR, Deformable DETR, DINO), their heads and presets.

Every variant and flag: output keys and shapes, every parameter gets a gradient from a real set
loss (so DDP needs no unused-parameter search), padded-vs-alone consistency after the backbone,
look forward twice (same forward values, different gradients), the denoising hook, clear errors.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from detr_edu.backbone import FeatureMaps, level_masks
from detr_edu.build import build_model
from detr_edu.config import (
    PRESET_NAMES,
    BackboneConfig,
    DeformableDETRConfig,
    DETRConfig,
    DINOConfig,
    config_from_dict,
    get_preset,
)
from detr_edu.criterion import SetCriterion
from detr_edu.denoising import DenoisingMeta, DenoisingQueries
from detr_edu.dino import DINO
from detr_edu.heads import PredictionHeads, box_from_delta
from detr_edu.matcher import HungarianMatcher

COMMON = {
    "num_classes": 4,
    "embed_dim": 32,
    "num_heads": 4,
    "num_encoder_layers": 1,
    "num_decoder_layers": 3,
    "feedforward_dim": 64,
    "dropout": 0.0,
    "num_queries": 8,
}


def _multi_level() -> BackboneConfig:
    return BackboneConfig(depth=10, levels=(2, 3, 4), num_extra_levels=1, num_groups=8)


VARIANTS = {
    "detr": DETRConfig(
        **COMMON, backbone=BackboneConfig(depth=10, levels=(3,), num_extra_levels=0, num_groups=8)
    ),
    "detr_no_object": DETRConfig(
        **COMMON,
        no_object_class=True,
        backbone=BackboneConfig(depth=10, levels=(3,), num_extra_levels=0, num_groups=8),
    ),
    "deformable": DeformableDETRConfig(**COMMON, backbone=_multi_level()),
    "deformable_refine": DeformableDETRConfig(**COMMON, box_refine=True, backbone=_multi_level()),
    "deformable_two_stage": DeformableDETRConfig(**COMMON, two_stage=True, backbone=_multi_level()),
    "deformable_refine_two_stage": DeformableDETRConfig(
        **COMMON, box_refine=True, two_stage=True, backbone=_multi_level()
    ),
    "dino": DINOConfig(**COMMON, backbone=_multi_level()),
    "dino_no_lft": DINOConfig(**COMMON, look_forward_twice=False, backbone=_multi_level()),
    "dino_pure_selection": DINOConfig(**COMMON, mixed_query_selection=False, backbone=_multi_level()),
    "dino_content_weights": DINOConfig(**COMMON, weights_from="content", backbone=_multi_level()),
    "deformable_content_weights": DeformableDETRConfig(
        **COMMON, box_refine=True, weights_from="content", backbone=_multi_level()
    ),
}


def _build(name: str, seed: int = 0, **changes) -> nn.Module:
    torch.manual_seed(seed)
    cfg = copy.deepcopy(VARIANTS[name])
    for key, value in changes.items():
        setattr(cfg, key, value)
    return build_model(cfg)


def _images(B: int = 2, H: int = 64, W: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _targets() -> list[dict]:
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.4]])},
    ]


def _criterion(model: nn.Module) -> SetCriterion:
    ce = getattr(model, "no_object_class", False)
    return SetCriterion(
        num_classes=COMMON["num_classes"],
        matcher=HungarianMatcher(class_cost_type="ce" if ce else "focal"),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        class_loss="ce" if ce else "focal",
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_keys_and_shapes(name: str) -> None:
    model = _build(name).eval()
    with torch.no_grad():
        out = model(_images())
    K = COMMON["num_classes"] + int(name == "detr_no_object")
    Nq, Ld = COMMON["num_queries"], COMMON["num_decoder_layers"]
    two_stage = "two_stage" in name or name.startswith("dino")
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"} | (
        {"enc_outputs"} if two_stage else set()
    )
    assert out["pred_logits"].shape == (2, Nq, K)
    assert out["pred_boxes"].shape == (2, Nq, 4)
    assert len(out["aux_outputs"]) == Ld - 1
    for layer in out["aux_outputs"]:
        assert layer["pred_logits"].shape == (2, Nq, K) and layer["pred_boxes"].shape == (2, Nq, 4)
    if two_stage:  # DINO: the K selected proposals; Deformable DETR: every encoder token (official)
        N = Nq if name.startswith("dino") else 8 * 8 + 4 * 4 + 2 * 2 + 1
        enc = out["enc_outputs"]
        assert enc["pred_logits"].shape == (2, N, K) and enc["pred_boxes"].shape == (2, N, 4)
    boxes = torch.stack([out["pred_boxes"], *[a["pred_boxes"] for a in out["aux_outputs"]]])
    assert torch.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= 1).all()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_gets_a_gradient(name: str) -> None:
    """From the set loss of a dummy target: no unused parameter (DDP needs no search for them).

    Zero-initialised layers (box heads' last layer, deformable offsets) block gradients to the layers
    before them at initialisation, so the weights are first jittered as one training step would.
    """
    model = _build(name).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    criterion = _criterion(model)
    if isinstance(model, DINO):  # DINO's denoising queries (chapter 07) are built from the targets
        outputs = model(_images(), targets=_targets())
        assert "dn_outputs" in outputs and model.denoiser is not None
        assert any(k.endswith("_dn") for k in criterion(outputs, _targets()))
    else:
        outputs = model(_images())
    losses = criterion(outputs, _targets())
    criterion.total(losses).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() == 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _pad_feature_maps(
    fm: FeatureMaps, other: FeatureMaps, strides: list[int], image_hw: tuple[int, int]
) -> FeatureMaps:
    """Batch [image alone, other image] as a padded batch: zero-pad the alone features to other's shapes."""
    H, W = (s * strides[0] for s in other.features[0].shape[-2:])  # the padded image size
    image_mask = torch.ones(2, H, W, dtype=torch.bool)
    image_mask[0, : image_hw[0], : image_hw[1]] = False
    image_mask[1] = False
    shapes = [tuple(f.shape[-2:]) for f in other.features]
    masks = level_masks(image_mask, shapes, strides)
    feats = []
    for a, o in zip(fm.features, other.features, strict=True):
        padded = torch.zeros_like(o[:1])
        padded[..., : a.shape[-2], : a.shape[-1]] = a
        feats.append(torch.cat([padded, o]))
    return FeatureMaps(features=feats, masks=masks)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_padded_equals_alone_after_the_backbone(name: str) -> None:
    """With the course's ``padding_invariant`` option an image alone and the same image padded inside
    a batch give the same outputs.

    Compared from the backbone's output on: convolutions near the image border see padding inside a
    batch, so the backbone itself differs there (chapter 04 measures by how much). The published
    semantics (the default) are not invariant: ``test_published_semantics_depend_on_padding``.
    """
    if name.startswith("detr"):
        model = _build(name).eval()  # DETR's backbone is always the padding-invariant one
    else:
        model = _build(name, padding_invariant=True).eval()
    strides = model.backbone.strides
    h, w = 40, 56
    with torch.no_grad():
        fm_alone = model.backbone(_images(1, h, w, seed=1))
        fm_other = model.backbone(_images(1, 64, 64, seed=2))
        padded = _pad_feature_maps(fm_alone, fm_other, strides, (h, w))
        alone = model.forward_features(fm_alone)
        batch = model.forward_features(padded)
    # (Deformable DETR's enc_outputs hold every token, so their number differs between the two)
    selected = name.startswith("dino")
    layers_alone = [alone, *alone["aux_outputs"]] + ([alone["enc_outputs"]] if selected else [])
    layers_batch = [batch, *batch["aux_outputs"]] + ([batch["enc_outputs"]] if selected else [])
    for a, b in zip(layers_alone, layers_batch, strict=True):
        torch.testing.assert_close(b["pred_logits"][:1], a["pred_logits"], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(b["pred_boxes"][:1], a["pred_boxes"], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["deformable_refine_two_stage", "dino"])
def test_published_semantics_depend_on_padding(name: str) -> None:
    """The published models (default) read the padding: plain GroupNorm over the padded map, the
    extra level's conv on raw features, level-0 frame query positions (DINO). Same weights, the
    course's option removes the difference (previous test)."""
    published = _build(name).eval()
    h, w = 40, 56
    images = torch.zeros(2, 3, 64, 64)
    images[0, :, :h, :w] = _images(1, h, w, seed=1)[0]
    images[1] = _images(1, 64, 64, seed=2)[0]
    masks = torch.ones(2, 64, 64, dtype=torch.bool)
    masks[0, :h, :w] = False
    masks[1] = False
    with torch.no_grad():
        alone = published(images[:1, :, :h, :w])["pred_boxes"]
        batch = published(images, masks)["pred_boxes"][:1]
    assert (alone - batch).abs().max() > 1e-3


def _jittered_dino(look_forward_twice: bool) -> DINO:
    model = _build("dino")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.look_forward_twice = look_forward_twice
    return model.eval()


def test_look_forward_twice_changes_gradients_not_values() -> None:
    """Same weights: identical outputs; only with LFT is the last layer's loss box built on the
    previous layer's box with its gradient, so the (shared) box head's gradient differs."""
    images = _images()
    grads, outs = {}, {}
    for lft in (True, False):
        model = _jittered_dino(lft)
        out = model(images, return_intermediates=True)
        assert out["intermediates"]["inter_references"][-1].requires_grad == lft
        out["pred_boxes"].sum().backward()  # the last layer's box loss only
        outs[lft] = out
        grads[lft] = torch.cat([p.grad.flatten() for p in model.heads.bbox_embed[0].parameters()])
    torch.testing.assert_close(outs[True]["pred_boxes"], outs[False]["pred_boxes"], rtol=0, atol=0)
    for a, b in zip(outs[True]["aux_outputs"], outs[False]["aux_outputs"], strict=True):
        torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)
    assert grads[False].abs().sum() > 0
    assert (grads[True] - grads[False]).abs().max() > 1e-6


def _fake_denoising(B: int, Nd: int, Nq: int, C: int, seed: int = 0) -> DenoisingQueries:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(Nd + Nq, Nd + Nq, dtype=torch.bool)
    mask[Nd:, :Nd] = True  # matching queries never see the denoising queries
    boxes = torch.cat([torch.rand(B, Nd, 2, generator=g) * 0.6 + 0.2, torch.full((B, Nd, 2), 0.2)], -1)
    empty = torch.empty(0, dtype=torch.int64)
    meta = DenoisingMeta(
        groups=1,
        single_pad=Nd // 2,
        pad_size=Nd,
        indices=[(empty, empty)] * B,
        valid=torch.ones(B, Nd, dtype=torch.bool),
        positive=torch.arange(Nd) < Nd // 2,
    )
    return DenoisingQueries(
        content=torch.randn(B, Nd, C, generator=g), boxes_cxcywh=boxes, attn_mask=mask, meta=meta
    )


def test_denoising_hook_splits_outputs_and_leaves_matching_queries_alone() -> None:
    model = _jittered_dino(True)
    images = _images()
    with torch.no_grad():
        plain = model(images)
        dn = _fake_denoising(2, 6, COMMON["num_queries"], COMMON["embed_dim"])
        out = model(images, denoising=dn)
        other = model(
            images, denoising=_fake_denoising(2, 6, COMMON["num_queries"], COMMON["embed_dim"], seed=1)
        )
    assert out["dn_outputs"]["pred_logits"].shape == (2, 6, COMMON["num_classes"])
    assert out["dn_outputs"]["pred_boxes"].shape == (2, 6, 4)
    assert len(out["dn_outputs"]["aux_outputs"]) == COMMON["num_decoder_layers"] - 1
    assert out["dn_meta"] is dn.meta
    for res in (out, other):  # the mask hides the denoising queries from the matching ones
        torch.testing.assert_close(res["pred_boxes"], plain["pred_boxes"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["dn_outputs"]["pred_boxes"], other["dn_outputs"]["pred_boxes"])


class _FakeDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, targets: list[dict], *, num_queries: int) -> DenoisingQueries:
        self.calls += 1
        return _fake_denoising(len(targets), 4, num_queries, COMMON["embed_dim"])


def test_denoiser_is_called_in_training_with_targets_only() -> None:
    torch.manual_seed(0)
    denoiser = _FakeDenoiser()
    model = DINO.from_config(copy.deepcopy(VARIANTS["dino"]), denoiser=denoiser)
    images = _images()
    with torch.no_grad():
        assert "dn_outputs" in model.train()(images, targets=_targets())
        assert "dn_outputs" not in model.train()(images)
        assert "dn_outputs" not in model.eval()(images, targets=_targets())
    assert denoiser.calls == 1


def test_denoising_errors() -> None:
    model = _build("dino").eval()
    good = _fake_denoising(2, 4, COMMON["num_queries"], COMMON["embed_dim"])
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        model(_images(), denoising=dataclasses.replace(good, attn_mask=good.attn_mask[:-1, :-1]))
    with pytest.raises(ValueError, match=r"content must be \(B, Nd, C\)"):
        model(_images(), denoising=dataclasses.replace(good, content=good.content[..., :8]))
    with pytest.raises(ValueError, match=r"boxes_cxcywh must be \(B, Nd, 4\)"):
        model(_images(), denoising=dataclasses.replace(good, boxes_cxcywh=good.boxes_cxcywh[:, :3]))


@pytest.mark.parametrize("name", ["detr", "deformable_refine_two_stage", "dino"])
def test_bad_inputs(name: str) -> None:
    model = _build(name).eval()
    with pytest.raises(ValueError, match="must have 3 channels, got 1"):
        model(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="batch is empty"):
        model(torch.zeros(0, 3, 64, 64))
    with pytest.raises(ValueError, match="masks must be"):
        model(torch.zeros(2, 3, 64, 64), torch.zeros(2, 64, 32, dtype=torch.bool))


def test_two_stage_needs_enough_pixels() -> None:
    model = _build("dino").eval()
    with pytest.raises(ValueError, match="needs num_queries=8 encoder positions"):
        model(torch.zeros(1, 3, 16, 16))
    course = _build("dino", padding_invariant=True).eval()
    with pytest.raises(ValueError, match="needs num_queries=8 valid encoder positions"):
        course(torch.zeros(1, 3, 16, 16))


def test_dino_without_denoising() -> None:
    """dn_number=0: no denoiser; otherwise the denoiser changes neither the weights nor the RNG stream."""
    torch.manual_seed(0)
    with_dn = build_model(copy.deepcopy(VARIANTS["dino"]))
    after_with = torch.rand(3)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(VARIANTS["dino"], dn_number=0)).train()
    after_without = torch.rand(3)
    assert model.denoiser is None and with_dn.denoiser is not None
    torch.testing.assert_close(after_with, after_without)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(with_dn.state_dict()[name], value)
    assert "dn_outputs" not in model(_images(), targets=_targets())
    with pytest.raises(ValueError, match="dn_number must be >= 0"):
        build_model(dataclasses.replace(VARIANTS["dino"], dn_number=-1))


def test_detr_refuses_multi_level_backbone() -> None:
    cfg = dataclasses.replace(VARIANTS["detr"], backbone=_multi_level())
    with pytest.raises(ValueError, match="single feature level"):
        build_model(cfg)


def test_return_intermediates() -> None:
    model = _build("dino").eval()
    with torch.no_grad():
        out = model(_images(), return_intermediates=True)
    inter = out["intermediates"]
    Ld, Nq = COMMON["num_decoder_layers"], COMMON["num_queries"]
    assert inter["inter_states"].shape == (Ld, 2, Nq, COMMON["embed_dim"])
    assert [tuple(r.shape) for r in inter["inter_references"]] == [(2, Nq, 4)] * Ld
    torch.testing.assert_close(inter["inter_references"][0], inter["init_reference"])
    torch.testing.assert_close(inter["init_reference"], out["enc_outputs"]["pred_boxes"])
    locations, weights = inter["sampling"][0]
    assert locations.shape == (2, Nq, COMMON["num_heads"], 4, 4, 2) and weights.shape == (
        2,
        Nq,
        COMMON["num_heads"],
        4,
        4,
    )


def test_heads_shared_vs_copied() -> None:
    shared = PredictionHeads(embed_dim=16, num_classes=3, num_layers=3, share=True)
    copied = PredictionHeads(embed_dim=16, num_classes=3, num_layers=3, share=False)
    assert shared.bbox_embed[0] is shared.bbox_embed[2] and shared.class_embed[0] is shared.class_embed[1]
    assert copied.bbox_embed[0] is not copied.bbox_embed[1]
    assert sum(p.numel() for p in copied.parameters()) == 3 * sum(p.numel() for p in shared.parameters())
    # focal prior: sigmoid(bias) = 0.01; box head starts at zero delta, so boxes = references
    torch.testing.assert_close(shared.class_embed[0].bias.sigmoid(), torch.full((3,), 0.01))
    ref = torch.rand(3, 2, 5, 4) * 0.8 + 0.1
    out = copied(torch.randn(3, 2, 5, 16), list(ref))
    torch.testing.assert_close(out["pred_boxes"], ref[-1])
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"], ref[0])


def test_box_from_delta() -> None:
    delta = torch.randn(5, 4)
    torch.testing.assert_close(box_from_delta(delta, None), delta.sigmoid())
    ref = torch.rand(5, 2) * 0.8 + 0.1
    box = box_from_delta(delta, ref)
    expected_centre = torch.sigmoid(delta[:, :2] + torch.log(ref / (1 - ref)))
    torch.testing.assert_close(box, torch.cat([expected_centre, delta[:, 2:].sigmoid()], -1))


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_build(name: str) -> None:
    cfg = get_preset(name)
    if "coco" in name:
        assert cfg.embed_dim == 256 and cfg.num_encoder_layers == 6 and cfg.num_decoder_layers == 6
        assert (
            cfg.num_queries == {"detr": 100, "deformable_detr": 300, "dino": 900}[name.rsplit("_r50", 1)[0]]
        )
        return  # building 40M-parameter models is covered by the slow test below
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PRESET_NAMES if "coco" in n])
def test_coco_presets_build(name: str) -> None:
    model = build_model(get_preset(name, num_classes=80))
    assert model.num_classes == 80


def test_config_round_trip_and_errors() -> None:
    for name in PRESET_NAMES:
        cfg = get_preset(name)
        data = {"model": type(cfg).__name__, **dataclasses.asdict(cfg)}
        data["backbone"]["levels"] = list(data["backbone"]["levels"])  # as after a JSON round trip
        assert config_from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown preset 'yolo'"):
        get_preset("yolo")
    with pytest.raises(ValueError, match="data\\['model'\\] must be one of"):
        config_from_dict({"model": "YOLO"})
    with pytest.raises(ValueError, match="cfg must be"):
        build_model(BackboneConfig())  # type: ignore[arg-type]


def test_forward_figures() -> None:
    """The chapter's plotting functions: one axes per panel, clear errors on mismatched inputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detr_edu.viz import forward as viz

    image = torch.rand(3, 32, 40)
    feats = [torch.randn(2, 8, 4, 5), torch.randn(2, 8, 2, 3)]
    masks = [torch.zeros(2, 4, 5, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    fig = viz.plot_feature_levels(feats, masks, torch.rand(2, 3, 32, 40), strides=[8, 16])
    assert len(fig.axes) == 2 * 3
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3]])
    assert len(viz.plot_proposals(image, (32, 30), boxes, torch.tensor([0, 1])).axes) == 1
    assert len(viz.plot_reference_path(image, (32, 40), torch.rand(4, 5, 4) * 0.5 + 0.2, [0, 3]).axes) == 1
    loc, wt = torch.rand(2, 2, 3, 2), torch.rand(2, 2, 3)
    assert (
        len(viz.plot_query_sampling(image, (32, 40), boxes[0], loc, wt, [(4, 5), (2, 3)], [8, 16]).axes) == 2
    )
    with pytest.raises(ValueError, match="same L levels"):
        viz.plot_query_sampling(image, (32, 40), boxes[0], loc, wt, [(4, 5)], [8])
    assert (
        len(viz.plot_mixed_query_selection(image, (32, 40), boxes, torch.randn(2, 8), torch.randn(2, 8)).axes)
        == 3
    )
    table = {"a": {"x": True, "y": False}, "b": {"x": True, "y": True}}
    assert len(viz.plot_gradient_flow(table).axes) == 1
    assert len(viz.plot_model_costs(["m1", "m2"], [1.0, 2.0], [0.5, 0.7]).axes) == 2
    with pytest.raises(ValueError, match="image must be"):
        viz.plot_proposals(torch.rand(32, 40), (32, 40), boxes, torch.tensor([0, 1]))
    plt.close("all")
