"""The package's import graph has no cycle, counting the imports inside functions (a lazy import that dodges a
cycle at load time is still one: the two modules cannot be understood, or moved, apart)."""

from __future__ import annotations

import ast
from pathlib import Path

import sarl

SRC = Path(sarl.__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "sarl").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its source}."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                names = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[module].update(n for n in names if n in modules and n != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "sarl.model.sarl" in graph["sarl.model.factory"]  # from .sarl import SARLModel
    assert "sarl.model.model_config" in graph["sarl.model.checkpoint"]


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_only_what_runs_training_imports_the_train_adapter():
    """``platform.train`` is the Ray Train adapter: commands that train import it, nobody imports it for a helper
    (cluster helpers are ``platform.cluster``, a run's files ``platform.runs``, rank helpers ``model.distributed``)."""
    importers = {m for m, imported in import_graph().items() if "sarl.platform.train" in imported}
    assert importers == {"sarl.cli.train", "sarl.platform.protocol", "sarl.platform.tune"}
