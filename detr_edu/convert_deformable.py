"""The official Deformable-DETR checkpoint (fundamentalvision/Deformable-DETR) into :class:`DeformableDETR`.

``main.py`` saves ``{"model": model.state_dict(), "args": args, ...}``. The keys follow
``models/deformable_detr.py:DeformableDETR`` (heads ``class_embed.{i}`` / ``bbox_embed.{i}``, also
under ``transformer.decoder.`` with refinement; index ``dec_layers`` is the two-stage encoder pair)
and ``models/deformable_transformer.py`` (the layers: :func:`detr_edu.convert_keys.official_layer_rename`).
The config is read from the tensor shapes and the saved ``args``. Key lists of the three published
variants, derived from the official code: ``tests/data/deformable_detr_official_keys.json``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from detr_edu.config import BackboneConfig, DeformableDETRConfig
from detr_edu.convert_keys import (
    ConversionError,
    count_indices,
    head_rename,
    official_layer_rename,
    resnet_depth,
)

__all__ = ["official_deformable_rename", "official_deformable_config"]

_OFFICIAL_MODULES = {
    "transformer.reference_points": "reference_points",
    "transformer.enc_output": "proposer.memory_proj",
    "transformer.enc_output_norm": "proposer.memory_norm",
    "transformer.pos_trans": "pos_trans",
    "transformer.pos_trans_norm": "pos_trans_norm",
}


def official_deformable_rename(key: str, *, num_decoder_layers: int) -> str | None:
    """An official Deformable-DETR key -> the course's key (None: unknown)."""
    if (new := official_layer_rename(key)) is not None:
        return new
    if key == "query_embed.weight":
        return "query_embed.weight"
    if m := re.fullmatch(r"(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)", key):
        return head_rename(m.group(1), int(m.group(2)), m.group(3), num_decoder_layers)
    if m := re.fullmatch(r"(transformer\.[a-z_]+)\.(weight|bias)", key):
        return f"{_OFFICIAL_MODULES[m.group(1)]}.{m.group(2)}" if m.group(1) in _OFFICIAL_MODULES else None
    return None


def official_deformable_config(state: Mapping[str, Tensor], args: Mapping | None) -> DeformableDETRConfig:
    """The config an official Deformable-DETR state dict (and its saved ``args``) describes."""
    args = dict(args or {})
    for key in ("class_embed.0.weight", "transformer.level_embed"):
        if key not in state:
            raise ConversionError(f"not an official Deformable-DETR state dict: no {key}")
    two_stage = "transformer.enc_output.weight" in state
    box_refine = "transformer.decoder.bbox_embed.0.layers.0.weight" in state
    num_classes, embed_dim = state["class_embed.0.weight"].shape
    num_levels = state["transformer.level_embed"].shape[0]
    num_heads = int(args.get("nheads", 8))
    offsets = state["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"]
    if offsets.shape[0] % (num_heads * num_levels * 2):
        raise ConversionError(
            f"sampling_offsets has {offsets.shape[0]} outputs, not a multiple of {num_heads} heads x "
            f"{num_levels} levels x 2"
        )
    if two_stage:
        num_queries = int(args.get("num_queries", 300))
    elif "query_embed.weight" in state:
        num_queries = state["query_embed.weight"].shape[0]
    else:
        raise ConversionError("not an official Deformable-DETR state dict: no query_embed.weight")
    if bool(args.get("dilation", False)):
        raise ConversionError("args.dilation=True (a dilated C5) is not supported")
    num_stages = 3 if num_levels > 1 else 1
    return DeformableDETRConfig(
        num_classes=int(num_classes),
        embed_dim=int(embed_dim),
        num_heads=num_heads,
        num_encoder_layers=count_indices(state, r"transformer\.encoder\.layers\.(\d+)\."),
        num_decoder_layers=count_indices(state, r"transformer\.decoder\.layers\.(\d+)\."),
        feedforward_dim=int(state["transformer.encoder.layers.0.linear1.weight"].shape[0]),
        dropout=float(args.get("dropout", 0.1)),
        num_queries=num_queries,
        num_points=int(offsets.shape[0] // (num_heads * num_levels * 2)),
        box_refine=box_refine,
        two_stage=two_stage,
        backbone=BackboneConfig(
            depth=resnet_depth(state, "backbone.0.body."),
            levels=(2, 3, 4) if num_stages == 3 else (4,),
            norm="frozen",
            freeze_at=1,
            num_extra_levels=num_levels - num_stages,
        ),
    )
