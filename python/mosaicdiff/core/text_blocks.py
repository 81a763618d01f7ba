"""What the compact blocks of the text-conditioned families share: a block of self-attention heads,
cross-attention heads on text states and MLP channels (the U-Net's SD/SDXL blocks, PixArt's).

`TextBlockMixin` gives such a block its constructor (every field checked against the family's
shapes), its kept counts, its weights as the family's weights dataclass, its GEMMs in the weights'
storage (bf16/fp32, or float8 after `mosaicdiff.quantize`: `mosaicdiff.core.gemm`, whose
``operands`` a shared-producer block reads from its storage: `mosaicdiff.core.shared_producers`) and
the text states' k/v, computed once per sampling run with `cache_cross_kv`
(`mosaicdiff.core.tensor_cache`); `CrossKVCacheMixin` switches that cache for a whole mosaic.
`TextBlockWeights` (a dataclass) and `text_block_shapes` are the fields and shapes every family's
weights share; `init_compact_fields` fills a block from a weights dataclass,
`split_kv` lays the k/v rows out for SDPA, `compact_text_fields` assembles the pruned weights from the
pruned groups and `text_block_widths` reports the kept widths. The block math (norms, fusions) stays in each family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from mosaicdiff.core.gemm import FP8GemmMixin
from mosaicdiff.core.stages import frozen
from mosaicdiff.core.tensor_cache import cached_for_tensor, tensor_key

__all__ = ["TEXT_INDEX_FIELDS", "CrossKVCacheMixin", "TextBlockMixin", "TextBlockWeights", "compact_text_fields",
           "init_compact_fields", "set_cross_kv_cache", "split_kv", "text_block_shapes", "text_block_widths"]


#: The index fields (kept units, CPU metadata) of a text block's weights: attn1 heads, attn2 heads, MLP channels.
TEXT_INDEX_FIELDS = ("kept_heads1", "kept_heads2", "kept_channels")


@dataclass
class TextBlockWeights:
    """The pruned, compensated weights every compact text block has; a family's weights dataclass
    subclasses it (adding, say, its norms) and documents its row layouts.

    C = width, T = text width (``cross_attention_dim``), hd = head_dim, h1 / h2 = kept self- /
    cross-attention heads, F = kept MLP channels, P = ff1 rows per channel (`text_block_shapes`).
    """

    kept_heads1: torch.Tensor  # (h1,) int64 dense head indices, in row order
    kept_heads2: torch.Tensor  # (h2,)
    kept_channels: torch.Tensor  # (F,)
    qkv1_weight: torch.Tensor  # (3*h1*hd, C)
    qkv1_bias: torch.Tensor  # (3*h1*hd,)
    out1_weight: torch.Tensor  # (C, h1*hd) compensated
    out1_bias: torch.Tensor  # (C,)
    q2_weight: torch.Tensor  # (h2*hd, C)
    q2_bias: torch.Tensor
    kv2_weight: torch.Tensor  # (2*h2*hd, T)
    kv2_bias: torch.Tensor
    out2_weight: torch.Tensor  # (C, h2*hd) compensated
    out2_bias: torch.Tensor
    ff1_weight: torch.Tensor  # (P*F, C)
    ff1_bias: torch.Tensor
    ff2_weight: torch.Tensor  # (C, F) compensated
    ff2_bias: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def weight_fields(cls) -> tuple[str, ...]:
        """The weight fields, in declaration order (the index fields left out)."""
        return tuple(f.name for f in fields(cls) if f.name not in TEXT_INDEX_FIELDS)


def text_block_shapes(h1: int, h2: int, channels: int, head_dim: int, width: int, text_width: int,
                      ff1_parts: int = 1) -> dict[str, tuple[int, ...]]:
    """The shape of the projections of a compact text block with these kept counts, ff1 having
    `ff1_parts` rows per channel (2: a GEGLU's value and gate rows); the family adds its norms."""
    i1, i2, f1 = h1 * head_dim, h2 * head_dim, ff1_parts * channels
    return {"qkv1_weight": (3 * i1, width), "qkv1_bias": (3 * i1,), "out1_weight": (width, i1), "out1_bias": (width,),
            "q2_weight": (i2, width), "q2_bias": (i2,), "kv2_weight": (2 * i2, text_width), "kv2_bias": (2 * i2,),
            "out2_weight": (width, i2), "out2_bias": (width,), "ff1_weight": (f1, width), "ff1_bias": (f1,),
            "ff2_weight": (width, channels), "ff2_bias": (width,)}


def split_kv(kv: torch.Tensor, heads: int, head_dim: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)``, each ``(B, heads, S, head_dim)``, strided views of the text k/v rows laid out as
    ``"parts"`` (``[k of every head | v of every head]``) or ``"heads"`` (``[k v of head 0 | ...]``)."""
    if layout == "heads":
        return kv.unflatten(-1, (heads, 2, head_dim)).permute(3, 0, 2, 1, 4).unbind(0)
    return kv.unflatten(-1, (2, heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)


def compact_text_fields(pruned: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The pruned fields of a compact block's weights from its pruned groups ``attn1`` and ``attn2``
    (producers ``to_q, to_k, to_v``) and ``ff`` (one producer, its rows as the group maps them)
    (`mosaicdiff.core.adapter.PrunedGroup`); the family adds what it keeps unpruned (norms)."""
    a1, a2, ff = pruned["attn1"], pruned["attn2"], pruned["ff"]
    return {"kept_heads1": a1.kept, "kept_heads2": a2.kept, "kept_channels": ff.kept,
            "qkv1_weight": torch.cat(a1.producer_weights), "qkv1_bias": torch.cat(a1.producer_biases),
            "out1_weight": a1.consumer_weight, "out1_bias": a1.consumer_bias,
            "q2_weight": a2.producer_weights[0], "q2_bias": a2.producer_biases[0],
            "kv2_weight": torch.cat(a2.producer_weights[1:]), "kv2_bias": torch.cat(a2.producer_biases[1:]),
            "out2_weight": a2.consumer_weight, "out2_bias": a2.consumer_bias,
            "ff1_weight": ff.producer_weights[0], "ff1_bias": ff.producer_biases[0],
            "ff2_weight": ff.consumer_weight, "ff2_bias": ff.consumer_bias}


def text_block_widths(block: nn.Module, weights: Any) -> dict[str, float]:
    """Kept widths and sparsities of a compact text block against its dense ``BasicTransformerBlock``
    (the adapter's ``block_widths``)."""
    h1, h2, f = block.attn1.heads, block.attn2.heads, block.ff.net[2].in_features
    k1, k2, kf = weights.kept_heads1.numel(), weights.kept_heads2.numel(), weights.kept_channels.numel()
    return {"attn1_heads": int(k1), "attn2_heads": int(k2), "mlp": int(kf),
            "attn1_head_sparsity": 1 - k1 / h1, "attn2_head_sparsity": 1 - k2 / h2, "mlp_sparsity": 1 - kf / f}


def init_compact_fields(block: nn.Module, weights: Any, index_fields: Sequence[str],
                        shapes: Callable[[int, int, int, int, int, int], Mapping[str, tuple[int, ...]]]) -> None:
    """Set a block's kept indices (CPU int64 metadata) and its weights (frozen parameters, used as given)
    from a weights dataclass, checking every shape against ``shapes(h1, h2, channels, head_dim, width,
    text_width)``.

    Raises:
        ValueError: an attention without heads, or a weight of another shape (the field named).
    """
    name = type(block).__name__
    for field in index_fields:
        setattr(block, field, getattr(weights, field).detach().to("cpu", torch.int64).reshape(-1))
    if min(block.heads) < 1:
        raise ValueError(f"{name}: every attention keeps at least one head, got {block.heads}")
    width, text = int(weights.out1_bias.shape[0]), int(weights.kv2_weight.shape[1])
    for field, shape in shapes(*block.heads, block.mlp_width, block.head_dim, width, text).items():
        t = getattr(weights, field)
        if tuple(t.shape) != shape:
            raise ValueError(f"{type(weights).__name__}.{field}: expected shape {shape}, got {tuple(t.shape)}")
        setattr(block, field, frozen(t))


def set_cross_kv_cache(stage_blocks: nn.ModuleList, enabled: bool) -> None:
    """Switch every compact block's text k/v cache on or off, forgetting what it holds."""
    for blocks in stage_blocks:
        for block in blocks:
            block.cache_cross_kv = bool(enabled)
            block.__dict__.pop("_kv_cache", None)


class CrossKVCacheMixin:
    """`enable_cross_kv_cache` for a text-conditioned mosaic (`mosaicdiff.core.model.MosaicModel`, put
    this mixin first), switched off by `enable_cuda_graphs`. A model that also caches something of its
    own computed from the text states alone keeps it in ``self.__dict__["_text_cache"]`` and reads
    ``self._cross_kv_cache``."""

    _cross_kv_cache = False

    def enable_cross_kv_cache(self, enabled: bool = True):
        """Compute every block's cross-attention k/v of the text states (and the model's own
        ``_text_cache``, such as PixArt's caption projection) once per sampling run.

        A pipeline passes the same text-state tensor at every step of a run; each block keeps the
        k/v (its own kept heads) of the last tensor seen and recomputes only when another tensor,
        or the same one modified in place, arrives (`mosaicdiff.core.tensor_cache`). Returns self.

        Raises:
            ValueError: with CUDA graphs enabled (a graph would replay a frozen k/v).
        """
        if enabled and self.cuda_graphs_enabled:
            raise ValueError(f"{type(self).__name__}: the cross-attention k/v cache does not work under CUDA graphs "
                             "(the graph would replay a frozen k/v); enable_cuda_graphs(False) first")
        self._cross_kv_cache = bool(enabled)
        self.__dict__.pop("_text_cache", None)
        set_cross_kv_cache(self.stage_blocks, enabled)
        return self

    def enable_cuda_graphs(self, enabled: bool = True):
        """`StageRuntimeMixin.enable_cuda_graphs`; the cross-attention k/v cache is switched off
        (a graph replays the k/v projections: a cached k/v would be frozen into the graph)."""
        if enabled:
            self.enable_cross_kv_cache(False)
        return super().enable_cuda_graphs(enabled)


class TextBlockMixin(FP8GemmMixin):
    """Construction, kept counts, weights and cross-attention k/v of a compact text-conditioned block
    (see the module docstring); put it before ``nn.Module`` in the bases. The class sets
    `weights_class` (a `TextBlockWeights`) and `block_shapes` (the family's shapes of its fields,
    ``(h1, h2, channels, head_dim, width, text_width) -> dict``, as a staticmethod)."""

    weights_class: ClassVar[type[TextBlockWeights]]
    block_shapes: ClassVar[Callable[..., Mapping[str, tuple[int, ...]]]]
    index_fields: ClassVar[tuple[str, ...]] = TEXT_INDEX_FIELDS

    #: Row layouts of the fused projections: ``qkv1`` ``[q | k | v]`` and ``kv2`` ``[k | v]`` here;
    #: head-major (``"heads"``) in a shared-producer block.
    qkv_layout = "qkv"
    kv_layout = "parts"
    #: Reuse the text states' k/v while the same, unmodified tensor comes back (`set_cross_kv_cache`).
    cache_cross_kv = False
    #: The GEMM weights `mosaicdiff.quantize` stores as float8 (each with a ``<name>_scale``).
    fp8_weights = ("qkv1_weight", "out1_weight", "q2_weight", "kv2_weight", "out2_weight", "ff1_weight", "ff2_weight")

    def __init__(self, weights: TextBlockWeights, head_dim: int, eps: float):
        super().__init__()
        self.head_dim, self.eps = int(head_dim), float(eps)
        init_compact_fields(self, weights, self.index_fields, self.block_shapes)

    @property
    def heads(self) -> tuple[int, int]:
        """Kept (self-attention, cross-attention) heads."""
        return int(self.kept_heads1.numel()), int(self.kept_heads2.numel())

    @property
    def mlp_width(self) -> int:
        return int(self.kept_channels.numel())

    def weights(self):
        """The block's tensors as its weights dataclass (no copy)."""
        kw = {name: getattr(self, name).detach() for name in self.weights_class.weight_fields()}
        return self.weights_class(**{n: getattr(self, n) for n in self.index_fields}, **kw)

    def cross_kv(self, text: torch.Tensor) -> torch.Tensor:
        """The cross-attention keys and values of the text states, ``(B, S, 2 * h2 * hd)``.

        They do not change between sampling steps: with `cache_cross_kv` the last result is reused
        while the same tensor object (not modified in place: same version counter) is passed
        again, as a pipeline does for every step of one run. The cache holds it by weak
        reference: a new tensor is never taken for it, even at a freed one's address.
        """
        if not self.cache_cross_kv:
            return self.producer_gemm("kv2", text)
        weight = self.operands("kv2")[0].weight
        key = (tensor_key(text), weight.data_ptr(), weight.dtype)
        return cached_for_tensor(self.__dict__, "_kv_cache", text, key, lambda: self.producer_gemm("kv2", text))
