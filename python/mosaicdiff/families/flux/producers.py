"""Shared producer storage for Flux mosaics: every stage's producer rows as views of one tensor per block.

Pruning slices the producers of a Flux block and compensates only the consumers, so for each block
position a `FluxSharedProducers` stores the union of the stages' kept units once, in an order where
each stage's units are one contiguous run (`mosaicdiff.method.producer_layout`):

- double block: ``qkv`` (image ``to_q/k/v``) and ``add_qkv`` (text ``add_q/k/v_proj``) head-major
  (q, k, v of head 0, then of head 1, ...: attention reads that layout), ``ff1`` and ``ffc1`` (the
  two MLPs' first layers) by channel;
- single block: ``qkv`` head-major and ``mlp`` (``proj_mlp``) by channel: two row ranges, so a
  shared single block runs two GEMMs where a block with its own copies runs one;

plus the q/k RMSNorm weights (the same in every stage). A `SharedFluxDoubleBlock` /
`SharedFluxSingleBlock` holds per stage only its compensated consumers (columns in storage order).
`mosaicdiff.quantize` stores the producer rows as float8 once, in the storage (``fp8_weights``); a
stage's GEMM reads the row scales over the same range as its weight view.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mosaicdiff.core.gemm import SharedProducerRowsMixin
from mosaicdiff.core.stages import frozen
from mosaicdiff.families.flux.blocks import (
    CompactFluxDoubleBlock,
    CompactFluxDoubleWeights,
    CompactFluxSingleBlock,
)
from mosaicdiff.method import producer_layout as lay

__all__ = ["FluxSharedDoubleProducers", "FluxSharedProducers", "FluxSharedSingleProducers", "SharedFluxDoubleBlock",
           "SharedFluxSingleBlock", "empty_shared_block", "share_flux_producers", "storage_class"]

#: Per block kind: the unit kinds, and each stored producer's (unit kind, parts): parts > 0 are heads
#: stored head-major with ``parts * head_dim`` rows each, 0 are channels of one row each.
_LAYOUT = {
    "double": (("heads", "channels", "context_channels"),
               {"qkv": ("heads", 3), "add_qkv": ("heads", 3), "ff1": ("channels", 0), "ffc1": ("context_channels", 0)},
               ("norm_q", "norm_k", "norm_added_q", "norm_added_k")),
    "single": (("heads", "channels"), {"qkv": ("heads", 3), "mlp": ("channels", 0)}, ("norm_q", "norm_k")),
}


def _sources(w: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The producer ``(weight, bias)`` of a block's copies-layout weights, by stored name."""
    if isinstance(w, CompactFluxDoubleWeights):
        return {"qkv": (w.qkv_weight, w.qkv_bias), "add_qkv": (w.add_qkv_weight, w.add_qkv_bias),
                "ff1": (w.ff1_weight, w.ff1_bias), "ffc1": (w.ffc1_weight, w.ffc1_bias)}
    i = 3 * w.kept_heads.numel() * (w.norm_q.shape[0])
    return {"qkv": (w.proj_weight[:i], w.proj_bias[:i]), "mlp": (w.proj_weight[i:], w.proj_bias[i:])}


class FluxSharedProducers(nn.Module):
    r"""The producer rows of one Flux block position, stored once for every stage: the base of
    `FluxSharedDoubleProducers` and `FluxSharedSingleProducers` (`storage_class` picks one).

    Parameters:
        units (`dict`): per unit kind (``heads``, ``channels``, and for a double block
            ``context_channels``) the dense indices in storage order.
        head_dim (`int`), width (`int`): the block's head dim and width C.

    Holds frozen parameters (``<producer>_weight`` / ``_bias`` and the q/k norm weights),
    uninitialised until assigned (`from_stage_weights` or a loaded state dict).
    """

    #: ``"double"`` or ``"single"`` (`_LAYOUT`).
    kind: ClassVar[str]

    def __init__(self, units: Mapping[str, Sequence[int]], head_dim: int, width: int):
        super().__init__()
        self.head_dim = int(head_dim)
        self.kinds, self.fields, norms = _LAYOUT[self.kind]
        for k in self.kinds:
            setattr(self, k, torch.as_tensor(list(units[k]), dtype=torch.int64, device="cpu").reshape(-1))
        for name, (k, _) in self.fields.items():
            rows = getattr(self, k).numel() * self.unit_rows(name)
            setattr(self, name + "_weight", frozen(torch.empty(rows, int(width))))
            setattr(self, name + "_bias", frozen(torch.empty(rows)))
        for name in norms:
            setattr(self, name, frozen(torch.empty(self.head_dim)))

    def unit_rows(self, name: str) -> int:
        parts = self.fields[name][1]
        return parts * self.head_dim if parts else 1

    @classmethod
    def from_stage_weights(cls, orders: Mapping[str, Sequence[int]], weights: Sequence[Any],
                           head_dim: int) -> FluxSharedProducers:
        """Gather the stored rows from the stages' weights (each unit from a stage that keeps it)."""
        w0 = weights[0]
        kind = "double" if isinstance(w0, CompactFluxDoubleWeights) else "single"
        store = storage_class(kind)(orders, head_dim, int(w0.out_bias.shape[0]))
        ref = w0.out_weight
        out = {n: torch.empty(t.shape, dtype=ref.dtype, device=ref.device) for n, t in store.named_parameters()}
        for w in weights:  # a unit kept by several stages has the same (sliced) rows in each
            for name, (weight, bias) in _sources(w).items():
                k, parts = store.fields[name]
                kept = getattr(w, f"kept_{k}").cpu()
                dst, n = lay.unit_positions(getattr(store, k))[kept], kept.numel()
                for suffix, src in (("_weight", weight), ("_bias", bias)):
                    src = lay.head_major(src, parts, n, head_dim) if parts else src
                    r = store.unit_rows(name)
                    out[name + suffix].view(-1, r, *src.shape[1:])[dst] = src.reshape(n, r, *src.shape[1:])
        for name in _LAYOUT[kind][2]:
            out[name] = getattr(w0, name).detach().clone()
        for name, t in out.items():
            setattr(store, name, frozen(t))
        return store

    def extra_repr(self) -> str:
        units = ", ".join(f"{k}={getattr(self, k).numel()}" for k in self.kinds)
        return f"{self.kind}, {units}, head_dim={self.head_dim}"


class FluxSharedDoubleProducers(FluxSharedProducers):
    """The `FluxSharedProducers` of a double block: ``qkv``, ``add_qkv``, ``ff1``, ``ffc1``."""

    kind = "double"
    #: The rows `mosaicdiff.quantize` stores as float8 (every stage's blocks read slices of them).
    fp8_weights = tuple(f"{name}_weight" for name in _LAYOUT["double"][1])


class FluxSharedSingleProducers(FluxSharedProducers):
    """The `FluxSharedProducers` of a single block: ``qkv`` and ``mlp``."""

    kind = "single"
    fp8_weights = tuple(f"{name}_weight" for name in _LAYOUT["single"][1])


def storage_class(kind: str) -> type[FluxSharedProducers]:
    """The `FluxSharedProducers` class of a block kind (``"double"`` or ``"single"``)."""
    return FluxSharedDoubleProducers if kind == "double" else FluxSharedSingleProducers


class _SharedFluxBlock(SharedProducerRowsMixin):
    """Makes a compact Flux block one whose producer operands (`_producer_rows`) and q/k norms are views
    of a `FluxSharedProducers` held by reference; put it before the block class in the bases."""

    qkv_layout = "heads"
    consumer_fields: ClassVar[tuple[str, ...]]

    def __init__(self, producers: FluxSharedProducers, ranges: Mapping[str, tuple[int, int]],
                 consumers: Mapping[str, torch.Tensor], head_dim: int, eps: float = 1e-6, qk_eps: float = 1e-6):
        nn.Module.__init__(self)
        self.head_dim, self.eps, self.qk_eps = int(head_dim), float(eps), float(qk_eps)
        object.__setattr__(self, "_producers", producers)  # a reference, not a submodule
        self.ranges = {k: (int(ranges[k][0]), int(ranges[k][1])) for k in producers.kinds}
        for k, (a, b) in self.ranges.items():
            setattr(self, f"kept_{k}", getattr(producers, k)[a:b])
        if self.heads < 1:
            raise ValueError(f"{type(self).__name__}: the attention keeps at least one head, got {self.heads}")
        shapes = self.shapes(int(producers.qkv_weight.shape[1]))
        for name in self.consumer_fields:
            t = consumers[name]
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{type(self).__name__}.{name}: expected shape {shapes[name]}, got {tuple(t.shape)}")
            setattr(self, name, frozen(t))

    @property
    def producers(self) -> FluxSharedProducers:
        return self._producers

    @property
    def width(self) -> int:
        return int(self._producers.qkv_weight.shape[1])

    def _producer_rows(self, name: str) -> list[slice]:
        """This stage's rows of the stored producer ``name``: its run of units, `unit_rows` each."""
        p = self._producers
        a, b = self.ranges[p.fields[name][0]]
        r = p.unit_rows(name)
        return [slice(a * r, b * r)]

    def _norm(self, name: str) -> torch.Tensor:
        return getattr(self._producers, name)

    norm_q = property(lambda self: self._norm("norm_q"))
    norm_k = property(lambda self: self._norm("norm_k"))

    def weights(self):
        """The block's tensors as its weights dataclass in the copies layout (q/k/v re-laid out
        part-major: copies; the rest are views)."""
        h, hd, p = self.heads, self.head_dim, self._producers
        out = {n: getattr(self, n).detach() for n in self.consumer_fields}
        out.update({n: getattr(p, n).detach() for n in _LAYOUT[p.kind][2]})
        rows = {}
        for name, (_, parts) in p.fields.items():
            w, b = (t.detach() for t in self.operands(name)[0][:2])
            rows[name] = (lay.part_major(w, parts, h, hd), lay.part_major(b, parts, h, hd)) if parts else (w, b)
        kept = {f"kept_{k}": getattr(self, f"kept_{k}") for k in p.kinds}
        if p.kind == "double":
            for name in ("qkv", "add_qkv", "ff1", "ffc1"):
                out[name + "_weight"], out[name + "_bias"] = rows[name]
        else:
            out["proj_weight"] = torch.cat([rows["qkv"][0], rows["mlp"][0]])
            out["proj_bias"] = torch.cat([rows["qkv"][1], rows["mlp"][1]])
        return self.weights_class(**kept, **out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared ranges={self.ranges}"


class SharedFluxDoubleBlock(_SharedFluxBlock, CompactFluxDoubleBlock):
    r"""A `CompactFluxDoubleBlock` whose producers are row ranges of a `FluxSharedProducers`.

    Parameters:
        producers (`FluxSharedProducers`): this block position's storage (``MosaicFlux.producer_storage``).
        ranges (`dict`): ``(start, stop)`` of this stage's units in the storage, per unit kind.
        consumers (`dict`): `consumer_fields`, the consumers' columns in storage order.
        head_dim, eps, qk_eps: as `CompactFluxDoubleBlock`.
    """

    consumer_fields = ("out_weight", "out_bias", "add_out_weight", "add_out_bias", "ff2_weight", "ff2_bias",
                       "ffc2_weight", "ffc2_bias")
    #: The consumers' GEMM weights `mosaicdiff.quantize` stores as float8 (the producers' are the storage's).
    fp8_weights = ("out_weight", "add_out_weight", "ff2_weight", "ffc2_weight")
    norm_added_q = property(lambda self: self._norm("norm_added_q"))
    norm_added_k = property(lambda self: self._norm("norm_added_k"))


class SharedFluxSingleBlock(_SharedFluxBlock, CompactFluxSingleBlock):
    r"""A `CompactFluxSingleBlock` whose producers are row ranges of a `FluxSharedProducers` (two GEMMs:
    q/k/v rows and MLP rows are two ranges of the storage).

    Parameters: as `SharedFluxDoubleBlock`.
    """

    consumer_fields = ("out_weight", "out_bias")
    fp8_weights = ("out_weight",)

    def producer_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._qkv_view(self.producer_gemm("qkv", x)), self.producer_gemm("mlp", x)


def _block_class(kind: str) -> type:
    return SharedFluxDoubleBlock if kind == "double" else SharedFluxSingleBlock


def share_flux_producers(stage_weights: Sequence[Any], head_dim: int):
    """A storage and, per stage, the ranges and consumer tensors of one block position, or None when a
    unit kind's kept sets have no storage order in which each is a run.

    Returns:
        ``(producers, [(ranges, consumers), ...])`` (`mosaicdiff.core.shared_producers.share_stages`'s
        ``share``).
    """
    double = isinstance(stage_weights[0], CompactFluxDoubleWeights)
    kinds, _, _ = _LAYOUT["double" if double else "single"]
    orders = {k: lay.interval_order([getattr(w, f"kept_{k}").tolist() for w in stage_weights]) for k in kinds}
    if any(order is None for order in orders.values()):
        return None
    store = FluxSharedProducers.from_stage_weights(orders, stage_weights, head_dim)

    def columns_in_storage_order(w, ranges, t: torch.Tensor, k: str, unit: int) -> torch.Tensor:
        """A consumer's column groups of kept units `k` reordered to the storage's order."""
        a, b = ranges[k]
        return lay.permute_unit_columns(t, getattr(w, f"kept_{k}"), orders[k][a:b], unit)

    per_stage = []
    for w in stage_weights:
        ranges = dict(zip(kinds, (lay.unit_ranges(orders[k], [getattr(w, f"kept_{k}").tolist()])[0] for k in kinds)))
        reorder = functools.partial(columns_in_storage_order, w, ranges)
        consumers = {"out_bias": w.out_bias}
        if double:
            consumers.update(out_weight=reorder(w.out_weight, "heads", head_dim),
                             add_out_weight=reorder(w.add_out_weight, "heads", head_dim), add_out_bias=w.add_out_bias,
                             ff2_weight=reorder(w.ff2_weight, "channels", 1), ff2_bias=w.ff2_bias,
                             ffc2_weight=reorder(w.ffc2_weight, "context_channels", 1), ffc2_bias=w.ffc2_bias)
        else:
            i = w.kept_heads.numel() * head_dim
            consumers["out_weight"] = torch.cat([reorder(w.out_weight[:, :i], "heads", head_dim),
                                                 reorder(w.out_weight[:, i:], "channels", 1)], dim=1)
        per_stage.append((ranges, consumers))
    return store, per_stage


def empty_shared_block(store: FluxSharedProducers, kept: Mapping[str, Sequence[int]], head_dim: int, eps: float,
                       qk_eps: float) -> nn.Module:
    """An uninitialised shared block of one stage on `store` (a mosaic built from its config).

    Raises:
        ValueError: kept lists that are not runs of the storage's units.
    """
    ranges = {k: lay.unit_ranges(getattr(store, k).tolist(), [kept[f"kept_{k}"]])[0] for k in store.kinds}
    cls = _block_class(store.kind)
    counts = [ranges[k][1] - ranges[k][0] for k in store.kinds]
    probe = cls.shapes_for(counts, head_dim, int(store.qkv_weight.shape[1]))
    consumers = {n: torch.empty(probe[n]) for n in cls.consumer_fields}
    return cls(store, ranges, consumers, head_dim, eps, qk_eps)


def install_shared_blocks(mosaic: nn.Module, shared: Sequence[Any], head_dim: int, eps: float, qk_eps: float) -> None:
    """Put `share_flux_producers`' storages in ``mosaic.producer_storage`` and a shared block per stage
    and position in ``mosaic.stage_blocks``."""
    mosaic.producer_storage = nn.ModuleList(store for store, _ in shared)
    for j, (store, per_stage) in enumerate(shared):
        for i, (ranges, consumers) in enumerate(per_stage):
            mosaic.stage_blocks[i][j] = _block_class(store.kind)(store, ranges, consumers, head_dim, eps, qk_eps)
