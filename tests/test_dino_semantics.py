"""DINO's one-line semantics that every output shape would survive, each pinned by a test.

* Mixed query selection: the anchors (and, for pure selection, the content) taken from the encoder's
  top-K proposals are *detached*: the decoder's losses never train the first stage through them.
  Reference: the gradients themselves (the proposer's parameters get none from decoder outputs).
* The decoder's post-norm: DINO normalises every returned decoder state with one LayerNorm before
  the heads (Deformable DETR does not). Reference: with that norm's weight set to zero, every query
  of every layer sees the same state, so every query predicts the same logits.
* Labels reach the label embedding of the denoiser only after the same check the loss makes.
"""

import copy

import pytest
import torch
from torch import nn

from detr_edu.build import build_model
from detr_edu.config import BackboneConfig, DeformableDETRConfig, DINOConfig

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
BACKBONE = BackboneConfig(depth=10, levels=(2, 3, 4), num_extra_levels=1, num_groups=8)


def _dino(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(DINOConfig(**COMMON, backbone=copy.deepcopy(BACKBONE), **kw))
    with torch.no_grad():  # no zero-initialised layer may hide a gradient path
        for i, p in enumerate(model.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return model


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _decoder_loss(out: dict) -> torch.Tensor:
    layers = [out, *out["aux_outputs"]]  # the decoder's predictions only, not enc_outputs
    return sum(layer["pred_boxes"].sum() + layer["pred_logits"].sum() for layer in layers)


@pytest.mark.parametrize("mixed", [True, False])
def test_decoder_losses_do_not_train_the_first_stage(mixed: bool) -> None:
    model = _dino(mixed_query_selection=mixed, dn_number=0).train()
    _decoder_loss(model(_images())).backward()
    touched = [
        name for name, p in model.proposer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert touched == [], f"decoder losses reach the first stage through {touched}: anchors not detached"
    # the decoder's own parameters do get gradients (the test would pass vacuously otherwise)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.layers[0].parameters())


def test_the_encoder_loss_does_train_the_first_stage() -> None:
    model = _dino(dn_number=0).train()
    out = model(_images())
    (out["enc_outputs"]["pred_boxes"].sum() + out["enc_outputs"]["pred_logits"].sum()).backward()
    assert model.proposer.bbox_embed.layers[-1].weight.grad.abs().sum() > 0


def test_dino_normalises_every_decoder_state_before_the_heads() -> None:
    model = _dino(dn_number=0).eval()
    assert isinstance(model.decoder.norm, nn.LayerNorm), "DINO's decoder must have its post-norm"
    with torch.no_grad():
        before = model(_images())
        model.decoder.norm.weight.zero_()  # every normalised state becomes the bias vector
        after = model(_images())
    for layer in (after, *after["aux_outputs"]):
        logits = layer["pred_logits"]  # (B, Nq, K)
        torch.testing.assert_close(logits, logits[:1, :1].expand_as(logits))
    assert before["pred_logits"].std(1).min() > 1e-3  # with the norm's weights the queries differ


def test_deformable_detr_has_no_decoder_post_norm() -> None:
    model = build_model(DeformableDETRConfig(**COMMON, box_refine=True, backbone=copy.deepcopy(BACKBONE)))
    assert isinstance(model.decoder.norm, nn.Identity)


def test_a_label_outside_the_classes_is_refused_before_the_label_embedding() -> None:
    model = _dino(dn_number=10).train()
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.4]])},
    ]
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must lie in \[0, 4\)"):
        model(_images(), targets=targets)


# ------------------------------------------------------------- official semantics, one by one


def _fresh(cfg_cls, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(cfg_cls(**COMMON, backbone=copy.deepcopy(BACKBONE), **kw))


def test_official_dino_shares_its_heads_and_copies_the_encoder_pair() -> None:
    """DINO_4scale: dec_pred_*_embed_share=True, two_stage_*_embed_share=False (deep copies)."""
    model = _fresh(DINOConfig)
    heads = model.heads
    assert all(heads.class_embed[i] is heads.class_embed[0] for i in range(3))
    assert all(heads.bbox_embed[i] is heads.bbox_embed[0] for i in range(3))
    assert model.proposer.class_embed is not heads.class_embed[0]
    for a, b in zip(model.proposer.bbox_embed.parameters(), heads.bbox_embed[0].parameters(), strict=True):
        assert a is not b and torch.equal(a, b)  # a copy: same start, trained apart
    last = heads.bbox_embed[0].layers[-1]
    assert (last.weight == 0).all() and (last.bias == 0).all()  # no -2: every reference is a box
    assert model.denoiser.label_embed.weight.shape == (COMMON["num_classes"] + 1, COMMON["embed_dim"])


def test_official_dino_image_positions_and_eps() -> None:
    from detr_edu.dino import INVERSE_SIGMOID_EPS

    model = _fresh(DINOConfig)
    assert (model.encoder.pos_temperature, model.encoder.pos_offset) == (20.0, 0.0)
    assert model.decoder.eps == INVERSE_SIGMOID_EPS == 1e-3 and model.heads.eps == 1e-3
    assert model.decoder.query_pos_frame == "level0" and model.proposer.score == "max"
    assert DINOConfig().box_noise_scale == 0.4  # DINO_4scale.py: dn_box_noise_scale = 0.4
    course = _fresh(DINOConfig, padding_invariant=True)
    assert course.decoder.query_pos_frame == "image" and course.proposer.exclude_invalid
    assert course.backbone.padding_invariant and not model.backbone.padding_invariant


def test_official_deformable_detr_heads_and_ranking() -> None:
    """DeformableDETR.__init__: plain -> one shared pair with bias[2:] = -2; box refinement -> clones,
    only bbox_embed[0] at -2; two-stage -> every bias[2:] at 0, ranking by class 0, and without
    refinement the encoder pair *is* the decoder's shared pair."""
    plain = _fresh(DeformableDETRConfig)
    assert plain.heads.bbox_embed[2] is plain.heads.bbox_embed[0]
    assert (plain.heads.bbox_embed[0].layers[-1].bias[2:] == -2).all()
    refine = _fresh(DeformableDETRConfig, box_refine=True)
    assert (refine.heads.bbox_embed[0].layers[-1].bias[2:] == -2).all()
    assert (refine.heads.bbox_embed[1].layers[-1].bias == 0).all()
    two = _fresh(DeformableDETRConfig, two_stage=True)
    assert two.proposer.class_embed is two.heads.class_embed[0] and two.proposer.score == "class0"
    assert (two.heads.bbox_embed[0].layers[-1].bias == 0).all()
    both = _fresh(DeformableDETRConfig, two_stage=True, box_refine=True)
    assert both.proposer.class_embed is not both.heads.class_embed[0]
    assert plain.encoder.pos_temperature == 10000.0 and plain.encoder.pos_offset == -0.5
