"""Parameter memory of an SD3 mosaic against its dense transformer, from the config alone.

Nothing is allocated: the dense model and the mosaics are built on the meta device. The stages and
their kept widths are what ``mosaicdiff.prune`` plans for a target sparsity on SD3's flow-matching
scheduler (three stages, MLP widths aligned to 64); the kept units are nested prefixes, as
``prune(share_producers=True)`` selects them, so one storage per block position holds every stage's
producer rows (`mosaicdiff.families.sd3.producers`). ``scripts/sd3_memory.py`` prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mosaicdiff.families.sd3.adapter import SD3
from mosaicdiff.families.sd3.model import MosaicSD3
from mosaicdiff.method import meta_memory

__all__ = ["OBS_DIFF_SD35_LARGE_30", "memory_ratios", "planned_stages"]

#: OBS-Diff's one pruned SD3.5-Large at 30% sparsity (its paper's table: 6.54 B of the dense 8.06 B parameters).
OBS_DIFF_SD35_LARGE_30 = 6.54e9

_GROUPS = {"kept_heads": "attn", "kept_heads2": "attn2", "kept_channels": "ff", "kept_context_channels": "ff_context"}


def planned_stages(blocks, sparsity: float, align: int | None = 64, num_inference_steps: int = 28,
                   boundaries: tuple[int, int] | None = None) -> list[dict]:
    """`MosaicSD3` stage configs with the kept widths `prune` gives at this target (prefixes), on SD3's
    default scheduler; `blocks` are the dense blocks (on the meta device)."""
    return meta_memory.planned_stages(SD3, blocks, sparsity, lambda b: _GROUPS, align=align,
                                      num_inference_steps=num_inference_steps, boundaries=boundaries)


def memory_ratios(config: Mapping[str, Any], sparsity: float, align: int | None = 64,
                  num_inference_steps: int = 28, boundaries: tuple[int, int] | None = None) -> dict[str, Any]:
    """The mosaic's parameters against the dense model's at a target mean sparsity, shared and copied
    (`mosaicdiff.method.meta_memory.memory_ratios`).

    Args:
        config: ``SD3Transformer2DModel`` kwargs (`mosaicdiff.families.sd3.configs`).
        sparsity: the target mean sparsity.
        align: the MLP width alignment (``prune``'s default 64).
        num_inference_steps: the sampler steps the allocation weighs the stages by (SD3.5's pipeline default 28).
        boundaries: ``(t_low, t_high)`` of the middle stage, as ``prune`` takes them; default its closed form.
    """
    from diffusers import SD3Transformer2DModel

    return meta_memory.memory_ratios(SD3Transformer2DModel, MosaicSD3, config, lambda dense: planned_stages(
        dense.transformer_blocks, sparsity, align, num_inference_steps, boundaries))
