"""How a `MosaicDiT`'s stage blocks are built: empty from its config, or from a dense model's stages.

Two layouts (`mosaicdiff.families.dit.producers`): every stage owns its compact blocks
(`CompactDiTBlock`), or every block position stores its producer rows once
(`SharedProducers`, in ``producer_storage``) and the stages' `SharedProducerBlock`s hold only the
compensated consumers. Kept here so that the model class only wires the parts together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import mosaicdiff.families.dit.producers as producer_sharing
from mosaicdiff.core.model import MosaicModel
from mosaicdiff.core.stages import StageSpec
from mosaicdiff.families.dit.blocks import CompactDiTBlock, empty_block_weights
from mosaicdiff.families.dit.config_checks import stage_config
from mosaicdiff.families.dit.producers import SharedProducerBlock, SharedProducers
from mosaicdiff.families.dit.weights import CompactBlockWeights
from mosaicdiff.method.producer_layout import unit_ranges

__all__ = ["DensePlan", "empty_stage_blocks", "filled_stage_blocks", "plan_from_dense"]


def _owned(facts: dict, weights: CompactBlockWeights) -> CompactDiTBlock:
    return CompactDiTBlock(weights, facts["head_dim"], facts["attn_norm_eps"], facts["mlp_norm_eps"])


def _shared(facts: dict, store: SharedProducers, head_range, channel_range, consumers) -> SharedProducerBlock:
    return SharedProducerBlock(store, head_range, channel_range, consumers, facts["head_dim"],
                               facts["attn_norm_eps"], facts["mlp_norm_eps"])


def empty_stage_blocks(facts: dict, stages: Sequence[dict], shared_producers: list[dict] | None):
    """``(producer_storage or None, stage_blocks)`` with uninitialised weights, from the config.

    Raises:
        ValueError: a ``shared_producers`` list of the wrong length, or a stage's kept lists that
            are not a contiguous run of their position's storage (the position named).
    """
    hd, width = facts["head_dim"], facts["width"]
    if shared_producers is None:
        blocks = nn.ModuleList(
            nn.ModuleList(_owned(facts, empty_block_weights(b["kept_heads"], b["kept_channels"], hd, width))
                          for b in s["blocks"]) for s in stages)
        return None, blocks
    if len(shared_producers) != facts["num_layers"]:
        raise ValueError(f"shared_producers: expected one entry per block ({facts['num_layers']}), "
                         f"got {len(shared_producers)}")
    for j, p in enumerate(shared_producers):
        for key, limit in (("heads", facts["num_heads"]), ("channels", facts["mlp_hidden"])):
            units = list(p[key])
            if len(set(units)) != len(units) or any(not 0 <= u < limit for u in units):
                raise ValueError(f"shared_producers[{j}].{key} must be unique indices in [0, {limit}), got {units}")
    stores = nn.ModuleList(SharedProducers(p["heads"], p["channels"], hd, width) for p in shared_producers)
    blocks = nn.ModuleList(nn.ModuleList() for _ in stages)
    for j, store in enumerate(stores):
        try:
            head_ranges = unit_ranges(store.heads.tolist(), [s["blocks"][j]["kept_heads"] for s in stages])
            chan_ranges = unit_ranges(store.channels.tolist(), [s["blocks"][j]["kept_channels"] for s in stages])
        except ValueError as exc:
            raise ValueError(f"stage blocks at position {j} do not fit shared_producers[{j}]: {exc}") from None
        for i, (hr, cr) in enumerate(zip(head_ranges, chan_ranges)):
            consumers = {"proj_weight": torch.empty(width, (hr[1] - hr[0]) * hd), "proj_bias": torch.empty(width),
                         "fc2_weight": torch.empty(width, cr[1] - cr[0]), "fc2_bias": torch.empty(width)}
            blocks[i].append(_shared(facts, store, hr, cr, consumers))
    return stores, blocks


@dataclass
class DensePlan:
    """A new mosaic's config entries and filled weights (`plan_from_dense`), before its blocks exist."""

    stage_configs: list[dict]
    shared_producers: list[dict] | None
    dense_reference: dict[str, Any]
    owned: list[list[CompactBlockWeights]] | None  # per stage, per block (copy layout)
    stores: list[SharedProducers] | None  # per block position (shared layout) ...
    consumers: list[list[tuple]] | None  # ... and per position, per stage: (head_range, channel_range, tensors)


def _to_like(w: CompactBlockWeights, ref: torch.Tensor) -> CompactBlockWeights:
    """Convert the float tensors of ``w`` to ``ref``'s device and dtype (no copy when equal)."""
    kw = {k: (v if k.startswith("kept_") else v.detach().to(device=ref.device, dtype=ref.dtype))
          for k, v in w.tensors().items()}
    return CompactBlockWeights(**kw)


def plan_from_dense(dense: nn.Module, skeleton, stages: Sequence[StageSpec], share_producers: bool | None) -> DensePlan:
    """Config entries and weights (in the skeleton's dtype and device) of a mosaic of `dense` (unwrapped).

    Raises:
        TypeError: a stage that is not a `StageSpec`.
        ValueError: a block of another width than the model, or ``share_producers=True`` with
            kept sets that cannot share one storage.
    """
    stage_cfgs = [stage_config(s) for s in stages]
    ref, width = skeleton.conditioning.mod_weight, skeleton.conditioning.width
    for spec in stages:
        for j, w in enumerate(spec.blocks):
            if int(w.proj_bias.shape[0]) != width:
                raise ValueError(f"stage {spec.name!r} block {j}: width must be {width}, got {int(w.proj_bias.shape[0])}")
    embedder = sum(p.numel() for p in skeleton.conditioning.embedders[0].parameters())
    dense_ref = MosaicModel.dense_reference_of(dense, embedder_params=int(embedder))
    shared = None
    counts = {len(spec.blocks) for spec in stages}
    if share_producers is not False and len(counts) == 1:  # (else the model's own checks refuse the stages)
        head_dim = int(dense.config.attention_head_dim)
        shared = [producer_sharing.share_producers([_to_like(s.blocks[j], ref) for s in stages], head_dim)
                  for j in range(len(stages[0].blocks))]
        shared = None if any(s is None for s in shared) else shared
    if share_producers and shared is None:
        raise ValueError("share_producers=True: the stages' kept heads/channels cannot share one storage "
                         "(each stage's units must be a run of one order: prune with share_producers=True)")
    if shared is None:
        owned = [[_to_like(w, ref) for w in spec.blocks] for spec in stages]
        return DensePlan(stage_cfgs, None, dense_ref, owned, None, None)
    for j, (store, per_stage) in enumerate(shared):
        for i, (hr, cr, _) in enumerate(per_stage):
            cfg = stage_cfgs[i]["blocks"][j]  # the kept lists in storage order
            cfg["kept_heads"] = store.heads[hr[0]:hr[1]].tolist()
            cfg["kept_channels"] = store.channels[cr[0]:cr[1]].tolist()
    producers = [{"heads": store.heads.tolist(), "channels": store.channels.tolist()} for store, _ in shared]
    return DensePlan(stage_cfgs, producers, dense_ref, None, [store for store, _ in shared],
                     [per_stage for _, per_stage in shared])


def filled_stage_blocks(facts: dict, plan: DensePlan):
    """``(producer_storage or None, stage_blocks)`` holding the plan's weights (no copies)."""
    if plan.owned is not None:
        return None, nn.ModuleList(nn.ModuleList(_owned(facts, w) for w in stage) for stage in plan.owned)
    blocks = nn.ModuleList(nn.ModuleList() for _ in plan.stage_configs)
    for store, per_stage in zip(plan.stores, plan.consumers):
        for i, (hr, cr, consumers) in enumerate(per_stage):
            blocks[i].append(_shared(facts, store, hr, cr, consumers))
    return nn.ModuleList(plan.stores), blocks
