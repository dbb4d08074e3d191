"""The package's layering is checked, not hoped for: import-linter's layers contract (setup.cfg) and no import cycles.

Each check also runs on a copy of the package with a planted violation, so a check that cannot fail would show.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp") if __name__ != "__main__" else __import__("grimp")

ROOT = Path(__file__).resolve().parents[1]


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's setup.cfg, on the ``reasonknee3d`` found under ``package_parent``."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'setup.cfg')!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=package_parent, capture_output=True, text=True,
                          env={"PYTHONPATH": str(package_parent), "PATH": ""}, timeout=120)


def import_cycles(package_parent: Path) -> list[list[str]]:
    """Groups of modules that import each other in the ``reasonknee3d`` under ``package_parent``, computed in a
    fresh interpreter (this one has the repository's package imported already)."""
    result = subprocess.run([sys.executable, __file__], cwd=package_parent, capture_output=True, text=True,
                            env={"PYTHONPATH": str(package_parent), "PATH": ""}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _cycles_here() -> list[list[str]]:
    """Strongly connected components (more than one module) of the import graph of the importable
    ``reasonknee3d``: imports inside functions included, ``TYPE_CHECKING`` imports excluded."""
    graph = grimp.build_graph("reasonknee3d", cache_dir=None, exclude_type_checking_imports=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package where ``models/chat.py`` imports the trainer (upward) and ``boxes.py`` imports
    ``answer`` (which imports ``boxes``: a cycle)."""
    parent = tmp_path_factory.mktemp("planted")
    shutil.copytree(ROOT / "reasonknee3d", parent / "reasonknee3d", ignore=shutil.ignore_patterns("__pycache__"))
    with open(parent / "reasonknee3d" / "models" / "chat.py", "a") as fh:
        fh.write("\nfrom ..training import trainer  # planted upward import\n")
    with open(parent / "reasonknee3d" / "boxes.py", "a") as fh:
        fh.write("\nfrom . import answer  # planted cycle\n")
    return parent


def test_the_layers_contract_holds() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "reasonknee3d layers KEPT" in result.stdout


def test_the_layers_contract_catches_a_planted_upward_import(planted: Path) -> None:
    result = _lint(planted)
    assert result.returncode != 0
    assert "reasonknee3d layers BROKEN" in result.stdout
    assert "reasonknee3d.models.chat -> reasonknee3d.training.trainer" in result.stdout


def test_no_import_cycles() -> None:
    assert import_cycles(ROOT) == []


def test_the_cycle_check_catches_a_planted_cycle(planted: Path) -> None:
    assert ["reasonknee3d.answer", "reasonknee3d.boxes"] in import_cycles(planted)


if __name__ == "__main__":
    print(json.dumps(_cycles_here()))
