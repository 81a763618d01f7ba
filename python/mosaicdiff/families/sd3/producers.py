"""Shared producer storage for SD3 mosaics: every stage's producer rows as views of one tensor per block.

Pruning slices the producers of an SD3 block (the joint heads' q/k/v rows of both streams, attn2's
q/k/v rows, the image and text MLPs' ff1 rows) and compensates only the consumers (``to_out[0]``,
``to_add_out``, ``attn2.to_out[0]``, both ff2). So for each block position `SD3SharedProducers`
stores the union of the stages' kept units once, in an order where each stage's units are one
contiguous run (`mosaicdiff.method.producer_layout`): ``qkv``, ``add_qkv`` and ``qkv2`` head-major
(q, k, v of head 0, then of head 1, ...: `qkv_heads` reads that layout), ``ff1`` / ``ffc1`` by
channel, and the q/k RMSNorm weights (never pruned) once. A `SharedSD3Block` holds per stage only
its compensated consumers (columns in storage order) and reads its producers as row-range views.
`mosaicdiff.quantize` stores the producer rows as float8 once, in the storage (a row scale each); a
stage's GEMM reads the scales of its own row range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mosaicdiff.core.gemm import SharedProducerRowsMixin
from mosaicdiff.core.stages import frozen
from mosaicdiff.families.sd3.blocks import (
    SD3_INDEX_FIELDS,
    BlockKind,
    CompactSD3Block,
    CompactSD3BlockWeights,
    block_kind,
    sd3_block_shapes,
)
from mosaicdiff.method import producer_layout as layout

__all__ = ["KINDS", "SD3SharedProducers", "SharedSD3Block", "empty_sd3_shared_blocks", "share_sd3_producers"]

#: The unit kinds of an SD3 block: joint heads, attn2 heads, image / text MLP channels.
KINDS = ("heads", "heads2", "channels", "context_channels")
#: Producers per head (unit kind, rows per head in head_dim units) and per channel (unit kind).
_HEAD_PRODUCERS = {"qkv": "heads", "add_qkv": "heads", "qkv2": "heads2"}
_CHANNEL_PRODUCERS = {"ff1": "channels", "ffc1": "context_channels"}
#: The consumers' column units: (unit kind, columns per unit is head_dim for heads, 1 for channels).
_CONSUMERS = {"out_weight": "heads", "add_out_weight": "heads", "out2_weight": "heads2", "ff2_weight": "channels",
              "ffc2_weight": "context_channels"}


def _stored_fields(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The fields a storage holds: the producers and the q/k norms."""
    prefixes = tuple(f"{p}_" for p in (*_HEAD_PRODUCERS, *_CHANNEL_PRODUCERS))
    return [k for k in shapes if k.startswith(prefixes) or k.startswith("norm")]


class SD3SharedProducers(nn.Module):
    r"""The producer rows of one SD3 block position, stored once for every stage.

    Parameters:
        heads, heads2, channels, context_channels (`torch.Tensor`): dense unit indices in storage order
            (heads2 empty without attn2, context_channels empty in the context_pre_only block).
        kind (`BlockKind`): what the block computes.
        head_dim (`int`), width (`int`): head dim and width C.
    """

    kinds = KINDS
    #: The producer rows `mosaicdiff.quantize` stores as float8 (every stage's blocks read row ranges of them).
    fp8_weights = tuple(f"{name}_weight" for name in (*_HEAD_PRODUCERS, *_CHANNEL_PRODUCERS))

    def __init__(self, heads, heads2, channels, context_channels, kind: BlockKind, head_dim: int, width: int):
        super().__init__()
        for name, units in zip(KINDS, (heads, heads2, channels, context_channels)):
            setattr(self, name, torch.as_tensor(units, dtype=torch.int64, device="cpu").reshape(-1))
        self.kind, self.head_dim = block_kind(*kind), int(head_dim)
        shapes = sd3_block_shapes(self.kind, *(getattr(self, k).numel() for k in KINDS), self.head_dim, int(width))
        self.fields = _stored_fields(shapes)
        for name in self.fields:
            setattr(self, name, frozen(torch.empty(shapes[name])))

    @classmethod
    def from_orders(cls, orders: Mapping[str, Sequence[int]], weights: Sequence[CompactSD3BlockWeights],
                    head_dim: int) -> SD3SharedProducers:
        """Gather the stored rows from the stages' weights (each unit from a stage that keeps it)."""
        w0, hd = weights[0], int(head_dim)
        store = cls(*(orders[k] for k in KINDS), w0.kind, hd, int(w0.out_bias.shape[0]))
        ref = w0.qkv_weight
        out = {name: torch.empty(getattr(store, name).shape, dtype=ref.dtype, device=ref.device)
               for name in store.fields}
        positions = {kind: layout.unit_positions(getattr(store, kind)) for kind in KINDS}
        for w in weights:  # a unit kept by several stages has the same (sliced) rows in each
            for name, kind in _HEAD_PRODUCERS.items():
                if name + "_weight" not in out:
                    continue
                kept = getattr(w, f"kept_{kind}")
                dst, h, stored = positions[kind][kept.cpu()], kept.numel(), getattr(store, kind).numel()
                for suffix in ("_weight", "_bias"):
                    src = layout.head_major(getattr(w, name + suffix), 3, h, hd)
                    out[name + suffix].view(stored, 3 * hd, *src.shape[1:])[dst] = src.reshape(h, 3 * hd,
                                                                                                *src.shape[1:])
            for name, kind in _CHANNEL_PRODUCERS.items():
                if name + "_weight" in out:
                    dst = positions[kind][getattr(w, f"kept_{kind}").cpu()]
                    for suffix in ("_weight", "_bias"):
                        out[name + suffix][dst] = getattr(w, name + suffix)
        for name in store.fields:
            if name.startswith("norm"):
                out[name] = getattr(w0, name)
            setattr(store, name, frozen(out[name]))
        return store

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k).numel()}" for k in KINDS) + f", head_dim={self.head_dim}, {self.kind}"


class SharedSD3Block(SharedProducerRowsMixin, CompactSD3Block):
    r"""A `CompactSD3Block` whose producer operands (`_producer_rows`) and q/k norms are views of an
    `SD3SharedProducers`.

    Parameters:
        producers (`SD3SharedProducers`): the storage of this block position, owned by the model
            (``MosaicSD3.producer_storage``), held by reference.
        ranges (`dict`): ``(start, stop)`` of this stage's units in the storage, per unit kind (`KINDS`).
        consumers (`dict`): the consumers' weights and biases, columns in storage order.
        head_dim, eps, qk_eps: as `CompactSD3Block`.

    Raises:
        ValueError: consumer fields or shapes that do not fit the ranges, an attention without heads
            or an MLP without channels.
    """

    qkv_layout = "heads"
    #: The producer rows live (and are quantized) in the `SD3SharedProducers` storage.
    fp8_weights = ("out_weight", "add_out_weight", "out2_weight", "ff2_weight", "ffc2_weight")

    def __init__(self, producers: SD3SharedProducers, ranges: Mapping[str, tuple[int, int]],
                 consumers: Mapping[str, torch.Tensor], head_dim: int, eps: float = 1e-6, qk_eps: float = 1e-6):
        nn.Module.__init__(self)
        object.__setattr__(self, "_producers", producers)  # a reference, not a submodule
        self.ranges = {k: (int(ranges[k][0]), int(ranges[k][1])) for k in KINDS}
        kept = {f"kept_{k}": getattr(producers, k)[a:b] for k, (a, b) in self.ranges.items()}
        self._setup(producers.kind, head_dim, eps, qk_eps, kept)
        width = int(producers.qkv_weight.shape[1])
        shapes = {k: s for k, s in self.shapes(width).items() if k not in producers.fields}
        if set(consumers) != set(shapes):
            raise ValueError(f"SharedSD3Block: the consumers of a {self.kind} block are {sorted(shapes)}, got "
                             f"{sorted(consumers)}")
        for name, shape in shapes.items():
            t = consumers[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"SharedSD3Block.{name}: expected shape {shape}, got {tuple(t.shape)}")
            setattr(self, name, frozen(t))

    @property
    def producers(self) -> SD3SharedProducers:
        return self._producers

    def _producer_rows(self, name: str) -> list[slice]:
        """This stage's rows of the stored producer ``name``: its run of units, rows per unit."""
        if name in _HEAD_PRODUCERS:
            kind, rows = _HEAD_PRODUCERS[name], 3 * self.head_dim
        else:
            kind, rows = _CHANNEL_PRODUCERS[name], 1
        a, b = self.ranges[kind]
        return [slice(a * rows, b * rows)]

    def qk_norms(self, prefix: str):
        if not self.kind.qk_norm:
            return None
        return getattr(self._producers, f"{prefix}_q"), getattr(self._producers, f"{prefix}_k")

    @property
    def width(self) -> int:
        return int(self._producers.qkv_weight.shape[1])

    def weights(self) -> CompactSD3BlockWeights:
        """The block's tensors in the copy layout (q/k/v rows re-laid out ``[q | k | v]``: copies; the
        rest are views)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in SD3_INDEX_FIELDS}
        for name in self.shapes():
            if name in self._producers.fields:
                continue
            out[name] = getattr(self, name).detach()
        for name, kind in _HEAD_PRODUCERS.items():
            if name + "_weight" in self._producers.fields:
                heads = self.heads2 if kind == "heads2" else self.heads
                for suffix, t in zip(("_weight", "_bias"), self.operands(name)[0][:2]):
                    out[name + suffix] = layout.part_major(t.detach(), 3, heads, self.head_dim)
        for name in _CHANNEL_PRODUCERS:
            if name + "_weight" in self._producers.fields:
                out[name + "_weight"], out[name + "_bias"] = (t.detach() for t in self.operands(name)[0][:2])
        for name in self._producers.fields:
            if name.startswith("norm"):
                out[name] = getattr(self._producers, name).detach()
        return CompactSD3BlockWeights(**out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared ranges={self.ranges}"


def _stage_ranges(store: SD3SharedProducers, kept: Sequence[Mapping[str, Sequence[int]]]):
    per_kind = {kind: layout.unit_ranges(getattr(store, kind).tolist(), [k[f"kept_{kind}"] for k in kept])
                for kind in KINDS}
    return [{kind: per_kind[kind][i] for kind in KINDS} for i in range(len(kept))]


def share_sd3_producers(stage_weights: Sequence[CompactSD3BlockWeights], head_dim: int):
    """A storage and, per stage, the ranges and consumer tensors of one block position, or None when a
    unit kind's kept sets have no storage order in which each is a run."""
    orders = {k: layout.interval_order([getattr(w, f"kept_{k}").tolist() for w in stage_weights]) for k in KINDS}
    if any(order is None for order in orders.values()):
        return None
    store = SD3SharedProducers.from_orders(orders, stage_weights, head_dim)
    kept = [{f"kept_{k}": getattr(w, f"kept_{k}").tolist() for k in KINDS} for w in stage_weights]
    per_stage = []
    for w, ranges in zip(stage_weights, _stage_ranges(store, kept)):
        consumers = {k: v for k, v in w.tensors().items() if k not in SD3_INDEX_FIELDS and k not in store.fields}
        for field, kind in _CONSUMERS.items():
            if field in consumers:
                a, b = ranges[kind]
                consumers[field] = layout.permute_unit_columns(consumers[field], getattr(w, f"kept_{kind}"),
                                                               orders[kind][a:b], head_dim if "heads" in kind else 1)
        per_stage.append((ranges, consumers))
    return store, per_stage


def empty_sd3_shared_blocks(stages: Sequence[dict], shared_producers: Sequence[Mapping[str, Any]],
                            facts: Mapping[str, Any]) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``(producer_storage, stage_blocks)`` of a mosaic built from its config: per block position an
    uninitialised storage of ``shared_producers[j]`` and per stage a `SharedSD3Block` on it.

    Raises:
        ValueError: not one entry per block, stored units out of range or repeated, or a stage's kept
            lists that are not runs of the storage's units.
    """
    kinds = facts["kinds"]
    if len(shared_producers) != len(kinds):
        raise ValueError(f"MosaicSD3: shared_producers needs one entry per block ({len(kinds)}), got "
                         f"{len(shared_producers)}")
    hd, width = facts["head_dim"], facts["width"]
    stores, stage_blocks = [], nn.ModuleList(nn.ModuleList() for _ in stages)
    for j, (units, kind) in enumerate(zip(shared_producers, kinds)):
        for key, limit in unit_limits(facts, kind).items():
            values = list(units.get(key, ()))
            if len(set(values)) != len(values) or any(not 0 <= v < limit for v in values):
                raise ValueError(f"MosaicSD3: shared_producers[{j}].{key} must be unique indices in [0, {limit}), "
                                 f"got {values}")
        store = SD3SharedProducers(*(units.get(k, ()) for k in KINDS), kind, hd, width)
        try:
            ranges = _stage_ranges(store, [s["blocks"][j] for s in stages])
        except ValueError as exc:
            raise ValueError(f"MosaicSD3: the stages' block {j} does not fit shared_producers[{j}]: {exc}") from None
        for i, r in enumerate(ranges):
            counts = [r[k][1] - r[k][0] for k in KINDS]
            shapes = sd3_block_shapes(kind, *counts, hd, width)
            consumers = {k: torch.empty(s) for k, s in shapes.items() if k not in store.fields}
            stage_blocks[i].append(SharedSD3Block(store, r, consumers, hd, facts["eps"], facts["qk_eps"]))
        stores.append(store)
    return nn.ModuleList(stores), stage_blocks


def unit_limits(facts: Mapping[str, Any], kind: BlockKind) -> dict[str, int]:
    """Each unit kind's count in a dense block of this kind (0: the block has none)."""
    return {"heads": facts["heads"], "heads2": facts["heads"] if kind.dual_attention else 0,
            "channels": facts["mlp_hidden"],
            "context_channels": 0 if kind.context_pre_only else facts["context_mlp_hidden"]}
