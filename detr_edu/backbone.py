"""Backbone and neck: pixels -> multi-level feature maps of one channel width, with padding masks.

* :class:`ResNetBackbone` wraps a torchvision ResNet (built with ``weights=None``; an optional local
  weights file) and returns the outputs of several of its stages (C3, C4, C5 for ``levels=(2, 3, 4)``).
* :class:`ChannelMapper` is the neck of Deformable DETR (Zhu et al. 2021, sec. 4.1 and appendix A.2):
  a 1x1 convolution + GroupNorm maps every level to ``embed_dim`` channels, and extra levels are made
  by 3x3 stride-2 convolutions on the last backbone level.
* :func:`level_masks` turns the image padding mask into one mask per level, exactly.
* :class:`Backbone` chains the three and is what the detectors call.

The published models (official Deformable-DETR and DINO, ``models/*/backbone.py:Joiner`` and
``deformable_detr.py:DeformableDETR.forward``; transformers' ``DeformableDetrConvEncoder``) build
the level masks by nearest-neighbour resizing of the image mask (``F.interpolate``), normalise the
neck with a plain GroupNorm over the whole padded map and feed the raw last backbone level to the
extra stride-2 convolution. That is the default here (``padding_invariant=False``), so that
published weights compute what they were trained to compute.

``padding_invariant=True`` is the course's option, so that an image gives the same features alone
and inside a padded batch (after the backbone itself; chapter 04 measures both):

* masks per level are computed from each image's valid size with the convolution arithmetic
  (``ceil(h / stride)``), not by nearest-neighbour resizing, which can be off by one;
* the neck's GroupNorm takes its statistics over valid pixels only (:class:`MaskedGroupNorm`), and
  padded pixels are set to zero before the extra stride-2 convolutions.

The pitfall of chapter 04: detection code freezes the BatchNorms of a *pretrained* ResNet
(``FrozenBatchNorm2d``). Do that to a randomly initialised ResNet and normalisation never happens;
with ``zero_init_residual=True`` (Goyal et al. 2017) the last BatchNorm of each residual branch is
zero, so every residual branch outputs zero and receives zero gradient forever. Without pretrained
weights, normalisation must train (``norm="batch"`` or ``norm="group"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_edu.checkpoint import read_torch_file
from detr_edu.config import BackboneConfig, check_transformer_levels
from detr_edu.masks import valid_sizes
from detr_edu.position import resize_mask

__all__ = [
    "ResNetBackbone",
    "ChannelMapper",
    "MaskedGroupNorm",
    "Backbone",
    "FeatureMaps",
    "level_masks",
    "check_images",
]

_RESNETS = {
    # depth: (block, blocks per stage); 10 is a ResNet-18 with one block per stage (CPU preset)
    10: (torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]),
    18: (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
    34: (torchvision.models.resnet.BasicBlock, [3, 4, 6, 3]),
    50: (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
}

NormName = Literal["batch", "frozen", "group"]


def check_images(images: Tensor, masks: Tensor | None = None, *, in_channels: int = 3) -> None:
    """Validate a padded image batch ``(B, 3, H, W)`` and its padding mask ``(B, H, W)`` (True = pad)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, {in_channels}, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("the batch is empty: images has shape " + str(tuple(images.shape)))
    if images.shape[1] != in_channels:
        raise ValueError(
            f"images must have {in_channels} channels, got {images.shape[1]} (shape {tuple(images.shape)})"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalised), got dtype {images.dtype}")
    if masks is None:
        return
    B, _, H, W = images.shape
    if masks.shape != (B, H, W):
        raise ValueError(f"masks must be (B, H, W) = {(B, H, W)} like the images, got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool (True = padding), got dtype {masks.dtype}")


def level_masks(masks: Tensor, shapes: Sequence[tuple[int, int]], strides: Sequence[int]) -> list[Tensor]:
    """Padding mask of every feature level, exact for stride-2 convolutions with ``ceil`` arithmetic.

    A 3x3/stride-2/pad-1 convolution (and ResNet's max pool and 1x1 stride-2 shortcut) maps ``h``
    valid rows to ``ceil(h / 2)``, so a level of stride ``s`` has ``ceil(h / s)`` valid rows. DETR
    resizes the image mask with nearest interpolation instead, which can be off by one row.

    Args:
        masks: (B, H, W) bool, True = padding.
        shapes: the (H_l, W_l) of every level.
        strides: every level's stride (a power of 2).

    Returns:
        one (B, H_l, W_l) bool mask per level.
    """
    if len(shapes) != len(strides):
        raise ValueError(f"got {len(shapes)} level shapes but {len(strides)} strides")
    sizes = valid_sizes(masks)  # (B, 2)
    out = []
    for (h_l, w_l), stride in zip(shapes, strides, strict=True):
        valid_l = torch.div(sizes + stride - 1, stride, rounding_mode="floor")  # (B, 2) ceil(size / s)
        rows = (
            torch.arange(h_l, device=masks.device)[None, :, None] >= valid_l[:, 0, None, None]
        )  # (B, H_l, 1)
        cols = (
            torch.arange(w_l, device=masks.device)[None, None, :] >= valid_l[:, 1, None, None]
        )  # (B, 1, W_l)
        out.append(rows | cols)  # (B, H_l, W_l)
    return out


class ResNetBackbone(nn.Module):
    """A torchvision ResNet returning the feature maps of chosen stages.

    Args:
        depth: 10, 18, 34 or 50 (10 = ResNet-18 layout with one block per stage, the CPU preset).
        levels: which stages to return, 1..4 (``layer1``..``layer4``, strides 4, 8, 16, 32).
        norm: ``"batch"`` (trainable BatchNorm), ``"group"`` (GroupNorm, 32 groups: batch-size
            independent) or ``"frozen"`` (``FrozenBatchNorm2d``: only for pretrained weights).
        zero_init_residual: zero the last norm of every residual branch (Goyal et al. 2017).
        weights_path: optional local ``state_dict`` file (e.g. torchvision's ImageNet weights saved
            beforehand); the ``fc`` layer is dropped. Never downloaded.
        drop_maxpool: remove the stem's max pool, halving every stride (for small images).
        freeze_at: freeze (``requires_grad=False``) the stem and the first ``freeze_at`` stages; the
            official DETR / Deformable-DETR / DINO code trains only ``layer2``-``layer4`` of its
            pretrained ResNet-50 (``freeze_at=1``).
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        levels: Sequence[int] = (2, 3, 4),
        norm: NormName = "batch",
        zero_init_residual: bool = False,
        weights_path: str | Path | None = None,
        drop_maxpool: bool = False,
        freeze_at: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= freeze_at <= 4:
            raise ValueError(f"freeze_at must be in 0..4, got {freeze_at}")
        if depth not in _RESNETS:
            raise ValueError(f"depth must be one of {sorted(_RESNETS)}, got {depth}")
        levels = tuple(levels)
        if not levels or list(levels) != sorted(set(levels)) or levels[0] < 1 or levels[-1] > 4:
            raise ValueError(f"levels must be increasing stage numbers in 1..4, got {levels}")
        if norm == "batch":
            norm_layer = nn.BatchNorm2d
        elif norm == "frozen":
            norm_layer = FrozenBatchNorm2d
        elif norm == "group":

            def norm_layer(c: int) -> nn.Module:
                return nn.GroupNorm(32, c)

        else:
            raise ValueError(f"norm must be 'batch', 'frozen' or 'group', got {norm!r}")
        block, layers = _RESNETS[depth]
        net = torchvision.models.resnet.ResNet(
            block, layers, norm_layer=norm_layer, zero_init_residual=zero_init_residual
        )
        if zero_init_residual and norm == "frozen":
            # torchvision zeroes ``bn.weight`` only for trainable norms; do it for the frozen buffers too
            for m in net.modules():
                last = (
                    getattr(m, "bn3", None) if isinstance(m, torchvision.models.resnet.Bottleneck) else None
                )
                last = (
                    getattr(m, "bn2", None) if isinstance(m, torchvision.models.resnet.BasicBlock) else last
                )
                if last is not None:
                    last.weight.zero_()
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise ValueError(f"weights_path {str(path)!r} does not exist (weights are never downloaded)")
            state = read_torch_file(path, what="ResNet state dict")
            if not isinstance(state, dict):
                raise ValueError(f"{path}: expected a ResNet state dict, got {type(state).__name__}")
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shape mismatches
                raise ValueError(
                    f"weights in {str(path)!r} do not fit ResNet-{depth}: {str(err)[:300]}"
                ) from err
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"weights in {str(path)!r} do not fit ResNet-{depth}: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
        self.stem = nn.Sequential(
            net.conv1, net.bn1, net.relu, nn.Identity() if drop_maxpool else net.maxpool
        )
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4][: levels[-1]])
        if freeze_at >= 1:  # the stem and the first stages keep their (pretrained) weights
            for module in [self.stem, *self.stages[:freeze_at]]:
                module.requires_grad_(False)
        self.freeze_at = freeze_at
        self.levels = levels
        width = 1 if block is torchvision.models.resnet.BasicBlock else 4
        base = 2 if drop_maxpool else 4
        self.out_channels = [64 * 2 ** (i - 1) * width for i in levels]
        self.strides = [base * 2 ** (i - 1) for i in levels]

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> one (B, C_l, H_l, W_l) map per requested stage."""
        check_images(images)
        x = self.stem(images)  # (B, 64, H/4, W/4)
        out = []
        for i, stage in enumerate(self.stages, start=1):
            x = stage(x)  # (B, C_i, H / s_i, W / s_i)
            if i in self.levels:
                out.append(x)
        return out


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics ignore padded pixels; padded pixels come out as zero.

    With ``mask=None`` it is exactly ``nn.GroupNorm``. With a mask, an image gives the same output
    alone and inside a padded batch (plain GroupNorm averages the padding in).
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if mask is None:
            return super().forward(x)
        B, C, H, W = x.shape
        if mask.shape != (B, H, W):
            raise ValueError(f"mask must be (B, H, W) = {(B, H, W)}, got {tuple(mask.shape)}")
        G = self.num_groups
        valid = (~mask).to(x.dtype)[:, None, None]  # (B, 1, 1, H, W)
        xg = x.view(B, G, C // G, H, W)  # (B, G, C/G, H, W)
        count = valid.sum(dim=(2, 3, 4), keepdim=True) * (C // G)  # (B, 1, 1, 1, 1)
        mean = (xg * valid).sum(dim=(2, 3, 4), keepdim=True) / count  # (B, G, 1, 1, 1)
        var = (((xg - mean) * valid) ** 2).sum(dim=(2, 3, 4), keepdim=True) / count  # (B, G, 1, 1, 1)
        xg = (xg - mean) / torch.sqrt(var + self.eps) * valid  # (B, G, C/G, H, W), padding -> 0
        x = xg.view(B, C, H, W)  # (B, C, H, W)
        if self.affine:
            x = x * self.weight[None, :, None, None] + self.bias[None, :, None, None] * valid[:, 0]
        return x


class ChannelMapper(nn.Module):
    """Deformable DETR's neck: every level to ``embed_dim`` channels, plus extra stride-2 levels.

    Args:
        in_channels: channels of each backbone level.
        embed_dim: output width C.
        num_extra_levels: extra levels made by 3x3 stride-2 convolutions (the first on the last
            backbone level, the next ones on the previous extra level), as Deformable DETR's
            fourth level (stride 64).
        num_groups: GroupNorm groups (32 in the papers; must divide ``embed_dim``).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        embed_dim: int = 256,
        num_extra_levels: int = 1,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if embed_dim % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide embed_dim={embed_dim}")
        self.in_channels = list(in_channels)
        self.convs = nn.ModuleList([nn.Conv2d(c, embed_dim, kernel_size=1) for c in in_channels])
        extra_in = [in_channels[-1]] + [embed_dim] * (num_extra_levels - 1)
        self.extra_convs = nn.ModuleList(
            [nn.Conv2d(c, embed_dim, kernel_size=3, stride=2, padding=1) for c in extra_in[:num_extra_levels]]
        )
        self.norms = nn.ModuleList(
            [MaskedGroupNorm(num_groups, embed_dim) for _ in range(len(in_channels) + num_extra_levels)]
        )
        for conv in [*self.convs, *self.extra_convs]:
            # Deformable DETR initialises the input projections with Xavier-uniform and zero bias
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)

    def forward(
        self, features: Sequence[Tensor], masks: Sequence[Tensor], *, masked: bool = True
    ) -> list[Tensor]:
        """Map backbone levels (B, C_l, H_l, W_l) to (B, C, H_l, W_l), adding the extra levels.

        Args:
            features: one map per backbone level.
            masks: one (B, H_l, W_l) padding mask per *output* level (backbone + extra).
            masked: GroupNorm statistics over valid pixels and zeroed padding before the extra
                convolutions (the course's padding-invariant neck); False: the published neck
                (plain GroupNorm, raw input), which ignores ``masks``.
        """
        if len(features) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} backbone levels, got {len(features)}")
        if len(masks) != len(self.convs) + len(self.extra_convs):
            raise ValueError(f"expected {len(self.norms)} level masks, got {len(masks)}")
        for f, c in zip(features, self.in_channels, strict=True):
            if f.shape[1] != c:
                raise ValueError(f"a backbone level has {f.shape[1]} channels, the neck expects {c}")
        out = [
            norm(conv(f), m if masked else None)
            for conv, norm, f, m in zip(self.convs, self.norms, features, masks, strict=False)
        ]  # L_backbone x (B, C, H_l, W_l)
        x = features[-1]
        m = masks[len(features) - 1]
        for i, conv in enumerate(self.extra_convs):
            if masked:
                # zero the padding so the stride-2 conv sees what zero-padding an image alone would give
                x = x.masked_fill(m[:, None], 0.0)  # (B, C_in, H, W)
            x = conv(x)  # (B, C, ceil(H/2), ceil(W/2))
            m = masks[len(features) + i]
            x = self.norms[len(features) + i](x, m if masked else None)  # (B, C, H_l, W_l)
            out.append(x)
        return out


@dataclass
class FeatureMaps:
    """What the backbone hands to the transformer.

    Attributes:
        features: one (B, C, H_l, W_l) map per level.
        masks: one (B, H_l, W_l) bool padding mask per level (True = pad).
    """

    features: list[Tensor]
    masks: list[Tensor]


class Backbone(nn.Module):
    """ResNet + neck + per-level masks: ``(images, masks) -> FeatureMaps`` with C channels.

    Args:
        depth, levels, norm, zero_init_residual, weights_path, drop_maxpool, freeze_at: see
            :class:`ResNetBackbone`.
        embed_dim: C of every output level.
        num_extra_levels: extra stride-2 levels of the neck (0 for DETR's single level).
        num_groups: GroupNorm groups in the neck.
        padding_invariant: exact level masks and the masked neck (the course's option, see the
            module docstring); False (default): the published models' nearest-resized masks and
            plain neck.
        transformer_levels: indices (0 = finest) of the pyramid levels handed on; ``None`` (default,
            the published models): all. The ResNet and neck compute every level either way, so
            ``(0,)`` is the same backbone with one level reaching the transformer (chapter 08, Q3).
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        levels: Sequence[int] = (2, 3, 4),
        norm: NormName = "batch",
        zero_init_residual: bool = False,
        weights_path: str | Path | None = None,
        drop_maxpool: bool = False,
        freeze_at: int = 0,
        embed_dim: int = 256,
        num_extra_levels: int = 1,
        num_groups: int = 32,
        padding_invariant: bool = False,
        transformer_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.padding_invariant = padding_invariant
        self.body = ResNetBackbone(
            depth=depth,
            levels=levels,
            norm=norm,
            zero_init_residual=zero_init_residual,
            weights_path=weights_path,
            drop_maxpool=drop_maxpool,
            freeze_at=freeze_at,
        )
        self.neck = ChannelMapper(
            in_channels=self.body.out_channels,
            embed_dim=embed_dim,
            num_extra_levels=num_extra_levels,
            num_groups=num_groups,
        )
        pyramid_strides = self.body.strides + [
            self.body.strides[-1] * 2**i for i in range(1, num_extra_levels + 1)
        ]
        self.pyramid_strides = pyramid_strides
        if transformer_levels is None:
            transformer_levels = range(len(pyramid_strides))
        self.transformer_levels = check_transformer_levels(
            transformer_levels, pyramid_levels=len(pyramid_strides)
        )
        self.strides = [pyramid_strides[i] for i in self.transformer_levels]
        self.num_levels = len(self.strides)

    @classmethod
    def from_config(cls, cfg: BackboneConfig, *, embed_dim: int, padding_invariant: bool = False) -> Backbone:
        """Build from a :class:`detr_edu.config.BackboneConfig`, the model's width C and its
        ``padding_invariant`` flag."""
        return cls(
            padding_invariant=padding_invariant,
            depth=cfg.depth,
            levels=cfg.levels,
            norm=cfg.norm,
            zero_init_residual=cfg.zero_init_residual,
            weights_path=cfg.weights_path,
            drop_maxpool=cfg.drop_maxpool,
            freeze_at=cfg.freeze_at,
            embed_dim=embed_dim,
            num_extra_levels=cfg.num_extra_levels,
            num_groups=cfg.num_groups,
            transformer_levels=cfg.transformer_levels,
        )

    def forward(self, images: Tensor, masks: Tensor | None = None) -> FeatureMaps:
        """Images (B, 3, H, W) and padding masks (B, H, W) -> :class:`FeatureMaps`.

        ``masks=None`` means no image is padded.
        """
        check_images(images, masks)
        if masks is None:
            masks = images.new_zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)  # (B, H, W)
        feats = self.body(images)  # L_backbone x (B, C_l, H_l, W_l)
        shapes = [tuple(f.shape[-2:]) for f in feats]
        for _ in range(len(self.pyramid_strides) - len(feats)):
            h, w = shapes[-1]
            shapes.append(((h + 1) // 2, (w + 1) // 2))  # a 3x3 stride-2 pad-1 conv halves with ceil
        if self.padding_invariant:
            lvl_masks = level_masks(masks, shapes, self.pyramid_strides)  # L_all x (B, H_l, W_l) exact
        else:
            lvl_masks = [resize_mask(masks, shape) for shape in shapes]  # L_all x (B, H_l, W_l) nearest
        features = self.neck(feats, lvl_masks, masked=self.padding_invariant)  # L_all x (B, C, H_l, W_l)
        # the course's Q3 option: hand only some levels on (all of them by default)
        keep = self.transformer_levels
        return FeatureMaps(features=[features[i] for i in keep], masks=[lvl_masks[i] for i in keep])
