"""Chapter 02's sampling microscope (detr_edu.viz.microscope) and its clickable canvas (viz.canvas).

References: the layer's own forward pass (the read-out with the predicted pattern must equal it),
``grid_sample`` through the package's sampler (the four bilinear corners must rebuild the sample),
matplotlib's own transforms (a PNG pixel must map back to the data point drawn there).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from detr_edu.deformable import (
    MultiScaleDeformableAttention,
    deformable_sampling,
    level_start_index_from_shapes,
)
from detr_edu.viz.canvas import AxesHit, render_figure
from detr_edu.viz.microscope import (
    SamplingMicroscope,
    bilinear_corners,
    colour_layer,
    describe,
    move_point,
    nearest_point,
    pattern_locations,
    plot_microscope,
    predicted_pattern,
    pyramid_query,
    pyramid_tokens,
    read_out,
    set_weight,
)

SHAPES = [(8, 12), (4, 6), (2, 3), (1, 2)]


def _pyramid(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in SHAPES]


def _setup(x: float = 0.4, y: float = 0.6):
    pyramid = _pyramid()
    layer = colour_layer(num_heads=4, num_levels=4, num_points=3, seed=1)
    value, shapes = pyramid_tokens(pyramid, num_heads=4)
    query, query_pos = pyramid_query(pyramid, x, y, num_heads=4)
    pattern = predicted_pattern(layer, query, reference=torch.tensor([x, y]), query_pos=query_pos)
    return pyramid, layer, value, shapes, query, query_pos, pattern


def test_read_out_of_the_predicted_pattern_is_the_layer_forward():
    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=4, num_points=3, dropout=0.0)
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(layer.attention_weights.weight, std=0.5)
    shapes = torch.tensor(SHAPES)
    value = torch.randn(int((shapes[:, 0] * shapes[:, 1]).sum()), 16)  # (Nv, C)
    query, query_pos = torch.randn(16), torch.randn(16)
    reference = torch.tensor([0.3, 0.7])
    pattern = predicted_pattern(layer, query, reference=reference, query_pos=query_pos)
    got = read_out(layer, pattern, query=query, value=value, spatial_shapes=shapes)
    with torch.no_grad():
        out, loc, w = layer(
            query[None, None],
            value=value[None],
            query_pos=query_pos[None, None],
            reference_points=reference.expand(1, 1, 4, 2),
            spatial_shapes=shapes,
            level_start_index=level_start_index_from_shapes(shapes),
            return_sampling=True,
        )
    torch.testing.assert_close(got.output, out[0, 0])
    torch.testing.assert_close(got.locations, loc[0, 0])
    torch.testing.assert_close(pattern.weights, w[0, 0])
    # heads = weighted sums of the samples = the package's core on the same locations and weights
    v = layer.value_proj(value).view(1, -1, 2, 8).detach()
    torch.testing.assert_close(
        got.heads.flatten(), deformable_sampling(v, shapes, loc, w)[0, 0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("xy", [(0.5, 0.5), (0.03, 0.97), (0.999, 0.2), (1.1, -0.05), (0.26, 0.41)])
def test_bilinear_corners_rebuild_the_sample(xy):
    g = torch.Generator().manual_seed(3)
    h, w = 5, 7
    vmap = torch.randn(h * w, generator=g, dtype=torch.float64)  # one level, one channel
    loc = torch.tensor(xy, dtype=torch.float64)
    corners = bilinear_corners(loc, (h, w))
    assert float(corners.weights.sum()) == pytest.approx(1.0)
    by_corners = sum(
        float(cw) * float(vmap[r * w + c])
        for r, c, cw, ok in zip(corners.rows, corners.cols, corners.weights, corners.inside, strict=True)
        if ok
    )
    sampled = deformable_sampling(
        vmap.view(1, -1, 1, 1),
        torch.tensor([[h, w]]),
        loc.view(1, 1, 1, 1, 1, 2),
        torch.ones(1, 1, 1, 1, 1, dtype=torch.float64),
    )
    assert abs(by_corners - float(sampled)) < 1e-12


def test_move_point_by_offset_and_by_location_agree_and_move_only_that_point():
    _, layer, value, shapes, query, _, pattern = _setup()
    moved = move_point(pattern, head=1, level=2, point=0, location=(0.8, 0.1), spatial_shapes=shapes)
    loc = pattern_locations(moved, shapes)
    torch.testing.assert_close(loc[1, 2, 0], torch.tensor([0.8, 0.1]))
    same = move_point(pattern, head=1, level=2, point=0, offset=tuple(moved.offsets[1, 2, 0].tolist()))
    torch.testing.assert_close(same.offsets, moved.offsets)
    changed = (moved.offsets != pattern.offsets).any(-1)  # (nh, L, P)
    assert changed.sum() == 1 and changed[1, 2, 0]
    before = read_out(layer, pattern, query=query, value=value, spatial_shapes=shapes)
    after = read_out(layer, moved, query=query, value=value, spatial_shapes=shapes)
    assert not torch.allclose(before.heads[1], after.heads[1])  # the head that moved reads something else
    torch.testing.assert_close(before.heads[0], after.heads[0])  # the others do not
    with pytest.raises(ValueError, match="exactly one"):
        move_point(pattern, head=0, level=0, point=0)
    with pytest.raises(ValueError, match="head must be in"):
        move_point(pattern, head=9, level=0, point=0, offset=(0.0, 0.0))


def test_set_weight_keeps_each_head_a_distribution():
    *_, pattern = _setup()
    edited = set_weight(pattern, head=2, level=1, point=2, weight=0.7)
    assert float(edited.weights[2, 1, 2]) == pytest.approx(0.7)
    torch.testing.assert_close(edited.weights.sum((1, 2)), torch.ones(4))
    others = torch.ones(4, 3, dtype=torch.bool)
    others[1, 2] = False
    ratio = edited.weights[2][others] / pattern.weights[2][others]  # proportions kept
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
    torch.testing.assert_close(edited.weights[[0, 1, 3]], pattern.weights[[0, 1, 3]])
    all_in = set_weight(pattern, head=0, level=0, point=0, weight=1.0)
    spread = set_weight(all_in, head=0, level=0, point=0, weight=0.4)  # the others had weight 0
    torch.testing.assert_close(spread.weights[0].flatten()[1:], torch.full((11,), 0.6 / 11))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_weight(pattern, head=0, level=0, point=0, weight=1.5)


def test_nearest_point_finds_a_moved_point():
    _, _, _, shapes, _, _, pattern = _setup()
    moved = move_point(pattern, head=3, level=0, point=1, location=(0.95, 0.05), spatial_shapes=shapes)
    head, point, dist = nearest_point(pattern_locations(moved, shapes), 0.94, 0.06, level=0)
    assert (head, point) == (3, 1) and dist < 0.02


def test_predicted_pattern_depends_on_the_query_and_checks_inputs():
    pyramid, layer, *_ = _setup()
    a = predicted_pattern(
        layer, *pyramid_query(pyramid, 0.2, 0.2, num_heads=4)[:1], reference=torch.tensor([0.2, 0.2])
    )
    b = predicted_pattern(
        layer, *pyramid_query(pyramid, 0.8, 0.7, num_heads=4)[:1], reference=torch.tensor([0.8, 0.7])
    )
    assert not torch.allclose(a.offsets, b.offsets) and not torch.allclose(a.weights, b.weights)
    with pytest.raises(ValueError, match="query must be"):
        predicted_pattern(layer, torch.zeros(5), reference=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="normalised"):
        pyramid_query(pyramid, 1.5, 0.5, num_heads=4)


def test_describe_prints_the_corners_and_changes_with_the_pattern():
    _, layer, value, shapes, query, _, pattern = _setup()
    base = read_out(layer, pattern, query=query, value=value, spatial_shapes=shapes)
    text = describe(pattern, base, shapes, head=0, level=0, point=0, value=value, baseline=base)
    assert text.count("corner (row") == 4 and "prediction| = 0.0000" in text
    moved = move_point(pattern, head=0, level=0, point=0, offset=(3.0, -2.0))
    after = read_out(layer, moved, query=query, value=value, spatial_shapes=shapes)
    text2 = describe(moved, after, shapes, head=0, level=0, point=0, value=value, baseline=base)
    assert "offset (+3.00, -2.00)" in text2 and "prediction| = 0.0000" not in text2


def test_render_geometry_maps_pixels_back_to_data():
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    axes[0].set_gid("left")
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
    png, geometry = render_figure(fig, dpi=50)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (geometry.width, geometry.height) == (300, 150)
    for ax, name in ((axes[0], "left"), (axes[1], "1")):
        x_disp, y_disp = ax.transData.transform((0.3, 0.8))
        hit = geometry.locate(x_disp, geometry.height - y_disp)
        assert hit == AxesHit(name=name, x=pytest.approx(0.3), y=pytest.approx(0.8))
    assert geometry.locate(1, 1) is None  # the figure's corner, outside both axes
    plt.close(fig)


def _event(microscope: SamplingMicroscope, kind: str, level: int, x: float, y: float) -> dict:
    """A browser event at data point (x, y) of a level panel, in PNG pixels as ipyevents sends them."""
    geometry = microscope.canvas.geometry
    name, _, inverse = next(a for a in geometry.axes if a[0] == f"level {level}")
    x_disp, y_disp = inverse.inverted().transform((x, y))
    return {"type": kind, "dataX": x_disp, "dataY": geometry.height - y_disp, "buttons": 1}


def test_microscope_widget_drag_moves_the_nearest_point_and_query_mode_moves_the_query():
    pyramid = _pyramid()
    m = SamplingMicroscope(
        pyramid, colour_layer(num_heads=4, num_levels=4, num_points=3), x=0.5, y=0.5, dpi=40
    )
    loc = pattern_locations(m.pattern, m.shapes)  # (nh, L, P, 2)
    inside = ((loc[:, 1] > 0.05) & (loc[:, 1] < 0.95)).all(-1)  # (nh, P): points of level 1 in the panel
    head, point = (int(i) for i in inside.nonzero()[0])
    png0, text0 = bytes(m.canvas.image.value), m.numbers
    m.canvas._handle(_event(m, "mousedown", 1, *loc[head, 1, point].tolist()))
    assert m.selected == (head, 1, point) and (m.head.value, m.level.value, m.point.value) == (head, 1, point)
    m.canvas._handle(_event(m, "mousemove", 1, 0.9, 0.2))
    m.canvas._handle(_event(m, "mouseup", 1, 0.9, 0.2))
    moved = pattern_locations(m.pattern, m.shapes)[head, 1, point]
    torch.testing.assert_close(moved, torch.tensor([0.9, 0.2]), atol=0.02, rtol=0)
    assert bytes(m.canvas.image.value) != png0 and m.numbers != text0
    assert m.dx.value == pytest.approx((0.9 - 0.5) * SHAPES[1][1], abs=0.3)
    # a move without a held button is a hover: nothing changes
    before = m.pattern.offsets.clone()
    m.canvas._handle({**_event(m, "mousemove", 1, 0.1, 0.1), "buttons": 0})
    torch.testing.assert_close(m.pattern.offsets, before)
    # the sliders edit the selected point
    m.weight.value = 0.5
    assert float(m.pattern.weights[head, 1, point]) == pytest.approx(0.5)
    m.dx.value = -1.0
    assert float(m.pattern.offsets[head, 1, point, 0]) == pytest.approx(-1.0)
    # query mode: a click moves the query and the pattern becomes the layer's prediction there
    m.mode.value = m.MODES[1]
    m.canvas._handle(_event(m, "mousedown", 0, 0.2, 0.75))
    assert m.query_xy == pytest.approx((0.2, 0.75), abs=0.02)
    expected = predicted_pattern(m.layer, m.query, reference=torch.tensor(m.query_xy), query_pos=m.query_pos)
    torch.testing.assert_close(m.pattern.offsets, expected.offsets)


def test_plot_microscope_names_its_level_axes():
    _, layer, value, shapes, query, _, pattern = _setup()
    readout = read_out(layer, pattern, query=query, value=value, spatial_shapes=shapes)
    fig = plot_microscope(_pyramid(), pattern, readout, head=0, level=3, point=2, baseline=readout)
    assert [ax.get_gid() for ax in fig.axes[:4]] == [f"level {i}" for i in range(4)]
    plt.close(fig)


def test_mouse_events_and_slider_callbacks_wait_for_each_other():
    """A mouse event arriving on another thread waits while a slider callback holds the widget lock."""
    import threading

    from detr_edu.viz.canvas import WIDGET_LOCK

    m = SamplingMicroscope(
        _pyramid(), colour_layer(num_heads=4, num_levels=4, num_points=3), x=0.5, y=0.5, dpi=40
    )
    m.mode.value = m.MODES[1]
    done = threading.Event()

    def click() -> None:
        m.canvas._handle(_event(m, "mousedown", 0, 0.2, 0.75))
        done.set()

    with WIDGET_LOCK:  # what a slider callback holds while it redraws
        worker = threading.Thread(target=click)
        worker.start()
        assert not done.wait(0.3), "the mouse handler ran while the lock was held"
        assert m.query_xy == pytest.approx((0.5, 0.5))
    assert done.wait(30)
    worker.join()
    assert m.query_xy == pytest.approx((0.2, 0.75), abs=0.02)
    # the observers are wrapped too: a slider change from the widget side takes the same lock
    m.mode.value = m.MODES[0]
    acquired = []
    original = m.redraw

    def spy() -> None:
        acquired.append(WIDGET_LOCK._is_owned())
        original()

    m.redraw = spy
    m.head.value = 1
    assert acquired == [True]
