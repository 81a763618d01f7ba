"""Where an SD / SDXL U-Net LoRA's dense linears live in a `MosaicUNet` (`mosaicdiff.core.lora_layout.LoraTarget`):
the transformer blocks' attention and GEGLU MLP linears (`mosaicdiff.core.lora_layout.text_block_targets`,
each position named after the ``Transformer2DModel`` whose chain runs it) and the skeleton's own
linears under their dense names (``proj_in``, ``time_emb_proj``, ...)."""

from __future__ import annotations

from mosaicdiff.core.lora_layout import LoraTarget, linear_targets, text_block_targets

__all__ = ["lora_targets"]

#: diffusers' ``BasicTransformerBlock`` MLP width: ``mult * dim`` with the default ``mult=4``.
FF_MULT = 4


def lora_targets(mosaic) -> dict[str, LoraTarget]:
    """The `LoraTarget` of every dense linear a LoRA of `mosaic`'s dense U-Net may adapt."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    targets = linear_targets(mosaic.unet)
    for name, m in mosaic.unet.named_modules():
        if not isinstance(m, Transformer2DModel) or not len(m.transformer_blocks):
            continue
        chain = m.transformer_blocks[0]  # the StageSwitchedChain of positions start..stop-1
        for k, j in enumerate(range(chain.start, chain.stop)):
            head_dim, inner, _ = mosaic._block_facts[j]
            heads = inner // head_dim
            targets.update(text_block_targets([stage[j] for stage in mosaic.stage_blocks],
                                              f"{name}.transformer_blocks.{k}.", (heads, heads), FF_MULT * inner,
                                              ff1_parts=2))
    return targets
