"""A COCO-format detection dataset, its folder layout, and the padded-batch collate function.

Any folder in the usual COCO layout works::

    ROOT/train2017/*.jpg|png          ROOT/annotations/instances_train2017.json
    ROOT/val2017/*.jpg|png            ROOT/annotations/instances_val2017.json

(``python -m detr_edu.coco_export`` writes the digit scenes in this layout), or explicit
image-folder / annotation-file paths.

What the loader does, and why:

* **Category ids are remapped to 0..K-1** (sorted by id): COCO's ids run 1..90 with gaps, while a
  sigmoid head wants K = 80 contiguous columns. ``dataset.category_ids[k]`` is the COCO id of label
  ``k``; the training script stores this list in the checkpoint so predictions can be mapped back.
* **Everything is validated when the dataset is built**, not in the middle of an epoch: malformed
  json, a missing image file, an annotation pointing at an unknown image or category, a box with
  non-positive width/height or outside its image -- each raises :class:`CocoFormatError` naming the
  file and the annotation id. Crowd annotations (``iscrowd=1``) are skipped for training, as in
  DETR (they are kept in the json for the COCO evaluation, which ignores them).
* **Augmentation randomness is a function of (seed, epoch, image index)**: see
  :func:`sample_generator`.
* **Every image can be decode-checked up front** (:meth:`CocoDetection.verify_images`, which the
  training script runs at start-up): a truncated or unreadable file stops the run before the first
  step, not in the middle of an epoch.
* **Pixel formats**: 8-bit grey, palette, RGB, RGBA and CMYK images become RGB; 16-bit grey images
  (PIL mode ``I;16``, or ``I`` with values up to 65535) are scaled by 1/65535 (PIL's own conversion
  would clip them to white); floating-point and other modes are refused with a message.
* **A ``file_name`` must stay inside the image folder** (no ``..``, no absolute path) unless
  ``allow_outside_image_dir=True``: a json from elsewhere cannot read arbitrary files.

Follows the DETR reference data pipeline (``datasets/coco.py``: remap, crowd filter, xywh ->
xyxy) written from its description; the validation messages are this course's addition.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from detr_edu.transforms import Compose

__all__ = [
    "CocoFormatError",
    "CocoDetection",
    "coco_paths",
    "build_coco",
    "collate_detection",
    "Batch",
    "sample_generator",
]


class CocoFormatError(ValueError):
    """A COCO json or image folder that cannot be used; the message names the file and annotation."""


def _inside(folder: Path, file_name: str) -> bool:
    """Whether ``folder / file_name`` resolves to a path inside ``folder``."""
    root = folder.resolve()
    target = (folder / file_name).resolve()
    return target == root or root in target.parents


class _UnsupportedMode(ValueError):
    pass


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _rgb_pixels(pil: Image.Image) -> np.ndarray:
    """A PIL image as float32 (H, W, 3) in [0, 1]; decodes the whole file (truncation shows here)."""
    mode = pil.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        grey = np.asarray(pil).astype(np.float32)  # (H, W) raw integer values
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise _UnsupportedMode(
                f"32-bit integer pixels outside [0, 65535] (mode {mode}); convert it to 8 or 16 bits"
            )
        return np.repeat((grey / 65535.0)[..., None], 3, axis=-1)  # (H, W, 3)
    if mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"):
        raise _UnsupportedMode(f"pixel format (PIL mode) {mode} is not supported; convert it to 8-bit RGB")
    return np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(ROOT/{split}2017, ROOT/annotations/instances_{split}2017.json)`` for split train or val."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s augmentation in ``epoch``: a hash of the three numbers.

    A hash (NumPy's ``SeedSequence``) rather than ``seed + index``: neighbouring images and epochs
    get unrelated streams. The result does not depend on workers, ranks or resumption.
    """
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise CocoFormatError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CocoFormatError(
            f"{path}: malformed json at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: expected a json object at top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{path}: needs a list under {key!r}; found keys {sorted(data)}")
    return data


class CocoDetection(torch.utils.data.Dataset):
    """Images and boxes of a COCO-format annotation file.

    Args:
        image_dir: folder holding the images named by ``file_name``.
        annotation_file: the COCO ``instances_*.json``.
        transforms: a :class:`~detr_edu.transforms.Compose` ending with ``Normalize`` (which adds
            ``boxes`` cxcywh); None returns the image in [0, 1] with pixel boxes only.
        seed: augmentation seed (see :func:`sample_generator`).
        box_tolerance_px: how far (pixels) a box may stick out of its image before it is an error;
            boxes within the tolerance are clipped (COCO's own json has float round-off of this
            kind).
        check_images: check at construction that every image file exists (one ``stat`` each).
        allow_outside_image_dir: accept ``file_name`` s that resolve outside ``image_dir`` (``..``
            components, absolute paths); refused by default.

    Each item is ``(image (3, H, W) float, target)`` with target keys ``labels`` int64 (G,),
    ``boxes`` float (G, 4) normalised cxcywh, ``boxes_xyxy_px`` (G, 4), ``image_id`` int64 (),
    ``orig_size`` int64 (2,) (h, w) as stored and ``size`` int64 (2,) (h, w) after the transforms.
    """

    def __init__(
        self,
        *,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: Compose | None = None,
        seed: int = 0,
        box_tolerance_px: float = 1.0,
        check_images: bool = True,
        allow_outside_image_dir: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.allow_outside_image_dir = allow_outside_image_dir
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0
        if not self.image_dir.is_dir():
            raise CocoFormatError(f"{self.image_dir}: image folder not found")
        self.coco_json = _load_json(self.annotation_file)
        self._index(box_tolerance_px, check_images, allow_outside_image_dir)

    # ------------------------------------------------------------------------------------------
    def _index(self, tol: float, check_images: bool, allow_outside_image_dir: bool) -> None:
        path = self.annotation_file
        cats = self.coco_json["categories"]
        try:
            cat_ids = sorted(int(c["id"]) for c in cats)
        except (KeyError, TypeError, ValueError):
            raise CocoFormatError(f"{path}: every category needs an integer 'id'") from None
        if len(set(cat_ids)) != len(cat_ids) or not cat_ids:
            raise CocoFormatError(f"{path}: category ids must be unique and non-empty, got {cat_ids}")
        self.category_ids: list[int] = cat_ids  # label k <-> COCO id category_ids[k]
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
        label_of = {cid: k for k, cid in enumerate(cat_ids)}

        images: dict[int, dict] = {}
        for n, img in enumerate(self.coco_json["images"]):
            try:
                image_id, file_name = int(img["id"]), str(img["file_name"])
                width, height = int(img["width"]), int(img["height"])
            except (KeyError, TypeError, ValueError):
                raise CocoFormatError(
                    f"{path}: images[{n}] needs integer 'id', 'width', 'height' and a 'file_name', got {img}"
                ) from None
            if image_id in images:
                raise CocoFormatError(f"{path}: image id {image_id} appears twice")
            if width < 1 or height < 1:
                raise CocoFormatError(f"{path}: image id {image_id} has size {width}x{height}")
            if not allow_outside_image_dir and not _inside(self.image_dir, file_name):
                raise CocoFormatError(
                    f"{path}: image id {image_id} has file_name {file_name!r}, which points outside "
                    f"the image folder {self.image_dir} (pass allow_outside_image_dir=True, or "
                    "--allow-outside-image-dir, if that is intended)"
                )
            if check_images and not (self.image_dir / file_name).is_file():
                raise CocoFormatError(
                    f"{self.image_dir / file_name}: image file of image id {image_id} "
                    f"(listed in {path}) not found"
                )
            images[image_id] = {"file_name": file_name, "width": width, "height": height}

        per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images}
        for n, ann in enumerate(self.coco_json["annotations"]):
            ann_id = ann.get("id", f"#{n}")
            where = f"{path}: annotation id {ann_id}"
            image_id = ann.get("image_id")
            if image_id not in images:
                raise CocoFormatError(f"{where} refers to unknown image id {image_id!r}")
            if ann.get("category_id") not in label_of:
                raise CocoFormatError(
                    f"{where} has category_id {ann.get('category_id')!r}, not among the categories {cat_ids}"
                )
            bbox = ann.get("bbox")
            if not (
                isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)
            ):
                raise CocoFormatError(f"{where} needs 'bbox' as [x, y, width, height] numbers, got {bbox!r}")
            if not all(math.isfinite(v) for v in bbox):
                raise CocoFormatError(f"{where} has a non-finite bbox {bbox}")
            if ann.get("iscrowd", 0):
                continue  # DETR: crowd regions are neither positives nor negatives in training
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                raise CocoFormatError(f"{where} (image id {image_id}) has non-positive size: bbox {bbox}")
            W, H = images[image_id]["width"], images[image_id]["height"]
            if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
                raise CocoFormatError(
                    f"{where} (image id {image_id}, {W}x{H} pixels) has a box outside the image: "
                    f"bbox [x, y, w, h] = {bbox}"
                )
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(W)), min(y + h, float(H))  # clip the round-off
            per_image[image_id].append(([x0, y0, x1, y1], label_of[ann["category_id"]]))

        self.image_ids: list[int] = sorted(images)
        self.images = images
        self._annotations = per_image

    # ------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations ``__getitem__`` draws (call before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, index: int) -> Tensor:
        """Image ``index`` as float (3, H, W) in [0, 1] (see the module doc for the pixel formats)."""
        image_id = self.image_ids[index]
        info = self.images[image_id]
        file = self.image_dir / info["file_name"]
        try:
            with Image.open(file) as pil:
                pixels = _rgb_pixels(pil)  # (H, W, 3) float32 in [0, 1]
        except FileNotFoundError:
            raise CocoFormatError(f"{file}: image file of image id {image_id} not found") from None
        except _UnsupportedMode as err:
            raise CocoFormatError(f"{file}: image id {image_id}: {err}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise CocoFormatError(f"{file}: cannot decode image id {image_id}: {err}") from None
        image = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W)
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise CocoFormatError(
                f"{file}: image id {image_id} is {image.shape[-1]}x{image.shape[-2]} pixels but "
                f"{self.annotation_file} says {info['width']}x{info['height']}"
            )
        return image  # (3, H, W)

    def verify_images(self, indices: Sequence[int] | None = None, *, progress: bool = False) -> None:
        """Decode every image once (size checked against the json); raise on the first bad one.

        Args:
            indices: which images (default: all).
            progress: show a tqdm bar (worth it for large folders; a 128-px digit scene takes 0.4 ms
                on this course's 2-core machine, larger JPEGs longer).

        Raises:
            CocoFormatError: naming the file and the cause (truncated, not an image, wrong size, an
                unsupported pixel format).
        """
        indices = range(len(self)) if indices is None else indices
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=f"checking {self.image_dir.name}", leave=False)
        for index in indices:
            self.load_image(index)

    def raw_target(self, index: int) -> dict[str, Tensor]:
        """Image ``index``'s boxes in pixels (xyxy) and labels 0..K-1, before any transform."""
        image_id = self.image_ids[index]
        anns = self._annotations[image_id]
        boxes = torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4)  # (G, 4)
        info = self.images[image_id]
        return {
            "boxes_xyxy_px": boxes,
            "labels": torch.tensor([a[1] for a in anns], dtype=torch.int64),  # (G,)
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor([info["height"], info["width"]], dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, target = self.load_image(index), self.raw_target(index)
        if self.transforms is not None:
            gen = sample_generator(self.seed, self.epoch, index)
            image, target = self.transforms(image, target, gen=gen)
        return image, target

    def __repr__(self) -> str:
        return (
            f"CocoDetection({len(self)} images, {self.num_classes} classes, "
            f"annotation_file={str(self.annotation_file)!r})"
        )


def build_coco(
    root: str | Path, split: str, *, transforms: Compose | None = None, seed: int = 0
) -> CocoDetection:
    """:class:`CocoDetection` for ``ROOT/{split}2017`` and ``ROOT/annotations/instances_{split}2017.json``."""
    image_dir, annotation_file = coco_paths(root, split)
    return CocoDetection(
        image_dir=image_dir, annotation_file=annotation_file, transforms=transforms, seed=seed
    )


@dataclass
class Batch:
    """A padded batch: ``images`` (B, 3, Hmax, Wmax), ``masks`` (B, Hmax, Wmax) True = padding, targets."""

    images: Tensor
    masks: Tensor
    targets: list[dict[str, Tensor]]

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device`` (targets too; non-blocking when the tensors are pinned)."""
        return Batch(
            images=self.images.to(device, non_blocking=True),
            masks=self.masks.to(device, non_blocking=True),
            targets=[{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in self.targets],
        )

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return Batch(
            images=self.images.pin_memory(),
            masks=self.masks.pin_memory(),
            targets=[{k: v.pin_memory() for k, v in t.items()} for t in self.targets],
        )


def collate_detection(batch: list[tuple[Tensor, dict[str, Tensor]]], *, size_divisibility: int = 1) -> Batch:
    """Pad images of different sizes into one tensor, with a mask marking the padding.

    Images keep their top-left corner; padding goes right and bottom with zeros, and ``masks`` is
    True there. Box targets stay normalised to each image's own size, which is what the models
    (valid ratios) and :func:`detr_edu.postprocess.postprocess` expect.

    Args:
        batch: (image (3, H_i, W_i), target) pairs.
        size_divisibility: round Hmax and Wmax up to a multiple of this (1: no rounding).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    for i, (image, _) in enumerate(batch):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"batch[{i}]: image must be (3, H, W), got {tuple(image.shape)}")
    Hmax = max(image.shape[1] for image, _ in batch)
    Wmax = max(image.shape[2] for image, _ in batch)
    Hmax = -(-Hmax // size_divisibility) * size_divisibility
    Wmax = -(-Wmax // size_divisibility) * size_divisibility
    B = len(batch)
    first = batch[0][0]
    images = first.new_zeros(B, 3, Hmax, Wmax)  # (B, 3, Hmax, Wmax)
    masks = torch.ones(B, Hmax, Wmax, dtype=torch.bool)  # (B, Hmax, Wmax) True = padding
    for b, (image, _) in enumerate(batch):
        h, w = image.shape[1:]
        images[b, :, :h, :w] = image
        masks[b, :h, :w] = False
    return Batch(images=images, masks=masks, targets=[target for _, target in batch])
