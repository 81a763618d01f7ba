"""A tiny DiT for the family conformance suite (``tests/families``) and for users' own tests.

Every family folder has a ``testing`` module with these four functions; the suite runs its checks
(zero sparsity equals dense, shared producers equal copies, save/load, ...) through them only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mosaicdiff.method.calibrate import Calibration

__all__ = ["call", "tiny_calibration", "tiny_dense", "tiny_inputs"]

NUM_CLASSES = 10  # the null (CFG) class id


def tiny_dense(seed: int = 0) -> nn.Module:
    """A random 2-layer ``DiTTransformer2DModel`` (4 heads x 8, MLP 128, 8x8 latents, patch 2), eval mode.

    Every parameter gets extra noise so that no adaLN, gate or bias is trivially zero.
    """
    from diffusers import DiTTransformer2DModel

    g = torch.Generator().manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
                                  norm_num_groups=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        ref = model.transformer_blocks[0].norm1.emb.state_dict()  # one embedder, as trained DiTs have
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(ref)
    return model.eval()


def tiny_calibration(dense: nn.Module, n: int = 8, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randn(n, 4, 8, 8, generator=g), torch.arange(n) % NUM_CLASSES, null_class=NUM_CLASSES)


def tiny_inputs(dense: nn.Module, batch: int, seed: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    """Latents and the forward's conditioning keyword arguments (class labels, the null class included)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES + 1, (batch,), generator=g)
    labels[-1] = NUM_CLASSES
    return torch.randn(batch, 4, 8, 8, generator=g), {"class_labels": labels}


@torch.no_grad()
def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: dict[str, Any]) -> torch.Tensor:
    return model(x, timestep=t, **conditions, return_dict=False)[0]
