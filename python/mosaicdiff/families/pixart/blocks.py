"""The compact PixArt block (diffusers ``BasicTransformerBlock``, ``norm_type="ada_norm_single"``) on
`mosaic_kernels.ops`.

A PixArt-alpha/Sigma block computes, with ``m = scale_shift_table + t_emb.reshape(B, 6, C)`` (the
block's learned ``(6, C)`` table plus the model's one ``adaln_single`` output)::

    x = LN(h) * (1 + m[1]) + m[0]                  # norm1 (no affine), adaLN-single modulation
    h = h + m[2] * attn1(x)                        # self-attention, heads of head_dim
    h = h + attn2(h, text, mask)                   # cross-attention on the stream itself (no norm)
    x = LN(h) * (1 + m[4]) + m[3]                  # norm2
    h = h + m[5] * ff2(gelu_tanh(ff1(x)))

Pruning removes heads of attn1 and attn2 (rows of q/k/v, the text k/v rows of attn2, columns of
``to_out``) and MLP channels (rows of ff1, columns of ff2); `CompactPixArtBlockWeights` holds what
is left. `CompactPixArtBlock` runs it with the engine's ops: the modulation is never formed in
memory (``ln_modulate_table`` adds the table row inside the LayerNorm kernel); attn1's out
projection has its gated residual in the GEMM epilogue (``linear_gated_residual``); the masked
cross-attention runs SDPA on the kept heads and its out projection adds the residual in the
epilogue (``linear_residual``); ff1 has the tanh-GELU epilogue (``linear_gelu``); ff2's gated
residual is fused with the next norm across the block boundary (``gated_residual_ln_modulate_table``,
`CompactPixArtBlock.forward_normed`) or, alone, with ff2's epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

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

__all__ = ["PIXART_INDEX_FIELDS", "PIXART_WEIGHT_FIELDS", "CompactPixArtBlock", "CompactPixArtBlockWeights",
           "NextNorm", "pixart_block_shapes"]

#: The norm a block's output feeds, for the boundary fusion: ``(shift, scale, shift_table, scale_table,
#: eps)``, the vectors ``(B, C)``, the table rows ``(C,)``.
NextNorm = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]


@dataclass
class CompactPixArtBlockWeights(TextBlockWeights):
    """The pruned, compensated weights of one PixArt block (the fields of `TextBlockWeights`).

    ``qkv1`` rows are ``[q | k | v]`` of the kept heads, ``kv2`` rows ``[k | v]``, ``ff1`` one row
    per kept channel ``(F, C)``. The block's ``scale_shift_table`` is not pruned: the skeleton keeps
    it (`mosaicdiff.families.pixart.adapter.PixArtSkeleton`).
    """


#: The index fields (metadata) and the weight fields of `CompactPixArtBlockWeights`.
PIXART_INDEX_FIELDS = TEXT_INDEX_FIELDS
PIXART_WEIGHT_FIELDS = CompactPixArtBlockWeights.weight_fields()


def pixart_block_shapes(h1: int, h2: int, channels: int, head_dim: int, width: int, text_width: int) -> dict:
    """The shape of every weight field of a compact block with these kept counts (ff1: one row per channel)."""
    return text_block_shapes(h1, h2, channels, head_dim, width, text_width)


def _ops():
    from mosaic_kernels import ops

    return ops


class CompactPixArtBlock(TextBlockMixin, nn.Module):
    r"""One pruned PixArt (adaLN-single) block, computed with the fused `mosaic_kernels.ops`.

    The weights are frozen parameters; the kept-index tensors are CPU attributes (metadata).

    Args:
        weights (`CompactPixArtBlockWeights`): used as given (no copy).
        head_dim (`int`): channels per head (72 in PixArt-alpha/Sigma).
        eps (`float`): the norms' epsilon (the model's ``norm_eps``, 1e-6).

    Raises:
        ValueError: weight shapes that do not fit each other, or an attention without heads.
    """

    weights_class = CompactPixArtBlockWeights
    block_shapes = staticmethod(pixart_block_shapes)

    def __init__(self, weights: CompactPixArtBlockWeights, head_dim: int, eps: float = 1e-6):
        super().__init__(weights, head_dim, eps)

    # the field checks, heads, mlp_width, weights(), the qkv1 / kv2 layouts ("qkv", "parts"; head-major in a
    # shared-producer block: `mosaicdiff.families.pixart.producers`) and cross_kv: `TextBlockMixin`; the GEMM
    # operands: `mosaicdiff.core.gemm.FP8GemmMixin.operands`

    @property
    def width(self) -> int:
        return int(self.out1_bias.shape[0])

    def norm1(self, h: torch.Tensor, mod: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``LN(h) * (1 + scale_msa) + shift_msa``: what `forward_normed` takes as ``x``."""
        C = self.width
        return _ops().ln_modulate_table(h, mod[:, :C], mod[:, C:2 * C], table[0], table[1], self.eps)

    def forward(self, h: torch.Tensor, mod: torch.Tensor, table: torch.Tensor, gates: torch.Tensor,
                text: torch.Tensor, text_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The block on its own (its first norm included, the residual stream out).

        Args:
            h (`torch.Tensor` of shape `(B, L, C)`): the residual stream.
            mod (`torch.Tensor` of shape `(B, 6C)`): the model's ``adaln_single`` output ``t_emb``.
            table (`torch.Tensor` of shape `(6, C)`): this block's ``scale_shift_table``.
            gates (`torch.Tensor` of shape `(2, B, C)`): ``gate_msa`` and ``gate_mlp`` (table rows
                added), for the GEMM epilogues.
            text (`torch.Tensor` of shape `(B, S, T)`): the projected text states.
            text_bias (`torch.Tensor` of shape `(B, 1, 1, S)`, *optional*): the additive mask bias.

        Returns:
            `torch.Tensor` of shape `(B, L, C)`.
        """
        h = h.contiguous()
        return self.forward_normed(h, self.norm1(h, mod, table), mod, table, gates, text, text_bias)[0]

    def forward_normed(self, h: torch.Tensor, x: torch.Tensor, mod: torch.Tensor, table: torch.Tensor,
                       gates: torch.Tensor, text: torch.Tensor | None, text_bias: torch.Tensor | None = None,
                       next_norm: NextNorm | None = None, cross_kv: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block on the stream `h` (contiguous) whose modulated norm1 `x` is already computed.

        Args:
            h, mod, table, gates, text, text_bias: as `forward`.
            x (`torch.Tensor` of shape `(B, L, C)`): `norm1` of `h` (or the previous block's output
                normed by this block's modulation).
            next_norm (`NextNorm`, *optional*): the modulation of the norm that reads this block's
                output (the next block's norm1, or the final layer's); given, ff2's gated residual
                is fused with it (``gated_residual_ln_modulate_table``), otherwise with ff2's GEMM.
            cross_kv (`torch.Tensor`, *optional*): `cross_kv` of the text states, precomputed.

        Returns:
            ``(h_out, x_next)``: the block's output and, with `next_norm`, its modulated norm.
        """
        ops = _ops()
        (h1, h2), hd, C = self.heads, self.head_dim, self.width
        B, L, _ = h.shape
        # 1. Self-attention on the kept heads; the gated residual in out1's epilogue.
        a = ops.attention(self.producer_gemm("qkv1", x), h1, layout=self.qkv_layout)
        h = self.own_gemm("out1", a, "gated_residual", gate=gates[0], res=h)
        # 2. Masked cross-attention on the kept heads (q from the stream itself: PixArt has no norm
        #    here), the residual in out2's epilogue.
        q = self.producer_gemm("q2", h).view(B, L, h2, hd).transpose(1, 2)
        k, v = split_kv(self.cross_kv(text) if cross_kv is None else cross_kv, h2, hd, self.kv_layout)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=text_bias).transpose(1, 2).reshape(B, L, h2 * hd)
        h = self.own_gemm("out2", a, "residual", res=h)
        # 3. MLP on the kept channels: norm2 with the table row fused, tanh-GELU epilogue.
        f = self.producer_gemm("ff1", ops.ln_modulate_table(h, mod[:, 3 * C:4 * C], mod[:, 4 * C:5 * C], table[3],
                                                            table[4], self.eps), "gelu_tanh")
        if next_norm is None:
            return self.own_gemm("ff2", f, "gated_residual", gate=gates[1], res=h), None
        shift, scale, shift_table, scale_table, eps = next_norm
        return ops.gated_residual_ln_modulate_table(h, mod[:, 5 * C:], self.own_gemm("ff2", f), shift, scale, table[5],
                                                    shift_table, scale_table, eps)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, mlp_width={self.mlp_width}, eps={self.eps:g}"
