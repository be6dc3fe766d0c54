"""Tests for detr_edu.criterion: each term against an independent computation.

Most tests use a small brute-force matcher defined here (L1 cost, scipy's assignment), so that a
failure points at the criterion and not at chapter 05's matcher; one test runs the real one.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import sigmoid_focal_loss

from detr_edu import box_ops
from detr_edu.criterion import LOSS_NAMES, SetCriterion, num_boxes_for_loss, weighted_total
from detr_edu.errors import NonFiniteLossError

K = 5  # classes
WEIGHTS = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


class L1Matcher:
    """Brute-force reference matcher: minimum total L1 box distance, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, outputs, targets, *, validate: bool = True):
        self.calls += 1
        indices = []
        for b, t in enumerate(targets):
            cost = torch.cdist(outputs["pred_boxes"][b].double(), t["boxes"].double(), p=1)  # (Nq, G)
            q, g = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(g, dtype=torch.int64)))
        return indices


class FixedMatcher:
    """Returns the indices it was given: lets a test choose the matching."""

    def __init__(self, indices) -> None:
        self.indices = indices

    def __call__(self, outputs, targets, *, validate: bool = True):
        return self.indices


def random_boxes(n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    centre = 0.25 + 0.5 * torch.rand(n, 2, generator=gen, dtype=dtype)
    size = 0.05 + 0.3 * torch.rand(n, 2, generator=gen, dtype=dtype)
    return torch.cat([centre, size], dim=1)  # (n, 4) cxcywh


def make_batch(sizes, num_queries=6, width=K, gen=None, dtype=torch.float32, num_aux=0, enc=False):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    B = len(sizes)
    targets = [
        {
            "labels": torch.randint(0, K, (g,), generator=gen, dtype=torch.int64),
            "boxes": random_boxes(g, gen, dtype),
        }
        for g in sizes
    ]

    def layer():
        return {
            "pred_logits": torch.randn(B, num_queries, width, generator=gen, dtype=dtype),
            "pred_boxes": random_boxes(B * num_queries, gen, dtype).view(B, num_queries, 4),
        }

    outputs = layer()
    if num_aux:
        outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
    if enc:
        outputs["enc_outputs"] = layer()
    return outputs, targets


def criterion(matcher=None, **kw) -> SetCriterion:
    return SetCriterion(num_classes=K, matcher=matcher or L1Matcher(), weight_dict=WEIGHTS, **kw)


# ------------------------------------------------------------------------------------------------
# Each term against a hand computation
# ------------------------------------------------------------------------------------------------
def test_perfect_boxes_give_zero_box_losses():
    outputs, targets = make_batch([3, 2], num_queries=5)
    for b, t in enumerate(targets):  # put the ground truth into the first queries
        outputs["pred_boxes"][b, : len(t["boxes"])] = t["boxes"]
    losses = criterion()(outputs, targets)
    assert losses["loss_bbox"].item() == 0.0
    assert losses["loss_giou"].abs().item() < 1e-6


def test_focal_equals_torchvision_and_the_formula():
    outputs, targets = make_batch([3, 1], num_queries=7, dtype=torch.float64)
    indices = L1Matcher()(outputs, targets)
    loss = criterion(FixedMatcher(indices))(outputs, targets)["loss_class"]

    logits = outputs["pred_logits"]
    one_hot = torch.zeros_like(logits)  # (B, Nq, K): unmatched rows stay all-zero
    for b, (q, g) in enumerate(indices):
        for qi, gi in zip(q.tolist(), g.tolist(), strict=True):
            one_hot[b, qi, targets[b]["labels"][gi]] = 1.0
    num_boxes = 4.0
    expected = sigmoid_focal_loss(logits, one_hot, alpha=0.25, gamma=2.0, reduction="sum") / num_boxes
    torch.testing.assert_close(loss, expected)

    # and the formula written out: -alpha_t (1 - p_t)^gamma log p_t
    p = logits.sigmoid()
    p_t = torch.where(one_hot == 1, p, 1 - p)
    alpha_t = torch.where(one_hot == 1, 0.25, 0.75)
    torch.testing.assert_close(loss, (-alpha_t * (1 - p_t) ** 2 * p_t.log()).sum() / num_boxes)


def test_ce_with_no_object_weight_equals_a_manual_loop():
    eos_coef = 0.1
    outputs, targets = make_batch([2, 3], num_queries=6, width=K + 1, dtype=torch.float64)
    indices = L1Matcher()(outputs, targets)
    loss = criterion(FixedMatcher(indices), class_loss="ce", eos_coef=eos_coef)(outputs, targets)[
        "loss_class"
    ]

    numerator, denominator = 0.0, 0.0
    for b in range(2):
        matched = dict(zip(indices[b][0].tolist(), indices[b][1].tolist(), strict=True))
        for q in range(6):
            cls = int(targets[b]["labels"][matched[q]]) if q in matched else K  # K = no object
            w = 1.0 if cls < K else eos_coef
            log_probs = torch.log_softmax(outputs["pred_logits"][b, q], dim=0)
            numerator += -w * log_probs[cls].item()
            denominator += w
    assert math.isclose(loss.item(), numerator / denominator, rel_tol=1e-10)


def test_box_losses_equal_l1_and_giou_diagonal():
    outputs, targets = make_batch([4, 2], dtype=torch.float64)
    indices = L1Matcher()(outputs, targets)
    losses = criterion(FixedMatcher(indices))(outputs, targets)
    src = torch.cat([outputs["pred_boxes"][b, q] for b, (q, _) in enumerate(indices)])
    tgt = torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, indices, strict=True)])
    torch.testing.assert_close(losses["loss_bbox"], (src - tgt).abs().sum() / 6)
    giou = box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src), box_ops.box_cxcywh_to_xyxy(tgt))
    torch.testing.assert_close(losses["loss_giou"], (1 - giou.diagonal()).sum() / 6)


def test_gradcheck_float64():
    outputs, targets = make_batch([2, 1], num_queries=4, dtype=torch.float64)
    crit = criterion(FixedMatcher(L1Matcher()(outputs, targets)))

    def total(logits, boxes):
        return crit.total(crit({"pred_logits": logits, "pred_boxes": boxes}, targets))

    logits = outputs["pred_logits"].requires_grad_()
    boxes = outputs["pred_boxes"].requires_grad_()
    assert torch.autograd.gradcheck(total, (logits, boxes))


# ------------------------------------------------------------------------------------------------
# Suffixes, aux and encoder outputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("class_loss, width", [("focal", K), ("ce", K + 1)])
def test_keys_and_suffixes_and_fresh_matching(class_loss, width):
    outputs, targets = make_batch([2, 3], width=width, num_aux=3, enc=True)
    matcher = L1Matcher()
    losses = criterion(matcher, class_loss=class_loss)(outputs, targets)
    expected = {name + suffix for name in LOSS_NAMES for suffix in ("", "_0", "_1", "_2", "_enc")}
    assert set(losses) == expected
    assert matcher.calls == 5  # last layer, three aux layers, encoder: each matched anew
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_aux_terms_equal_the_same_layer_computed_as_last():
    outputs, targets = make_batch([2, 3], num_aux=2)
    crit = criterion()
    losses = crit(outputs, targets)
    for i, aux in enumerate(outputs["aux_outputs"]):
        alone = crit(aux, targets)
        for name in LOSS_NAMES:
            torch.testing.assert_close(losses[f"{name}_{i}"], alone[name])


@pytest.mark.parametrize("class_loss, width", [("focal", K), ("focal", 1), ("ce", K + 1), ("ce", 2)])
def test_binary_encoder_classification_leaves_targets_untouched(class_loss, width):
    outputs, targets = make_batch([3, 2], width=K + (class_loss == "ce"), enc=True)
    outputs["enc_outputs"]["pred_logits"] = outputs["enc_outputs"]["pred_logits"][..., :width]
    before = copy.deepcopy(targets)
    label_tensors = [t["labels"] for t in targets]
    crit = criterion(class_loss=class_loss, binary_enc_cls=True)
    losses = crit(outputs, targets)
    for t, b, labels in zip(targets, before, label_tensors, strict=True):
        assert t.keys() == b.keys() and t["labels"] is labels
        torch.testing.assert_close(t["labels"], b["labels"])
        torch.testing.assert_close(t["boxes"], b["boxes"])
    # the _enc terms are the ordinary terms on all-zero labels
    zeros = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    plain = criterion(class_loss=class_loss)
    num_boxes = num_boxes_for_loss(zeros, torch.device("cpu"))
    expected = plain.matched_losses(outputs["enc_outputs"], zeros, num_boxes, suffix="_enc")
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value)


# ------------------------------------------------------------------------------------------------
# Normalisation: empty images, batches, workers
# ------------------------------------------------------------------------------------------------
def test_images_without_targets():
    outputs, targets = make_batch([0, 2], num_aux=1, enc=True)
    losses = criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())

    outputs, targets = make_batch([0, 0])
    losses = criterion()(outputs, targets)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    # every query is background; num_boxes clamps to 1
    expected = sigmoid_focal_loss(
        outputs["pred_logits"], torch.zeros_like(outputs["pred_logits"]), reduction="sum"
    )
    torch.testing.assert_close(losses["loss_class"], expected)


@pytest.mark.parametrize("class_loss", ["focal", "ce"])
def test_batch_of_two_equals_images_separately(class_loss):
    width = K + (class_loss == "ce")
    outputs, targets = make_batch([3, 1], width=width, dtype=torch.float64)
    crit = criterion(class_loss=class_loss)
    both = crit(outputs, targets)
    single = [crit({k: v[b : b + 1] for k, v in outputs.items()}, targets[b : b + 1]) for b in range(2)]
    counts = [3.0, 1.0]
    # per-box normalised terms: the batch value is the box-count-weighted mean of the images'
    names = ["loss_bbox", "loss_giou"] + (["loss_class"] if class_loss == "focal" else [])
    for name in names:
        expected = sum(n * s[name] for n, s in zip(counts, single, strict=True)) / sum(counts)
        torch.testing.assert_close(both[name], expected)
    if class_loss == "ce":  # a weighted mean over queries: images weigh by their summed class weights
        wsum = [n * 1.0 + (6 - n) * crit.eos_coef for n in counts]
        expected = sum(w * s["loss_class"] for w, s in zip(wsum, single, strict=True)) / sum(wsum)
        torch.testing.assert_close(both["loss_class"], expected)


def test_num_boxes_single_process_and_clamp():
    targets = [{"labels": torch.zeros(3, dtype=torch.int64)}, {"labels": torch.zeros(2, dtype=torch.int64)}]
    assert num_boxes_for_loss(targets, torch.device("cpu")) == 5.0
    assert num_boxes_for_loss([{"labels": torch.zeros(0, dtype=torch.int64)}], torch.device("cpu")) == 1.0


def _distributed_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        counts = [3, 6]  # the two workers see different batches
        targets = [{"labels": torch.zeros(counts[rank], dtype=torch.int64)}]
        value = num_boxes_for_loss(targets, torch.device("cpu"))
        with open(f"{result_file}.{rank}", "w") as f:
            f.write(str(value))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_num_boxes_is_averaged_over_workers():
    with tempfile.TemporaryDirectory() as folder:
        init_file, result_file = os.path.join(folder, "init"), os.path.join(folder, "result")
        torch.multiprocessing.spawn(_distributed_worker, args=(2, init_file, result_file), nprocs=2)
        values = [float(open(f"{result_file}.{rank}").read()) for rank in range(2)]
    assert values == [4.5, 4.5]


# ------------------------------------------------------------------------------------------------
# The weighted total
# ------------------------------------------------------------------------------------------------
def test_weighted_total_uses_longest_prefix():
    losses = {
        "loss_class": torch.tensor(1.0),
        "loss_bbox_0": torch.tensor(2.0),
        "loss_giou_enc": torch.tensor(3.0),
    }
    weights = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_giou_enc": 0.5}
    assert weighted_total(losses, weights).item() == 2.0 * 1 + 5.0 * 2 + 0.5 * 3
    with pytest.raises(ValueError, match="no weight for losses \\['loss_mask'\\]"):
        weighted_total({"loss_mask": torch.tensor(1.0)}, weights)
    outputs, targets = make_batch([2, 2], num_aux=1)
    crit = criterion()
    losses = crit(outputs, targets)
    manual = sum(WEIGHTS[k.rsplit("_", 1)[0] if k.endswith("_0") else k] * v for k, v in losses.items())
    torch.testing.assert_close(crit.total(losses), manual)


# ------------------------------------------------------------------------------------------------
# Real matcher
# ------------------------------------------------------------------------------------------------
def test_with_hungarian_matcher_perfect_predictions():
    from detr_edu.matcher import HungarianMatcher

    outputs, targets = make_batch([3, 2], num_queries=6, num_aux=1, enc=True)
    for layer in (outputs, outputs["aux_outputs"][0], outputs["enc_outputs"]):
        for b, t in enumerate(targets):  # ground truth in shuffled query slots
            slots = torch.randperm(6, generator=torch.Generator().manual_seed(b))[: len(t["boxes"])]
            layer["pred_boxes"][b, slots] = t["boxes"]
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, class_cost_type="focal")
    losses = criterion(matcher)(outputs, targets)
    for suffix in ("", "_0", "_enc"):
        assert losses[f"loss_bbox{suffix}"].item() < 1e-6
        assert losses[f"loss_giou{suffix}"].item() < 1e-6


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------
def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="class_loss must be"):
        criterion(class_loss="bce")
    with pytest.raises(ValueError, match="no weight for \\['loss_giou'\\]"):
        SetCriterion(num_classes=K, matcher=L1Matcher(), weight_dict={"loss_class": 1, "loss_bbox": 1})
    with pytest.raises(ValueError, match="finite and >= 0"):
        SetCriterion(num_classes=K, matcher=L1Matcher(), weight_dict={**WEIGHTS, "loss_bbox": -1.0})
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        SetCriterion(num_classes=0, matcher=L1Matcher(), weight_dict=WEIGHTS)


def test_bad_outputs():
    crit = criterion()
    outputs, targets = make_batch([1, 2], num_aux=1, enc=True)
    with pytest.raises(ValueError, match="outputs is missing \\['pred_logits'\\]"):
        crit({"pred_boxes": outputs["pred_boxes"]}, targets)
    broken = {**outputs, "aux_outputs": [{"pred_logits": outputs["pred_logits"]}]}
    with pytest.raises(ValueError, match="aux_outputs'\\]\\[0\\] is missing \\['pred_boxes'\\]"):
        crit(broken, targets)
    with pytest.raises(ValueError, match="enc_outputs'\\] is missing"):
        crit({**outputs, "enc_outputs": {}}, targets)
    with pytest.raises(ValueError, match="pred_logits has 6 columns"):
        crit({**outputs, "pred_logits": torch.randn(2, 6, K + 1)}, targets)
    with pytest.raises(ValueError, match="batch of 2 but there are 1 targets"):
        crit(outputs, targets[:1])
    with pytest.raises(ValueError, match="need pred_logits \\(B, Nq, K\\)"):
        crit({**outputs, "pred_boxes": outputs["pred_boxes"][:, :3]}, targets)
    with pytest.raises(ValueError, match="targets is empty"):
        crit(outputs, [])


def test_bad_targets():
    crit = criterion()
    outputs, targets = make_batch([1, 2])
    with pytest.raises(ValueError, match="labels must lie in \\[0, num_classes=5\\)|must lie in"):
        crit(outputs, [targets[0], {**targets[1], "labels": torch.tensor([1, K])}])
    with pytest.raises(ValueError, match="must lie in"):
        crit(outputs, [targets[0], {**targets[1], "labels": torch.tensor([-1, 0])}])
    with pytest.raises(ValueError, match="targets\\[1\\] is missing \\['boxes'\\]"):
        crit(outputs, [targets[0], {"labels": targets[1]["labels"]}])
    with pytest.raises(ValueError, match="must be int64"):
        crit(outputs, [targets[0], {**targets[1], "labels": targets[1]["labels"].float()}])
    with pytest.raises(ValueError, match="must have shape \\(G, 4\\) = \\(2, 4\\)"):
        crit(outputs, [targets[0], {**targets[1], "boxes": targets[1]["boxes"][:1]}])


def test_non_finite_predictions_and_losses():
    crit = criterion()
    outputs, targets = make_batch([1, 2], num_aux=1)
    logits = outputs["pred_logits"].clone()
    logits[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="outputs: pred_logits contains NaN or inf"):
        crit({**outputs, "pred_logits": logits}, targets)
    aux = {
        "pred_logits": outputs["pred_logits"],
        "pred_boxes": torch.full_like(outputs["pred_boxes"], math.inf),
    }
    with pytest.raises(NonFiniteLossError, match="aux_outputs'\\]\\[0\\]: pred_boxes contains NaN or inf"):
        crit({**outputs, "aux_outputs": [aux]}, targets)
    # finite but huge logits: every background term is ~0.75 * 3e38 and their sum overflows float32
    huge = torch.full_like(outputs["pred_logits"], 3e38)
    with pytest.raises(NonFiniteLossError, match="non-finite losses \\['loss_class'\\]"):
        crit({"pred_logits": huge, "pred_boxes": outputs["pred_boxes"]}, targets)


def test_bad_matcher_output():
    outputs, targets = make_batch([1, 2])
    bad = [(torch.tensor([0]), torch.tensor([0])), (torch.tensor([0, 99]), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="out of range"):
        criterion(FixedMatcher(bad))(outputs, targets)
    with pytest.raises(ValueError, match="returned 1 index pairs for 2 images"):
        criterion(FixedMatcher(bad[:1]))(outputs, targets)


def test_half_precision_inputs_give_float32_losses():
    outputs, targets = make_batch([2, 1])
    matcher = FixedMatcher(L1Matcher()(outputs, targets))  # the same pairs for both precisions
    half = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    losses = criterion(matcher)(half, targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    full = criterion(matcher)(outputs, targets)
    for key in LOSS_NAMES:
        torch.testing.assert_close(losses[key], full[key], atol=0.02, rtol=0.02)


# ------------------------------------------------------------------------------------------------
# Chapter 06 plots (detr_edu.viz.losses): they draw what they are given
# ------------------------------------------------------------------------------------------------
def test_viz_loss_terms_and_curves():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detr_edu.viz.losses import draw_matches, plot_background_share, plot_curves, plot_loss_terms

    outputs, targets = make_batch([2, 1], num_aux=2, enc=True)
    losses = criterion()(outputs, targets)
    fig = plot_loss_terms(losses, weight_dict=WEIGHTS)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["enc", "layer 0", "layer 1", "last"]
    heights = sorted(round(p.get_height(), 5) for p in ax.patches)
    expected = sorted(
        round(float(v) * WEIGHTS[k.split("_")[0] + "_" + k.split("_")[1]], 5) for k, v in losses.items()
    )
    assert heights == expected
    with pytest.raises(ValueError, match="unknown loss key"):
        plot_loss_terms({"loss_mask": 1.0})

    x = torch.linspace(0, 1, 5)
    fig = plot_curves(x, {"a": x, "b": 2 * x}, xlabel="x", ylabel="y", title="t", shade=x > 0.5)
    assert len(fig.axes[0].lines) == 2
    with pytest.raises(ValueError, match="curve 'a' has shape"):
        plot_curves(x, {"a": x[:3]}, xlabel="x", ylabel="y", title="t")
    fig = plot_background_share({"ce": 0.9, "focal": 0.6}, title="t")
    assert [round(p.get_width(), 3) for p in fig.axes[0].patches] == [0.9, 0.6, 0.1, 0.4]
    with pytest.raises(ValueError, match="shares must lie in"):
        plot_background_share({"x": 1.5}, title="t")

    image = torch.rand(3, 32, 32)
    indices = L1Matcher()(outputs, targets)
    fig = draw_matches(image, targets[0], outputs["pred_boxes"][0], indices[0])
    ax = fig.axes[0]
    assert len(ax.patches) == 2 + 2  # two ground-truth boxes and their two matched predictions
    assert len(ax.lines) == 2  # one line per matched pair
    with pytest.raises(ValueError, match="image must be"):
        draw_matches(image[0], targets[0], outputs["pred_boxes"][0])
    plt.close("all")
