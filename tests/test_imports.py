"""The package's import graph has no cycles, lazy (function-level) imports included: a cycle hidden
by a lazy import is still two modules that cannot be read, tested or moved apart (REVIEW: build <->
trt/onnx_vision through BuildError, weights <-> embedded, text <-> vision through RMSNorm)."""

from __future__ import annotations

import ast
from pathlib import Path

import g3export

ROOT = Path(g3export.__file__).parent


def _graph() -> dict[str, set[str]]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = ("g3export", *p.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("g3export"):
                target = node.module
            else:
                continue
            for t in (target, *(f"{target}.{a.name}" for a in node.names)):
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_no_import_cycles():
    graph = _graph()
    assert "g3export.export.manifest" in graph and graph["g3export.export.build"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
