"""A tiny SDXL-style U-Net for the family conformance suite (``tests/families``) and users' own
tests (see `mosaicdiff.families.dit.testing` for the four functions every family provides)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mosaicdiff.method.calibrate import TextCalibration

__all__ = ["call", "tiny_calibration", "tiny_dense", "tiny_inputs"]

TEXT = 64  # text state width (cross_attention_dim)
TIME_IDS = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])


def tiny_dense(seed: int = 0) -> nn.Module:
    """diffusers' tiny SDXL test layout (12 transformer blocks, 4 heads of 16 at width 64,
    text_time conditioning), 16x16 latents; every parameter gets extra noise."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, use_linear_projection=True, layers_per_block=2,
        block_out_channels=(32, 64), sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=TEXT,
        attention_head_dim=(2, 4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():  # no trivially zero bias / norm
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return unet.eval()


def tiny_calibration(dense: nn.Module, n: int = 6, seed: int = 0) -> TextCalibration:
    g = torch.Generator().manual_seed(seed)
    return TextCalibration(torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 7, TEXT, generator=g),
                           torch.randn(n, 32, generator=g), TIME_IDS)


def tiny_inputs(dense: nn.Module, batch: int, seed: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": TIME_IDS.expand(batch, 6)}
    return torch.randn(batch, 4, 16, 16, generator=g), {
        "encoder_hidden_states": torch.randn(batch, 7, TEXT, generator=g), "added_cond_kwargs": added}


@torch.no_grad()
def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict[str, Any]) -> torch.Tensor:
    return model(x, t, **conditions, return_dict=False)[0]
