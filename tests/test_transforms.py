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
    RandomSelect,
    RandomSizeCrop,
    crop_region,
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


# --- random resize-crop -----------------------------------------------------------------------------


def _coordinate_image(H: int, W: int) -> torch.Tensor:
    """Channel 0 is row / 1024, channel 1 column / 1024 (exact in float32).

    A crop's pixels say where they came from.
    """
    rows = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W) / 1024
    cols = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W) / 1024
    return torch.stack([rows, cols, torch.full((H, W), 0.5)])


def _where_from(out: torch.Tensor) -> tuple[int, int]:
    """(top, left) of a crop of a :func:`_coordinate_image`, read off its first pixel."""
    return int(round(float(out[0, 0, 0]) * 1024)), int(round(float(out[1, 0, 0]) * 1024))


def _reference_crop_boxes(
    boxes: list[list[float]], top: int, left: int, height: int, width: int
) -> tuple[list[list[float]], list[int]]:
    """Per box, by hand: shift by the offset, clip to the region, keep it if width and height stay > 0."""
    kept, keep_idx = [], []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cx0, cx1 = (min(max(x - left, 0.0), width) for x in (x0, x1))
        cy0, cy1 = (min(max(y - top, 0.0), height) for y in (y0, y1))
        if cx1 > cx0 and cy1 > cy0:
            kept.append([cx0, cy0, cx1, cy1])
            keep_idx.append(i)
    return kept, keep_idx


def test_crop_region_by_hand() -> None:
    image = _coordinate_image(10, 12)
    target = {
        "boxes_xyxy_px": torch.tensor(
            [
                [4.0, 3.0, 7.0, 6.0],  # inside the region
                [6.0, 4.0, 11.0, 9.0],  # crosses its right and bottom edges
                [0.0, 0.0, 2.0, 8.0],  # left of it: dropped
                [9.0, 2.0, 11.0, 5.0],  # only touches its right edge (x = 9): zero width, dropped
                [1.0, 1.0, 5.0, 4.0],  # crosses its top-left corner
            ]
        ),
        "labels": torch.tensor([10, 11, 12, 13, 14]),
        "area": torch.tensor([9.0, 25.0, 16.0, 6.0, 12.0]),
        "iscrowd": torch.tensor([0, 0, 1, 0, 1]),
        "image_id": torch.tensor(7),
        "orig_size": torch.tensor([10, 12]),
    }
    # region: rows 2..6, columns 3..8 (x in [3, 9), y in [2, 7))
    out, t = crop_region(image, target, top=2, left=3, height=5, width=6)
    assert torch.equal(out, image[:, 2:7, 3:9])
    expected = [
        [1.0, 1.0, 4.0, 4.0],
        [3.0, 2.0, 6.0, 5.0],
        [0.0, 0.0, 2.0, 2.0],
    ]  # shifted by (-3, -2), clipped
    assert t["boxes_xyxy_px"].tolist() == expected
    assert t["labels"].tolist() == [10, 11, 14]
    assert t["area"].tolist() == [9.0, 25.0, 12.0]  # filtered, not recomputed
    assert t["iscrowd"].tolist() == [0, 0, 1]
    assert t["image_id"] is target["image_id"] and t["orig_size"] is target["orig_size"]
    assert set(t) == set(target)
    # the input is left alone
    assert target["boxes_xyxy_px"].shape == (5, 4) and target["labels"].shape == (5,)


def test_crop_keeps_per_image_entries_when_two_boxes() -> None:
    # with G == 2, orig_size and size (2,) have the first dimension of a per-box entry; they are not one
    image = _coordinate_image(30, 30)
    target = {
        "boxes_xyxy_px": torch.tensor([[1.0, 1.0, 3.0, 3.0], [20.0, 20.0, 25.0, 25.0]]),
        "labels": torch.tensor([4, 5]),
        "iscrowd": torch.tensor([0, 1]),
        "orig_size": torch.tensor([30, 30]),
        "size": torch.tensor([30, 30]),
        "image_id": torch.tensor(3),
    }
    out, t = crop_region(image, target, top=0, left=0, height=10, width=10)
    assert out.shape == (3, 10, 10)
    assert t["boxes_xyxy_px"].tolist() == [[1.0, 1.0, 3.0, 3.0]]
    assert t["labels"].tolist() == [4] and t["iscrowd"].tolist() == [0]
    assert t["orig_size"].tolist() == [30, 30] and t["size"].tolist() == [30, 30]
    # every box dropped: empty (0, 4) boxes and (0,) labels
    _, t0 = crop_region(image, target, top=10, left=0, height=5, width=5)
    assert t0["boxes_xyxy_px"].shape == (0, 4) and t0["labels"].shape == (0,)


def test_random_size_crop_matches_slice_and_reference_boxes() -> None:
    H, W = 40, 50
    image = _coordinate_image(H, W)
    g = torch.Generator().manual_seed(123)
    xy0 = torch.rand(12, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
    wh = 1 + torch.rand(12, 2, generator=g) * 15
    boxes = torch.cat([xy0, (xy0 + wh).minimum(torch.tensor([float(W), float(H)]))], dim=1)
    target = {"boxes_xyxy_px": boxes, "labels": torch.arange(12)}
    tf = RandomSizeCrop(10, 30)
    regions = set()
    for seed in range(30):
        torch.manual_seed(1000 + seed)  # the global RNG must not matter
        out, t = tf(image, target, gen=torch.Generator().manual_seed(seed))
        top, left = _where_from(out)
        h, w = out.shape[-2:]
        regions.add((top, left, h, w))
        assert torch.equal(out, image[:, top : top + h, left : left + w])
        ref_boxes, keep = _reference_crop_boxes(boxes.tolist(), top, left, h, w)
        torch.testing.assert_close(t["boxes_xyxy_px"], torch.tensor(ref_boxes).reshape(-1, 4))
        assert t["labels"].tolist() == keep
        # same seed, same crop
        out2, t2 = tf(image, target, gen=torch.Generator().manual_seed(seed))
        assert torch.equal(out, out2) and torch.equal(t["boxes_xyxy_px"], t2["boxes_xyxy_px"])
    assert len(regions) >= 25  # different seeds, different crops


@pytest.mark.parametrize(("H", "W"), [(700, 900), (450, 1000), (390, 380)])
def test_random_size_crop_size_within_bounds_and_image(H: int, W: int) -> None:
    image = _coordinate_image(H, W)
    target = {"boxes_xyxy_px": torch.tensor([[0.0, 0.0, float(W), float(H)]]), "labels": torch.tensor([0])}
    tf = RandomSizeCrop()  # 384..600
    for seed in range(8):
        out, t = tf(image, target, gen=torch.Generator().manual_seed(seed))
        h, w = out.shape[-2:]
        assert min(384, H) <= h <= min(600, H) and min(384, W) <= w <= min(600, W)
        top, left = _where_from(out)
        assert 0 <= top <= H - h and 0 <= left <= W - w
        assert t["boxes_xyxy_px"].tolist() == [[0.0, 0.0, float(w), float(h)]]  # whole-image box clipped


def test_random_size_crop_covers_every_size_and_position() -> None:
    H, W = 8, 10
    image = _coordinate_image(H, W)
    target = {"boxes_xyxy_px": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    tf = RandomSizeCrop(3, 6)
    hs, ws, tops, lefts = set(), set(), set(), set()
    for seed in range(400):
        out, _ = tf(image, target, gen=torch.Generator().manual_seed(seed))
        h, w = out.shape[-2:]
        top, left = _where_from(out)
        assert top + h <= H and left + w <= W
        hs.add(h)
        ws.add(w)
        tops.add(top)
        lefts.add(left)
    assert hs == {3, 4, 5, 6} and ws == {3, 4, 5, 6}  # integers, both ends included
    assert tops == set(range(H - 3 + 1)) and lefts == set(range(W - 3 + 1))


def _tag(name: str):
    def transform(image: torch.Tensor, target: dict, *, gen: torch.Generator | None = None):
        return image, {**target, "branch": name}

    return transform


def test_random_select_takes_each_branch_about_half_the_time() -> None:
    image, target = _image_with_box(4, 4, (0, 0, 2, 2))
    select = RandomSelect(_tag("a"), _tag("b"), p=0.5)
    n = 2000
    count_a = sum(
        select(image, target, gen=torch.Generator().manual_seed(s))[1]["branch"] == "a" for s in range(n)
    )
    assert abs(count_a - n / 2) < 4.5 * (n * 0.25) ** 0.5  # binomial(2000, 0.5): sd ~ 22
    for p, branch in ((1.0, "a"), (0.0, "b")):
        sel = RandomSelect(_tag("a"), _tag("b"), p=p)
        assert {sel(image, target, gen=torch.Generator().manual_seed(s))[1]["branch"] for s in range(50)} == {
            branch
        }
    # exactly one draw per call, whatever p: the stream continues where one torch.rand leaves it
    for p in (0.0, 0.5, 1.0):
        gen, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        RandomSelect(_tag("a"), _tag("b"), p=p)(image, target, gen=gen)
        torch.rand((), generator=ref)
        assert torch.equal(gen.get_state(), ref.get_state())


@pytest.mark.parametrize("flip", [True, False])
def test_make_transforms_without_crop_is_unchanged(flip: bool) -> None:
    sizes, max_size = [48, 64, 80], 100
    old = Compose(
        ([RandomHorizontalFlip(p=0.5)] if flip else [])
        + [RandomResize(sizes=sizes, max_size=max_size), Normalize()]
    )
    image = torch.rand(3, 40, 70, generator=torch.Generator().manual_seed(0))
    target = {
        "boxes_xyxy_px": torch.tensor([[5.0, 6.0, 30.0, 38.0], [40.0, 1.0, 69.0, 20.0]]),
        "labels": torch.tensor([1, 2]),
        "image_id": torch.tensor(9),
        "orig_size": torch.tensor([40, 70]),
    }
    for tf in (
        make_transforms(train=True, sizes=sizes, max_size=max_size, flip=flip),
        make_transforms(train=True, sizes=sizes, max_size=max_size, flip=flip, crop=False),
    ):
        assert repr(tf) == repr(old)
        for seed in range(20):
            gen_new, gen_old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            a_img, a_t = tf(image, target, gen=gen_new)
            b_img, b_t = old(image, target, gen=gen_old)
            assert torch.equal(a_img, b_img)
            assert set(a_t) == set(b_t) and all(torch.equal(a_t[k], b_t[k]) for k in a_t)
            assert torch.equal(gen_new.get_state(), gen_old.get_state())  # same draws
    # evaluation ignores crop
    assert repr(make_transforms(train=False, sizes=sizes, max_size=max_size, crop=True)) == repr(
        make_transforms(train=False, sizes=sizes, max_size=max_size)
    )


def test_make_transforms_with_crop_end_to_end() -> None:
    sizes, max_size = [96, 128], 200
    tf = make_transforms(train=True, sizes=sizes, max_size=max_size, flip=True, crop=True)
    assert isinstance(tf.transforms[1], RandomSelect)
    H, W = 60, 80
    image, _ = _image_with_box(H, W, (20, 15, 50, 40))  # one white rectangle: the first box
    target = {
        "boxes_xyxy_px": torch.tensor(
            [
                [20.0, 15.0, 50.0, 40.0],
                [0.0, 0.0, 6.0, 5.0],
                [70.0, 50.0, 80.0, 60.0],
                [2.0, 45.0, 12.0, 58.0],
            ]
        ),
        "labels": torch.tensor([0, 1, 2, 3]),
        "iscrowd": torch.tensor([0, 1, 0, 0]),
        "image_id": torch.tensor(11),
        "orig_size": torch.tensor([H, W]),
    }
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    shapes, counts = set(), set()
    for seed in range(24):
        out, t = tf(image, target, gen=torch.Generator().manual_seed(seed))
        h, w = out.shape[-2:]
        shapes.add((h, w))
        assert t["size"].tolist() == [h, w]
        assert min(h, w) in sizes or max(h, w) == max_size
        xyxy, boxes = t["boxes_xyxy_px"], t["boxes"]
        G = len(xyxy)
        counts.add(G)
        assert len(boxes) == len(t["labels"]) == len(t["iscrowd"]) == G
        assert t["orig_size"].tolist() == [H, W] and int(t["image_id"]) == 11
        assert (xyxy[:, 2] > xyxy[:, 0]).all() and (xyxy[:, 3] > xyxy[:, 1]).all()
        assert (xyxy[:, 0::2] >= 0).all() and (xyxy[:, 0::2] <= w).all()
        assert (xyxy[:, 1::2] >= 0).all() and (xyxy[:, 1::2] <= h).all()
        assert ((boxes >= 0) & (boxes <= 1)).all()
        torch.testing.assert_close(boxes, box_convert(xyxy, "xyxy", "cxcywh") / torch.tensor([w, h, w, h]))
        # the white rectangle moved with box 0 (within resize blur)
        pixels = out * std + mean
        if (t["labels"] == 0).any():
            box0 = xyxy[t["labels"] == 0][0]
            if (pixels[0] > 0.5).any():
                assert (
                    max(abs(a - b) for a, b in zip(_box_of_pixels(pixels), box0.tolist(), strict=True)) <= 2
                )
            else:
                assert min(box0[2] - box0[0], box0[3] - box0[1]) < 2  # a sliver, lost in the resize
        else:
            assert not (pixels[0] > 0.9).any()
        # deterministic for a seed
        out2, t2 = tf(image, target, gen=torch.Generator().manual_seed(seed))
        assert torch.equal(out, out2) and torch.equal(t["boxes"], t2["boxes"])
    plain = {(96, 128), (128, 171)}  # the no-crop branch keeps the 3:4 aspect
    assert shapes & plain and shapes - plain  # both branches were taken
    assert min(counts) < 4 == max(counts)  # some crops dropped boxes


def test_crop_bad_inputs() -> None:
    image, target = _image_with_box(8, 8, (1, 1, 4, 4))
    with pytest.raises(ValueError, match="min_size must be <= max_size"):
        RandomSizeCrop(600, 384)
    with pytest.raises(ValueError, match="min_size must be >= 1"):
        RandomSizeCrop(0, 10)
    with pytest.raises(ValueError, match="must be ints"):
        RandomSizeCrop(3.5, 10)
    with pytest.raises(ValueError, match="p must lie"):
        RandomSelect(_tag("a"), _tag("b"), p=1.5)
    with pytest.raises(ValueError, match="two transforms"):
        RandomSelect("a", _tag("b"))
    with pytest.raises(ValueError, match="must lie inside"):
        crop_region(image, target, top=4, left=0, height=5, width=2)
    with pytest.raises(ValueError, match="must lie inside"):
        crop_region(image, target, top=0, left=0, height=0, width=2)
    with pytest.raises(ValueError, match="boxes_xyxy_px"):
        RandomSizeCrop(2, 4)(image, {"labels": target["labels"]})
