"""Multi-process training helpers: read torchrun's environment, pick the backend, reduce, gather.

``torchrun --nproc_per_node=N -m detr_edu.train ...`` starts N copies of the script with the
environment variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
set; :func:`init_distributed` reads them (nanoGPT's way: no launcher-specific code) and joins the
process group with ``nccl`` when the process has a GPU and ``gloo`` otherwise (gloo runs on CPU,
which is how the course tests DDP). Without those variables it returns a single-process context, so
``python -m detr_edu.train`` works unchanged.

Conventions the training loop follows (torchvision's detection reference, DETR's ``util/misc.py``):
each process sees a different shard of the data (``DistributedSampler``), DDP averages the
gradients, the box-loss normaliser ``num_boxes`` is averaged over processes
(:func:`detr_edu.criterion.num_boxes_for_loss`), logged losses are averaged with
:func:`reduce_mean`, and only rank 0 writes files (:attr:`DistContext.is_main`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistContext", "init_distributed", "reduce_mean", "barrier", "cleanup", "world_size"]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank`` on the machine and
    ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates into files and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes, or return a single-process context.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). Under torchrun with CUDA each
            process takes the GPU ``LOCAL_RANK``.

    Returns:
        The :class:`DistContext` of this process.
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    if world == 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistContext(rank=0, world_size=1, local_rank=0, device=dev, backend=None)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        # init_method "env://" reads MASTER_ADDR / MASTER_PORT, which torchrun sets
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def world_size() -> int:
    """Number of processes (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduce_mean(values: dict[str, Tensor]) -> dict[str, float]:
    """Average scalar tensors over all processes (for logging); one all-reduce for the whole dict."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])  # (n,)
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked = stacked / world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
