"""Tests of detr_edu.postprocess against brute-force loops."""

from __future__ import annotations

import pytest
import torch

from detr_edu.postprocess import postprocess


def _outputs(B: int = 2, Nq: int = 6, K: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.cat([torch.rand(B, Nq, 2, generator=g), 0.05 + 0.4 * torch.rand(B, Nq, 2, generator=g)], -1)
    return {"pred_logits": torch.randn(B, Nq, K, generator=g), "pred_boxes": boxes}


def test_sigmoid_topk_brute_force() -> None:
    out = _outputs()
    sizes = torch.tensor([[100, 200], [50, 80]])
    dets = postprocess(out, sizes, num_top=5, clip=False)
    for b, det in enumerate(dets):
        h, w = sizes[b].tolist()
        candidates = []
        for q in range(6):
            for k in range(3):
                cx, cy, bw, bh = out["pred_boxes"][b, q].tolist()
                box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
                candidates.append((torch.sigmoid(out["pred_logits"][b, q, k]).item(), k, box))
        candidates.sort(key=lambda c: -c[0])
        top = candidates[:5]
        torch.testing.assert_close(det["scores"], torch.tensor([c[0] for c in top]))
        assert det["labels"].tolist() == [c[1] for c in top]
        assert det["labels"].dtype == torch.int64
        torch.testing.assert_close(det["boxes_xyxy_px"], torch.tensor([c[2] for c in top]))


def test_softmax_one_label_per_query() -> None:
    out = _outputs(K=4)  # 3 classes + "no object"
    sizes = torch.tensor([[10, 10], [20, 30]])
    dets = postprocess(out, sizes, num_top=100, score_type="softmax", clip=False)
    for b, det in enumerate(dets):
        prob = out["pred_logits"][b].softmax(-1)[:, :3]
        best, label = prob.max(-1)
        order = best.argsort(descending=True)
        assert len(det["scores"]) == 6  # capped at Nq
        torch.testing.assert_close(det["scores"], best[order])
        assert det["labels"].tolist() == label[order].tolist()
        assert (det["labels"] < 3).all()


def test_clip_and_cap() -> None:
    out = {
        "pred_logits": torch.zeros(1, 2, 2),
        "pred_boxes": torch.tensor([[[0.95, 0.5, 0.3, 0.3], [0.5, 0.5, 0.2, 0.2]]]),
    }
    det = postprocess(out, torch.tensor([[100, 100]]), num_top=50)[0]
    assert len(det["scores"]) == 4  # Nq * K
    assert det["boxes_xyxy_px"].max() <= 100 and det["boxes_xyxy_px"].min() >= 0


def test_errors() -> None:
    out = _outputs()
    with pytest.raises(ValueError, match=r"image_sizes must be \(B, 2\)"):
        postprocess(out, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="score_type"):
        postprocess(out, torch.tensor([[1, 2], [3, 4]]), score_type="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pred_boxes"):
        postprocess(
            {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"][..., :2]}, torch.ones(2, 2)
        )
    with pytest.raises(ValueError, match="num_top"):
        postprocess(out, torch.ones(2, 2), num_top=0)
