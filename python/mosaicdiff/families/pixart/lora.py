"""Where a PixArt LoRA's dense linears live in a `MosaicPixArt` (`mosaicdiff.core.lora_layout.LoraTarget`):
the text blocks' attention and MLP linears (`mosaicdiff.core.lora_layout.text_block_targets`) and the
skeleton's own linears under their dense names (``adaln_single.linear``, ``caption_projection.*``, ``proj_out``)."""

from __future__ import annotations

from mosaicdiff.core.lora_layout import LoraTarget, linear_targets, text_block_targets

__all__ = ["lora_targets"]


def lora_targets(mosaic) -> dict[str, LoraTarget]:
    """The `LoraTarget` of every dense linear a LoRA of `mosaic`'s dense PixArt transformer may adapt."""
    f = mosaic._facts
    targets = linear_targets(mosaic.shared)
    for j in range(int(f["num_layers"])):
        targets.update(text_block_targets([stage[j] for stage in mosaic.stage_blocks], f"transformer_blocks.{j}.",
                                          (f["heads"], f["heads"]), f["mlp_hidden"], ff1_parts=1))
    return targets
