"""A tiny SD3 for the family conformance suite (``tests/families``) and users' own tests (see
`mosaicdiff.families.dit.testing` for the four functions every family provides).

The tiny model has SD3.5-Medium's layout at toy size: three blocks, the first with dual attention
(``attn2``), the last ``context_pre_only``, q/k RMSNorm; `tiny_dense` also builds the SD3 (no
qk-norm, no dual attention) and SD3.5-Large (qk-norm only) layouts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mosaicdiff.method.calibrate import ConditionedCalibration

__all__ = ["POOLED", "TEXT", "TOKENS", "call", "tiny_calibration", "tiny_config", "tiny_dense", "tiny_inputs"]

TEXT, POOLED, TOKENS = 24, 16, 5  # joint_attention_dim, pooled_projection_dim, text tokens


def tiny_config(qk_norm: str | None = "rms_norm", dual_attention_layers: tuple[int, ...] = (0,),
                num_layers: int = 3) -> dict[str, Any]:
    """``SD3Transformer2DModel`` kwargs of the tiny layout (4 heads of 8: width 32, MLP 128; 8x8 latents
    of 4 channels, patch 2)."""
    return dict(sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=TEXT, caption_projection_dim=32, pooled_projection_dim=POOLED,
                out_channels=4, pos_embed_max_size=8, dual_attention_layers=tuple(dual_attention_layers), qk_norm=qk_norm)


def tiny_dense(seed: int = 0, qk_norm: str | None = "rms_norm", dual_attention_layers: tuple[int, ...] = (0,),
               num_layers: int = 3) -> nn.Module:
    """A random ``SD3Transformer2DModel`` of `tiny_config`, eval mode; every parameter gets extra noise (no
    trivially zero gate or unit norm weight)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**tiny_config(qk_norm, dual_attention_layers, num_layers))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _conditions(n: int, g: torch.Generator) -> dict[str, Any]:
    return {"encoder_hidden_states": torch.randn(n, TOKENS, TEXT, generator=g),
            "pooled_projections": torch.randn(n, POOLED, generator=g)}


def tiny_calibration(dense: nn.Module, n: int = 6, seed: int = 0) -> ConditionedCalibration:
    """Latents with text states and pooled embeddings; the null branch a one-row negative prompt."""
    g = torch.Generator().manual_seed(seed)
    return ConditionedCalibration(torch.randn(n, 4, 8, 8, generator=g), _conditions(n, g), _conditions(1, g))


def tiny_inputs(dense: nn.Module, batch: int, seed: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), _conditions(batch, g)


@torch.no_grad()
def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict[str, Any]) -> torch.Tensor:
    return model(x, timestep=t, **conditions, return_dict=False)[0]
