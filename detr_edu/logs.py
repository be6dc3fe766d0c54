"""Read the training log (``OUTPUT_DIR/log.jsonl``) that :mod:`detr_edu.train` writes (chapter 08).

One JSON object per line, ``"type"`` one of ``config`` (the run's model and training settings),
``resume`` (a run continued from its checkpoint, with any learning-rate override), ``train``
(running losses every ``--log-every`` steps), ``epoch``, ``eval`` (COCO metrics in percent),
``error`` (why a run stopped early, e.g. a non-finite loss) and ``end``. ``elapsed_s`` is
training time only (evaluations pause the clock), the time axis of every curve here and in
:mod:`detr_edu.viz.training`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["read_log", "series", "final_metrics", "compare_seeds", "SeedComparison", "RECORD_TYPES"]

RECORD_TYPES = ("config", "resume", "train", "epoch", "eval", "error", "end")


def read_log(path: str | Path) -> list[dict]:
    """All records of a ``log.jsonl``, in order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not a JSON object with a known ``"type"`` (naming file and line).
    """
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or record.get("type") not in RECORD_TYPES:
            raise ValueError(f"{path}:{number}: expected an object with 'type' in {RECORD_TYPES}")
        records.append(record)
    return records


def series(
    records: Sequence[dict], key: str, *, kind: str = "train", x: str = "elapsed_s"
) -> tuple[list, list]:
    """``(xs, ys)`` of ``key`` over the records of type ``kind`` that have it (x: "elapsed_s" or "step").

    Non-finite values are kept (a diverged run should show as one). Example: ``series(r, "AP",
    kind="eval")`` is the AP-versus-training-time curve, ``series(r, "loss")`` the loss curve.
    """
    pairs = [(r[x], r[key]) for r in records if r.get("type") == kind and key in r and x in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def final_metrics(records: Sequence[dict]) -> dict[str, float]:
    """The last evaluation's metrics plus the run's length: ``AP``, ``AP50``, ``AP75``, ``AR100``
    (percent; NaN if the run was never evaluated), ``steps``, ``elapsed_s`` and ``s_per_step``
    (training seconds per optimisation step), taken from the ``end`` record when there is one."""
    evals = [r for r in records if r.get("type") == "eval"]
    last = evals[-1] if evals else {}
    ends = [r for r in records if r.get("type") in ("end", "error", "train", "eval", "epoch") and "step" in r]
    if not ends:
        raise ValueError("the log has no record with a step count: did the run start?")
    end = next((r for r in reversed(records) if r.get("type") == "end"), ends[-1])
    steps = int(end["step"])
    elapsed = float(end.get("elapsed_s", math.nan))
    return {
        **{k: float(last.get(k, math.nan)) for k in ("AP", "AP50", "AP75", "AR100")},
        "steps": steps,
        "elapsed_s": elapsed,
        "s_per_step": elapsed / steps if steps else math.nan,
    }


@dataclass(frozen=True)
class SeedComparison:
    """A variant's final metric over seeds, against a baseline's (chapters 07 and 08).

    Attributes:
        values, baseline: the final metric of each seed's run.
        mean, std: mean and sample standard deviation (n - 1) of ``values``.
        baseline_mean, baseline_std: the same of ``baseline``.
        difference: ``mean - baseline_mean``.
        standard_error: of that difference, ``sqrt(std^2 / n + baseline_std^2 / n_baseline)``
            (Welch's; the seeds of the two variants are independent runs).
    """

    values: tuple[float, ...]
    baseline: tuple[float, ...]
    mean: float
    std: float
    baseline_mean: float
    baseline_std: float
    difference: float
    standard_error: float


def compare_seeds(values: Sequence[float], baseline: Sequence[float]) -> SeedComparison:
    """Mean ± sample std of ``values`` and ``baseline`` and their difference ± its standard error.

    Raises:
        ValueError: fewer than two values on either side (no spread can be measured from one run).
    """
    if len(values) < 2 or len(baseline) < 2:
        raise ValueError(f"need at least two seeds per side, got {len(values)} and {len(baseline)}")
    mean, std = statistics.fmean(values), statistics.stdev(values)
    b_mean, b_std = statistics.fmean(baseline), statistics.stdev(baseline)
    return SeedComparison(
        values=tuple(values),
        baseline=tuple(baseline),
        mean=mean,
        std=std,
        baseline_mean=b_mean,
        baseline_std=b_std,
        difference=mean - b_mean,
        standard_error=math.sqrt(std**2 / len(values) + b_std**2 / len(baseline)),
    )
