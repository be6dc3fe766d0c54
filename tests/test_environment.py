"""environment.yml (for conda users) must name the same dependencies as pyproject.toml, and the
README's commands must be the ones CI runs."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI names
CONDA_TO_PYPI = {"pytorch": "torch"}


def _name_and_spec(requirement: str) -> tuple[str, str]:
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement)
    assert match, requirement
    return match.group(1).lower().replace("_", "-"), match.group(2).replace(" ", "")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return dict(_name_and_spec(r) for r in reqs)


def _environment_yml() -> tuple[str, dict[str, str], list[str]]:
    """A tiny reader for our environment.yml: (python spec, conda deps, pip lines). No YAML library
    is a project dependency, and the file is kept in this simple form on purpose."""
    python, conda, pip, in_pip, section = "", {}, [], False, ""
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line.startswith(" ") and line.endswith(":"):
            section = line[:-1]
            continue
        if section != "dependencies":
            continue
        item = re.match(r"^(\s*)-\s+(.*)$", line)
        if line.strip() == "- pip:":
            in_pip = True
            continue
        if item is None:
            in_pip = False
            continue
        indent, value = len(item.group(1)), item.group(2).strip().strip('"')
        if in_pip and indent > 2:
            pip.append(value)
            continue
        in_pip = False
        name, spec = _name_and_spec(value.replace("=", "==", 1) if re.match(r"^python=\d", value) else value)
        if name == "python":
            python = spec
        elif name != "pip":
            conda[CONDA_TO_PYPI.get(name, name)] = spec
    return python, conda, pip


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    python, conda, pip = _environment_yml()
    assert conda == _pyproject_requirements()
    assert python.startswith("==3.1"), python
    assert any(".[dev]" in line and line.startswith("-e") for line in pip), pip


def test_python_requirement_admits_the_environment_python():
    # 3.11: the course's Python (README, environment.yml), and the first with tomllib (used here)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"] == "py311"


def test_readme_package_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    modules = sorted(p.name for p in (ROOT / "detr_edu").glob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if f"`{m}`" not in readme]
    assert not missing, f"README's package map does not mention {missing}"


def test_readme_install_and_test_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r'^INSTALL="(.*)"$', ci, re.M).group(1)
    test = re.search(r'^TEST="(.*)"$', ci, re.M).group(1)
    assert f"{install} && .venv/bin/jupyter lab notebooks/" in readme
    assert test in readme
