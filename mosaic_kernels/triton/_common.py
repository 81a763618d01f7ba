"""Helpers shared by the Triton launchers: interpreter detection and launch checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(x_ptr):  # (1,) never launched; its type tells how @triton.jit was set up
    tl.store(x_ptr, 0.0)


def _is_interpreted(kernel: object) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - triton without an interpreter
        return False
    return isinstance(kernel, InterpretedFunction)


# True when TRITON_INTERPRET=1 was set before these modules were imported: kernels then run on
# CPU tensors through the interpreter (and only there).
INTERPRETED: bool = _is_interpreted(_probe_kernel)


def launch_checks(t: torch.Tensor) -> None:
    """Raise a clear error when a kernel cannot run on ``t``'s device in this process."""
    if t.device.type == "cuda":
        if INTERPRETED:
            raise RuntimeError("mosaic_kernels.triton was imported with TRITON_INTERPRET=1: CUDA tensors cannot run")
        return
    if t.device.type == "cpu" and INTERPRETED:
        return
    raise RuntimeError(
        f"mosaic_kernels Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {t.device}")


@contextlib.contextmanager
def device_guard(t: torch.Tensor) -> Iterator[None]:
    """Make ``t``'s CUDA device current for the launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        with torch.cuda.device(t.device):
            yield
    else:
        yield
