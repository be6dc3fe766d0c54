"""Tests of detr_edu.convert_dino: the official DINO checkpoint into the course's DINO.

``tests/data/dino_official_4scale_keys.json`` is the complete ``state_dict()`` of the official
DINO-4scale ResNet-50 COCO model (IDEA-Research/DINO at faa8520, ``config/DINO/DINO_4scale.py``:
num_classes 91, hidden_dim 256, 6 + 6 layers, 900 queries, 4 levels, 4 points, 8 heads,
dim_feedforward 2048, dn_labelbook_size 91, shared decoder heads, two_stage_type 'standard' with
unshared encoder heads, FrozenBatchNorm2d ResNet-50 with return_interm_indices [1, 2, 3]): 626 keys
with their shapes, in ``state_dict`` order. It was derived by reading
``models/dino/dino.py:DINO.__init__`` and ``build_dino``,
``models/dino/deformable_transformer.py:DeformableTransformer.__init__``, ``TransformerEncoder``,
``TransformerDecoder``, ``DeformableTransformerEncoderLayer``, ``DeformableTransformerDecoderLayer``
and ``build_deformable_transformer``, ``models/dino/backbone.py:FrozenBatchNorm2d`` (four buffers, no
``num_batches_tracked``), ``BackboneBase`` (``IntermediateLayerGetter`` up to ``layer4``) and
``Joiner`` (the sine position embedding has no tensors), ``models/dino/utils.py:MLP`` and
``models/dino/ops/modules/ms_deform_attn.py:MSDeformAttn.__init__``; :func:`official_keys` below
writes the same list from those rules, and it was checked once against the ``state_dict()`` of the
official ``build_dino`` model built from the DINO_4scale args (CUDA op stubbed, no weights): the same
keys, shapes and order.

The tests (a) map the whole list onto the course model the config describes; (b) load a fake
official checkpoint of random tensors through :func:`detr_edu.convert.from_official` and find every
tensor, bit for bit, where the official forward uses it; (c) check the refusals.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from detr_edu.build import build_model
from detr_edu.config import get_preset
from detr_edu.convert import ConversionError, from_official
from detr_edu.convert_dino import official_dino_config, official_dino_rename

KEYS_FILE = Path(__file__).parent / "data" / "dino_official_4scale_keys.json"


def official_keys(
    *,
    num_classes: int = 91,
    d: int = 256,
    enc: int = 6,
    dec: int = 6,
    queries: int = 900,
    levels: int = 4,
    points: int = 4,
    heads: int = 8,
    ffn: int = 2048,
) -> dict[str, list[int]]:
    """The official DINO state-dict keys and shapes (ResNet-50, return_interm_indices [1, 2, 3]).

    Follows the registration order of the official modules (a module's own tensors, then its
    children in assignment order), so that the defaults give the JSON file exactly.
    """
    out: dict[str, list[int]] = {}

    def linear(name: str, i: int, o: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = [o, i], [o]

    def norm(name: str, n: int, frozen: bool = False) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = [n], [n]
        if frozen:  # backbone.py:FrozenBatchNorm2d registers four buffers
            out[f"{name}.running_mean"], out[f"{name}.running_var"] = [n], [n]

    def msda(name: str) -> None:  # ms_deform_attn.py:MSDeformAttn.__init__
        linear(f"{name}.sampling_offsets", d, heads * levels * points * 2)
        linear(f"{name}.attention_weights", d, heads * levels * points)
        linear(f"{name}.value_proj", d, d)
        linear(f"{name}.output_proj", d, d)

    def mlp(name: str, i: int, o: int, n: int) -> None:  # utils.py:MLP
        dims = [i] + [d] * (n - 1) + [o]
        for j in range(n):
            linear(f"{name}.layers.{j}", dims[j], dims[j + 1])

    # dino.py:DINO.__init__ registers transformer, label_enc, input_proj, backbone, bbox_embed, class_embed
    out["transformer.level_embed"] = [levels, d]
    for i in range(enc):
        p = f"transformer.encoder.layers.{i}"
        msda(f"{p}.self_attn")
        norm(f"{p}.norm1", d)
        linear(f"{p}.linear1", d, ffn)
        linear(f"{p}.linear2", ffn, d)
        norm(f"{p}.norm2", d)
    for i in range(dec):
        p = f"transformer.decoder.layers.{i}"
        msda(f"{p}.cross_attn")
        norm(f"{p}.norm1", d)
        out[f"{p}.self_attn.in_proj_weight"], out[f"{p}.self_attn.in_proj_bias"] = [3 * d, d], [3 * d]
        linear(f"{p}.self_attn.out_proj", d, d)
        norm(f"{p}.norm2", d)
        linear(f"{p}.linear1", d, ffn)
        linear(f"{p}.linear2", ffn, d)
        norm(f"{p}.norm3", d)
    norm("transformer.decoder.norm", d)
    mlp("transformer.decoder.ref_point_head", 2 * d, d, 2)
    for i in range(dec):  # the shared heads, registered again by DINO.__init__
        mlp(f"transformer.decoder.bbox_embed.{i}", d, 4, 3)
    for i in range(dec):
        linear(f"transformer.decoder.class_embed.{i}", d, num_classes)
    out["transformer.tgt_embed.weight"] = [queries, d]
    linear("transformer.enc_output", d, d)
    norm("transformer.enc_output_norm", d)
    mlp("transformer.enc_out_bbox_embed", d, 4, 3)
    linear("transformer.enc_out_class_embed", d, num_classes)
    out["label_enc.weight"] = [num_classes + 1, d]  # dn_labelbook_size = num_classes
    for level in range(levels):
        c = [512, 1024, 2048][level] if level < 3 else (2048 if level == 3 else d)
        k = 1 if level < 3 else 3
        out[f"input_proj.{level}.0.weight"], out[f"input_proj.{level}.0.bias"] = [d, c, k, k], [d]
        norm(f"input_proj.{level}.1", d)
    body = "backbone.0.body"
    out[f"{body}.conv1.weight"] = [64, 3, 7, 7]
    norm(f"{body}.bn1", 64, frozen=True)
    cin = 64
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):  # torchvision Bottleneck ResNet-50
        w = 64 * 2 ** (stage - 1)
        for b in range(blocks):
            p = f"{body}.layer{stage}.{b}"
            for j, (o, i, k) in enumerate([(w, cin, 1), (w, w, 3), (4 * w, w, 1)], start=1):
                out[f"{p}.conv{j}.weight"] = [o, i, k, k]
                norm(f"{p}.bn{j}", o, frozen=True)
            if b == 0:
                out[f"{p}.downsample.0.weight"] = [4 * w, cin, 1, 1]
                norm(f"{p}.downsample.1", 4 * w, frozen=True)
            cin = 4 * w
    for i in range(dec):
        mlp(f"bbox_embed.{i}", d, 4, 3)
    for i in range(dec):
        linear(f"class_embed.{i}", d, num_classes)
    return out


TINY = dict(num_classes=5, d=32, enc=1, dec=2, queries=10, levels=4, points=2, heads=4, ffn=64)
TINY_ARGS = dict(
    nheads=4,
    dn_number=7,
    dn_label_noise_ratio=0.25,
    dn_box_noise_scale=0.3,
    two_stage_type="standard",
    decoder_sa_type="sa",
    decoder_module_seq=["sa", "ca", "ffn"],
    use_dn=True,
)


def _alias(key: str) -> str:
    """The official name of the tensor ``key`` is one of: dino.py:DINO.__init__ registers one class
    head and one box head under ``(transformer.decoder.)class_embed.{0..5}`` / ``bbox_embed.{0..5}``."""
    return re.sub(r"^(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.\d+\.", r"\1.0.", key)


def _zeros_state(shapes: dict[str, list[int]]) -> dict[str, Tensor]:
    return {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}  # shapes only, no memory


def _random_state(shapes: dict[str, list[int]]) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, Tensor] = {}
    state = {}
    for key, shape in shapes.items():
        alias = _alias(key)
        if alias not in tensors:
            t = torch.randn(shape, generator=gen)
            tensors[alias] = t.abs() + 0.5 if key.endswith("running_var") else t
        state[key] = tensors[alias]
    return state


def _save(path: Path, state: dict[str, Tensor], args: dict | None = TINY_ARGS) -> Path:
    data: dict = {"model": state}
    if args is not None:
        data["args"] = argparse.Namespace(**args)
    torch.save(data, path)
    return path


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, Tensor]:
    return _random_state(official_keys(**TINY))


# --- (a) the key list -------------------------------------------------------------------------------


def test_official_keys_rebuild_the_json_file() -> None:
    shapes = json.loads(KEYS_FILE.read_text())
    assert len(shapes) == 626
    assert list(official_keys().items()) == list(shapes.items())


def test_every_official_4scale_key_maps_onto_the_course_model() -> None:
    shapes = json.loads(KEYS_FILE.read_text())
    renamed = {k: official_dino_rename(k) for k in shapes}
    assert [k for k, v in renamed.items() if v is None] == []
    cfg = official_dino_config(_zeros_state(shapes), None)
    assert cfg == get_preset("dino_r50_coco")  # the published DINO-4scale R50
    with torch.device("meta"):
        model = build_model(cfg, load_backbone_weights=False)
    target = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(k for k, v in renamed.items() if v not in target) == []
    assert set(target) == set(renamed.values())  # every course tensor is filled
    assert {k: (shapes[k], target[v]) for k, v in renamed.items() if shapes[k] != target[v]} == {}
    # shared tensors: 12 official names for each of the decoder head's tensors
    assert sum(v == "heads.class_embed.0.weight" for v in renamed.values()) == 2
    assert sum(v.startswith("heads.class_embed.") and v.endswith("weight") for v in renamed.values()) == 12


def test_config_from_tensors_and_args() -> None:
    shapes = official_keys(**TINY)
    cfg = official_dino_config(_zeros_state(shapes), TINY_ARGS)
    assert (cfg.num_classes, cfg.embed_dim, cfg.num_heads) == (5, 32, 4)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.feedforward_dim) == (1, 2, 64)
    assert (cfg.num_queries, cfg.num_points, cfg.backbone.num_levels) == (10, 2, 4)
    assert (cfg.dn_number, cfg.label_noise_ratio, cfg.box_noise_scale) == (7, 0.25, 0.3)
    assert (cfg.backbone.depth, cfg.backbone.levels, cfg.backbone.norm) == (50, (2, 3, 4), "frozen")
    assert cfg.mixed_query_selection
    # embed_init_tgt=False: no tgt_embed, the decoder content comes from the selected encoder features
    del shapes["transformer.tgt_embed.weight"]
    cfg = official_dino_config(_zeros_state(shapes), {**TINY_ARGS, "num_queries": 10})
    assert not cfg.mixed_query_selection and cfg.num_queries == 10


# --- (b) a fake official checkpoint -----------------------------------------------------------------

# written by hand, independent of official_dino_rename: the course module attribute that must hold
# the official tensor for the course's forward to use it where the official forward does
WHERE = {
    "backbone.0.body.conv1.weight": "backbone.body.stem.0.weight",
    "backbone.0.body.bn1.running_var": "backbone.body.stem.1.running_var",
    "backbone.0.body.layer1.0.downsample.1.running_mean": (
        "backbone.body.stages.0.0.downsample.1.running_mean"
    ),
    "backbone.0.body.layer3.5.conv3.weight": "backbone.body.stages.2.5.conv3.weight",
    "backbone.0.body.layer4.2.bn2.bias": "backbone.body.stages.3.2.bn2.bias",
    "input_proj.0.0.weight": "backbone.neck.convs.0.weight",
    "input_proj.2.0.bias": "backbone.neck.convs.2.bias",
    "input_proj.3.0.weight": "backbone.neck.extra_convs.0.weight",  # 3x3 stride 2 on C5
    "input_proj.3.1.weight": "backbone.neck.norms.3.weight",
    "transformer.level_embed": "encoder.level_embed.weight",
    "transformer.encoder.layers.0.self_attn.sampling_offsets.bias": (
        "encoder.encoder.layers.0.self_attn.sampling_offsets.bias"
    ),
    "transformer.encoder.layers.0.self_attn.value_proj.weight": (
        "encoder.encoder.layers.0.self_attn.value_proj.weight"
    ),
    "transformer.encoder.layers.0.norm1.weight": "encoder.encoder.layers.0.norm1.weight",
    "transformer.encoder.layers.0.linear1.weight": "encoder.encoder.layers.0.ffn.fc1.weight",
    "transformer.encoder.layers.0.linear2.bias": "encoder.encoder.layers.0.ffn.fc2.bias",
    "transformer.encoder.layers.0.norm2.bias": "encoder.encoder.layers.0.norm2.bias",
    "transformer.decoder.layers.1.self_attn.in_proj_weight": "decoder.layers.1.self_attn.attn.in_proj_weight",
    "transformer.decoder.layers.1.self_attn.out_proj.bias": "decoder.layers.1.self_attn.attn.out_proj.bias",
    # forward_sa normalises with norm2, forward_ca with norm1
    "transformer.decoder.layers.1.norm2.weight": "decoder.layers.1.norm1.weight",
    "transformer.decoder.layers.1.cross_attn.attention_weights.weight": (
        "decoder.layers.1.cross_attn.attention_weights.weight"
    ),
    "transformer.decoder.layers.1.norm1.bias": "decoder.layers.1.norm2.bias",
    "transformer.decoder.layers.1.linear2.weight": "decoder.layers.1.ffn.fc2.weight",
    "transformer.decoder.layers.1.norm3.weight": "decoder.layers.1.norm3.weight",
    "transformer.decoder.norm.bias": "decoder.norm.bias",
    "transformer.decoder.ref_point_head.layers.0.weight": "query_pos_head.mlp.layers.0.weight",
    "transformer.tgt_embed.weight": "tgt_embed.weight",
    "transformer.enc_output.weight": "proposer.memory_proj.weight",
    "transformer.enc_output_norm.bias": "proposer.memory_norm.bias",
    "transformer.enc_out_class_embed.bias": "proposer.class_embed.bias",
    "transformer.enc_out_bbox_embed.layers.2.weight": "proposer.bbox_embed.layers.2.weight",
    "class_embed.1.weight": "heads.class_embed.1.weight",
    "transformer.decoder.class_embed.0.bias": "heads.class_embed.0.bias",
    "bbox_embed.0.layers.1.weight": "heads.bbox_embed.0.layers.1.weight",
    "transformer.decoder.bbox_embed.1.layers.2.bias": "heads.bbox_embed.1.layers.2.bias",
    "label_enc.weight": "denoiser.label_embed.weight",
}


def test_fake_checkpoint_loads_every_tensor_where_it_is_used(tiny_state, tmp_path) -> None:
    model = from_official(_save(tmp_path / "dino.pth", tiny_state))
    assert not model.training
    cfg = model.published.config
    assert (cfg.num_heads, cfg.dn_number, cfg.num_points, cfg.num_queries) == (4, 7, 2, 10)
    ours = model.state_dict()
    assert set(ours) == {official_dino_rename(k) for k in tiny_state}
    wrong = [k for k, v in tiny_state.items() if not torch.equal(ours[official_dino_rename(k)], v)]
    assert wrong == []
    for key, where in WHERE.items():
        assert torch.equal(functools.reduce(getattr, where.split("."), model), tiny_state[key]), key
    # the two-stage pair is a separate copy: loaded from enc_out_*, not from the decoder's heads
    assert not torch.equal(model.proposer.class_embed.weight, model.heads.class_embed[0].weight)


# --- (c) refusals -----------------------------------------------------------------------------------


def _edited(state: dict[str, Tensor], edit: str) -> tuple[dict[str, Tensor], str]:
    state = dict(state)
    d = state["transformer.level_embed"].shape[1]
    if edit == "missing":
        del state["transformer.decoder.layers.1.norm3.bias"]
        return state, "decoder.layers.1.norm3.bias"  # the course tensor nothing fills
    if edit == "unknown":
        state["transformer.pat_embed_for_2stage"] = torch.zeros(1, d)
        return state, "transformer.pat_embed_for_2stage"
    if edit == "misshaped":
        state["transformer.decoder.layers.0.linear2.bias"] = torch.zeros(d + 1)
        return state, "transformer.decoder.layers.0.linear2.bias"
    assert edit == "unshared"  # dec_pred_class_embed_share=False: layer 1's head is its own
    other = state["class_embed.1.weight"] + 1.0
    state["class_embed.1.weight"] = state["transformer.decoder.class_embed.1.weight"] = other
    return state, "class_embed.1.weight"


@pytest.mark.parametrize("edit", ["missing", "unknown", "misshaped", "unshared"])
def test_refusals_name_the_key(tiny_state, tmp_path, edit) -> None:
    state, key = _edited(tiny_state, edit)
    with pytest.raises(ConversionError, match=re.escape(key)):
        from_official(_save(tmp_path / f"{edit}.pth", state))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"label_enc.weight": torch.zeros(101, 32)}, "label_enc.weight"),  # dn_labelbook_size 100 != 5
        ({"bbox_embed.1.layers.0.bias": torch.ones(32)}, "bbox_embed.1.layers.0.bias"),
        (
            {"transformer.encoder.layers.0.self_attn.sampling_offsets.weight": torch.zeros(65, 32)},
            "sampling_offsets",
        ),
        ({"input_proj.3.0.weight": torch.zeros(32, 2048, 1, 1)}, "input_proj.3.0.weight"),  # 5-scale layout
    ],
)
def test_config_refuses_what_the_course_cannot_represent(tiny_state, edit, match) -> None:
    with pytest.raises(ConversionError, match=re.escape(match)):
        official_dino_config({**tiny_state, **edit}, TINY_ARGS)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"nheads": 3}, "nheads=3"),  # 3 does not divide 32
        ({"decoder_sa_type": "ca_label"}, "decoder_sa_type"),
        ({"two_stage_keep_all_tokens": True}, "two_stage_keep_all_tokens"),
        ({"use_dn": False}, "label_enc.weight"),
    ],
)
def test_config_refuses_unsupported_args(tiny_state, args, match) -> None:
    with pytest.raises(ConversionError, match=re.escape(match)):
        official_dino_config(tiny_state, {**TINY_ARGS, **args})
