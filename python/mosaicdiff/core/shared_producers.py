"""Shared producer storage of the text-conditioned families (U-Net, PixArt): every stage's producer rows
as views of one tensor per block position.

Pruning slices the producers of a text block (attn1 q/k/v rows of kept heads, attn2 q rows and text
k/v rows of kept heads, ff1 rows of kept channels) and compensates only the consumers (attn1 / attn2
``to_out``, ff2). So for each block position a `TextSharedProducers` stores the union of the
stages' kept units once, in an order where each stage's units are one contiguous run
(`mosaicdiff.method.producer_layout`):

- ``qkv1`` head-major (q, k, v of head 0, then of head 1, ...): attention reads that layout
  (``layout="heads"``);
- ``q2`` by head, ``kv2`` head-major (k, v of head 0, ...);
- ``ff1`` by channel, in `TextSharedProducers.ff1_parts` row blocks: one for a plain MLP; for a
  GEGLU ``[value rows | gate rows]``, both halves in the same channel order, so a stage's kept
  channels are value rows ``a..b`` and gate rows ``F + a..F + b`` (two views, never concatenated).

A block built on `SharedTextBlockMixin` holds per stage only its own fields (the compensated
consumers and whatever else the family keeps per stage, such as the U-Net's norms) and reads its
producers as row-range views. `share_text_producers` builds one position's storage from the stages'
weights; a mosaic's ``from_dense`` shares every position with `share_stages` and
`install_shared_blocks`, its constructor builds them empty with `empty_shared_blocks`. The
unit-order operations live one layer up (`mosaicdiff.method`): a family's storage class hands them
in as `TextSharedProducers.layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn

from mosaicdiff.core.gemm import SharedProducerRowsMixin
from mosaicdiff.core.stages import frozen

__all__ = ["KINDS", "PRODUCER_FIELDS", "SharedTextBlockMixin", "TextSharedProducers", "empty_shared_blocks",
           "install_shared_blocks", "share_stages", "share_text_producers", "stage_ranges"]

#: The unit kinds of a text block: self- / cross-attention heads, MLP channels.
KINDS = ("heads1", "heads2", "channels")
#: The fields a `TextSharedProducers` stores once per block position.
PRODUCER_FIELDS = ("qkv1_weight", "qkv1_bias", "q2_weight", "q2_bias", "kv2_weight", "kv2_bias", "ff1_weight",
                   "ff1_bias")
#: Per head producer: (unit kind, parts per head: its rows per unit are ``parts * head_dim``, head-major).
_HEAD_PRODUCERS = {"qkv1": ("heads1", 3), "q2": ("heads2", 1), "kv2": ("heads2", 2)}


class TextSharedProducers(nn.Module):
    r"""The producer rows of one text block position, stored once for every stage.

    Parameters:
        heads1, heads2 (`torch.Tensor`): dense self- / cross-attention head indices in storage order.
        channels (`torch.Tensor`): dense MLP channel indices in storage order.
        head_dim (`int`), width (`int`), text_width (`int`): the block's head dim, width C and
            text width T (``cross_attention_dim``).

    Holds frozen parameters (`PRODUCER_FIELDS`, shapes from `block_shapes`), uninitialised until
    assigned (`from_orders` or a loaded state dict). A family's subclass sets `block_shapes`,
    `ff1_parts` and `layout`.
    """

    #: The family's compact block shapes, ``(h1, h2, channels, head_dim, width, text_width) -> dict``.
    block_shapes: ClassVar[Callable[..., Mapping[str, tuple[int, ...]]]]
    #: ff1 row blocks per channel: 1 (a plain MLP) or 2 (a GEGLU's value and gate rows).
    ff1_parts: ClassVar[int] = 1
    #: `mosaicdiff.method.producer_layout` (a layer above core, so the family hands it in).
    layout: ClassVar[ModuleType]
    #: The rows `mosaicdiff.quantize` stores as float8 (every stage's blocks read slices of them and their scales).
    fp8_weights = ("qkv1_weight", "q2_weight", "kv2_weight", "ff1_weight")

    def __init__(self, heads1, heads2, channels, head_dim: int, width: int, text_width: int):
        super().__init__()
        units = [torch.as_tensor(u, dtype=torch.int64, device="cpu").reshape(-1) for u in (heads1, heads2, channels)]
        self.heads1, self.heads2, self.channels = units
        self.head_dim = int(head_dim)
        shapes = self.block_shapes(*(u.numel() for u in units), self.head_dim, int(width), int(text_width))
        for name in PRODUCER_FIELDS:
            setattr(self, name, frozen(torch.empty(shapes[name])))

    @classmethod
    def from_orders(cls, orders: Mapping[str, Sequence[int]], weights: Sequence[Any], head_dim: int):
        """Gather the stored rows from the stages' weights (each unit from a stage that keeps it).

        Args:
            orders: per unit kind (`KINDS`), the storage order of its units.
            weights: the compact weights of this block position in every stage.
            head_dim: the block's head dim.
        """
        w0, hd, lay = weights[0], int(head_dim), cls.layout
        store = cls(*(orders[k] for k in KINDS), hd, int(w0.out1_bias.shape[0]), int(w0.kv2_weight.shape[1]))
        ref = w0.qkv1_weight
        out = {name: torch.empty(getattr(store, name).shape, dtype=ref.dtype, device=ref.device)
               for name in PRODUCER_FIELDS}
        positions = {kind: lay.unit_positions(getattr(store, kind)) for kind in KINDS}
        for w in weights:  # a unit kept by several stages has the same (sliced) rows in each
            for name, (kind, parts) in _HEAD_PRODUCERS.items():
                kept = getattr(w, f"kept_{kind}")
                dst, h, stored = positions[kind][kept.cpu()], kept.numel(), getattr(store, kind).numel()
                for suffix in ("_weight", "_bias"):
                    src = lay.head_major(getattr(w, name + suffix), parts, h, hd)
                    out[name + suffix].view(stored, parts * hd, *src.shape[1:])[dst] = \
                        src.reshape(h, parts * hd, *src.shape[1:])
            dst, f, n = positions["channels"][w.kept_channels.cpu()], w.kept_channels.numel(), store.channels.numel()
            for suffix in ("_weight", "_bias"):  # each row block in channel order
                src = getattr(w, "ff1" + suffix)
                out["ff1" + suffix].view(cls.ff1_parts, n, *src.shape[1:])[:, dst] = \
                    src.reshape(cls.ff1_parts, f, *src.shape[1:])
        for name, t in out.items():
            setattr(store, name, frozen(t))
        return store

    def extra_repr(self) -> str:
        return (f"heads1={self.heads1.numel()}, heads2={self.heads2.numel()}, channels={self.channels.numel()}, "
                f"head_dim={self.head_dim}")


class SharedTextBlockMixin(SharedProducerRowsMixin):
    r"""Makes a compact text block (`mosaicdiff.core.text_blocks.TextBlockMixin`) one whose producer
    operands are row ranges of a `TextSharedProducers` (`_producer_rows`); put it before the block
    class in the bases.

    Parameters:
        producers (`TextSharedProducers`): the storage of this block position, owned by the model
            (its ``producer_storage``): the block keeps a plain reference, so the storage appears
            once in the module tree and in the state dict.
        ranges (`dict`): ``(start, stop)`` of this stage's units in the storage, per unit kind (`KINDS`).
        consumers (`dict`): `consumer_fields`, the consumers' columns in storage order.
        head_dim, eps: as the compact block.

    Raises:
        ValueError: consumer shapes that do not fit the ranges, or kept units the block cannot run
            (`check_kept`).
    """

    qkv_layout = "heads"
    kv_layout = "heads"
    #: The stage's own GEMM weights `mosaicdiff.quantize` stores as float8 (the producers' are the storage's).
    fp8_weights = ("out1_weight", "out2_weight", "ff2_weight")
    #: The fields a stage's block stores itself (the compensated consumers; the family's norms).
    consumer_fields: ClassVar[tuple[str, ...]]
    #: The family's storage class (`empty_shared_blocks` builds one per block position).
    store_class: ClassVar[type[TextSharedProducers]]

    def __init__(self, producers: TextSharedProducers, ranges: Mapping[str, tuple[int, int]],
                 consumers: Mapping[str, torch.Tensor], head_dim: int, eps: float):
        nn.Module.__init__(self)
        self.head_dim, self.eps = int(head_dim), float(eps)
        object.__setattr__(self, "_producers", producers)  # a reference, not a submodule
        self.ranges = {k: (int(ranges[k][0]), int(ranges[k][1])) for k in KINDS}
        for kind in KINDS:
            a, b = self.ranges[kind]
            setattr(self, f"kept_{kind}", getattr(producers, kind)[a:b])
        self.check_kept()
        width, text = int(producers.qkv1_weight.shape[1]), int(producers.kv2_weight.shape[1])
        shapes = self.block_shapes(*self.heads, self.mlp_width, self.head_dim, width, text)
        for name in self.consumer_fields:
            t = consumers[name]
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{type(self).__name__}.{name}: expected shape {shapes[name]}, got {tuple(t.shape)}")
            setattr(self, name, frozen(t))

    def check_kept(self) -> None:
        """Raise ValueError for kept units the block cannot run: here, an attention without heads."""
        if min(self.heads) < 1:
            raise ValueError(f"{type(self).__name__}: every attention keeps at least one head, got {self.heads}")

    @property
    def producers(self) -> TextSharedProducers:
        return self._producers

    def _producer_rows(self, name: str) -> list[slice]:
        """This stage's rows of producer ``name`` in the storage: its run of heads (head-major), or for
        ff1 its run of channels in each row block (value, then a GEGLU's gate: rows ``a..b`` and
        ``F + a..F + b``)."""
        if name == "ff1":
            a, b = self.ranges["channels"]
            n = self._producers.channels.numel()
            return [slice(k * n + a, k * n + b) for k in range(self._producers.ff1_parts)]
        kind, parts = _HEAD_PRODUCERS[name]
        rows = parts * self.head_dim
        a, b = self.ranges[kind]
        return [slice(a * rows, b * rows)]

    def weights(self):
        """The block's tensors as its weights dataclass in the copy layout (qkv1 and kv2 re-laid out
        part-major, a GEGLU's ff1 row blocks concatenated: copies; the rest are views)."""
        (h1, h2), hd = self.heads, self.head_dim
        part_major = self._producers.layout.part_major
        out = {name: getattr(self, name).detach() for name in self.consumer_fields}
        for name, (kind, parts) in _HEAD_PRODUCERS.items():
            heads = h1 if kind == "heads1" else h2
            (rows,) = self.operands(name)
            for suffix, t in zip(("_weight", "_bias"), rows[:2]):
                out[name + suffix] = part_major(t.detach(), parts, heads, hd) if parts > 1 else t.detach()
        ff1 = self.operands("ff1")
        for suffix, blocks in (("_weight", [r.weight for r in ff1]), ("_bias", [r.bias for r in ff1])):
            out["ff1" + suffix] = (torch.cat(blocks) if len(blocks) > 1 else blocks[0]).detach()
        return self.weights_class(**{f"kept_{k}": getattr(self, f"kept_{k}") for k in KINDS}, **out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared ranges={self.ranges}"


def stage_ranges(store: TextSharedProducers, kept: Sequence[Mapping[str, Sequence[int]]]
                 ) -> list[dict[str, tuple[int, int]]]:
    """Per stage, the ``(start, stop)`` of its kept units (``kept_heads1``, ``kept_heads2``,
    ``kept_channels`` lists) in `store`.

    Raises:
        ValueError: a kept list that is not a contiguous run of the storage's units.
    """
    per_kind = {kind: store.layout.unit_ranges(getattr(store, kind).tolist(), [k[f"kept_{kind}"] for k in kept])
                for kind in KINDS}
    return [{kind: per_kind[kind][i] for kind in KINDS} for i in range(len(kept))]


def share_text_producers(store_class: type[TextSharedProducers], stage_weights: Sequence[Any], head_dim: int,
                         consumer_fields: Sequence[str]):
    """A storage and, per stage, the ranges and consumer tensors of one block position, or None.

    Args:
        store_class: the family's `TextSharedProducers`.
        stage_weights: the compact weights of this position in every stage.
        head_dim: the block's head dim.
        consumer_fields: what a stage's block stores itself (`SharedTextBlockMixin.consumer_fields`).

    Returns:
        ``(producers, [(ranges, consumers), ...])``, or None when a unit kind's kept sets have no
        storage order in which each is a run (`mosaicdiff.method.producer_layout.interval_order`).
    """
    lay = store_class.layout
    orders = {k: lay.interval_order([getattr(w, f"kept_{k}").tolist() for w in stage_weights]) for k in KINDS}
    if any(order is None for order in orders.values()):
        return None
    store = store_class.from_orders(orders, stage_weights, head_dim)
    kept = [{f"kept_{k}": getattr(w, f"kept_{k}").tolist() for k in KINDS} for w in stage_weights]
    per_stage = []
    for w, ranges in zip(stage_weights, stage_ranges(store, kept)):
        consumers = {name: getattr(w, name) for name in consumer_fields}
        for field, kind, unit in (("out1_weight", "heads1", head_dim), ("out2_weight", "heads2", head_dim),
                                  ("ff2_weight", "channels", 1)):
            a, b = ranges[kind]
            consumers[field] = lay.permute_unit_columns(getattr(w, field), getattr(w, f"kept_{kind}"),
                                                        orders[kind][a:b], unit)
        per_stage.append((ranges, consumers))
    return store, per_stage


def share_stages(share: Callable[[Sequence[Any], int], Any], stage_weights: Sequence[Sequence[Any]],
                 head_dims: Sequence[int], share_producers: bool | None, stage_configs: list[dict]):
    """Share every block position's producers across the stages, as a family's ``from_dense`` asks.

    Args:
        share: the family's ``share_*_producers(weights, head_dim)`` (`share_text_producers`).
        stage_weights: per stage, the compact weights of every block position.
        head_dims: per block position, its head dim.
        share_producers: True: required; False: never; None: where the kept sets allow it.
        stage_configs: the mosaic's ``stages`` config: with sharing, each block's kept lists are
            rewritten in storage order (in place).

    Returns:
        ``(shared, units)``: per block position ``share``'s result and the ``shared_producers``
        config entry; ``(None, None)`` without sharing.

    Raises:
        ValueError: ``share_producers=True`` with kept sets that cannot share one storage.
    """
    layers, shared = len(head_dims), None
    if share_producers is not False and stage_weights and all(len(s) == layers for s in stage_weights):
        shared = [share([stage[j] for stage in stage_weights], head_dims[j]) for j in range(layers)]
        shared = None if any(x is None for x in shared) else shared
    if share_producers and shared is None:
        raise ValueError("share_producers=True: the stages' kept heads/channels cannot share one storage (each "
                         "stage's units must be a run of one order: prune with share_producers=True)")
    if shared is None:
        return None, None
    for j, (store, per_stage) in enumerate(shared):
        for i, (ranges, _) in enumerate(per_stage):  # the kept lists in storage order
            for kind, (a, b) in ranges.items():
                stage_configs[i]["blocks"][j][f"kept_{kind}"] = getattr(store, kind)[a:b].tolist()
    # a storage naming its own unit kinds (``kinds``: Flux's) lists those
    return shared, [{k: getattr(store, k).tolist() for k in getattr(store, "kinds", KINDS)} for store, _ in shared]


def install_shared_blocks(mosaic: nn.Module, shared: Sequence[Any], block_class: type, head_dims: Sequence[int],
                          eps: float) -> None:
    """Put `share_stages`'s storages in ``mosaic.producer_storage`` and a `block_class` per stage and
    block position in ``mosaic.stage_blocks``."""
    mosaic.producer_storage = nn.ModuleList(store for store, _ in shared)
    for j, (store, per_stage) in enumerate(shared):
        for i, (ranges, consumers) in enumerate(per_stage):
            mosaic.stage_blocks[i][j] = block_class(store, ranges, consumers, head_dims[j], eps)


def empty_shared_blocks(owner: str, stages: Sequence[dict], shared_producers: Sequence[Mapping[str, Any]],
                        block_class: type, block_facts: Sequence[tuple[int, int, int]], eps: float,
                        what: str = "block", unit_limits: Sequence[int] | None = None
                        ) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``(producer_storage, stage_blocks)`` of a mosaic built from its config: per block position an
    uninitialised storage of ``shared_producers[j]`` and per stage a `block_class` on it.

    Args:
        owner: the model's name, for errors.
        stages: the ``stages`` config (each block's kept lists a run of the storage's units).
        shared_producers: per block position ``heads1``, ``heads2``, ``channels`` in storage order.
        block_class: the family's shared-producer block (`SharedTextBlockMixin`; its storage is a
            ``block_class.store_class``).
        block_facts: per block position ``(head_dim, width, text_width)``.
        eps: the blocks' norm epsilon.
        what: what a block position is called in errors.
        unit_limits: given, each kind's (`KINDS`) unit count: stored units must be unique and below it.

    Raises:
        ValueError: a length other than one entry per block position, stored units out of
            `unit_limits` or repeated, or a stage's kept lists that are not runs of the storage's units.
    """
    if len(shared_producers) != len(block_facts):
        raise ValueError(f"{owner}: shared_producers needs one entry per {what} ({len(block_facts)}), got "
                         f"{len(shared_producers)}")
    stores, stage_blocks = [], nn.ModuleList(nn.ModuleList() for _ in stages)
    for j, (units, (head_dim, width, text)) in enumerate(zip(shared_producers, block_facts)):
        for kind, limit in zip(KINDS, unit_limits or ()):
            values = list(units[kind])
            if len(set(values)) != len(values) or any(not 0 <= v < limit for v in values):
                raise ValueError(f"{owner}: shared_producers[{j}].{kind} must be unique indices in [0, {limit}), "
                                 f"got {values}")
        store = block_class.store_class(units["heads1"], units["heads2"], units["channels"], head_dim, width, text)
        try:
            ranges = stage_ranges(store, [s["blocks"][j] for s in stages])
        except ValueError as exc:
            raise ValueError(f"{owner}: the stages' block {j} does not fit shared_producers[{j}]: {exc}") from None
        for i, r in enumerate(ranges):
            shapes = store.block_shapes(*(r[k][1] - r[k][0] for k in KINDS), head_dim, width, text)
            consumers = {name: torch.empty(shapes[name]) for name in block_class.consumer_fields}
            stage_blocks[i].append(block_class(store, r, consumers, head_dim, eps))
        stores.append(store)
    return nn.ModuleList(stores), stage_blocks
