"""The package's import graph: one direction, no cycle, ``config`` a leaf, no model importing another.

Reference: the ``import`` statements themselves, read with :mod:`ast` (function-level imports
included, so a cycle cannot hide inside a function body).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "detr_edu"
MODELS = {"detr_edu.detr", "detr_edu.deformable_detr", "detr_edu.dino"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every detr_edu module -> the detr_edu modules it imports (anywhere in its body)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("detr_edu"):
                if node.module == "detr_edu":  # from detr_edu import box_ops, train
                    deps |= {f"detr_edu.{a.name}" for a in node.names if f"detr_edu.{a.name}" in modules}
                else:
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("detr_edu")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_reader_sees_every_module() -> None:
    graph = import_graph()
    assert {"detr_edu.config", "detr_edu.build", "detr_edu.dino", "detr_edu.viz.forward"} <= set(graph)
    assert "detr_edu.dino" in graph["detr_edu.build"]  # the reader finds real edges


def test_no_import_cycle() -> None:
    assert _cycle(import_graph()) is None, f"import cycle: {' -> '.join(_cycle(import_graph()) or [])}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_config_is_a_leaf_and_models_do_not_import_models() -> None:
    graph = import_graph()
    assert graph["detr_edu.config"] == set()
    for model in MODELS:
        assert not graph[model] & (MODELS - {model}), f"{model} imports {graph[model] & MODELS}"
        assert "detr_edu.build" not in graph[model]


def test_denoising_lives_in_one_place() -> None:
    graph = import_graph()
    assert "detr_edu.dino" not in graph["detr_edu.denoising"]
    # training code never asks which model it holds
    for module in ("detr_edu.engine", "detr_edu.train"):
        assert not graph[module] & MODELS, f"{module} imports {graph[module] & MODELS}"
