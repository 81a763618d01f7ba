"""A tiny PixArt for the family conformance suite (``tests/families``) and users' own tests (see
`mosaicdiff.families.dit.testing` for the four functions every family provides).

The tiny model has PixArt-alpha 1024's layout at toy size: a caption projection from T5-like states
of width `TEXT`, additional (resolution, aspect-ratio) conditions, learned sigma (out_channels =
2 * in_channels), and text states with padding (a keep-mask with zeros).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mosaicdiff.method.calibrate import ConditionedCalibration

__all__ = ["TEXT", "TOKENS", "call", "tiny_calibration", "tiny_dense", "tiny_inputs"]

TEXT, TOKENS = 24, 5  # caption_channels, text tokens


def tiny_dense(seed: int = 0, use_additional_conditions: bool = True) -> nn.Module:
    """A random 2-block ``PixArtTransformer2DModel`` (4 heads of 12: width 48, divisible by 3 as the
    additional conditions need; MLP 192; 8x8 latents, patch 2), eval mode; every parameter gets extra
    noise (no trivially zero bias or table)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=48, sample_size=8, patch_size=2,
                                     caption_channels=TEXT, use_additional_conditions=use_additional_conditions,
                                     norm_num_groups=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _conditions(n: int, g: torch.Generator) -> dict[str, Any]:
    mask = torch.ones(n, TOKENS)
    mask[::2, -2:] = 0  # every other row padded
    return {"encoder_hidden_states": torch.randn(n, TOKENS, TEXT, generator=g), "encoder_attention_mask": mask,
            "added_cond_kwargs": {"resolution": torch.tensor([[64.0, 64.0]]).expand(n, 2),
                                  "aspect_ratio": torch.ones(n, 1)}}


def tiny_calibration(dense: nn.Module, n: int = 6, seed: int = 0) -> ConditionedCalibration:
    """Latents with text states and mask; the null branch a one-row negative prompt (its EOS token kept)."""
    g = torch.Generator().manual_seed(seed)
    null_mask = torch.zeros(1, TOKENS)
    null_mask[0, 0] = 1
    return ConditionedCalibration(torch.randn(n, 4, 8, 8, generator=g), _conditions(n, g),
                                  {"encoder_hidden_states": torch.randn(1, TOKENS, TEXT, generator=g),
                                   "encoder_attention_mask": null_mask})


def tiny_inputs(dense: nn.Module, batch: int, seed: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), _conditions(batch, g)


@torch.no_grad()
def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict[str, Any]) -> torch.Tensor:
    return model(x, timestep=t, **conditions, return_dict=False)[0]
