"""Where a DiT LoRA's dense linears live in a `MosaicDiT` (`mosaicdiff.core.lora_layout.LoraTarget`).

Per block ``j`` of the dense ``DiTTransformer2DModel``: ``attn1.to_q/k/v`` are the qkv rows of
the kept heads, ``ff.net.0.proj`` the fc1 rows of the kept channels (per stage, or once in the
shared storage), ``attn1.to_out.0`` and ``ff.net.2`` each stage's compensated proj / fc2 columns;
``norm1.linear`` is block ``j``'s rows of the batched adaLN matrix. ``proj_out_1/2`` are the
skeleton's own linears.
"""

from __future__ import annotations

import torch

from mosaicdiff.core.lora_layout import (
    LoraSlot,
    LoraTarget,
    channel_producer_slots,
    consumer_slots,
    head_producer_slots,
)

__all__ = ["lora_targets"]


def lora_targets(mosaic) -> dict[str, LoraTarget]:
    """The `LoraTarget` of every dense linear a LoRA of `mosaic`'s dense DiT may adapt."""
    cfg = mosaic.config
    hd = int(cfg.attention_head_dim)
    width, mlp = hd * int(cfg.num_attention_heads), int(mosaic._facts["mlp_hidden"])
    shared = mosaic.shared
    targets = {}
    for j in range(int(cfg.num_layers)):
        blocks = [stage[j] for stage in mosaic.stage_blocks]
        p = f"transformer_blocks.{j}."
        for part, name in enumerate(("attn1.to_q", "attn1.to_k", "attn1.to_v")):
            targets[p + name] = LoraTarget((width, width), head_producer_slots(blocks, "qkv_weight", "heads", 3,
                                                                               part, hd))
        targets[p + "ff.net.0.proj"] = LoraTarget((mlp, width), channel_producer_slots(blocks, "fc1_weight",
                                                                                       "channels", mlp))
        targets[p + "attn1.to_out.0"] = LoraTarget((width, width), consumer_slots(blocks, "proj_weight", "heads", hd))
        targets[p + "ff.net.2"] = LoraTarget((width, mlp), consumer_slots(blocks, "fc2_weight", "channels", 1))
        mod = torch.arange(6 * width)
        targets[p + "norm1.linear"] = LoraTarget((6 * width, width), (
            LoraSlot(shared.conditioning.mod_weight, rows=(mod + j * 6 * width, mod)),))
    for name in ("proj_out_1", "proj_out_2"):
        weight = getattr(shared, name).weight
        targets[name] = LoraTarget(tuple(weight.shape), (LoraSlot(weight),))
    return targets
