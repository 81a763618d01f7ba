"""Every third-party package the shipped code imports is declared in setup.py's install requirements
(pyproject.toml reads them from there): a package that is only there because another one pulls it
in (scipy by scikit-learn, Pillow by matplotlib) may vanish with that package's next release."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"PIL": "Pillow", "sklearn": "scikit-learn"}
#: Imported, not declared on purpose: torch is pinned by setup.py itself (`torch_requirement`);
#: triton comes with torch's Linux wheels (and the Triton kernels are optional elsewhere).
PROVIDED = {"torch", "triton"}
FIRST_PARTY = {"mosaicdiff", "mosaic_kernels"}


def _imported() -> dict[str, str]:
    """Top-level third-party module -> a file importing it, over the shipped packages."""
    found = {}
    for folder in (ROOT / "python" / "mosaicdiff", ROOT / "mosaic_kernels"):
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    """The distribution names of setup.py's RUNTIME_REQUIRES (read, not run)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "RUNTIME_REQUIRES" for t in node.targets):
            specs = ast.literal_eval(node.value)
            break
    else:
        pytest.fail("setup.py has no RUNTIME_REQUIRES list")
    return {spec.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
            for spec in specs}


def test_every_imported_package_is_declared():
    declared = _declared()
    missing = {f"{DISTRIBUTIONS.get(m, m)} (imported by {where})" for m, where in _imported().items()
               if m not in PROVIDED and DISTRIBUTIONS.get(m, m).lower() not in declared}
    assert not missing, f"imported but not in setup.py RUNTIME_REQUIRES: {sorted(missing)}"
