"""Chapter 04's views of where a trained detector samples (detr_edu.viz.trained_sampling).

References: the encoder layers' own attention (a hand-run of the first encoder layer from the
flattened pyramid must give the same locations and weights), the decoder's ``return_sampling``
outputs, the Hungarian matcher, and the layer's initial ring.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from detr_edu.build import build_model
from detr_edu.config import get_preset
from detr_edu.export import load_shipped
from detr_edu.levels import encoder_reference_points
from detr_edu.matcher import HungarianMatcher
from detr_edu.scenes import make_scene
from detr_edu.transforms import make_transforms
from detr_edu.viz.canvas import AxesHit
from detr_edu.viz.trained_sampling import (
    DecoderQueryView,
    EncoderPixelView,
    decoder_trace,
    describe_pixel,
    describe_query,
    encoder_sampling,
    initial_ring,
    pixel_at,
    pixel_token,
    plot_decoder_query,
    plot_encoder_pixel,
    plot_learned_sampling,
    query_order,
)


@pytest.fixture(scope="module")
def shipped():
    model, _ = load_shipped()
    return model


@pytest.fixture(scope="module")
def scene():
    image, target = make_scene(seed=0, index=2, split="val")
    x, t96 = make_transforms(train=False, sizes=[96], max_size=None)(image, target)
    return image, x, t96


def test_encoder_sampling_equals_the_first_layer_run_by_hand(shipped, scene):
    _, x, _ = scene
    enc = encoder_sampling(shipped, x)
    Le = len(shipped.encoder.encoder.layers)
    assert enc.locations.shape[:2] == (Le, 12 * 12 + 6 * 6 + 3 * 3 + 2 * 2)
    torch.testing.assert_close(enc.weights.sum((-1, -2)), torch.ones(enc.weights.shape[:3]))
    # by hand: the flattened pyramid the encoder receives, the reference points of every pixel, layer 0
    with torch.no_grad():
        fm = shipped.backbone(x[None])
        captured = {}
        handle = shipped.encoder.encoder.register_forward_pre_hook(
            lambda _m, args, kwargs: captured.update(src=args[0], **kwargs), with_kwargs=True
        )
        shipped.encoder(fm)
        handle.remove()
        ref = encoder_reference_points(captured["spatial_shapes"], captured["valid_ratios"])
        _, loc, w = shipped.encoder.encoder.layers[0].self_attn(
            captured["src"],
            value=captured["src"],
            query_pos=captured["pos"],
            key_padding_mask=captured["key_padding_mask"],
            reference_points=ref,
            spatial_shapes=captured["spatial_shapes"],
            level_start_index=captured["level_start_index"],
            return_sampling=True,
        )
    torch.testing.assert_close(enc.locations[0], loc[0])
    torch.testing.assert_close(enc.weights[0], w[0])
    assert not torch.allclose(enc.locations[0], enc.locations[1])  # the layers sample differently


def test_a_trained_encoder_does_not_sample_on_the_initial_ring(shipped, scene):
    enc = encoder_sampling(shipped, scene[1])
    level, row, col = 1, 2, 3
    ring_loc, ring_w = initial_ring(enc.spatial_shapes, level, row, col, num_heads=8, num_points=4)
    token = pixel_token(enc.spatial_shapes, level, row, col)
    assert torch.allclose(ring_w, torch.full_like(ring_w, 1 / 16))
    assert (enc.locations[-1, token] - ring_loc).abs().max() > 0.05  # training moved the points
    assert not torch.allclose(enc.weights[-1, token], ring_w, atol=1e-3)  # and made the weights differ
    # an untrained model's first encoder layer does sample on the ring
    torch.manual_seed(0)
    fresh = build_model(get_preset("dino_cpu")).eval()
    torch.testing.assert_close(encoder_sampling(fresh, scene[1]).locations[0, token], ring_loc)


def test_pixel_token_and_pixel_at():
    shapes = torch.tensor([[12, 12], [6, 6], [3, 3], [2, 2]])
    assert pixel_token(shapes, 0, 0, 0) == 0
    assert pixel_token(shapes, 1, 2, 5) == 144 + 2 * 6 + 5
    assert pixel_token(shapes, 3, 1, 1) == 144 + 36 + 9 + 3
    assert pixel_at(shapes, 2, 0.99, 0.01) == (0, 2)
    assert pixel_at(shapes, 0, 1.5, -0.2) == (0, 11)  # clamped to the map
    with pytest.raises(ValueError, match="outside level 1"):
        pixel_token(shapes, 1, 6, 0)


def test_decoder_trace_matches_the_model_and_the_matcher(shipped, scene):
    _, x, t96 = scene
    trace = decoder_trace(shipped, x, t96)
    with torch.no_grad():
        out = shipped(x[None], return_intermediates=True)
    Ld = len(out["aux_outputs"]) + 1
    assert trace.locations.shape[:2] == (Ld, 30)
    torch.testing.assert_close(trace.boxes[-1], out["pred_boxes"][0])
    torch.testing.assert_close(trace.logits[0], out["aux_outputs"][0]["pred_logits"][0])
    torch.testing.assert_close(trace.locations[1], out["intermediates"]["sampling"][1][0][0])
    # layer 0 samples around the selected proposals, layer l around the box refined by layer l - 1
    torch.testing.assert_close(trace.references[0], out["intermediates"]["init_reference"][0])
    torch.testing.assert_close(trace.references[2], out["intermediates"]["inter_references"][2][0])
    ((q, t),) = HungarianMatcher()(
        {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}, [t96]
    )
    assert sorted(zip(q.tolist(), t.tolist(), strict=True)) == sorted(
        zip(trace.matched_queries.tolist(), trace.matched_targets.tolist(), strict=True)
    )
    assert trace.matched_targets.tolist() == sorted(trace.matched_targets.tolist())
    order = query_order(trace)
    assert order[: len(q)] == trace.matched_queries.tolist() and sorted(order) == list(range(30))
    text = describe_query(trace, query=order[0], target=t96)
    assert "matched to target 0" in text and text.count("IoU") == Ld
    assert "not matched" in describe_query(trace, query=order[-1], target=t96)


def test_describe_pixel_lists_level_shares_that_sum_to_one(shipped, scene):
    enc = encoder_sampling(shipped, scene[1])
    text = describe_pixel(enc, layer=1, level=0, row=4, col=7)
    shares = [float(part.split()[1]) for part in text.splitlines()[1].split(": ")[1].split(", ")]
    assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=2e-3)


def test_plots_draw_and_name_level_axes(shipped, scene):
    image, x, t96 = scene
    enc, trace = encoder_sampling(shipped, x), decoder_trace(shipped, x, t96)
    ring = initial_ring(enc.spatial_shapes, 0, 3, 3, num_heads=8, num_points=4)
    fig = plot_encoder_pixel(image, enc, layer=1, level=0, row=3, col=3, ring=ring)
    assert [ax.get_gid() for ax in fig.axes] == [f"level {i}" for i in range(4)]
    plt.close(fig)
    plt.close(plot_decoder_query(image, trace, query=int(trace.matched_queries[0]), target=t96, head=2))
    fig = plot_learned_sampling(image, trace, enc, t96)
    assert len(fig.axes) == 2 * len(t96["labels"]) + 1  # two rows per digit and the colour bar
    plt.close(fig)
    with pytest.raises(ValueError, match="query must be"):
        plot_decoder_query(image, trace, query=30)


def test_encoder_view_click_selects_the_pixel_and_ring_toggle_redraws(shipped, scene):
    image, x, _ = scene
    view = EncoderPixelView(shipped, [(image, x)], dpi=40)
    png0, text0 = bytes(view.canvas.image.value), view.numbers
    view.on_mouse("down", AxesHit(name="level 0", x=0.9, y=0.1))
    assert view.pixel == (0, 1, 10) and "pixel (row 1, col 10)" in view.numbers
    assert bytes(view.canvas.image.value) != png0 and view.numbers != text0
    png1 = bytes(view.canvas.image.value)
    view.ring.value = True
    assert bytes(view.canvas.image.value) != png1
    view.on_mouse("down", AxesHit(name="3", x=0.5, y=0.5))  # not a level panel: nothing happens
    assert view.pixel == (0, 1, 10)


def test_decoder_view_lists_matched_queries_first(shipped, scene):
    image, x, t96 = scene
    other = make_scene(seed=0, index=3, split="val")
    x2, t2 = make_transforms(train=False, sizes=[96], max_size=None)(*other)
    view = DecoderQueryView(shipped, [(image, x, t96), (other[0], x2, t2)], dpi=40)
    labels = [label for label, _ in view.query.options]
    G = len(t96["labels"])
    assert all("-> digit" in label for label in labels[:G]) and "unmatched" in labels[G]
    png0, text0 = bytes(view.image.value), view.numbers
    view.query.value = view.query.options[G][1]
    assert bytes(view.image.value) != png0 and view.numbers != text0
    view.scene.value = 1
    assert view.query.value == view.trace(1).matched_queries[0]
