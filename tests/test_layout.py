"""The package's shape: no import cycles (deferred imports included), a light config, short modules and
functions. These are the properties that let a new stage or backbone be added in one place."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "platform" / "sidrec"
MAX_MODULE_LINES = 600  # config.py, the one schema of every option, is the longest by design
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the sidrec modules it imports anywhere in its body (function-level imports too)."""
    files = _modules()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t.startswith("sidrec") and t not in (m, "sidrec"):
                    graph[m].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_relative_imports_are_not_used():  # the graph above reads absolute imports only
    for f in _modules().values():
        assert not [n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.ImportFrom) and n.level], f


@pytest.mark.parametrize("module", ["sidrec.config", "sidrec.cli", "sidrec"])
def test_light_modules_import_neither_torch_nor_transformers(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} loads {out.stdout.strip()}"


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for m, f in _modules().items():
        text = f.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(m)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{m}.{node.name}")
    assert long_modules == [] and long_functions == []


def test_no_module_reaches_into_another_modules_private_names():
    files = _modules()
    bad = []
    for m, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sidrec"):
                bad += [f"{m}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert bad == []
