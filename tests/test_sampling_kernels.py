"""Every sampling kernel of ``deformable_sampling`` against the naive loop: values and gradients in
float64 (locations in and outside the maps, exact pixel centres), gradcheck, the "auto" rule, the
layer's kernel switch, and the compiled kernel (compiled once here, on a small case)."""

from __future__ import annotations

import pytest
import torch
from test_deformable import _inputs  # random value, locations (partly outside the maps), weights

from detr_edu.deformable import (
    SAMPLING_KERNELS,
    MultiScaleDeformableAttention,
    deformable_sampling,
    deformable_sampling_naive,
    level_start_index_from_shapes,
    set_sampling_kernel,
)
from detr_edu.sampling_kernels import corner_rows_and_weights

EAGER = ("grid", "bag", "gather")


def _grads(fn, value, shapes, locations, weights):
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("kernel", EAGER)
def test_kernel_matches_naive_values_and_gradients_float64(kernel):
    inputs = _inputs(seed=2)
    locations = inputs[2]
    assert ((locations < 0) | (locations > 1)).any() and ((locations > 0) & (locations < 1)).any()
    out, grads = _grads(lambda *a: deformable_sampling(*a, kernel=kernel), *inputs)
    ref, ref_grads = _grads(deformable_sampling_naive, *inputs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", EAGER)
def test_kernel_gradcheck(kernel):
    value, shapes, locations, weights = _inputs(B=1, Nq=2, nh=2, hd=2, P=2, seed=4)
    leaves = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, loc, w: deformable_sampling(v, shapes, loc, w, kernel=kernel), leaves, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("kernel", EAGER)
def test_pixel_centres_and_far_outside(kernel):
    """A location at a pixel centre returns that pixel; far outside returns 0 and no gradient."""
    value, shapes, _, _ = _inputs(B=1, nh=1, hd=2)
    starts = level_start_index_from_shapes(shapes).tolist()
    for lvl, (h, w) in enumerate(shapes.tolist()):
        i, j = h - 1, w - 1  # the bottom-right pixel: its right and lower neighbours are outside
        loc = torch.full((1, 2, 1, len(shapes), 1, 2), -3.0, dtype=torch.float64)
        loc[0, 0, 0, lvl, 0] = torch.tensor([(j + 0.5) / w, (i + 0.5) / h], dtype=torch.float64)
        weights = torch.zeros(1, 2, 1, len(shapes), 1, dtype=torch.float64)
        weights[0, :, 0, lvl, 0] = 1.0
        loc.requires_grad_()
        out = deformable_sampling(value, shapes, loc, weights, kernel=kernel)
        torch.testing.assert_close(out[0, 0], value[0, starts[lvl] + i * w + j, 0], rtol=0, atol=1e-14)
        torch.testing.assert_close(out[0, 1], torch.zeros(2, dtype=torch.float64))
        out[0, 1].sum().backward()
        assert loc.grad.abs().max() == 0


def test_corner_rows_address_the_value_table_without_a_copy():
    """Row (b * Nv + token) * nh + head of value.reshape(-1, hd) is value[b, token, head]."""
    shapes = torch.tensor([[6, 8], [4, 4]])
    value, shapes, locations, weights = _inputs(B=2, nh=3, hd=2, shapes=shapes, margin=0.0)
    locations = 0.2 + 0.6 * locations  # every corner inside its level
    rows, w = corner_rows_and_weights(shapes, locations, weights, num_tokens=value.shape[1])
    B, Nq, nh, K = rows.shape
    table = value.reshape(-1, value.shape[-1])
    assert rows.min() >= 0 and rows.max() < table.shape[0]
    b = torch.arange(B).view(B, 1, 1, 1).expand_as(rows)
    h = torch.arange(nh).view(1, 1, nh, 1).expand_as(rows)
    token = (rows - h) // nh - b * value.shape[1]
    torch.testing.assert_close(table[rows], value[b, token, h])
    # per sample, the four bilinear weights add up to the sample's attention weight
    torch.testing.assert_close(w.view(B, Nq, nh, -1, 4).sum(-1), weights.reshape(B, Nq, nh, -1))


def test_auto_rule_and_errors(monkeypatch):
    import detr_edu.deformable as deformable

    called = []
    monkeypatch.setattr(deformable, "sampling_bag", lambda *a: called.append("bag") or a[0].new_zeros(1))
    monkeypatch.setattr(deformable, "_sampling_grid", lambda *a: called.append("grid") or a[0].new_zeros(1))
    big = torch.tensor([[64, 64]])  # Nv = 4096
    for Nq, expected in ((4096 // 8, "bag"), (4096 // 8 + 1, "grid")):
        value, _, loc, w = _inputs(B=1, Nq=Nq, nh=1, hd=1, P=1, shapes=big, dtype=torch.float32)
        deformable.deformable_sampling(value, big, loc, w)
        assert called[-1] == expected, (Nq, called)
    value, shapes, loc, w = _inputs()
    deformable.deformable_sampling(value, shapes, loc, w)  # small map: grid
    assert called[-1] == "grid"
    with pytest.raises(ValueError, match="sampling kernel must be one of"):
        deformable_sampling(value, shapes, loc, w, kernel="cuda")
    with pytest.raises(ValueError, match="sampling kernel must be one of"):
        MultiScaleDeformableAttention(embed_dim=8, num_heads=2, sampling_kernel="fast")


def test_set_sampling_kernel_changes_every_layer_and_not_the_output():
    torch.manual_seed(0)
    model = (
        torch.nn.ModuleList(
            [
                MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=2)
                for _ in range(2)
            ]
        )
        .double()
        .eval()
    )  # eval: no dropout
    shapes = torch.tensor([[3, 4], [2, 2]])
    query = torch.randn(1, 5, 8, dtype=torch.float64)
    value = torch.randn(1, 16, 8, dtype=torch.float64)
    ref = torch.rand(1, 5, 2, 2, dtype=torch.float64)

    def run():
        return [
            layer(
                query,
                value=value,
                reference_points=ref,
                spatial_shapes=shapes,
                level_start_index=level_start_index_from_shapes(shapes),
            )
            for layer in model
        ]

    before = run()
    for kernel in EAGER:
        assert set_sampling_kernel(model, kernel) == 2
        assert {layer.sampling_kernel for layer in model} == {kernel}
        for a, b in zip(before, run(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert set_sampling_kernel(torch.nn.Linear(2, 2), "bag") == 0
    assert set(SAMPLING_KERNELS) == {"auto", *EAGER, "compiled"}


def test_compiled_kernel_matches_naive_float64():
    """The torch.compile kernel (compiled here once, ~20 s) agrees with the loop, values and gradients."""
    inputs = _inputs(seed=7)
    out, grads = _grads(lambda *a: deformable_sampling(*a, kernel="compiled"), *inputs)
    ref, ref_grads = _grads(deformable_sampling_naive, *inputs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_compiled_layer_core_matches_the_eager_layer_values_and_gradients():
    """With kernel "compiled" the layer compiles locations + softmax + sampling as one graph: same
    output, same gradients for every parameter and input, and the same returned sampling, in float64."""
    torch.manual_seed(1)
    layer = (
        MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=2).double().eval()
    )
    with torch.no_grad():
        layer.sampling_offsets.weight.normal_(0, 0.3)  # offsets that depend on the query
        layer.attention_weights.weight.normal_(0, 0.3)
    shapes = torch.tensor([[3, 4], [2, 2]])
    query = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 16, 8, dtype=torch.float64, requires_grad=True)
    results = {}
    for kernel, refs in (("grid", 2), ("compiled", 2), ("grid", 4), ("compiled", 4)):
        ref = torch.rand(2, 5, 2, refs, generator=torch.Generator().manual_seed(refs), dtype=torch.float64)
        ref[..., 2:] = ref[..., 2:] * 0.5  # box sizes
        set_sampling_kernel(layer, kernel)
        layer.zero_grad()
        query.grad = value.grad = None
        out, loc, w = layer(
            query,
            value=value,
            reference_points=ref,
            spatial_shapes=shapes,
            level_start_index=level_start_index_from_shapes(shapes),
            return_sampling=True,
        )
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads = [query.grad.clone(), value.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        results[(kernel, refs)] = (out.detach(), loc.detach(), w.detach(), grads)
    for refs in (2, 4):
        eager, compiled = results[("grid", refs)], results[("compiled", refs)]
        for a, b in zip(eager[:3], compiled[:3], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        for a, b in zip(eager[3], compiled[3], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
