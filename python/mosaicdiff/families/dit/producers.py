"""Shared producer storage: every stage's q/k/v and fc1 rows as views of one tensor per block.

Only the consumers (attention ``proj``, ``fc2``) are changed by OBS compensation; the producers
(``qkv``, ``fc1``) are rows of the dense weights (`mosaicdiff.method.compact`). So for each block
position, `SharedProducers` stores the union of the stages' kept heads and channels once, in an
order where each stage's units are one contiguous run (`mosaicdiff.method.producer_layout`), and a
`SharedProducerBlock` reads its producer weights as row-range views of it: no copy, and each
GEMM operand stays a dense contiguous matrix. The qkv rows are stored head-major (q, k, v of
head 0, then of head 1, ...) so that a run of heads is a run of rows; attention reads that layout
directly (``layout="heads"``). Per stage only the compensated consumers are stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mosaicdiff.core.gemm import SharedProducerRowsMixin
from mosaicdiff.core.stages import frozen
from mosaicdiff.families.dit.blocks import CompactDiTBlock
from mosaicdiff.families.dit.weights import CompactBlockWeights
from mosaicdiff.method.producer_layout import (
    head_major,
    interval_order,
    part_major,
    permute_unit_columns,
    unit_positions,
    unit_ranges,
)

__all__ = ["CONSUMER_FIELDS", "SharedProducerBlock", "SharedProducers", "share_producers"]

#: The per-stage fields of a shared-producer block (the compensated consumers).
CONSUMER_FIELDS = ("proj_weight", "proj_bias", "fc2_weight", "fc2_bias")


class SharedProducers(nn.Module):
    r"""The producer rows of one block position, stored once for every stage.

    Parameters:
        heads (`torch.Tensor`): dense head indices in storage order.
        channels (`torch.Tensor`): dense MLP channel indices in storage order.
        head_dim (`int`), width (`int`): the model's head dim and width C.

    Holds frozen parameters ``qkv_weight`` ``(3 * len(heads) * head_dim, C)`` (head-major) with
    ``qkv_bias``, and ``fc1_weight`` ``(len(channels), C)`` with ``fc1_bias``; uninitialised until
    assigned (`from_stage_weights` or a loaded state dict).
    """

    #: The rows `mosaicdiff.quantize` stores as float8 (every stage's blocks read slices of them).
    fp8_weights = ("qkv_weight", "fc1_weight")

    def __init__(self, heads, channels, head_dim: int, width: int):
        super().__init__()
        self.heads = torch.as_tensor(heads, dtype=torch.int64).reshape(-1).cpu()
        self.channels = torch.as_tensor(channels, dtype=torch.int64).reshape(-1).cpu()
        self.head_dim = int(head_dim)
        rows = 3 * self.heads.numel() * self.head_dim
        self.qkv_weight = frozen(torch.empty(rows, int(width)))
        self.qkv_bias = frozen(torch.empty(rows))
        self.fc1_weight = frozen(torch.empty(self.channels.numel(), int(width)))
        self.fc1_bias = frozen(torch.empty(self.channels.numel()))

    @classmethod
    def from_stage_weights(cls, heads: Sequence[int], channels: Sequence[int],
                           weights: Sequence[CompactBlockWeights], head_dim: int) -> SharedProducers:
        """Gather the stored rows from the stages' weights (each unit from a stage that keeps it)."""
        width = int(weights[0].proj_bias.shape[0])
        store = cls(heads, channels, head_dim, width)
        ref = weights[0].qkv_weight
        hd = int(head_dim)
        qkv_w = torch.empty(3 * len(heads) * hd, width, dtype=ref.dtype, device=ref.device)
        qkv_b = torch.empty(3 * len(heads) * hd, dtype=ref.dtype, device=ref.device)
        fc1_w = torch.empty(len(channels), width, dtype=ref.dtype, device=ref.device)
        fc1_b = torch.empty(len(channels), dtype=ref.dtype, device=ref.device)
        head_rows, chan_rows = unit_positions(store.heads), unit_positions(store.channels)
        for w in weights:  # a unit kept by several stages has the same (sliced) rows in each
            h = w.num_heads
            if h:
                dst = head_rows[w.kept_heads.cpu()]
                src_w = head_major(w.qkv_weight, 3, h, hd).view(h, 3 * hd, width)
                src_b = head_major(w.qkv_bias, 3, h, hd).view(h, 3 * hd)
                qkv_w.view(-1, 3 * hd, width)[dst] = src_w
                qkv_b.view(-1, 3 * hd)[dst] = src_b
            if w.mlp_width:
                dst = chan_rows[w.kept_channels.cpu()]
                fc1_w[dst] = w.fc1_weight
                fc1_b[dst] = w.fc1_bias
        for name, t in (("qkv_weight", qkv_w), ("qkv_bias", qkv_b), ("fc1_weight", fc1_w), ("fc1_bias", fc1_b)):
            setattr(store, name, frozen(t))
        return store

    def extra_repr(self) -> str:
        return f"heads={self.heads.numel()}, channels={self.channels.numel()}, head_dim={self.head_dim}"


class SharedProducerBlock(SharedProducerRowsMixin, CompactDiTBlock):
    r"""A `CompactDiTBlock` whose qkv and fc1 operands are row ranges of a `SharedProducers`.

    Parameters:
        producers (`SharedProducers`): the storage of this block position. It is owned by the
            model (``MosaicDiT.producer_storage``), not by the block: the block keeps a plain
            reference, so the storage appears once in the module tree and in the state dict.
        head_range, channel_range (`(start, stop)`): this stage's units in the storage.
        consumers (`dict`): ``proj_weight`` (C, h * hd) and ``fc2_weight`` (C, F) with columns in
            storage order, ``proj_bias`` and ``fc2_bias``.
        head_dim, eps, mlp_eps: as `CompactDiTBlock`.
    """

    qkv_layout = "heads"
    #: The producers' qkv and fc1 rows live (and are quantized) in the `SharedProducers` storage.
    fp8_weights = ("proj_weight", "fc2_weight")

    def __init__(self, producers: SharedProducers, head_range: tuple[int, int], channel_range: tuple[int, int],
                 consumers: dict[str, torch.Tensor], head_dim: int, eps: float = 1e-6, mlp_eps: float | None = None):
        nn.Module.__init__(self)
        self.head_dim = int(head_dim)
        self.eps = float(eps)
        self.mlp_eps = float(eps if mlp_eps is None else mlp_eps)
        object.__setattr__(self, "_producers", producers)  # a reference, not a submodule
        self.head_range = (int(head_range[0]), int(head_range[1]))
        self.channel_range = (int(channel_range[0]), int(channel_range[1]))
        self.kept_heads = producers.heads[self.head_range[0]:self.head_range[1]]
        self.kept_channels = producers.channels[self.channel_range[0]:self.channel_range[1]]
        inner, width = self.num_heads * self.head_dim, int(producers.qkv_weight.shape[1])
        shapes = {"proj_weight": (width, inner), "proj_bias": (width,),
                  "fc2_weight": (width, self.mlp_width), "fc2_bias": (width,)}
        for name, shape in shapes.items():
            t = consumers[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"SharedProducerBlock.{name}: expected shape {shape}, got {tuple(t.shape)}")
            setattr(self, name, frozen(t))

    @property
    def producers(self) -> SharedProducers:
        return self._producers

    def _producer_rows(self, name: str) -> list[slice]:
        """This stage's rows of ``"qkv"`` (its heads' q, k, v, head-major) or ``"fc1"`` in the storage."""
        if name == "qkv":
            rows = 3 * self.head_dim
            return [slice(self.head_range[0] * rows, self.head_range[1] * rows)]
        return [slice(*self.channel_range)]

    def weights(self) -> CompactBlockWeights:
        """The block's tensors as a `CompactBlockWeights` (qkv re-laid out ``[q | k | v]``: a copy;
        the rest are views)."""
        qkv_w, qkv_b, _ = self.operands("qkv")[0]
        fc1_w, fc1_b, _ = self.operands("fc1")[0]
        h, hd = self.num_heads, self.head_dim
        return CompactBlockWeights(
            kept_heads=self.kept_heads, kept_channels=self.kept_channels,
            qkv_weight=part_major(qkv_w.detach(), 3, h, hd), qkv_bias=part_major(qkv_b.detach(), 3, h, hd),
            proj_weight=self.proj_weight.detach(), proj_bias=self.proj_bias.detach(),
            fc1_weight=fc1_w.detach(), fc1_bias=fc1_b.detach(),
            fc2_weight=self.fc2_weight.detach(), fc2_bias=self.fc2_bias.detach())


def share_producers(stage_weights: Sequence[CompactBlockWeights], head_dim: int):
    """A storage and one consumer dict + ranges per stage for one block position, or None.

    Args:
        stage_weights: the compact weights of this position in every stage.

    Returns:
        `(producers, [(head_range, channel_range, consumers), ...])`, or None when the kept sets
        have no storage order in which each is a run (`mosaicdiff.method.producer_layout.interval_order`).
    """
    head_order = interval_order([w.kept_heads.tolist() for w in stage_weights])
    chan_order = interval_order([w.kept_channels.tolist() for w in stage_weights])
    if head_order is None or chan_order is None:
        return None
    producers = SharedProducers.from_stage_weights(head_order, chan_order, stage_weights, head_dim)
    head_ranges = unit_ranges(head_order, [w.kept_heads.tolist() for w in stage_weights])
    chan_ranges = unit_ranges(chan_order, [w.kept_channels.tolist() for w in stage_weights])
    per_stage = []
    for w, hr, cr in zip(stage_weights, head_ranges, chan_ranges):
        consumers = {
            "proj_weight": permute_unit_columns(w.proj_weight, w.kept_heads, head_order[hr[0]:hr[1]], int(head_dim)),
            "fc2_weight": permute_unit_columns(w.fc2_weight, w.kept_channels, chan_order[cr[0]:cr[1]], 1),
            "proj_bias": w.proj_bias, "fc2_bias": w.fc2_bias,
        }
        per_stage.append((hr, cr, consumers))
    return producers, per_stage
