"""detr_edu.box_ops: conversions round-trip, GIoU matches its definition, bad boxes are refused."""

import pytest
import torch
from torchvision import ops

from detr_edu.box_ops import (
    batched_generalized_box_iou,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
)


def test_round_trip_any_leading_shape():
    boxes_cxcywh = torch.rand(2, 3, 4) * 0.5 + 0.25
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes_cxcywh)), boxes_cxcywh)


def test_giou_by_definition():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 4.0, 5.0, 5.0]], dtype=torch.float64)
    # overlap 1, union 7, enclosing 9 -> 1/7 - 2/9; disjoint: 0 - (25 - 5) / 25
    expected = torch.tensor([[1 / 7 - 2 / 9, -20 / 25]], dtype=torch.float64)
    torch.testing.assert_close(generalized_box_iou(a, b), expected)


def test_degenerate_and_nonfinite_boxes_are_refused():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="degenerate"):
        generalized_box_iou(good, torch.tensor([[0.5, 0.5, 0.2, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        generalized_box_iou(good, torch.tensor([[0.0, 0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="4 numbers"):
        box_cxcywh_to_xyxy(torch.zeros(3, 5))


def test_inverse_sigmoid_inverts_sigmoid_and_stays_finite():
    x = torch.linspace(-6, 6, 13, dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(x.sigmoid()), x, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0]))).all()


def _random_xyxy(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    centres = torch.rand(*shape, 2, generator=gen, dtype=dtype)  # some boxes stick out of the image
    sizes = 0.4 * torch.rand(*shape, 2, generator=gen, dtype=dtype)
    sizes[..., 0, :] = 0.0  # a zero-area box in every image
    return box_cxcywh_to_xyxy(torch.cat([centres, sizes], -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_giou_equals_torchvision_image_by_image(dtype):
    gen = torch.Generator().manual_seed(0)
    for batch, n, m in [(1, 1, 1), (3, 7, 5), (4, 30, 6), (2, 13, 1)]:
        boxes1, boxes2 = _random_xyxy(gen, batch, n, dtype=dtype), _random_xyxy(gen, batch, m, dtype=dtype)
        boxes2[0, -1] = boxes1[0, -1]  # identical boxes: GIoU 1
        got = batched_generalized_box_iou(boxes1, boxes2)
        assert got.shape == (batch, n, m) and got.dtype == dtype
        for b in range(batch):  # the same operations in the same order: equal to the last bit
            want = ops.generalized_box_iou(boxes1[b], boxes2[b])
            torch.testing.assert_close(got[b], want, rtol=0, atol=0, equal_nan=True)  # 0/0 NaNs too
    empty = batched_generalized_box_iou(torch.zeros(2, 0, 4), torch.ones(2, 3, 4))
    assert empty.shape == (2, 0, 3)


def test_batched_giou_refuses_bad_shapes_and_boxes():
    good = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])  # (1, 1, 4)
    with pytest.raises(ValueError, match="same B"):
        batched_generalized_box_iou(good, good.expand(2, 1, 4))
    with pytest.raises(ValueError, match="4 numbers"):
        batched_generalized_box_iou(good[..., :3], good)
    with pytest.raises(ValueError, match="degenerate"):
        batched_generalized_box_iou(good, torch.tensor([[[0.5, 0.5, 0.2, 1.0]]]))
    with pytest.raises(ValueError, match="non-finite"):
        batched_generalized_box_iou(torch.full((1, 1, 4), float("nan")), good)
    # validate=False (the matcher, which checked its inputs once) skips the value checks.
    assert torch.isnan(
        batched_generalized_box_iou(torch.full((1, 1, 4), float("nan")), good, validate=False)
    ).all()
    # no gradient: inputs that need one get a clear message, not autograd's out= error
    with pytest.raises(ValueError, match="has no gradient"):
        batched_generalized_box_iou(good.clone().requires_grad_(), good)
    with torch.no_grad():
        assert batched_generalized_box_iou(good.clone().requires_grad_(), good).item() == 1.0
