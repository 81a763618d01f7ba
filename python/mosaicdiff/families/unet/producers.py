"""Shared producer storage for U-Net mosaics: every stage's producer rows as views of one tensor per block.

The U-Net side of `mosaicdiff.core.shared_producers` (the counterpart of
`mosaicdiff.families.dit.producers`). Pruning slices the producers of a U-Net block (attn1 q/k/v
rows of kept heads, attn2 q rows and text k/v rows of kept heads, GEGLU value row j and gate row
j + F of kept channels: `mosaicdiff.families.unet.adapter`) and compensates only the consumers
(attn1 / attn2 ``to_out``, ff2). So for each block position, `UNetSharedProducers` stores the union
of the stages' kept units once, in an order where each stage's units are one contiguous run
(`mosaicdiff.method.producer_layout`):

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

from mosaicdiff.core.shared_producers import (
    PRODUCER_FIELDS,
    SharedTextBlockMixin,
    TextSharedProducers,
    share_text_producers,
    stage_ranges,
)
from mosaicdiff.families.unet.blocks import (
    CompactUNetBlock,
    CompactUNetBlockWeights,
    unet_block_shapes,
)
from mosaicdiff.method import producer_layout

__all__ = ["CONSUMER_FIELDS", "PRODUCER_FIELDS", "SharedUNetBlock", "UNetSharedProducers", "producer_shapes",
           "share_unet_producers", "stage_ranges"]

#: The per-stage fields of a shared-producer block: the norms and the compensated consumers.
CONSUMER_FIELDS = (*(f"norm{k}_{p}" for k in (1, 2, 3) for p in ("weight", "bias")),
                   "out1_weight", "out1_bias", "out2_weight", "out2_bias", "ff2_weight", "ff2_bias")


def producer_shapes(heads1: int, heads2: int, channels: int, head_dim: int, width: int, text_width: int) -> dict:
    """The shape of every `PRODUCER_FIELDS` tensor for these unit counts (a storage's or a stage's)."""
    shapes = unet_block_shapes(heads1, heads2, channels, head_dim, width, text_width)
    return {name: shapes[name] for name in PRODUCER_FIELDS}


class UNetSharedProducers(TextSharedProducers):
    r"""The producer rows of one U-Net block position, stored once for every stage
    (`mosaicdiff.core.shared_producers.TextSharedProducers`; ff1 as GEGLU value and gate row blocks).

    Parameters:
        heads1, heads2 (`torch.Tensor`): dense self- / cross-attention head indices in storage order.
        channels (`torch.Tensor`): dense GEGLU channel indices in storage order.
        head_dim (`int`), width (`int`), text_width (`int`): the block's head dim, width C and
            text width T (``cross_attention_dim``).
    """

    block_shapes = staticmethod(unet_block_shapes)
    ff1_parts = 2
    layout = producer_layout

    @classmethod
    def from_stage_weights(cls, heads1: Sequence[int], heads2: Sequence[int], channels: Sequence[int],
                           weights: Sequence[CompactUNetBlockWeights], head_dim: int) -> UNetSharedProducers:
        """Gather the stored rows from the stages' weights (`TextSharedProducers.from_orders`)."""
        return cls.from_orders({"heads1": heads1, "heads2": heads2, "channels": channels}, weights, head_dim)


class SharedUNetBlock(SharedTextBlockMixin, CompactUNetBlock):
    r"""A `CompactUNetBlock` whose producer weights are row ranges of a `UNetSharedProducers`
    (`mosaicdiff.core.shared_producers.SharedTextBlockMixin`); ``operands("ff1")`` gives the value and
    gate rows as two views.

    Parameters:
        producers (`UNetSharedProducers`): the storage of this block position, owned by the model
            (``MosaicUNet.producer_storage``), held by reference.
        ranges (`dict`): ``(start, stop)`` of this stage's units in the storage, per unit kind
            (``"heads1"``, ``"heads2"``, ``"channels"``).
        consumers (`dict`): `CONSUMER_FIELDS`, the consumers' columns in storage order.
        head_dim, eps: as `CompactUNetBlock`.

    Raises:
        ValueError: consumer shapes that do not fit the ranges, or an attention without heads.
    """

    consumer_fields = CONSUMER_FIELDS
    store_class = UNetSharedProducers

    def __init__(self, producers: UNetSharedProducers, ranges: dict[str, tuple[int, int]],
                 consumers: dict, head_dim: int, eps: float = 1e-5):
        super().__init__(producers, ranges, consumers, head_dim, eps)


def share_unet_producers(stage_weights: Sequence[CompactUNetBlockWeights], head_dim: int):
    """A storage and, per stage, the ranges and consumer tensors of one block position, or None
    (`mosaicdiff.core.shared_producers.share_text_producers`)."""
    return share_text_producers(UNetSharedProducers, stage_weights, head_dim, CONSUMER_FIELDS)
