"""What every checker shares: the error a learner sees, missing-answer detection, comparisons.

A checker raises :class:`ExerciseError` (shown by IPython as one short line, no traceback) when an
answer is missing or wrong, and prints ``exercise N: correct`` when it is right.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import Tensor

__all__ = ["ExerciseError", "Exercise", "is_missing", "checker"]


class ExerciseError(Exception):
    """A missing or wrong exercise answer; IPython shows only ``✗ Exercise N (chapter NN): why``."""

    def __init__(self, chapter: int, number: int, message: str) -> None:
        super().__init__(f"Exercise {number} (chapter {chapter:02d}): {message}")
        self.chapter = chapter
        self.number = number
        self.message = message

    def _render_traceback_(self) -> list[str]:
        """IPython's hook: the lines it shows instead of a traceback through the package."""
        return [f"✗ Exercise {self.number} (chapter {self.chapter:02d}): {self.message}"]


def checker(check: Callable[..., None]) -> Callable[..., bool]:
    """A chapter's check cell: run ``check``; on a missing or wrong answer print its one ``✗`` line
    and return False (a learner's Run All goes on), True when the answer is right. The raising
    version stays available as ``.strict`` (the tests use it)."""

    @functools.wraps(check)
    def show(*args: Any) -> bool:
        try:
            check(*args)
        except ExerciseError as error:
            print(error._render_traceback_()[0])
            return False
        return True

    show.strict = check  # type: ignore[attr-defined]
    return show


def is_missing(answer: Any) -> bool:
    """``...`` (the unfilled cell) or ``None`` (a function whose body is still ``...``)."""
    return answer is Ellipsis or answer is None


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Exercise:
    """One exercise of one chapter: builds its messages and runs its comparisons."""

    chapter: int
    number: int

    @property
    def name(self) -> str:
        return f"answer_{self.number}"

    def fail(self, message: str) -> NoReturn:
        raise ExerciseError(self.chapter, self.number, message)

    def given(self, answer: Any) -> Any:
        """The answer, or ExerciseError if the cell still holds ``...``."""
        if is_missing(answer):
            self.fail(f"not answered yet: replace the ... in {self.name}")
        return answer

    def call(self, function: Any, *args: Any) -> Any:
        """Call the learner's function; its ``None`` means not answered, its exception a hint."""
        if function is Ellipsis or function is None:
            self.given(function)
        if not callable(function):
            self.fail(f"{self.name} should be a function (def {self.name}(...): ...), got {_show(function)}")
        try:
            result = function(*args)
        except Exception as error:  # the learner's code failed: say how, in one line
            self.fail(f"your {self.name} raised {type(error).__name__}: {error}")
        if result is None:
            self.fail(f"not answered yet: replace the ... in {self.name} (it returns None)")
        return result

    def number_close(
        self, answer: Any, expected: float, *, hint: str, rel_tol: float = 1e-4, abs_tol: float = 1e-6
    ) -> float:
        """A real number within tolerance of ``expected``."""
        value = self.as_number(answer)
        if not math.isclose(value, expected, rel_tol=rel_tol, abs_tol=abs_tol):
            self.fail(f"{self.name} = {_show(answer)} is not right: {hint}")
        return value

    def integer(self, answer: Any, expected: int, *, hint: str) -> int:
        """An integer equal to ``expected``."""
        value = self.as_number(answer)
        if value != int(value):
            self.fail(f"{self.name} should be a whole number, got {_show(answer)}")
        if int(value) != expected:
            self.fail(f"{self.name} = {_show(answer)} is not right: {hint}")
        return int(value)

    def as_number(self, answer: Any) -> float:
        answer = self.given(answer)
        if isinstance(answer, Tensor) and answer.numel() == 1:
            answer = answer.item()
        if isinstance(answer, bool) or not isinstance(answer, int | float):
            self.fail(f"{self.name} should be a number, got {_show(answer)}")
        return float(answer)

    def sequence(self, answer: Any, length: int, *, form: str) -> list:
        """A tuple/list (or torch.Size) of ``length`` items; ``form`` names them for the message."""
        answer = self.given(answer)
        if isinstance(answer, Tensor) or not isinstance(answer, Sequence) or isinstance(answer, str):
            self.fail(f"{self.name} should be a tuple {form}, got {_show(answer)}")
        if len(answer) != length:
            self.fail(f"{self.name} should have {length} items {form}, got {len(answer)}")
        return list(answer)

    def tensor(self, answer: Any, shape: Sequence[int], *, dtype: torch.dtype | None = None) -> Tensor:
        """A tensor of the given shape (and dtype)."""
        answer = self.given(answer)
        if not isinstance(answer, Tensor):
            self.fail(f"{self.name} should be a tensor of shape {tuple(shape)}, got {_show(answer)}")
        if tuple(answer.shape) != tuple(shape):
            self.fail(f"{self.name} has shape {tuple(answer.shape)}, expected {tuple(shape)}")
        if dtype is not None and answer.dtype != dtype:
            self.fail(f"{self.name} has dtype {answer.dtype}, expected {dtype}")
        return answer

    def tensor_close(self, answer: Any, expected: Tensor, *, hint: str, atol: float = 1e-5) -> Tensor:
        """A tensor of ``expected``'s shape, equal to it within ``atol`` (exactly for bool tensors)."""
        value = self.tensor(answer, expected.shape)
        if expected.dtype == torch.bool:
            ok = value.dtype == torch.bool and torch.equal(value, expected)
        else:
            ok = torch.allclose(value.to(expected.dtype), expected, rtol=0.0, atol=atol)
        if not ok:
            self.fail(f"{self.name} has the right shape but not the right values: {hint}")
        return value

    def correct(self, note: str = "") -> None:
        print(f"exercise {self.number}: correct" + (f"; {note}" if note else ""))
