"""The chapters' exercises: every checker accepts the reference solution, rejects the unfilled cells
of the committed notebooks with "not answered", and rejects the usual wrong answers.

Reference: the solutions in ``notebooks/solutions/`` (written as a learner fills the cells) and,
for the wrong answers, the mistakes each exercise's hint warns about. The notebooks are read with
nbformat, never executed.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import math
import re
from pathlib import Path

import nbformat
import pytest
import torch

from detr_edu.exercises import checking
from detr_edu.exercises.checking import ExerciseError

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NUMBERS = [p.name[:2] for p in CHAPTERS]
CHECK_CALL = re.compile(r"^ch(\d\d)\.(check_\d+)\((.*)\)$")


def _solutions(nn: str):
    spec = importlib.util.spec_from_file_location(
        f"solutions_ch{nn}", ROOT / "notebooks" / "solutions" / f"ch{nn}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _module(nn: str):
    return importlib.import_module(f"detr_edu.exercises.ch{nn}")


def _checkers(nn: str) -> list[str]:
    return sorted(n for n in vars(_module(nn)) if re.fullmatch(r"check_\d+", n))


def _cells(nn: str, tag: str) -> list[nbformat.NotebookNode]:
    nb = nbformat.read(next((ROOT / "notebooks").glob(f"{nn}_*.ipynb")), as_version=4)
    return [c for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def _check_calls(nn: str) -> dict[str, list[str]]:
    """checker name -> the names of its arguments, from the chapter's check cells."""
    calls = {}
    for cell in _cells(nn, "exercise-check"):
        match = CHECK_CALL.match(cell.source.strip())
        assert match and match.group(1) == nn, f"chapter {nn}: unexpected check cell {cell.source!r}"
        calls[match.group(2)] = [a.strip() for a in match.group(3).split(",")]
    return calls


# --- chapter state that some checkers take (what the chapter has computed by then) ---------------


def _chapter05_state() -> dict:
    """A scene whose best boxes have the wrong class: enough class weight moves the match."""
    from detr_edu.scenes import make_scene

    _, target = make_scene(seed=0, index=5)
    G = len(target["labels"])
    logits = torch.full((2 * G + 2, 10), -4.0)  # (Nq, K): two queries per object and two strays
    logits[torch.arange(G) * 2 + 1, target["labels"]] = 3.0  # the second query is sure of the class
    shift = torch.tensor([0.01, 0.0, 0.0, 0.0])
    boxes = torch.cat(
        [
            torch.stack([target["boxes"] + shift, target["boxes"] + 4 * shift], 1).flatten(0, 1),  # (2G, 4)
            torch.tensor([[0.1, 0.1, 0.05, 0.05], [0.9, 0.9, 0.05, 0.05]]),
        ]
    )
    return {"scene_logits": logits, "scene_boxes": boxes.clamp(0.02, 0.98), "target": target}


def _chapter08_state() -> dict:
    from detr_edu.export import load_shipped
    from detr_edu.logs import read_log

    results = ROOT / "benchmarks" / "results" / "train_budget"
    names = {"detr_cpu": "DETR", "deformable_detr_cpu": "Deformable DETR", "dino_cpu": "DINO"}
    return {
        "runs": {label: read_log(results / f"{preset}.jsonl") for preset, label in names.items()},
        "shipped": load_shipped()[0],
    }


STATE = {"05": _chapter05_state, "08": _chapter08_state}
_state_cache: dict[str, dict] = {}


def _state(nn: str) -> dict:
    if nn not in _state_cache:
        _state_cache[nn] = STATE[nn]() if nn in STATE else {}
    return _state_cache[nn]


def _run(nn: str, checker: str, answer) -> None:
    """Call ``chNN.check_N(answer, *chapter state)`` as the chapter's check cell does."""
    args = _check_calls(nn)[checker][1:]
    state = _state(nn)
    getattr(_module(nn), checker).strict(answer, *(state[a] for a in args))


def _exercise_is_function(nn: str, number: int) -> bool:
    return any(f"def answer_{number}(" in c.source for c in _cells(nn, "exercise"))


def _solution(nn: str, number: int):
    """The learner's value of answer_N: a solution written as a function of chapter state is called."""
    answer = getattr(_solutions(nn), f"answer_{number}")
    if callable(answer) and not _exercise_is_function(nn, number):
        state = _state(nn)
        return answer(*(state[p] for p in inspect.signature(answer).parameters))
    return answer


CASES = [(nn, c) for nn in NUMBERS for c in _checkers(nn)]


@pytest.mark.parametrize(("nn", "checker"), CASES, ids=[f"ch{nn}-{c}" for nn, c in CASES])
def test_the_solution_passes(nn: str, checker: str, capsys: pytest.CaptureFixture) -> None:
    number = int(checker.split("_")[1])
    _run(nn, checker, _solution(nn, number))
    assert capsys.readouterr().out.startswith(f"exercise {number}: correct")


@pytest.mark.parametrize(("nn", "checker"), CASES, ids=[f"ch{nn}-{c}" for nn, c in CASES])
def test_the_unfilled_cell_is_not_answered(nn: str, checker: str) -> None:
    number = int(checker.split("_")[1])
    (cell,) = [c for c in _cells(nn, "exercise") if re.search(rf"\banswer_{number}\b", c.source)]
    namespace = {"torch": torch, "math": math}
    exec(cell.source, namespace)  # the committed cell as a learner first runs it
    with pytest.raises(ExerciseError, match=rf"not answered yet: replace the \.\.\. in answer_{number}"):
        _run(nn, checker, namespace[f"answer_{number}"])


def _mask(rows: slice, cols: slice, image: int = 1) -> torch.Tensor:
    m = torch.zeros(2, 4, 6, dtype=torch.bool)
    m[image, rows, cols] = True
    return m


# The usual mistakes, two or more per exercise.
WRONG = {
    ("01", "check_1"): [lambda v: v[0], lambda v: v.mean(0), lambda v: v[0] + v[1]],
    ("01", "check_2"): [256 * 768 + 256 * 256, 256 * 768 + 768, 3 * (256 * 256 + 256)],
    ("01", "check_3"): [(2, 100), (2, 25, 38), (100, 950), (950, 2)],
    ("01", "check_4"): [4, 2, 8],
    ("02", "check_1"): [(2 / 9, 4 / 6), (4.5 / 6, 2.5 / 9), (2.5 / 9, 4 / 6)],
    ("02", "check_2"): [(0.25, 10.0), (4.5, 2.5), (4.5, 5.0)],
    ("02", "check_3"): [256 * 256 + 256, 256 * 256 + 256 * 128, 2 * (256 * 256 + 256)],
    ("02", "check_4"): [(2.0, 2.0), (3 * math.sqrt(0.5), 3 * math.sqrt(0.5)), (3.0, 0.0)],
    ("02", "check_5"): [
        _mask(slice(None), slice(4, None)),  # right values, (B, H, W) not flattened
        _mask(slice(2, None), slice(None)).flatten(1),  # the last two rows instead of columns
        _mask(slice(None), slice(4, None), image=0).flatten(1),  # the wrong image
        _mask(slice(None), slice(4, None)).transpose(1, 2).flatten(1),  # column-major tokens
        ~_mask(slice(None), slice(4, None)).flatten(1),  # True = valid
    ],
    ("03", "check_1"): [70 / 128, 4 / 8, 70 / 16 / 8],
    ("03", "check_2"): [256 + 3 * 8 + 2, 2 * 8 + 3, 256 + 2 * 16 + 3],
    ("03", "check_3"): [lambda F: F, lambda F: 1.0, lambda F: F // 4],
    ("03", "check_4"): [12.5 / 4, 12 * 4 / 13, 12.5 * 4 / 16],
    ("03", "check_5"): [2 * 340 * 2, 340 * 4 * 2, 2 * 340 * 4],
    ("04", "check_1"): [256, 16 * 16 + 8 * 8 + 4 * 4, 64],
    ("04", "check_2"): [0.4, 0.05 * 2**2 * 128, 0.05 * 2**3 * 100],
    ("04", "check_3"): [3, 100 / 32, 100 // 16],
    ("04", "check_4"): ["heads.bbox_embed.2", "decoder.layers.1", "heads.bbox_embed.0", "bbox_embed"],
    ("04", "check_5"): [(33540, 33540), (3 * 33540, 3 * 33540), (33540, 2 * 33540)],
    ("05", "check_1"): [
        lambda cost, add: False,
        lambda cost, add: True,
        lambda cost, add: bool(
            (
                torch.as_tensor(__import__("scipy.optimize").optimize.linear_sum_assignment(cost.numpy())[1])
                != torch.as_tensor(
                    __import__("scipy.optimize").optimize.linear_sum_assignment((cost + add).numpy())[1]
                )
            ).any()
        ),  # only the targets' order, not which queries are matched
    ],
    ("05", "check_2"): [
        lambda logits, labels, eos_coef=0.1: -logits.log_softmax(-1)[:, labels],  # no "no object" term
        lambda logits, labels, eos_coef=0.1: -logits.softmax(-1)[:, labels],  # DETR's -p approximation
        lambda logits, labels, eos_coef=0.1: (
            (-logits.log_softmax(-1)[:, labels] + eos_coef * logits.log_softmax(-1)[:, -1:]).T
        ),  # transposed
        lambda logits, labels, eos_coef=0.1: (
            -logits.log_softmax(-1)[:, labels] + 0.1 * logits.log_softmax(-1)[:, -1:]
        ),  # eos_coef ignored
    ],
    ("05", "check_3"): [100, 228 + 1, 359],
    ("06", "check_1"): [
        (0.25 * 0.25 + 11 * 0.75 * 0.25) * math.log(2) / 12,  # a mean over entries
        12 * 0.25 * 0.25 * math.log(2),  # alpha for the negatives too
        (0.25 + 11 * 0.25) * math.log(2),  # no alpha
    ],
    ("06", "check_2"): [0.0, 0.2, 1.2],
    ("06", "check_3"): [18, 7, 24],
    ("06", "check_4"): [0.2, 0.4, 1.0],
    ("07", "check_1"): [
        (8, 96, 900 * 900 + 8 * 12 * 12 + 96 * 900),  # forgot the negatives
        (16, 384, 900 * 900 + 16 * 24 * 24 + 384 * 900),  # 2 x dn_number // 12 groups
        (8, 192, 1092 * 1092 - (900 * 900 + 8 * 24 * 24 + 192 * 900)),  # the blocked entries
        (8, 192, 900 * 900 + 8 * 24 * 24),  # denoising -> matching forgotten
    ],
    ("07", "check_2"): [
        lambda g: g[:, None] != g[None, :],  # blocks denoising -> matching too
        lambda g: ~((g[None, :] >= 0) & (g[:, None] != g[None, :])),  # True = allowed
        lambda g: (g[:, None] >= 0) & (g[:, None] != g[None, :]),  # rows and columns swapped
    ],
    ("07", "check_3"): [1.0, 0.5, 0.97],
    ("07", "check_4"): [0.667, 0.0, 0.5],
    ("08", "check_1"): [(7392, 88704), (14786, 177432), (7393, 88716 + 1)],
}


def _wrong_05_4(state: dict) -> list:
    right = _solutions("05").answer_4(**state)
    assert right is not None, "the test's scene should have a class weight that changes the match"
    return [None, 0.0, right + 0.5, right - 0.5 if right > 0.5 else 10.0, 0.25]


def _wrong_08(state: dict) -> dict[str, list]:
    right = _solutions("08").answer_2(state["runs"])
    seconds = {k: None if v is None else v * 60 for k, v in right.items()}
    no_detr = {k: v for k, v in right.items() if k != "DETR"}
    zero_detr = {**right, "DETR": 0.0}
    last = {k: v + 1.0 if v is not None else None for k, v in right.items()}
    b32, fraction = _solutions("08").answer_3(state["shipped"])
    params = sum(p.numel() for p in state["shipped"].parameters())
    return {
        "check_2": [seconds, no_detr, zero_detr, last],
        "check_3": [(b32 // 2, fraction), (b32, 2 * fraction), (4 * params, fraction)],
    }


def _wrong(nn: str, checker: str) -> list:
    if (nn, checker) == ("05", "check_4"):
        return _wrong_05_4(_state("05"))
    if nn == "08" and checker in ("check_2", "check_3"):
        return _wrong_08(_state("08"))[checker]
    return WRONG[(nn, checker)]


@pytest.mark.parametrize(("nn", "checker"), CASES, ids=[f"ch{nn}-{c}" for nn, c in CASES])
def test_wrong_answers_are_rejected(nn: str, checker: str) -> None:
    wrongs = _wrong(nn, checker)
    assert len(wrongs) >= 2
    for wrong in wrongs:
        with pytest.raises(ExerciseError) as info:
            _run(nn, checker, wrong)
        assert "not answered" not in info.value.message, (wrong, info.value.message)
        assert len(info.value.message) > 30, f"say why: {info.value.message!r}"


@pytest.mark.parametrize("nn", NUMBERS)
def test_check_cells_call_exactly_the_chapters_checkers(nn: str) -> None:
    checks = _cells(nn, "exercise-check")
    assert not any("raises-exception" in c.metadata["tags"] for c in checks)  # a ✗ is printed, not raised
    assert all(c.outputs == [] or c.execution_count is not None for c in checks)
    calls = [CHECK_CALL.match(c.source.strip()).group(2) for c in checks]
    assert sorted(calls) == _checkers(nn) and len(set(calls)) == len(calls)
    assert len(calls) >= 3, "every chapter keeps at least three checkable exercises"
    for checker, args in _check_calls(nn).items():
        assert args[0] == f"answer_{checker.split('_')[1]}"


def _filled_answers(source: str) -> list[str]:
    """Names of answer_N that a cell assigns anything but ``...`` or defines with a real body."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    filled = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and re.fullmatch(r"answer_\d+|answer", t.id):
                    value = node.value
                    if not (isinstance(value, ast.Constant) and value.value is Ellipsis):
                        filled.append(t.id)
        elif isinstance(node, ast.FunctionDef) and re.fullmatch(r"answer_\d+", node.name):
            body = [
                s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            ]
            if body or not any(isinstance(s, ast.Expr) and s.value.value is Ellipsis for s in node.body):
                filled.append(node.name)
    return filled


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_chapter_cell_holds_a_reference_answer(chapter: Path) -> None:
    nb = nbformat.read(chapter, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not _filled_answers(cell.source), (
                f"{chapter.name}: a filled answer in {cell.source[:80]!r}"
            )
    exercise_cells = [
        c for c in nb.cells if c.cell_type == "code" and "exercise" in c.metadata.get("tags", [])
    ]
    # executed with the chapter, an unfilled answer cell shows nothing
    assert exercise_cells and all(c.outputs == [] for c in exercise_cells)
    for cell in exercise_cells:
        namespace = {"torch": torch, "math": math}
        exec(cell.source, namespace)
        answers = {k: v for k, v in namespace.items() if k.startswith("answer_")}
        assert answers
        for value in answers.values():
            if callable(value):  # a function whose body is still ... returns None whatever its input
                value = value(*([None] * len(inspect.signature(value).parameters)))
            assert checking.is_missing(value)


def test_the_filled_answer_detector_finds_answers() -> None:
    assert _filled_answers("answer_1 = 3\nanswer_2 = ...") == ["answer_1"]
    assert _filled_answers("def answer_1(v):\n    return v") == ["answer_1"]
    assert _filled_answers("def answer_1(v):\n    # your code here\n    ...") == []


def test_render_traceback_is_one_short_line() -> None:
    with pytest.raises(ExerciseError) as info:
        _run("01", "check_4", ...)
    lines = info.value._render_traceback_()
    assert 1 <= len(lines) <= 2 and sum(len(line) for line in lines) < 300
    assert lines[0] == "✗ Exercise 4 (chapter 01): not answered yet: replace the ... in answer_4"


def test_a_learners_exception_becomes_a_hint() -> None:
    with pytest.raises(ExerciseError, match="your answer_1 raised ZeroDivisionError"):
        _run("01", "check_1", lambda v: 1 / 0)


def test_nothing_in_the_package_imports_the_exercises() -> None:
    from test_architecture import import_graph

    graph = import_graph()
    for module, deps in graph.items():
        if not module.startswith("detr_edu.exercises"):
            assert not {d for d in deps if d.startswith("detr_edu.exercises")}, module


def test_a_check_cell_prints_the_cross_and_goes_on(capsys) -> None:
    from detr_edu.exercises import ch01

    assert ch01.check_4(...) is False
    assert capsys.readouterr().out.strip() == (
        "✗ Exercise 4 (chapter 01): not answered yet: replace the ... in answer_4"
    )
    assert ch01.check_4(_solution("01", 4)) is True
    assert capsys.readouterr().out.startswith("exercise 4: correct")
