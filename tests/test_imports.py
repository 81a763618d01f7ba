"""The import graph of ``mosaicdiff``, ``mosaic_kernels``, ``benchmarks`` and ``scripts`` has no
circle, runs down the layers only, and every module imports on its own.

The graph is read from the source (every ``import``, at module level or inside a function: a
lazy import back up is still a circle in the design). A package ``__init__`` is a node only for
the names it defines itself; ``from pkg import sub`` where ``sub`` is a submodule is an edge to
``pkg.sub``. Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``: those are edges
too (unless the importer lives inside that package, whose ``__init__`` has run already).
``mosaicdiff/__init__.py`` re-exports lazily, so its own edges are not followed.

Layers, bottom up (a module imports from its own layer's package or lower layers only):
``mosaic_kernels`` < ``core`` < ``method``, ``zoo`` < ``families`` < ``api`` < ``eval`` <
``search`` < ``app`` < ``__main__`` < ``benchmarks`` < ``scripts``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
ROOTS = {"mosaicdiff": REPO / "python" / "mosaicdiff", "mosaic_kernels": REPO / "mosaic_kernels",
         "benchmarks": REPO / "benchmarks", "scripts": REPO / "scripts"}
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
            elif isinstance(node, ast.Call) and _literal_import_module(node):
                targets = [node.args[0].value]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, None, mod, is_pkg)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                t = _script_module(t, mod, mods)
                while t and t not in mods:  # `import a.b.c` names module a.b.c (or a parent)
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
                    graph[mod].update(_package_inits(t, mod, mods))
    return graph


def _literal_import_module(node: ast.Call) -> bool:
    """``import_module("a.b")`` / ``importlib.import_module("a.b")`` with a literal name: an import."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return (name == "import_module" and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str))


#: Folders of scripts that import their siblings by bare name (run with the folder on sys.path).
SCRIPT_ROOTS = ("benchmarks", "scripts")


def _script_module(name: str, importer: str, mods: dict[str, Path]) -> str:
    """A bare ``import suite_common`` in benchmarks/ or scripts/ names a sibling file (scripts put
    benchmarks/ on sys.path too): resolved to ``benchmarks.suite_common``."""
    root = importer.split(".")[0]
    if root not in SCRIPT_ROOTS or name.split(".")[0] in ROOTS:
        return name
    for folder in (root, *SCRIPT_ROOTS):
        if f"{folder}.{name}" in mods or f"{folder}.{name.split('.')[0]}" in mods:
            return f"{folder}.{name}"
    return name


def _package_inits(target: str, importer: str, mods: dict[str, Path]) -> set[str]:
    """The package ``__init__`` modules importing `target` runs, but not those `importer` is inside."""
    parts = target.split(".")
    inits = {".".join(parts[:i]) for i in range(1, len(parts))}
    own = {importer.rsplit(".", i)[0] for i in range(importer.count(".") + 1)}
    return {p for p in inits if p in mods and p not in own and p not in LAZY_REEXPORTERS}


#: Layer of each top-level package of ``mosaicdiff`` (and of the other roots); see the docstring.
LAYERS = {"mosaic_kernels": 0, "mosaicdiff._version": 0, "mosaicdiff.core": 1, "mosaicdiff.method": 2,
          "mosaicdiff.zoo": 2, "mosaicdiff.families": 3, "mosaicdiff.api": 4, "mosaicdiff.calibrate": 4,
          "mosaicdiff": 4, "mosaicdiff.eval": 5, "mosaicdiff.search": 6, "mosaicdiff.app": 7,
          "mosaicdiff.__main__": 8, "benchmarks": 9, "scripts": 10}


def layer_of(module: str) -> tuple[int, str]:
    """``(layer, package)`` of a module: its longest prefix listed in `LAYERS`."""
    parts = module.split(".")
    for i in range(min(len(parts), 2), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key], key
    raise KeyError(f"{module} is in no layer: add its package to LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of another package of the same layer."""
    bad = []
    for mod, deps in sorted(graph.items()):
        own, pkg = layer_of(mod)
        for dep in sorted(deps):
            level, dep_pkg = layer_of(dep)
            if level > own or (level == own and dep_pkg != pkg and dep_pkg != "mosaicdiff._version"):
                bad.append(f"{mod} -> {dep}")
    return bad


def test_layer_checker_sees_an_upward_import():
    assert upward_imports({"mosaicdiff.core.model": {"mosaicdiff.families.dit.model"}}) == [
        "mosaicdiff.core.model -> mosaicdiff.families.dit.model"]
    assert upward_imports({"mosaicdiff.method.obs": {"mosaicdiff.zoo.data"}})  # same layer, other package
    assert upward_imports({"mosaicdiff.families.dit.model": {"mosaicdiff.core.model"}}) == []


def test_imports_run_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_a_family_imports_no_other_family():
    crossing = [f"{m} -> {d}" for m, deps in import_graph().items() if m.startswith("mosaicdiff.families.")
                for d in deps if d.startswith("mosaicdiff.families.") and d.split(".")[2] != m.split(".")[2]]
    assert crossing == []


def test_bare_sibling_imports_of_scripts_are_edges():
    mods = {"benchmarks.suite_e2e": Path(), "benchmarks.gpu_suite": Path(), "scripts.x": Path()}
    assert _script_module("gpu_suite", "benchmarks.suite_e2e", mods) == "benchmarks.gpu_suite"
    assert _script_module("suite_e2e", "scripts.x", mods) == "benchmarks.suite_e2e"
    assert _script_module("numpy", "benchmarks.suite_e2e", mods) == "numpy"
    assert _script_module("gpu_suite", "mosaicdiff.api", mods) == "gpu_suite"


def test_the_registry_imports_every_family():
    graph = import_graph()
    assert {"mosaicdiff.families.dit", "mosaicdiff.families.unet"} <= graph["mosaicdiff.families"]


def test_package_init_edges_are_counted():
    """`a.x` importing `a.b.c` runs `a.b`'s __init__ (an edge); it does not rerun `a`'s."""
    mods = {"a": Path("a/__init__.py"), "a.b": Path("a/b/__init__.py"), "a.b.c": Path("a/b/c.py"), "a.x": Path()}
    assert _package_inits("a.b.c", "a.x", mods) == {"a.b"}
    assert _package_inits("a.b.c", "a.b.d", mods) == set()


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


def test_only_family_blocks_import_kernel_ops_and_only_the_runtime_kernel_configs():
    graph = import_graph()
    ops = sorted(m for m, deps in graph.items() if m.startswith("mosaicdiff")
                 and any(d == "mosaic_kernels.ops" or d.startswith("mosaic_kernels.ops.") for d in deps))
    assert all(m.startswith("mosaicdiff.families.") and m.endswith(".blocks") or m.endswith(".producers")
               or m.endswith(".model") or m == "mosaicdiff.core.gemm" for m in ops), ops
    configs = sorted(m for m, deps in graph.items() if m.startswith("mosaicdiff") and "mosaic_kernels.configs" in deps)
    assert configs == ["mosaicdiff.core.runtime"], configs


def test_kernels_do_not_import_the_application():
    up = {m: sorted(d for d in deps if d.startswith("mosaicdiff"))
          for m, deps in import_graph().items() if m.startswith("mosaic_kernels")}
    assert not {m: d for m, d in up.items() if d}


#: Run in one subprocess: the third-party libraries load once, then each module is imported in a
#: fresh fork of that process (our packages not yet imported), so a module that imports only
#: through another one's side effects, or through a partly initialised package, fails alone.
_FORK_IMPORTER = r"""
import json, os, sys, traceback
import numpy, torch, safetensors, diffusers, diffusers.models, scipy.linalg  # the heavy, foreign part
try:
    import triton
except ImportError:
    pass
results = {}
for module in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            __import__(module)
            code, msg = 0, b""
        except BaseException:
            code, msg = 1, traceback.format_exc()[-1500:].encode()
        os.write(w, msg)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    results[module] = [os.waitstatus_to_exitcode(status), msg]
print(json.dumps(results))
"""


def import_each_alone(modules: list[str]) -> dict[str, tuple[int, str]]:
    """``module -> (exit code, traceback)`` of importing each module alone (see `_FORK_IMPORTER`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "python"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _FORK_IMPORTER, json.dumps(modules)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {m: tuple(v) for m, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def test_the_import_check_sees_a_module_that_fails_alone(tmp_path, monkeypatch):
    (tmp_path / "broken_alone.py").write_text("import json\nraise ImportError('needs a side effect')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = import_each_alone(["broken_alone", "json"])
    assert result["json"][0] == 0 and result["broken_alone"][0] != 0
    assert "needs a side effect" in result["broken_alone"][1]


def test_every_module_imports_alone():
    mods = sorted(m for m in _modules()
                  if not m.endswith("__main__") and m.split(".")[0] in ("mosaicdiff", "mosaic_kernels"))
    failed = [(m, err) for m, (rc, err) in import_each_alone(mods).items() if rc != 0]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed)
