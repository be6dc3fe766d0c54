"""Checkers for the chapters' exercises: ``chNN.check_N(answer_N)`` says ✓ or what is wrong.

Each chapter module (:mod:`~detr_edu.exercises.ch01` ... :mod:`~detr_edu.exercises.ch08`) computes
the right answer itself, from the package and torch, and raises
:class:`~detr_edu.exercises.checking.ExerciseError` with a hint when an answer is missing or wrong.
The reference answers live outside the package, in ``notebooks/solutions/``.
"""
