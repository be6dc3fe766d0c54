"""Digit scenes: a tiny, deterministic detection dataset built from real handwritten digits.

Each scene is a 128x128 RGB canvas with 1-6 of scikit-learn's 8x8 handwritten digits
(``sklearn.datasets.load_digits``, 1,797 images, classes 0-9) pasted on it, each upscaled to
16-48 pixels, in a random bright colour, on a dark noisy background, with little overlap. The box of
a digit is the tight box of its *ink* (the upscaled pixels whose intensity is at least
``ink_threshold``), not the square it was pasted in: most 8x8 digits leave their outer columns
empty, so the paste square would be a loose, wrong box.

The 1,797 digit images are split once, per class, 80/20 into ``"train"`` and ``"val"`` with a fixed
permutation (:func:`digit_split`), so that a validation scene never shows a digit image seen in a
training scene. (The split is by image, not by writer: scikit-learn's digits are the UCI test set,
written by 13 people, with no writer ids.) Everything is deterministic: scene ``index`` of
``DigitScenes(seed=s, split=...)`` is the same on every machine and does not depend on how many
scenes the dataset holds.

Chapter 05 draws matching examples on these scenes; chapter 08 builds its COCO-format dataset
on :class:`DigitScenes`.

Typical use::

    image, target = make_scene(seed=3)            # image (3, 128, 128) float in [0, 1]
    target["labels"]                              # int64 (G,) classes 0-9
    target["boxes"]                               # float (G, 4) normalised cxcywh
    dataset = DigitScenes(1000, seed=0, split="train")
    image, target = dataset[17]
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detr_edu.box_ops import box_xyxy_to_cxcywh

__all__ = [
    "NUM_CLASSES",
    "SPLIT_SEED",
    "digit_split",
    "make_scene",
    "make_scenes",
    "DigitScenes",
    "collate_scenes",
]

NUM_CLASSES = 10
# The seed of the one fixed train/val permutation of the 1,797 digit images. Changing it would
# change every scene of the course; it is a constant, not an option.
SPLIT_SEED = 20_240_501
_SPLITS = ("train", "val")


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float32 intensities in [0, 1], shape (1797, 8, 8), and int64 labels.

    Cached because every scene needs them and reading them costs ~20 ms; the arrays are made
    read-only so that no caller can change the cached copy.
    """
    from sklearn.datasets import load_digits  # imported lazily: only scenes need scikit-learn

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8), values were 0..16
    labels = digits.target.astype(np.int64)  # (1797,)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


@functools.cache
def _split_indices(split: str) -> np.ndarray:
    _, labels = _load_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = []
    for cls in range(NUM_CLASSES):
        members = np.flatnonzero(labels == cls)  # indices of this class, sorted
        members = members[rng.permutation(len(members))]
        n_train = int(round(0.8 * len(members)))  # 80/20 within each class (stratified)
        chosen.append(members[:n_train] if split == "train" else members[n_train:])
    indices = np.sort(np.concatenate(chosen))
    indices.setflags(write=False)
    return indices


def digit_split(split: str = "train") -> np.ndarray:
    """Indices into ``load_digits()`` of the digit images a split may use.

    The split is fixed (seed :data:`SPLIT_SEED`) and stratified: 80 % of each class's images are
    ``"train"``, the other 20 % are ``"val"``. The two sets are disjoint and together cover all
    1,797 images (1,438 train, 359 val).

    Args:
        split: ``"train"`` or ``"val"``.

    Returns:
        Sorted int64 indices, read-only.
    """
    _check_split(split)
    return _split_indices(split)


def _scene_generator(seed: int, split: str, index: int) -> torch.Generator:
    # Mix (seed, split, index) into one 63-bit seed with NumPy's SeedSequence (a proper hash), so
    # that scene i of a dataset does not depend on the dataset's length and neighbouring seeds
    # give unrelated scenes.
    mixed = np.random.SeedSequence([seed, _SPLITS.index(split), index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 31 | int(mixed[1]) >> 1)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def _random_bright_colour(gen: torch.Generator) -> Tensor:
    """A saturated, bright RGB colour (HSV with S in [0.5, 1], V in [0.75, 1]), shape (3,)."""
    h, s, v = _uniform(gen, 0.0, 1.0), _uniform(gen, 0.5, 1.0), _uniform(gen, 0.75, 1.0)
    # HSV -> RGB, the standard piecewise-linear formula written with a modulo.
    k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6.0) % 6.0  # (3,)
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)  # (3,)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection of two pixel rectangles (x0, y0, x1, y1) over the smaller one's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def make_scene(
    *,
    seed: int,
    split: str = "train",
    index: int = 0,
    image_size: int = 128,
    min_digits: int = 1,
    max_digits: int = 6,
    min_digit_size: int = 16,
    max_digit_size: int = 48,
    max_overlap: float = 0.1,
    noise_std: float = 0.04,
    ink_threshold: float = 0.25,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Draw one digit scene, fully determined by ``(seed, split, index)`` and the options.

    Args:
        seed: the dataset seed.
        split: ``"train"`` or ``"val"``: which digit images may appear (see :func:`digit_split`).
        index: the scene's number within the dataset (mixed into the seed).
        image_size: side of the square canvas in pixels.
        min_digits, max_digits: the number of digits is drawn uniformly from this range.
        min_digit_size, max_digit_size: side, in pixels, of the square a digit is upscaled to.
        max_overlap: largest allowed intersection of two digits' squares over the smaller square;
            a digit that cannot be placed in 100 tries is dropped (rare with the defaults).
        noise_std: standard deviation of the background's Gaussian noise.
        ink_threshold: a pixel of the upscaled digit with intensity >= this is ink; the box is the
            tight box of the ink.

    Returns:
        ``image`` float32 (3, image_size, image_size) in [0, 1], and ``target`` with
        ``labels`` int64 (G,), ``boxes`` float32 (G, 4) normalised cxcywh,
        ``boxes_xyxy_px`` float32 (G, 4) in pixels (pixel edges: a box covering columns 3..9
        has x0 = 3, x1 = 10), ``digit_ids`` int64 (G,) indices into ``load_digits()``.
    """
    _check_split(split)
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}")
    if not 8 <= min_digit_size <= max_digit_size <= image_size:
        raise ValueError(
            f"need 8 <= min_digit_size <= max_digit_size <= image_size, got {min_digit_size}, "
            f"{max_digit_size}, {image_size}"
        )
    if not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"max_overlap must lie in [0, 1], got {max_overlap}")
    if not 0.0 < ink_threshold < 1.0:
        raise ValueError(f"ink_threshold must lie in (0, 1), got {ink_threshold}")

    gen = _scene_generator(seed, split, index)
    images, labels = _load_digits()
    pool = digit_split(split)

    # Dark background: one dim colour per scene plus per-pixel Gaussian noise.
    base = torch.rand(3, 1, 1, generator=gen) * 0.2  # (3, 1, 1)
    noise = torch.randn(3, image_size, image_size, generator=gen) * noise_std  # (3, H, W)
    canvas = (base + noise).clamp(0.0, 1.0)  # (3, H, W)

    placed: list[tuple[int, int, int, int]] = []
    out_labels, out_boxes, out_ids = [], [], []
    for _ in range(_randint(gen, min_digits, max_digits)):
        digit_id = int(pool[_randint(gen, 0, len(pool) - 1)])
        for _try in range(100):
            size = _randint(gen, min_digit_size, max_digit_size)
            x0 = _randint(gen, 0, image_size - size)
            y0 = _randint(gen, 0, image_size - size)
            square = (x0, y0, x0 + size, y0 + size)
            if all(_overlap(square, other) <= max_overlap for other in placed):
                break
        else:
            continue  # no room for this digit
        placed.append(square)

        # Upscale the 8x8 intensities to size x size (bilinear keeps strokes smooth).
        digit = torch.from_numpy(images[digit_id].copy())[None, None]  # (1, 1, 8, 8)
        alpha = F.interpolate(digit, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        alpha = alpha.clamp(0.0, 1.0)  # (size, size)
        colour = _random_bright_colour(gen)  # (3,)
        patch = canvas[:, y0 : y0 + size, x0 : x0 + size]  # (3, size, size), a view
        patch.mul_(1.0 - alpha).add_(alpha * colour[:, None, None])  # alpha compositing in place

        ink_rows = torch.nonzero((alpha >= ink_threshold).any(1)).flatten()  # rows holding ink
        ink_cols = torch.nonzero((alpha >= ink_threshold).any(0)).flatten()  # columns holding ink
        # Every load_digits image has ink above 0.25, so these are never empty.
        out_boxes.append(
            [
                x0 + int(ink_cols[0]),
                y0 + int(ink_rows[0]),
                x0 + int(ink_cols[-1]) + 1,
                y0 + int(ink_rows[-1]) + 1,
            ]
        )
        out_labels.append(int(labels[digit_id]))
        out_ids.append(digit_id)

    boxes_xyxy_px = torch.tensor(out_boxes, dtype=torch.float32).reshape(-1, 4)  # (G, 4)
    target = {
        "labels": torch.tensor(out_labels, dtype=torch.int64),  # (G,)
        "boxes": box_xyxy_to_cxcywh(boxes_xyxy_px / image_size),  # (G, 4) normalised cxcywh
        "boxes_xyxy_px": boxes_xyxy_px,  # (G, 4)
        "digit_ids": torch.tensor(out_ids, dtype=torch.int64),  # (G,)
    }
    return canvas, target


class DigitScenes(torch.utils.data.Dataset):
    """``num_scenes`` digit scenes, generated on access and identical on every access.

    Scene ``i`` is ``make_scene(seed=seed, split=split, index=i, **options)``; it does not depend on
    ``num_scenes``, so a dataset of 100 scenes is the first 100 scenes of a dataset of 10,000.
    Generating a scene takes a few milliseconds, so nothing is stored.

    Args:
        num_scenes: the dataset's length.
        seed: the dataset seed; use different seeds (or splits) for datasets that must differ.
        split: ``"train"`` or ``"val"`` (disjoint digit images, see :func:`digit_split`).
        image_size, min_digits, max_digits, min_digit_size, max_digit_size, max_overlap,
        noise_std, ink_threshold: passed to :func:`make_scene`.
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        num_scenes: int,
        *,
        seed: int = 0,
        split: str = "train",
        image_size: int = 128,
        min_digits: int = 1,
        max_digits: int = 6,
        min_digit_size: int = 16,
        max_digit_size: int = 48,
        max_overlap: float = 0.1,
        noise_std: float = 0.04,
        ink_threshold: float = 0.25,
    ) -> None:
        if num_scenes < 0:
            raise ValueError(f"num_scenes must be >= 0, got {num_scenes}")
        _check_split(split)
        self.num_scenes = num_scenes
        self.seed = seed
        self.split = split
        self.image_size = image_size
        self._options = {
            "image_size": image_size,
            "min_digits": min_digits,
            "max_digits": max_digits,
            "min_digit_size": min_digit_size,
            "max_digit_size": max_digit_size,
            "max_overlap": max_overlap,
            "noise_std": noise_std,
            "ink_threshold": ink_threshold,
        }
        make_scene(seed=seed, split=split, index=0, **self._options)  # validate the options now

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not -self.num_scenes <= index < self.num_scenes:
            raise IndexError(f"scene index {index} out of range for {self.num_scenes} scenes")
        index = index % self.num_scenes
        return make_scene(seed=self.seed, split=self.split, index=index, **self._options)

    def __repr__(self) -> str:
        return f"DigitScenes(num_scenes={self.num_scenes}, seed={self.seed}, split={self.split!r})"


def make_scenes(
    num_scenes: int, *, seed: int = 0, split: str = "train"
) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """A list of ``num_scenes`` default digit scenes: ``list(DigitScenes(num_scenes, seed, split))``."""
    dataset = DigitScenes(num_scenes, seed=seed, split=split)
    return [dataset[i] for i in range(num_scenes)]


def collate_scenes(
    batch: list[tuple[Tensor, dict[str, Tensor]]],
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Stack a list of (image, target) into images (B, 3, H, W) and a list of targets.

    Use as ``DataLoader(DigitScenes(...), batch_size=8, collate_fn=collate_scenes)``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    images = torch.stack([image for image, _ in batch])  # (B, 3, H, W)
    return images, [target for _, target in batch]
