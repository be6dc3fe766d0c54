"""One training step, one evaluation pass, and the learning-rate schedule.

The training *loop* (epochs, budget, checkpoints, logging) is :mod:`detr_edu.train`; this module
holds what happens to one batch, as in DETR's ``engine.py``:

1. forward under autocast (bf16/fp16 on CUDA only; CPU runs in float32),
2. the criterion in float32 (autocast off; matching and losses must not run in half precision),
3. a finite-loss check that names the term that is not finite,
4. backward (through a ``GradScaler`` for fp16), gradient-norm clipping, AdamW step.

Every model is called the same way, ``model(images, masks, targets=...)``: DINO builds chapter 07's
denoising queries from the targets (in training mode), DETR and Deformable DETR ignore them, so
nothing here needs to know which model it trains. A non-finite prediction or loss is a
:class:`~detr_edu.errors.NonFiniteLossError`, raised where it is detected and caught by type.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detr_edu.coco_eval import CocoEvaluator
from detr_edu.data import Batch
from detr_edu.distributed import reduce_mean
from detr_edu.errors import NonFiniteLossError
from detr_edu.postprocess import postprocess

__all__ = [
    "WarmupStepSchedule",
    "autocast",
    "default_amp",
    "unwrap",
    "forward_model",
    "train_step",
    "evaluate",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in {"bf16", "fp16"}; a no-op for ``"off"``.

    bf16 runs on CUDA and on CPU (the tests use it there; on most CPUs it is slower than float32);
    fp16 needs CUDA and a ``GradScaler``. Whatever the forward runs in, the deformable sampling
    (:mod:`detr_edu.deformable`), the matcher and the losses compute in float32.
    """
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device, got {device}; use 'bf16' or 'off' on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def default_amp(device: torch.device) -> str:
    """``--amp auto``: bf16 on a CUDA GPU that supports it, else fp16 (+ GradScaler); off on CPU."""
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class WarmupStepSchedule:
    """Learning rate = base lr x linear warm-up x step decay, set on the optimiser before each step.

    ``factor = min(1, 0.001 + (1 - 0.001) * step / warmup_iters) * (gamma if progress >= drop else 1)``

    ``progress`` is the fraction of the training done: steps / total steps when training by epochs,
    elapsed seconds / budget when training by wall clock (so a 10-minute run drops its learning rate
    at 8 minutes whatever its speed). The papers' schedule is the step decay alone (DETR: x0.1 after
    400 of 500 epochs); the warm-up helps from-scratch training.

    Attributes:
        base_lrs: the learning rate of each parameter group at factor 1.
        warmup_iters, drop, gamma: see above.
        last_factor: the factor applied by the last :meth:`step` (for logging and resuming).
    """

    base_lrs: list[float]
    warmup_iters: int = 0
    drop: float = 1.0
    gamma: float = 0.1
    last_factor: float = 1.0

    def factor(self, step: int, progress: float) -> float:
        warm = 1.0
        if self.warmup_iters > 0 and step < self.warmup_iters:
            warm = 0.001 + (1.0 - 0.001) * step / self.warmup_iters
        return warm * (self.gamma if progress >= self.drop else 1.0)

    def step(self, optimizer: torch.optim.Optimizer, step: int, progress: float) -> float:
        """Set every group's lr for iteration ``step`` at training fraction ``progress``; return factor."""
        if len(optimizer.param_groups) != len(self.base_lrs):
            raise ValueError(f"{len(self.base_lrs)} base lrs for {len(optimizer.param_groups)} param groups")
        self.last_factor = self.factor(step, progress)
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self.last_factor
        return self.last_factor

    def state_dict(self) -> dict:
        return {
            "base_lrs": list(self.base_lrs),
            "warmup_iters": self.warmup_iters,
            "drop": self.drop,
            "gamma": self.gamma,
            "last_factor": self.last_factor,
        }

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.warmup_iters = int(state["warmup_iters"])
        self.drop = float(state["drop"])
        self.gamma = float(state["gamma"])
        self.last_factor = float(state["last_factor"])


def forward_model(model: nn.Module, batch: Batch) -> dict:
    """Run the model on a padded batch, with its targets (used by DINO's denoising in training)."""
    return model(batch.images, batch.masks, targets=batch.targets)


def _float32(outputs: dict) -> dict:
    """Outputs with every floating tensor in at least float32 (nested dicts and lists too)."""
    if isinstance(outputs, Tensor):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {k: _float32(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_float32(v) for v in outputs]
    return outputs


_ADVICE = "The last checkpoint is intact: lower the learning rate or check the data, then --resume."


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    schedule: WarmupStepSchedule,
    step: int,
    progress: float,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
    clip_max_norm: float = 0.0,
) -> dict[str, float]:
    """One optimisation step on ``batch`` (already on the model's device).

    Args:
        model: the (possibly DDP-wrapped) detector, in training mode.
        criterion: a :class:`detr_edu.criterion.SetCriterion` (``criterion(outputs, targets)`` gives
            the named losses, ``criterion.total(losses)`` their weighted sum).
        batch: the padded batch.
        optimizer: the optimiser; its learning rates are set by ``schedule`` first.
        schedule: the learning-rate schedule; step: iteration number (0-based); progress: fraction of
            the training done (see :class:`WarmupStepSchedule`).
        amp: "off", "bf16" or "fp16" (CUDA only); scaler: a GradScaler for fp16.
        clip_max_norm: clip the global gradient norm to this (0: no clipping, norm still logged).

    Returns:
        every loss term and ``loss`` (the weighted total), averaged over processes, plus ``lr``
        (the first group's) and ``grad_norm`` -- as Python floats.

    Raises:
        NonFiniteLossError: a prediction, a loss term or the gradient norm is not finite. Nothing has been
            updated yet when it is raised, so the last checkpoint stays the last good state.
    """
    device = batch.images.device
    with autocast(device, amp):
        outputs = forward_model(model, batch)
    # Matching and losses in float32 whatever the forward ran in.
    with torch.autocast(device.type, enabled=False) if amp != "off" else contextlib.nullcontext():
        try:
            # the criterion checks every prediction it reads and every term it returns
            losses = criterion(_float32(outputs), batch.targets)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"non-finite loss at step {step}: {err}; stopping. {_ADVICE}") from err
        total = criterion.total(losses)
    values = torch.stack([*losses.values(), total])  # one finiteness check for every term
    if not torch.isfinite(values).all():
        bad = {k: float(v.detach()) for k, v in {**losses, "loss": total}.items() if not torch.isfinite(v)}
        raise NonFiniteLossError(f"non-finite loss at step {step}: {bad}; stopping. {_ADVICE}")
    schedule.step(optimizer, step, progress)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        total.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    max_norm = clip_max_norm if clip_max_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
        scaler.update()
    else:
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {step} although every loss term is finite; stopping "
                f"before the weights are changed. {_ADVICE}"
            )
        optimizer.step()
    logged = reduce_mean({**losses, "loss": total})
    logged["lr"] = optimizer.param_groups[0]["lr"]
    logged["grad_norm"] = float(grad_norm)
    return logged


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    evaluator: CocoEvaluator,
    *,
    device: torch.device,
    amp: str = "off",
    score_type: str = "sigmoid",
    num_top: int = 100,
) -> dict[str, float]:
    """COCO metrics of ``model`` on every batch of ``loader`` (all processes' shares together).

    Predictions are scaled to each image's *original* size (``orig_size``), so the metric compares
    them with the json's boxes in the json's pixels, whatever resizing the loader did.
    """
    was_training = model.training
    model.eval()
    for batch in loader:
        batch = batch.to(device)
        with autocast(device, amp):
            outputs = model(batch.images, batch.masks)
        orig_sizes = torch.stack([t["orig_size"] for t in batch.targets])  # (B, 2) (h, w)
        results = postprocess(_float32(outputs), orig_sizes, num_top=num_top, score_type=score_type)
        evaluator.update(results, [int(t["image_id"]) for t in batch.targets])
    model.train(was_training)
    return evaluator.summarize()
