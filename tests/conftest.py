"""Shared pytest setup: the Triton interpreter on machines without a GPU, and a loud line when the
Triton backend was not under test.

TRITON_INTERPRET is read when a kernel is decorated (at import of mosaic_kernels.triton), so it
is set here, before any test module imports kernels. An explicit value in the environment wins.

Without the interpreter (``TRITON_INTERPRET=0`` on a CPU machine) or without triton, every
Triton test skips, and a green run would hide that the Triton kernels were never run. So the
session header names the Triton backend's state, and the terminal summary ends with a
"Triton backend NOT under test" section that counts the skipped Triton tests and why. That is
loud but not fatal: a CPU machine without triton is a legitimate setup for the rest of the
suite. Set ``MOSAIC_REQUIRE_TRITON=1`` (CI, GPU checks) to make those skips fail the session.
"""

from __future__ import annotations

import collections
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REQUIRE_TRITON_ENV = "MOSAIC_REQUIRE_TRITON"
# A skip of a Triton test: a [triton] backend parameter, or a reason about the Triton backend
# itself ("triton: <why>", "triton backend unavailable here", importorskip of the kernels).
_TRITON_PARAM = re.compile(r"[\[-]triton[\]-]")
_TRITON_REASON = re.compile(r"^(Skipped: )?triton\b|triton backend|mosaic_kernels\.triton|TRITON_INTERPRET", re.I)
_triton_skips: list[tuple[str, str]] = []


def _triton_backend_state() -> tuple[bool, str]:
    try:
        import mosaic_kernels as mk

        info = mk.backends("cuda" if torch.cuda.is_available() else "cpu")["triton"]
    except Exception as exc:  # noqa: BLE001 - the header must not break the session
        return False, f"mosaic_kernels did not import ({type(exc).__name__}: {exc})"
    return info["available"], info["reason"]


def pytest_report_header(config) -> list[str]:
    ok, reason = _triton_backend_state()
    mode = os.environ.get("TRITON_INTERPRET", "<unset>")
    state = "under test" if ok else f"NOT under test: {reason}"
    return [f"mosaic_kernels triton backend: {state} (TRITON_INTERPRET={mode})"]


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_runtest_logreport(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if _TRITON_PARAM.search(report.nodeid) or _TRITON_REASON.search(reason):
        _triton_skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_sessionfinish(session, exitstatus) -> None:
    if _triton_skips and os.environ.get(REQUIRE_TRITON_ENV) == "1" and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _triton_skips:
        return
    tr = terminalreporter
    tr.section("Triton backend NOT under test", sep="!", red=True, bold=True)
    tr.line(f"{len(_triton_skips)} Triton test(s) were skipped: the Triton kernels did not run in this session.",
            red=True, bold=True)
    for reason, n in collections.Counter(r for _, r in _triton_skips).most_common(4):
        tr.line(f"  {n:4d} x {reason}")
    if os.environ.get(REQUIRE_TRITON_ENV) == "1":
        tr.line(f"{REQUIRE_TRITON_ENV}=1: the session fails because of these skips.", red=True)
    else:
        tr.line("On a CPU machine leave TRITON_INTERPRET unset (or 1) to run them through the interpreter; "
                f"set {REQUIRE_TRITON_ENV}=1 to make these skips fail the run.")
