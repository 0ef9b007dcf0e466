"""The package's shape: no import cycles, spec commands without torch, modules a reader can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlgate"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    # Every mlgate module ``path`` imports, at module level or inside functions (a lazy import that
    # dodges a cycle is still one).
    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlgate"):
            found |= {owner(f"{node.module}.{a.name}") if f"{node.module}.{a.name}" in modules else owner(node.module)
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {owner(a.name) for a in node.names if a.name.startswith("mlgate")}
    return found - {None}


def test_no_module_imports_itself_back():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    cycles = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if reaches(b, a))
    assert cycles == []


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


@pytest.mark.parametrize("command", [["validate", "studies/gradient_balancing.yaml", "studies/paper/adapt_table2.yaml"],
                                     ["list"], ["schema"]])
def test_spec_commands_run_with_torch_unimportable(command):
    code = ("import sys; sys.modules['torch'] = None; "  # import torch now raises ImportError
            "from mlgate.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, *command], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout
