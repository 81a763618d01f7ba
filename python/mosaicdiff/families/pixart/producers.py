"""Shared producer storage for PixArt mosaics: every stage's producer rows as views of one tensor per block.

The PixArt side of `mosaicdiff.core.shared_producers`: pruning slices the producers of a PixArt
block (attn1 q/k/v rows of kept heads, attn2 q rows and text k/v rows of kept heads, ff1 rows of
kept channels) and compensates only the consumers (attn1 / attn2 ``to_out``, ff2). So for each
block position `PixArtSharedProducers` stores the union of the stages' kept units once, in an order
where each stage's units are one contiguous run (`mosaicdiff.method.producer_layout`): ``qkv1``
head-major (attention reads that layout, ``layout="heads"``), ``q2`` by head, ``kv2`` head-major
(k, v of head 0, ...), ``ff1`` by channel. A `SharedPixArtBlock` holds per stage only its
compensated consumers (columns in storage order) and reads its producers as row-range views.
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
from mosaicdiff.families.pixart.blocks import (
    CompactPixArtBlock,
    CompactPixArtBlockWeights,
    pixart_block_shapes,
)
from mosaicdiff.method import producer_layout

__all__ = ["CONSUMER_FIELDS", "PRODUCER_FIELDS", "PixArtSharedProducers", "SharedPixArtBlock", "share_pixart_producers",
           "stage_ranges"]

#: A stage's own fields of a `SharedPixArtBlock` (the consumers); `PRODUCER_FIELDS` are stored once per position.
CONSUMER_FIELDS = ("out1_weight", "out1_bias", "out2_weight", "out2_bias", "ff2_weight", "ff2_bias")


class PixArtSharedProducers(TextSharedProducers):
    r"""The producer rows of one PixArt block position, stored once for every stage
    (`mosaicdiff.core.shared_producers.TextSharedProducers`; ff1 rows by channel).

    Parameters:
        heads1, heads2 (`torch.Tensor`): dense self- / cross-attention head indices in storage order.
        channels (`torch.Tensor`): dense MLP channel indices in storage order.
        head_dim (`int`), width (`int`), text_width (`int`): head dim, width C, text width T.
    """

    block_shapes = staticmethod(pixart_block_shapes)
    layout = producer_layout

    @classmethod
    def from_stage_weights(cls, orders: dict[str, Sequence[int]], weights: Sequence[CompactPixArtBlockWeights],
                           head_dim: int) -> PixArtSharedProducers:
        """Gather the stored rows from the stages' weights (`TextSharedProducers.from_orders`)."""
        return cls.from_orders(orders, weights, head_dim)


class SharedPixArtBlock(SharedTextBlockMixin, CompactPixArtBlock):
    r"""A `CompactPixArtBlock` whose producer weights are row ranges of a `PixArtSharedProducers`
    (`mosaicdiff.core.shared_producers.SharedTextBlockMixin`).

    Parameters:
        producers (`PixArtSharedProducers`): the storage of this block position, owned by the model
            (``MosaicPixArt.producer_storage``), held by reference.
        ranges (`dict`): ``(start, stop)`` of this stage's units in the storage, per unit kind.
        consumers (`dict`): `CONSUMER_FIELDS`, the consumers' columns in storage order.
        head_dim, eps: as `CompactPixArtBlock`.

    Raises:
        ValueError: consumer shapes that do not fit the ranges, an attention without heads or an
            MLP without channels.
    """

    consumer_fields = CONSUMER_FIELDS
    store_class = PixArtSharedProducers

    def __init__(self, producers: PixArtSharedProducers, ranges: dict[str, tuple[int, int]],
                 consumers: dict, head_dim: int, eps: float = 1e-6):
        super().__init__(producers, ranges, consumers, head_dim, eps)

    def check_kept(self) -> None:
        if min(self.heads) < 1 or self.mlp_width < 1:
            raise ValueError(f"SharedPixArtBlock: every attention keeps a head and the MLP a channel, got heads "
                             f"{self.heads}, {self.mlp_width} channels")


def share_pixart_producers(stage_weights: Sequence[CompactPixArtBlockWeights], head_dim: int):
    """A storage and, per stage, the ranges and consumer tensors of one block position, or None
    (`mosaicdiff.core.shared_producers.share_text_producers`)."""
    return share_text_producers(PixArtSharedProducers, stage_weights, head_dim, CONSUMER_FIELDS)
