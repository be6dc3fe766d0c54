"""The course's Deformable DETR is transformers' ``DeformableDetrForObjectDetection``, end to end.

For each published variant (plain, box refinement, two-stage) a tiny random transformers model
(timm ResNet-18, C = 64, 2 + 3 layers) has *every* weight and buffer re-drawn -- norm weights and
biases, frozen-BatchNorm statistics, level embeddings, queries, the per-layer box heads -- so that
no zero- or one-initialised path can hide a wrong mapping. It is saved with ``save_pretrained``,
loaded with :func:`detr_edu.convert.from_hf`, and both models run on a padded batch of two images of
different sizes and on one image alone. Final, per-layer and encoder outputs must agree within 1e-5
in float32 and 1e-8 in float64.

transformers is a test-only dependency (pinned in ``pyproject.toml``, extra ``dev``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection  # noqa: E402
from transformers.models.deformable_detr import modeling_deformable_detr as hf_module  # noqa: E402

from detr_edu.convert import ConversionError, from_hf, main  # noqa: E402
from detr_edu.export import load_weights  # noqa: E402

VARIANTS = {"plain": (False, False), "box_refine": (True, False), "two_stage": (True, True)}
TOL = {torch.float32: 1e-5, torch.float64: 1e-8}


def tiny_config(*, box_refine: bool, two_stage: bool) -> DeformableDetrConfig:
    return DeformableDetrConfig(
        backbone="resnet18",
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=20,
        two_stage_num_proposals=20,
        num_labels=5,
        with_box_refine=box_refine,
        two_stage=two_stage,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )


def redraw_everything(model: torch.nn.Module, seed: int) -> None:
    """Every floating parameter and buffer re-drawn at a scale that keeps activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() >= 2 and "level_embed" not in name and "embeddings" not in name:
                t.copy_(noise / math.sqrt(t[0].numel()))  # weights: fan-in scaled
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(1.0 + 0.1 * noise)  # norm scales
            elif t.dim() == 1:
                t.copy_(0.1 * noise)  # biases, running means
            else:
                t.copy_(noise)  # level embeddings, query embeddings


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    box_refine, two_stage = VARIANTS[request.param]
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(tiny_config(box_refine=box_refine, two_stage=two_stage))
    redraw_everything(model, seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model


def padded_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, 96x112 and 72x128, padded to 96x128 (True = padding)."""
    gen = torch.Generator().manual_seed(2)
    images = torch.zeros(2, 3, 96, 128, dtype=dtype)
    pad = torch.ones(2, 96, 128, dtype=torch.bool)
    for b, (h, w) in enumerate([(96, 112), (72, 128)]):
        images[b, :, :h, :w] = torch.randn(3, h, w, generator=gen, dtype=dtype)
        pad[b, :h, :w] = False
    return images, pad


def float64_proposal_pos_embed(self, proposals):
    """transformers' ``get_proposal_pos_embed`` casts to float32 whatever the model's dtype; this is
    the same formula (official ``get_proposal_pos_embed``) in the proposals' own dtype, so that the
    float64 comparison measures semantics, not that cast."""
    feats = self.config.d_model // 2
    dim_t = torch.arange(feats, dtype=proposals.dtype, device=proposals.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / feats)
    pos = proposals.sigmoid()[:, :, :, None] * 2 * math.pi / dim_t  # (B, Nq, 4, F)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)  # (B, Nq, 4F)


def reference_outputs(hf, images, pad):
    """transformers' outputs, with every layer's logits and boxes from its own heads."""
    with torch.no_grad():
        out = hf(pixel_values=images, pixel_mask=(~pad).long(), output_hidden_states=True)
        hidden = out.intermediate_hidden_states  # (B, Ld, Nq, C)
        refs = [out.init_reference_points] + [
            out.intermediate_reference_points[:, i] for i in range(hidden.shape[1] - 1)
        ]
        layers = []
        for i, ref in enumerate(refs):
            delta = hf.bbox_embed[i](hidden[:, i])
            ref = hf_module.inverse_sigmoid(ref)
            if ref.shape[-1] == 4:
                delta = delta + ref
            else:
                delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1)
            layers.append((hf.class_embed[i](hidden[:, i]), delta.sigmoid()))
    return out, layers


def assert_same(course: dict, hf_out, hf_layers, pad: torch.Tensor, *, tol: float, two_stage: bool) -> None:
    close = dict(atol=tol, rtol=tol)
    torch.testing.assert_close(course["pred_logits"], hf_out.logits, **close)
    torch.testing.assert_close(course["pred_boxes"], hf_out.pred_boxes, **close)
    layers = [*course["aux_outputs"], course]
    assert len(layers) == len(hf_layers)
    for ours, (logits, boxes) in zip(layers, hf_layers, strict=True):
        torch.testing.assert_close(ours["pred_logits"], logits, **close)
        torch.testing.assert_close(ours["pred_boxes"], boxes, **close)
    inter = course["intermediates"]
    valid = ~inter["flat"].mask  # (B, Nv): the memory at padded tokens is never read
    torch.testing.assert_close(inter["memory"][valid], hf_out.encoder_last_hidden_state[valid], **close)
    torch.testing.assert_close(
        inter["inter_states"].transpose(0, 1), hf_out.intermediate_hidden_states, **close
    )
    if two_stage:
        enc = course["enc_outputs"]
        torch.testing.assert_close(enc["pred_logits"], hf_out.enc_outputs_class, **close)
        torch.testing.assert_close(enc["pred_boxes"], hf_out.enc_outputs_coord_logits.sigmoid(), **close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_hf_matches_transformers_end_to_end(saved, dtype, monkeypatch):
    variant, folder, hf = saved
    box_refine, two_stage = VARIANTS[variant]
    if dtype == torch.float64:
        monkeypatch.setattr(
            hf_module.DeformableDetrModel, "get_proposal_pos_embed", float64_proposal_pos_embed
        )
    hf = hf.to(dtype).eval()
    ours = from_hf(folder, dtype=dtype)
    assert ours.box_refine == box_refine and ours.two_stage == two_stage
    assert not ours.padding_invariant  # the published semantics
    images, pad = padded_batch(dtype)
    hf_out, hf_layers = reference_outputs(hf, images, pad)
    with torch.no_grad():
        course = ours(images, pad, return_intermediates=True)
    assert_same(course, hf_out, hf_layers, pad, tol=TOL[dtype], two_stage=two_stage)
    # one image alone, unpadded
    alone, alone_pad = images[:1, :, :96, :112], pad[:1, :96, :112]
    hf_out, hf_layers = reference_outputs(hf, alone, alone_pad)
    with torch.no_grad():
        course = ours(alone, alone_pad, return_intermediates=True)
    assert_same(course, hf_out, hf_layers, alone_pad, tol=TOL[dtype], two_stage=two_stage)


def test_both_key_namings_and_both_config_styles_load_the_same_model(saved, tmp_path):
    """``save_pretrained`` (transformers 5) writes the hub's 4.x key names (``backbone.conv_encoder``,
    ``self_attn.out_proj``, ``layers.N.fc1``); the in-memory 5.x names (``backbone.model``,
    ``o_proj``, ``mlp.fc1``, with every tied copy) and a 4.x ``config.json`` (``use_timm_backbone``)
    load into the same model."""
    _, folder, hf = saved
    from safetensors.torch import load_file

    on_disk = load_file(str(folder / "model.safetensors"))
    in_memory = {k: v.detach().clone() for k, v in hf.float().state_dict().items()}
    assert any("conv_encoder" in k for k in on_disk) and not any("conv_encoder" in k for k in in_memory)
    assert any(".mlp.fc1." in k for k in in_memory) and not any(".mlp.fc1." in k for k in on_disk)
    config = json.loads((folder / "config.json").read_text())
    backbone = config.pop("backbone_config")
    config.update(use_timm_backbone=True, backbone=backbone["backbone"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(in_memory, tmp_path / "pytorch_model.bin")
    a, b = from_hf(folder), from_hf(tmp_path)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


def test_every_key_is_accounted_for(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    variant, folder, _ = saved
    config = (folder / "config.json").read_text()
    state = load_file(str(folder / "model.safetensors"))
    cases = {
        "unknown": {**state, "model.mystery.weight": torch.zeros(3)},
        "missing": {k: v for k, v in state.items() if k != "model.level_embed"},
        "misshaped": {**state, "model.level_embed": torch.zeros(4, 65)},
    }
    expected = {
        "unknown": "model.mystery.weight",
        "missing": "encoder.level_embed.weight",
        "misshaped": "model.level_embed",
    }
    for case, broken in cases.items():
        where = tmp_path / case
        where.mkdir()
        (where / "config.json").write_text(config)
        save_file(broken, str(where / "model.safetensors"))
        with pytest.raises(ConversionError, match=expected[case].replace(".", r"\.")):
            from_hf(where)
    with pytest.raises(ConversionError, match="fine-tune"):
        from_hf(folder, num_classes=80)


def test_convert_cli_writes_loadable_weights_and_refuses_a_foreign_file(saved, tmp_path, capsys):
    variant, folder, hf = saved
    out = tmp_path / "converted.pth"
    assert main([str(folder), str(out)]) == 0
    model, info = load_weights(out)
    assert info["category_ids"] == [0, 1, 2, 3, 4]
    images, pad = padded_batch(torch.float32)
    with torch.no_grad():
        a = model(images, pad)["pred_boxes"]
        b = from_hf(folder)(images, pad)["pred_boxes"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    foreign = tmp_path / "foreign.pth"
    foreign.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit) as exit_info:
        main([str(foreign), str(tmp_path / "x.pth")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "foreign.pth" in err and err.startswith("detr_edu.convert: error:")


def test_convert_refuses_course_files_and_odd_inputs(saved, tmp_path):
    """A detr_edu export given to the converter, a state dict with non-tensors, a JSON list as
    config.json: one clear ConversionError each, no traceback from deep inside."""
    from detr_edu.convert import from_official
    from detr_edu.export import SHIPPED_WEIGHTS

    with pytest.raises(ConversionError, match="already a detr_edu file"):
        from_official(SHIPPED_WEIGHTS)
    torch.save({"model": {"class_embed.0.weight": torch.zeros(3, 4), "note": "text"}}, tmp_path / "odd.pth")
    with pytest.raises(ConversionError, match="not tensors: \\['note'\\]"):
        from_official(tmp_path / "odd.pth")
    _, folder, _ = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("[1, 2]")
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match="expected a JSON object"):
        from_hf(bad)
