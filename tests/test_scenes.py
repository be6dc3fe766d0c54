"""Tests for detr_edu.scenes: determinism, the train/val split, tight boxes, little overlap."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torchvision import ops

from detr_edu.scenes import DigitScenes, collate_scenes, digit_split, make_scene, make_scenes


def test_deterministic_and_index_dependent():
    image_a, target_a = make_scene(seed=11, index=4)
    image_b, target_b = make_scene(seed=11, index=4)
    torch.testing.assert_close(image_a, image_b, rtol=0, atol=0)
    for key in target_a:
        torch.testing.assert_close(target_a[key], target_b[key], rtol=0, atol=0)
    assert not torch.equal(image_a, make_scene(seed=11, index=5)[0])
    assert not torch.equal(image_a, make_scene(seed=12, index=4)[0])
    assert not torch.equal(image_a, make_scene(seed=11, index=4, split="val")[0])


def test_formats_and_ranges():
    for index in range(50):
        image, target = make_scene(seed=0, index=index)
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        g = len(target["labels"])
        assert 1 <= g <= 6
        assert target["labels"].dtype == torch.int64 and target["labels"].shape == (g,)
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (g, 4)
        assert ((0 <= target["labels"]) & (target["labels"] <= 9)).all()
        xyxy = ops.box_convert(target["boxes"], "cxcywh", "xyxy")
        assert (xyxy >= 0).all() and (xyxy <= 1).all() and (target["boxes"][:, 2:] > 0).all()
        torch.testing.assert_close(xyxy * 128, target["boxes_xyxy_px"])


def test_every_digit_count_occurs():
    counts = {len(make_scene(seed=1, index=i)[1]["labels"]) for i in range(200)}
    assert counts == {1, 2, 3, 4, 5, 6}


def test_labels_are_the_digits_classes():
    digits = load_digits()
    for index in range(20):
        _, target = make_scene(seed=2, index=index)
        want = torch.as_tensor(digits.target[target["digit_ids"].numpy()], dtype=torch.int64)
        torch.testing.assert_close(target["labels"], want)


def test_split_is_fixed_disjoint_complete_and_stratified():
    train, val = digit_split("train"), digit_split("val")
    assert len(train) + len(val) == 1797 and not set(train) & set(val)
    labels = load_digits().target
    for cls in range(10):
        n_train, n_val = (labels[train] == cls).sum(), (labels[val] == cls).sum()
        assert abs(n_train / (n_train + n_val) - 0.8) < 0.02
    for split, allowed in (("train", set(train)), ("val", set(val))):
        for index in range(100):
            assert set(make_scene(seed=3, index=index, split=split)[1]["digit_ids"].tolist()) <= allowed


def test_boxes_are_tight_around_the_ink():
    """On a noise-free single-digit scene, recover each pixel's ink from the image itself: the box
    must contain every clearly inked pixel and nothing beyond the faintly inked ones."""
    for index in range(30):
        image, target = make_scene(seed=4, index=index, max_digits=1, noise_std=0.0)
        background = image[:, 0, 0] if (image[:, 0, 0] == image[:, -1, -1]).all() else image[:, 0, -1]
        diff = (image - background[:, None, None]).abs().sum(0)  # (H, W), proportional to the ink
        ink = diff / diff.max()  # (H, W) in [0, 1]
        x0, y0, x1, y1 = target["boxes_xyxy_px"][0].long().tolist()
        strong = torch.nonzero(ink >= 0.35)  # (n, 2) rows, cols
        assert strong[:, 0].min() >= y0 and strong[:, 0].max() < y1
        assert strong[:, 1].min() >= x0 and strong[:, 1].max() < x1
        faint = torch.nonzero(ink >= 0.15)
        assert faint[:, 0].min() <= y0 and faint[:, 0].max() >= y1 - 1
        assert faint[:, 1].min() <= x0 and faint[:, 1].max() >= x1 - 1


def test_boxes_are_not_the_paste_squares():
    # Most 8x8 digits leave their outer columns blank: tight boxes are narrower than tall.
    widths, heights = [], []
    for index in range(100):
        box = make_scene(seed=5, index=index)[1]["boxes"]
        widths.append(box[:, 2])
        heights.append(box[:, 3])
    assert (torch.cat(widths) < torch.cat(heights)).float().mean() > 0.8


def test_little_overlap():
    worst = 0.0
    for index in range(200):
        boxes = ops.box_convert(make_scene(seed=6, index=index)[1]["boxes"], "cxcywh", "xyxy")
        iou = ops.box_iou(boxes, boxes).fill_diagonal_(0.0)
        worst = max(worst, float(iou.max()) if iou.numel() else 0.0)
    assert worst < 0.15


def test_dataset():
    small, large = DigitScenes(5, seed=7), DigitScenes(50, seed=7)
    assert len(small) == 5 and "seed=7" in repr(small)
    torch.testing.assert_close(small[3][0], large[3][0])  # scene i does not depend on the length
    torch.testing.assert_close(small[-1][0], small[4][0])
    torch.testing.assert_close(small[2][0], make_scene(seed=7, index=2)[0])
    with pytest.raises(IndexError):
        small[5]
    scenes = make_scenes(3, seed=7)
    torch.testing.assert_close(scenes[1][1]["boxes"], small[1][1]["boxes"])
    images, targets = collate_scenes(scenes)
    assert images.shape == (3, 3, 128, 128) and len(targets) == 3
    loader = torch.utils.data.DataLoader(small, batch_size=2, collate_fn=collate_scenes)
    assert [len(t) for _, t in loader] == [2, 2, 1]


def test_options():
    image, target = make_scene(
        seed=8, image_size=64, min_digits=2, max_digits=2, min_digit_size=10, max_digit_size=20
    )
    assert image.shape == (3, 64, 64) and len(target["labels"]) == 2
    assert (target["boxes_xyxy_px"][:, 2:] - target["boxes_xyxy_px"][:, :2]).max() <= 20


def test_bad_inputs():
    with pytest.raises(ValueError, match="split must be"):
        make_scene(seed=0, split="test")
    with pytest.raises(ValueError, match="split must be"):
        digit_split("validation")
    with pytest.raises(ValueError, match="min_digits"):
        make_scene(seed=0, min_digits=0)
    with pytest.raises(ValueError, match="min_digit_size"):
        make_scene(seed=0, max_digit_size=200)
    with pytest.raises(ValueError, match="max_overlap"):
        make_scene(seed=0, max_overlap=2.0)
    with pytest.raises(ValueError, match="ink_threshold"):
        make_scene(seed=0, ink_threshold=0.0)
    with pytest.raises(ValueError, match="num_scenes"):
        DigitScenes(-1)
    with pytest.raises(ValueError, match="empty batch"):
        collate_scenes([])


def test_plot_scenes_draws_every_box():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detr_edu.viz.scenes import plot_scenes

    scenes = make_scenes(3, seed=9)
    fig = plot_scenes(scenes, ncols=2)
    assert [len(ax.patches) for ax in fig.axes[:3]] == [len(t["labels"]) for _, t in scenes]
    with pytest.raises(ValueError, match="at least one scene"):
        plot_scenes([])
    plt.close("all")
