"""The compact DiT block's weights: what the adapter builds from a pruned block and the runtime
block, the model's skeleton and the loader read (its fields and their shapes defined once)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class CompactBlockWeights:
    """The pruned, compensated weights of one DiT block, as physically smaller dense matrices.

    Shapes (see `compact_block_shapes`) use C = model width, hd = head_dim, h = kept heads,
    F = kept MLP channels. The qkv rows are laid out [q of kept heads | k of kept heads | v of
    kept heads], each head a contiguous run of hd rows, heads in `kept_heads` order (ascending
    as the pruner writes them; a shared-producer mosaic's stage lists them in its storage order).
    Everything else of the block (adaLN modulation linear, norms) is shared, not stored here.
    """

    kept_heads: torch.Tensor  # (h,) int64, unique indices of the kept dense heads, in row order
    kept_channels: torch.Tensor  # (F,) int64, unique indices of the kept dense MLP channels, in row order
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


#: Every field of `CompactBlockWeights`, in declaration order.
TENSOR_FIELDS = tuple(f.name for f in fields(CompactBlockWeights))
#: The kept-index fields (metadata: CPU int64, never cast or moved with the weights).
INDEX_FIELDS = ("kept_heads", "kept_channels")
#: The weight fields (what a compact block stores as parameters and a mosaic saves).
WEIGHT_FIELDS = tuple(name for name in TENSOR_FIELDS if name not in INDEX_FIELDS)


def compact_block_shapes(heads: int, channels: int, head_dim: int, width: int) -> dict[str, tuple[int, ...]]:
    """The shape of every weight field of a compact block keeping `heads` heads and `channels` channels."""
    inner = heads * head_dim
    return {
        "qkv_weight": (3 * inner, width),
        "qkv_bias": (3 * inner,),
        "proj_weight": (width, inner),
        "proj_bias": (width,),
        "fc1_weight": (channels, width),
        "fc1_bias": (channels,),
        "fc2_weight": (width, channels),
        "fc2_bias": (width,),
    }
