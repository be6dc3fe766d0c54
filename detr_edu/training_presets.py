"""Training hyper-parameter presets (optimiser, schedule, losses, data), one per model preset.

The *model* presets live in :mod:`detr_edu.config` (``get_preset(name)``); this module holds what
the training script needs besides the model, under the same names:

=========================  ======  ========  =====  ======  ======  ===========  =====  =========================
preset                     lr      backbone  wd     batch   epochs  lr drop      clip   source
=========================  ======  ========  =====  ======  ======  ===========  =====  =========================
``detr_r50_coco``          1e-4    1e-5      1e-4   64      500     400 (x0.1)   0.1    Carion et al. 2020, sec. 4
``deformable_detr_r50_coco`` 2e-4  2e-5      1e-4   32      50      40 (x0.1)    0.1    Zhu et al. 2021, sec. 5
``dino_r50_coco``          1e-4    1e-5      1e-4   16      12      11 (x0.1)    0.1    Zhang et al. 2022, sec. 4.1
=========================  ======  ========  =====  ======  ======  ===========  =====  =========================

(batch = total over all GPUs: DETR 16 V100 x 4, Deformable DETR 8 x 4, DINO 8 x 2 -- ``batch_size``
is per GPU, ``published_world_size`` the GPU count; loss weights: DETR class 1 (cross-entropy,
no-object weight 0.1), L1 5, GIoU 2; Deformable DETR and DINO focal class 2 and 1 respectively, L1
5, GIoU 2; Hungarian costs class 1/2/2, L1 5, GIoU 2. Deformable DETR and DINO train
``sampling_offsets`` and ``reference_points`` at lr x 0.1 (``lr_linear_proj_mult``, the official
``lr_linear_proj_mult``). Images: shorter side 480..800 step 32, longer side <= 1333, random flip,
and with probability 0.5 DETR's random resize-crop (resize to 400/500/600, crop 384..600, resize to
480..800: ``crop=True``). The backbone is an ImageNet ResNet-50 with frozen BatchNorm and its stem
and first stage frozen (``detr_edu.config``; ``--backbone-weights``). The numbers are as published;
they are not measured in this course.

The ``*_cpu`` presets train the small models of :mod:`detr_edu.config` on 128x128 digit scenes
(``python -m detr_edu.coco_export``), all three with the same recipe (so that chapter 08 compares
architectures, not recipes). Differences from the GPU recipes, and why (measured in chapter 08):

* a learning rate of 1e-3 (AdamW, gradient clipping 0.1), 5-10x the GPU recipes': small models,
  short budgets; the backbone is trained from scratch at 2e-4 -- a smaller ratio than the GPU
  recipes' 10x, which protects pretrained ImageNet features we do not have;
* a 20-step linear warm-up (from-scratch transformers with AdamW diverge less with one);
* batches of 4 images: in a fixed wall-clock budget more, smaller steps beat fewer, larger ones;
* one image size, 96 px (the 128-px scenes scaled by 0.75): 1.8x fewer pixels per step, and the
  digits (12-36 px after scaling) stay well above the stride-8 feature resolution;
* no horizontal flip: a mirrored digit is not the same digit (a mirrored 2 is not a 2).
"""  # noqa: E501

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TrainConfig", "get_training_preset", "TRAINING_PRESET_NAMES"]


@dataclass
class TrainConfig:
    """Everything the training loop needs besides the model (see the module docstring for values).

    Attributes:
        model_preset: name of the model preset in :func:`detr_edu.config.get_preset`.
        lr, lr_backbone, weight_decay: AdamW settings (backbone parameters get ``lr_backbone``).
        batch_size: images per step *per process* (the total is this times the world size).
        epochs: training length in epochs (ignored when a wall-clock budget is given).
        lr_drop: fraction of the training (epochs, or the budget) after which lr is multiplied by
            ``lr_gamma`` (0.8 = DETR's 400/500; 1.0 = never).
        warmup_iters: linear warm-up from 0.001 x lr over this many iterations (0 = none).
        clip_max_norm: gradient-norm clipping (0 = off).
        loss_weights: weight per loss name (suffixes ``_0``, ``_enc``, ``_dn`` inherit the base).
        class_loss: "focal" or "ce" (DETR's softmax with a no-object class).
        eos_coef: no-object weight of the cross-entropy.
        cost_class, cost_bbox, cost_giou: Hungarian matching costs.
        train_sizes, max_size: shorter-side sizes for random resizing and the longer-side cap.
        eval_size: shorter side at evaluation.
        flip: random horizontal flips in training.
        num_workers: data-loader processes per training process.
        eval_every_epochs: evaluate every this many epochs (epoch mode).
        eval_every_minutes: evaluate every this many minutes of training (budget mode).
        aux_loss: losses on every decoder layer (True) or on the last one only.
        dn_padding_in_loss: DINO's padded denoising queries count as "no object" in the denoising
            class loss (True: the official code) or are left out of every loss (False: the note's
            Q5, measured in chapter 07).
        lr_linear_proj_mult: the learning rate of deformable attention's ``sampling_offsets`` and
            of the one-stage ``reference_points`` is ``lr * lr_linear_proj_mult`` (official
            Deformable DETR and DINO: 0.1; 1.0 = no separate group).
        crop: DETR's random resize-crop augmentation with probability 0.5 (published recipes).
        published_world_size: how many GPUs the published recipe used (``batch_size`` x this = the
            published total batch); 1 for the CPU presets.
    """

    model_preset: str
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    batch_size: int = 2
    epochs: int = 12
    lr_drop: float = 11 / 12
    lr_gamma: float = 0.1
    warmup_iters: int = 0
    clip_max_norm: float = 0.1
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    )
    class_loss: str = "focal"
    eos_coef: float = 0.1
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    train_sizes: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int | None = 1333
    eval_size: int = 800
    flip: bool = True
    num_workers: int = 2
    eval_every_epochs: int = 1
    eval_every_minutes: float = 0.0
    aux_loss: bool = True
    dn_padding_in_loss: bool = True
    lr_linear_proj_mult: float = 1.0
    crop: bool = False
    published_world_size: int = 1

    def __post_init__(self) -> None:
        self.train_sizes = tuple(int(s) for s in self.train_sizes)
        if self.class_loss not in ("focal", "ce"):
            raise ValueError(f"class_loss must be 'focal' or 'ce', got {self.class_loss!r}")
        if not 0.0 < self.lr_drop <= 1.0:
            raise ValueError(f"lr_drop is a fraction of the training in (0, 1], got {self.lr_drop}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size}, {self.epochs}")


TRAINING_PRESET_NAMES = (
    "detr_cpu",
    "deformable_detr_cpu",
    "dino_cpu",
    "detr_r50_coco",
    "deformable_detr_r50_coco",
    "dino_r50_coco",
)


def get_training_preset(name: str) -> TrainConfig:
    """A fresh :class:`TrainConfig` for preset ``name`` (one of :data:`TRAINING_PRESET_NAMES`)."""
    coco = {
        "train_sizes": tuple(range(480, 801, 32)),
        "max_size": 1333,
        "eval_size": 800,
        "flip": True,
        "clip_max_norm": 0.1,
        "weight_decay": 1e-4,
        "num_workers": 2,
    }
    cpu = {
        "lr": 1e-3,
        "lr_backbone": 2e-4,  # from scratch: 5x (not the GPU recipes' 10x) below the transformer's
        "weight_decay": 1e-4,
        "batch_size": 4,  # more, smaller steps: ~2.4 steps/s at 2 threads
        "epochs": 50,
        "lr_drop": 0.8,
        "warmup_iters": 20,
        "clip_max_norm": 0.1,
        "train_sizes": (96,),  # the 128-px scenes at 96 px: 1.8x fewer pixels, digits still 12-36 px
        "max_size": None,
        "eval_size": 96,
        "flip": False,  # digits are not mirror-symmetric
        "num_workers": 0,  # scenes load in < 1 ms; worker processes would only compete for 2 cores
        "eval_every_minutes": 2.0,
    }
    if name == "detr_r50_coco":  # Carion et al. 2020, sec. 4 "Technical details" and A.4
        return TrainConfig(
            model_preset=name,
            lr=1e-4,
            lr_backbone=1e-5,
            batch_size=4,
            epochs=500,
            lr_drop=0.8,
            loss_weights={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
            class_loss="ce",
            eos_coef=0.1,
            cost_class=1.0,
            crop=True,
            published_world_size=16,
            **coco,
        )
    if name == "deformable_detr_r50_coco":  # Zhu et al. 2021, sec. 5 and A.2
        return TrainConfig(
            model_preset=name,
            lr=2e-4,
            lr_backbone=2e-5,
            batch_size=4,
            epochs=50,
            lr_drop=0.8,
            loss_weights={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
            lr_linear_proj_mult=0.1,
            crop=True,
            published_world_size=8,
            **coco,
        )
    if name == "dino_r50_coco":  # Zhang et al. 2022, sec. 4.1 (12-epoch "1x" schedule)
        return TrainConfig(
            model_preset=name,
            lr=1e-4,
            lr_backbone=1e-5,
            batch_size=2,
            epochs=12,
            lr_drop=11 / 12,
            loss_weights={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
            lr_linear_proj_mult=0.1,
            crop=True,
            published_world_size=8,
            **coco,
        )
    if name == "detr_cpu":
        # the course's DETR uses the sigmoid/focal head (config.DETRConfig), like the other two
        return TrainConfig(
            model_preset=name, loss_weights={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}, **cpu
        )
    if name == "deformable_detr_cpu":
        return TrainConfig(
            model_preset=name, loss_weights={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}, **cpu
        )
    if name == "dino_cpu":
        return TrainConfig(
            model_preset=name, loss_weights={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}, **cpu
        )
    raise ValueError(f"unknown training preset {name!r}; choose one of {', '.join(TRAINING_PRESET_NAMES)}")
