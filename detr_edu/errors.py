"""The course's own exception types: raised where a problem is detected, caught by type, never by text."""

from __future__ import annotations

__all__ = ["NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """A prediction, a loss term or the gradient norm became NaN or infinite; the message names it.

    Raised by :class:`detr_edu.criterion.SetCriterion` (predictions and losses) and by
    :func:`detr_edu.engine.train_step` (the gradient norm), before any weight changes, so the last
    checkpoint is still the last good state.
    """
