"""Export digit scenes (:mod:`detr_edu.scenes`) as a COCO folder: PNG images and instances json.

    python -m detr_edu.coco_export --out data/digits --train 4000 --val 500 --seed 0

writes ``OUT/train2017/000000000001.png ...``, ``OUT/val2017/...`` and
``OUT/annotations/instances_{train,val}2017.json``: exactly what :func:`detr_edu.data.build_coco`
and ``python -m detr_edu.train --coco-path OUT`` read, and what a real COCO download looks like.
Training scenes use the training digits only, validation scenes the held-out digits
(:func:`detr_edu.scenes.digit_split`). The output is a pure function of (seed, counts): the same
bytes on every machine.

Category ids are the digit + 1 (COCO ids start at 1), named ``"0"`` ... ``"9"``; the loader
remaps them back to labels 0..9. Boxes are the scenes' tight ink boxes in pixels, ``[x, y, w, h]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from detr_edu.scenes import NUM_CLASSES, DigitScenes

__all__ = ["export_split", "export_digit_scenes", "main"]


def export_split(out: Path, split: str, num_scenes: int, *, seed: int, image_size: int = 128) -> dict:
    """Write ``num_scenes`` scenes of ``split`` to ``OUT/{split}2017`` and return the COCO dict."""
    image_dir = out / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    scenes = DigitScenes(num_scenes, seed=seed, split=split, image_size=image_size)
    images, annotations = [], []
    ann_id = 1
    for index in range(num_scenes):
        image, target = scenes[index]  # (3, S, S) in [0, 1]
        image_id = index + 1  # COCO ids start at 1
        file_name = f"{image_id:012d}.png"
        pixels = (image * 255.0).round().to(torch.uint8).permute(1, 2, 0)  # (S, S, 3)
        Image.fromarray(pixels.numpy()).save(image_dir / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for label, (x0, y0, x1, y1) in zip(
            target["labels"].tolist(), target["boxes_xyxy_px"].tolist(), strict=True
        ):
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    return {
        "info": {"description": f"detr-edu digit scenes, split={split}, seed={seed}", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": str(k), "supercategory": "digit"} for k in range(NUM_CLASSES)],
    }


def export_digit_scenes(out: str | Path, *, num_train: int, num_val: int, seed: int = 0) -> Path:
    """Write both splits and their annotation files under ``out``; return ``out`` as a Path."""
    if num_train < 0 or num_val < 0:
        raise ValueError(f"scene counts must be >= 0, got train={num_train} val={num_val}")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        coco = export_split(out, split, count, seed=seed)
        path = out / "annotations" / f"instances_{split}2017.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(coco), encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a json
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (COCO layout)")
    parser.add_argument("--train", type=int, default=4000, help="number of training scenes")
    parser.add_argument("--val", type=int, default=500, help="number of validation scenes")
    parser.add_argument("--seed", type=int, default=0, help="scene seed")
    args = parser.parse_args(argv)
    out = export_digit_scenes(args.out, num_train=args.train, num_val=args.val, seed=args.seed)
    print(f"wrote {args.train} train and {args.val} val scenes to {out}")


if __name__ == "__main__":
    main()
