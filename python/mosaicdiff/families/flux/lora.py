"""Where a Flux LoRA's dense linears live in a `MosaicFlux` (`mosaicdiff.core.lora_layout.LoraTarget`).

Double blocks as SD3's (`mosaicdiff.core.lora_layout.joint_block_targets`). A single block's producers are
``attn.to_q/k/v`` (the kept heads' qkv rows) and ``proj_mlp`` (the kept channels' rows), one
``proj`` copy ``[q | k | v | mlp]`` per stage or the storage's ``qkv`` and ``mlp`` once; its one
consumer ``proj_out`` reads ``[attention | MLP]``: each stage's columns are its kept heads', then
its kept channels' (dense columns ``heads * head_dim + channel``). The skeleton's own linears keep
their dense names.
"""

from __future__ import annotations

import torch

from mosaicdiff.core.lora_layout import (
    LoraSlot,
    LoraTarget,
    channel_producer_slots,
    head_producer_slots,
    joint_block_targets,
    linear_targets,
    unit_rows,
)

__all__ = ["lora_targets"]


def _single_targets(blocks, hd: int, heads: int, width: int, mlp: int) -> dict[str, LoraTarget]:
    inner = heads * hd
    shared = getattr(blocks[0], "producers", None) is not None
    field = "qkv_weight" if shared else "proj_weight"
    out = {name: LoraTarget((inner, width), head_producer_slots(blocks, field, "heads", 3, part, hd))
           for part, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v"))}
    if shared:
        mlp_slots = channel_producer_slots(blocks, "mlp_weight", "channels", mlp)
    else:  # the MLP rows follow the kept heads' 3 h hd qkv rows
        mlp_slots = tuple(LoraSlot(b.proj_weight, rows=(torch.arange(b.kept_channels.numel()) + 3 * b.kept_heads.numel()
                                                        * hd, b.kept_channels)) for b in blocks)
    out["proj_mlp"] = LoraTarget((mlp, width), mlp_slots)
    out["proj_out"] = LoraTarget((width, inner + mlp), tuple(
        LoraSlot(b.out_weight, cols=(torch.arange(b.kept_heads.numel() * hd + b.kept_channels.numel()),
                                     torch.cat([unit_rows(b.kept_heads, hd), inner + b.kept_channels])))
        for b in blocks))
    return out


def lora_targets(mosaic) -> dict[str, LoraTarget]:
    """The `LoraTarget` of every dense linear a LoRA of `mosaic`'s dense Flux transformer may adapt."""
    f = mosaic._facts
    hd, heads, width, mlp = int(f["head_dim"]), int(f["heads"]), int(f["width"]), int(f["mlp_hidden"])
    targets = linear_targets(mosaic.shared)
    doubles = int(f["num_layers"])
    for j in range(doubles + int(f["num_single_layers"])):
        blocks = [stage[j] for stage in mosaic.stage_blocks]
        if j < doubles:
            targets.update(joint_block_targets(blocks, f"transformer_blocks.{j}.", hd, heads, width, mlp, mlp))
        else:
            targets.update({f"single_transformer_blocks.{j - doubles}.{k}": v
                            for k, v in _single_targets(blocks, hd, heads, width, mlp).items()})
    return targets
