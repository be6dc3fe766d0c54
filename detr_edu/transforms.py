"""Joint image + box transforms for detection training.

A detection transform must move the boxes with the pixels: a horizontal flip mirrors every box, a
resize scales them. Each transform here maps ``(image, target) -> (image, target)`` where

* ``image`` is a float tensor (3, H, W) with values in [0, 1] (the loader's output), and
* ``target`` holds ``boxes_xyxy_px`` float (G, 4) in pixels of the *current* image, ``labels``
  int64 (G,) and any other keys (passed through unchanged).

:class:`Normalize` comes last: it standardises the pixels and adds ``boxes`` -- normalised cxcywh
relative to the (unpadded) transformed image, the format the models and losses use.

Randomness comes from a ``torch.Generator`` passed to every call (``gen=``), never from the global
RNG: the dataset derives one generator per (seed, epoch, image), so an augmented sample does not
depend on the number of data-loader workers, on the rank of a distributed worker, or on where a
resumed run restarts (chapter 08).

Follows the DETR reference transforms (``datasets/transforms.py``: random resize with a maximum
size, horizontal flip, normalise to cxcywh), written from the paper's description (Carion et al.
2020, sec. 4 "Technical details": shortest side 480-800, longest at most 1333).

The paper's random crop (same section: "with probability 0.5 an image is cropped to a random
rectangular patch which is then resized again to 800-1333"), used unchanged by Deformable DETR and
DINO, is :class:`RandomSizeCrop` inside a :class:`RandomSelect`; ``make_transforms(crop=True)``
builds it. A crop drops the boxes it leaves empty, together with their labels and every other
per-box entry of the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detr_edu.box_ops import box_xyxy_to_cxcywh

__all__ = [
    "Compose",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSizeCrop",
    "RandomSelect",
    "crop_region",
    "PER_IMAGE_KEYS",
    "CROP_RESIZE_SIZES",
    "CROP_MIN_SIZE",
    "CROP_MAX_SIZE",
    "Normalize",
    "resized_shape",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "make_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = dict[str, Tensor]

# Entries of a target that describe the whole image, never one box: a crop must not filter them even
# when their first dimension happens to equal the number of boxes (``orig_size`` is (2,), as are the
# labels of an image with two boxes).
PER_IMAGE_KEYS = frozenset({"image_id", "orig_size", "size"})

# The crop branch of the published recipe (DETR ``main.py``/``datasets/coco.py``, reused by Deformable
# DETR and DINO): shorter side to one of these first (no cap on the longer side), then a crop of
# height and width each in [384, 600] px.
CROP_RESIZE_SIZES = (400, 500, 600)
CROP_MIN_SIZE, CROP_MAX_SIZE = 384, 600


def _check(image: Tensor, target: Target, where: str) -> None:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{where}: image must be (3, H, W), got {tuple(image.shape)}")
    boxes = target.get("boxes_xyxy_px")
    if boxes is None:
        raise ValueError(f"{where}: target needs 'boxes_xyxy_px' (G, 4), got keys {sorted(target)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes_xyxy_px must be (G, 4), got {tuple(boxes.shape)}")


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: Tensor, target: Target, *, gen: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target, gen=gen)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``; boxes follow: x0' = W - x1, x1' = W - x0."""

    def __init__(self, *, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = p

    def __call__(
        self, image: Tensor, target: Target, *, gen: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        _check(image, target, "RandomHorizontalFlip")
        # Always draw, even when p is 0 or 1, so later transforms see the same random stream.
        if float(torch.rand((), generator=gen)) >= self.p:
            return image, target
        W = image.shape[-1]
        image = image.flip(-1)  # (3, H, W)
        boxes = target["boxes_xyxy_px"]  # (G, 4)
        flipped = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)  # (G, 4)
        return image, {**target, "boxes_xyxy_px": flipped}

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resized_shape(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) with the shorter side ``size``, aspect kept, unless the longer side would exceed ``max_size``.

    When it would, the shorter side shrinks so the longer side is ``max_size`` (DETR's rule: shortest
    side 800, longest at most 1333).
    """
    if size < 1 or (max_size is not None and max_size < 1):
        raise ValueError(f"size and max_size must be >= 1, got {size} and {max_size}")
    short, long = min(height, width), max(height, width)
    if max_size is not None and long * size / short > max_size:
        size = max(1, int(round(max_size * short / long)))
    if height <= width:
        return size, max(1, int(round(size * width / height)))
    return max(1, int(round(size * height / width))), size


class RandomResize:
    """Resize so the shorter side is one of ``sizes`` (drawn uniformly), the longer at most ``max_size``.

    Boxes are scaled by the same factors as the image (separately in x and y, since rounding makes
    them differ slightly). Bilinear with antialiasing, as PIL's resize in the reference code.
    """

    def __init__(self, *, sizes: Sequence[int], max_size: int | None = None) -> None:
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be a non-empty list of positive ints, got {list(sizes)}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size

    def __call__(
        self, image: Tensor, target: Target, *, gen: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        _check(image, target, "RandomResize")
        choice = int(torch.randint(len(self.sizes), (), generator=gen))
        H, W = image.shape[-2:]
        h, w = resized_shape(H, W, self.sizes[choice], self.max_size)
        if (h, w) == (H, W):
            return image, target
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[
            0
        ]
        image = image.clamp(0.0, 1.0)  # (3, h, w) antialiasing can overshoot slightly
        scale = torch.tensor([w / W, h / H, w / W, h / H], dtype=target["boxes_xyxy_px"].dtype)  # (4,)
        return image, {**target, "boxes_xyxy_px": target["boxes_xyxy_px"] * scale}

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


def crop_region(
    image: Tensor, target: Target, *, top: int, left: int, height: int, width: int
) -> tuple[Tensor, Target]:
    """Cut the region rows ``top:top+height``, columns ``left:left+width`` out of the image.

    Boxes move by the region's offset and are clipped to it; boxes left with zero width or height (they
    lay outside the region, or only touched its edge) are dropped, and with them the same rows of every
    other per-box entry -- a tensor whose first dimension is G, the number of boxes (``labels``,
    ``area``, ``iscrowd``, a stale ``boxes``, ...). Per-image entries (:data:`PER_IMAGE_KEYS`, scalars,
    non-tensors) pass through unchanged. Per-box entries are only filtered, not recomputed (an ``area``
    keeps its old value); ``boxes`` and ``size`` are recomputed by :class:`Normalize`, as after a resize.
    """
    _check(image, target, "crop_region")
    H, W = image.shape[-2:]
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > H or left + width > W:
        raise ValueError(
            f"crop_region: region top={top}, left={left}, height={height}, width={width} must lie inside "
            f"the {H}x{W} image with height, width >= 1"
        )
    image = image[:, top : top + height, left : left + width].contiguous()  # (3, height, width)
    boxes = target["boxes_xyxy_px"]  # (G, 4)
    offset = torch.tensor([left, top, left, top], dtype=boxes.dtype)  # (4,)
    upper = torch.tensor([width, height, width, height], dtype=boxes.dtype)  # (4,)
    moved = torch.minimum(boxes - offset, upper).clamp(min=0.0)  # (G, 4) clipped to the region
    keep = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])  # (G,) non-empty boxes
    G = boxes.shape[0]
    out: Target = {}
    for key, value in target.items():
        if key == "boxes_xyxy_px":
            out[key] = moved[keep]  # (G', 4)
        elif key not in PER_IMAGE_KEYS and isinstance(value, Tensor) and value.dim() >= 1 and len(value) == G:
            out[key] = value[keep]  # (G', ...)
        else:
            out[key] = value
    return image, out


class RandomSizeCrop:
    """Crop a random region whose height and width are each uniform integers in [min_size, max_size].

    Each side is clamped to the image first: a side of the image shorter than ``max_size`` bounds the
    draw, and one shorter than ``min_size`` is kept whole. The region's position is uniform over the
    positions that fit. Four draws per call, always (height, width, top, left), so later transforms see
    the same random stream whatever the image size. See :func:`crop_region` for what happens to the boxes.
    """

    def __init__(self, min_size: int = CROP_MIN_SIZE, max_size: int = CROP_MAX_SIZE) -> None:
        if not isinstance(min_size, int) or not isinstance(max_size, int):
            raise ValueError(f"min_size and max_size must be ints, got {min_size!r} and {max_size!r}")
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        if min_size > max_size:
            raise ValueError(f"min_size must be <= max_size, got min_size={min_size} > max_size={max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def get_params(
        self, height: int, width: int, gen: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """A random region ``(top, left, h, w)`` of a ``height`` x ``width`` image."""
        hi_h, hi_w = min(height, self.max_size), min(width, self.max_size)
        h = int(torch.randint(min(self.min_size, hi_h), hi_h + 1, (), generator=gen))
        w = int(torch.randint(min(self.min_size, hi_w), hi_w + 1, (), generator=gen))
        top = int(torch.randint(height - h + 1, (), generator=gen))
        left = int(torch.randint(width - w + 1, (), generator=gen))
        return top, left, h, w

    def __call__(
        self, image: Tensor, target: Target, *, gen: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        _check(image, target, "RandomSizeCrop")
        H, W = image.shape[-2:]
        top, left, h, w = self.get_params(H, W, gen)
        return crop_region(image, target, top=top, left=left, height=h, width=w)  # (3, h, w)

    def __repr__(self) -> str:
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply ``a`` with probability ``p``, otherwise ``b`` (one draw per call, whatever ``p``)."""

    def __init__(self, a: Callable, b: Callable, *, p: float = 0.5) -> None:
        if not callable(a) or not callable(b):
            raise ValueError(f"RandomSelect needs two transforms, got {a!r} and {b!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.a, self.b, self.p = a, b, p

    def __call__(
        self, image: Tensor, target: Target, *, gen: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        chosen = self.a if float(torch.rand((), generator=gen)) < self.p else self.b
        return chosen(image, target, gen=gen)

    def __repr__(self) -> str:
        return f"RandomSelect({self.a!r}, {self.b!r}, p={self.p})"


class Normalize:
    """Standardise pixels with ``mean``/``std`` and add ``boxes``: normalised cxcywh of the current image.

    Also records ``size`` (h, w) of the transformed image (before padding), which post-processing
    and the collate function need.
    """

    def __init__(self, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {list(mean)} and {list(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(
        self, image: Tensor, target: Target, *, gen: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        _check(image, target, "Normalize")
        H, W = image.shape[-2:]
        mean = torch.tensor(self.mean, dtype=image.dtype)[:, None, None]  # (3, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype)[:, None, None]  # (3, 1, 1)
        image = (image - mean) / std  # (3, H, W)
        boxes_xyxy = target["boxes_xyxy_px"] / torch.tensor([W, H, W, H], dtype=torch.float32)  # (G, 4)
        target = {
            **target,
            "boxes": box_xyxy_to_cxcywh(boxes_xyxy),  # (G, 4) normalised cxcywh
            "size": torch.tensor([H, W], dtype=torch.int64),  # (2,)
        }
        return image, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def make_transforms(
    *, train: bool, sizes: Sequence[int], max_size: int | None, flip: bool = True, crop: bool = False
) -> Compose:
    """The course's pipeline: [random flip] -> random resize (train) or largest size (eval) -> normalise.

    With ``crop`` (training only) the resize becomes the published random resize-crop: with
    probability 0.5 the plain random resize, otherwise a resize of the shorter side to 400, 500 or 600,
    a :class:`RandomSizeCrop` of 384-600 px per side, then the random resize::

        flip -> RandomSelect(RandomResize(sizes, max_size),
                             Compose([RandomResize((400, 500, 600)), RandomSizeCrop(384, 600),
                                      RandomResize(sizes, max_size)])) -> Normalize

    Args:
        train: training (random size from ``sizes``, random flip) or evaluation (the largest size).
        sizes: shorter-side sizes to draw from (DETR on COCO: 480, 512, ..., 800).
        max_size: cap on the longer side (DETR: 1333); None for no cap.
        flip: use the random horizontal flip when training. Digits are not mirror-symmetric, so the
            digit-scene presets turn it off (a mirrored 2 is not a 2).
        crop: use the random resize-crop when training (ignored for evaluation). The published COCO
            recipes (DETR, Deformable DETR, DINO) use it; the CPU digit recipe does not: its crop
            sizes are COCO's, and on 128-px scenes a crop can cut digits in half. False (the default)
            gives exactly the pipeline without it -- the same random draws and the same outputs.
    """
    if train:
        steps: list = [RandomHorizontalFlip(p=0.5)] if flip else []
        if crop:
            resize_crop = Compose(
                [
                    RandomResize(sizes=CROP_RESIZE_SIZES),
                    RandomSizeCrop(CROP_MIN_SIZE, CROP_MAX_SIZE),
                    RandomResize(sizes=sizes, max_size=max_size),
                ]
            )
            steps.append(RandomSelect(RandomResize(sizes=sizes, max_size=max_size), resize_crop, p=0.5))
        else:
            steps.append(RandomResize(sizes=sizes, max_size=max_size))
    else:
        steps = [RandomResize(sizes=[max(sizes)], max_size=max_size)]
    steps.append(Normalize())
    return Compose(steps)
