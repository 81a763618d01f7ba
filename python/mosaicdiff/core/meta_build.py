"""Building a model from its config without allocating its floating-point tensors.

Inside `floats_on_meta` every floating tensor a factory function creates (``torch.empty``,
``nn.Linear``'s weights, ``torch.arange(..., dtype=torch.float32)`` of a positional table, ...)
lives on the meta device: it has a shape and a dtype, no storage. Integer tensors (the kept-unit
indices a mosaic reads from its config) are created as usual, so construction code that reads them
keeps working. `mosaicdiff.core.serialization` builds a folder's (untrusted) config this way and
compares it with the weights' header before anything is allocated (accelerate's
``init_empty_weights`` moves parameters after they were allocated; this never allocates them).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["TooManyTensors", "building_on_meta", "floats_on_meta"]

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("mosaicdiff_floats_on_meta", default=False)


@functools.lru_cache(1)
def _factories() -> frozenset:
    """The tensor factory functions that take a ``device`` (torch's default-device list)."""
    return frozenset({
        torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
        torch.randint, torch.randperm, torch.arange, torch.linspace, torch.logspace, torch.eye,
        torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor,
    })


class TooManyTensors(ValueError):
    """A `floats_on_meta` build made more floating tensors than its `max_tensors`."""


class _FloatsOnMeta(TorchFunctionMode):
    def __init__(self, max_tensors: int | None):
        super().__init__()
        self.max_tensors, self.made = max_tensors, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _factories():
            return func(*args, **kwargs)
        out = func(*args, **{**kwargs, "device": "meta"}) if kwargs.get("device") is None else None
        if out is not None and not (out.is_floating_point() or out.is_complex()):
            out = None  # an integer tensor: made for real (on meta it cost nothing to learn its dtype)
        if out is None:
            out = func(*args, **kwargs)  # (or placed by the caller, e.g. under torch.device("meta"))
        if out.device.type == "meta" and (out.is_floating_point() or out.is_complex()):
            self.made += 1
            if self.max_tensors is not None and self.made > self.max_tensors:
                raise TooManyTensors(f"the build made more than {self.max_tensors} floating tensors")
        return out


@contextlib.contextmanager
def floats_on_meta(max_tensors: int | None = None) -> Iterator[None]:
    """Floating tensors made by factory functions inside the block live on the meta device.

    Args:
        max_tensors (`int`, *optional*): stop the build (`TooManyTensors`) after this many: a
            config whose layer counts lie builds millions of modules, even on meta, before any
            shape can be compared (a model's build makes about 1.5 per tensor of its state dict).
    """
    token = _ACTIVE.set(True)
    try:
        with _FloatsOnMeta(max_tensors):
            yield
    finally:
        _ACTIVE.reset(token)


def building_on_meta() -> bool:
    """Whether a `floats_on_meta` block is active (a constructor that places its modules with
    ``to_empty(device=...)`` asks it where to put them)."""
    return _ACTIVE.get()
