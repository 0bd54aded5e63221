"""The package's layering, checked on the source: no import cycles, and the lower layers (config,
data, models, training) never import a capability (privacy, fairness, distill, attacks) or
evaluation. Lazy imports inside functions count too: they are cycles all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import trustml

ROOT = Path(trustml.__file__).parent
LOWER = ("trustml.config", "trustml.data", "trustml.models", "trustml.training")
UPPER = ("trustml.privacy", "trustml.fairness", "trustml.distill", "trustml.attacks",
         "trustml.evaluation", "trustml.runner", "trustml.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("trustml", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

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
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_lower_layers_never_import_capabilities_or_evaluation():
    bad = [f"{m} -> {t}" for m, targets in _graph().items() if m.startswith(LOWER)
           for t in sorted(targets) if t.startswith(UPPER)]
    assert bad == []
