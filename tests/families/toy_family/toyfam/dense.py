"""The dense toy denoiser: patch tokens, one timestep + class embedding, pre-norm MLP blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def timestep_features(t: torch.Tensor, width: int) -> torch.Tensor:
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ToyEmbedding(nn.Module):
    """Pixels in and out, the conditioning vector: everything a stage does not prune."""

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.width = width
        self.proj_in = nn.Linear(in_channels, width)
        self.time = nn.Linear(width, width)
        self.label = nn.Embedding(num_classes + 1, width)  # + the null class
        self.proj_out = nn.Linear(width, in_channels)

    def condition(self, timestep: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.time(timestep_features(timestep, self.width).to(dtype)) + self.label(labels))[:, None]


class ToyBlock(nn.Module):
    def __init__(self, width: int, mlp: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(self.norm(h) + cond)))


class ToyDenoiser(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 8, width: int = 32, mlp: int = 96,
                 num_layers: int = 2, num_classes: int = 10):
        super().__init__()
        self.embed = ToyEmbedding(in_channels, width, num_classes)
        self.blocks = nn.ModuleList(ToyBlock(width, mlp) for _ in range(num_layers))

    def forward(self, hidden_states, timestep, class_labels, return_dict: bool = True):
        b, c, hgt, wid = hidden_states.shape
        t = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(b)
        h = self.embed.proj_in(hidden_states.permute(0, 2, 3, 1).reshape(b, hgt * wid, c))
        cond = self.embed.condition(t, class_labels, h.dtype)
        for block in self.blocks:
            h = block(h, cond)
        out = self.embed.proj_out(h).reshape(b, hgt, wid, c).permute(0, 3, 1, 2)
        return (out,) if not return_dict else {"sample": out}
