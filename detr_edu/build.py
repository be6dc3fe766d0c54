"""Turn a model config (:mod:`detr_edu.config`) into a model: the one place that knows every model.

``config`` is a leaf (dataclasses only); each model module imports its own config class; this
module sits above all three models and picks one, so no model imports another and ``config``
imports nothing of the package.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from detr_edu.config import DeformableDETRConfig, DETRConfig, DINOConfig, ModelConfig
from detr_edu.deformable_detr import DeformableDETR
from detr_edu.denoising import ContrastiveDenoising
from detr_edu.detr import DETR
from detr_edu.dino import DINO

__all__ = ["build_model"]


def build_model(cfg: ModelConfig, *, load_backbone_weights: bool = True) -> nn.Module:
    """Instantiate the model a config describes (DETR, DeformableDETR or DINO).

    ``load_backbone_weights=False`` ignores ``cfg.backbone.weights_path`` (every weight is about to
    be loaded from a checkpoint, and the ImageNet file need not exist any more).

    DINO is given its contrastive-denoising generator (chapter 07) through ``denoiser=`` when
    ``cfg.dn_number > 0``; it is used in training mode when the forward pass is given the targets.
    The denoiser's label embedding is drawn *after* the model's weights, from a forked global
    generator, so that the model's weights and every later random draw are the same with or
    without denoising (``dn_number=0`` changes nothing else).
    """
    if not load_backbone_weights and getattr(cfg, "backbone", None) is not None:
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights_path=None))
    if isinstance(cfg, DETRConfig):
        return DETR.from_config(cfg)
    if isinstance(cfg, DeformableDETRConfig):
        return DeformableDETR.from_config(cfg)
    if isinstance(cfg, DINOConfig):
        if cfg.dn_number < 0:
            raise ValueError(f"dn_number must be >= 0 (0 = no denoising), got {cfg.dn_number}")
        if cfg.dn_number == 0:
            return DINO.from_config(cfg)
        with torch.random.fork_rng(devices=[]):
            denoiser = ContrastiveDenoising.from_config(cfg)  # its weights are re-drawn below
        model = DINO.from_config(cfg, denoiser=denoiser)
        with torch.random.fork_rng(devices=[]):
            denoiser.reset_parameters()  # drawn where the model's draws end, then the RNG restored
        return model
    raise ValueError(
        f"cfg must be a DETRConfig, DeformableDETRConfig or DINOConfig, got {type(cfg).__name__}"
    )
