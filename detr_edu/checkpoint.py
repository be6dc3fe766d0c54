"""Training checkpoints: written atomically, loaded safely, complete enough to resume exactly.

A checkpoint is one ``torch.save`` of a plain dict: ``model``, ``optimizer``, ``scheduler``,
``scaler`` state dicts, the ``epoch`` and ``step`` counters, the ``rng`` states (Python, NumPy,
torch CPU and CUDA), the ``config`` (model and training settings as plain dicts), the
``category_ids`` (label k <-> dataset category id) and anything the caller adds under ``extra``.

* **Atomic**: written to ``NAME.tmp`` in the same folder, flushed to disk, then ``os.replace``-d onto
  ``NAME``. A crash (or a non-finite loss, or Ctrl-C) during the write leaves the previous checkpoint
  intact; a reader never sees half a file. ``os.replace`` is atomic on POSIX and Windows when both
  names are on the same file system, hence the same folder.
* **Safe to load**: :func:`load_checkpoint` uses ``torch.load(..., weights_only=True)``, which only
  rebuilds tensors and plain containers -- a checkpoint from the internet cannot run code. So
  everything saved here is made of tensors, numbers, strings, lists, tuples and dicts (the NumPy
  RNG state's array is stored as a tensor for this reason).
* **Exact resume**: with the RNG states restored -- the global ones, and every ``torch.Generator``
  a module of the model owns (DINO's denoiser draws its noise from one, see
  :func:`module_generators`) -- a resumed run draws the same random numbers as an uninterrupted
  one and its losses are equal step by step (``tests/test_resume.py``, every CPU preset).

Follows the torchvision detection reference (``references/detection/train.py``: model, optimizer,
lr_scheduler, scaler, epoch) plus the RNG states it omits.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "read_torch_file",
    "is_training_checkpoint",
    "atomic_save",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "module_generators",
    "CHECKPOINT_KEYS",
]


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be read or written; the message names the path and cause."""


CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "step",
    "rng",
    "config",
    "category_ids",
)


def module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` that a module of ``model`` holds as its ``generator`` attribute.

    Keyed by the module's name (``"denoiser"`` for DINO's
    :class:`~detr_edu.denoising.ContrastiveDenoising`). Such generators are neither parameters nor
    buffers, so the state dict does not hold them; :func:`rng_state` does.
    """
    return {
        name: module.generator
        for name, module in model.named_modules()
        if isinstance(getattr(module, "generator", None), torch.Generator)
    }


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a training step may draw from, in weights-only-loadable form.

    Args:
        generators: the model's own generators (:func:`module_generators`), saved under
            ``"generators"`` by name.
    """
    np_state = np.random.get_state()  # ('MT19937', keys uint32 (624,), pos, has_gauss, cached)
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss)
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),  # (624,)
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),  # uint8 tensor
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},  # uint8 tensors
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one uint8 tensor per device
    return state


def set_rng_state(state: dict[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only if this process uses CUDA).

    Args:
        state: the saved states.
        generators: the model's own generators (:func:`module_generators`); each must have a saved
            state, else ``ValueError`` (the resumed run could not draw what the saved one would).
    """
    saved = state.get("generators", {})
    missing = sorted(set(generators or {}) - set(saved))
    if missing:
        raise ValueError(
            f"the checkpoint has no random state for the model's generators {missing} (it was written "
            "before detr_edu saved them): resuming would not continue the run exactly"
        )
    python = state["python"]
    # weights_only loading returns the inner tuple as a list; random.setstate needs tuples.
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    for name, generator in (generators or {}).items():
        generator.set_state(saved[name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temp file + fsync + rename); return the path.

    Args:
        path: destination, e.g. ``OUTPUT/checkpoint.pth``; its folder is created if needed.
        checkpoint: a dict with at least :data:`CHECKPOINT_KEYS` (``scheduler``/``scaler`` may be
            None); values must be weights-only-loadable (tensors and plain containers).
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}; it has {sorted(checkpoint)}")
    return atomic_save(checkpoint, path)


def _os_error_in(err: BaseException) -> OSError | None:
    """The first ``OSError`` in an exception's chain (``torch.save`` wraps the real cause)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` via ``NAME.tmp`` + fsync + ``os.replace``; return the path.

    On any failure the temporary file is removed (a full disk is not left fuller) and the previous
    file at ``path``, if any, is untouched. A write that fails for lack of space raises
    :class:`CheckpointError` saying so (``torch.save`` itself reports an internal "enforce fail").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = _os_error_in(err)
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"{path}: no space left on the device while writing it "
                f"({os.strerror(cause.errno)}); the previous file is intact -- free some space and resume"
            ) from err
        if cause is not None and not isinstance(err, OSError):
            raise CheckpointError(f"{path}: cannot write it: {cause}") from err
        raise
    return path


def read_torch_file(path: str | Path, *, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error per way a file can be unreadable.

    Args:
        path: the file.
        what: what the file should be, for the messages ("checkpoint", "weights file").
        map_location: as ``torch.load``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: empty, truncated or not a torch file, or holding anything but tensors and
            plain containers (weights-only loading refuses code; the course never loads it otherwise).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the {what} is empty (0 bytes): an interrupted copy or write?")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable {what}: it is truncated or not a torch file ({size} bytes, no "
            "complete zip archive)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: the {what} holds objects other than tensors and plain containers "
            "(detr_edu loads weights only and never runs code from a file)"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: the {what} is corrupt ({type(err).__name__})") from None


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: unreadable (see :func:`read_torch_file`), or not a checkpoint of this format
            (names the missing keys).
    """
    path = Path(path)
    checkpoint = read_torch_file(path, what="checkpoint", map_location=map_location)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a detr_edu training checkpoint, missing {missing}")
    return checkpoint


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a readable detr_edu training checkpoint (what must never be overwritten)."""
    try:
        load_checkpoint(path)
    except (FileNotFoundError, CheckpointError):
        return False
    return True
