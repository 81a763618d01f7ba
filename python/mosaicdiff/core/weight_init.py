"""Weights of a mosaic built from its config: initialised as a diffusers constructor initialises
(torch's defaults), or left empty where the caller assigns them right away (`skip_weight_init`)."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["init_weights", "skip_weight_init", "weight_init_skipped"]

_SKIP_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("mosaicdiff_skip_weight_init", default=False)


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build mosaics without initialising their weights (diffusers' ``no_init_weights``).

    For code that assigns every weight right after construction: `from_pretrained` (the loaded
    tensors) and a family's ``from_dense`` (the dense model's). The weights are then ``torch.empty``
    until assigned, and building costs no memory traffic.
    """
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


@torch.no_grad()
def _init_parameters(params: dict[str, torch.Tensor]) -> None:
    """torch's defaults for a module's raw parameters, as ``nn.Linear`` / ``nn.LayerNorm`` set
    theirs: a matrix kaiming-uniform (bound 1/sqrt(fan_in)); a bias ``<x>_bias`` (``<x>bias``)
    next to a matrix ``<x>_weight`` uniform with that matrix's bound, beside a vector (a norm's
    weight) or alone zero; any other vector (a norm's scale) one."""
    def bound(t: torch.Tensor) -> float:
        return 1.0 / math.sqrt(max(1, t[0].numel()))

    for name, p in params.items():
        if p.dim() >= 2:
            p.uniform_(-bound(p), bound(p))
        elif name.endswith("bias"):
            weight = params.get(name[: -len("bias")] + "weight")
            if weight is not None and weight.dim() >= 2:
                p.uniform_(-bound(weight), bound(weight))
            else:
                p.zero_()
        else:
            p.fill_(1.0)


def weight_init_skipped() -> bool:
    """Whether a `skip_weight_init` block is active."""
    return _SKIP_INIT.get()


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Initialise every parameter as a diffusers constructor does (torch's defaults), drawing
    from the global RNG in module order: the same seed builds the same model.

    A module with ``reset_parameters`` (``nn.Linear``, ``nn.Conv2d``, norms, embeddings) runs
    it; the raw parameters of the compact blocks, the producer storage and the shared
    conditioning follow `_init_parameters`. Loading and converting skip this (`skip_weight_init`).
    """
    for module in model.modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]
        if not own:
            continue
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            _init_parameters(dict(own))
