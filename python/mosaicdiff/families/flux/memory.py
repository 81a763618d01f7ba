"""Parameter memory of a Flux mosaic against its dense transformer, from the config alone.

Nothing is allocated: the dense model and the mosaics are built on the meta device. The stages and
their kept widths are what ``mosaicdiff.prune`` plans for a target sparsity on Flux's default
sampler (FLUX.1-dev's flow-matching Euler at 1024 px, 50 steps; MLP widths aligned to 64); the kept
units are nested prefixes, as ``prune(share_producers=True)`` selects them, so one storage per
block position holds every stage's producer rows (`mosaicdiff.families.flux.producers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mosaicdiff.families.flux.adapter import FLUX
from mosaicdiff.families.flux.model import MosaicFlux
from mosaicdiff.method import meta_memory

__all__ = ["memory_ratios", "planned_stages"]

#: Config key of each group's kept list, per block kind.
_KEYS = {"double": {"kept_heads": "attn", "kept_channels": "ff", "kept_context_channels": "ff_context"},
         "single": {"kept_heads": "attn", "kept_channels": "mlp"}}


def planned_stages(dense: torch.nn.Module, sparsity: float, align: int | None = 64,
                   num_inference_steps: int = 50) -> list[dict]:
    """`MosaicFlux` stage configs with the kept widths `prune` gives at this target (prefixes), on
    Flux's default sampler."""
    double = set(map(id, dense.transformer_blocks))
    return meta_memory.planned_stages(FLUX, FLUX.blocks(dense), sparsity,
                                      lambda b: _KEYS["double" if id(b) in double else "single"], align=align,
                                      num_inference_steps=num_inference_steps)


def memory_ratios(config: Mapping[str, Any], sparsity: float, align: int | None = 64,
                  num_inference_steps: int = 50) -> dict[str, Any]:
    """The mosaic's parameters against the dense model's at a target mean sparsity, shared and copied
    (`mosaicdiff.method.meta_memory.memory_ratios`).

    Args:
        config: ``FluxTransformer2DModel`` kwargs (`mosaicdiff.families.flux.configs`).
        sparsity: the target mean sparsity.
        align: the MLP width alignment (``prune``'s default 64).
        num_inference_steps: the sampler steps the allocation weighs the stages by (``prune``'s default 50).
    """
    from diffusers import FluxTransformer2DModel

    return meta_memory.memory_ratios(FluxTransformer2DModel, MosaicFlux, config,
                                     lambda dense: planned_stages(dense, sparsity, align, num_inference_steps))
