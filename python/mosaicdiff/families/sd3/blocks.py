r"""The compact SD3 block (diffusers ``JointTransformerBlock``, MMDiT) on `mosaic_kernels.ops`.

A joint block computes, with the image stream ``h``, the text stream ``c`` and their modulations
``m`` (``norm1.linear(silu(temb))``: shift, scale, gate of the attention, then of the MLP, then in a
dual-attention block of ``attn2``) and ``n`` (``norm1_context``'s)::

    x  = LN(h) * (1 + m[1]) + m[0];   xc = LN(c) * (1 + n[1]) + n[0]
    q, k, v = [qkv(x) | add_qkv(xc)]                  # joint sequence [image | text], q/k RMSNorm'd (SD3.5)
    a_img, a_txt = attention(q, k, v)
    h = h + m[2] * out(a_img)
    h = h + m[8] * out2(attention(qkv2(LN(h_in) * (1 + m[7]) + m[6])))   # dual-attention blocks (SD3.5-M)
    h = h + m[5] * ff2(gelu_tanh(ff1(LN(h) * (1 + m[4]) + m[3])))
    c = c + n[2] * add_out(a_txt);  c = c + n[5] * ffc2(gelu_tanh(ffc1(LN(c) * (1 + n[4]) + n[3])))

The last block is ``context_pre_only``: its text stream is normed by ``AdaLayerNormContinuous``
(``n = (scale, shift)``) and only feeds the joint k/v; the text output is dropped.

Pruning removes joint heads (q/k/v rows of both streams, columns of both out projections), attn2 heads
and MLP channels of each stream; `CompactSD3BlockWeights` holds what is left (the q/k RMSNorm weights
are per ``head_dim``, every head's, kept whole). `CompactSD3Block` runs it with the engine's ops: the
modulated norms (``ln_modulate``); q/k of both streams RMSNorm'd straight into one joint q/k/v buffer
(``rms_norm_rope`` with ``out=``: no concatenation) which ``attention`` reads; the attention's gated
residual fused with the MLP's norm (``gated_residual_ln_modulate``); ff1 with the tanh-GELU epilogue
(``linear_gelu``); ff2's gated residual fused with the next block's norm1 across the block boundary
(`CompactSD3Block.forward_normed`) or, alone, in ff2's epilogue (``linear_gated_residual``). Every GEMM
goes through `mosaicdiff.core.gemm.gemm`: once `mosaicdiff.quantize` stores the weights as float8
(``fp8_weights``), the same calls run ``fp8_gemm`` with the same epilogues.

The joint-attention steps are the module functions `qkv_heads`, `joint_qkv` and `joint_attention`
(the part an MMDiT family shares).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from mosaicdiff.core.adapter import PrunedGroup
from mosaicdiff.core.gemm import FP8GemmMixin
from mosaicdiff.core.stages import frozen

__all__ = ["SD3_INDEX_FIELDS", "BlockKind", "CompactSD3Block", "CompactSD3BlockWeights", "NextNorm",
           "block_kind", "compact_fields", "joint_attention", "joint_qkv", "qkv_heads",
           "sd3_block_shapes"]

#: The modulation a block's output stream feeds, for the boundary fusion: ``(shift, scale)``, each ``(B, C)``.
NextNorm = tuple[torch.Tensor, torch.Tensor]


class BlockKind(NamedTuple):
    """What a block computes: the text stream dropped (the last block), a second image self-attention
    (SD3.5-Medium's first blocks), q/k RMSNorm (SD3.5)."""

    context_pre_only: bool
    dual_attention: bool
    qk_norm: bool


def block_kind(context_pre_only: bool, dual_attention: bool, qk_norm: bool) -> BlockKind:
    return BlockKind(bool(context_pre_only), bool(dual_attention), bool(qk_norm))


def _ops():
    from mosaic_kernels import ops

    return ops


#: The index fields (kept units, CPU metadata) of `CompactSD3BlockWeights`.
SD3_INDEX_FIELDS = ("kept_heads", "kept_heads2", "kept_channels", "kept_context_channels")


@dataclass
class CompactSD3BlockWeights:
    """The pruned, compensated weights of one SD3 block (C = width, hd = head_dim, h / h2 = kept joint /
    attn2 heads, F / Fc = kept image / text MLP channels).

    ``qkv`` rows are ``[q | k | v]`` of the kept heads from the image stream (``to_q/k/v``), ``add_qkv``
    the same from the text stream (``add_q/k/v_proj``), ``qkv2`` of attn2. The fields of what a block
    does not have are None: ``add_out`` and ``ffc*`` in the ``context_pre_only`` block (its index
    ``kept_context_channels`` empty), ``qkv2`` / ``out2`` / ``norm2_*`` without dual attention
    (``kept_heads2`` empty), ``norm_*`` without qk-norm.
    """

    kept_heads: torch.Tensor  # (h,) int64 dense head indices, in row order
    kept_heads2: torch.Tensor  # (h2,), empty without attn2
    kept_channels: torch.Tensor  # (F,)
    kept_context_channels: torch.Tensor  # (Fc,), empty in the context_pre_only block
    qkv_weight: torch.Tensor  # (3*h*hd, C)
    qkv_bias: torch.Tensor
    add_qkv_weight: torch.Tensor  # (3*h*hd, C)
    add_qkv_bias: torch.Tensor
    out_weight: torch.Tensor  # (C, h*hd) to_out[0], compensated
    out_bias: torch.Tensor
    ff1_weight: torch.Tensor  # (F, C)
    ff1_bias: torch.Tensor
    ff2_weight: torch.Tensor  # (C, F) compensated
    ff2_bias: torch.Tensor
    add_out_weight: torch.Tensor | None = None  # (C, h*hd) to_add_out, compensated
    add_out_bias: torch.Tensor | None = None
    ffc1_weight: torch.Tensor | None = None  # (Fc, C)
    ffc1_bias: torch.Tensor | None = None
    ffc2_weight: torch.Tensor | None = None  # (C, Fc) compensated
    ffc2_bias: torch.Tensor | None = None
    qkv2_weight: torch.Tensor | None = None  # (3*h2*hd, C)
    qkv2_bias: torch.Tensor | None = None
    out2_weight: torch.Tensor | None = None  # (C, h2*hd) compensated
    out2_bias: torch.Tensor | None = None
    norm_q: torch.Tensor | None = None  # (hd,) RMSNorm weights, every head
    norm_k: torch.Tensor | None = None
    norm_added_q: torch.Tensor | None = None
    norm_added_k: torch.Tensor | None = None
    norm2_q: torch.Tensor | None = None
    norm2_k: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set (index fields included)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def kind(self) -> BlockKind:
        return block_kind(self.add_out_weight is None, self.qkv2_weight is not None, self.norm_q is not None)


def sd3_block_shapes(kind: BlockKind, heads: int, heads2: int, channels: int, context_channels: int, head_dim: int,
                     width: int) -> dict[str, tuple[int, ...]]:
    """The shape of every weight field a compact block of this kind has, with these kept counts."""
    C, i = width, heads * head_dim
    out = {"qkv_weight": (3 * i, C), "qkv_bias": (3 * i,), "add_qkv_weight": (3 * i, C), "add_qkv_bias": (3 * i,),
           "out_weight": (C, i), "out_bias": (C,), "ff1_weight": (channels, C), "ff1_bias": (channels,),
           "ff2_weight": (C, channels), "ff2_bias": (C,)}
    if not kind.context_pre_only:
        out.update({"add_out_weight": (C, i), "add_out_bias": (C,), "ffc1_weight": (context_channels, C),
                    "ffc1_bias": (context_channels,), "ffc2_weight": (C, context_channels), "ffc2_bias": (C,)})
    if kind.dual_attention:
        i2 = heads2 * head_dim
        out.update({"qkv2_weight": (3 * i2, C), "qkv2_bias": (3 * i2,), "out2_weight": (C, i2), "out2_bias": (C,)})
    if kind.qk_norm:
        names = ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] + (["norm2_q", "norm2_k"] if kind.dual_attention
                                                                         else [])
        out.update({n: (head_dim,) for n in names})
    return out


# ---------------------------------------------------------------------------------------------------
# Joint attention: [image | text] q/k/v in one buffer, SDPA, split (what an MMDiT family shares).
# ---------------------------------------------------------------------------------------------------


def qkv_heads(y: torch.Tensor, heads: int, head_dim: int, layout: str = "parts") -> torch.Tensor:
    """A ``(B, S, 3 * h * hd)`` q/k/v projection as a ``(B, S, 3, h, hd)`` view: rows ``[q | k | v]``
    (``"parts"``) or head-major (``"heads"``: q, k, v of head 0, then of head 1, ...)."""
    if layout == "heads":
        return y.unflatten(-1, (heads, 3, head_dim)).transpose(2, 3)
    return y.unflatten(-1, (3, heads, head_dim))


def _needs_grad(streams) -> bool:
    tensors = [t for qkv, norms in streams for t in (qkv, *(norms or ()))]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def joint_qkv(streams: Sequence[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]],
              eps: float = 1e-6) -> torch.Tensor:
    """The ``(B, L, 3 * h * hd)`` q/k/v of the streams' joint sequence (in the given order), laid out
    ``[q | k | v]`` per token as ``attention`` reads it.

    Args:
        streams: per stream ``((B, S, 3, h, hd) q/k/v view, (q norm, k norm) weights or None)``; with
            norm weights q and k are RMSNorm'd per head (``rms_norm_rope``) straight into the buffer.
        eps: the RMSNorm epsilon.
    """
    ops = _ops()
    if _needs_grad(streams):  # out= has no autograd: the differentiable form, one concatenation
        parts = []
        for qkv, norms in streams:
            if norms is not None:
                qkv = torch.stack([ops.rms_norm_rope(qkv[:, :, 0], norms[0], eps=eps),
                                   ops.rms_norm_rope(qkv[:, :, 1], norms[1], eps=eps), qkv[:, :, 2]], dim=2)
            parts.append(qkv)
        return torch.cat(parts, dim=1).flatten(2)
    first = streams[0][0]
    B, _, _, h, hd = first.shape
    joint = first.new_empty(B, sum(qkv.shape[1] for qkv, _ in streams), 3, h, hd)
    start = 0
    for qkv, norms in streams:
        rows = slice(start, start + qkv.shape[1])
        if norms is None:
            joint[:, rows].copy_(qkv)
        else:
            for part in (0, 1):
                ops.rms_norm_rope(qkv[:, :, part], norms[part], eps=eps, out=joint[:, rows, part])
            joint[:, rows, 2].copy_(qkv[:, :, 2])
        start += qkv.shape[1]
    return joint.flatten(2)


def joint_attention(joint: torch.Tensor, heads: int, lengths: Sequence[int]) -> list[torch.Tensor]:
    """SDPA over the joint sequence, split back into the streams: ``(B, S_i, h * hd)`` views (strided
    for B > 1; ``F.linear`` reads them as they are)."""
    a = _ops().attention(joint, heads)
    out, start = [], 0
    for n in lengths:
        out.append(a[:, start:start + n])
        start += n
    return out


# ---------------------------------------------------------------------------------------------------

class CompactSD3Block(FP8GemmMixin, nn.Module):
    r"""One pruned SD3 ``JointTransformerBlock``, computed with the fused `mosaic_kernels.ops`.

    The weights are frozen parameters; the kept-index tensors are CPU attributes (metadata). After
    `mosaicdiff.quantize` (``"fp8"``) every GEMM weight (``fp8_weights``; those of the kind) is
    ``float8_e4m3fn`` with its fp32 row scale ``<name>_weight_scale`` beside it, and the GEMMs run
    ``fp8_gemm`` in `fp8_mode`.

    Args:
        weights (`CompactSD3BlockWeights`): used as given (no copy); its set fields must be the kind's.
        kind (`BlockKind`): what the block computes.
        head_dim (`int`): channels per head (64 in SD3 / SD3.5).
        eps (`float`): the LayerNorms' epsilon (1e-6); qk_eps (`float`): the q/k RMSNorms' (1e-6).

    Raises:
        ValueError: weight shapes that do not fit each other or the kind, or an attention without heads.
    """

    weights_class = CompactSD3BlockWeights
    #: Row layout of the q/k/v projections (``"heads"`` in a shared-producer block).
    qkv_layout: ClassVar[str] = "parts"
    #: The GEMM weights `mosaicdiff.quantize` stores as float8 (a block of a kind without one has no such attribute).
    fp8_weights = ("qkv_weight", "add_qkv_weight", "qkv2_weight", "out_weight", "add_out_weight", "out2_weight",
                   "ff1_weight", "ff2_weight", "ffc1_weight", "ffc2_weight")

    def __init__(self, weights: CompactSD3BlockWeights, kind: BlockKind, head_dim: int, eps: float = 1e-6,
                 qk_eps: float = 1e-6):
        super().__init__()
        self._setup(kind, head_dim, eps, qk_eps, {k: getattr(weights, k) for k in SD3_INDEX_FIELDS})
        given = {k for k, v in weights.tensors().items() if k not in SD3_INDEX_FIELDS}
        shapes = self.shapes(int(weights.out_bias.shape[0]))
        if given != set(shapes):
            raise ValueError(f"CompactSD3Block: a {kind} block has the fields {sorted(shapes)}, got {sorted(given)}")
        for field, shape in shapes.items():
            t = getattr(weights, field)
            if tuple(t.shape) != shape:
                raise ValueError(f"CompactSD3BlockWeights.{field}: expected shape {shape}, got {tuple(t.shape)}")
            setattr(self, field, frozen(t))

    def _setup(self, kind: BlockKind, head_dim: int, eps: float, qk_eps: float, kept: Mapping[str, Any]) -> None:
        self.kind, self.head_dim, self.eps, self.qk_eps = block_kind(*kind), int(head_dim), float(eps), float(qk_eps)
        for field in SD3_INDEX_FIELDS:
            setattr(self, field, torch.as_tensor(kept[field], dtype=torch.int64, device="cpu").detach().reshape(-1))
        if self.heads < 1 or (self.kind.dual_attention and self.heads2 < 1):
            raise ValueError(f"{type(self).__name__}: every attention keeps at least one head, got "
                             f"{self.heads}, {self.heads2}")
        if self.mlp_width < 1 or (not self.kind.context_pre_only and self.context_mlp_width < 1):
            raise ValueError(f"{type(self).__name__}: every MLP keeps at least one channel, got {self.mlp_width}, "
                             f"{self.context_mlp_width}")

    def shapes(self, width: int | None = None) -> dict[str, tuple[int, ...]]:
        return sd3_block_shapes(self.kind, self.heads, self.heads2, self.mlp_width, self.context_mlp_width,
                                self.head_dim, self.width if width is None else width)

    # ------------------------------------------------------------------ sizes and weights

    @property
    def heads(self) -> int:
        return int(self.kept_heads.numel())

    @property
    def heads2(self) -> int:
        return int(self.kept_heads2.numel())

    @property
    def mlp_width(self) -> int:
        return int(self.kept_channels.numel())

    @property
    def context_mlp_width(self) -> int:
        return int(self.kept_context_channels.numel())

    @property
    def width(self) -> int:
        return int(self.out_bias.shape[0])

    def weights(self) -> CompactSD3BlockWeights:
        """The block's tensors as `CompactSD3BlockWeights` (no copy)."""
        return CompactSD3BlockWeights(**{k: getattr(self, k) for k in SD3_INDEX_FIELDS},
                                      **{k: getattr(self, k).detach() for k in self.shapes()})

    # the q/k norms (views of the storage in a shared block); the GEMM operands:
    # `mosaicdiff.core.gemm.FP8GemmMixin.operands`
    def qk_norms(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (q, k) RMSNorm weights ``norm_*`` / ``norm_added_*`` / ``norm2_*``, or None without qk-norm."""
        if not self.kind.qk_norm:
            return None
        return getattr(self, f"{prefix}_q"), getattr(self, f"{prefix}_k")

    # ------------------------------------------------------------------ forward

    def context_norm(self, cmod: torch.Tensor) -> NextNorm:
        """``(shift, scale)`` of norm1_context: adaLN-Zero chunks 0, 1; ``AdaLayerNormContinuous``'s
        ``(scale, shift)`` in the context_pre_only block."""
        return (cmod[:, 1], cmod[:, 0]) if self.kind.context_pre_only else (cmod[:, 0], cmod[:, 1])

    def forward(self, h: torch.Tensor, c: torch.Tensor, mod: torch.Tensor, cmod: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block on its own (its norm1s included).

        Args:
            h (`torch.Tensor` of shape `(B, L, C)`): the image stream (contiguous).
            c (`torch.Tensor` of shape `(B, S, C)`): the text stream (contiguous).
            mod (`torch.Tensor` of shape `(B, 6 or 9, C)`): norm1's modulation chunks (unit stride in C).
            cmod (`torch.Tensor` of shape `(B, 6 or 2, C)`): norm1_context's.

        Returns:
            ``(h, c)``; ``c`` is None after the context_pre_only block.
        """
        ops = _ops()
        x = ops.ln_modulate(h, mod[:, 0], mod[:, 1], self.eps)
        xc = ops.ln_modulate(c, *self.context_norm(cmod), self.eps)
        h, _, c, _ = self.forward_normed(h, x, c, xc, mod, cmod)
        return h, c

    def forward_normed(self, h: torch.Tensor, x: torch.Tensor, c: torch.Tensor, xc: torch.Tensor, mod: torch.Tensor,
                       cmod: torch.Tensor, next_norm: NextNorm | None = None,
                       next_context_norm: NextNorm | None = None):
        """The block on streams whose modulated norm1 (`x`, `xc`) is already computed.

        Args:
            h, c, mod, cmod: as `forward`.
            x, xc (`torch.Tensor`): the modulated norm1 of `h` and of `c`.
            next_norm, next_context_norm (`NextNorm`, *optional*): the modulation of the norm reading
                this block's image / text output (the next block's norm1 / norm1_context, or the final
                layer's); given, ff2's gated residual is fused with it, otherwise with ff2's GEMM.

        Returns:
            ``(h, x_next, c, xc_next)``: the streams after the block and, where a next norm was given,
            their modulated norms (else None); ``c`` is None after the context_pre_only block.
        """
        ops = _ops()
        hd, eps, kind = self.head_dim, self.eps, self.kind
        # 1. Joint attention over [image | text] on the kept heads.
        streams = [(qkv_heads(self.producer_gemm("qkv", x), self.heads, hd, self.qkv_layout), self.qk_norms("norm")),
                   (qkv_heads(self.producer_gemm("add_qkv", xc), self.heads, hd, self.qkv_layout),
                    self.qk_norms("norm_added"))]
        a_img, a_txt = joint_attention(joint_qkv(streams, self.qk_eps), self.heads, (x.shape[1], xc.shape[1]))
        y, gate = self.own_gemm("out", a_img), mod[:, 2]
        # 2. SD3.5-Medium: a second self-attention of the image stream, on norm1's input.
        if kind.dual_attention:
            x2 = ops.ln_modulate(h, mod[:, 6], mod[:, 7], eps)
            h = ops.gated_residual(h, gate, y)
            qkv2 = qkv_heads(self.producer_gemm("qkv2", x2), self.heads2, hd, self.qkv_layout)
            (a2,) = joint_attention(joint_qkv([(qkv2, self.qk_norms("norm2"))], self.qk_eps), self.heads2,
                                    (x.shape[1],))
            y, gate = self.own_gemm("out2", a2), mod[:, 8]
        # 3. Image MLP: the attention's gated residual fused with norm2; tanh-GELU epilogue.
        h, xf = ops.gated_residual_ln_modulate(h, gate, y, mod[:, 3], mod[:, 4], eps)
        h, x_next = self._gated_out(h, self.producer_gemm("ff1", xf, "gelu_tanh"), "ff2", mod[:, 5], next_norm)
        if kind.context_pre_only:
            return h, x_next, None, None
        # 4. Text stream: the same with to_add_out and ff_context.
        c, xcf = ops.gated_residual_ln_modulate(c, cmod[:, 2], self.own_gemm("add_out", a_txt), cmod[:, 3],
                                                cmod[:, 4], eps)
        c, xc_next = self._gated_out(c, self.producer_gemm("ffc1", xcf, "gelu_tanh"), "ffc2", cmod[:, 5],
                                     next_context_norm)
        return h, x_next, c, xc_next

    def _gated_out(self, h: torch.Tensor, f: torch.Tensor, name: str, gate: torch.Tensor,
                   next_norm: NextNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h + gate * consumer(f)``: fused with the next norm when given, else in the GEMM's epilogue."""
        if next_norm is None:
            return self.own_gemm(name, f, "gated_residual", gate=gate, res=h), None
        return _ops().gated_residual_ln_modulate(h, gate, self.own_gemm(name, f), next_norm[0], next_norm[1],
                                                 self.eps)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, heads2={self.heads2}, head_dim={self.head_dim}, mlp_width={self.mlp_width}, "
                f"context_mlp_width={self.context_mlp_width}, {self.kind}")


def _norm_weight(norm: nn.Module | None, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's weight (ones for one without affine)."""
    weight = getattr(norm, "weight", None)
    return weight.detach().clone() if weight is not None else torch.ones(head_dim, dtype=like.dtype, device=like.device)


def compact_fields(block: nn.Module, pruned: Mapping[str, PrunedGroup]) -> CompactSD3BlockWeights:
    """`CompactSD3BlockWeights` of a ``JointTransformerBlock`` from its pruned groups
    (`mosaicdiff.families.sd3.adapter.sd3_groups`: ``attn``, ``attn2``, ``ff``, ``ff_context``)."""
    a, ff = pruned["attn"], pruned["ff"]
    attn = block.attn
    hd = attn.inner_dim // attn.heads
    empty = a.kept.new_zeros(0)
    out: dict[str, Any] = {
        "kept_heads": a.kept, "kept_channels": ff.kept,
        "qkv_weight": torch.cat(a.producer_weights[:3]), "qkv_bias": torch.cat(a.producer_biases[:3]),
        "add_qkv_weight": torch.cat(a.producer_weights[3:]), "add_qkv_bias": torch.cat(a.producer_biases[3:]),
        "out_weight": a.consumer_weight, "out_bias": a.consumer_bias,
        "ff1_weight": ff.producer_weights[0], "ff1_bias": ff.producer_biases[0],
        "ff2_weight": ff.consumer_weight, "ff2_bias": ff.consumer_bias}
    fc = pruned.get("ff_context")
    out["kept_context_channels"] = fc.kept if fc is not None else empty
    if fc is not None:
        out.update({"add_out_weight": a.more_consumer_weights[0], "add_out_bias": a.more_consumer_biases[0],
                    "ffc1_weight": fc.producer_weights[0], "ffc1_bias": fc.producer_biases[0],
                    "ffc2_weight": fc.consumer_weight, "ffc2_bias": fc.consumer_bias})
    a2 = pruned.get("attn2")
    out["kept_heads2"] = a2.kept if a2 is not None else empty
    if a2 is not None:
        out.update({"qkv2_weight": torch.cat(a2.producer_weights), "qkv2_bias": torch.cat(a2.producer_biases),
                    "out2_weight": a2.consumer_weight, "out2_bias": a2.consumer_bias})
    if getattr(attn, "norm_q", None) is not None:
        like = a.consumer_weight
        out.update({"norm_q": _norm_weight(attn.norm_q, hd, like), "norm_k": _norm_weight(attn.norm_k, hd, like),
                    "norm_added_q": _norm_weight(attn.norm_added_q, hd, like),
                    "norm_added_k": _norm_weight(attn.norm_added_k, hd, like)})
        if a2 is not None:
            out.update({"norm2_q": _norm_weight(block.attn2.norm_q, hd, like),
                        "norm2_k": _norm_weight(block.attn2.norm_k, hd, like)})
    return CompactSD3BlockWeights(**out)
