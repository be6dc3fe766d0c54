"""The official DINO checkpoint (IDEA-Research/DINO) as the course's :class:`detr_edu.dino.DINO`.

``checkpoint0011_4scale.pth`` and its siblings are ``{"model": state_dict, "args": Namespace, ...}``
saved by the official ``main.py``; ``state_dict`` is that of ``models/dino/dino.py:DINO`` built by
``models/dino/dino.py:build_dino`` from ``config/DINO/DINO_4scale.py``.
:func:`detr_edu.convert.from_official` reads the file and calls the two functions here:
:func:`official_dino_config` (the course config the tensors describe) and
:func:`official_dino_rename` (official key -> course key); ``tests/data/dino_official_4scale_keys.json``
lists the 626 keys of the 4-scale ResNet-50 COCO model with their shapes.

The official layout, and where each part goes (every rule cites the code that registers the key;
paths are under ``IDEA-Research/DINO:models/dino/``):

* ``backbone.0.body.{conv1, bn1, layer1..4}`` -- torchvision's ResNet under
  ``IntermediateLayerGetter`` (``models/dino/backbone.py:BackboneBase.__init__``), inside
  ``Joiner``'s slot 0 (``backbone.py:Joiner.__init__``; slot 1, ``PositionEmbeddingSineHW``, has no
  tensors). Norms are ``backbone.py:FrozenBatchNorm2d``: four buffers ``weight``, ``bias``,
  ``running_mean``, ``running_var``, no ``num_batches_tracked``. Course: ``backbone.body.stem.0``
  = conv1, ``stem.1`` = bn1, ``stages.{i}`` = ``layer{i+1}`` (:class:`~detr_edu.backbone.ResNetBackbone`).
* ``input_proj.{l}.{0,1}`` -- conv + GroupNorm(32) per level (``dino.py:DINO.__init__``): 1x1 convs
  on layer2..4 (``return_interm_indices [1, 2, 3]``), then a 3x3 stride-2 conv on C5 for level 3.
  Course: ``backbone.neck.convs.{l}`` (l < 3), ``backbone.neck.extra_convs.{l - 3}``,
  ``backbone.neck.norms.{l}``.
* ``transformer.level_embed`` (``deformable_transformer.py:DeformableTransformer.__init__``) ->
  ``encoder.level_embed.weight``.
* ``transformer.encoder.layers.{i}`` (``deformable_transformer.py:DeformableTransformerEncoderLayer``):
  ``self_attn`` (``ops/modules/ms_deform_attn.py:MSDeformAttn``: ``sampling_offsets``,
  ``attention_weights``, ``value_proj``, ``output_proj``), ``norm1``, ``linear1``, ``linear2``,
  ``norm2`` -> ``encoder.encoder.layers.{i}.{self_attn, norm1, ffn.fc1, ffn.fc2, norm2}``.
  No encoder norm (``normalize_before=False``).
* ``transformer.decoder.layers.{i}`` (``deformable_transformer.py:DeformableTransformerDecoderLayer``,
  ``module_seq = sa, ca, ffn``): ``self_attn`` is ``nn.MultiheadAttention`` followed by **norm2**
  (``forward_sa``), ``cross_attn`` an ``MSDeformAttn`` followed by **norm1** (``forward_ca``), then
  ``linear1``/``linear2`` and ``norm3`` (``forward_ffn``) -> ``decoder.layers.{i}.{self_attn.attn,
  norm1, cross_attn, norm2, ffn.fc1, ffn.fc2, norm3}``.
* ``transformer.decoder.norm`` and ``transformer.decoder.ref_point_head.layers.{0,1}``
  (``deformable_transformer.py:TransformerDecoder.__init__``: ``MLP(2C, C, C, 2)`` of the box's sine
  embedding) -> ``decoder.norm``, ``query_pos_head.mlp.layers.{0,1}``.
* ``transformer.tgt_embed`` (``DeformableTransformer.__init__``, ``embed_init_tgt=True``: mixed query
  selection) -> ``tgt_embed``; without it the decoder content is the selected encoder features
  (``DeformableTransformer.forward``: ``tgt_undetach.detach()``) -> ``mixed_query_selection=False``.
* ``transformer.enc_output``, ``enc_output_norm`` (``DeformableTransformer.__init__``,
  ``two_stage_type='standard'``) and ``transformer.enc_out_class_embed``, ``enc_out_bbox_embed``
  (deep copies of the decoder heads, ``dino.py:DINO.__init__`` with ``two_stage_*_embed_share=False``)
  -> ``proposer.{memory_proj, memory_norm, class_embed, bbox_embed}``.
* ``class_embed.{i}``, ``bbox_embed.{i}.layers.{j}`` -- ``dino.py:DINO.__init__`` registers ONE
  Linear and ONE ``MLP(C, C, 4, 3)`` six times (``dec_pred_*_embed_share=True``) and registers the
  same lists again as ``transformer.decoder.class_embed`` / ``bbox_embed``: 12 names per tensor,
  all -> ``heads.class_embed.{i}`` / ``heads.bbox_embed.{i}.layers.{j}`` (itself one shared head;
  :func:`detr_edu.convert.load_state_into` checks that the copies are equal).
* ``label_enc`` -- ``nn.Embedding(dn_labelbook_size + 1, C)`` (``dino.py:DINO.__init__``), looked up
  by ``dn_components.py:prepare_for_cdn``, which draws noise labels in ``[0, num_classes)`` ->
  ``denoiser.label_embed`` (``num_classes + 1`` rows: DINO_4scale's ``dn_labelbook_size = 91``).

The backbone, neck and layer rules are those of official Deformable DETR, whose DINO fork keeps the
names; they are :func:`detr_edu.convert.official_layer_rename`'s.

Refused (:class:`~detr_edu.convert.ConversionError`, naming the key or arg): unshared decoder heads
(``dec_pred_*_embed_share=False``), ``dn_labelbook_size != num_classes``, a head count that does
not divide the width or the sampling offsets, different encoder / decoder point counts, another
neck layout (``return_interm_indices`` other than ``[1, 2, 3]``), a checkpoint trained without
denoising (``label_enc`` would have no home), and the saved ``args`` that change the forward pass
(:data:`_SUPPORTED_ARGS`). Tied encoder heads (``two_stage_*_embed_share=True``) load: their
``enc_out_*`` copies simply equal the decoder's head, which the course keeps as a separate copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from detr_edu.config import BackboneConfig, DINOConfig
from detr_edu.convert_keys import ConversionError, official_layer_rename, resnet_depth

__all__ = ["official_dino_rename", "official_dino_config"]

# modules outside the layers: official prefix -> course prefix
_MODULES = {
    "transformer.decoder.norm": "decoder.norm",  # deformable_transformer.py:TransformerDecoder.__init__
    "transformer.tgt_embed": "tgt_embed",  # DeformableTransformer.__init__ (embed_init_tgt)
    "transformer.enc_output": "proposer.memory_proj",  # DeformableTransformer.__init__ (two-stage)
    "transformer.enc_output_norm": "proposer.memory_norm",  # DeformableTransformer.__init__
    "transformer.enc_out_class_embed": "proposer.class_embed",  # dino.py:DINO.__init__
    "label_enc": "denoiser.label_embed",  # dino.py:DINO.__init__, dn_components.py:prepare_for_cdn
}
# MLPs (models/dino/utils.py:MLP, Linears in ``.layers``): official prefix -> course prefix
_MLPS = {
    "transformer.decoder.ref_point_head": "query_pos_head.mlp",  # TransformerDecoder.__init__
    "transformer.enc_out_bbox_embed": "proposer.bbox_embed",  # dino.py:DINO.__init__
}

# args of models/dino/dino.py:build_dino / deformable_transformer.py:build_deformable_transformer
# that change what the model computes: a checkpoint must have the value the course implements
_SUPPORTED_ARGS: dict[str, object] = {
    "two_stage_type": "standard",
    "decoder_sa_type": "sa",
    "decoder_module_seq": ["sa", "ca", "ffn"],
    "transformer_activation": "relu",
    "pre_norm": False,
    "dilation": False,
    "position_embedding": "sine",
    "pe_temperatureH": 20,
    "pe_temperatureW": 20,
    "return_interm_indices": [1, 2, 3],
    "num_patterns": 0,
    "two_stage_pat_embed": 0,
    "two_stage_add_query_num": 0,
    "two_stage_learn_wh": False,
    "two_stage_keep_all_tokens": False,
    "dec_layer_number": None,
    "decoder_layer_noise": False,
    "use_detached_boxes_dec_out": False,
    "add_channel_attention": False,
    "use_deformable_box_attn": False,
    "dec_pred_class_embed_share": True,
    "dec_pred_bbox_embed_share": True,
    "masks": False,
}


def official_dino_rename(key: str) -> str | None:
    """The course key an official DINO key's tensor goes to; None for a key the course does not know."""
    if (new := official_layer_rename(key)) is not None:  # backbone, neck, encoder/decoder layers
        return new
    # dino.py:DINO.__init__ -- the shared decoder heads, under both names
    if m := re.fullmatch(r"(?:transformer\.decoder\.)?class_embed\.(\d+)\.(weight|bias)", key):
        return f"heads.class_embed.{m.group(1)}.{m.group(2)}"
    if m := re.fullmatch(r"(?:transformer\.decoder\.)?bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)", key):
        return f"heads.bbox_embed.{m.group(1)}.layers.{m.group(2)}.{m.group(3)}"
    if (m := re.fullmatch(r"(.+)\.(weight|bias)", key)) and m.group(1) in _MODULES:
        return f"{_MODULES[m.group(1)]}.{m.group(2)}"
    if (m := re.fullmatch(r"(.+)\.layers\.(\d+)\.(weight|bias)", key)) and m.group(1) in _MLPS:
        return f"{_MLPS[m.group(1)]}.layers.{m.group(2)}.{m.group(3)}"
    return None


def _need(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise ConversionError(f"not an official DINO state dict: no {key}")
    return state[key]


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _arg(args: Mapping[str, object], name: str, default: float, kind: type = int) -> float:
    """``args[name]`` (absent: the config/DINO/DINO_4scale.py value) as ``kind``."""
    try:
        return kind(args.get(name, default))  # type: ignore[call-overload]
    except (TypeError, ValueError) as err:
        raise ConversionError(f"args.{name}={args[name]!r} is not a {kind.__name__}") from err


def _check_args(args: Mapping[str, object]) -> None:
    for name, value in _SUPPORTED_ARGS.items():
        if name in args and args[name] != value:
            raise ConversionError(
                f"args.{name}={args[name]!r}: the course's DINO implements only {name}={value!r} "
                "(config/DINO/DINO_4scale.py)"
            )
    if not args.get("use_dn", True) or _arg(args, "dn_number", 100) <= 0:
        # dino.py:build_dino passes dn_number=0, yet DINO.__init__ still registers label_enc
        raise ConversionError(
            "label_enc.weight: the checkpoint was trained without denoising (use_dn=False or "
            "dn_number=0); the course's DINO holds the label embedding only with denoising"
        )


def _check_shared(state: Mapping[str, Tensor], kind: str, flag: str) -> None:
    """Every decoder layer's head must be layer 0's (dino.py:DINO.__init__, ``flag=True``)."""
    for key, value in state.items():
        if m := re.fullmatch(rf"{kind}\.(\d+)\.(.+)", key):
            first = state.get(f"{kind}.0.{m.group(2)}")
            if first is not None and (first.shape != value.shape or not torch.equal(first, value)):
                raise ConversionError(
                    f"{key} differs from {kind}.0.{m.group(2)}: unshared decoder heads ({flag}=False) "
                    "are not supported; the course's DINO shares one head across decoder layers"
                )


def official_dino_config(state: Mapping[str, Tensor], args: Mapping[str, object] | None) -> DINOConfig:
    """The course config an official DINO state dict (and its saved ``args``, if any) describes.

    Sizes come from the tensors; the number of heads and the denoising settings, which no tensor
    shows, from ``args`` (``nheads``, ``dn_number``, ``dn_label_noise_ratio``, ``dn_box_noise_scale``,
    ``dropout``), else the ``config/DINO/DINO_4scale.py`` values (8, 100, 0.5, 0.4, 0.0).

    Raises:
        ConversionError: what the course's DINO cannot represent (the message names the key or arg).
    """
    args = dict(args or {})
    _check_args(args)
    num_classes, embed_dim = (int(n) for n in _need(state, "class_embed.0.weight").shape)
    num_levels = int(_need(state, "transformer.level_embed").shape[0])
    if num_levels < 3:
        raise ConversionError(f"transformer.level_embed has {num_levels} levels; the course loads 3 + extra")
    for level in range(num_levels):  # dino.py:DINO.__init__: 1x1 on layer2..4, then 3x3 stride 2
        key = f"input_proj.{level}.0.weight"
        if key in state and state[key].shape[-1] != (1 if level < 3 else 3):
            raise ConversionError(
                f"{key} {tuple(state[key].shape)}: the course's neck takes layer2..layer4 "
                "(return_interm_indices [1, 2, 3]) and makes extra levels with 3x3 stride-2 convs"
            )
    num_heads = int(_arg(args, "nheads", 8))
    if num_heads < 1 or embed_dim % num_heads:
        raise ConversionError(
            f"args.nheads={num_heads} does not divide the width {embed_dim} (class_embed.0.weight)"
        )
    points = set()
    for key, value in state.items():  # ms_deform_attn.py:MSDeformAttn.__init__: nh * L * P * 2 offsets
        if key.endswith("attn.sampling_offsets.weight"):
            if value.shape[0] % (num_heads * num_levels * 2):
                raise ConversionError(
                    f"{key} has {value.shape[0]} outputs, not a multiple of {num_heads} heads x "
                    f"{num_levels} levels x 2"
                )
            points.add(value.shape[0] // (num_heads * num_levels * 2))
    if len(points) != 1:
        raise ConversionError(
            f"sampling_offsets give {sorted(points) or 'no'} points per head and level "
            "(enc_n_points != dec_n_points?); the course uses one num_points"
        )
    label = _need(state, "label_enc.weight")
    if label.shape[0] != num_classes + 1:
        raise ConversionError(
            f"label_enc.weight has {label.shape[0]} rows, the course's denoiser num_classes + 1 = "
            f"{num_classes + 1} (dn_labelbook_size must equal num_classes)"
        )
    _check_shared(state, "class_embed", "dec_pred_class_embed_share")
    _check_shared(state, "bbox_embed", "dec_pred_bbox_embed_share")
    mixed = "transformer.tgt_embed.weight" in state
    if mixed:
        num_queries = int(state["transformer.tgt_embed.weight"].shape[0])
    elif "num_queries" in args:
        num_queries = int(_arg(args, "num_queries", 900))
    else:
        raise ConversionError("no transformer.tgt_embed.weight and no args.num_queries: how many queries?")
    return DINOConfig(
        num_classes=num_classes,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_encoder_layers=_count(state, "transformer.encoder.layers."),
        num_decoder_layers=_count(state, "transformer.decoder.layers."),
        feedforward_dim=int(_need(state, "transformer.encoder.layers.0.linear1.weight").shape[0]),
        dropout=_arg(args, "dropout", 0.0, float),
        num_queries=num_queries,
        num_points=points.pop(),
        mixed_query_selection=mixed,
        dn_number=int(_arg(args, "dn_number", 100)),
        label_noise_ratio=_arg(args, "dn_label_noise_ratio", 0.5, float),
        box_noise_scale=_arg(args, "dn_box_noise_scale", 0.4, float),
        backbone=BackboneConfig(
            depth=resnet_depth(state, "backbone.0.body."),
            levels=(2, 3, 4),
            norm="frozen",
            freeze_at=1,
            num_extra_levels=num_levels - 3,
        ),
    )
