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

from mosaicdiff.core.schedulers import sampler_timesteps, scheduler_alphas_cumprod
from mosaicdiff.core.weight_init import skip_weight_init
from mosaicdiff.families.pixart.adapter import PIXART
from mosaicdiff.families.pixart.model import MosaicPixArt
from mosaicdiff.method import compact
from mosaicdiff.method.stage_plan import plan_stages

__all__ = ["memory_ratios", "planned_stages"]

_GROUPS = {"kept_heads1": "attn1", "kept_heads2": "attn2", "kept_channels": "ff"}


def planned_stages(block: torch.nn.Module, num_layers: int, sparsity: float, align: int | None = 64,
                   num_inference_steps: int = 50) -> list[dict]:
    """`MosaicPixArt` stage configs with the kept widths `prune` gives at this target (prefixes), on
    PixArt's default scheduler."""
    sched = PIXART.default_scheduler()
    planned, _ = plan_stages(sparsity, method="mosaic", boundaries=None, stage_sparsities=None,
                             alphas_cumprod=scheduler_alphas_cumprod(sched),
                             timesteps=sampler_timesteps(num_inference_steps, sched),
                             speed_threshold=0.55, log_snr_weight=0.0, x0_sq_norm=1.0, s_max=None)
    groups = PIXART.groups(block)
    stages = []
    for name, t0, t1, sp in planned:
        kept = {key: list(range(groups[g].num_units - compact.units_to_remove(groups[g], sp, align)))
                for key, g in _GROUPS.items()}
        stages.append({"name": name, "t_start": t0, "t_end": t1, "sparsity": sp, "blocks": [kept] * num_layers})
    return stages


def memory_ratios(config: Mapping[str, Any], sparsity: float, align: int | None = 64,
                  num_inference_steps: int = 50) -> dict[str, Any]:
    """The mosaic's parameters against the dense model's at a target mean sparsity, shared and copied.

    Args:
        config: ``PixArtTransformer2DModel`` kwargs (`mosaicdiff.families.pixart.configs`).
        sparsity: the target mean sparsity.
        align: the MLP width alignment (``prune``'s default 64).
        num_inference_steps: the sampler steps the allocation weighs the stages by (``prune``'s default 50).

    Returns:
        ``{"dense_params", "stages": [(name, t_start, t_end, sparsity)], "shared": report,
        "copies": report}``, each report `MosaicModel.memory_report`'s.
    """
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        dense = PixArtTransformer2DModel(**config)
    reference = MosaicPixArt.dense_reference_of(dense)
    layers = len(dense.transformer_blocks)
    stages = planned_stages(dense.transformer_blocks[0], layers, sparsity, align, num_inference_steps)
    units = [{kind: max((s["blocks"][j][f"kept_{kind}"] for s in stages), key=len)
              for kind in ("heads1", "heads2", "channels")} for j in range(layers)]
    out = {"dense_params": reference["params"],
           "stages": [(s["name"], s["t_start"], s["t_end"], s["sparsity"]) for s in stages]}
    for label, shared in (("copies", None), ("shared", units)):
        with torch.device("meta"), skip_weight_init():  # only the shapes are counted
            mosaic = MosaicPixArt(**config, stages=stages, shared_producers=shared, dense_reference=reference)
        out[label] = mosaic.memory_report()
    return out
