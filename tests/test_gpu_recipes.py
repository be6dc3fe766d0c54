"""The published GPU recipes, checked on the CPU: pretrained backbone, optimiser groups, AMP, fine-tuning.

References: torchvision's own ResNet-50 in eval mode (frozen BatchNorm loaded from a saved state
dict), the parameter names the official code lists (``sampling_offsets``, ``reference_points``),
float32 losses under bf16 autocast, and the loss of a fine-tuning run falling from its start.
The random resize-crop's boxes are tested in ``tests/test_transforms.py``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from detr_edu import train
from detr_edu.backbone import ResNetBackbone
from detr_edu.build import build_model
from detr_edu.checkpoint import CheckpointError
from detr_edu.coco_export import export_digit_scenes
from detr_edu.config import get_preset
from detr_edu.data import build_coco, coco_paths, collate_detection
from detr_edu.deformable import MultiScaleDeformableAttention
from detr_edu.engine import WarmupStepSchedule, train_step
from detr_edu.export import SHIPPED_WEIGHTS
from detr_edu.finetune import load_for_finetuning
from detr_edu.logs import read_log
from detr_edu.training_presets import get_training_preset
from detr_edu.transforms import make_transforms

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "2", "--num-workers", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_digit_scenes(tmp_path_factory.mktemp("digits"), num_train=8, num_val=2, seed=5)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random torchvision ResNet-50 with random BatchNorm statistics and affine, saved as a state dict."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 0.6)
                m.bias.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(net.state_dict(), path)
    return path


# ---------------------------------------------------------------- the pretrained backbone


def test_frozen_batchnorm_backbone_equals_torchvision_in_eval_mode(resnet50_file: Path) -> None:
    body = ResNetBackbone(depth=50, levels=(2, 3, 4), norm="frozen", weights_path=resnet50_file, freeze_at=1)
    reference = torchvision.models.resnet50()
    reference.load_state_dict(torch.load(resnet50_file, weights_only=True))
    reference.eval()
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = body(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            y = layer(y)
            expected.append(y)
    for got, want in zip(ours, expected[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert isinstance(body.stem[1], torchvision.ops.FrozenBatchNorm2d)
    # the official recipe trains layer2-layer4 only
    trainable = {
        n.split(".")[0] + "." + n.split(".")[1] for n, p in body.named_parameters() if p.requires_grad
    }
    assert trainable == {"stages.1", "stages.2", "stages.3"}


def test_r50_presets_describe_the_published_backbone() -> None:
    for name in ("detr_r50_coco", "deformable_detr_r50_coco", "dino_r50_coco"):
        backbone = get_preset(name).backbone
        assert (backbone.depth, backbone.norm, backbone.freeze_at) == (50, "frozen", 1)
        assert get_training_preset(name).crop


def test_training_an_r50_preset_without_weights_is_refused(digits: Path, tmp_path: Path, capsys) -> None:
    args = [
        "--preset",
        "dino_r50_coco",
        "--coco-path",
        str(digits),
        "--output-dir",
        str(tmp_path / "r"),
        *FAST,
    ]
    assert train.cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "give --backbone-weights PATH" in err
        and "--backbone-from-scratch" in err
    )


def test_backbone_options(resnet50_file: Path) -> None:
    tcfg = get_training_preset("dino_r50_coco")
    base = ["--preset", "dino_r50_coco", "--output-dir", "x"]
    cfg = train.model_config(train.parse_args([*base, "--backbone-weights", str(resnet50_file)]), tcfg, 80)
    assert cfg.backbone.weights_path == str(resnet50_file) and cfg.backbone.norm == "frozen"
    train.check_pretrained_backbone(train.parse_args(base), cfg)  # weights given: accepted
    scratch = train.model_config(train.parse_args([*base, "--backbone-from-scratch"]), tcfg, 80)
    assert (scratch.backbone.norm, scratch.backbone.freeze_at) == ("batch", 0)


# ---------------------------------------------------------------- the optimiser groups


@pytest.mark.parametrize("preset", ["deformable_detr_r50_coco", "dino_r50_coco"])
def test_linear_projections_train_at_a_tenth(preset: str) -> None:
    model = build_model(get_preset(preset, num_classes=80))
    tcfg = get_training_preset(preset)
    groups = train.param_groups(model, tcfg)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("transformer", tcfg.lr),
        ("backbone", tcfg.lr_backbone),
        ("linear_proj", pytest.approx(tcfg.lr * 0.1)),
    ]
    names = {id(p): n for n, p in model.named_parameters()}
    proj = [names[id(p)] for p in groups[2]["params"]]
    assert proj and all("sampling_offsets" in n or "reference_points" in n for n in proj)
    expected = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and ("sampling_offsets" in n or "reference_points" in n)
    ]
    assert sorted(proj) == sorted(expected)
    grouped = sum(p.numel() for g in groups for p in g["params"])
    assert grouped == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any(names[id(p)].startswith("backbone.body.stem") for g in groups for p in g["params"])


def test_the_log_first_line_records_every_group(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--preset", "detr_cpu", "--coco-path", str(digits), "--output-dir", str(out), *FAST]
    assert train.cli([*args, "--image-size", "64", "--max-iters", "1", "--no-final-eval"]) == 0
    first = read_log(out / "log.jsonl")[0]
    assert first["type"] == "config"
    assert [(g["name"], g["lr"]) for g in first["param_groups"]] == [
        ("transformer", 1e-3),
        ("backbone", 2e-4),
    ]
    model = build_model(get_preset("detr_cpu"))
    assert sum(g["params"] for g in first["param_groups"]) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- AMP


def test_a_bf16_autocast_step_is_finite_with_float32_losses(digits: Path) -> None:
    tcfg = get_training_preset("dino_cpu")
    mcfg = get_preset("dino_cpu", num_classes=10)
    torch.manual_seed(0)
    model = build_model(mcfg).train()
    ds = build_coco(
        digits, "train", transforms=make_transforms(train=True, sizes=[64], max_size=None, flip=False)
    )
    batch = collate_detection([ds[i] for i in range(2)])
    criterion = train.build_criterion(mcfg, tcfg)
    captured = {}
    criterion.register_forward_hook(
        lambda mod, inp, out: captured.update(dtypes={v.dtype for v in out.values()})
    )
    groups = train.param_groups(model, tcfg)
    optimizer = torch.optim.AdamW(groups)
    logged = train_step(
        model,
        criterion,
        batch,
        optimizer,
        schedule=WarmupStepSchedule(base_lrs=[g["lr"] for g in groups]),
        step=0,
        progress=0.0,
        amp="bf16",
    )
    assert captured["dtypes"] == {torch.float32}
    assert all(torch.isfinite(torch.tensor(v)) for v in logged.values())


def test_deformable_sampling_runs_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=2, num_points=2)
    shapes = torch.tensor([[8, 8], [4, 4]])
    query, value = torch.randn(1, 5, 32), torch.randn(1, 80, 32)
    ref = torch.rand(1, 5, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, locations, weights = layer(
            query,
            value=value,
            reference_points=ref,
            spatial_shapes=shapes,
            level_start_index=torch.tensor([0, 64]),
            return_sampling=True,
        )
    assert locations.dtype == torch.float32 and weights.dtype == torch.float32
    exact, exact_locations, _ = layer(
        query,
        value=value,
        reference_points=ref,
        spatial_shapes=shapes,
        level_start_index=torch.tensor([0, 64]),
        return_sampling=True,
    )
    # the offsets come from a bf16 Linear; the locations built from them are not rounded again
    assert (locations - exact_locations).abs().max() < 2e-2
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- fine-tuning


def _subset_of_classes(root: Path, keep: set[int]) -> None:
    for split in ("train", "val"):
        ann = coco_paths(root, split)[1]
        data = json.loads(ann.read_text())
        data["categories"] = [c for c in data["categories"] if c["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
        ann.write_text(json.dumps(data))


@pytest.mark.slow
def test_finetuning_the_shipped_model_on_five_classes(tmp_path: Path, capsys) -> None:
    root = export_digit_scenes(tmp_path / "digits", num_train=16, num_val=2, seed=3)
    _subset_of_classes(root, keep={1, 2, 3, 4, 5})  # digits 0-4 only: 5 classes
    out = tmp_path / "run"
    args = [
        "--preset",
        "dino_cpu",
        "--coco-path",
        str(root),
        "--output-dir",
        str(out),
        "--finetune-from",
        str(SHIPPED_WEIGHTS),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--no-progress",
        "--log-every",
        "1",
        "--max-iters",
        "24",
        "--warmup-iters",
        "0",
        "--no-final-eval",
        "--lr",
        "2e-4",
    ]
    assert train.cli(args) == 0
    said = capsys.readouterr().out
    assert "re-initialised 9 class tensors for 5 classes instead of 10" in said
    losses = [r["loss_class"] for r in read_log(out / "log.jsonl") if r["type"] == "train"]
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < 0.7 * sum(losses[:3]) / 3, losses


def test_finetuning_keeps_every_non_class_tensor_and_refuses_other_architectures(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("dino_cpu", num_classes=5))
    note = load_for_finetuning(model, SHIPPED_WEIGHTS)
    assert "for 5 classes instead of 10" in note
    shipped = torch.load(SHIPPED_WEIGHTS, weights_only=True)["model"]
    for name, tensor in model.state_dict().items():
        if "class_embed" not in name and "label_embed" not in name:
            torch.testing.assert_close(tensor, shipped[name].to(tensor.dtype))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_for_finetuning(build_model(get_preset("deformable_detr_cpu")), SHIPPED_WEIGHTS)


def test_finetuning_cannot_be_combined_with_resume_or_eval(digits: Path, tmp_path: Path, capsys) -> None:
    common = ["--preset", "dino_cpu", "--coco-path", str(digits), "--output-dir", str(tmp_path / "r"), *FAST]
    for extra in (["--resume", "auto"], ["--eval", "--resume", str(SHIPPED_WEIGHTS)]):
        assert train.cli([*common, "--finetune-from", str(SHIPPED_WEIGHTS), *extra]) == 2
        assert "cannot be combined with --resume or --eval" in capsys.readouterr().err


def test_resuming_on_other_classes_points_to_finetuning(digits: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    common = ["--preset", "detr_cpu", "--output-dir", str(out), "--image-size", "64", *FAST]
    assert train.cli([*common, "--coco-path", str(digits), "--max-iters", "1", "--no-final-eval"]) == 0
    other = export_digit_scenes(tmp_path / "other", num_train=4, num_val=2, seed=1)
    _subset_of_classes(other, keep={1, 2, 3})
    assert train.cli([*common, "--coco-path", str(other), "--resume", "auto"]) == 2
    assert "start a new run with --finetune-from" in capsys.readouterr().err


# ---------------------------------------------------------------- the throughput benchmark


@pytest.mark.slow
def test_gpu_throughput_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--smoke", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["preset"] for r in rows] == ["detr_r50_coco", "deformable_detr_r50_coco", "dino_r50_coco"]
    assert all(r["images_per_s"] > 0 and torch.isfinite(torch.tensor(r["loss_last"])) for r in rows)
    assert out.read_text().count("| `") == 3


def test_finetuning_refuses_split_shared_heads_and_old_exports(tmp_path: Path) -> None:
    """The earlier per-layer DINO heads would load silently into the shared head (last name wins):
    refused, as is an export of the earlier format."""
    shipped = torch.load(SHIPPED_WEIGHTS, weights_only=True)
    split = dict(shipped, model=dict(shipped["model"]))
    key = "heads.bbox_embed.1.layers.0.weight"
    split["model"][key] = split["model"][key] + 1.0  # layer 1 gets its own box head
    torch.save(split, tmp_path / "split.pth")
    with pytest.raises(
        CheckpointError, match=r"different values for heads\.bbox_embed\.0\.layers\.0\.weight"
    ):
        load_for_finetuning(build_model(get_preset("dino_cpu", num_classes=5)), tmp_path / "split.pth")
    torch.save(dict(shipped, format="detr_edu-weights-1"), tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="made by an earlier version"):
        load_for_finetuning(build_model(get_preset("dino_cpu", num_classes=5)), tmp_path / "old.pth")
