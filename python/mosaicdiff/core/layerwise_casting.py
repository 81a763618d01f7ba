"""Layerwise casting of a mosaic (diffusers' ``enable_layerwise_casting``) reaching its compact blocks
and shared producer storage, whose weights are raw parameters diffusers' hooks do not see; and the
forward's guard against autocast (the fused ops take one dtype)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["autocast_devices", "enable_layerwise_casting"]

def autocast_devices() -> list[str]:
    """The device types with an autocast region active here."""
    out = []
    for device in ("cpu", "cuda"):
        try:
            on = torch.is_autocast_enabled(device)
        except TypeError:  # torch < 2.4: no device argument
            on = torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()
        if on:
            out.append(device)
    return out


class _CompactCast:
    """Layerwise casting of one compact block or producer storage: its parameters (those the skip
    patterns do not name) stored in `storage` and cast to `compute` while it is used.

    A block is used through several entry points (``forward``, and the ``forward_normed`` the
    fused stage runtime calls), nested or not, and a shared-producer block reads its rows from the
    storage of its position: `enter` casts up on the first of nested uses (the block and, for a
    shared-producer block, its storage) and `exit` casts back when the last one ends. Casting
    assigns each parameter's ``.data``: the parameters stay the same objects, so the row-range
    views a shared-producer block takes of its storage at every call see the cast rows.
    """

    def __init__(self, params: list[nn.Parameter], storage: torch.dtype, compute: torch.dtype, non_blocking: bool,
                 producers: _CompactCast | None = None):
        self.params, self.storage, self.compute = params, storage, compute
        self.non_blocking, self.producers, self.depth = non_blocking, producers, 0
        self._cast(storage)

    def _cast(self, dtype: torch.dtype) -> None:
        for p in self.params:
            if p.dtype != dtype:
                p.data = p.data.to(dtype, non_blocking=self.non_blocking)

    def enter(self) -> None:
        if self.producers is not None:
            self.producers.enter()
        if self.depth == 0:
            self._cast(self.compute)
        self.depth += 1

    def exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._cast(self.storage)
        if self.producers is not None:
            self.producers.exit()


def _keep_compute_copies(params) -> contextlib.AbstractContextManager:
    """Where autograd saves a cast parameter for the backward (a convolution saves its weight),
    save the compute-dtype data it has during the forward instead of the parameter, whose data goes
    back to the storage dtype after the forward (diffusers' cast would hand the backward its
    storage-dtype data: "expected scalar type Float but found Half"). The saved tensors are
    detached (first-order gradients, as the fused ops give); no hooks outside grad mode."""
    if not torch.is_grad_enabled():
        return contextlib.nullcontext()
    ids = {id(p) for p in params}

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if id(t) in ids or t.requires_grad else t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _keep_compute_copies_hook():
    """A diffusers hook keeping a layerwise-cast module's compute copies for the backward
    (`_keep_compute_copies`), registered after its ``LayerwiseCastingHook`` so that it wraps it."""
    from diffusers.hooks import ModelHook

    class KeepComputeCopiesHook(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            with _keep_compute_copies(module.parameters()):
                return self.fn_ref.original_forward(*args, **kwargs)

    return KeepComputeCopiesHook()


def _cast_while_called(method: Callable, casts: list[_CompactCast]) -> Callable:
    def call(*args, **kwargs):
        # the block, and any other cast block passed in (a U-Net block reads its successor's norm1)
        used = casts + [getattr(a, "_mosaic_cast") for a in (*args, *kwargs.values())
                        if isinstance(a, nn.Module) and getattr(a, "_mosaic_cast", None) is not None]
        entered = []
        try:
            for c in used:
                c.enter()
                entered.append(c)
            with _keep_compute_copies([p for c in used for p in (*c.params, *(c.producers.params if c.producers
                                                                               else ()))]):
                return method(*args, **kwargs)
        finally:
            for c in reversed(entered):
                c.exit()

    call.__wrapped__ = method
    return call


def enable_layerwise_casting(model, storage_dtype: torch.dtype, compute_dtype: torch.dtype | None = None,
                             skip_modules_pattern: tuple[str, ...] | None = None,
                             skip_modules_classes: tuple[type[nn.Module], ...] | None = None,
                             non_blocking: bool = False) -> None:
    """diffusers' layerwise casting (weights stored in `storage_dtype`, cast to `compute_dtype`
    while used), over the compact blocks and the shared producer storage too.

    diffusers hooks the ``nn.Linear`` / ``nn.Conv*`` / ``nn.Embedding`` layers of the skeleton
    and would leave the compact blocks, whose weights are raw parameters, uncast. Here every
    compact block and producer storage is cast as well: its parameters whose names the skip
    patterns do not match (norms stay in `compute_dtype`) are stored in `storage_dtype` and cast
    to `compute_dtype` while the block runs (`_CompactCast`); a shared-producer block casts
    its position's storage with it, one stage's block at a time. The whole model is first cast
    to `compute_dtype`, which the modules left uncast compute in. Gradients flow as in
    diffusers (a weight gets its gradient in `compute_dtype`) once parameters require them (a
    mosaic's weights are frozen); the backward reads the compute-dtype weights the forward
    used, also where diffusers' cast would hand it the storage dtype (`_keep_compute_copies`).

    Args:
        storage_dtype, compute_dtype (default: the model's dtype), skip_modules_pattern,
            skip_modules_classes, non_blocking: as ``ModelMixin.enable_layerwise_casting``
            (the class's `_skip_layerwise_casting_patterns` are added to the patterns).

    Raises:
        RuntimeError: layerwise casting is already enabled, or CUDA graphs are (they hold the
            weights' addresses, which casting changes).
    """
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    if model.__dict__.get("_layerwise_casting"):
        raise RuntimeError(f"{type(model).__name__}: layerwise casting is already enabled; build or load "
                           f"the model again to change it")
    if model.cuda_graphs_enabled:
        raise RuntimeError(f"{type(model).__name__}: disable CUDA graphs (enable_cuda_graphs(False)) before "
                           f"enabling layerwise casting")
    compute_dtype = compute_dtype or model.dtype
    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN if skip_modules_pattern is None else skip_modules_pattern)
    patterns += tuple(model._keep_in_fp32_modules or ()) + tuple(model._skip_layerwise_casting_patterns or ())
    patterns = tuple(sorted(set(patterns)))
    nn.Module.to(model, dtype=compute_dtype)
    apply_layerwise_casting(model, storage_dtype, compute_dtype, patterns, skip_modules_classes, non_blocking)
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            registry.register_hook(_keep_compute_copies_hook(), "mosaicdiff_keep_compute_copies")
    casts: dict[int, _CompactCast] = {}
    for name, module in model._compact_modules():
        if (skip_modules_classes and isinstance(module, skip_modules_classes)) \
                or any(re.search(p, name) for p in patterns):
            continue
        params = [p for n, p in module.named_parameters(prefix=name) if p.is_floating_point()
                  and not any(re.search(pat, n) for pat in patterns)]
        producers = casts.get(id(getattr(module, "_producers", None)))
        if not params and producers is None:
            continue
        cast = _CompactCast(params, storage_dtype, compute_dtype, non_blocking, producers)
        casts[id(module)] = cast
        if name.startswith("stage_blocks."):
            object.__setattr__(module, "_mosaic_cast", cast)
            for entry in model._compact_entry_points:
                method = getattr(module, entry, None)
                if callable(method):
                    setattr(module, entry, _cast_while_called(method, [cast]))
    model._layerwise_casting = {"storage_dtype": storage_dtype, "compute_dtype": compute_dtype,
                               "skip_modules_pattern": patterns}
    logger.info("%s: layerwise casting %s -> %s (%d compact modules)", type(model).__name__, storage_dtype,
                compute_dtype, len(casts))
