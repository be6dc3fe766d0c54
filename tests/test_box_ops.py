"""detr_edu.box_ops: conversions round-trip, GIoU matches its definition, bad boxes are refused."""

import pytest
import torch

from detr_edu.box_ops import (
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
