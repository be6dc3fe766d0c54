"""Tests for detr_edu.matcher: brute force over all assignments, torchvision references, bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision import ops

from detr_edu.matcher import HungarianMatcher, ce_class_cost, focal_class_cost
from detr_edu.targets import check_targets


def random_problem(
    gen: torch.Generator,
    batch: int,
    num_queries: int,
    sizes: list[int],
    num_classes: int = 4,
    no_object: bool = False,
):
    """Random logits, boxes inside the image, and targets with the given numbers of boxes.

    With ``no_object`` the last logit column is DETR's "no object" class, never a target label.
    """
    centres = 0.2 + 0.6 * torch.rand(batch, num_queries, 2, generator=gen)  # (B, Nq, 2)
    extents = 0.05 + 0.3 * torch.rand(batch, num_queries, 2, generator=gen)  # (B, Nq, 2)
    outputs = {
        "pred_logits": 2.0 * torch.randn(batch, num_queries, num_classes, generator=gen),
        "pred_boxes": torch.cat([centres, extents], -1),
    }
    targets = []
    for g in sizes:
        boxes = torch.cat(
            [0.2 + 0.6 * torch.rand(g, 2, generator=gen), 0.05 + 0.3 * torch.rand(g, 2, generator=gen)], -1
        )
        targets.append(
            {"labels": torch.randint(0, num_classes - no_object, (g,), generator=gen), "boxes": boxes}
        )
    return outputs, targets


def reference_pair_cost(logit_row, box, label, tgt_box, matcher: HungarianMatcher) -> float:
    """The matching cost of one (query, target) pair, from torchvision's own functions."""
    if matcher.class_cost_type == "focal":
        x = logit_row[label].reshape(1).double()
        pos = ops.sigmoid_focal_loss(
            x, torch.ones(1, dtype=x.dtype), alpha=matcher.alpha, gamma=matcher.gamma
        )
        # torchvision weights the target-0 term by (1 - alpha): exactly the matcher's "neg" term.
        neg = ops.sigmoid_focal_loss(
            x, torch.zeros(1, dtype=x.dtype), alpha=matcher.alpha, gamma=matcher.gamma
        )
        cls = float(pos - neg)
    else:
        cls = -float(logit_row.double().softmax(-1)[label])
    l1 = float((box.double() - tgt_box.double()).abs().sum())
    a = ops.box_convert(box.double()[None], "cxcywh", "xyxy")
    b = ops.box_convert(tgt_box.double()[None], "cxcywh", "xyxy")
    giou = float(ops.generalized_box_iou(a, b)[0, 0])
    return matcher.cost_class * cls + matcher.cost_bbox * l1 - matcher.cost_giou * giou


def brute_force(logits, boxes, labels, tgt_boxes, matcher) -> tuple[float, tuple[int, ...]]:
    """Minimum total cost over every injective map targets -> queries, and the map."""
    num_queries, num_targets = logits.shape[0], labels.shape[0]
    pair = [
        [
            reference_pair_cost(logits[i], boxes[i], int(labels[j]), tgt_boxes[j], matcher)
            for j in range(num_targets)
        ]
        for i in range(num_queries)
    ]
    best = (float("inf"), ())
    for queries in itertools.permutations(range(num_queries), num_targets):
        total = sum(pair[q][j] for j, q in enumerate(queries))
        best = min(best, (total, queries))
    return best


def total_cost(logits, boxes, labels, tgt_boxes, matcher, query_idx, target_idx) -> float:
    return sum(
        reference_pair_cost(logits[q], boxes[q], int(labels[t]), tgt_boxes[t], matcher)
        for q, t in zip(query_idx.tolist(), target_idx.tolist(), strict=True)
    )


@pytest.mark.parametrize("class_cost_type", ["focal", "ce"])
@pytest.mark.parametrize("num_queries", [1, 2, 3, 4, 5, 6])
def test_equals_brute_force(class_cost_type, num_queries):
    gen = torch.Generator().manual_seed(100 + num_queries)
    if class_cost_type == "focal":
        matcher = HungarianMatcher()
    else:
        matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, class_cost_type="ce")
    for num_targets in range(0, num_queries + 1):
        outputs, targets = random_problem(
            gen, 1, num_queries, [num_targets], num_classes=5, no_object=class_cost_type == "ce"
        )
        ((query_idx, target_idx),) = matcher(outputs, targets)
        logits, boxes = outputs["pred_logits"][0], outputs["pred_boxes"][0]
        labels, tgt_boxes = targets[0]["labels"], targets[0]["boxes"]
        best_total, best_queries = brute_force(logits, boxes, labels, tgt_boxes, matcher)
        got = total_cost(logits, boxes, labels, tgt_boxes, matcher, query_idx, target_idx)
        assert got == pytest.approx(best_total, abs=1e-5)
        # Random costs have a unique optimum: the map itself must agree too.
        assert dict(zip(target_idx.tolist(), query_idx.tolist(), strict=True)) == dict(
            enumerate(best_queries)
        )


def real_loss(logits, boxes, labels, tgt_boxes, matcher, queries) -> float:
    """The training loss of one image when target j is matched to query queries[j]: sigmoid focal
    loss over all queries and classes with one-hot targets, plus the matched L1 and 1 - GIoU."""
    onehot = torch.zeros_like(logits)
    onehot[list(queries), labels] = 1.0
    loss = (
        matcher.cost_class
        * ops.sigmoid_focal_loss(logits, onehot, alpha=matcher.alpha, gamma=matcher.gamma).sum()
    )
    for j, q in enumerate(queries):
        a = ops.box_convert(boxes[q][None], "cxcywh", "xyxy")
        b = ops.box_convert(tgt_boxes[j][None], "cxcywh", "xyxy")
        loss += matcher.cost_bbox * (boxes[q] - tgt_boxes[j]).abs().sum()
        loss += matcher.cost_giou * (1 - ops.generalized_box_iou(a, b)[0, 0])
    return float(loss)


def test_minimises_the_real_focal_plus_box_loss():
    """Q6: Hungarian on the focal cost minimises the real loss (sum of sigmoid focal loss over all
    queries and classes with one-hot targets, plus matched L1 and 1 - GIoU), checked by brute force."""
    gen = torch.Generator().manual_seed(7)
    matcher = HungarianMatcher()
    for _ in range(20):
        num_queries, num_targets, num_classes = 5, 3, 4
        outputs, targets = random_problem(gen, 1, num_queries, [num_targets], num_classes)
        logits, boxes = outputs["pred_logits"][0].double(), outputs["pred_boxes"][0].double()
        labels, tgt_boxes = targets[0]["labels"], targets[0]["boxes"].double()

        losses = {
            qs: real_loss(logits, boxes, labels, tgt_boxes, matcher, qs)
            for qs in itertools.permutations(range(num_queries), num_targets)
        }
        ((query_idx, target_idx),) = matcher(outputs, targets)
        chosen = tuple(
            dict(zip(target_idx.tolist(), query_idx.tolist(), strict=True))[j] for j in range(num_targets)
        )
        assert losses[chosen] == pytest.approx(min(losses.values()), abs=1e-9)


def test_focal_class_cost_matches_torchvision_sigmoid_focal_loss():
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(7, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 4])
    got = focal_class_cost(logits, labels, alpha=0.3, gamma=1.5)
    x = logits[:, labels]
    want = ops.sigmoid_focal_loss(x, torch.ones_like(x), alpha=0.3, gamma=1.5) - ops.sigmoid_focal_loss(
        x, torch.zeros_like(x), alpha=0.3, gamma=1.5
    )
    torch.testing.assert_close(got, want)


def test_ce_class_cost_is_minus_softmax_probability():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0])
    torch.testing.assert_close(ce_class_cost(logits, labels), -torch.softmax(logits, -1)[:, [2, 0]])


def test_batched_equals_per_image():
    gen = torch.Generator().manual_seed(3)
    sizes = [3, 0, 7, 1, 10]
    outputs, targets = random_problem(gen, len(sizes), 12, sizes, num_classes=6)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b in range(len(sizes)):
        single = matcher({k: v[b : b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        torch.testing.assert_close(batched[b][0], single[0])
        torch.testing.assert_close(batched[b][1], single[1])


def batch_wide_assignment(
    matcher: HungarianMatcher, outputs, targets
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DETR's way, the matcher's previous production path: the batch-wide matrix, image b's block cut out."""
    sizes = [len(t["labels"]) for t in targets]
    cost = matcher.cost_matrix(outputs, targets)  # (B, Nq, G_total)
    indices = []
    for b, block in enumerate(cost.split(sizes, dim=-1)):  # block: (B, Nq, G_b)
        q, t = linear_sum_assignment(block[b].numpy())
        indices.append((torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)))
    return indices


def with_ties(gen: torch.Generator, outputs, targets, kind: str):
    """Make exact ties: duplicated queries, duplicated targets, or everything on a coarse grid."""
    logits, boxes = outputs["pred_logits"].clone(), outputs["pred_boxes"].clone()
    Nq = logits.shape[1]
    if kind == "duplicate queries":  # the second half of the queries copies the first half
        half = Nq // 2
        logits[:, half : 2 * half], boxes[:, half : 2 * half] = logits[:, :half], boxes[:, :half]
    elif kind == "duplicate targets":
        targets = [
            {k: torch.cat([v[: len(v) // 2], v[: len(v) - len(v) // 2]]) for k, v in t.items()}
            for t in targets
        ]
    else:  # "grid": logits in {-1, 0, 1}, boxes on a 1/4 grid: many exactly equal costs
        logits = torch.randint(-1, 2, logits.shape, generator=gen).float()
        boxes = torch.cat(
            [
                torch.randint(1, 4, boxes[..., :2].shape, generator=gen) / 4,
                torch.randint(1, 3, boxes[..., 2:].shape, generator=gen) / 4,
            ],
            -1,
        )
        targets = [dict(t, boxes=(t["boxes"] * 4).round().clamp(1, 3) / 4) for t in targets]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


@pytest.mark.parametrize("class_cost_type", ["focal", "ce"])
def test_per_image_blocks_equal_the_batch_wide_matrix_bit_for_bit(class_cost_type):
    """forward's per-image blocks are the batch-wide matrix's diagonal blocks, to the last bit, and
    the padding columns are inf: random batches with 0, 1 and uneven numbers of targets."""
    gen = torch.Generator().manual_seed(11)
    matcher = (
        HungarianMatcher(cost_class=1.0, class_cost_type="ce")
        if class_cost_type == "ce"
        else HungarianMatcher()
    )
    for trial in range(60):
        batch = 1 + trial % 5
        num_queries = int(torch.randint(1, 40, (), generator=gen))
        num_classes = int(torch.randint(2, 12, (), generator=gen))
        sizes = torch.randint(0, min(num_queries, 12) + 1, (batch,), generator=gen).tolist()
        sizes[0] = min(trial % 3, num_queries)  # always some images with 0, 1 and 2 targets
        outputs, targets = random_problem(
            gen, batch, num_queries, sizes, num_classes=num_classes, no_object=class_cost_type == "ce"
        )
        blocks = matcher.cost_blocks(outputs, targets)  # (B, Nq, G_max)
        full = matcher.cost_matrix(outputs, targets)  # (B, Nq, G_total)
        assert blocks.shape == (batch, num_queries, max(sizes)) and blocks.dtype == torch.float32
        offset = 0
        for b, g in enumerate(sizes):
            assert torch.equal(blocks[b, :, :g], full[b, :, offset : offset + g])
            assert torch.isinf(blocks[b, :, g:]).all()
            offset += g


@pytest.mark.parametrize("ties", [None, "duplicate queries", "duplicate targets", "grid"])
def test_assignments_identical_to_the_batch_wide_form(ties):
    gen = torch.Generator().manual_seed(12)
    for trial in range(40):
        matcher = HungarianMatcher() if trial % 2 else HungarianMatcher(cost_class=1.0, class_cost_type="ce")
        batch = 1 + trial % 6
        num_queries = 2 + trial % 17
        sizes = torch.randint(0, min(num_queries, 9) + 1, (batch,), generator=gen).tolist()
        outputs, targets = random_problem(
            gen, batch, num_queries, sizes, num_classes=6, no_object=trial % 2 == 0
        )
        if ties is not None:
            outputs, targets = with_ties(gen, outputs, targets, ties)
        got, want = matcher(outputs, targets), batch_wide_assignment(matcher, outputs, targets)
        for (q, t), (q_ref, t_ref) in zip(got, want, strict=True):
            assert torch.equal(q, q_ref) and torch.equal(t, t_ref)


@pytest.mark.parametrize("class_cost_type", ["focal", "ce"])
def test_batched_equals_brute_force(class_cost_type):
    """Batches with uneven target counts (0 to 4 in 5 queries): each image's matching is its optimum."""
    gen = torch.Generator().manual_seed(13)
    if class_cost_type == "focal":
        matcher = HungarianMatcher()
    else:
        matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, class_cost_type="ce")
    for _ in range(4):
        sizes = [0, 1, 4, 2, 3]
        outputs, targets = random_problem(
            gen, len(sizes), 5, sizes, num_classes=5, no_object=class_cost_type == "ce"
        )
        for b, (query_idx, target_idx) in enumerate(matcher(outputs, targets)):
            logits, boxes = outputs["pred_logits"][b], outputs["pred_boxes"][b]
            labels, tgt_boxes = targets[b]["labels"], targets[b]["boxes"]
            best_total, best_queries = brute_force(logits, boxes, labels, tgt_boxes, matcher)
            got = total_cost(logits, boxes, labels, tgt_boxes, matcher, query_idx, target_idx)
            assert got == pytest.approx(best_total, abs=1e-5)
            assert dict(zip(target_idx.tolist(), query_idx.tolist(), strict=True)) == dict(
                enumerate(best_queries)
            )


def test_float64_inputs_match_in_float32():
    """float64 predictions and targets are matched in float32, like any other dtype (documented)."""
    gen = torch.Generator().manual_seed(14)
    matcher = HungarianMatcher()
    for sizes in ([3, 0, 5], [1], [4, 4, 2, 1]):
        outputs, targets = random_problem(gen, len(sizes), 8, sizes)
        as64 = {k: v.double() for k, v in outputs.items()}
        targets64 = [dict(t, boxes=t["boxes"].double()) for t in targets]
        assert matcher.cost_blocks(as64, targets64).dtype == torch.float32
        for (q, t), (q_ref, t_ref) in zip(
            matcher(as64, targets64), batch_wide_assignment(matcher, outputs, targets), strict=True
        ):
            assert torch.equal(q, q_ref) and torch.equal(t, t_ref)


def test_one_check_pass_and_no_false_refusal():
    """A logit sum that overflows (the fast check's false alarm) is not refused: the detailed checks
    run and pass; without validation, NaN still fails loudly instead of being matched."""
    gen = torch.Generator().manual_seed(15)
    outputs, targets = random_problem(gen, 2, 6, [2, 3], num_classes=10)
    huge = dict(outputs, pred_logits=outputs["pred_logits"].clone())
    huge["pred_logits"][:, :, :] = 1e37  # 120 of them: the sum overflows to inf, each is finite
    assert len(HungarianMatcher()(huge, targets)[1][0]) == 3
    nan = dict(outputs, pred_logits=outputs["pred_logits"].clone().fill_(float("nan")))
    with pytest.raises(ValueError):  # scipy refuses the NaN cost: never silently nan_to_num-ed
        HungarianMatcher()(nan, targets, validate=False)


def test_output_format():
    gen = torch.Generator().manual_seed(4)
    outputs, targets = random_problem(gen, 2, 9, [4, 2])
    for b, (query_idx, target_idx) in enumerate(HungarianMatcher()(outputs, targets)):
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
        assert len(query_idx) == len(target_idx) == len(targets[b]["labels"])
        assert sorted(target_idx.tolist()) == list(range(len(targets[b]["labels"])))  # each target once
        assert len(set(query_idx.tolist())) == len(query_idx)  # each query at most once
        assert query_idx.tolist() == sorted(query_idx.tolist())


def test_empty_targets():
    gen = torch.Generator().manual_seed(5)
    outputs, targets = random_problem(gen, 3, 4, [0, 0, 0])
    for query_idx, target_idx in HungarianMatcher()(outputs, targets):
        assert query_idx.shape == (0,) and target_idx.shape == (0,) and query_idx.dtype == torch.int64
    outputs, targets = random_problem(gen, 2, 4, [0, 2])
    indices = HungarianMatcher()(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[1][0].numel() == 2


def test_no_gradient_and_float32_under_autocast():
    gen = torch.Generator().manual_seed(6)
    outputs, targets = random_problem(gen, 2, 6, [2, 3])
    leaf = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(leaf, targets)
    assert not cost.requires_grad
    half = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost_amp = matcher.cost_matrix(half, targets)
    assert cost_amp.dtype == torch.float32
    torch.testing.assert_close(
        cost_amp, matcher.cost_matrix({k: v.float() for k, v in half.items()}, targets)
    )


def test_cost_terms_shapes_and_weights():
    gen = torch.Generator().manual_seed(8)
    outputs, targets = random_problem(gen, 2, 5, [2, 3])
    matcher = HungarianMatcher(cost_class=1.5, cost_bbox=3.0, cost_giou=0.5)
    terms = matcher.cost_terms(outputs, targets)
    assert {k: tuple(v.shape) for k, v in terms.items()} == {k: (2, 5, 5) for k in ("class", "bbox", "giou")}
    torch.testing.assert_close(
        matcher.cost_matrix(outputs, targets),
        1.5 * terms["class"] + 3.0 * terms["bbox"] + 0.5 * terms["giou"],
    )


def test_bad_inputs():
    gen = torch.Generator().manual_seed(9)
    outputs, targets = random_problem(gen, 1, 3, [2])
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match="only 3 queries"):
        matcher(outputs, random_problem(gen, 1, 3, [4])[1])
    with pytest.raises(ValueError, match="non-finite"):
        bad = dict(outputs, pred_logits=outputs["pred_logits"].clone().fill_(float("nan")))
        matcher(bad, targets)
    with pytest.raises(ValueError, match="non-finite"):
        bad_t = [dict(targets[0], boxes=targets[0]["boxes"].clone().fill_(float("inf")))]
        matcher(outputs, bad_t)
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        matcher(outputs, targets + targets)
    with pytest.raises(ValueError, match="pred_logits must be"):
        matcher(dict(outputs, pred_boxes=outputs["pred_boxes"][..., :3]), targets)
    with pytest.raises(ValueError, match="'labels' and 'boxes'"):
        matcher(outputs, [{"boxes": targets[0]["boxes"]}])
    with pytest.raises(ValueError, match="int64"):
        matcher(outputs, [dict(targets[0], labels=targets[0]["labels"].float())])
    with pytest.raises(ValueError, match=r"shape \(G, 4\)"):
        matcher(outputs, [dict(targets[0], boxes=targets[0]["boxes"][:1])])
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        matcher(outputs, [dict(targets[0], labels=torch.tensor([0, 4]))])
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):  # "ce": the last column is no-object
        HungarianMatcher(class_cost_type="ce")(outputs, [dict(targets[0], labels=torch.tensor([0, 3]))])
    with pytest.raises(ValueError, match="negative widths"):
        matcher(outputs, [dict(targets[0], boxes=targets[0]["boxes"] * torch.tensor([1.0, 1.0, -1.0, 1.0]))])
    with pytest.raises(ValueError, match="class_cost_type"):
        HungarianMatcher(class_cost_type="softmax")
    with pytest.raises(ValueError, match="cost weights"):
        HungarianMatcher(cost_bbox=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        HungarianMatcher(alpha=1.5)
    with pytest.raises(ValueError, match="needs 'labels'"):
        check_targets([{}])


def test_viz_functions_draw_the_assignment():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detr_edu.scenes import make_scene
    from detr_edu.viz.matcher import (
        plot_class_cost_curves,
        plot_cost_terms,
        plot_match_history,
        plot_matches,
        plot_matching_view,
    )

    gen = torch.Generator().manual_seed(10)
    image, target = make_scene(seed=0, index=1)
    outputs, _ = random_problem(gen, 1, 8, [0], num_classes=10)
    matcher = HungarianMatcher()
    ((query_idx, target_idx),) = matcher(outputs, [target])
    terms = {k: v[0] for k, v in matcher.cost_terms(outputs, [target]).items()}
    total = matcher.cost_matrix(outputs, [target])[0]
    fig = plot_cost_terms(terms, total, query_idx, target_idx)
    # Four heatmaps (plus their colour bars), each with one red box per matched pair.
    heatmaps = [ax for ax in fig.axes if ax.get_title()]
    assert len(heatmaps) == 4 and all(len(ax.patches) == len(query_idx) for ax in heatmaps)
    fig = plot_matches(image, target, outputs["pred_boxes"][0], query_idx, target_idx)
    # G target boxes + G matched boxes + (Nq - G) unmatched boxes, and one joining line per pair.
    assert len(fig.axes[0].patches) == 8 + len(target["labels"]) and len(fig.axes[0].lines) == len(query_idx)
    fig = plot_matching_view(image, target, outputs["pred_logits"][0], outputs["pred_boxes"][0], matcher)
    assert len(fig.axes[1].patches) == len(query_idx)
    assert len(plot_class_cost_curves().axes[0].lines) == 5  # four curves and the zero line
    history = torch.tensor([[0, -1, 1], [1, -1, 0], [1, -1, 0]])
    fig = plot_match_history(history, num_targets=2)
    assert list(fig.axes[1].lines[0].get_ydata()) == [2, 0]
    with pytest.raises(ValueError, match="history must be"):
        plot_match_history(history[0], num_targets=2)
    plt.close("all")
