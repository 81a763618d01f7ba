"""Shared producer storage for U-Net mosaics: every stage's producer rows as views of one tensor per block.

The U-Net counterpart of `mosaicdiff.families.dit.producers`. Pruning slices the producers of a U-Net
block (attn1 q/k/v rows of kept heads, attn2 q rows and text k/v rows of kept heads, GEGLU value
row j and gate row j + F of kept channels: `mosaicdiff.families.unet.adapter`) and
compensates only the consumers (attn1 / attn2 ``to_out``, ff2). So for each block position,
`UNetSharedProducers` stores the union of the stages' kept units once, in an order where each
stage's units are one contiguous run (`mosaicdiff.method.producer_layout`):

- ``qkv1`` head-major (q, k, v of head 0, then of head 1, ...): attention reads that layout
  (``layout="heads"``);
- ``q2`` by head, ``kv2`` head-major (k, v of head 0, ...);
- ``ff1`` as ``[value rows | gate rows]``, both halves in the same channel order: a stage's kept
  channels are value rows ``a..b`` and gate rows ``F + a..F + b``, which ``linear_geglu`` reads
  as two views (``gate_weight``), never concatenated.

A `SharedUNetBlock` holds per stage only its norms and compensated consumers (columns permuted to
the storage order) and reads its producers as row-range views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mosaicdiff.core.stages import frozen
from mosaicdiff.families.unet.blocks import CompactUNetBlock, CompactUNetBlockWeights
from mosaicdiff.method.producer_layout import interval_order, unit_positions, unit_ranges

__all__ = ["CONSUMER_FIELDS", "PRODUCER_FIELDS", "SharedUNetBlock", "UNetSharedProducers", "producer_shapes",
           "share_unet_producers"]

#: The per-stage fields of a shared-producer block: the norms and the compensated consumers.
CONSUMER_FIELDS = (*(f"norm{k}_{p}" for k in (1, 2, 3) for p in ("weight", "bias")),
                   "out1_weight", "out1_bias", "out2_weight", "out2_bias", "ff2_weight", "ff2_bias")
#: The fields a `UNetSharedProducers` stores once per block position.
PRODUCER_FIELDS = ("qkv1_weight", "qkv1_bias", "q2_weight", "q2_bias", "kv2_weight", "kv2_bias",
                   "ff1_weight", "ff1_bias")


def _head_major(t: torch.Tensor, parts: int, heads: int, head_dim: int) -> torch.Tensor:
    """``[part 0 of every head | part 1 ...]`` rows -> ``[every part of head 0 | of head 1 ...]``."""
    return t.reshape(parts, heads, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _part_major(t: torch.Tensor, parts: int, heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of `_head_major`."""
    return t.reshape(heads, parts, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def producer_shapes(heads1: int, heads2: int, channels: int, head_dim: int, width: int, text_width: int) -> dict:
    """The shape of every `PRODUCER_FIELDS` tensor for these unit counts (a storage's or a stage's)."""
    i1, i2 = heads1 * head_dim, heads2 * head_dim
    return {"qkv1_weight": (3 * i1, width), "qkv1_bias": (3 * i1,), "q2_weight": (i2, width), "q2_bias": (i2,),
            "kv2_weight": (2 * i2, text_width), "kv2_bias": (2 * i2,), "ff1_weight": (2 * channels, width),
            "ff1_bias": (2 * channels,)}


class UNetSharedProducers(nn.Module):
    r"""The producer rows of one U-Net block position, stored once for every stage.

    Parameters:
        heads1, heads2 (`torch.Tensor`): dense self- / cross-attention head indices in storage order.
        channels (`torch.Tensor`): dense GEGLU channel indices in storage order.
        head_dim (`int`), width (`int`), text_width (`int`): the block's head dim, width C and
            text width T (``cross_attention_dim``).

    Holds frozen parameters (`PRODUCER_FIELDS`, shapes `producer_shapes`), uninitialised until
    assigned (`from_stage_weights` or a loaded state dict).
    """

    def __init__(self, heads1, heads2, channels, head_dim: int, width: int, text_width: int):
        super().__init__()
        units = [torch.as_tensor(u, dtype=torch.int64).reshape(-1).cpu() for u in (heads1, heads2, channels)]
        self.heads1, self.heads2, self.channels = units
        self.head_dim = int(head_dim)
        shapes = producer_shapes(*(u.numel() for u in units), self.head_dim, int(width), int(text_width))
        for name, shape in shapes.items():
            setattr(self, name, frozen(torch.empty(shape)))

    @classmethod
    def from_stage_weights(cls, heads1: Sequence[int], heads2: Sequence[int], channels: Sequence[int],
                           weights: Sequence[CompactUNetBlockWeights], head_dim: int) -> UNetSharedProducers:
        """Gather the stored rows from the stages' weights (each unit from a stage that keeps it)."""
        w0 = weights[0]
        width, text = int(w0.out1_bias.shape[0]), int(w0.kv2_weight.shape[1])
        store = cls(heads1, heads2, channels, head_dim, width, text)
        hd, ref = int(head_dim), w0.qkv1_weight
        out = {name: torch.empty(getattr(store, name).shape, dtype=ref.dtype, device=ref.device)
               for name in PRODUCER_FIELDS}
        rows1, rows2, rows_f = unit_positions(store.heads1), unit_positions(store.heads2), unit_positions(store.channels)
        n_f = store.channels.numel()
        for w in weights:  # a unit kept by several stages has the same (sliced) rows in each
            for kept, table, name, parts in ((w.kept_heads1, rows1, "qkv1", 3), (w.kept_heads2, rows2, "q2", 1),
                                             (w.kept_heads2, rows2, "kv2", 2)):
                h = kept.numel()
                dst = table[kept.cpu()]
                for suffix in ("_weight", "_bias"):
                    src = _head_major(getattr(w, name + suffix), parts, h, hd)
                    out[name + suffix].view(-1, parts * hd, *src.shape[1:])[dst] = \
                        src.reshape(h, parts * hd, *src.shape[1:])
            f = w.kept_channels.numel()
            dst = rows_f[w.kept_channels.cpu()]
            for suffix in ("_weight", "_bias"):
                src = getattr(w, "ff1" + suffix)
                out["ff1" + suffix][dst] = src[:f]  # value rows
                out["ff1" + suffix][n_f + dst] = src[f:]  # gate rows, same order
        for name, t in out.items():
            setattr(store, name, frozen(t))
        return store

    def extra_repr(self) -> str:
        return (f"heads1={self.heads1.numel()}, heads2={self.heads2.numel()}, channels={self.channels.numel()}, "
                f"head_dim={self.head_dim}")


class SharedUNetBlock(CompactUNetBlock):
    r"""A `CompactUNetBlock` whose producer weights are row ranges of a `UNetSharedProducers`.

    Parameters:
        producers (`UNetSharedProducers`): the storage of this block position, owned by the model
            (``MosaicUNet.producer_storage``): the block keeps a plain reference, so the storage
            appears once in the module tree and in the state dict.
        ranges (`dict`): ``(start, stop)`` of this stage's units in the storage, per unit kind
            (``"heads1"``, ``"heads2"``, ``"channels"``).
        consumers (`dict`): `CONSUMER_FIELDS`, the consumers' columns in storage order.
        head_dim, eps: as `CompactUNetBlock`.

    Raises:
        ValueError: consumer shapes that do not fit the ranges, or an attention without heads.
    """

    qkv_layout = "heads"
    kv_layout = "heads"

    def __init__(self, producers: UNetSharedProducers, ranges: dict[str, tuple[int, int]],
                 consumers: dict[str, torch.Tensor], head_dim: int, eps: float = 1e-5):
        nn.Module.__init__(self)
        self.head_dim, self.eps = int(head_dim), float(eps)
        object.__setattr__(self, "_producers", producers)  # a reference, not a submodule
        self.ranges = {k: (int(ranges[k][0]), int(ranges[k][1])) for k in ("heads1", "heads2", "channels")}
        for field, kind in (("kept_heads1", "heads1"), ("kept_heads2", "heads2"), ("kept_channels", "channels")):
            a, b = self.ranges[kind]
            setattr(self, field, getattr(producers, kind)[a:b])
        if min(self.heads) < 1:
            raise ValueError(f"SharedUNetBlock: every attention keeps at least one head, got {self.heads}")
        width = int(producers.qkv1_weight.shape[1])
        h1, h2 = (n * self.head_dim for n in self.heads)
        shapes = {**{f"norm{k}_{p}": (width,) for k in (1, 2, 3) for p in ("weight", "bias")},
                  "out1_weight": (width, h1), "out1_bias": (width,), "out2_weight": (width, h2),
                  "out2_bias": (width,), "ff2_weight": (width, self.mlp_width), "ff2_bias": (width,)}
        for name, shape in shapes.items():
            t = consumers[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"SharedUNetBlock.{name}: expected shape {shape}, got {tuple(t.shape)}")
            setattr(self, name, frozen(t))

    @property
    def producers(self) -> UNetSharedProducers:
        return self._producers

    def _rows(self, name: str, kind: str, rows_per_unit: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.ranges[kind]
        p = self._producers
        return (getattr(p, name + "_weight")[a * rows_per_unit:b * rows_per_unit],
                getattr(p, name + "_bias")[a * rows_per_unit:b * rows_per_unit])

    def qkv1_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows("qkv1", "heads1", 3 * self.head_dim)

    def q2_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows("q2", "heads2", self.head_dim)

    def kv2_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows("kv2", "heads2", 2 * self.head_dim)

    def ff1_params(self) -> tuple[torch.Tensor, ...]:
        """``(value weight, value bias, gate weight, gate bias)``: rows ``a..b`` and ``F + a..F + b``."""
        a, b = self.ranges["channels"]
        p = self._producers
        n = p.channels.numel()
        return p.ff1_weight[a:b], p.ff1_bias[a:b], p.ff1_weight[n + a:n + b], p.ff1_bias[n + a:n + b]

    def weights(self) -> CompactUNetBlockWeights:
        """The block's tensors as a `CompactUNetBlockWeights` in the copy layout (qkv1 and kv2
        re-laid out part-major and ff1 concatenated: copies; the rest are views)."""
        (h1, h2), hd = self.heads, self.head_dim
        qkv_w, qkv_b = self.qkv1_params()
        kv_w, kv_b = self.kv2_params()
        q_w, q_b = self.q2_params()
        vw, vb, gw, gb = self.ff1_params()
        return CompactUNetBlockWeights(
            kept_heads1=self.kept_heads1, kept_heads2=self.kept_heads2, kept_channels=self.kept_channels,
            **{name: getattr(self, name).detach() for name in CONSUMER_FIELDS},
            qkv1_weight=_part_major(qkv_w.detach(), 3, h1, hd), qkv1_bias=_part_major(qkv_b.detach(), 3, h1, hd),
            q2_weight=q_w.detach(), q2_bias=q_b.detach(),
            kv2_weight=_part_major(kv_w.detach(), 2, h2, hd), kv2_bias=_part_major(kv_b.detach(), 2, h2, hd),
            ff1_weight=torch.cat([vw, gw]).detach(), ff1_bias=torch.cat([vb, gb]).detach())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared ranges={self.ranges}"


def _permute_columns(w: torch.Tensor, kept: torch.Tensor, order: Sequence[int], unit: int) -> torch.Tensor:
    """`w`'s column groups (one per unit of `kept`) reordered to follow `order`."""
    groups = unit_positions(kept.cpu())[torch.as_tensor(list(order), dtype=torch.int64)]
    idx = (groups[:, None] * unit + torch.arange(unit)).reshape(-1)
    return w.index_select(1, idx.to(w.device)).contiguous()


def stage_ranges(store: UNetSharedProducers, kept: Sequence[dict]) -> list[dict[str, tuple[int, int]]]:
    """Per stage, the ``(start, stop)`` of its kept units (``kept_heads1``, ``kept_heads2``,
    ``kept_channels`` lists) in `store`.

    Raises:
        ValueError: a kept list that is not a contiguous run of the storage's units.
    """
    per_kind = {kind: unit_ranges(getattr(store, kind).tolist(), [k[f"kept_{kind}"] for k in kept])
                for kind in ("heads1", "heads2", "channels")}
    return [{kind: per_kind[kind][i] for kind in per_kind} for i in range(len(kept))]


def share_unet_producers(stage_weights: Sequence[CompactUNetBlockWeights], head_dim: int):
    """A storage and, per stage, the ranges and consumer tensors of one block position, or None.

    Args:
        stage_weights: the compact weights of this position in every stage.
        head_dim: the block's head dim.

    Returns:
        ``(producers, [(ranges, consumers), ...])``, or None when a unit kind's kept sets have no
        storage order in which each is a run (`mosaicdiff.method.producer_layout.interval_order`).
    """
    kinds = ("heads1", "heads2", "channels")
    orders = {k: interval_order([getattr(w, f"kept_{k}").tolist() for w in stage_weights]) for k in kinds}
    if any(order is None for order in orders.values()):
        return None
    store = UNetSharedProducers.from_stage_weights(orders["heads1"], orders["heads2"], orders["channels"],
                                                   stage_weights, head_dim)
    kept = [{f"kept_{k}": getattr(w, f"kept_{k}").tolist() for k in kinds} for w in stage_weights]
    per_stage = []
    for w, ranges in zip(stage_weights, stage_ranges(store, kept)):
        def in_order(kind):
            a, b = ranges[kind]
            return orders[kind][a:b]

        consumers = {name: getattr(w, name) for name in CONSUMER_FIELDS}
        consumers["out1_weight"] = _permute_columns(w.out1_weight, w.kept_heads1, in_order("heads1"), head_dim)
        consumers["out2_weight"] = _permute_columns(w.out2_weight, w.kept_heads2, in_order("heads2"), head_dim)
        consumers["ff2_weight"] = _permute_columns(w.ff2_weight, w.kept_channels, in_order("channels"), 1)
        per_stage.append((ranges, consumers))
    return store, per_stage
