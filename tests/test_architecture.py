"""The house rules of issue 10, checked on the source tree: dependencies run one way (no
scmf_loader module imports scmf_shards, even inside a function), no import cycle in or
between the packages (module level or lazy), no module over 500 lines, no function over 60."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scmf_loader", "scmf_shards")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            out[".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _resolve(name: str, alias: str | None = None) -> str | None:
    if alias and f"{name}.{alias}" in MODULES:
        return f"{name}.{alias}"
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """Our modules imported by ``path`` anywhere (functions included), except under
    ``if TYPE_CHECKING``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] in PACKAGES:
                found.update(t for a in child.names if (t := _resolve(child.module, a.name)))
            elif isinstance(child, ast.Import):
                found.update(t for a in child.names
                             if a.name.split(".")[0] in PACKAGES and (t := _resolve(a.name)))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles_and_the_loader_never_imports_the_converter() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        graph[name] = {t for t in _imports(path) if t != name}
    back = sorted((m, t) for m, ts in graph.items() for t in ts
                  if m.startswith("scmf_loader") and t.startswith("scmf_shards"))
    assert back == []
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_module_and_function_sizes() -> None:
    big_modules, big_functions = [], []
    for path in MODULES.values():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            big_modules.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_function and node.end_lineno - node.lineno + 1 > 60:
                big_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert big_modules == []
    assert big_functions == []
