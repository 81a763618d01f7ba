"""Parameter memory of a mosaic against its dense model, from the config alone (any family).

Nothing is allocated: the dense model and the mosaics are built on the meta device. The stages and
their kept widths are what ``mosaicdiff.prune`` plans for a target sparsity on a sampler (three
stages; MLP widths aligned); the kept units are nested prefixes, as ``prune(share_producers=True)``
selects them, so one storage per block position holds every stage's producer rows. A family's
``memory.py`` says which config keys hold which group's kept units and calls these two functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mosaicdiff.core.adapter import ModelAdapter
from mosaicdiff.core.schedulers import noise_process
from mosaicdiff.core.weight_init import skip_weight_init
from mosaicdiff.method import compact
from mosaicdiff.method.stage_plan import plan_stages

__all__ = ["memory_ratios", "planned_stages"]


def planned_stages(adapter: ModelAdapter, blocks: Sequence[nn.Module], sparsity: float,
                   kept_keys: Callable[[nn.Module], Mapping[str, str]], *, align: int | None = 64,
                   num_inference_steps: int = 50, scheduler=None,
                   boundaries: tuple[int, int] | None = None) -> list[dict]:
    """Stage configs (``name``, ``t_start``, ``t_end``, ``sparsity``, ``blocks``) with the kept widths
    `prune` gives at this target, as prefixes of each group's units.

    Args:
        adapter: the family's adapter (its groups; its default scheduler unless `scheduler` is given).
        blocks: the dense model's prunable blocks (on the meta device).
        kept_keys: a block -> ``{config key: group name}`` (a group the block lacks keeps ``[]``).
        scheduler: the sampler (a diffusers scheduler or a `NoiseProcess`); default the family's.
        boundaries: ``(t_low, t_high)`` of the middle stage; default the closed form.
    """
    process = noise_process(adapter.default_scheduler() if scheduler is None else scheduler)
    planned, _ = plan_stages(sparsity, method="mosaic", boundaries=boundaries, alphas_cumprod=process,
                             timesteps=process.sampler_timesteps(num_inference_steps))
    stages = []
    for name, t0, t1, sp in planned:
        kept = []
        for block in blocks:
            groups = adapter.groups(block)
            kept.append({key: list(range(groups[g].num_units - compact.units_to_remove(groups[g], sp, align)))
                         if g in groups else [] for key, g in kept_keys(block).items()})
        stages.append({"name": name, "t_start": t0, "t_end": t1, "sparsity": sp, "blocks": kept})
    return stages


def memory_ratios(dense_class: type, mosaic_class: type, config: Mapping[str, Any],
                  plan: Callable[[nn.Module], list[dict]]) -> dict[str, Any]:
    """The mosaic's parameters against the dense model's, shared producers and a copy per stage.

    Args:
        dense_class / mosaic_class: the diffusers model class and the family's mosaic class.
        config: the dense model's kwargs.
        plan: the dense model (meta device) -> its stage configs (`planned_stages`).

    Returns:
        ``{"dense_params", "stages": [(name, t_start, t_end, sparsity)], "shared": report,
        "copies": report}``, each report `MosaicModel.memory_report`'s.
    """
    with torch.device("meta"):
        dense = dense_class(**config)
    reference = mosaic_class.dense_reference_of(dense)
    stages = plan(dense)
    units = [{key.removeprefix("kept_"): max((s["blocks"][j][key] for s in stages), key=len) for key in block}
             for j, block in enumerate(stages[0]["blocks"])]
    meta = {"num_train_timesteps": max(s["t_end"] for s in stages)}
    out = {"dense_params": reference["params"],
           "stages": [(s["name"], s["t_start"], s["t_end"], s["sparsity"]) for s in stages]}
    for label, shared in (("copies", None), ("shared", units)):
        with torch.device("meta"), skip_weight_init():  # only the shapes are counted
            mosaic = mosaic_class(**config, stages=stages, shared_producers=shared, dense_reference=reference,
                                  meta=meta)
        out[label] = mosaic.memory_report()
    return out
