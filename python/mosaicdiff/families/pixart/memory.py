"""Parameter memory of a PixArt mosaic against its dense transformer, from the config alone.

Nothing is allocated: the dense model and the mosaics are built on the meta device. The stages and
their kept widths are what ``mosaicdiff.prune`` plans for a target sparsity on PixArt's scheduler
(three stages, MLP width aligned to 64); the kept units are nested prefixes, as
``prune(share_producers=True)`` selects them, so one storage per block position holds every stage's
producer rows (`mosaicdiff.families.pixart.producers`). ``scripts/pixart_memory.py`` prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mosaicdiff.families.pixart.adapter import PIXART
from mosaicdiff.families.pixart.model import MosaicPixArt
from mosaicdiff.method import meta_memory

__all__ = ["memory_ratios", "planned_stages"]

_GROUPS = {"kept_heads1": "attn1", "kept_heads2": "attn2", "kept_channels": "ff"}


def planned_stages(block: torch.nn.Module, num_layers: int, sparsity: float, align: int | None = 64,
                   num_inference_steps: int = 50) -> list[dict]:
    """`MosaicPixArt` stage configs with the kept widths `prune` gives at this target (prefixes), on
    PixArt's default scheduler."""
    return meta_memory.planned_stages(PIXART, [block] * num_layers, sparsity, lambda b: _GROUPS, align=align,
                                      num_inference_steps=num_inference_steps)


def memory_ratios(config: Mapping[str, Any], sparsity: float, align: int | None = 64,
                  num_inference_steps: int = 50) -> dict[str, Any]:
    """The mosaic's parameters against the dense model's at a target mean sparsity, shared and copied
    (`mosaicdiff.method.meta_memory.memory_ratios`).

    Args:
        config: ``PixArtTransformer2DModel`` kwargs (`mosaicdiff.families.pixart.configs`).
        sparsity: the target mean sparsity.
        align: the MLP width alignment (``prune``'s default 64).
        num_inference_steps: the sampler steps the allocation weighs the stages by (``prune``'s default 50).
    """
    from diffusers import PixArtTransformer2DModel

    return meta_memory.memory_ratios(PixArtTransformer2DModel, MosaicPixArt, config, lambda dense: planned_stages(
        dense.transformer_blocks[0], len(dense.transformer_blocks), sparsity, align, num_inference_steps))
