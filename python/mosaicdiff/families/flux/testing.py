"""A tiny Flux for the family conformance suite (``tests/families``) and users' own tests (see
`mosaicdiff.families.dit.testing` for the four functions every family provides).

The tiny model has FLUX.1-dev's layout at toy size: 2 double-stream and 2 single-stream blocks of 4
heads of 16 (width 64, MLP 256; RoPE axes 4 + 6 + 6), guidance embedding, text states of width
`TEXT` and `TOKENS` tokens, pooled projections of width `POOLED`, 8x8 unpacked latents of 4
channels (16 packed tokens of 16 channels).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mosaicdiff.families.flux.calibration import image_ids, pack_latents
from mosaicdiff.method.calibrate import ConditionedCalibration

__all__ = ["NUMBER_TIMESTEPS", "POOLED", "TEXT", "TOKENS", "call", "model_inputs", "tiny_calibration", "tiny_config", "tiny_dense",
           "tiny_inputs"]

TEXT, TOKENS, POOLED = 32, 6, 24  # joint_attention_dim, text tokens, pooled_projection_dim
#: FluxPipeline passes tensor timesteps; a Python number becomes the float ``t / 1000``, which
#: ``torch.compile`` specialises on (one graph per value): the compile suite's number forms do not apply.
NUMBER_TIMESTEPS = False


def tiny_config(guidance_embeds: bool = True, **overrides: Any) -> dict[str, Any]:
    """``FluxTransformer2DModel`` kwargs of the tiny layout (`overrides` replace keys)."""
    return {"patch_size": 1, "in_channels": 16, "out_channels": None, "num_layers": 2, "num_single_layers": 2,
            "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": TEXT,
            "pooled_projection_dim": POOLED, "guidance_embeds": guidance_embeds, "axes_dims_rope": (4, 6, 6),
            **overrides}


def tiny_dense(seed: int = 0, **overrides: Any) -> nn.Module:
    """A random tiny ``FluxTransformer2DModel`` (`tiny_config`), eval mode; every parameter gets extra
    noise (no trivially zero bias or modulation; RMSNorm weights away from one)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**tiny_config(**overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _conditions(model: nn.Module, n: int, g: torch.Generator) -> dict[str, Any]:
    cond = {"encoder_hidden_states": torch.randn(n, TOKENS, TEXT, generator=g),
            "pooled_projections": torch.randn(n, POOLED, generator=g)}
    if model.config.guidance_embeds:
        cond["guidance"] = torch.full((n,), 3.5)
    return cond


def tiny_calibration(dense: nn.Module, n: int = 6, seed: int = 0) -> ConditionedCalibration:
    """Unpacked 4 x 8 x 8 latents with text states, pooled projections and guidance; no CFG branch."""
    g = torch.Generator().manual_seed(seed)
    return ConditionedCalibration(torch.randn(n, 4, 8, 8, generator=g), _conditions(dense, n, g), cfg=False)


def tiny_inputs(dense: nn.Module, batch: int, seed: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    """Packed latents ``(batch, 16, 16)`` and the forward's per-row arguments (`call` adds the ids)."""
    g = torch.Generator().manual_seed(seed)
    cond = _conditions(dense, batch, g)
    return pack_latents(torch.randn(batch, 4, 8, 8, generator=g)), cond


def model_inputs(x: torch.Tensor, t: Any, conditions: dict[str, Any]) -> dict[str, Any]:
    """The forward's keyword arguments at scheduler timestep(s) `t` (0..1000, a number or a tensor), as
    ``FluxPipeline`` passes them: ``timestep = t / 1000`` and, unless `conditions` has them, the
    pipeline's ids of a square latent grid and of the text tokens."""
    side = math.isqrt(x.shape[1])
    ids = {"img_ids": image_ids(side, side), "txt_ids": torch.zeros(conditions["encoder_hidden_states"].shape[1], 3)}
    timestep = t / 1000 if isinstance(t, torch.Tensor) and t.is_floating_point() else \
        (torch.as_tensor(t, dtype=torch.float32) / 1000 if isinstance(t, torch.Tensor) else float(t) / 1000)
    return {"hidden_states": x, "timestep": timestep, **ids, **conditions}


@torch.no_grad()
def call(model: nn.Module, x: torch.Tensor, t: Any, conditions: dict[str, Any]) -> torch.Tensor:
    """The forward at scheduler timestep(s) `t` (`model_inputs`)."""
    return model(**model_inputs(x, t, conditions), return_dict=False)[0]
