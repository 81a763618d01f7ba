"""Compiling for a GPU that is not there: the pieces `compile_check.py` is built from.

- a stand-in Triton driver whose target is ``GPUTarget("cuda", 90 | 80, 32)``, and
  :func:`compile_only`, which turns every JIT launch into a compile-only warmup and captures the
  compiled kernel;
- ``ptxas -v`` of a kernel's PTX (registers, spills, static shared memory) and the Hopper
  instructions in it (wgmma, TMA bulk tensor copies);
- the nvcc compile of ``csrc/*.cu`` with the flags of the real build.

Imports only the standard library at module level (Triton and torch inside the functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Card:
    """A card family: what Triton and nvcc compile for it, and its per-block shared memory."""

    capability: int
    triton_arch: str  # what Triton's NVIDIA backend emits for this capability
    nvcc_arch: str  # what the real build (TORCH_CUDA_ARCH_LIST "8.0;9.0") emits
    smem_limit: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin
    name: str


HOPPER = Card(90, "sm_90a", "sm_90", 232448, "H100/H200 (227 KB smem per block)")
AMPERE = Card(80, "sm_80", "sm_80", 166912, "A100 (163 KB smem per block)")
ARCHS = {"sm_90a": HOPPER, "sm_90": HOPPER, "sm_80": AMPERE}
SMEM_LIMIT = {c.capability: c.smem_limit for c in (HOPPER, AMPERE)}




def parse_archs(values: Iterable[str]) -> list[Card]:
    """Cards named by ``--arch`` values (repeatable, comma lists), in order, without repeats."""
    cards: list[Card] = []
    for value in values:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name not in ARCHS:
                raise argparse.ArgumentTypeError(f"unknown arch {name!r}, expected one of {sorted(ARCHS)}")
            if ARCHS[name] not in cards:
                cards.append(ARCHS[name])
    return cards


# ---------------------------------------------------------------------------------------------
# Triton: a stand-in driver and compile-only launches
# ---------------------------------------------------------------------------------------------


class StandInDriver:
    """The few driver calls a JIT launch makes before compiling, answered for a fixed target.

    ``JITFunction.run`` asks the active driver for the current device and stream, and (once per
    device) for the target; the compile itself needs nothing else. The device id is the
    capability, so each target gets its own entry in every kernel's ``device_caches``. Anything
    else (loading a binary, launching) raises, so a real launch can never slip through.
    """

    def __init__(self, capability: int):
        self.capability = capability

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.capability, 32)

    def get_current_device(self) -> int:
        return self.capability

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return divmod(self.capability, 10)

    @staticmethod
    def is_active() -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def __getattr__(self, name: str):
        raise AttributeError(f"compile-only stand-in driver (sm_{self.capability}) has no {name!r}: nothing may run")


@dataclasses.dataclass
class Capture:
    """One JIT launch turned into a warmup: the kernel function, its meta-args, the result."""

    fn_name: str
    meta: dict[str, Any]
    kernel: Any = None
    error: str | None = None


def _launch_meta(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The scalar keyword arguments of a launch (constexprs, num_warps, num_stages)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif type(v).__name__ == "dtype":  # tl dtype constexpr, e.g. OUT_DTYPE
            out[k] = str(v)
    return out


def _tma_ok_for(card: Card) -> Callable[..., bool]:
    """The launchers' ``tma_ok`` as the target card would answer it.

    The layout clauses (2-D, unit last stride, 16-byte aligned base and row stride) are the TMA
    hardware rules and hold for CPU tensors as for CUDA ones; the device clause is the card's
    capability (TMA from 9.0 on) instead of the CPU tensor's device.
    """

    def tma_ok(*tensors) -> bool:
        for t in tensors:
            if t.dim() != 2 or t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
                return False
        return card.capability >= 90

    return tma_ok


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def compile_only(card: Card) -> Iterator[list[Capture]]:
    """Make every Triton JIT launch a compile-only warmup for ``card``; yield the captures.

    - the stand-in driver becomes Triton's active driver (restored afterwards);
    - ``JITFunction.run`` is called with ``warmup=True`` (compile, cache, never launch) and the
      compiled kernel (or the compile error, memoized per kernel and meta-args) is captured;
    - the launchers' ``launch_checks`` (which refuse CPU tensors outside the interpreter) is
      a no-op, and ``tma_ok`` answers for the card (see :func:`_tma_ok_for`).
    """
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import mosaic_kernels.triton  # noqa: F401 - loads every launcher module

    captures: list[Capture] = []
    failed: dict[tuple, str] = {}
    original_run = JITFunction.run

    def run(self, *args, grid=None, warmup=False, **kwargs):
        meta = _launch_meta(kwargs)
        fail_key = (id(self), card.capability, tuple(sorted(meta.items())),
                    tuple(str(getattr(a, "dtype", type(a).__name__)) for a in args))
        if fail_key in failed:
            captures.append(Capture(self.fn.__name__, meta, error=failed[fail_key]))
            raise RuntimeError(failed[fail_key])
        try:
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - compile failures are data
            failed[fail_key] = f"{type(exc).__name__}: {exc}"[:4000]
            captures.append(Capture(self.fn.__name__, meta, error=failed[fail_key]))
            raise
        if hasattr(kernel, "result"):  # Triton's async compile mode hands back a future
            kernel = kernel.result()
        captures.append(Capture(self.fn.__name__, meta, kernel=kernel))
        return kernel

    prev_active = getattr(driver, "_active", None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(JITFunction, "run", run))
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not mod_name.startswith("mosaic_kernels.triton"):
                continue
            if hasattr(mod, "launch_checks"):
                stack.enter_context(_patched(mod, "launch_checks", lambda *a, **k: None))
            if hasattr(mod, "tma_ok"):
                stack.enter_context(_patched(mod, "tma_ok", _tma_ok_for(card)))
        driver.set_active(StandInDriver(card.capability))
        try:
            yield captures
        finally:
            if hasattr(driver, "_active"):
                driver._active = prev_active
            else:  # pragma: no cover - a Triton without DriverConfig._active
                with contextlib.suppress(Exception):
                    driver.reset_active()


# ---------------------------------------------------------------------------------------------
# PTX and ptxas
# ---------------------------------------------------------------------------------------------

_FUNC_RE = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers(.*)")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """``{function: {registers, stack_bytes, spill_stores, spill_loads, static_smem_bytes}}``.

    ptxas prints, per entry function: "Compiling entry function 'f' for 'sm_xx'", then
    "N bytes stack frame, S bytes spill stores, L bytes spill loads" and
    "Used R registers, [used B barriers, ][X bytes smem, ]...".
    """
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _FUNC_RE.search(line):
            current = out.setdefault(m.group(1), {"registers": 0, "stack_bytes": 0, "spill_stores": 0,
                                                  "spill_loads": 0, "static_smem_bytes": 0})
        elif current is not None and (m := _SPILL_RE.search(line)):
            current.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _USED_RE.search(line)):
            current["registers"] = int(m.group(1))
            if s := _SMEM_RE.search(m.group(2)):
                current["static_smem_bytes"] = int(s.group(1))
    return out


def triton_ptxas() -> str | None:
    """Path of the ptxas Triton compiles with (its bundled one unless overridden), or None."""
    with contextlib.suppress(Exception):
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(90).path
        except TypeError:  # older signature without the arch
            return get_ptxas().path
    with contextlib.suppress(Exception):
        from triton import knobs

        return knobs.nvidia.ptxas.path
    with contextlib.suppress(Exception):
        import triton.backends.nvidia as nv

        path = Path(nv.__file__).parent / "bin" / "ptxas"
        if path.exists():
            return str(path)
    return None


def _run_retrying_exec(cmd: list[str], attempts: int = 4, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` that retries when the process could not be started at all.

    Seen in CI: one ``execve`` of ptxas out of ~100 failed with ``OSError: [Errno 14] Bad
    address`` while the main thread was compiling (a sandboxed kernel's spawn race). That is a
    failure to start, not a ptxas verdict, so it is retried; a ptxas that runs and fails is not.
    """
    for attempt in range(attempts):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, **{"timeout": 300, **kwargs})
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def run_ptxas(ptxas: str, ptx: str, arch: str) -> dict[str, Any]:
    """``ptxas -v`` of one PTX module for ``arch``: the parsed figures of its (single) kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = _run_retrying_exec([ptxas, "-lineinfo", "-v", f"--gpu-name={arch}", str(src), "-o", str(src) + ".o"])
    if proc.returncode != 0:
        return {"ptxas_error": (proc.stderr or proc.stdout)[-2000:]}
    funcs = parse_ptxas_log(proc.stderr + proc.stdout)
    if not funcs:
        return {"ptxas_error": "no entry function in ptxas output"}
    return next(iter(funcs.values()))


def ptx_features(ptx: str) -> dict[str, Any]:
    """Hopper instructions in the PTX: warpgroup MMA and TMA bulk tensor copies."""
    return {
        "ptx_target": (m.group(1) if (m := re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE)) else None),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "tma_bulk_tensor": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
    }



def _uses_descriptors(kernel: Any) -> bool:
    """Whether a compiled kernel takes tensor descriptors (the TMA variants)."""
    sig = getattr(getattr(kernel, "src", None), "signature", None) or {}
    return any("tensordesc" in str(v) for v in sig.values())


def _has_tensor_descriptors() -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def triton_unavailable() -> str | None:
    """Why Triton cannot cross-compile here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.driver import driver
    except ImportError as exc:
        return f"triton with GPUTarget is not importable ({exc}); Triton >= 3.0 needed"
    if not hasattr(driver, "set_active"):
        return "triton.runtime.driver has no set_active (Triton >= 3.0 needed)"
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as exc:
        return f"Triton's NVIDIA backend is not importable ({exc})"
    return None


# ---------------------------------------------------------------------------------------------
# CUDA C++ check
# ---------------------------------------------------------------------------------------------

# The device-code flags of the real build: CMake Release (-O3 -DNDEBUG), CMAKE_CUDA_STANDARD 20,
# CMakeLists.txt (-lineinfo, -Icsrc) and torch's Caffe2 CMake config (the two --expt flags).
NVCC_FLAGS = ("-O3", "-DNDEBUG", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "--expt-extended-lambda")


def find_nvcc() -> str | None:
    """nvcc as setup.py finds it: $CUDACXX, $CUDA_HOME/bin/nvcc, /usr/local/cuda, then PATH."""
    candidates = [os.environ.get("CUDACXX")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    candidates.append(shutil.which("nvcc"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _demangle(names: list[str], nvcc: str) -> dict[str, str]:
    """Mangled -> readable names (cu++filt next to nvcc, else c++filt, else unchanged)."""
    tool = next((t for t in (str(Path(nvcc).resolve().parent / "cu++filt"), shutil.which("cu++filt"),
                             shutil.which("c++filt")) if t and os.path.exists(t)), None)
    if not tool or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    return dict(zip(names, lines)) if proc.returncode == 0 and len(lines) == len(names) else {n: n for n in names}


def nvcc_compile(nvcc: str, source: Path, arch: str) -> tuple[str, int, str]:
    """``nvcc -Xptxas -v --cubin`` of one .cu for one arch: (source, returncode, log)."""
    env = dict(os.environ)
    env.setdefault("CUDA_HOME", str(Path(nvcc).resolve().parent.parent))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *NVCC_FLAGS, f"-I{REPO / 'csrc'}", "-Xptxas", "-v", "--cubin", f"-arch={arch}",
               str(source), "-o", str(Path(tmp) / "k.cubin")]
        proc = _run_retrying_exec(cmd, env=env, timeout=600)
    return str(source.relative_to(REPO)), proc.returncode, proc.stderr + proc.stdout


def cuda_check(cards: list[Card], log: Callable[[str], None]) -> tuple[list, list]:
    """Compile csrc/*.cu for each card's nvcc arch; one record per kernel instantiation."""
    nvcc = find_nvcc()
    if nvcc is None:
        return [], ["cuda: nvcc not found (set CUDA_HOME or CUDACXX)"]
    sources = sorted((REPO / "csrc").glob("*.cu"))
    jobs = [(src, card) for card in cards for src in sources]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: (job[1], *nvcc_compile(nvcc, job[0], job[1].nvcc_arch)), jobs))
    records = []
    for card, source, rc, text in results:
        if rc != 0:
            records.append({"kind": "cuda", "source": source, "kernel": None, "arch": card.nvcc_arch,
                            "capability": card.capability, "ok": False, "error": text[-4000:]})
            continue
        funcs = parse_ptxas_log(text)
        names = _demangle(list(funcs), nvcc)
        for mangled, res in funcs.items():
            records.append({"kind": "cuda", "source": source, "kernel": names[mangled], "mangled": mangled,
                            "arch": card.nvcc_arch, "capability": card.capability, "ok": True, "error": None,
                            **res, "spill_bytes": max(res["spill_stores"], res["spill_loads"])})
    log(f"nvcc: {len(jobs)} compiles, {len(records)} kernels in {time.perf_counter() - t0:.1f} s")
    return records, []


def nvcc_version(nvcc: str | None) -> str | None:
    if not nvcc:
        return None
    with contextlib.suppress(Exception):
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        return (re.search(r"release ([\d.]+)", out) or re.search(r"(V[\d.]+)", out)).group(1)
    return None
