"""transformers' ``DeformableDetrForObjectDetection`` folders into the course's :class:`DeformableDETR`.

A folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``). The model
config is read from ``config.json`` (5.x ``backbone_config`` or 4.x ``use_timm_backbone``); the keys
come in two namings: the hub's 4.x names, which ``save_pretrained`` still writes
(``backbone.conv_encoder``, ``self_attn.out_proj``, ``layers.N.fc1``), and transformers 5's in-memory
names (``backbone.model``, ``o_proj``, ``mlp.fc1``), renamed as transformers' own
``conversion_mapping.py`` renames them for ``deformable_detr``. The decoder's separate q/k/v
projections are fused into ``nn.MultiheadAttention``'s ``in_proj``.

Parity with transformers, every weight redrawn: ``tests/test_parity_hf.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from detr_edu.build import build_model
from detr_edu.checkpoint import read_torch_file
from detr_edu.config import BackboneConfig, DeformableDETRConfig, ModelConfig
from detr_edu.convert_keys import (
    ConversionError,
    check_classes,
    head_rename,
    listed,
    load_state_into,
    neck_rename,
    resnet_rename,
)

__all__ = ["hf_config_to_course", "hf_rename", "from_hf", "Published"]


@dataclass
class Published:
    """Where a converted model came from (``model.published``).

    Attributes:
        config: the course config the checkpoint describes.
        category_ids: label k <-> dataset category id (COCO ids for the published COCO models).
        category_names: label names when the checkpoint has them (transformers' ``id2label``).
        source: the path converted.
    """

    config: ModelConfig
    category_ids: list[int]
    category_names: list[str] | None
    source: str


# transformers 4.x names -> 5.x names (the renames of transformers' conversion_mapping.py for
# "deformable_detr"), applied before the rules below
_HF_LEGACY = [
    (re.compile(r"backbone\.conv_encoder\."), "backbone."),
    (re.compile(r"self_attn\.out_proj\."), "self_attn.o_proj."),
    (re.compile(r"layers\.(\d+)\.fc([12])\."), r"layers.\1.mlp.fc\2."),
]

_RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}


def _hf_backbone(cfg: Mapping) -> tuple[int, tuple[int, ...]]:
    """(depth, stages) of a transformers config's timm ResNet backbone (5.x or 4.x fields)."""
    sub = cfg.get("backbone_config") or {}
    if sub:
        if sub.get("model_type") != "timm_backbone":
            raise ConversionError(
                f"config.json: backbone model_type {sub.get('model_type')!r} is not supported; the course "
                "loads the timm ResNet backbones of the published Deformable DETR models"
            )
        name = sub.get("backbone")
        indices = tuple(sub.get("out_indices") or (2, 3, 4))
    else:  # transformers 4.x: use_timm_backbone + backbone
        if not cfg.get("use_timm_backbone", True):
            raise ConversionError("config.json: only timm ResNet backbones are supported (use_timm_backbone)")
        name = cfg.get("backbone", "resnet50")
        indices = (2, 3, 4) if cfg.get("num_feature_levels", 4) > 1 else (4,)
    if name not in _RESNET_DEPTHS:
        raise ConversionError(f"config.json: backbone {name!r} is not one of {sorted(_RESNET_DEPTHS)}")
    if cfg.get("dilation"):
        raise ConversionError("config.json: dilation=True (a dilated C5) is not supported")
    return _RESNET_DEPTHS[name], tuple(int(i) for i in indices)


def hf_config_to_course(cfg: Mapping) -> DeformableDETRConfig:
    """The course config of a transformers ``DeformableDetrConfig`` (a ``config.json`` dict)."""
    if cfg.get("model_type") != "deformable_detr":
        raise ConversionError(
            f"config.json: model_type {cfg.get('model_type')!r}; from_hf loads 'deformable_detr' models"
        )
    for a, b in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_n_points", "decoder_n_points"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if cfg.get(a, 8) != cfg.get(b, 8):
            raise ConversionError(f"config.json: {a}={cfg.get(a)} differs from {b}={cfg.get(b)}")
    if cfg.get("activation_function", "relu") != "relu":
        raise ConversionError(f"config.json: activation_function {cfg['activation_function']!r} (need relu)")
    if cfg.get("position_embedding_type", "sine") != "sine":
        raise ConversionError("config.json: only the sine position embedding is supported")
    depth, stages = _hf_backbone(cfg)
    num_levels = int(cfg.get("num_feature_levels", 4))
    if num_levels < len(stages):
        raise ConversionError(f"config.json: {num_levels} feature levels but {len(stages)} backbone stages")
    two_stage = bool(cfg.get("two_stage", False))
    id2label = cfg.get("id2label") or {}
    num_classes = len(id2label) if id2label else int(cfg.get("num_labels", 91))
    return DeformableDETRConfig(
        num_classes=num_classes,
        embed_dim=int(cfg.get("d_model", 256)),
        num_heads=int(cfg.get("encoder_attention_heads", 8)),
        num_encoder_layers=int(cfg.get("encoder_layers", 6)),
        num_decoder_layers=int(cfg.get("decoder_layers", 6)),
        feedforward_dim=int(cfg.get("encoder_ffn_dim", 1024)),
        dropout=float(cfg.get("dropout", 0.1)),
        num_queries=int(
            cfg.get("two_stage_num_proposals", 300) if two_stage else cfg.get("num_queries", 300)
        ),
        num_points=int(cfg.get("encoder_n_points", 4)),
        box_refine=bool(cfg.get("with_box_refine", False)),
        two_stage=two_stage,
        backbone=BackboneConfig(
            depth=depth, levels=stages, norm="frozen", freeze_at=1, num_extra_levels=num_levels - len(stages)
        ),
    )


_HF_ENCODER = {
    "self_attn_layer_norm": "norm1",
    "mlp.fc1": "ffn.fc1",
    "mlp.fc2": "ffn.fc2",
    "final_layer_norm": "norm2",
}
_HF_DECODER = {
    "self_attn.o_proj": "self_attn.attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "mlp.fc1": "ffn.fc1",
    "mlp.fc2": "ffn.fc2",
    "final_layer_norm": "norm3",
}
_HF_TOP = {
    "model.level_embed": "encoder.level_embed.weight",
    "model.query_position_embeddings.weight": "query_embed.weight",
}
_HF_MODULES = {
    "model.reference_points": "reference_points",
    "model.enc_output": "proposer.memory_proj",
    "model.enc_output_norm": "proposer.memory_norm",
    "model.pos_trans": "pos_trans",
    "model.pos_trans_norm": "pos_trans_norm",
}


def hf_rename(key: str, *, num_decoder_layers: int, num_stages: int) -> str | None:
    """A transformers Deformable DETR key (5.x names; see :data:`_HF_LEGACY`) -> the course's key.

    The decoder's separate ``q_proj``/``k_proj``/``v_proj`` are renamed to ``.attn.q|k|v_proj`` and
    fused into ``in_proj_*`` by :func:`_fuse_qkv` afterwards.
    """
    if key in _HF_TOP:
        return _HF_TOP[key]
    if m := re.fullmatch(r"model\.backbone\.model\.(.+)", key):
        return resnet_rename(m.group(1))
    if m := re.fullmatch(r"model\.input_proj\.(\d+)\.(\d)\.(.+)", key):
        return neck_rename(int(m.group(1)), m.group(2), m.group(3), num_stages)
    if m := re.fullmatch(r"model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        i, mod, p = m.groups()
        if mod.startswith("self_attn."):
            return f"encoder.encoder.layers.{i}.{mod}.{p}"
        return f"encoder.encoder.layers.{i}.{_HF_ENCODER[mod]}.{p}" if mod in _HF_ENCODER else None
    if m := re.fullmatch(r"model\.decoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        i, mod, p = m.groups()
        if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return f"decoder.layers.{i}.self_attn.attn.{mod.split('.')[1]}.{p}"
        if mod.startswith("encoder_attn."):
            return f"decoder.layers.{i}.cross_attn.{mod[len('encoder_attn.') :]}.{p}"
        return f"decoder.layers.{i}.{_HF_DECODER[mod]}.{p}" if mod in _HF_DECODER else None
    if m := re.fullmatch(r"(?:model\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)", key):
        return head_rename(m.group(1), int(m.group(2)), m.group(3), num_decoder_layers)
    if m := re.fullmatch(r"(model\.[a-z_]+)\.(weight|bias)", key):
        return f"{_HF_MODULES[m.group(1)]}.{m.group(2)}" if m.group(1) in _HF_MODULES else None
    return None


def _fuse_qkv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``...attn.q_proj/k_proj/v_proj.{weight,bias}`` -> ``...attn.in_proj_{weight,bias}`` (q, k, v stacked,
    the layout of ``nn.MultiheadAttention``)."""
    out = {k: v for k, v in state.items() if not re.search(r"\.attn\.[qkv]_proj\.", k)}
    prefixes = {
        re.sub(r"\.[qkv]_proj\.(weight|bias)$", "", k) for k in state if re.search(r"\.attn\.[qkv]_proj\.", k)
    }
    for prefix in sorted(prefixes):
        for p in ("weight", "bias"):
            parts = [state.get(f"{prefix}.{c}_proj.{p}") for c in "qkv"]
            if any(t is None for t in parts):
                missing = [f"{prefix}.{c}_proj.{p}" for c, t in zip("qkv", parts, strict=True) if t is None]
                raise ConversionError(f"self-attention projections incomplete: missing {listed(missing)}")
            out[f"{prefix}.in_proj_{p}"] = torch.cat(parts, dim=0)
    return out


def _fill_tied_class_heads(state: dict[str, Tensor], cfg: DeformableDETRConfig) -> None:
    """transformers >= 5 ties the box-refine variant's class heads (``_tied_weights_keys`` maps
    ``class_embed.N`` to ``class_embed.0`` unless ``two_stage``), so its files hold ``class_embed.0``
    only; the official code clones them (one per layer). Give every layer that one head: it is what
    the transformers model computes. A 4.x file, or one with every layer's head, is loaded as it is."""
    if not cfg.box_refine or cfg.two_stage:
        return
    for i in range(1, cfg.num_decoder_layers):
        for p in ("weight", "bias"):
            key = f"heads.class_embed.{i}.{p}"
            if key not in state and f"heads.class_embed.0.{p}" in state:
                state[key] = state[f"heads.class_embed.0.{p}"]


def _read_hf_folder(path: Path) -> tuple[dict, dict[str, Tensor]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: no config.json (a transformers folder has config.json + weights)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{config_file}: not a readable JSON file ({err})") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if (path / "model.safetensors").is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError) as err:
            raise ConversionError(
                f"{path / 'model.safetensors'}: not a readable safetensors file ({err})"
            ) from err
    elif (path / "pytorch_model.bin").is_file():
        state = read_torch_file(path / "pytorch_model.bin", what="transformers weights file")
    else:
        raise ConversionError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{path}: the weights file is not a state dict of tensors")
    return config, state


def _category_table(config: Mapping, num_classes: int) -> tuple[list[int], list[str] | None]:
    id2label = config.get("id2label") or {}
    if len(id2label) == num_classes:
        ids = sorted(int(k) for k in id2label)
        return ids, [str(id2label.get(str(i), id2label.get(i, ""))) for i in ids]
    return list(range(num_classes)), None


def from_hf(
    path: str | Path, *, num_classes: int | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A transformers ``DeformableDetrForObjectDetection`` folder as the course's :class:`DeformableDETR`.

    Args:
        path: the folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).
        num_classes: refuse the checkpoint unless its class head has this many classes.
        dtype: of the returned model (float32 or float64).

    Returns:
        The model in eval mode; ``model.published`` (:class:`Published`) holds its config and the
        label table of ``config.json`` (``id2label``).
    """
    path = Path(path)
    config, state = _read_hf_folder(path)
    cfg = hf_config_to_course(config)
    check_classes(cfg.num_classes, num_classes, str(path))
    for pattern, repl in _HF_LEGACY:
        state = {pattern.sub(repl, k): v for k, v in state.items()}
    stages = len(cfg.backbone.levels)
    renamed: dict[str, Tensor] = {}
    unknown: dict[str, Tensor] = {}
    originals: dict[str, str] = {}
    for key, value in state.items():
        new = hf_rename(key, num_decoder_layers=cfg.num_decoder_layers, num_stages=stages)
        if new is None:
            unknown[key] = value
        elif new in renamed:  # a tied duplicate (model.decoder.bbox_embed.N and bbox_embed.N)
            if not torch.equal(renamed[new], value):
                raise ConversionError(f"{path}: {originals[new]} and {key} are tied but differ")
        else:
            renamed[new], originals[new] = value, key
    _fill_tied_class_heads(renamed, cfg)
    fused = _fuse_qkv(renamed)
    fused.update(unknown)  # left unrenamed: load_state_into reports them
    model = build_model(cfg, load_backbone_weights=False).to(dtype)
    known = set(fused) - set(unknown)
    load_state_into(model, fused, lambda k: k if k in known else None, source=str(path), names=originals)
    ids, names = _category_table(config, cfg.num_classes)
    model.published = Published(config=cfg, category_ids=ids, category_names=names, source=str(path))
    return model.eval()
