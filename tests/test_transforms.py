"""Joint image + box transforms: boxes must move exactly as the pixels do.

References: a rendered box mask transformed with the image (brute force: the box recomputed from the
moved pixels), torchvision's ``normalize`` and ``box_convert``.
"""

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.ops import box_convert

from detr_edu.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    make_transforms,
    resized_shape,
)


def _image_with_box(H: int, W: int, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, dict]:
    """A black image with a white rectangle exactly covering the pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    image = torch.zeros(3, H, W)
    image[:, y0:y1, x0:x1] = 1.0
    target = {"boxes_xyxy_px": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([3])}
    return image, target


def _box_of_pixels(image: torch.Tensor, threshold: float = 0.5) -> list[float]:
    ys, xs = torch.nonzero(image[0] > threshold, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_flip_moves_box_with_pixels() -> None:
    image, target = _image_with_box(20, 30, (3, 4, 10, 15))
    out, t = RandomHorizontalFlip(p=1.0)(image, target, gen=torch.Generator().manual_seed(0))
    assert torch.equal(out, image.flip(-1))
    assert t["boxes_xyxy_px"][0].tolist() == _box_of_pixels(out)
    assert t["labels"] is target["labels"]  # other keys pass through


def test_flip_twice_is_identity_and_p0_keeps() -> None:
    image, target = _image_with_box(16, 16, (2, 2, 7, 9))
    flip = RandomHorizontalFlip(p=1.0)
    once, t1 = flip(image, target)
    twice, t2 = flip(once, t1)
    assert torch.equal(twice, image) and torch.equal(t2["boxes_xyxy_px"], target["boxes_xyxy_px"])
    same, t0 = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and t0 is target


@pytest.mark.parametrize(
    ("H", "W", "size", "max_size", "expected"),
    [
        (480, 640, 800, 1333, (800, 1067)),  # shorter side to 800
        (400, 1200, 800, 1333, (444, 1332)),  # capped: longer side <= 1333
        (128, 128, 64, None, (64, 64)),
        (640, 480, 800, None, (1067, 800)),
    ],
)
def test_resized_shape(H: int, W: int, size: int, max_size: int | None, expected: tuple[int, int]) -> None:
    assert resized_shape(H, W, size, max_size) == expected


def test_resize_scales_boxes_like_pixels() -> None:
    image, target = _image_with_box(40, 60, (10, 8, 30, 24))
    out, t = RandomResize(sizes=[20])(image, target, gen=torch.Generator().manual_seed(0))
    assert out.shape == (3, 20, 30)
    # a factor-2 downscale maps pixel edges exactly
    assert t["boxes_xyxy_px"][0].tolist() == [5.0, 4.0, 15.0, 12.0] == _box_of_pixels(out)


def test_normalize_matches_torchvision() -> None:
    image, target = _image_with_box(20, 40, (4, 2, 24, 12))
    out, t = Normalize()(image, target)
    torch.testing.assert_close(out, TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD))
    expected = box_convert(target["boxes_xyxy_px"], "xyxy", "cxcywh") / torch.tensor([40, 20, 40, 20])
    torch.testing.assert_close(t["boxes"], expected)
    assert t["size"].tolist() == [20, 40]


def test_same_generator_same_sample() -> None:
    tf = make_transforms(train=True, sizes=[48, 64, 80], max_size=None, flip=True)
    image, target = _image_with_box(64, 64, (5, 6, 30, 40))
    a = tf(image, target, gen=torch.Generator().manual_seed(7))
    b = tf(image, target, gen=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    sizes = {tf(image, target, gen=torch.Generator().manual_seed(s))[0].shape[-1] for s in range(20)}
    assert sizes == {48, 64, 80}


def test_eval_transform_is_deterministic_largest_size() -> None:
    tf = make_transforms(train=False, sizes=[48, 96], max_size=None)
    image, target = _image_with_box(64, 64, (5, 6, 30, 40))
    out, t = tf(image, target)
    assert out.shape == (3, 96, 96)
    assert isinstance(tf, Compose) and len(tf.transforms) == 2


def test_bad_inputs() -> None:
    image, target = _image_with_box(8, 8, (1, 1, 4, 4))
    with pytest.raises(ValueError, match="p must lie"):
        RandomHorizontalFlip(p=1.5)
    with pytest.raises(ValueError, match="sizes must be"):
        RandomResize(sizes=[])
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\)"):
        Normalize()(image[:1], target)
    with pytest.raises(ValueError, match="boxes_xyxy_px"):
        RandomHorizontalFlip(p=1.0)(image, {"labels": target["labels"]})
    with pytest.raises(ValueError, match="std > 0"):
        Normalize(std=(1.0, 0.0, 1.0))
