"""Compile-only resource check of every mosaic_kernels kernel for H100/H200 and A100, no GPU needed.

Triton can compile for a GPU that is not there: this script installs a stand-in Triton driver
whose target is ``GPUTarget("cuda", 90 | 80, 32)``, turns every JIT launch into a compile-only
warmup, and calls the public launchers (``mosaic_kernels.triton.<op>_triton(..., config=cfg)``)
on CPU tensors at DiT-XL/2 shapes (C=1152; 16*256 and 64*256 tokens; fc1/fc2 at the dense and
stage widths of the 0.3 and 0.5 mosaics, see MLP_WIDTHS). The checks therefore follow whatever
the launchers do (which kernel, which constexprs, TMA or pointer loop). Pointer arguments only
feed Triton's specialization through ``data_ptr() % 16`` and the dtype, so CPU tensors give the
same compile as CUDA tensors (``torch.empty`` never touches the pages: no memory is used).

Configs: :func:`mosaic_kernels.configs.default_config`, every Triton entry of
:func:`~mosaic_kernels.configs.candidate_configs`, and the shipped table config that
:func:`~mosaic_kernels.configs.get_config` resolves for an H100 (``configs/h100.json``, compiled
for sm_90a) and an A100 (``configs/a100.json``, sm_80), with the autotune cache switched off.
GEMM configs whose backend is ``vendor`` are compiled too (their tiles are shipped). Identical
(kernel, specialization) compiles are recorded once, with every (config source, shape) using them.

Per compiled kernel: shared memory (Triton's metadata, what Triton checks against the device's
opt-in limit at load), registers and spill bytes (``ptxas -v`` of Triton's own ptxas on the PTX,
for the arch Triton compiled), whether the PTX uses ``wgmma`` and TMA bulk tensor copies
(``cp.async.bulk.tensor``). The CUDA C++ kernels in ``csrc/*.cu`` are compiled with
``nvcc -Xptxas -v`` with the flags of the real build (CMakeLists.txt + torch's CMake config).

Arches: Triton compiles capability 9.0 as sm_90a (always, wgmma/TMA allowed) and 8.0 as sm_80;
the real nvcc build uses TORCH_CUDA_ARCH_LIST "8.0;9.0", i.e. sm_90 and sm_80. So ``--arch``
names a card family: ``sm_90a`` and ``sm_90`` both mean Triton sm_90a + nvcc sm_90.

    python benchmarks/compile_check.py                          # sm_90a + sm_80, table, JSON
    python benchmarks/compile_check.py --arch sm_90a --json out.json --no-cuda
    python benchmarks/compile_check.py --ops linear_gelu \\
        --extra 'linear_gelu={"BLOCK_M":256,"BLOCK_N":256,"BLOCK_K":128,"num_warps":8,"num_stages":4}'

Exit status is non-zero only when the script itself crashes (or 2 for bad arguments); compile
failures and over-limit resources are data (``--strict`` makes :func:`problems` findings fail the run).
Tests: tests/kernels/test_compile_check.py.

Tried with Triton 3.6.0 and 3.8.0 (same results but for a few bytes of GEMM spills on sm_80).
Older releases are untested: the script looks for what it uses (``GPUTarget``,
``driver.set_active``, ``JITFunction.run(..., warmup=True)``; ``triton.tools.tensor_descriptor``
for the TMA variants) and reports a skip reason when one is missing. On a machine with a real
GPU the stand-in still forces the target, so any card checks both families.

Measured runtime (2-core CPU shared with other jobs, Triton 3.8, bf16, sm_90a + sm_80, nvcc on;
110 distinct Triton kernels, 48 CUDA kernel instantiations): 83 s wall (57 s CPU) with a cold
Triton cache, 28 s with a warm one (~/.triton/cache). Triton 3.6: 52-76 s cold.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import platform
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
# Targets and shapes
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Card:
    """A card family: what Triton and nvcc compile for it, and its per-block shared memory."""

    capability: int
    triton_arch: str  # what Triton's NVIDIA backend emits for this capability
    nvcc_arch: str  # what the real build (TORCH_CUDA_ARCH_LIST "8.0;9.0") emits
    smem_limit: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin
    table: str  # shipped config table of the family
    name: str


HOPPER = Card(90, "sm_90a", "sm_90", 232448, "h100", "H100/H200 (227 KB smem per block)")
AMPERE = Card(80, "sm_80", "sm_80", 166912, "a100", "A100 (163 KB smem per block)")
ARCHS = {"sm_90a": HOPPER, "sm_90": HOPPER, "sm_80": AMPERE}
SMEM_LIMIT = {c.capability: c.smem_limit for c in (HOPPER, AMPERE)}

ROW_OPS = ("ln_modulate", "gated_residual", "gated_residual_ln_modulate")
GEMM_OPS = ("linear_gelu", "linear_gated_residual")
OPS = ROW_OPS + GEMM_OPS

WIDTH = 1152  # DiT-XL/2 hidden size
TOKENS = 256  # 32x32 latent, patch 2
BATCHES = (16, 64)
# The widths a DiT-XL/2 mosaic really runs (MosaicDiT.stage_kernel_shapes of the default divide +
# allocate at mean sparsity 0.3: 13 / 10 heads, MLP 3776 / 2752; at 0.5: 10 / 6 heads, 2816 / 1856).
MLP_WIDTHS = (4608, 3776, 2816, 2752, 1856)  # dense, then the stages' kept MLP widths
PROJ_INPUTS = (1152, 936, 720, 432)  # attention proj K = kept heads * 72: 16, 13, 10, 6 heads

_DTYPES = ("bf16", "fp16", "fp32")


def op_shapes(op: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(role, canonical shape)`` of ``op`` at DiT-XL/2 sizes: (B, L, D) or (M, N, K)."""
    if op in ROW_OPS:
        return [("row", (b, TOKENS, WIDTH)) for b in BATCHES]
    out = []
    for b in BATCHES:
        m = b * TOKENS
        if op == "linear_gelu":
            out += [("fc1", (m, n, WIDTH)) for n in MLP_WIDTHS]
        else:
            out += [("fc2", (m, WIDTH, k)) for k in MLP_WIDTHS]
            out += [("proj", (m, WIDTH, k)) for k in PROJ_INPUTS]
    return out


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
# Configs and launches
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _as_family(device_token: str) -> Iterator[None]:
    """Resolve configs as on ``device_token`` (e.g. "H100"), without the user's autotune cache.

    :func:`mosaic_kernels.configs.get_config` names the device through the module's
    ``device_name`` and reads ``$MOSAIC_KERNELS_CACHE``: both are redirected, the memo is
    cleared before and after, so the shipped table decides exactly as on that card.
    """
    from mosaic_kernels import configs

    with tempfile.TemporaryDirectory() as tmp, _patched(configs, "device_name", lambda device: device_token):
        old_env = os.environ.get(configs.CACHE_ENV)
        os.environ[configs.CACHE_ENV] = str(Path(tmp) / "absent.json")
        configs.clear_memo()
        try:
            yield
        finally:
            configs.clear_memo()
            if old_env is None:
                os.environ.pop(configs.CACHE_ENV, None)
            else:
                os.environ[configs.CACHE_ENV] = old_env


def _is_triton_config(op: str, cfg: dict[str, Any]) -> bool:
    """GEMM configs without tiles (``{"backend": "vendor"}``) have no Triton kernel to compile."""
    return op in ROW_OPS or "BLOCK_M" in cfg


def configs_for(op: str, shape: tuple[int, ...], dtype, card: Card,
                extra: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """``(source, config)`` pairs to compile for one op, shape and card."""
    import torch

    from mosaic_kernels import configs

    out = [("default", configs.default_config(op, shape, dtype, torch.device("cpu")))]
    out += [(f"candidate{i}", c) for i, c in enumerate(configs.candidate_configs(op, shape, dtype))]
    with _as_family(card.table.upper()):
        out.append((f"table:{card.table}", configs.get_config(op, shape, dtype, torch.device("cpu"))))
    out += [("extra", dict(c)) for c in extra.get(op, [])]
    return [(src, cfg) for src, cfg in out if _is_triton_config(op, cfg)]


def launch(op: str, shape: tuple[int, ...], dtype, cfg: dict[str, Any]) -> None:
    """Call the public launcher of ``op`` on uninitialized CPU tensors of ``shape``."""
    import torch

    import mosaic_kernels.triton as mt

    def t(*s: int):
        return torch.empty(*s, dtype=dtype)

    if op in ROW_OPS:
        B, L, D = shape
        if op == "ln_modulate":
            mt.ln_modulate_triton(t(B, L, D), t(B, D), t(B, D), 1e-6, config=cfg)
        elif op == "gated_residual":
            mt.gated_residual_triton(t(B, L, D), t(B, D), t(B, L, D), config=cfg)
        else:
            mt.gated_residual_ln_modulate_triton(t(B, L, D), t(B, D), t(B, L, D), t(B, D), t(B, D), 1e-6, config=cfg)
        return
    M, N, K = shape
    if op == "linear_gelu":
        mt.linear_gelu_triton(t(M, K), t(N, K), t(N), config=cfg)
    else:
        B = M // TOKENS
        mt.linear_gated_residual_triton(t(B, TOKENS, K), t(N, K), t(N), t(B, N), t(B, TOKENS, N), config=cfg)


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


# ---------------------------------------------------------------------------------------------
# Triton check
# ---------------------------------------------------------------------------------------------


def _uses_descriptors(kernel: Any) -> bool:
    """Whether a compiled kernel takes tensor descriptors (the TMA variants)."""
    sig = getattr(getattr(kernel, "src", None), "signature", None) or {}
    return any("tensordesc" in str(v) for v in sig.values())


def _base_record(op: str, card: Card, cap: Capture, dtype_name: str) -> dict[str, Any]:
    return {"kind": "triton", "op": op, "kernel": cap.fn_name, "arch": card.triton_arch,
            "capability": card.capability, "dtype": dtype_name, "launch_meta": cap.meta,
            "sources": [], "shapes": [], "ok": cap.error is None, "error": cap.error}


def _kernel_record(rec: dict[str, Any], kernel: Any) -> dict[str, Any]:
    md = kernel.metadata
    rec.update(
        kernel=md.name, hash=kernel.hash, shared_bytes=int(md.shared), num_warps=int(md.num_warps),
        num_stages=int(md.num_stages), tensor_descriptors=_uses_descriptors(kernel),
        **ptx_features(kernel.asm["ptx"]))
    return rec


def triton_check(cards: list[Card], ops: Iterable[str], dtype_names: Iterable[str],
                 extra: dict[str, list[dict[str, Any]]], log: Callable[[str], None]) -> tuple[list, list]:
    """Compile every kernel for every card; return ``(records, skipped)``.

    ptxas runs in a worker thread while the next kernel compiles (it is a separate process, so
    the two use two cores; one worker keeps up with the compiles).
    """
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    ptxas = triton_ptxas()
    skipped = [] if ptxas else ["ptxas: Triton's NVIDIA backend has no ptxas; registers/spills not measured"]
    records: dict[tuple, dict[str, Any]] = {}
    futures: dict[tuple, tuple[concurrent.futures.Future, tuple[str, str, str]]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        for card in cards:
            t0 = time.perf_counter()
            with compile_only(card) as captures:
                for op in ops:
                    for dname in dtype_names:
                        for role, shape in op_shapes(op):
                            for source, cfg in configs_for(op, shape, dtypes[dname], card, extra):
                                start = len(captures)
                                try:
                                    launch(op, shape, dtypes[dname], cfg)
                                except Exception as exc:  # noqa: BLE001 - recorded below
                                    if len(captures) == start:  # failed before any kernel: launcher error
                                        captures.append(Capture("<launcher>", {"config": cfg},
                                                                error=f"{type(exc).__name__}: {exc}"[:4000]))
                                for cap in captures[start:]:
                                    key = ((card.capability, cap.kernel.hash) if cap.kernel is not None else
                                           (card.capability, op, cap.fn_name, dname, str(sorted(cap.meta.items()))))
                                    rec = records.get(key)
                                    if rec is None:
                                        rec = records[key] = _base_record(op, card, cap, dname)
                                        if cap.kernel is not None:
                                            _kernel_record(rec, cap.kernel)
                                            if ptxas:
                                                ptx_args = (ptxas, cap.kernel.asm["ptx"], card.triton_arch)
                                                futures[key] = (pool.submit(run_ptxas, *ptx_args), ptx_args)
                                    if source not in rec["sources"]:
                                        rec["sources"].append(source)
                                    if [role, list(shape)] not in rec["shapes"]:
                                        rec["shapes"].append([role, list(shape)])
                captures.clear()
            n = sum(1 for k in records if k[0] == card.capability)
            log(f"triton {card.triton_arch}: {n} distinct kernels in {time.perf_counter() - t0:.1f} s")
        for key, (fut, ptx_args) in futures.items():
            try:
                try:
                    res = fut.result()
                except OSError:  # could not start even after retries: once more, with no compile beside it
                    res = run_ptxas(*ptx_args)
            except Exception as exc:  # noqa: BLE001 - e.g. a ptxas timeout: data, not a crash
                res = {"ptxas_error": f"{type(exc).__name__}: {exc}"}
            rec = records[key]
            rec.update(res)
            if "ptxas_error" not in res:
                rec["spill_bytes"] = max(res["spill_stores"], res["spill_loads"])
    if not _has_tensor_descriptors():
        skipped.append("TMA variants: triton.tools.tensor_descriptor missing (Triton >= 3.4 needed)")
    return list(records.values()), skipped


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


# ---------------------------------------------------------------------------------------------
# Checks (shared with tests/kernels/test_compile_check.py)
# ---------------------------------------------------------------------------------------------


def _describe(rec: dict[str, Any]) -> str:
    if rec.get("kind") == "cuda":
        return f"{rec['source']}:{rec.get('kernel')} [{rec['arch']}]"
    return f"{rec['op']}:{rec['kernel']} [{rec['arch']}] {rec.get('launch_meta', {})}"


def compile_failures(records: Iterable[dict[str, Any]]) -> list[str]:
    """Records that did not compile (Triton or nvcc) or that ptxas rejected."""
    out = []
    for r in records:
        if not r.get("ok", False):
            out.append(f"{_describe(r)}: {(r.get('error') or '?').splitlines()[0][:300]}")
        elif r.get("ptxas_error"):
            out.append(f"{_describe(r)}: ptxas: {r['ptxas_error'].splitlines()[0][:300]}")
    return out


def smem_over_limit(records: Iterable[dict[str, Any]]) -> list[str]:
    """Kernels whose shared memory (dynamic + static) exceeds their card's per-block opt-in limit."""
    out = []
    for r in records:
        limit = SMEM_LIMIT.get(r.get("capability"))
        used = int(r.get("shared_bytes", 0)) + int(r.get("static_smem_bytes", 0))
        if r.get("ok") and limit is not None and used > limit:
            out.append(f"{_describe(r)}: {used} B shared memory > {limit} B")
    return out


def gemm_without_wgmma(records: Iterable[dict[str, Any]]) -> list[str]:
    """Hopper GEMM kernels (bf16/fp16) that do not use warpgroup MMA."""
    return [f"{_describe(r)}: no wgmma in the PTX" for r in records
            if r.get("kind") == "triton" and r.get("ok") and r["op"] in GEMM_OPS and r["capability"] == 90
            and r.get("dtype") in ("bf16", "fp16") and not r.get("wgmma")]


def tma_without_bulk_copies(records: Iterable[dict[str, Any]]) -> list[str]:
    """Hopper tensor-descriptor kernels whose PTX has no TMA bulk tensor copy."""
    return [f"{_describe(r)}: no cp.async.bulk.tensor in the PTX" for r in records
            if r.get("kind") == "triton" and r.get("ok") and r.get("tensor_descriptors")
            and r["capability"] == 90 and not r.get("tma_bulk_tensor")]


def spilling(records: Iterable[dict[str, Any]], kind: str, ops: Iterable[str] | None = None) -> list[str]:
    """Kernels of ``kind`` ("triton" or "cuda"; Triton ones limited to ``ops``) that spill."""
    ops = set(ops) if ops is not None else None
    return [f"{_describe(r)}: spills {r.get('spill_stores')} B stores / {r.get('spill_loads')} B loads"
            for r in records
            if r.get("kind") == kind and r.get("ok") and (ops is None or r.get("op") in ops)
            and r.get("spill_bytes", 0) > 0]


def missing_coverage(records: Iterable[dict[str, Any]], capabilities: Iterable[int],
                     ops: Iterable[str] = OPS) -> list[str]:
    """(op, card) pairs without a compiled kernel, and Hopper GEMMs without a TMA variant.

    Guards the check itself: a launcher change that stopped compiling something (or stopped
    reaching the TMA path) would otherwise pass every other rule vacuously.
    """
    records = [r for r in records if r.get("kind") == "triton" and r.get("ok")]
    out = []
    for cap in capabilities:
        for op in ops:
            mine = [r for r in records if r["op"] == op and r["capability"] == cap]
            if not mine:
                out.append(f"{op} [capability {cap}]: no kernel compiled")
            elif op in GEMM_OPS and cap >= 90 and not any(r.get("tensor_descriptors") for r in mine):
                out.append(f"{op} [capability {cap}]: no tensor-descriptor (TMA) kernel compiled")
    return out


def problems(report: dict[str, Any]) -> dict[str, list[str]]:
    """Every rule's findings on a report (empty lists when all is well)."""
    tri, cu = report.get("triton", []), report.get("cuda", [])
    triton_skipped = any(s.startswith("triton:") for s in report.get("skipped", []))
    caps = [] if triton_skipped else [c["capability"] for c in report.get("meta", {}).get("cards", [])]
    return {
        "compile_failures": compile_failures(tri + cu),
        "smem_over_limit": smem_over_limit(tri + cu),
        "gemm_without_wgmma": gemm_without_wgmma(tri),
        "tma_without_bulk_copies": tma_without_bulk_copies(tri),
        "row_kernel_spills": spilling(tri, "triton", ROW_OPS),
        "cuda_kernel_spills": spilling(cu, "cuda"),
        "missing_coverage": missing_coverage(tri, caps, report.get("meta", {}).get("ops", OPS)),
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _span(values: list[int]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _flag(values: list[bool]) -> str:
    return "yes" if all(values) else "no" if not any(values) else "some"


def summary_table(report: dict[str, Any]) -> str:
    """One line per (arch, op, kernel): compiles, smem max (KB), registers, spills, wgmma, TMA."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in report.get("triton", []):
        groups.setdefault((r["arch"], r["op"], r["kernel"]), []).append(r)
    for r in report.get("cuda", []):  # one line per .cu file: its template instantiations together
        kernels = {x.get("kernel") for x in report["cuda"] if x["source"] == r["source"] and x["arch"] == r["arch"]}
        groups.setdefault((r["arch"], "cuda:" + Path(r["source"]).stem, f"{len(kernels)} instantiations"),
                          []).append(r)
    head = (f"{'arch':7} {'op':31} {'kernel':34} {'ok':>7} {'smem KB':>8} {'regs':>8} {'spill B':>8} "
            f"{'wgmma':>5} {'TMA':>5}")
    lines = [head, "-" * len(head)]
    for (arch, op, kernel), rs in sorted(groups.items()):
        ok = [r for r in rs if r.get("ok")]
        smem = max((r.get("shared_bytes", 0) + r.get("static_smem_bytes", 0) for r in ok), default=None)
        lines.append(
            f"{arch:7} {op:31} {kernel[:34]:34} {len(ok):>3}/{len(rs):<3} "
            f"{(f'{smem / 1024:.1f}' if smem is not None else '-'):>8} "
            f"{_span([r.get('registers') for r in ok]):>8} {_span([r.get('spill_bytes') for r in ok]):>8} "
            f"{(_flag([bool(r.get('wgmma')) for r in ok]) if rs[0]['kind'] == 'triton' else '-'):>5} "
            f"{(_flag([bool(r.get('tma_bulk_tensor')) for r in ok]) if rs[0]['kind'] == 'triton' else '-'):>5}")
    return "\n".join(lines)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def parse_extra(values: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """``--extra OP=JSON`` values -> {op: [config, ...]}."""
    out: dict[str, list[dict[str, Any]]] = {}
    for v in values:
        op, sep, text = v.partition("=")
        if not sep or op not in OPS:
            raise argparse.ArgumentTypeError(f"--extra wants OP=JSON with OP in {OPS}, got {v!r}")
        out.setdefault(op, []).append(json.loads(text))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", default=None,
                   help="sm_90a | sm_90 | sm_80, repeatable or comma-separated (default: sm_90a,sm_80)")
    p.add_argument("--json", type=Path, default=None, help="write the full report here (atomically)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of ops (default: all of {','.join(OPS)})")
    p.add_argument("--dtype", action="append", default=None, choices=_DTYPES, help="operand dtype (default bf16)")
    p.add_argument("--extra", action="append", default=[], metavar="OP=JSON",
                   help="compile one more config for OP (e.g. to check a tile before shipping it)")
    cuda = p.add_mutually_exclusive_group()
    cuda.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                      help="compile csrc/*.cu with nvcc (default: when nvcc is found)")
    cuda.add_argument("--no-cuda", dest="cuda", action="store_false")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--strict", action="store_true", help="exit 1 when a check of problems() has findings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Kernels must be decorated for real compilation: TRITON_INTERPRET is read when
    # mosaic_kernels.triton is first imported, which happens below.
    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0") and "mosaic_kernels.triton" in sys.modules:
        raise SystemExit("mosaic_kernels.triton was imported under TRITON_INTERPRET=1; run this script on its own")
    sys.path.insert(0, str(REPO))
    try:
        cards = parse_archs(args.arch or ["sm_90a,sm_80"])
        extra = parse_extra(args.extra)
    except (argparse.ArgumentTypeError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    ops = [o for o in filter(None, (s.strip() for s in args.ops.split(","))) if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"unknown ops {bad}, expected {OPS}")
    dtype_names = args.dtype or ["bf16"]
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    t0 = time.perf_counter()
    report: dict[str, Any] = {"triton": [], "cuda": [], "skipped": []}
    if args.no_triton:
        report["skipped"].append("triton: --no-triton")
    elif (reason := triton_unavailable()) is not None:
        report["skipped"].append(f"triton: {reason}")
    else:
        report["triton"], skipped = triton_check(cards, ops, dtype_names, extra, log)
        report["skipped"] += skipped
    if args.cuda is not False:
        if args.cuda is None and find_nvcc() is None:
            report["skipped"].append("cuda: nvcc not found (set CUDA_HOME or CUDACXX)")
        else:
            report["cuda"], skipped = cuda_check(cards, log)
            report["skipped"] += skipped
    report["meta"] = _meta(cards, ops, dtype_names, time.perf_counter() - t0)
    findings = problems(report)
    report["problems"] = findings

    print(summary_table(report))
    for reason in report["skipped"]:
        print(f"skipped: {reason}")
    for rule, items in findings.items():
        for item in items[:20]:
            print(f"{rule}: {item}")
        if len(items) > 20:
            print(f"{rule}: ... {len(items) - 20} more")
    print(f"compile check: {len(report['triton'])} Triton kernels, {len(report['cuda'])} CUDA kernels, "
          f"{sum(map(len, findings.values()))} findings, {report['meta']['runtime_s']:.1f} s")
    if args.json is not None:
        write_json_atomic(args.json, report)
    return 1 if args.strict and any(findings.values()) else 0


def _meta(cards: list[Card], ops: list[str], dtype_names: list[str], runtime_s: float) -> dict[str, Any]:
    import torch

    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    with contextlib.suppress(Exception):
        import triton

        versions["triton"] = triton.__version__
    ptxas = None
    with contextlib.suppress(Exception):
        ptxas = triton_ptxas()
    if ptxas:
        with contextlib.suppress(Exception):
            out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
            versions["triton_ptxas"] = re.search(r"release ([\d.]+)", out).group(1)
    versions["nvcc"] = nvcc_version(find_nvcc())
    return {"cards": [dataclasses.asdict(c) for c in cards], "ops": ops, "dtypes": dtype_names,
            "versions": versions, "nvcc_flags": list(NVCC_FLAGS), "runtime_s": round(runtime_s, 2),
            "shapes": {op: op_shapes(op) for op in ops}}


if __name__ == "__main__":
    sys.exit(main())
