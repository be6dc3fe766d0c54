"""Forward + backward cost of deformable sampling vs a naive loop and dense attention, on CPU.

Run: ``.venv/bin/python benchmarks/bench_deformable.py`` (9 minutes measured on 2 cores shared with
other jobs at a load average of about 14; less on an idle machine). Prints a
markdown table and writes it to ``benchmarks/results/deformable.md``.

Times are medians of a few forward+backward calls, the methods' calls interleaved in one process
(so that a change of load on a shared machine hits them alike), on one thread by default
(``BENCH_THREADS``): two OpenMP threads on a loaded 2-core machine spin-wait and scatter the times.
Peak memory is measured in a fresh subprocess per method: the kernel's high-water mark
(``VmHWM``) minus the resident memory just before one forward+backward call. Only ratios against
the grid_sample core measured in the same run are meaningful on a shared machine.

Baselines:
* ``naive loop``: :func:`detr_edu.deformable.deformable_sampling_naive`, *forward only* (under
  ``torch.no_grad``), timed on a few queries and scaled linearly per query (its cost is exactly linear
  in Nq: one Python iteration per sample). Its backward through autograd is far slower still: every
  indexed read of ``value`` allocates a value-sized gradient (235 s for 2 queries at COCO shapes), so
  the ratios of this row are lower bounds;
* ``dense (SDPA)``: ``torch.nn.functional.scaled_dot_product_attention`` with the same B, nh, hd,
  every query against all Nv keys (PyTorch's fused CPU kernel: it never stores the Nq x Nv matrix);
  timed on ``DENSE_MAX_QUERIES`` queries and scaled per query where Nq exceeds
  ``DENSE_FULL_MAX_QUERIES`` (noted in the table);
* ``dense (explicit)``: chapter 01's ``softmax(q k^T) v`` (materialises the matrix), run only where
  the matrix fits in ``EXPLICIT_MAX_BYTES``; otherwise the matrix size is reported.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from detr_edu.attention import attention_matrix_bytes, scaled_dot_product_attention
from detr_edu.deformable import deformable_sampling_grid, deformable_sampling_naive

COCO_SHAPES = [[100, 150], [50, 75], [25, 38], [13, 19]]  # stride 8..64 levels of an 800 x 1200 image
COURSE_SHAPES = [[32, 32], [16, 16], [8, 8], [4, 4]]  # a 256 x 256 image, the course's CPU size
NAIVE_QUERIES = 2  # the naive loop is timed on this many queries and scaled per query
DENSE_FULL_MAX_QUERIES = 2000  # dense SDPA on more queries than this ...
DENSE_MAX_QUERIES = 1000  # ... is timed on this many and scaled per query
EXPLICIT_MAX_BYTES = 1.5e9  # skip the explicit dense baseline when its matrix is larger

# (name, spatial shapes, Nq or None for "every token", repeats for the core)
CASES = [
    ("COCO decoder (300 queries)", COCO_SHAPES, 300, 5),
    ("COCO encoder (every token a query)", COCO_SHAPES, None, 1),
    ("course decoder (100 queries)", COURSE_SHAPES, 100, 10),
    ("course encoder (every token a query)", COURSE_SHAPES, None, 5),
]
B, NH, HD, P = 2, 8, 32, 4


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    # VmHWM is this address space's high-water mark. Not ru_maxrss: Linux carries that across
    # fork + exec, so a child of a big parent would start with the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _leaf(*shape: int) -> torch.Tensor:
    # Filled in place so that setup leaves no freed temporaries under the high-water mark.
    return torch.empty(*shape).uniform_(0.0, 1.0).requires_grad_()


def _build(method: str, shapes: list[list[int]], nq: int):
    """Inputs and a forward+backward closure for one method."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    nv = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if method in ("core", "naive"):
        value = _leaf(B, nv, NH, HD)
        loc = _leaf(B, nq, NH, len(shapes), P, 2)
        weights = _leaf(B, nq, NH, len(shapes), P)
        leaves = (value, loc, weights)

        def step():
            if method == "core":
                deformable_sampling_grid(value, spatial_shapes, loc, weights).sum().backward()
            else:
                with torch.no_grad():
                    deformable_sampling_naive(value, spatial_shapes, loc, weights)

    else:
        q, k, v = _leaf(B, NH, nq, HD), _leaf(B, NH, nv, HD), _leaf(B, NH, nv, HD)
        leaves = (q, k, v)

        def step():
            if method == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                out = scaled_dot_product_attention(q, k, v)[0]
            out.sum().backward()

    def run():
        for t in leaves:
            t.grad = None
        step()

    return run


def _threads() -> int:
    return int(os.environ.get("BENCH_THREADS", "1"))


def _child(method: str, shapes: list[list[int]], nq: int) -> None:
    """Peak memory of one forward+backward call, in a fresh process (printed as JSON)."""
    torch.set_num_threads(_threads())
    run = _build(method, shapes, nq)
    before = max(_rss_bytes(), _peak_bytes())
    run()
    print(json.dumps({"peak_bytes": max(0, _peak_bytes() - before)}))


def _peak_memory(method: str, shapes: list[list[int]], nq: int) -> int:
    cmd = [sys.executable, __file__, "--child", json.dumps([method, shapes, nq])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def _interleaved_seconds(runs: dict, repeats: int) -> dict:
    """Median seconds per method, the methods' calls interleaved so that load changes hit all alike."""
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def _fmt_mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f} MB"


def main() -> str:
    torch.set_num_threads(_threads())
    rows = []
    for name, shapes, nq, repeats in CASES:
        nv = sum(h * w for h, w in shapes)
        nq = nv if nq is None else nq
        dq = nq if nq <= DENSE_FULL_MAX_QUERIES else DENSE_MAX_QUERIES
        explicit_fits = attention_matrix_bytes(B, NH, nq, nv) <= EXPLICIT_MAX_BYTES
        # method -> (closure, queries it runs on)
        plan = {
            "grid_sample core": ("core", nq),
            "naive loop, forward only": ("naive", NAIVE_QUERIES),
            "dense (SDPA)": ("sdpa", dq),
        }
        if explicit_fits:
            plan["dense (explicit, ch. 01)"] = ("explicit", nq)
        runs = {label: _build(method, shapes, n) for label, (method, n) in plan.items()}
        seconds = _interleaved_seconds(runs, repeats)
        del runs
        core_s = seconds["grid_sample core"]
        core_mem = _peak_memory("core", shapes, nq)
        for label, (method, n) in plan.items():
            scaled = seconds[label] * nq / n
            how = "measured" if n == nq else f"{n:,} queries x {nq / n:,.1f}"
            mem = (
                None
                if n != nq or method == "naive"
                else (core_mem if method == "core" else _peak_memory(method, shapes, n))
            )
            rows.append((name, nq, nv, label, scaled, mem, how, core_s, core_mem))
        if not explicit_fits:
            matrix = _fmt_mb(attention_matrix_bytes(B, NH, nq, nv))
            rows.append(
                (
                    name,
                    nq,
                    nv,
                    "dense (explicit, ch. 01)",
                    None,
                    None,
                    f"not run: the matrix alone is {matrix}",
                    core_s,
                    core_mem,
                )
            )
        print(f"done: {name}", file=sys.stderr)

    lines = [
        "# Deformable sampling: forward + backward on CPU",
        "",
        f"B={B}, nh={NH}, hd={HD}, P={P}, L=4; float32; torch {torch.__version__}, "
        f"{_threads()} thread(s) (BENCH_THREADS; one thread is far steadier on a shared machine), "
        f"{platform.processor() or platform.machine()}. "
        "Times are medians of calls interleaved across methods; peak memory is the process high-water mark "
        "during one forward+backward call minus the resident memory before it (inputs excluded). Ratios "
        "are against the grid_sample core of the same case, measured in the same run; absolute times are "
        "from a shared machine.",
        "",
        "| case | Nq | Nv | method | time | x core | peak memory | x core | how |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for name, nq, nv, method, seconds, peak, how, core_s, core_mem in rows:
        t = "-" if seconds is None else _fmt_ms(seconds)
        tr = "-" if seconds is None else f"{seconds / core_s:,.1f}"
        m = "-" if peak is None else _fmt_mb(peak)
        mr = "-" if peak is None or core_mem == 0 else f"{peak / core_mem:,.2f}"
        lines.append(f"| {name} | {nq:,} | {nv:,} | {method} | {t} | {tr} | {m} | {mr} | {how} |")
    lines += [
        "",
        "The naive loop row is its forward pass alone (its autograd backward allocates a value-sized "
        "gradient per sample and is slower still), so its ratios are lower bounds. "
        "Scaled rows: the naive loop and dense attention cost exactly linear in the number of queries "
        "(each query is independent), so they are timed on fewer queries and multiplied; their "
        "memory is not reported. COCO shapes: levels 100x150, 50x75, 25x38, 13x19 (Nv = 19,947); "
        "course shapes: 32x32, 16x16, 8x8, 4x4 (Nv = 1,360).",
    ]
    table = "\n".join(lines) + "\n"
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "deformable.md").write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":  # one memory measurement
        _child(*json.loads(sys.argv[2]))
    else:
        main()
