"""Acceptance 2 of issue 9: the import-linter contracts hold, and an upward import breaks them.

Each case copies the package and ``pyproject.toml`` (which holds the contracts) into a temporary
folder, adds one forbidden import to the copy, and runs the real ``lint-imports`` there (it puts its
working directory first on ``sys.path``, so the copy is what it analyses).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

BROKEN = {
    "layers": "Layers: entry points above stages, stages above models, models above data and config",
    "operator": "The operator stays light: no stage, model or deep-learning library",
    "circles": "No import circles between sibling modules, at any depth",
}


def copy_project(dest: Path) -> Path:
    shutil.copytree(ROOT / "deepspec", dest / "deepspec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def add_line(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", encoding="utf-8")


def broken_contracts(output: str) -> set[str]:
    flat = " ".join(output.split())  # lint-imports wraps long contract names
    return {key for key, name in BROKEN.items() if re.search(re.escape(name) + r" BROKEN", flat)}


def test_the_clean_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = lint_imports(copy_project(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "named", "contract"),
    [
        # The data library importing a stage (an upward import; it also closes a circle, as most
        # upward imports do, which the circles contract reports as well).
        ("deepspec/data/template.py", "import deepspec.eval.report", "deepspec.eval.report", "layers"),
        # The recipe schema importing the recipe command, lazily inside a function: still upward.
        (
            "deepspec/config.py",
            "def _late() -> None:\n    from deepspec.recipe_cli import run",
            "deepspec.recipe_cli",
            "layers",
        ),
        # The operator importing torch or a stage (allowed by the layers, not by the operator's contract).
        ("deepspec/operator/__init__.py", "import torch", "torch", "operator"),
        ("deepspec/operator/__init__.py", "import deepspec.train", "deepspec.train", "operator"),
        # A heavy module of a package the operator may otherwise use (eval's engine imports torch).
        ("deepspec/operator/__init__.py", "import deepspec.eval.engine", "torch", "operator"),
        # The import circle issue 9 removed: the regeneration workers importing the runner again.
        (
            "deepspec/regenerate/workers.py",
            "from deepspec.regenerate.runner import regenerate",
            ".workers -> .runner",
            "circles",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, named: str, contract: str
) -> None:
    project = copy_project(tmp_path)
    add_line(project / module, line)
    result = lint_imports(project)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = broken_contracts(result.stdout)
    assert contract in broken, result.stdout
    assert broken <= {contract, "circles"}, result.stdout  # nothing unrelated breaks
    assert named in result.stdout


def test_make_test_runs_the_contracts() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "$(VENV)/bin/lint-imports" in target
