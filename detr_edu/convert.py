"""Published checkpoints into the course's models: transformers folders and the official ``.pth`` files.

Three sources, one rule: **every key is accounted for**. Each source key is renamed to the course's
name by a table of rules; a key no rule knows, a course tensor no key fills, a tensor of the wrong
shape, and two copies of a shared tensor that disagree are all refused, together, in one
:class:`ConversionError` message that names them. Files are read with
``torch.load(weights_only=True)`` only (``argparse.Namespace``, which the official training scripts
store as ``"args"``, is the one extra type allowed).

* :func:`from_hf` -- a transformers folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``) of ``DeformableDetrForObjectDetection``, e.g. the SenseTime models on the
  HF hub (``SenseTime/deformable-detr``, ``...-with-box-refine``,
  ``...-with-box-refine-two-stage``). The model config comes from ``config.json``; the 4.x key
  names (``backbone.conv_encoder``, ``self_attn.out_proj``, ``layers.N.fc1``) are renamed as
  transformers' own ``conversion_mapping.py`` renames them for ``deformable_detr``.
* :func:`from_official` -- the official Deformable-DETR checkpoint (fundamentalvision/Deformable-DETR,
  ``main.py`` saves ``{"model": ..., "args": ...}``) or the official DINO one
  (IDEA-Research/DINO, e.g. ``checkpoint0011_4scale.pth``; rules in :mod:`detr_edu.convert_dino`).
* ``python -m detr_edu.convert SRC OUT.pth`` writes the course's own weights format
  (:func:`detr_edu.export.load_weights` loads it), with the category-id table.

The model's class head must have the checkpoint's number of classes: a published COCO head (91
logits) cannot become a head for 80 classes or for your own dataset by loading. Convert it as it
is, then fine-tune (``python -m detr_edu.train --finetune-from OUT.pth``, chapter 08): the class
heads are re-initialised and everything else is loaded.

The course's models compute what these checkpoints were trained to compute (official semantics,
``tests/test_parity_hf.py`` proves it against transformers to float64 round-off).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from detr_edu.build import build_model
from detr_edu.checkpoint import CHECKPOINT_KEYS, CheckpointError, read_torch_file
from detr_edu.config import ModelConfig
from detr_edu.convert_deformable import official_deformable_config, official_deformable_rename
from detr_edu.convert_dino import official_dino_config, official_dino_rename
from detr_edu.convert_hf import Published, from_hf, hf_config_to_course, hf_rename
from detr_edu.convert_keys import (
    ConversionError,
    check_classes,
    load_state_into,
    official_layer_rename,
    resnet_depth,
)

__all__ = [
    "ConversionError",
    "Published",
    "load_state_into",
    "hf_config_to_course",
    "hf_rename",
    "from_hf",
    "official_layer_rename",
    "official_deformable_rename",
    "official_deformable_config",
    "official_dino_rename",
    "official_dino_config",
    "resnet_depth",
    "from_official",
    "load_published",
    "main",
]


def _read_official(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = read_torch_file(path, what="checkpoint")
    if isinstance(data, dict) and (
        str(data.get("format", "")).startswith("detr_edu") or all(k in data for k in CHECKPOINT_KEYS)
    ):
        raise ConversionError(
            f"{path}: already a detr_edu file (an export or a training checkpoint), nothing to convert: "
            "load it with detr_edu.export.load_weights or use it with --finetune-from / --resume"
        )
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        state, args = data["model"], data.get("args")
    elif isinstance(data, dict) and all(isinstance(v, Tensor) for v in data.values()):
        state, args = data, None
    else:
        raise ConversionError(
            f"{path}: not an official Deformable-DETR / DINO checkpoint (expected a dict with a 'model' "
            "state dict)"
        )
    odd = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if odd:
        raise ConversionError(f"{path}: the state dict holds entries that are not tensors: {odd[:5]}")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return state, args if isinstance(args, dict) else None


def from_official(
    path: str | Path, *, num_classes: int | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """An official Deformable-DETR or DINO ``.pth`` as the course's model, in eval mode.

    The kind is read from the keys (DINO has ``transformer.tgt_embed`` and ``label_enc``); the model
    config from the tensor shapes and the saved ``args``.
    """
    path = Path(path)
    state, args = _read_official(path)
    if "transformer.tgt_embed.weight" in state or "label_enc.weight" in state:
        cfg: ModelConfig = official_dino_config(state, args)
        rename: Callable[[str], str | None] = official_dino_rename
    else:
        cfg = official_deformable_config(state, args)
        layers = cfg.num_decoder_layers

        def rename(key: str) -> str | None:
            return official_deformable_rename(key, num_decoder_layers=layers)

    check_classes(cfg.num_classes, num_classes, str(path))
    model = build_model(cfg, load_backbone_weights=False).to(dtype)
    load_state_into(model, state, rename, source=str(path))
    # the official COCO models index their logits by COCO category id (0..90)
    ids = list(range(cfg.num_classes))
    model.published = Published(config=cfg, category_ids=ids, category_names=None, source=str(path))
    return model.eval()


def load_published(path: str | Path, *, num_classes: int | None = None) -> nn.Module:
    """:func:`from_hf` for a folder, :func:`from_official` for a file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        return from_hf(path, num_classes=num_classes)
    return from_official(path, num_classes=num_classes)


def main(argv: Sequence[str] | None = None) -> int:
    from detr_edu.export import save_weights

    p = argparse.ArgumentParser(
        prog="python -m detr_edu.convert",
        description="Convert a published Deformable DETR / DINO checkpoint into the course's weights format.",
    )
    p.add_argument("src", type=Path, help="a transformers folder or an official .pth file")
    p.add_argument("out", type=Path, help="the weights file to write (detr_edu.export.load_weights reads it)")
    p.add_argument("--num-classes", type=int, help="refuse the checkpoint unless it has this many classes")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    try:
        model = load_published(args.src, num_classes=args.num_classes)
        info = model.published
        out = save_weights(
            model.state_dict(),
            args.out,
            config=info.config,
            category_ids=info.category_ids,
            extra={"category_names": info.category_names, "source": info.source},
            dtype=getattr(torch, args.dtype),
        )
    except (ValueError, OSError, CheckpointError) as err:
        p.exit(2, f"detr_edu.convert: error: {err}\n")
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {type(model).__name__}, "
        f"{len(model.published.category_ids)} classes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
