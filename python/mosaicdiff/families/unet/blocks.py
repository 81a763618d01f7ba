"""The compact U-Net transformer block (SD / SDXL ``BasicTransformerBlock``) on `mosaic_kernels.ops`.

A diffusers ``BasicTransformerBlock`` with ``norm_type="layer_norm"`` computes::

    h = h + attn1(LN1(h))                       # self-attention, heads of head_dim
    h = h + attn2(LN2(h), text)                 # cross-attention: q from h, k/v from the text states
    h = h + ff2(geglu(ff1(LN3(h))))             # GEGLU: ff1 rows [value | gate]

Pruning removes heads of attn1 and attn2 (rows of q/k/v, columns of ``to_out``) and GEGLU channels
(value row j, gate row j + F, column j of ``ff2``); `CompactUNetBlockWeights` holds what is left.
`CompactUNetBlock` runs it with the engine's ops (LayerNorm; each residual add fused with the next
LayerNorm, ``residual_layer_norm``; fused qkv GEMM + SDPA over strided views; one GEMM with the
GEGLU fused; ff2 with its residual add in the GEMM epilogue, ``linear_residual``) and keeps
diffusers' block call signature, so it replaces a ``BasicTransformerBlock`` inside its
``Transformer2DModel`` unchanged. `CompactUNetBlock.forward_normed` is the same block entered with
LN1 already applied and, given the next block, leaving with the next block's LN1 applied: a chain
of blocks (`mosaicdiff.families.unet.model.StageSwitchedChain`) fuses the last residual add of block i with
LN1 of block i + 1 that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mosaicdiff.core.text_blocks import (
    TEXT_INDEX_FIELDS,
    TextBlockMixin,
    TextBlockWeights,
    split_kv,
    text_block_shapes,
)

__all__ = ["CompactUNetBlock", "CompactUNetBlockWeights", "UNET_INDEX_FIELDS", "UNET_WEIGHT_FIELDS", "check_block_call",
           "unet_block_shapes"]


@dataclass
class CompactUNetBlockWeights(TextBlockWeights):
    """The pruned, compensated weights of one U-Net transformer block: those of `TextBlockWeights`,
    then the three LayerNorms (unpruned, affine, ``(C,)``).

    qkv rows are ``[q | k | v]`` of the kept heads; ``kv2`` rows ``[k | v]``; ``ff1`` rows
    ``[value | gate]`` of the kept channels ``(2F, C)``.
    """

    norm1_weight: torch.Tensor  # (C,)
    norm1_bias: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    norm3_weight: torch.Tensor
    norm3_bias: torch.Tensor


#: The index fields (metadata) and the weight fields of `CompactUNetBlockWeights`.
UNET_INDEX_FIELDS = TEXT_INDEX_FIELDS
UNET_WEIGHT_FIELDS = CompactUNetBlockWeights.weight_fields()


def unet_block_shapes(h1: int, h2: int, channels: int, head_dim: int, width: int, text_width: int) -> dict:
    """The shape of every weight field of a compact block with these kept counts (the norms first;
    ff1: a value and a gate row per channel)."""
    norms = {f"norm{k}_{p}": (width,) for k in (1, 2, 3) for p in ("weight", "bias")}
    return {**norms, **text_block_shapes(h1, h2, channels, head_dim, width, text_width, ff1_parts=2)}


def check_block_call(attention_mask, encoder_attention_mask, encoder_hidden_states, cross_kv=None) -> None:
    """What a compact block call supports: no attention masks, and text states (or their k/v).

    Raises:
        NotImplementedError: for an attention mask.
        ValueError: without text states.
    """
    if attention_mask is not None or encoder_attention_mask is not None:
        raise NotImplementedError("CompactUNetBlock: attention masks are not supported")
    if encoder_hidden_states is None and cross_kv is None:
        raise ValueError("CompactUNetBlock: encoder_hidden_states (the text states) are required")


def _ops():
    from mosaic_kernels import ops

    return ops


class CompactUNetBlock(TextBlockMixin, nn.Module):
    r"""One pruned U-Net transformer block; a drop-in for diffusers' ``BasicTransformerBlock``.

    Args:
        weights (`CompactUNetBlockWeights`): used as given (no copy).
        head_dim (`int`): channels per head (64 in SDXL).
        eps (`float`): the LayerNorms' epsilon (diffusers' ``norm_eps``, 1e-5).

    Raises:
        ValueError: weight shapes that do not fit each other.
    """

    weights_class = CompactUNetBlockWeights
    block_shapes = staticmethod(unet_block_shapes)

    def __init__(self, weights: CompactUNetBlockWeights, head_dim: int, eps: float = 1e-5):
        super().__init__(weights, head_dim, eps)

    # the field checks, heads, mlp_width, weights(), the qkv1 / kv2 layouts ("qkv", "parts"; head-major in a
    # shared-producer block: `mosaicdiff.families.unet.producers`) and cross_kv: `TextBlockMixin`; the GEMM
    # operands: `mosaicdiff.core.gemm.FP8GemmMixin.operands`

    def _norm(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return _ops().layer_norm(h, getattr(self, f"norm{k}_weight"), getattr(self, f"norm{k}_bias"), self.eps)

    def norm1(self, h: torch.Tensor) -> torch.Tensor:
        """LN1 of the residual stream `h`: what `forward_normed` takes as `x`."""
        return self._norm(1, h)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, timestep=None, cross_attention_kwargs: dict[str, Any] | None = None,
                class_labels=None, added_cond_kwargs=None, cross_kv: torch.Tensor | None = None) -> torch.Tensor:
        """diffusers' block signature; masks and per-call attention kwargs are not supported (None).

        Args:
            cross_kv (`torch.Tensor`, *optional*): `cross_kv` of the text states, precomputed.
        """
        check_block_call(attention_mask, encoder_attention_mask, encoder_hidden_states, cross_kv)
        h = hidden_states.contiguous()
        return self.forward_normed(h, self.norm1(h), encoder_hidden_states, cross_kv=cross_kv)[0]

    def forward_normed(self, h: torch.Tensor, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                       next_block: CompactUNetBlock | None = None, cross_kv: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block on the residual stream `h` (contiguous) whose LN1 `x` is already computed.

        Args:
            h (`torch.Tensor`): (B, L, C) contiguous residual stream entering the block.
            x (`torch.Tensor`): ``LN1(h)`` with this block's norm1 (`norm1`, or the previous block's
                `forward_normed` with ``next_block=self``).
            encoder_hidden_states (`torch.Tensor`, *optional*): the text states (unless `cross_kv`).
            next_block (`CompactUNetBlock`, *optional*): the block that runs next on the output. Given,
                the feed-forward's residual add is fused with its LN1 (``residual_layer_norm``);
                otherwise ff2 and the add are one GEMM (``linear_residual``).
            cross_kv (`torch.Tensor`, *optional*): `cross_kv` of the text states, precomputed
                (rows as `kv_layout`).

        Returns:
            ``(h_out, x_next)``: the block's output and ``next_block.norm1(h_out)`` (None without
            `next_block`).
        """
        ops = _ops()
        h1, h2 = self.heads
        B, L, _ = h.shape
        # 1. Self-attention on the kept heads; its residual add fused with norm2.
        qkv = self.producer_gemm("qkv1", x)
        y = self.own_gemm("out1", ops.attention(qkv, h1, layout=self.qkv_layout))
        h, x = ops.residual_layer_norm(h, y, self.norm2_weight, self.norm2_bias, self.eps)
        # 2. Cross-attention: q of the kept heads from h, their k/v from the text states.
        q = self.producer_gemm("q2", x)
        kv = self.cross_kv(encoder_hidden_states) if cross_kv is None else cross_kv
        hd = self.head_dim
        q = q.view(B, L, h2, hd).transpose(1, 2)
        k, v = split_kv(kv, h2, hd, self.kv_layout)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, h2 * hd)
        h, x = ops.residual_layer_norm(h, self.own_gemm("out2", a), self.norm3_weight, self.norm3_bias, self.eps)
        # 3. GEGLU feed-forward on the kept channels (one GEMM over value + gate rows); its residual
        #    add fused with the next block's norm1, or with ff2 where no norm follows.
        f = self.producer_gemm("ff1", x, "geglu")
        if next_block is None:
            return self.own_gemm("ff2", f, "residual", res=h), None
        return ops.residual_layer_norm(h, self.own_gemm("ff2", f), next_block.norm1_weight, next_block.norm1_bias,
                                       next_block.eps)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, mlp_width={self.mlp_width}"
