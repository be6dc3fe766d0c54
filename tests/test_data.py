"""COCO-format data: the digit-scene export round trip, validation errors, padding, COCO AP.

References: the scenes themselves (:class:`detr_edu.scenes.DigitScenes`) for the exported images and
boxes; brute-force padding; pycocotools on perfect / shifted detections.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from detr_edu.coco_eval import CocoEvaluator
from detr_edu.coco_export import export_digit_scenes
from detr_edu.data import CocoDetection, CocoFormatError, build_coco, coco_paths, collate_detection
from detr_edu.scenes import DigitScenes
from detr_edu.transforms import make_transforms


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_digit_scenes(tmp_path_factory.mktemp("digits"), num_train=6, num_val=4, seed=3)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_export_round_trip_matches_scenes(digits: Path) -> None:
    for split, n in (("train", 6), ("val", 4)):
        ds = build_coco(digits, split)
        scenes = DigitScenes(n, seed=3, split=split)  # val scenes use the held-out digits
        assert len(ds) == n and ds.category_ids == list(range(1, 11))
        for i in range(n):
            image, target = ds[i]
            ref_image, ref = scenes[i]
            assert torch.equal(target["labels"], ref["labels"])  # ids 1..10 remapped to digits 0..9
            torch.testing.assert_close(target["boxes_xyxy_px"], ref["boxes_xyxy_px"])
            assert (image - ref_image).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG quantisation
            assert target["image_id"].item() == i + 1 and target["orig_size"].tolist() == [128, 128]


def test_export_is_deterministic(digits: Path, tmp_path: Path) -> None:
    again = export_digit_scenes(tmp_path / "again", num_train=6, num_val=4, seed=3)
    for split in ("train", "val"):
        images, ann = coco_paths(digits, split)
        images2, ann2 = coco_paths(again, split)
        assert ann.read_bytes() == ann2.read_bytes()
        for f in images.iterdir():
            assert f.read_bytes() == (images2 / f.name).read_bytes()


def test_transformed_targets_are_normalised_cxcywh(digits: Path) -> None:
    tf = make_transforms(train=True, sizes=[64], max_size=None, flip=True)
    ds = build_coco(digits, "train", transforms=tf, seed=0)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target["size"].tolist() == [64, 64]
    raw = ds.raw_target(0)["boxes_xyxy_px"] / 128.0
    w = raw[:, 2] - raw[:, 0]
    torch.testing.assert_close(target["boxes"][:, 2], w)  # width survives resize and flip
    # augmentation depends on (seed, epoch, index) only
    again = ds[0]
    assert torch.equal(again[0], image)
    changed = []
    for epoch in range(1, 8):
        ds.set_epoch(epoch)
        changed.append(not torch.equal(ds[0][0], image))
    assert any(changed)  # some epoch flips it


def _edit(root: Path, edit) -> Path:
    ann = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    return ann


def test_malformed_json_names_file(digits: Path, tmp_path: Path) -> None:
    root = _copy(digits, tmp_path / "d")
    ann = root / "annotations" / "instances_train2017.json"
    ann.write_text(ann.read_text()[:-10])
    with pytest.raises(CocoFormatError, match=r"instances_train2017\.json: malformed json at line 1"):
        build_coco(root, "train")
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(CocoFormatError, match="needs a list under 'annotations'"):
        build_coco(root, "train")


def test_missing_image_names_file_and_id(digits: Path, tmp_path: Path) -> None:
    root = _copy(digits, tmp_path / "d")
    (root / "train2017" / "000000000002.png").unlink()
    with pytest.raises(CocoFormatError, match=r"000000000002\.png: image file of image id 2 .* not found"):
        build_coco(root, "train")
    # unchecked at construction: the error comes when the image is read, with the same names
    ds = CocoDetection(
        image_dir=root / "train2017", annotation_file=coco_paths(root, "train")[1], check_images=False
    )
    with pytest.raises(CocoFormatError, match="image file of image id 2 not found"):
        ds[1]


@pytest.mark.parametrize(
    ("bbox", "message"),
    [
        ([10, 10, 0, 5], "annotation id 1 .* non-positive size"),
        ([10, 10, 5, -2], "annotation id 1 .* non-positive size"),
        ([120, 10, 20, 5], "annotation id 1 .* outside the image"),
        ([-5, 10, 20, 5], "annotation id 1 .* outside the image"),
        ([10, 10, 5], r"annotation id 1 needs 'bbox' as \[x, y, width, height\]"),
    ],
)
def test_bad_boxes_name_annotation(digits: Path, tmp_path: Path, bbox: list, message: str) -> None:
    root = _copy(digits, tmp_path / "d")

    def edit(data: dict) -> None:
        data["annotations"][0]["bbox"] = bbox

    _edit(root, edit)
    with pytest.raises(CocoFormatError, match=message):
        build_coco(root, "train")


def test_unknown_category_or_image(digits: Path, tmp_path: Path) -> None:
    root = _copy(digits, tmp_path / "d")
    _edit(root, lambda d: d["annotations"][2].update(category_id=99))
    with pytest.raises(CocoFormatError, match="annotation id 3 has category_id 99"):
        build_coco(root, "train")
    _edit(root, lambda d: d["annotations"][2].update(category_id=1, image_id=1234))
    with pytest.raises(CocoFormatError, match="annotation id 3 refers to unknown image id 1234"):
        build_coco(root, "train")


def test_crowd_annotations_are_skipped(digits: Path, tmp_path: Path) -> None:
    root = _copy(digits, tmp_path / "d")
    before = build_coco(root, "train").raw_target(0)["labels"]
    _edit(root, lambda d: d["annotations"][0].update(iscrowd=1))
    after = build_coco(root, "train").raw_target(0)["labels"]
    assert torch.equal(after, before[1:])


def test_collate_pads_and_masks() -> None:
    a = torch.rand(3, 5, 7)
    b = torch.rand(3, 6, 4)
    t = [{"labels": torch.tensor([1])}, {"labels": torch.tensor([2])}]
    batch = collate_detection([(a, t[0]), (b, t[1])], size_divisibility=4)
    assert batch.images.shape == (2, 3, 8, 8) and batch.masks.shape == (2, 8, 8)
    ref_masks = torch.ones(2, 8, 8, dtype=torch.bool)
    ref_masks[0, :5, :7] = False
    ref_masks[1, :6, :4] = False
    assert torch.equal(batch.masks, ref_masks)
    assert torch.equal(batch.images[0, :, :5, :7], a) and batch.images[0, :, 5:].abs().sum() == 0
    assert batch.targets == t
    with pytest.raises(ValueError, match="empty batch"):
        collate_detection([])
    with pytest.raises(ValueError, match=r"batch\[0\]: image must be \(3, H, W\)"):
        collate_detection([(torch.rand(5, 7), t[0])])


def test_coco_eval_perfect_and_shifted(digits: Path) -> None:
    ds = build_coco(digits, "val")
    perfect, shifted = (CocoEvaluator(coco_json=ds.coco_json, category_ids=ds.category_ids) for _ in range(2))
    for i in range(len(ds)):
        t = ds.raw_target(i)
        n = len(t["labels"])
        res = {"scores": torch.ones(n), "labels": t["labels"], "boxes_xyxy_px": t["boxes_xyxy_px"]}
        perfect.update([res], [int(t["image_id"])])
        # shifting every box by its own width gives IoU 0: nothing is found
        moved = t["boxes_xyxy_px"] + (t["boxes_xyxy_px"][:, 2:3] - t["boxes_xyxy_px"][:, 0:1]) * torch.tensor(
            [1.0, 0, 1, 0]
        )
        shifted.update([{**res, "boxes_xyxy_px": moved}], [int(t["image_id"])])
    good = perfect.summarize()
    assert good["AP"] == pytest.approx(100.0) and good["AP50"] == pytest.approx(100.0)
    assert good["AR100"] == pytest.approx(100.0)
    bad = shifted.summarize()
    assert bad["AP50"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no category id"):
        perfect.update(
            [{"scores": torch.ones(1), "labels": torch.tensor([10]), "boxes_xyxy_px": torch.zeros(1, 4)}], [1]
        )
