"""Plain data passed between the pruner (obs/compact) and the runtime (blocks/mosaic).

Kept here, apart from both, so neither side imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STAGE_NAMES = ("early", "middle", "late")


@dataclass
class CompactBlockWeights:
    """The pruned, compensated weights of one DiT block, as physically smaller dense matrices.

    Shapes use C = model width, hd = head_dim, h = kept heads, F = kept MLP channels.
    The qkv rows are laid out [q of kept heads | k of kept heads | v of kept heads], each head
    a contiguous run of hd rows, heads in ascending original order.
    Everything else of the block (adaLN modulation linear, norms) is shared, not stored here.
    """

    kept_heads: torch.Tensor  # (h,) int64, sorted indices of the kept dense heads
    kept_channels: torch.Tensor  # (F,) int64, sorted indices of the kept dense MLP channels
    qkv_weight: torch.Tensor  # (3*h*hd, C)
    qkv_bias: torch.Tensor  # (3*h*hd,)
    proj_weight: torch.Tensor  # (C, h*hd) compensated
    proj_bias: torch.Tensor  # (C,)
    fc1_weight: torch.Tensor  # (F, C)
    fc1_bias: torch.Tensor  # (F,)
    fc2_weight: torch.Tensor  # (C, F) compensated
    fc2_bias: torch.Tensor  # (C,)

    @property
    def num_heads(self) -> int:
        return int(self.kept_heads.numel())

    @property
    def mlp_width(self) -> int:
        return int(self.kept_channels.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in TENSOR_FIELDS}


TENSOR_FIELDS = (
    "kept_heads", "kept_channels", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
    "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
)


@dataclass
class StageSpec:
    """One stage of the trajectory: timesteps t with t_start <= t < t_end use `blocks`."""

    name: str
    t_start: int
    t_end: int
    sparsity: float  # requested structural sparsity of this stage's blocks
    blocks: list[CompactBlockWeights] = field(default_factory=list)

    def contains(self, t: int) -> bool:
        return self.t_start <= t < self.t_end
