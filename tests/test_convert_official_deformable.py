"""Official Deformable-DETR checkpoints into the course's :class:`~detr_edu.deformable_detr.DeformableDETR`.

Where the key lists come from. ``tests/data/deformable_detr_official_keys.json`` holds, for the three
published variants -- ``"plain"``, ``"box_refine"`` (``--with_box_refine``) and ``"two_stage"``
(``--with_box_refine --two_stage``) -- the complete ``state_dict()`` (key -> shape) of the official
``DeformableDETR`` that ``build(args)`` makes with the default arguments of ``main.py`` (ResNet-50,
``hidden_dim`` 256, 6 + 6 layers, ``dim_feedforward`` 1024, 8 heads, 4 levels, 4 points, 300 queries,
91 classes for ``dataset_file="coco"``); ``main.py`` saves ``{"model": model.state_dict(), "args": args}``.
The lists were derived by reading the official code (fundamentalvision/Deformable-DETR, commit
11169a6), never by running it:

* ``repo:models/deformable_detr.py:DeformableDETR.__init__`` -- module order ``transformer``,
  ``class_embed``, ``bbox_embed`` (``MLP``: ``layers.0..2``), ``query_embed`` (one-stage only,
  ``(num_queries, 2 * hidden_dim)``), ``input_proj`` (1x1 conv + GroupNorm per backbone level, a
  3x3/stride-2 conv from 2048 channels for the fourth), ``backbone``; ``num_pred = dec_layers (+ 1 with
  two_stage)``. Without refinement the heads are ``nn.ModuleList([head for _ in range(num_pred)])``
  -- one module registered ``num_pred`` times, so ``class_embed.0..5`` all appear in the state dict
  with one value; with refinement ``_get_clones`` (deep copies) and
  ``transformer.decoder.bbox_embed = self.bbox_embed`` (and, two-stage,
  ``transformer.decoder.class_embed = self.class_embed``) register the same heads a second time.
* ``repo:models/deformable_transformer.py:DeformableTransformer.__init__`` -- own parameter
  ``level_embed`` first (a module's parameters precede its children in ``state_dict``), then
  ``encoder``, ``decoder``, then ``enc_output``/``enc_output_norm``/``pos_trans``/``pos_trans_norm``
  (two-stage) or ``reference_points``. ``DeformableTransformerEncoderLayer``: ``self_attn`` (MSDeformAttn),
  ``norm1``, ``linear1``, ``linear2``, ``norm2``. ``DeformableTransformerDecoderLayer``: ``cross_attn``
  (MSDeformAttn), ``norm1``, ``self_attn`` (``nn.MultiheadAttention``: ``in_proj_weight``,
  ``in_proj_bias``, ``out_proj``), ``norm2``, ``linear1``, ``linear2``, ``norm3``. The decoder's
  ``bbox_embed``/``class_embed`` start as plain ``None`` attributes and become children (after
  ``layers``) when ``DeformableDETR`` assigns a ``ModuleList``.
* ``repo:models/ops/modules/ms_deform_attn.py:MSDeformAttn.__init__`` -- ``sampling_offsets``
  (``heads * levels * points * 2`` outputs), ``attention_weights`` (``heads * levels * points``),
  ``value_proj``, ``output_proj``.
* ``repo:models/backbone.py:Backbone`` / ``FrozenBatchNorm2d`` / ``Joiner`` -- ``backbone.0.body`` is
  torchvision's ResNet-50 (``IntermediateLayerGetter``: ``conv1`` .. ``layer4``, no ``fc``) with
  ``FrozenBatchNorm2d``, which registers four buffers ``weight``, ``bias``, ``running_mean``,
  ``running_var`` and no ``num_batches_tracked``; ``backbone.1`` (``PositionEmbeddingSine``) has none.

:func:`official_keys` writes the same structure for any sizes; :func:`test_official_keys_reproduce_json`
checks that it reproduces the JSON at the default sizes, so the reduced lists the slower tests use
(C = 64, 4 heads, 1 + 2 layers, 2 points, 10 queries, the full ResNet-50) are trustworthy.

The forward checks (``test_*_computes_official``) re-state the official computations named in each
test from their reading (``repo:path:function``) with plain torch operations on the *official*
tensors by their *official* names, and compare with the course's modules after conversion, in float64.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from detr_edu.backbone import FeatureMaps
from detr_edu.build import build_model
from detr_edu.convert import (
    ConversionError,
    from_official,
    official_deformable_config,
    official_deformable_rename,
)

KEYS_FILE = Path(__file__).parent / "data" / "deformable_detr_official_keys.json"
VARIANTS = {"plain": (False, False), "box_refine": (True, False), "two_stage": (True, True)}
FULL = dict(hidden=256, heads=8, enc_layers=6, dec_layers=6, ffn=1024, levels=4, points=4, queries=300)
SMALL = dict(hidden=64, heads=4, enc_layers=1, dec_layers=2, ffn=64, levels=4, points=2, queries=10)
NUM_CLASSES = 91


# ---------------------------------------------------------------------------------------------------
# the official state dict's structure
# ---------------------------------------------------------------------------------------------------


def official_keys(
    variant: str,
    *,
    hidden: int,
    heads: int,
    enc_layers: int,
    dec_layers: int,
    ffn: int,
    levels: int,
    points: int,
    queries: int,
    num_classes: int = NUM_CLASSES,
) -> dict[str, list[int]]:
    """key -> shape of the official ``DeformableDETR.state_dict()``, in registration order."""
    box_refine, two_stage = VARIANTS[variant]
    d = hidden
    keys: dict[str, list[int]] = {}

    def linear(prefix: str, n_out: int, n_in: int) -> None:
        keys[f"{prefix}.weight"] = [n_out, n_in]
        keys[f"{prefix}.bias"] = [n_out]

    def norm(prefix: str, n: int) -> None:  # LayerNorm, GroupNorm
        keys[f"{prefix}.weight"] = [n]
        keys[f"{prefix}.bias"] = [n]

    def frozen_bn(prefix: str, n: int) -> None:  # four buffers, no num_batches_tracked
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = [n]

    def ms_deform_attn(prefix: str) -> None:
        linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, d)
        linear(f"{prefix}.attention_weights", heads * levels * points, d)
        linear(f"{prefix}.value_proj", d, d)
        linear(f"{prefix}.output_proj", d, d)

    def mlp(prefix: str) -> None:  # MLP(hidden, hidden, 4, 3)
        linear(f"{prefix}.layers.0", d, d)
        linear(f"{prefix}.layers.1", d, d)
        linear(f"{prefix}.layers.2", 4, d)

    num_pred = dec_layers + 1 if two_stage else dec_layers
    # transformer: own parameter, encoder, decoder, then the two-stage / one-stage modules
    keys["transformer.level_embed"] = [levels, d]
    for i in range(enc_layers):
        p = f"transformer.encoder.layers.{i}"
        ms_deform_attn(f"{p}.self_attn")
        norm(f"{p}.norm1", d)
        linear(f"{p}.linear1", ffn, d)
        linear(f"{p}.linear2", d, ffn)
        norm(f"{p}.norm2", d)
    for i in range(dec_layers):
        p = f"transformer.decoder.layers.{i}"
        ms_deform_attn(f"{p}.cross_attn")
        norm(f"{p}.norm1", d)
        keys[f"{p}.self_attn.in_proj_weight"] = [3 * d, d]
        keys[f"{p}.self_attn.in_proj_bias"] = [3 * d]
        linear(f"{p}.self_attn.out_proj", d, d)
        norm(f"{p}.norm2", d)
        linear(f"{p}.linear1", ffn, d)
        linear(f"{p}.linear2", d, ffn)
        norm(f"{p}.norm3", d)
    if box_refine:  # the decoder's hack attributes: the same ModuleLists as the top-level heads
        for i in range(num_pred):
            mlp(f"transformer.decoder.bbox_embed.{i}")
    if two_stage:
        for i in range(num_pred):
            linear(f"transformer.decoder.class_embed.{i}", num_classes, d)
        linear("transformer.enc_output", d, d)
        norm("transformer.enc_output_norm", d)
        linear("transformer.pos_trans", 2 * d, 2 * d)
        norm("transformer.pos_trans_norm", 2 * d)
    else:
        linear("transformer.reference_points", 2, d)
    for i in range(num_pred):
        linear(f"class_embed.{i}", num_classes, d)
    for i in range(num_pred):
        mlp(f"bbox_embed.{i}")
    if not two_stage:
        keys["query_embed.weight"] = [queries, 2 * d]
    channels = [512, 1024, 2048]  # BackboneBase.num_channels with return_interm_layers
    for lvl in range(levels):
        if lvl < len(channels):
            keys[f"input_proj.{lvl}.0.weight"] = [d, channels[lvl], 1, 1]
        else:  # the first extra level reads C5, the next ones the previous extra level
            keys[f"input_proj.{lvl}.0.weight"] = [d, channels[-1] if lvl == len(channels) else d, 3, 3]
        keys[f"input_proj.{lvl}.0.bias"] = [d]
        norm(f"input_proj.{lvl}.1", d)
    # backbone.0.body: torchvision ResNet-50 (Bottleneck, expansion 4) with FrozenBatchNorm2d
    body = "backbone.0.body"
    keys[f"{body}.conv1.weight"] = [64, 3, 7, 7]
    frozen_bn(f"{body}.bn1", 64)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), start=1):
        for b in range(blocks):
            p = f"{body}.layer{stage}.{b}"
            keys[f"{p}.conv1.weight"] = [planes, inplanes, 1, 1]
            frozen_bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = [planes, planes, 3, 3]
            frozen_bn(f"{p}.bn2", planes)
            keys[f"{p}.conv3.weight"] = [planes * 4, planes, 1, 1]
            frozen_bn(f"{p}.bn3", planes * 4)
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = [planes * 4, inplanes, 1, 1]
                frozen_bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return keys


def official_source(key: str, variant: str) -> str:
    """The official module a key's tensor belongs to: keys with one source hold one tensor."""
    m = re.fullmatch(r"(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
    if m is None:
        return key
    kind, index, rest = m.groups()
    return f"{kind}.{0 if variant == 'plain' else index}.{rest}"


def official_args(variant: str, sizes: dict) -> argparse.Namespace:
    """The ``args`` main.py stores (its defaults; the sizes and flags of this variant)."""
    box_refine, two_stage = VARIANTS[variant]
    return argparse.Namespace(
        lr=2e-4,
        lr_backbone_names=["backbone.0"],
        lr_backbone=2e-5,
        lr_linear_proj_names=["reference_points", "sampling_offsets"],
        lr_linear_proj_mult=0.1,
        batch_size=2,
        weight_decay=1e-4,
        epochs=50,
        lr_drop=40,
        lr_drop_epochs=None,
        clip_max_norm=0.1,
        sgd=False,
        with_box_refine=box_refine,
        two_stage=two_stage,
        frozen_weights=None,
        backbone="resnet50",
        dilation=False,
        position_embedding="sine",
        position_embedding_scale=2 * math.pi,
        num_feature_levels=sizes["levels"],
        enc_layers=sizes["enc_layers"],
        dec_layers=sizes["dec_layers"],
        dim_feedforward=sizes["ffn"],
        hidden_dim=sizes["hidden"],
        dropout=0.1,
        nheads=sizes["heads"],
        num_queries=sizes["queries"],
        dec_n_points=sizes["points"],
        enc_n_points=sizes["points"],
        masks=False,
        aux_loss=True,
        dataset_file="coco",
        coco_path="./data/coco",
        output_dir="",
        device="cuda",
        seed=42,
        resume="",
        start_epoch=0,
        eval=False,
        num_workers=2,
        cache_mode=False,
    )


def fake_state(
    keys: dict[str, list[int]], variant: str, seed: int, *, reuse: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Random tensors of exactly these shapes; one value per official module (shared heads equal).

    Scaled so a forward pass stays O(1): fan-in scaled weights, norm scales near 1, positive variances.
    ``reuse``: tensors taken as they are for their keys (another variant's backbone: it saves time).
    """
    gen = torch.Generator().manual_seed(seed)
    drawn: dict[str, torch.Tensor] = dict(reuse or {})
    state = {}
    for key, shape in keys.items():
        source = official_source(key, variant)
        if source not in drawn:
            noise = torch.randn(shape, generator=gen)
            if key.endswith("running_var"):
                value = torch.rand(shape, generator=gen) + 0.5
            elif len(shape) >= 2:
                value = noise / math.sqrt(math.prod(shape[1:]))
            elif key.endswith("weight"):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            drawn[source] = value
        state[key] = drawn[source]  # shared modules: one tensor, as torch.save stores them
    return state


# ---------------------------------------------------------------------------------------------------
# the JSON and the key lists
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published_keys() -> dict[str, dict[str, list[int]]]:
    return json.loads(KEYS_FILE.read_text())


def test_official_keys_reproduce_json(published_keys):
    assert set(published_keys) == set(VARIANTS)
    for variant, keys in published_keys.items():
        assert list(official_keys(variant, **FULL).items()) == list(keys.items()), variant


def test_official_key_counts(published_keys):
    # ResNet-50 body: 53 convs + 53 frozen norms x 4 buffers = 265; input_proj 4 x 4 = 16;
    # encoder layer 8 + 2 + 2 + 2 + 2 = 16; decoder layer 8 + 2 + 4 + 2 + 2 + 2 + 2 = 22;
    # class head 2, box head 6; plain: + level_embed, reference_points (2), query_embed
    common = 265 + 16 + 6 * 16 + 6 * 22 + 1
    assert len(published_keys["plain"]) == common + 2 + 1 + 6 * (2 + 6) == 561
    assert len(published_keys["box_refine"]) == 561 + 6 * 6 == 597  # + transformer.decoder.bbox_embed
    assert len(published_keys["two_stage"]) == common + 8 + 2 * 7 * (2 + 6) == 630


def test_official_backbone_is_torchvision_resnet50_with_frozen_bn(published_keys):
    """``backbone.0.body`` is the torchvision ResNet-50 that repo:models/backbone.py:Backbone builds
    (the official FrozenBatchNorm2d registers the same four buffers as torchvision's)."""
    with torch.device("meta"):
        net = torchvision.models.resnet50(weights=None, norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    expected = {f"backbone.0.body.{k}": list(v.shape) for k, v in net.state_dict().items() if "fc." not in k}
    for keys in published_keys.values():
        assert {k: v for k, v in keys.items() if k.startswith("backbone.")} == expected
    mha = torch.nn.MultiheadAttention(256, 8).state_dict()
    prefix = "transformer.decoder.layers.0.self_attn."
    assert {prefix + k: list(v.shape) for k, v in mha.items()} == {
        k: v for k, v in published_keys["plain"].items() if k.startswith(prefix)
    }


# ---------------------------------------------------------------------------------------------------
# (a) every key maps, at the published sizes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_official_key_maps_onto_the_course_model(published_keys, variant):
    keys = published_keys[variant]
    box_refine, two_stage = VARIANTS[variant]
    meta = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}  # shapes only
    cfg = official_deformable_config(meta, vars(official_args(variant, FULL)))
    assert (cfg.box_refine, cfg.two_stage) == (box_refine, two_stage)
    assert (cfg.num_classes, cfg.embed_dim, cfg.num_heads, cfg.num_points) == (91, 256, 8, 4)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.feedforward_dim) == (6, 6, 1024)
    assert (cfg.num_queries, cfg.backbone.depth, cfg.backbone.num_levels) == (300, 50, 4)
    with torch.device("meta"):  # shapes and sharing only
        model = build_model(cfg, load_backbone_weights=False)
    target = model.state_dict(keep_vars=True)

    mapped: dict[str, list[str]] = {}
    for key in keys:
        new = official_deformable_rename(key, num_decoder_layers=6)
        assert new is not None, key
        assert new in target, f"{key} -> {new}"
        assert list(target[new].shape) == keys[key], f"{key} -> {new}"
        mapped.setdefault(new, []).append(key)
    assert set(target) == set(mapped)  # every course tensor is filled

    # the course shares a tensor between two names exactly where the official model does
    names = list(mapped)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            same_course = target[a] is target[b]
            same_official = official_source(mapped[a][0], variant) == official_source(mapped[b][0], variant)
            assert same_course == same_official, (a, b)
    for sources in mapped.values():  # two official names on one course name: one official tensor
        assert len({official_source(k, variant) for k in sources}) == 1, sources


# ---------------------------------------------------------------------------------------------------
# (b) a fake official checkpoint loads bit for bit (reduced transformer, full ResNet-50)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (official state, path of the saved checkpoint, loaded course model)."""
    out = {}
    backbone = None
    for seed, variant in enumerate(VARIANTS):
        state = fake_state(official_keys(variant, **SMALL), variant, seed, reuse=backbone)
        backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
        path = tmp_path_factory.mktemp(variant) / "checkpoint.pth"
        torch.save({"model": state, "args": official_args(variant, SMALL), "epoch": 49}, path)
        out[variant] = (state, path, from_official(path))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fake_checkpoint_loads_bit_for_bit(checkpoints, variant):
    state, _, model = checkpoints[variant]
    box_refine, two_stage = VARIANTS[variant]
    course = model.state_dict()
    for key, value in state.items():
        new = official_deformable_rename(key, num_decoder_layers=SMALL["dec_layers"])
        assert course[new].dtype == value.dtype and torch.equal(course[new], value), f"{key} -> {new}"
    cfg = model.published.config
    assert (cfg.box_refine, cfg.two_stage, cfg.num_queries) == (box_refine, two_stage, SMALL["queries"])
    assert (cfg.embed_dim, cfg.num_heads, cfg.num_points, cfg.num_decoder_layers) == (64, 4, 2, 2)
    assert not model.training


# ---------------------------------------------------------------------------------------------------
# (c) what the official forward computes, where the names could hide a swap
# ---------------------------------------------------------------------------------------------------


def _f64(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.double() for k, v in state.items() if k.startswith(prefix)}


def _layer_norm(x, w, p):
    return F.layer_norm(x, x.shape[-1:], w[f"{p}.weight"], w[f"{p}.bias"])


def _linear(x, w, p):
    return F.linear(x, w[f"{p}.weight"], w[f"{p}.bias"])


def official_ms_deform_attn(w, query, value_in, ref, shapes, pad_mask, *, heads, points):
    """repo:models/ops/modules/ms_deform_attn.py:MSDeformAttn.forward (and the sampling of
    repo:models/ops/functions/ms_deform_attn_func.py:ms_deform_attn_core_pytorch): offsets laid out
    (heads, levels, points, xy), weights soft-maxed over levels x points per head, value channels
    split head-major, bilinear sampling at ``loc * size - 0.5`` with zeros outside."""
    B, Nq, C = query.shape
    L, dh = len(shapes), C // heads
    value = _linear(value_in, w, "value_proj").masked_fill(pad_mask[..., None], 0.0)
    offsets = _linear(query, w, "sampling_offsets").view(B, Nq, heads, L, points, 2)
    weights = _linear(query, w, "attention_weights").view(B, Nq, heads, L * points).softmax(-1)
    weights = weights.view(B, Nq, heads, L, points)
    if ref.shape[-1] == 2:  # offsets in pixels of each level
        size = torch.tensor([[wl, hl] for hl, wl in shapes], dtype=query.dtype)  # (L, 2) = (W, H)
        loc = ref[:, :, None, :, None, :] + offsets / size[:, None, :]
    else:  # offsets relative to half the reference box, divided by P
        loc = ref[:, :, None, :, None, :2] + offsets / points * ref[:, :, None, :, None, 2:] * 0.5
    out = query.new_zeros(B, Nq, heads, dh)
    start = 0
    for lvl, (hl, wl) in enumerate(shapes):
        v = value[:, start : start + hl * wl].reshape(B, hl, wl, heads, dh)
        start += hl * wl
        for h in range(heads):
            sampled = F.grid_sample(
                v[..., h, :].permute(0, 3, 1, 2),  # (B, dh, H, W)
                2 * loc[:, :, h, lvl] - 1,  # (B, Nq, P, 2)
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )  # (B, dh, Nq, P)
            out[:, :, h] += torch.einsum("bdqp,bqp->bqd", sampled, weights[:, :, h, lvl])
    return _linear(out.reshape(B, Nq, C), w, "output_proj")


def official_self_attention(w, x, pos, *, heads):
    """nn.MultiheadAttention as repo:models/deformable_transformer.py:DeformableTransformerDecoderLayer
    calls it: q = k = x + pos, v = x; in_proj packed (q, k, v)."""
    B, N, C = x.shape
    wq, wk, wv = w["self_attn.in_proj_weight"].chunk(3)
    bq, bk, bv = w["self_attn.in_proj_bias"].chunk(3)

    def split(t):  # (B, N, C) -> (B, heads, N, dh)
        return t.view(B, N, heads, C // heads).transpose(1, 2)

    q, k, v = split(F.linear(x + pos, wq, bq)), split(F.linear(x + pos, wk, bk)), split(F.linear(x, wv, bv))
    attn = (q @ k.transpose(-1, -2) / math.sqrt(C // heads)).softmax(-1)
    return _linear((attn @ v).transpose(1, 2).reshape(B, N, C), w, "self_attn.out_proj")


def official_decoder_layer(w, tgt, pos, ref, memory, shapes, pad_mask, *, heads, points):
    """repo:models/deformable_transformer.py:DeformableTransformerDecoderLayer.forward (eval): norm2
    after self-attention, norm1 after cross-attention, norm3 after the FFN."""
    tgt = _layer_norm(tgt + official_self_attention(w, tgt, pos, heads=heads), w, "norm2")
    cross = {k[len("cross_attn.") :]: v for k, v in w.items() if k.startswith("cross_attn.")}
    attn = official_ms_deform_attn(
        cross, tgt + pos, memory, ref, shapes, pad_mask, heads=heads, points=points
    )
    tgt = _layer_norm(tgt + attn, w, "norm1")
    ffn = _linear(F.relu(_linear(tgt, w, "linear1")), w, "linear2")
    return _layer_norm(tgt + ffn, w, "norm3")


def official_encoder_layer(w, src, pos, ref, shapes, pad_mask, *, heads, points):
    """repo:models/deformable_transformer.py:DeformableTransformerEncoderLayer.forward (eval)."""
    attn_w = {k[len("self_attn.") :]: v for k, v in w.items() if k.startswith("self_attn.")}
    attn = official_ms_deform_attn(attn_w, src + pos, src, ref, shapes, pad_mask, heads=heads, points=points)
    src = _layer_norm(src + attn, w, "norm1")
    return _layer_norm(src + _linear(F.relu(_linear(src, w, "linear1")), w, "linear2"), w, "norm2")


def _memory_inputs(gen, C):
    shapes = [(6, 5), (3, 3), (2, 2), (1, 1)]
    Nv = sum(h * w for h, w in shapes)
    memory = torch.randn(2, Nv, C, generator=gen, dtype=torch.float64)
    pad = torch.zeros(2, Nv, dtype=torch.bool)
    pad[1, 3:7] = True  # some padded tokens in the second image
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    return shapes, memory, pad, spatial, start


def test_decoder_layer_computes_official(checkpoints):
    """The swap the names hide: the course's ``norm1`` (after self-attention) is the official ``norm2``."""
    state, _, model = checkpoints["plain"]
    official = "transformer.decoder.layers.1."
    course_layer = copy.deepcopy(model.decoder.layers[1]).double().eval()
    for course_name, official_name in (("norm1", "norm2"), ("norm2", "norm1"), ("norm3", "norm3")):
        for p in ("weight", "bias"):
            got = getattr(getattr(course_layer, course_name), p)
            assert torch.equal(got, state[f"{official}{official_name}.{p}"].double()), course_name
    w = _f64(state, official)
    gen = torch.Generator().manual_seed(7)
    shapes, memory, pad, spatial, start = _memory_inputs(gen, SMALL["hidden"])
    Nq = 5
    tgt = torch.randn(2, Nq, SMALL["hidden"], generator=gen, dtype=torch.float64)
    pos = torch.randn(2, Nq, SMALL["hidden"], generator=gen, dtype=torch.float64)
    points = torch.rand(2, Nq, 4, 2, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    sizes = torch.rand(2, Nq, 4, 2, generator=gen, dtype=torch.float64) * 0.4 + 0.1
    for ref in (points, torch.cat([points, sizes], -1)):  # a point (one-stage), a box (refined)
        expected = official_decoder_layer(w, tgt, pos, ref, memory, shapes, pad, heads=4, points=2)
        with torch.no_grad():
            got, _ = course_layer(
                tgt,
                query_pos=pos,
                reference_points=ref,
                memory=memory,
                memory_mask=pad,
                spatial_shapes=spatial,
                level_start_index=start,
            )
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_encoder_layer_computes_official(checkpoints):
    state, _, model = checkpoints["plain"]
    course_layer = copy.deepcopy(model.encoder.encoder.layers[0]).double().eval()
    w = _f64(state, "transformer.encoder.layers.0.")
    gen = torch.Generator().manual_seed(8)
    shapes, src, pad, spatial, start = _memory_inputs(gen, SMALL["hidden"])
    pos = torch.randn(src.shape, generator=gen, dtype=torch.float64)
    ref = torch.rand(2, src.shape[1], 4, 2, generator=gen, dtype=torch.float64)
    expected = official_encoder_layer(w, src, pos, ref, shapes, pad, heads=4, points=2)
    with torch.no_grad():
        got = course_layer(
            src,
            pos=pos,
            reference_points=ref,
            spatial_shapes=spatial,
            level_start_index=start,
            key_padding_mask=pad,
        )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def _inverse_sigmoid(x, eps=1e-5):  # repo:util/misc.py:inverse_sigmoid
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _mlp(x, w, p):  # repo:models/deformable_detr.py:MLP
    x = F.relu(_linear(x, w, f"{p}.layers.0"))
    return _linear(F.relu(_linear(x, w, f"{p}.layers.1")), w, f"{p}.layers.2")


def _run(model, feature_maps):
    """Everything after the backbone, recording what the decoder, the encoder stack and the two-stage
    parts receive."""
    seen = {}
    hooks = [
        model.decoder.register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(decoder=(args, kwargs)), with_kwargs=True
        ),
        model.encoder.encoder.register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(encoder=kwargs), with_kwargs=True
        ),
    ]
    if model.two_stage:
        hooks.append(model.pos_trans_norm.register_forward_hook(lambda m, i, o: seen.update(pos_trans=o)))
        hooks.append(model.proposer.memory_norm.register_forward_hook(lambda m, i, o: seen.update(enc_mem=o)))
    try:
        with torch.no_grad():
            out = model.forward_features(feature_maps, return_intermediates=True)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.fixture(scope="module")
def runs(checkpoints):
    """variant -> (official state, the course model in float64 after its backbone, its input, outputs,
    what its parts received); the input: random neck outputs of a 64 x 64 image (strides 8 to 64)."""
    gen = torch.Generator().manual_seed(3)
    C = SMALL["hidden"]
    features = [torch.randn(1, C, s, s, generator=gen, dtype=torch.float64) for s in (8, 4, 2, 1)]
    maps = FeatureMaps(
        features=features, masks=[torch.zeros(1, s, s, dtype=torch.bool) for s in (8, 4, 2, 1)]
    )
    out = {}
    for variant, (state, _, model) in checkpoints.items():
        model64 = copy.deepcopy(model, {id(model.backbone): model.backbone})  # the backbone is not copied
        for name, child in model64.named_children():
            if name != "backbone":
                child.double()
        out[variant] = (state, model64.eval(), maps, *_run(model64, maps))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_heads_compute_official(runs, variant):
    """repo:models/deformable_detr.py:DeformableDETR.forward: layer l's logits by ``class_embed[l]``,
    its box ``sigmoid(bbox_embed[l](hs[l]) + inverse_sigmoid(reference))`` (only x, y for a point);
    with refinement (repo:models/deformable_transformer.py:DeformableTransformerDecoder.forward) layer
    l + 1's reference is layer l's box from ``transformer.decoder.bbox_embed[l]``."""
    state, _, _, out, _ = runs[variant]
    box_refine, _ = VARIANTS[variant]
    w = {k: v.double() for k, v in state.items()}
    hs = out["intermediates"]["inter_states"]  # (Ld, B, Nq, C)
    refs = out["intermediates"]["inter_references"]
    layers = [*out["aux_outputs"], {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]
    assert len(layers) == len(refs) == SMALL["dec_layers"]
    for lvl, pred in enumerate(layers):
        torch.testing.assert_close(
            pred["pred_logits"], _linear(hs[lvl], w, f"class_embed.{lvl}"), rtol=0, atol=1e-10
        )
        tmp = _mlp(hs[lvl], w, f"bbox_embed.{lvl}")
        ref = refs[lvl]
        if ref.shape[-1] == 4:
            tmp = tmp + _inverse_sigmoid(ref)
        else:
            tmp = torch.cat([tmp[..., :2] + _inverse_sigmoid(ref), tmp[..., 2:]], -1)
        torch.testing.assert_close(pred["pred_boxes"], tmp.sigmoid(), rtol=0, atol=1e-10)
        if box_refine and lvl + 1 < len(refs):
            dec_tmp = _mlp(hs[lvl], w, f"transformer.decoder.bbox_embed.{lvl}")
            if ref.shape[-1] == 4:
                dec_tmp = dec_tmp + _inverse_sigmoid(ref)
            else:
                dec_tmp = torch.cat([dec_tmp[..., :2] + _inverse_sigmoid(ref), dec_tmp[..., 2:]], -1)
            torch.testing.assert_close(refs[lvl + 1], dec_tmp.sigmoid(), rtol=0, atol=1e-10)
        elif not box_refine:
            assert torch.equal(ref, refs[0])  # no refinement: every layer keeps the initial point
    if variant != "two_stage":
        assert refs[0].shape[-1] == 2


@pytest.mark.parametrize("variant", ["plain", "box_refine"])
def test_query_embed_split_computes_official(runs, variant):
    """repo:models/deformable_transformer.py:DeformableTransformer.forward: ``query_embed`` splits into
    (query position, content) in that order; the reference point is ``sigmoid(reference_points(pos))``."""
    state, _, _, _, seen = runs[variant]
    (query,), kwargs = seen["decoder"]
    C = SMALL["hidden"]
    table = state["query_embed.weight"].double()
    assert torch.equal(kwargs["query_pos"][0], table[:, :C])
    assert torch.equal(query[0], table[:, C:])
    w = {k: v.double() for k, v in state.items()}
    expected = _linear(table[:, :C], w, "transformer.reference_points").sigmoid()
    torch.testing.assert_close(kwargs["reference_points"][0], expected, rtol=0, atol=1e-12)


def test_level_embed_computes_official(runs):
    """repo:models/deformable_transformer.py:DeformableTransformer.forward: level l's positions get
    ``level_embed[l]``."""
    state, model, maps, _, seen = runs["plain"]
    with torch.no_grad():
        saved = model.encoder.level_embed.weight.clone()
        model.encoder.level_embed.weight.zero_()
        try:
            _, seen0 = _run(model, maps)
        finally:
            model.encoder.level_embed.weight.copy_(saved)
    diff = seen["encoder"]["pos"] - seen0["encoder"]["pos"]  # (B, Nv, C)
    spatial, start = seen["encoder"]["spatial_shapes"], seen["encoder"]["level_start_index"]
    level_embed = state["transformer.level_embed"].double()
    for lvl in range(SMALL["levels"]):
        n = int(spatial[lvl].prod())
        part = diff[:, int(start[lvl]) : int(start[lvl]) + n]
        torch.testing.assert_close(part, level_embed[lvl].expand_as(part), rtol=0, atol=1e-12)


def test_two_stage_computes_official(runs):
    """repo:models/deformable_transformer.py:DeformableTransformer.forward (two-stage): the encoder
    heads are ``decoder.class_embed[num_layers]`` / ``decoder.bbox_embed[num_layers]`` (index 6 in the
    published model) on ``enc_output_norm(enc_output(memory))``, the boxes on top of
    ``gen_encoder_output_proposals``; ``pos_trans`` output splits into (query position, content)."""
    state, model, _, out, seen = runs["two_stage"]
    n = SMALL["dec_layers"]  # the extra pair's index
    for kind in ("class_embed", "bbox_embed"):
        course = getattr(model.proposer, kind).state_dict()
        for name, value in course.items():
            assert torch.equal(value, state[f"{kind}.{n}.{name}"].double()), (kind, name)
            assert torch.equal(value, state[f"transformer.decoder.{kind}.{n}.{name}"].double())
            assert not torch.equal(value, state[f"{kind}.0.{name}"].double())
    w = {k: v.double() for k, v in state.items()}
    enc_mem = seen["enc_mem"]  # (B, Nv, C)
    torch.testing.assert_close(
        out["enc_outputs"]["pred_logits"], _linear(enc_mem, w, f"class_embed.{n}"), rtol=0, atol=1e-10
    )
    proposals = []
    spatial = seen["encoder"]["spatial_shapes"]
    for lvl, (hl, wl) in enumerate(spatial.tolist()):  # no padding: the valid size is the level size
        ys, xs = torch.meshgrid(torch.arange(hl), torch.arange(wl), indexing="ij")
        centre = torch.stack([(xs + 0.5) / wl, (ys + 0.5) / hl], -1).reshape(-1, 2).double()
        proposals.append(torch.cat([centre, torch.full_like(centre, 0.05 * 2.0**lvl)], -1))
    boxes = torch.cat(proposals)[None]  # (1, Nv, 4)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
    logit = torch.log(boxes / (1 - boxes)).masked_fill(~valid, float("inf"))
    expected = (_mlp(enc_mem, w, f"bbox_embed.{n}") + logit).sigmoid()
    torch.testing.assert_close(out["enc_outputs"]["pred_boxes"], expected, rtol=0, atol=1e-10)
    (query,), kwargs = seen["decoder"]
    C = SMALL["hidden"]
    assert torch.equal(kwargs["query_pos"], seen["pos_trans"][..., :C])
    assert torch.equal(query, seen["pos_trans"][..., C:])


def test_backbone_and_neck_compute_official(checkpoints):
    """repo:models/backbone.py:Backbone (torchvision ResNet-50, FrozenBatchNorm2d, C3-C5) and
    repo:models/deformable_detr.py:DeformableDETR.forward (``input_proj[l]`` on level l, the extra
    level from C5 through ``input_proj[3]``), in float32."""
    state, _, model = checkpoints["plain"]
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.device("meta"):  # no initialisation: every tensor is assigned below
        net = torchvision.models.resnet50(weights=None, norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    body = {k[len("backbone.0.body.") :]: v for k, v in state.items() if k.startswith("backbone.0.body.")}
    missing, unexpected = net.load_state_dict(body, strict=False, assign=True)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    net.eval()
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        c2 = net.layer1(x)
        c3 = net.layer2(c2)
        c4 = net.layer3(c3)
        c5 = net.layer4(c4)
        got = model.backbone(images).features
    w = state
    inputs = [c3, c4, c5]
    for lvl in range(SMALL["levels"]):
        conv_w, conv_b = w[f"input_proj.{lvl}.0.weight"], w[f"input_proj.{lvl}.0.bias"]
        if lvl < 3:
            y = F.conv2d(inputs[lvl], conv_w, conv_b)
        else:
            y = F.conv2d(c5, conv_w, conv_b, stride=2, padding=1)
        y = F.group_norm(y, 32, w[f"input_proj.{lvl}.1.weight"], w[f"input_proj.{lvl}.1.bias"])
        torch.testing.assert_close(got[lvl], y)


# ---------------------------------------------------------------------------------------------------
# (d) refusals
# ---------------------------------------------------------------------------------------------------


def _save_changed(checkpoints, tmp_path, change):
    """The plain checkpoint with one change. Its ResNet tensors are stored as one value each, expanded
    to their shapes (a few bytes on disk instead of 100 MB): these tests are about keys and shapes."""
    state = {
        k: v.flatten()[:1].clone().expand(v.shape) if k.startswith("backbone.") else v
        for k, v in checkpoints["plain"][0].items()
    }
    change(state)
    out = tmp_path / "changed.pth"
    torch.save({"model": state, "args": official_args("plain", SMALL)}, out)
    return out


def test_refuses_a_missing_key(checkpoints, tmp_path):
    path = _save_changed(checkpoints, tmp_path, lambda s: s.pop("transformer.decoder.layers.1.norm2.weight"))
    with pytest.raises(ConversionError, match="missing") as err:
        from_official(path)
    # the message names the course tensor the official key would have filled
    assert "decoder.layers.1.norm1.weight" in str(err.value)


def test_refuses_an_unknown_key(checkpoints, tmp_path):
    key = "backbone.1.row_embed.weight"  # --position_embedding learned
    path = _save_changed(checkpoints, tmp_path, lambda s: s.update({key: torch.zeros(50, 16)}))
    with pytest.raises(ConversionError, match="unknown") as err:
        from_official(path)
    assert key in str(err.value)


def test_refuses_a_misshaped_tensor(checkpoints, tmp_path):
    key = "transformer.decoder.layers.0.norm3.weight"
    path = _save_changed(checkpoints, tmp_path, lambda s: s.update({key: torch.ones(SMALL["hidden"] + 1)}))
    with pytest.raises(ConversionError, match="mis-shaped") as err:
        from_official(path)
    assert key in str(err.value)


def test_refuses_shared_copies_that_differ(checkpoints, tmp_path):
    key = "class_embed.1.bias"  # without refinement class_embed.0..L-1 are one module

    def change(s):
        s[key] = s[key] + 1.0

    path = _save_changed(checkpoints, tmp_path, change)
    with pytest.raises(ConversionError, match="differ") as err:
        from_official(path)
    assert key in str(err.value)


def test_refuses_another_number_of_classes(checkpoints):
    _, path, _ = checkpoints["plain"]
    with pytest.raises(ConversionError, match="fine-tune") as err:
        from_official(path, num_classes=80)
    assert "91" in str(err.value) and "80" in str(err.value)
