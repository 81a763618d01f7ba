"""The model adapter of diffusers' ``UNet2DConditionModel`` (SD 1.x/2.x and SDXL layouts).

Only the ``BasicTransformerBlock``s inside the U-Net's ``Transformer2DModel``s are pruned (as the
paper's successor Diff-ES does); ResNets, convolutions, the time / added-condition embeddings
and the text encoders are untouched. Per block three groups:

- ``attn1`` (self-attention): heads = rows of ``to_q/to_k/to_v`` and groups of ``head_dim``
  columns of ``to_out[0]`` (compensated with the Hessian of its input);
- ``attn2`` (cross-attention): the same, ``to_k/to_v`` reading the text states;
- ``ff`` (GEGLU): channel ``j`` = rows ``j`` and ``j + F`` of ``ff.net[0].proj`` (value and gate
  halves) and column ``j`` of ``ff.net[2]`` (compensated).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mosaicdiff.core.adapter import ModelAdapter, PrunableGroup, PrunedGroup, unwrap_model
from mosaicdiff.core.text_blocks import compact_text_fields, text_block_widths
from mosaicdiff.families.unet.blocks import CompactUNetBlockWeights

__all__ = ["UNET", "UNetAdapter", "transformer_blocks", "unet_skeleton"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every ``BasicTransformerBlock`` of the U-Net's ``Transformer2DModel``s, in module order."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    inner = unwrap_model(model)
    return [b for m in inner.modules() if isinstance(m, Transformer2DModel) for b in m.transformer_blocks]


def unet_skeleton(unet: nn.Module) -> nn.Module:
    """A copy of `unet` without its transformer blocks' weights (they are replaced afterwards).

    The blocks are swapped for empty modules before copying, so the copy never holds them.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    saved = []
    for m in unet.modules():
        if isinstance(m, Transformer2DModel):
            saved.append((m, m.transformer_blocks))
            m.transformer_blocks = nn.ModuleList(nn.Identity() for _ in m.transformer_blocks)
    try:
        skeleton = copy.deepcopy(unet)
    finally:
        for m, blocks in saved:
            m.transformer_blocks = blocks
    return skeleton.eval().requires_grad_(False)


def _head_dim(attn) -> int:
    return attn.inner_dim // attn.heads


def _geglu_rows(inner: int):
    def rows(channels: torch.Tensor) -> torch.Tensor:  # value row j and gate row j + F
        return torch.cat([channels, channels + inner])

    return rows


class UNetAdapter(ModelAdapter):
    """diffusers' ``UNet2DConditionModel``: its transformer blocks are pruned into `MosaicUNet`."""

    name = "U-Net"

    def handles(self, model: nn.Module) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(model, UNet2DConditionModel)

    def validate(self, model: nn.Module) -> None:
        from diffusers.models.attention import GEGLU, BasicTransformerBlock

        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError("this UNet2DConditionModel has no transformer blocks: nothing to prune")
        for i, b in enumerate(blocks):
            what = None
            if not isinstance(b, BasicTransformerBlock):
                what = f"a {type(b).__name__}, not a BasicTransformerBlock"
            elif b.norm_type != "layer_norm" or not b.norm1.elementwise_affine:
                what = f"norm_type {b.norm_type!r} (only affine 'layer_norm' blocks are supported)"
            elif b.only_cross_attention or b.attn2 is None or b.pos_embed is not None:
                what = "a block layout other than self-attention + cross-attention + feed-forward"
            elif not isinstance(b.ff.net[0], GEGLU):
                what = f"a {type(b.ff.net[0]).__name__} feed-forward (only GEGLU is supported)"
            else:
                for attn in (b.attn1, b.attn2):
                    if attn.residual_connection or attn.rescale_output_factor != 1.0 or attn.norm_cross is not None \
                            or attn.group_norm is not None or attn.spatial_norm is not None:
                        what = "an attention with residual/rescale/norm options"
                    elif attn.inner_dim % attn.heads:
                        what = f"an attention whose width {attn.inner_dim} is not divisible by {attn.heads} heads"
            if what:
                raise ValueError(f"transformer block {i} is {what}; MosaicUNet computes SD/SDXL blocks")

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return transformer_blocks(model)

    def groups(self, block: nn.Module) -> Mapping[str, PrunableGroup]:
        inner = block.ff.net[2].in_features

        def heads(attn) -> PrunableGroup:
            return PrunableGroup("heads", attn.to_out[0], (attn.to_q, attn.to_k, attn.to_v), _head_dim(attn))

        return {"attn1": heads(block.attn1), "attn2": heads(block.attn2),
                "ff": PrunableGroup("channels", block.ff.net[2], (block.ff.net[0].proj,), 1,
                                    producer_rows=_geglu_rows(inner))}

    def run(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Mapping[str, Any]) -> torch.Tensor:
        # the U-Net names its noisy input ``sample``: encoder_hidden_states (and added_cond_kwargs) as keywords
        return model(x_t, t, **condition).sample

    def check_calibration(self, model: nn.Module, calibration: Any) -> None:
        """``encoder_hidden_states`` (one row per latent, the U-Net's text width), SDXL's
        ``added_cond_kwargs`` exactly when the U-Net takes them, latents it can run.

        Raises:
            TypeError: not a `ConditionedCalibration`, or one without ``encoder_hidden_states``.
            ValueError: the data does not fit this U-Net (each mismatch named).
        """
        from mosaicdiff.method.calibrate import ConditionedCalibration

        kind = ("a U-Net is calibrated with TextCalibration(latents, prompt_embeds, ...) or a ConditionedCalibration "
                "with conditions={'encoder_hidden_states': ..., 'added_cond_kwargs': {...} (SDXL)}")
        if not isinstance(calibration, ConditionedCalibration):
            raise TypeError(f"{kind}; got {type(calibration).__name__}")
        cond, n = calibration.conditions, len(calibration)
        text = cond.get("encoder_hidden_states")
        if text is None:
            raise TypeError(f"{kind}; got conditions with keys {sorted(cond)}")
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[0] != n:
            got = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"conditions['encoder_hidden_states'] (prompt_embeds) must be ({n}, S, D): one row per "
                             f"latent, got {got}")
        cfg = unwrap_model(model).config
        channels = int(cfg.in_channels)
        latents = calibration.latents
        if latents.shape[1] != channels:
            raise ValueError(f"calibration latents have {latents.shape[1]} channels, the U-Net takes "
                             f"{channels} (config.in_channels)")
        factor = 2 ** (len(cfg.down_block_types) - 1)
        if any(s % factor for s in latents.shape[2:]):
            raise ValueError(f"calibration latents of size {tuple(latents.shape[2:])}: height and width "
                             f"must be multiples of {factor} for this U-Net")
        width = cfg.cross_attention_dim
        width = width[0] if isinstance(width, (list, tuple)) else width
        if text.shape[-1] != int(width):
            raise ValueError(f"prompt_embeds have width {text.shape[-1]}, the U-Net's "
                             f"cross_attention_dim is {width}")
        added = cond.get("added_cond_kwargs")
        sdxl = cfg.addition_embed_type == "text_time"
        if sdxl and not (isinstance(added, Mapping) and {"text_embeds", "time_ids"} <= set(added)):
            raise ValueError("this U-Net is SDXL-style (addition_embed_type='text_time'): TextCalibration needs "
                             "pooled_prompt_embeds and add_time_ids (conditions['added_cond_kwargs'] = "
                             "{'text_embeds': ..., 'time_ids': ...})")
        if not sdxl and added is not None:
            raise ValueError("this U-Net takes no pooled embeddings / time ids (addition_embed_type is not "
                             "'text_time'): pass TextCalibration without them (no conditions['added_cond_kwargs'])")
        if sdxl:
            for key, cols in (("text_embeds", None), ("time_ids", 6)):
                value = added[key]
                if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != n \
                        or (cols is not None and value.shape[1] != cols):
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"conditions['added_cond_kwargs'][{key!r}] must be ({n}, {cols or 'P'}): one row "
                                     f"per latent (expand a single row to all), got {got}")
            want = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
            if added["text_embeds"].shape[-1] != want:
                raise ValueError(f"pooled_prompt_embeds have width {added['text_embeds'].shape[-1]}, "
                                 f"this U-Net expects {want}")

    def default_null_conditions(self, model: nn.Module, calibration: Any) -> dict[str, Any]:
        """Zero prompt (and pooled) embeddings, as SDXL's pipeline uses for an empty negative prompt."""
        cond = calibration.conditions

        def zeros(like: torch.Tensor) -> torch.Tensor:
            return torch.zeros(1, *like.shape[1:], dtype=like.dtype, device=like.device)

        nulls: dict[str, Any] = {"encoder_hidden_states": zeros(cond["encoder_hidden_states"])}
        added = cond.get("added_cond_kwargs")
        if isinstance(added, Mapping) and isinstance(added.get("text_embeds"), torch.Tensor):
            nulls["added_cond_kwargs"] = {"text_embeds": zeros(added["text_embeds"])}  # time ids: the same
        return nulls

    def dense_block(self, block: nn.Module) -> CompactUNetBlockWeights:
        from mosaicdiff.method import compact

        return self.compact_block(block, compact.prune_groups(self.groups(block), None, 0.0, method="magnitude",
                                                              align=None))

    def compact_block(self, block: nn.Module, pruned: Mapping[str, PrunedGroup]) -> CompactUNetBlockWeights:
        norms = {f"norm{k}_{p}": getattr(getattr(block, f"norm{k}"), p).detach().clone()
                 for k in (1, 2, 3) for p in ("weight", "bias")}
        return CompactUNetBlockWeights(**compact_text_fields(pruned), **norms)

    def block_widths(self, block: nn.Module, weights: CompactUNetBlockWeights) -> dict[str, float]:
        return text_block_widths(block, weights)

    def shared_skeleton(self, model: nn.Module) -> nn.Module:
        return unet_skeleton(model)

    def default_scheduler(self):
        from diffusers import EulerDiscreteScheduler

        # SDXL's training schedule and default sampler
        return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear")


UNET = UNetAdapter()

