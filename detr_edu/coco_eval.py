"""COCO box AP / AP50 / AR with pycocotools, for any :class:`~detr_edu.data.CocoDetection`.

The official COCO metric (Lin et al. 2014; ``pycocotools.cocoeval.COCOeval``): AP averaged over IoU
thresholds 0.50:0.05:0.95, all classes and 101 recall points; AP50 at IoU 0.5; AR100 the recall
with at most 100 detections per image. We hand pycocotools the ground-truth json as loaded (crowd
annotations included: the metric ignores matches to them) and detections in the *original* image's
pixels with the original category ids, so the numbers are comparable with published COCO results.

Under ``torch.distributed`` each worker evaluates its share of the images; :meth:`CocoEvaluator.summarize`
gathers the detections on every worker and computes the metric (cheap next to the forward passes).
"""

from __future__ import annotations

import contextlib
import copy
import io

import torch
from torch import Tensor

__all__ = ["CocoEvaluator", "METRIC_NAMES"]

# The 12 numbers of COCOeval.stats, in order.
METRIC_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


class CocoEvaluator:
    """Collect detections batch by batch, then compute the COCO metrics.

    Args:
        coco_json: the ground-truth COCO dict (``CocoDetection.coco_json``).
        category_ids: COCO id of each label 0..K-1 (``CocoDetection.category_ids``).
    """

    def __init__(self, *, coco_json: dict, category_ids: list[int]) -> None:
        self.coco_json = coco_json
        self.category_ids = list(category_ids)
        self.detections: list[dict] = []
        self.image_ids: set[int] = set()

    def update(self, results: list[dict[str, Tensor]], image_ids: list[int]) -> None:
        """Add one batch: ``results`` from :func:`detr_edu.postprocess.postprocess` in original pixels.

        Args:
            results: per image ``scores`` (n,), ``labels`` (n,) in 0..K-1, ``boxes_xyxy_px`` (n, 4).
            image_ids: the COCO image id of each result.
        """
        if len(results) != len(image_ids):
            raise ValueError(f"got {len(results)} results for {len(image_ids)} image ids")
        for res, image_id in zip(results, image_ids, strict=True):
            self.image_ids.add(int(image_id))
            boxes = res["boxes_xyxy_px"].detach().float().cpu()  # (n, 4)
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # (n, 4) COCO format
            labels = res["labels"].tolist()
            if labels and max(labels) >= len(self.category_ids):
                raise ValueError(f"label {max(labels)} has no category id (K = {len(self.category_ids)})")
            for score, label, box in zip(res["scores"].tolist(), labels, xywh.tolist(), strict=True):
                self.detections.append(
                    {
                        "image_id": int(image_id),
                        "category_id": self.category_ids[label],
                        "bbox": [round(v, 3) for v in box],
                        "score": float(score),
                    }
                )

    def _gather(self) -> tuple[list[dict], set[int]] | None:
        """Every process's detections and image ids on rank 0 (None on the other ranks).

        A gather to one rank, not an all-gather: only rank 0 runs the COCO evaluation, so the other
        ranks never hold (or copy) the whole validation set's detections.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.detections, self.image_ids
        rank = dist.get_rank()
        parts: list | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object((self.detections, sorted(self.image_ids)), parts, dst=0)
        if rank != 0:
            return None
        detections = [d for part in parts for d in part[0]]
        image_ids = {i for part in parts for i in part[1]}
        return detections, image_ids

    def summarize(self) -> dict[str, float]:
        """COCO metrics (in percent, as papers report them) over the images seen by all workers.

        Returns:
            the 12 :data:`METRIC_NAMES`, each a float in [0, 100] (-100 where COCO has no data,
            e.g. AP_large on an all-small dataset).
        """
        gathered = self._gather()
        metrics = self._evaluate(*gathered) if gathered is not None else None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)  # every rank returns rank 0's numbers
            metrics = box[0]
        return metrics

    def _evaluate(self, detections: list[dict], image_ids: set[int]) -> dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not image_ids:
            raise ValueError("no images were evaluated")
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):  # pycocotools prints progress we do not want
            gt = COCO()
            gt.dataset = copy.deepcopy(self.coco_json)
            gt.dataset.setdefault("info", {})  # some pycocotools versions copy these in loadRes
            gt.dataset.setdefault("licenses", [])
            gt.createIndex()
            if not detections:
                return {name: 0.0 for name in METRIC_NAMES}
            dt = gt.loadRes(copy.deepcopy(detections))
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {name: round(float(v) * 100.0, 3) for name, v in zip(METRIC_NAMES, ev.stats, strict=True)}
