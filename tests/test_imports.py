"""The import graph of ``mosaicdiff`` and ``mosaic_kernels`` has no circle, and every module
imports on its own.

The graph is read from the source (every ``import``, at module level or inside a function: a
lazy import back up is still a circle in the design). A package ``__init__`` is a node only for
the names it defines itself; ``from pkg import sub`` where ``sub`` is a submodule is an edge to
``pkg.sub``. ``mosaicdiff/__init__.py`` re-exports lazily, so its own edges are not followed.
"""

from __future__ import annotations

import ast
import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"mosaicdiff": REPO / "python" / "mosaicdiff", "mosaic_kernels": REPO / "mosaic_kernels"}
LAZY_REEXPORTERS = {"mosaicdiff"}  # package __init__s whose imports run only on attribute access


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, root in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root.parent).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(module: str, level: int, name: str | None, current: str, is_pkg: bool) -> str:
    if level == 0:
        return module
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        if mod in LAZY_REEXPORTERS:
            continue
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, None, mod, is_pkg)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import a.b.c` names module a.b.c (or a parent)
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of size > 1 (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_sees_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20 and any(graph.values()), "the walk found no modules or no imports"
    assert find_cycles(graph) == []


def test_kernels_do_not_import_the_application():
    up = {m: sorted(d for d in deps if d.startswith("mosaicdiff"))
          for m, deps in import_graph().items() if m.startswith("mosaic_kernels")}
    assert not {m: d for m, d in up.items() if d}


def _import_alone(module: str) -> tuple[str, int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "python"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                          env=env, timeout=300)
    return module, proc.returncode, proc.stderr[-1500:]


def test_every_module_imports_alone():
    mods = sorted(m for m in _modules() if not m.endswith("__main__"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failed = [(m, err) for m, rc, err in pool.map(_import_alone, mods) if rc != 0]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed)
