"""Where an SD3 LoRA's dense linears live in a `MosaicSD3` (`mosaicdiff.core.lora_layout.LoraTarget`): each
joint block's attention and MLP linears (`mosaicdiff.core.lora_layout.joint_block_targets`, with SD3.5's
second attention and the last block's missing text output as its kind says) and the skeleton's own
linears under their dense names."""

from __future__ import annotations

from mosaicdiff.core.lora_layout import LoraTarget, joint_block_targets, linear_targets

__all__ = ["lora_targets"]


def lora_targets(mosaic) -> dict[str, LoraTarget]:
    """The `LoraTarget` of every dense linear a LoRA of `mosaic`'s dense SD3 transformer may adapt."""
    f = mosaic._facts
    targets = linear_targets(mosaic.shared)
    for j, kind in enumerate(f["kinds"]):
        targets.update(joint_block_targets([stage[j] for stage in mosaic.stage_blocks], f"transformer_blocks.{j}.",
                                           int(f["head_dim"]), int(f["heads"]), int(f["width"]), int(f["mlp_hidden"]),
                                           int(f["context_mlp_hidden"]), kind.context_pre_only, kind.dual_attention))
    return targets
