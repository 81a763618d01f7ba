"""Where a dense linear's weight lives in a mosaic: the `LoraSlot` / `LoraTarget` records a family's
LoRA map (``families/<name>/lora.py``) returns, and the compact layouts every family shares.

A stage's producer rows are either its own (fields on the block, kept units ``block.kept_<kind>``,
multi-part head producers part-major: ``[q | k | v]``) or views of one shared storage per block
position (``block.producers``: fields on the storage, its units ``storage.<kind>``, head producers
head-major: q, k, v of one head after another; row blocks such as a GEGLU's value and gate halves one
after the other). Consumers keep their own columns, at ``block.kept_<kind>`` (storage order when
shared). `text_block_targets` and `joint_block_targets` name a text block's (U-Net, PixArt) and a
joint-attention block's (SD3, Flux double) linears as the dense model does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LoraSlot", "LoraTarget", "channel_producer_slots", "consumer_slots", "head_producer_slots",
           "joint_block_targets", "linear_targets", "text_block_targets", "unit_rows"]


@dataclass(frozen=True)
class LoraSlot:
    """Where part of a dense linear's weight lives in the mosaic.

    Attributes:
        tensor: the mosaic's parameter (a compact block's field or a shared producer storage).
        rows: ``(tensor rows, dense rows)`` int64 index pairs, or None: every row, in dense order.
        cols: ``(tensor columns, dense columns)``, or None: every column, in dense order.
    """

    tensor: torch.Tensor
    rows: tuple[torch.Tensor, torch.Tensor] | None = None
    cols: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class LoraTarget:
    """A dense linear a LoRA may adapt: its weight's dense shape ``(out, in)`` and its slots."""

    shape: tuple[int, int]
    slots: tuple[LoraSlot, ...]


def unit_rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Dense row (or column) indices of `units` of `size` rows each, unit after unit."""
    return (units.reshape(-1, 1).to(torch.int64) * size + torch.arange(size)).reshape(-1)


def _storage(blocks: Sequence) -> object | None:
    return getattr(blocks[0], "producers", None)


def head_producer_slots(blocks: Sequence, field: str, kind: str, parts: int, part: int, head_dim: int
                        ) -> tuple[LoraSlot, ...]:
    """The slots of part `part` (of `parts`: q, k, v) of a head producer stored in `field`."""
    store = _storage(blocks)
    if store is not None:  # once, in the storage: head at position s holds rows [s parts hd, (s + 1) parts hd)
        units = getattr(store, kind)
        pos = torch.arange(units.numel()) * parts + part
        return (LoraSlot(getattr(store, field), rows=(unit_rows(pos, head_dim), unit_rows(units, head_dim))),)
    out = []
    for b in blocks:
        units = getattr(b, f"kept_{kind}")
        inner = units.numel() * head_dim
        out.append(LoraSlot(getattr(b, field), rows=(torch.arange(inner) + part * inner, unit_rows(units, head_dim))))
    return tuple(out)


def channel_producer_slots(blocks: Sequence, field: str, kind: str, dense_units: int, row_blocks: int = 1
                           ) -> tuple[LoraSlot, ...]:
    """The slots of a channel producer stored in `field` in `row_blocks` blocks of rows (dense
    row block k: rows ``k * dense_units + channel``)."""
    store = _storage(blocks)
    holders = [(store, getattr(store, kind))] if store is not None else \
        [(b, getattr(b, f"kept_{kind}")) for b in blocks]
    out = []
    for holder, units in holders:
        n = units.numel()
        for k in range(row_blocks):
            out.append(LoraSlot(getattr(holder, field), rows=(torch.arange(n) + k * n, units + k * dense_units)))
    return tuple(out)


def consumer_slots(blocks: Sequence, field: str, kind: str, unit_size: int) -> tuple[LoraSlot, ...]:
    """Each stage's columns of a consumer stored in `field` (its kept units of `unit_size` columns)."""
    out = []
    for b in blocks:
        units = getattr(b, f"kept_{kind}")
        out.append(LoraSlot(getattr(b, field), cols=(torch.arange(units.numel() * unit_size),
                                                     unit_rows(units, unit_size))))
    return tuple(out)


def linear_targets(module: torch.nn.Module) -> dict[str, LoraTarget]:
    """A `LoraTarget` for every ``nn.Linear`` of `module` under its name there: the un-pruned
    skeleton keeps the dense model's module names (under its own attribute)."""
    return {name: LoraTarget(tuple(m.weight.shape), (LoraSlot(m.weight),))
            for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def text_block_targets(blocks: Sequence, prefix: str, heads: tuple[int, int], mlp: int, ff1_parts: int
                       ) -> dict[str, LoraTarget]:
    """The targets of one text block position (`mosaicdiff.core.text_blocks`: self-attention
    ``attn1``, cross-attention ``attn2`` on the text states, MLP ``ff``) named ``prefix + ...``.

    Args:
        blocks: the position's block in every stage.
        heads: the dense block's self- and cross-attention head counts.
        mlp: the dense MLP's channels (a GEGLU's ``ff.net.0.proj`` has ``ff1_parts * mlp`` rows).
    """
    b = blocks[0]
    hd, width = int(b.head_dim), int(b.out1_bias.shape[0])
    text = int(getattr(b, "producers", b).kv2_weight.shape[1])
    i1, i2 = heads[0] * hd, heads[1] * hd
    out = {}
    for part, name in enumerate(("attn1.to_q", "attn1.to_k", "attn1.to_v")):
        out[name] = LoraTarget((i1, width), head_producer_slots(blocks, "qkv1_weight", "heads1", 3, part, hd))
    out["attn2.to_q"] = LoraTarget((i2, width), head_producer_slots(blocks, "q2_weight", "heads2", 1, 0, hd))
    for part, name in enumerate(("attn2.to_k", "attn2.to_v")):
        out[name] = LoraTarget((i2, text), head_producer_slots(blocks, "kv2_weight", "heads2", 2, part, hd))
    out["attn1.to_out.0"] = LoraTarget((width, i1), consumer_slots(blocks, "out1_weight", "heads1", hd))
    out["attn2.to_out.0"] = LoraTarget((width, i2), consumer_slots(blocks, "out2_weight", "heads2", hd))
    out["ff.net.0.proj"] = LoraTarget((ff1_parts * mlp, width),
                                      channel_producer_slots(blocks, "ff1_weight", "channels", mlp, ff1_parts))
    out["ff.net.2"] = LoraTarget((width, mlp), consumer_slots(blocks, "ff2_weight", "channels", 1))
    return {prefix + k: v for k, v in out.items()}


def joint_block_targets(blocks: Sequence, prefix: str, head_dim: int, heads: int, width: int, mlp: int,
                        context_mlp: int, context_pre_only: bool = False, dual_attention: bool = False
                        ) -> dict[str, LoraTarget]:
    """The targets of one joint-attention (MMDiT) block position, SD3's and Flux's double blocks:
    the joint heads' producers (``attn.to_q/k/v`` in ``qkv``, ``attn.add_q/k/v_proj`` in
    ``add_qkv``), a second image attention's (``attn2``, in ``qkv2``), the MLPs' ``ff1`` / ``ffc1``
    rows and the consumers ``attn.to_out.0``, ``attn.to_add_out``, ``attn2.to_out.0``,
    ``ff.net.2``, ``ff_context.net.2`` (a context-pre-only block has no text output nor text MLP)."""
    inner = heads * head_dim
    attentions = [("attn", "qkv_weight", "heads", ("to_q", "to_k", "to_v")),
                  ("attn", "add_qkv_weight", "heads", ("add_q_proj", "add_k_proj", "add_v_proj"))]
    consumers = [("attn.to_out.0", "out_weight", "heads", head_dim, inner)]
    mlps = [("ff", "ff1_weight", "ff2_weight", "channels", mlp)]
    if not context_pre_only:
        consumers.append(("attn.to_add_out", "add_out_weight", "heads", head_dim, inner))
        mlps.append(("ff_context", "ffc1_weight", "ffc2_weight", "context_channels", context_mlp))
    if dual_attention:
        attentions.append(("attn2", "qkv2_weight", "heads2", ("to_q", "to_k", "to_v")))
        consumers.append(("attn2.to_out.0", "out2_weight", "heads2", head_dim, inner))
    out = {}
    for module, field, units, names in attentions:
        for part, name in enumerate(names):
            out[f"{module}.{name}"] = LoraTarget((inner, width),
                                                 head_producer_slots(blocks, field, units, 3, part, head_dim))
    for name, ff1, ff2, units, channels in mlps:
        out[f"{name}.net.0.proj"] = LoraTarget((channels, width), channel_producer_slots(blocks, ff1, units, channels))
        consumers.append((f"{name}.net.2", ff2, units, 1, channels))
    for name, field, units, size, columns in consumers:
        out[name] = LoraTarget((width, columns), consumer_slots(blocks, field, units, size))
    return {prefix + k: v for k, v in out.items()}
