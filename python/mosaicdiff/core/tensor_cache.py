"""A one-entry cache of a value computed from a tensor that comes back unchanged across calls.

A diffusers pipeline passes the same text-state tensor to every denoising step of a run, so what
only depends on it (a caption projection, the cross-attention keys and values) need only be
computed once per run. The entry is keyed on the tensor object itself, held by weak reference (a
new tensor that happens to reuse a freed one's address is never taken for it), on its version
counter (an in-place edit invalidates it) and on whatever else the value depends on (its shape,
dtype, the weights' storage and dtype).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any

import torch

__all__ = ["cached_for_tensor", "tensor_key"]


def tensor_key(t: torch.Tensor) -> tuple:
    """What a value computed from `t` depends on besides `t`'s identity: shape, version, dtype, device."""
    return tuple(t.shape), t._version, t.dtype, t.device


def cached_for_tensor(store: MutableMapping[str, Any], slot: str, tensor: torch.Tensor, key: Hashable,
                      compute: Callable[[], Any]) -> Any:
    """``compute()``, or its last result in ``store[slot]`` while the same `tensor` object comes back
    with the same `key` (build it with `tensor_key` plus the weights it is computed with)."""
    cached = store.get(slot)
    if cached is None or cached[0]() is not tensor or cached[1] != key:
        cached = (weakref.ref(tensor), key, compute())
        store[slot] = cached
    return cached[2]
