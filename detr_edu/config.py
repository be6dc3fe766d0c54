"""Model presets as plain dataclasses (no model code: :func:`detr_edu.build.build_model` builds them).

Two families:

* ``*_cpu`` -- the small models the course trains on 128x128 digit scenes (10 classes) on two CPU
  cores: a ResNet-10 (one BasicBlock per stage), C = 128, 2 encoder + 3 decoder layers;
* ``*_r50_coco`` -- the published ResNet-50 COCO configurations, for GPUs::

  ============================  =====  =======  ========  ===========  ======  =====  ================
  preset                        C      enc/dec  queries   FFN          drop    levels  source
  ============================  =====  =======  ========  ===========  ======  =====  ================
  ``detr_r50_coco``             256    6/6      100       2048         0.1     1      Carion et al. 2020, sec. 4 and A.4
  ``deformable_detr_r50_coco``  256    6/6      300       1024         0.1     4      Zhu et al. 2021, sec. 5 and A.2
  ``dino_r50_coco``             256    6/6      900       2048         0.0     4      Zhang et al. 2022, sec. 4.1 (DINO-4scale)
  ============================  =====  =======  ========  ===========  ======  =====  ================

  (DETR-R50 trains 500 epochs, lr 1e-4 / backbone 1e-5, weight decay 1e-4, gradient clip 0.1;
  Deformable DETR 50 epochs at lr 2e-4, drop at 40; DINO 12 epochs ("1x") at lr 1e-4, drop at 11,
  dn_number 100, label_noise_ratio 0.5, box_noise_scale 0.4 -- as published; the training chapter
  owns the optimiser settings.) ``num_classes = 91`` follows DETR's use of the raw COCO category ids;
  a COCO loader that remaps ids to 0..79 sets it to 80.

Configs are dataclasses so a preset can be edited with :func:`dataclasses.replace` and saved into a
checkpoint with :func:`dataclasses.asdict`. This module imports no other ``detr_edu`` module: every
model imports its config from here, and :mod:`detr_edu.build` turns a config into a model.
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

__all__ = [
    "BackboneConfig",
    "check_transformer_levels",
    "DETRConfig",
    "DeformableDETRConfig",
    "DINOConfig",
    "ModelConfig",
    "PRESET_NAMES",
    "get_preset",
    "config_from_dict",
    "config_to_dict",
]


def check_transformer_levels(chosen: Sequence[int], *, pyramid_levels: int) -> tuple[int, ...]:
    """``chosen`` as a tuple, or a ValueError unless it is increasing indices in 0..pyramid_levels-1."""
    chosen = tuple(int(i) for i in chosen)
    if not chosen or list(chosen) != sorted(set(chosen)) or chosen[0] < 0 or chosen[-1] >= pyramid_levels:
        raise ValueError(
            f"transformer_levels must be increasing indices into the {pyramid_levels} pyramid levels "
            f"(0..{pyramid_levels - 1}), got {chosen}"
        )
    return chosen


@dataclass
class BackboneConfig:
    """Arguments of :class:`detr_edu.backbone.Backbone` (except ``embed_dim``, taken from the model).

    The published ResNet-50 models start from ImageNet weights with frozen BatchNorm
    (``norm="frozen"``) and the stem and first stage frozen (``freeze_at=1``), as the official
    DETR / Deformable-DETR / DINO code (``backbone.py``: only ``layer2``-``layer4`` train). A config
    may describe such a backbone without ``weights_path`` (to load a whole published checkpoint, or
    to measure speed); *training* one from random weights is refused by the training command
    unless asked for (``--backbone-from-scratch``): frozen random statistics never normalise, and
    with ``zero_init_residual`` every residual branch stays dead (chapter 04 shows it).

    ``transformer_levels`` is the course's option for the note's Q3 (chapter 08): the indices, in
    the pyramid of ``levels`` + extra levels (0 = the finest), of the levels handed to the
    transformer. ``None`` (default, as every published model) hands over all of them. With
    ``(0,)`` the ResNet and neck are unchanged and only the stride-8 map reaches the encoder, so a
    one-level model keeps the same backbone as the multi-scale one.
    """

    depth: int = 50
    levels: tuple[int, ...] = (2, 3, 4)
    norm: Literal["batch", "frozen", "group"] = "batch"
    zero_init_residual: bool = False
    weights_path: str | None = None
    drop_maxpool: bool = False
    num_extra_levels: int = 1
    num_groups: int = 32
    freeze_at: int = 0
    transformer_levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)
        if self.transformer_levels is not None:
            self.transformer_levels = check_transformer_levels(
                self.transformer_levels, pyramid_levels=len(self.levels) + self.num_extra_levels
            )
        if not 0 <= self.freeze_at <= 4:
            raise ValueError(
                f"freeze_at must be in 0..4 (0: train everything, 1: freeze the stem and stage 1, ...), "
                f"got {self.freeze_at}"
            )

    @property
    def num_levels(self) -> int:
        """How many levels the transformer sees."""
        if self.transformer_levels is not None:
            return len(self.transformer_levels)
        return len(self.levels) + self.num_extra_levels


@dataclass
class DETRConfig:
    """DETR (Carion et al. 2020): dense transformer on one level, learned object queries.

    ``no_object_class=True`` is the paper's softmax head with K + 1 logits (train with
    ``class_loss="ce"``); the course's default is the sigmoid/focal head the other two models use,
    so that comparisons isolate the architecture.
    """

    num_classes: int = 91
    embed_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    feedforward_dim: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    no_object_class: bool = False
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(levels=(4,), num_extra_levels=0))


@dataclass
class DeformableDETRConfig:
    """Deformable DETR (Zhu et al. 2021), with its two ablation flags ``box_refine`` and ``two_stage``.

    ``padding_invariant`` switches on the course's padding-invariant option (exact level masks,
    masked neck, no proposal from padding); False is the published model.
    """

    num_classes: int = 91
    embed_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    feedforward_dim: int = 1024
    dropout: float = 0.1
    num_queries: int = 300
    num_points: int = 4
    weights_from: Literal["query", "content"] = "query"
    box_refine: bool = False
    two_stage: bool = False
    padding_invariant: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


@dataclass
class DINOConfig:
    """DINO (Zhang et al. 2022): two-stage, box refinement, mixed query selection, look forward twice.

    ``dn_number``, ``label_noise_ratio`` and ``box_noise_scale`` configure contrastive denoising
    (chapter 07): :func:`detr_edu.build.build_model` gives DINO a
    :class:`detr_edu.denoising.ContrastiveDenoising` built from them; ``dn_number=0`` builds DINO
    without denoising. The defaults are the official ``DINO_4scale`` config (``dn_box_noise_scale``
    0.4; detrex uses 1.0). ``padding_invariant``: the course's option, as for Deformable DETR.
    """

    num_classes: int = 91
    embed_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    feedforward_dim: int = 2048
    dropout: float = 0.0
    num_queries: int = 900
    num_points: int = 4
    weights_from: Literal["query", "content"] = "query"
    look_forward_twice: bool = True
    mixed_query_selection: bool = True
    dn_number: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 0.4
    padding_invariant: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


ModelConfig = DETRConfig | DeformableDETRConfig | DINOConfig

PRESET_NAMES = (
    "detr_cpu",
    "deformable_detr_cpu",
    "dino_cpu",
    "detr_r50_coco",
    "deformable_detr_r50_coco",
    "dino_r50_coco",
)


def _cpu_backbone(levels: tuple[int, ...], num_extra_levels: int) -> BackboneConfig:
    # ResNet-10: a ResNet-18 with one block per stage; trainable BatchNorm (no pretrained weights)
    return BackboneConfig(
        depth=10, levels=levels, norm="batch", num_extra_levels=num_extra_levels, num_groups=32
    )


def _imagenet_backbone(levels: tuple[int, ...], num_extra_levels: int) -> BackboneConfig:
    # the published recipe: ImageNet ResNet-50, frozen BatchNorm, stem and stage 1 frozen
    return BackboneConfig(
        depth=50, levels=levels, norm="frozen", freeze_at=1, num_extra_levels=num_extra_levels
    )


def get_preset(name: str, *, num_classes: int | None = None) -> ModelConfig:
    """A fresh config for preset ``name`` (one of :data:`PRESET_NAMES`).

    Args:
        name: preset name.
        num_classes: override the preset's class count (e.g. 80 for remapped COCO ids).
    """
    cpu = {
        "embed_dim": 128,
        "num_heads": 8,
        "num_encoder_layers": 2,
        "num_decoder_layers": 3,
        "feedforward_dim": 512,
        "num_classes": 10,
    }
    if name == "detr_cpu":
        # one level at stride 16 (8x8 tokens on a 128-px image): C5 alone would be 4x4
        cfg: ModelConfig = DETRConfig(**cpu, dropout=0.0, num_queries=30, backbone=_cpu_backbone((3,), 0))
    elif name == "deformable_detr_cpu":
        cfg = DeformableDETRConfig(
            **cpu, dropout=0.0, num_queries=30, box_refine=True, backbone=_cpu_backbone((2, 3, 4), 1)
        )
    elif name == "dino_cpu":
        # dn_number 50: DINO's group rule gives dn_number // (most targets) groups from 50 on (below,
        # 2 * dn_number groups); box noise 1.0 as detrex (the official COCO config uses 0.4)
        cfg = DINOConfig(
            **cpu, num_queries=30, dn_number=50, box_noise_scale=1.0, backbone=_cpu_backbone((2, 3, 4), 1)
        )
    elif name == "detr_r50_coco":
        cfg = DETRConfig(no_object_class=True, backbone=_imagenet_backbone(levels=(4,), num_extra_levels=0))
    elif name == "deformable_detr_r50_coco":
        cfg = DeformableDETRConfig(backbone=_imagenet_backbone(levels=(2, 3, 4), num_extra_levels=1))
    elif name == "dino_r50_coco":
        cfg = DINOConfig(backbone=_imagenet_backbone(levels=(2, 3, 4), num_extra_levels=1))
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    if num_classes is not None:
        cfg.num_classes = num_classes
    return cfg


def config_to_dict(cfg: ModelConfig) -> dict:
    """``{"model": type(cfg).__name__, **dataclasses.asdict(cfg)}``: what :func:`config_from_dict` reads."""
    return {"model": type(cfg).__name__, **asdict(cfg)}


def config_from_dict(data: dict) -> ModelConfig:
    """Rebuild a config saved with ``{"model": type(cfg).__name__, **dataclasses.asdict(cfg)}``."""
    data = dict(data)
    kinds = {"DETRConfig": DETRConfig, "DeformableDETRConfig": DeformableDETRConfig, "DINOConfig": DINOConfig}
    kind = data.pop("model", None)
    if kind not in kinds:
        raise ValueError(f"data['model'] must be one of {sorted(kinds)}, got {kind!r}")
    backbone = BackboneConfig(**data.pop("backbone"))
    return kinds[kind](**data, backbone=backbone)
