"""Backend selection of the mosaic ops: pins, the auto order, the dispatch record.

Each op's custom-op body asks :func:`select_backend` which backend runs its inputs:

1. ``cuda``: the compiled extension ``torch.ops.mosaic_C.<op>`` (destination-passing), when it
   is loaded, the inputs are CUDA tensors, and the op declared a compiled kernel
   (:func:`declare_compiled_kernel`).
2. ``triton``: the Triton kernel in ``mosaic_kernels/triton/<op>.py``, for CUDA tensors, or CPU
   tensors when ``TRITON_INTERPRET=1`` was set before the kernels were imported (tests).
3. ``torch``: the plain definitions in :mod:`mosaic_kernels.reference`.

A skipped backend is logged once per (op, backend, reason). The GEMM ops choose in ``auto``
mode between the ``vendor`` path (cuBLAS(Lt) through torch, the default) and the Triton GEMM
per shape (:func:`gemm_path`, from :mod:`mosaic_kernels.configs`).

Pinning: ``MOSAIC_KERNELS_BACKEND=auto|cuda|triton|torch`` (read at every call), or the
:func:`use_backend` context manager, which takes precedence. A pinned backend that the op
implements but cannot run on these inputs raises ``RuntimeError`` naming the reason: a pin is
never silently replaced. An op without a compiled kernel follows the ``auto`` order under a
``cuda`` pin, logged once.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from .. import configs

logger = logging.getLogger("mosaic_kernels.ops")

__all__ = ["BACKEND_ENV", "backends", "current_backend", "record_dispatch", "select_backend", "use_backend"]

BACKEND_ENV = "MOSAIC_KERNELS_BACKEND"
BACKEND_NAMES = ("auto", "cuda", "triton", "torch")
GEMM_PATHS = ("vendor", "triton", "torch")

# Ops with a compiled kernel torch.ops.mosaic_C.<op>, declared by their op modules.
CUDA_OPS: set[str] = set()

_pinned: contextvars.ContextVar[str | None] = contextvars.ContextVar("mosaic_backend", default=None)
_forced_gemm_path: contextvars.ContextVar[str | None] = contextvars.ContextVar("mosaic_gemm_path", default=None)
_dispatch_log: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar(
    "mosaic_dispatch_log", default=None)
_logged: set[tuple[str, ...]] = set()


def declare_compiled_kernel(op: str) -> None:
    """Say that ``op`` has a compiled kernel ``torch.ops.mosaic_C.<op>`` (a ``cuda`` pin then means it)."""
    CUDA_OPS.add(op)


def log_once(key: tuple[str, ...], level: int, msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def _check_backend_name(name: str, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source}: expected one of {BACKEND_NAMES}, got {name!r}")
    return name


def current_backend() -> str:
    """The pinned backend: the innermost :func:`use_backend`, else ``$MOSAIC_KERNELS_BACKEND``.

    Returns:
        One of ``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"``.

    Raises:
        ValueError: if the environment variable holds another value.
    """
    pinned = _pinned.get()
    if pinned is not None:
        return pinned
    env = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    return _check_backend_name(env, BACKEND_ENV)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Pin the backend of every mosaic op called inside the ``with`` block (this thread/task).

    Args:
        name: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: for another name.

    Examples:
        >>> import torch, mosaic_kernels as mk
        >>> with mk.use_backend("torch"):
        ...     y = mk.ln_modulate(torch.randn(1, 2, 8), torch.zeros(1, 8), torch.zeros(1, 8))
    """
    token = _pinned.set(_check_backend_name(name, "use_backend"))
    try:
        yield
    finally:
        _pinned.reset(token)


@contextlib.contextmanager
def record_dispatch() -> Iterator[collections.Counter]:
    """Count which backend ran each op call inside the ``with`` block (this thread/task).

    Yields a ``Counter`` of ``(op, backend)``; GEMM ops report ``"vendor"`` for cuBLAS(Lt),
    ``attention`` its SDPA backend. Calls traced into a CUDA graph are counted once, at capture.

    Examples:
        >>> import torch, mosaic_kernels as mk
        >>> with mk.ops.record_dispatch() as calls:
        ...     _ = mk.ln_modulate(torch.randn(1, 2, 8), torch.zeros(1, 8), torch.zeros(1, 8))
        >>> sorted(calls)
        [('ln_modulate', 'torch')]
    """
    counter: collections.Counter = collections.Counter()
    token = _dispatch_log.set(counter)
    try:
        yield counter
    finally:
        _dispatch_log.reset(token)


def dispatched(op: str, backend: str) -> str:
    """Record that ``op`` runs on ``backend`` (in the active :func:`record_dispatch`); returns it."""
    log = _dispatch_log.get()
    if log is not None:
        log[(op, backend)] += 1
    return backend


@functools.lru_cache(maxsize=1)
def _cuda_extension() -> tuple[Any, str]:
    """(module, "") when the compiled extension loaded, else (None, reason). Cached."""
    from .._ext import load_extension

    try:
        module, reason = load_extension()
    except Exception as exc:  # noqa: BLE001 - load_extension must not raise; be defensive
        return None, f"load_extension() raised {type(exc).__name__}: {exc}"
    if module is None:
        return None, reason or "compiled extension not built"
    return module, ""


@functools.lru_cache(maxsize=1)
def triton_package() -> tuple[Any, str]:
    """(mosaic_kernels.triton, "") when Triton and the kernels import, else (None, reason)."""
    try:
        from .. import triton as triton_kernels
    except ImportError as exc:
        return None, f"triton is not importable ({exc})"
    return triton_kernels, ""


def _cuda_status(device: torch.device) -> tuple[bool, str]:
    module, reason = _cuda_extension()
    if module is None:
        return False, reason
    if device.type != "cuda":
        return False, f"inputs are on {device}, the compiled kernels need CUDA tensors"
    return True, ""


def _triton_status(device: torch.device) -> tuple[bool, str]:
    package, reason = triton_package()
    if package is None:
        return False, reason
    if device.type == "cuda":
        if package.INTERPRETED:
            return False, "the Triton kernels were built for the interpreter (TRITON_INTERPRET=1): CPU tensors only"
        return True, ""
    if device.type == "cpu":
        if package.INTERPRETED:
            return True, ""
        return False, (
            "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
            "mosaic_kernels.triton is first imported"
        )
    return False, f"no Triton backend for device type {device.type!r}"


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run tensors on ``device`` in this process."""
    return _triton_status(device)[0]


def cuda_inputs_status(op: str, main: torch.Tensor, *others: torch.Tensor) -> tuple[bool, str]:
    """Whether the compiled kernel takes these inputs: it is compiled for one dtype per call."""
    dtypes = {t.dtype for t in (main, *others)}
    if len(dtypes) > 1:
        return False, f"the compiled {op} needs one dtype for all inputs, got {sorted(map(str, dtypes))}"
    return True, ""


def select_backend(op: str, device: torch.device | str, cuda_inputs: tuple[bool, str] = (True, "")) -> str:
    """The backend ``op`` runs on for inputs on ``device`` under the current pin.

    Args:
        op: an op name, e.g. ``"ln_modulate"``.
        device: the inputs' device.
        cuda_inputs: ``(ok, reason)``: whether the compiled kernel accepts these inputs.

    Returns:
        ``"cuda"``, ``"triton"`` or ``"torch"``.

    Raises:
        RuntimeError: if a backend is pinned that ``op`` implements but cannot run here.
    """
    device = torch.device(device)
    pin = current_backend()
    if pin == "torch":
        return "torch"
    if pin == "cuda" and op not in CUDA_OPS:
        log_once(("nocuda", op), logging.INFO,
                 "%s has no compiled CUDA kernel; %s=cuda falls back to the auto order", op, BACKEND_ENV)
        pin = "auto"
    if pin in ("cuda", "triton"):
        ok, reason = (_cuda_status if pin == "cuda" else _triton_status)(device)
        if ok and pin == "cuda":
            ok, reason = cuda_inputs
        if not ok:
            raise RuntimeError(f"{op}: backend {pin!r} is pinned but unavailable: {reason}")
        return pin
    # auto
    if op in CUDA_OPS:
        ok, reason = _cuda_status(device)
        if ok:
            ok, reason = cuda_inputs
        if ok:
            return "cuda"
        log_once(("skip", op, "cuda", reason), logging.INFO, "%s: skipping cuda backend: %s", op, reason)
    ok, reason = _triton_status(device)
    if ok:
        return "triton"
    log_once(("skip", op, "triton", reason), logging.INFO, "%s: skipping triton backend: %s", op, reason)
    return "torch"


def backends(device: torch.device | str | None = None) -> dict[str, dict[str, Any]]:
    """Which backends can run, and why not.

    Args:
        device: the device to ask about; default CUDA when available, else CPU.

    Returns:
        ``{"cuda": {"available": bool, "reason": str}, "triton": {...}, "torch": {...}}``; the
        reason is empty when available. ``"pinned"`` holds the current pin.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    result: dict[str, Any] = {}
    for name, status in (("cuda", _cuda_status), ("triton", _triton_status)):
        ok, reason = status(device)
        result[name] = {"available": ok, "reason": reason}
    result["torch"] = {"available": True, "reason": ""}
    result["pinned"] = current_backend()
    return result


# ---------------------------------------------------------------------------------------------
# GEMM ops: vendor (cuBLAS through torch) or the Triton GEMM
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def force_gemm_path(path: str) -> Iterator[None]:
    """Run the GEMM ops on ``path`` (``"vendor"``, ``"triton"`` or ``"torch"``) inside the block.

    For the benchmark providers and the vendor-vs-Triton measurement: each candidate must run
    what it names, whatever the current per-shape choice says.
    """
    if path not in GEMM_PATHS:
        raise ValueError(f"force_gemm_path: expected one of {GEMM_PATHS}, got {path!r}")
    token = _forced_gemm_path.set(path)
    try:
        yield
    finally:
        _forced_gemm_path.reset(token)


def gemm_path(op: str, x: torch.Tensor, M: int, N: int, K: int) -> str:
    """``"torch"`` (reference), ``"triton"`` (Triton GEMM) or ``"vendor"`` (cuBLAS through torch)."""
    forced = _forced_gemm_path.get()
    if forced == "triton" and not triton_runs_on(x.device):
        raise RuntimeError(f"{op}: the Triton GEMM is forced but unavailable: {_triton_status(x.device)[1]}")
    if forced is not None:
        return forced
    pin = current_backend()
    backend = select_backend(op, x.device)  # raises for a pinned backend that cannot run
    if pin == "torch":
        return "torch"
    if pin == "triton":
        return "triton"  # pinned: the Triton GEMM, whatever the per-shape choice says
    # auto (a cuda pin follows auto: the GEMM ops have no compiled kernel)
    if backend == "triton" and configs.get_config(op, (M, N, K), x.dtype, x.device)["backend"] == "triton":
        return "triton"
    return "vendor" if x.device.type == "cuda" else "torch"


def pinned(fn: Any, backend: str) -> Any:
    """``fn`` run under :func:`use_backend` (``backend``): a benchmark provider of one backend."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with use_backend(backend):
            return fn(*args, **kwargs)

    return run


def on_gemm_path(fn: Any, path: str) -> Any:
    """``fn`` run under :func:`force_gemm_path` (``path``): a benchmark provider of one GEMM path."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with force_gemm_path(path):
            return fn(*args, **kwargs)

    return run
