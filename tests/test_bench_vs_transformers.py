"""The training comparison in benchmarks/bench_vs_transformers.py compares like with like: the
transformers model is built to the course preset's sizes, trains its whole backbone with trainable
BatchNorm like the preset, answers the course's ``model(images, masks)`` call, and its loss is the
recipe's weighted sum of transformers' terms. (Nothing here is timed.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_vs_transformers as bench  # noqa: E402

from detr_edu.build import build_model  # noqa: E402
from detr_edu.config import get_preset  # noqa: E402


@pytest.fixture(scope="module")
def models():
    cfg = get_preset("deformable_detr_cpu")
    torch.manual_seed(0)
    return cfg, build_model(cfg), bench.build_hf(cfg)


def test_same_sizes_and_everything_trainable(models):
    cfg, ours, hf = models
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert abs(n_ours - n_hf) / n_ours < 1e-3, (n_ours, n_hf)
    assert all(p.requires_grad for p in hf.parameters())
    assert not [m for m in hf.modules() if "Frozen" in type(m).__name__]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in hf.modules()) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules()
    )
    hc = hf.config
    assert (hc.d_model, hc.encoder_layers, hc.decoder_layers, hc.num_queries) == (
        cfg.embed_dim,
        cfg.num_encoder_layers,
        cfg.num_decoder_layers,
        cfg.num_queries,
    )
    assert hc.with_box_refine == cfg.box_refine and hc.two_stage == cfg.two_stage


def test_adapter_output_and_recipe_loss(models):
    cfg, _, hf = models
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[1, :, 48:] = True
    out = bench.HFDetector(hf).eval()(images, masks)
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    hf.train()
    labels = [
        {
            "class_labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]]),
        },
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3]])},
    ]
    res = hf(pixel_values=images, pixel_mask=(~masks).long(), labels=labels)
    weights = {"class": 2.0, "bbox": 5.0, "giou": 2.0}
    total = bench._hf_loss(res, weights)
    d = res.loss_dict
    expected = sum(
        weights[{"loss_ce": "class", "loss_bbox": "bbox", "loss_giou": "giou"}[k.rstrip("_0123456789")]] * v
        for k, v in d.items()
        if k.rstrip("_0123456789") in ("loss_ce", "loss_bbox", "loss_giou")
    )
    torch.testing.assert_close(total, expected)
    assert sum(k.startswith("loss_ce") for k in d) == cfg.num_decoder_layers  # every decoder layer
