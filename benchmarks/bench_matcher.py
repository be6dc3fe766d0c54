"""Benchmark the Hungarian matcher: batched cost matrix (DETR's way) vs a straightforward per-image loop.

The package's :class:`detr_edu.matcher.HungarianMatcher` builds one (B*Nq, G_total) cost matrix for
the whole batch and cuts out each image's block; the baseline computes each image's (Nq, G_b) cost
on its own. Both solve the same per-image blocks with ``scipy.optimize.linear_sum_assignment``.
Times are split into cost computation and assignment and reported as ratios measured in the same
run (absolute times on a shared CPU are noise).

Run: ``.venv/bin/python benchmarks/bench_matcher.py [--repeats 5] [--threads 1]``; writes
``benchmarks/results/matcher.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

from detr_edu.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from detr_edu.matcher import HungarianMatcher, focal_class_cost

# (name, batch, queries, targets per image, classes)
CONFIGS = [
    ("course: digit scenes, 100 queries", 8, 100, 6, 10),
    ("course: digit scenes, 300 queries", 8, 300, 6, 10),
    ("DINO on COCO: 900 queries, 50 targets", 16, 900, 50, 80),
]


def make_batch(batch: int, num_queries: int, num_targets: int, num_classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes, generator=gen),
        "pred_boxes": torch.cat(
            [
                0.1 + 0.8 * torch.rand(batch, num_queries, 2, generator=gen),
                0.05 + 0.3 * torch.rand(batch, num_queries, 2, generator=gen),
            ],
            -1,
        ),
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (num_targets,), generator=gen),
            "boxes": torch.cat(
                [
                    0.1 + 0.8 * torch.rand(num_targets, 2, generator=gen),
                    0.05 + 0.3 * torch.rand(num_targets, 2, generator=gen),
                ],
                -1,
            ),
        }
        for _ in range(batch)
    ]
    return outputs, targets


def per_image_costs(outputs, targets, matcher: HungarianMatcher) -> list[torch.Tensor]:
    """The baseline: each image's (Nq, G_b) cost on its own, the same terms and weights."""
    costs = []
    for b, target in enumerate(targets):
        logits, boxes = outputs["pred_logits"][b], outputs["pred_boxes"][b]  # (Nq, K), (Nq, 4)
        cost = (
            matcher.cost_class
            * focal_class_cost(logits, target["labels"], alpha=matcher.alpha, gamma=matcher.gamma)
            + matcher.cost_bbox * torch.cdist(boxes, target["boxes"], p=1)
            - matcher.cost_giou
            * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target["boxes"]))
        )  # (Nq, G_b)
        costs.append(cost)
    return costs


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def solve(blocks: list[torch.Tensor]) -> list:
    return [linear_sum_assignment(c.numpy()) for c in blocks]


def bench_config(
    matcher: HungarianMatcher,
    name: str,
    batch: int,
    num_queries: int,
    num_targets: int,
    num_classes: int,
    *,
    repeats: int,
) -> tuple[str, float, float, float, float, float]:
    outputs, targets = make_batch(batch, num_queries, num_targets, num_classes)
    sizes = [len(t["labels"]) for t in targets]

    t_cost_batched, cost = timed(lambda: matcher.cost_matrix(outputs, targets).cpu(), repeats)
    t_cost_loop, loop_costs = timed(lambda: per_image_costs(outputs, targets, matcher), repeats)
    blocks = [block[b] for b, block in enumerate(cost.split(sizes, -1))]  # image b's own (Nq, G_b) block
    for block, loop_cost in zip(blocks, loop_costs, strict=True):  # same numbers either way
        torch.testing.assert_close(block, loop_cost, rtol=1e-4, atol=1e-4)
    t_assign_batched, _ = timed(
        lambda: solve([blk[b] for b, blk in enumerate(cost.split(sizes, -1))]), repeats
    )
    t_assign_loop, _ = timed(lambda: solve(loop_costs), repeats)
    t_full, _ = timed(lambda: matcher(outputs, targets), repeats)
    return (
        f"{name} (B={batch}, Nq={num_queries}, G={num_targets}, K={num_classes})",
        t_cost_loop / t_cost_batched,
        t_assign_batched / (t_cost_batched + t_assign_batched),
        t_assign_loop / (t_cost_loop + t_assign_loop),
        (t_cost_loop + t_assign_loop) / t_full,
        t_full * 1e3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: fair on a shared CPU)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    matcher = HungarianMatcher()

    rows = [bench_config(matcher, *config, repeats=args.repeats) for config in CONFIGS]

    header = (
        "Hungarian matcher, batched cost (package) vs per-image loop (baseline); "
        f"torch threads = {args.threads}, median of {args.repeats}.\n"
        "Speed-up > 1 means the package's batched cost is faster. Assignment share = fraction of the "
        "matcher's time spent in linear_sum_assignment.\n\n"
        "| configuration | cost speed-up (loop / batched) | assignment share, batched "
        "| assignment share, loop "
        "| whole matcher speed-up (loop / package) | package time per batch (ms, this machine) |\n"
        "|---|---:|---:|---:|---:|---:|\n"
    )
    table = header + "".join(
        f"| {name} | {speedup:.2f} | {share_b:.0%} | {share_l:.0%} | {whole:.2f} | {ms:.1f} |\n"
        for name, speedup, share_b, share_l, whole, ms in rows
    )
    print(table)
    out = Path(__file__).resolve().parent / "results" / "matcher.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Matcher benchmark\n\n" + table)
    print("wrote", out)


if __name__ == "__main__":
    main()
