"""Chapter 04's published-weights helpers (detr_edu.viz.published) on tiny random models.

References: DETR's resize rule written out by hand (shorter side 800, longer at most 1333), the
ImageNet statistics, and the package's own post-processing (:func:`detr_edu.postprocess.postprocess`)
for the detections.
"""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from detr_edu.build import build_model  # noqa: E402
from detr_edu.config import get_preset  # noqa: E402
from detr_edu.postprocess import postprocess  # noqa: E402
from detr_edu.viz.published import detect, plot_detections, published_input  # noqa: E402


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((512, 512), (800, 800)),  # skimage.data.astronaut()
        ((400, 600), (800, 1200)),  # coffee()
        ((300, 451), (800, 1203)),  # chelsea()
        ((100, 1000), (133, 1330)),  # longer side capped: the shorter shrinks to round(1333 / 10) (DETR)
        ((1000, 100), (1330, 133)),
    ],
)
def test_published_input_size_follows_the_800_1333_rule(hw, expected):
    image = np.zeros((*hw, 3), dtype=np.uint8)
    normalised, shown = published_input(image)
    assert tuple(normalised.shape) == (3, *expected) == tuple(shown.shape)


def test_published_input_normalises_with_imagenet_statistics():
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    grey = np.full((40, 60, 3), 0.5, dtype=np.float32)  # float input: already in [0, 1]
    normalised, shown = published_input(grey, min_size=20, max_size=100)
    assert tuple(shown.shape) == (3, 20, 30)
    torch.testing.assert_close(shown, torch.full_like(shown, 0.5))
    expected = torch.tensor((0.5 - mean) / std, dtype=torch.float32)[:, None, None].expand_as(normalised)
    torch.testing.assert_close(normalised, expected)
    colours = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)  # uint8: / 255
    _, shown = published_input(colours, min_size=8, max_size=8)
    torch.testing.assert_close(shown, torch.from_numpy(colours).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        published_input(np.zeros((8, 8)))


def _tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset(name), num_queries=12)
    if name == "dino_cpu":
        cfg = dataclasses.replace(cfg, dn_number=0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # class 3 wins for every query, and the boxes are image-dependent
        for head in model.heads.class_embed:
            head.bias.fill_(-4.0)
            head.bias[3] = 4.0
        for head in model.heads.bbox_embed:
            head.layers[-1].weight.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("name", ["deformable_detr_cpu", "dino_cpu"])
def test_detect_agrees_with_postprocess_and_returns_each_querys_samples(name):
    model = _tiny(name)
    photo = np.random.default_rng(1).integers(0, 256, (48, 72, 3), dtype=np.uint8)
    det = detect(model, photo, threshold=0.5, min_size=64, max_size=200)
    assert tuple(det.shown.shape) == (3, 64, 96)
    n = len(det.scores)
    assert n > 0 and (det.scores > 0.5).all() and (det.scores[:-1] >= det.scores[1:]).all()
    assert (det.labels == 3).all() and sorted(det.queries.tolist()) == list(range(12))
    # the same pairs as the package's post-processing, which keeps the top-n pairs
    x, _ = published_input(photo, min_size=64, max_size=200)
    with torch.no_grad():
        out = model(x[None], return_intermediates=True)
    ref = postprocess(out, torch.tensor([[64, 96]]), num_top=n)[0]
    torch.testing.assert_close(det.scores, ref["scores"])
    torch.testing.assert_close(det.boxes_xyxy_px, ref["boxes_xyxy_px"])
    locations, weights = out["intermediates"]["sampling"][-1]  # the last decoder layer
    torch.testing.assert_close(det.locations, locations[0, det.queries])
    torch.testing.assert_close(det.weights, weights[0, det.queries])
    nh, L, P = weights.shape[2:]
    assert tuple(det.locations.shape) == (n, nh, L, P, 2)


def test_detect_with_nothing_above_the_threshold_draws_an_empty_picture():
    model = _tiny("deformable_detr_cpu")
    photo = np.zeros((32, 32, 3), dtype=np.uint8)
    det = detect(model, photo, threshold=0.999, min_size=64, max_size=64)
    assert len(det.scores) == 0 and tuple(det.locations.shape[:1]) == (0,)
    fig = plot_detections(det)
    assert sum(isinstance(p, Rectangle) for p in fig.axes[0].patches) == 0
    plt.close(fig)


def test_plot_detections_draws_one_box_per_detection_with_names_or_ids():
    model = _tiny("deformable_detr_cpu")
    photo = np.random.default_rng(2).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    det = detect(model, photo, min_size=64, max_size=64)
    names = [f"class{k}" for k in range(10)]
    fig = plot_detections(det, names=names, num_sampled=2, title="tiny")
    left, right = fig.axes[:2]
    assert sum(isinstance(p, Rectangle) for p in left.patches) == len(det.scores)
    assert sum(isinstance(p, Rectangle) for p in right.patches) == 2
    assert all(t.get_text().startswith("class3 ") for t in left.texts)
    nh, L, P = det.weights.shape[1:]
    assert sum(len(c.get_offsets()) for c in right.collections) == 2 * nh * L * P
    plt.close(fig)
    fig = plot_detections(det, category_ids=[10 + k for k in range(10)])
    assert all(t.get_text().startswith("id 13 ") for t in fig.axes[0].texts)
    plt.close(fig)
