r"""The compact Flux blocks (diffusers ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``) on
`mosaic_kernels.ops`.

A double-stream block computes, per stream s in (image, text) with its own modulation ``m_s`` (the
block's AdaLayerNormZero output, six ``(B, C)`` chunks) and weights::

    x_s = LN(h_s) * (1 + m_s[1]) + m_s[0]
    q_s, k_s, v_s = qkv_s(x_s)                            # per head; q, k RMSNorm'd (per-head weights)
    a = attention(RoPE([q_txt | q_img]), RoPE([k_txt | k_img]), [v_txt | v_img])
    h_s = h_s + m_s[2] * out_s(a_s)                        # out_img = to_out[0], out_txt = to_add_out
    h_s = h_s + m_s[5] * ff2_s(gelu_tanh(ff1_s(LN(h_s) * (1 + m_s[4]) + m_s[3])))

and a single-stream block, on the joint ``[text | image]`` stream with modulation ``m`` (three chunks)::

    x = LN(h) * (1 + m[1]) + m[0]
    q, k, v, f = proj(x)                                  # one GEMM: [q | k | v | mlp] rows
    h = h + m[2] * proj_out([attention(RoPE(q), RoPE(k), v) | gelu_tanh(f)])

Pruning removes heads (the q/k/v rows of both streams, the columns of both out projections) and
MLP channels; the q/k RMSNorm weights (per ``head_dim``) are kept whole. The blocks run the
modulated norms with ``ln_modulate``, the attention out projection's gated residual fused with the
next norm (``gated_residual_ln_modulate``), the MLP's first GEMM with the tanh-GELU epilogue
(``linear_gelu``), the last GEMMs with the gated residual in their epilogue
(``linear_gated_residual``), q/k RMSNorm and RoPE in one pass (``rms_norm_rope``) written straight
into the joint ``[text | image]`` q/k/v buffer that ``attention`` reads. Every GEMM goes through
`mosaicdiff.core.gemm.gemm`: once `mosaicdiff.quantize` stores the weights as float8 (``fp8_weights``),
the same calls run ``fp8_gemm`` with the same epilogues.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mosaicdiff.core.gemm import FP8GemmMixin
from mosaicdiff.core.stages import frozen

__all__ = ["CompactFluxDoubleBlock", "CompactFluxDoubleWeights", "CompactFluxSingleBlock", "CompactFluxSingleWeights",
           "NextNorm", "SingleNextNorm", "double_block_shapes", "single_block_shapes"]

#: The norms a double block's outputs feed, for the boundary fusion: ``(shift_img, scale_img, shift_txt,
#: scale_txt, eps)``, the vectors ``(B, C)`` (the next single block's: the same pair twice).
NextNorm = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]
#: The norm a single block's output feeds: ``(shift, scale, eps)``.
SingleNextNorm = tuple[torch.Tensor, torch.Tensor, float]


def _ops():
    from mosaic_kernels import ops

    return ops


@dataclass
class _Weights:
    """Fields of a compact block: the kept-unit index fields (`index_fields`), then the weights."""

    index_fields: ClassVar[tuple[str, ...]] = ()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def weight_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in cls.index_fields)


@dataclass
class CompactFluxDoubleWeights(_Weights):
    """The pruned, compensated weights of one double-stream block (h kept heads of hd, C width, F / Fc
    kept image / text MLP channels). ``qkv`` rows are ``[q | k | v]`` of the kept heads (image
    stream: ``to_q/k/v``), ``add_qkv`` the same of the text stream (``add_q/k/v_proj``)."""

    index_fields: ClassVar[tuple[str, ...]] = ("kept_heads", "kept_channels", "kept_context_channels")

    kept_heads: torch.Tensor  # (h,) int64 dense head indices, in row order
    kept_channels: torch.Tensor  # (F,) image MLP channels
    kept_context_channels: torch.Tensor  # (Fc,) text MLP channels
    qkv_weight: torch.Tensor  # (3*h*hd, C)
    qkv_bias: torch.Tensor
    add_qkv_weight: torch.Tensor  # (3*h*hd, C)
    add_qkv_bias: torch.Tensor
    out_weight: torch.Tensor  # (C, h*hd) to_out[0], compensated
    out_bias: torch.Tensor
    add_out_weight: torch.Tensor  # (C, h*hd) to_add_out, compensated
    add_out_bias: torch.Tensor
    norm_q: torch.Tensor  # (hd,) RMSNorm weights, every head
    norm_k: torch.Tensor
    norm_added_q: torch.Tensor
    norm_added_k: torch.Tensor
    ff1_weight: torch.Tensor  # (F, C)
    ff1_bias: torch.Tensor
    ff2_weight: torch.Tensor  # (C, F) compensated
    ff2_bias: torch.Tensor
    ffc1_weight: torch.Tensor  # (Fc, C)
    ffc1_bias: torch.Tensor
    ffc2_weight: torch.Tensor  # (C, Fc) compensated
    ffc2_bias: torch.Tensor


@dataclass
class CompactFluxSingleWeights(_Weights):
    """The pruned, compensated weights of one single-stream block: ``proj`` rows are ``[q | k | v]`` of
    the kept heads then the kept MLP rows (one GEMM), ``out`` (``proj_out``) columns the kept heads'
    then the kept channels'."""

    index_fields: ClassVar[tuple[str, ...]] = ("kept_heads", "kept_channels")

    kept_heads: torch.Tensor  # (h,)
    kept_channels: torch.Tensor  # (F,)
    proj_weight: torch.Tensor  # (3*h*hd + F, C)
    proj_bias: torch.Tensor
    out_weight: torch.Tensor  # (C, h*hd + F) compensated
    out_bias: torch.Tensor
    norm_q: torch.Tensor  # (hd,)
    norm_k: torch.Tensor


def double_block_shapes(heads: int, channels: int, context_channels: int, head_dim: int,
                        width: int) -> dict[str, tuple[int, ...]]:
    """The shape of every weight field of a compact double block with these kept counts."""
    i, C, hd = heads * head_dim, width, head_dim
    out = {"qkv_weight": (3 * i, C), "qkv_bias": (3 * i,), "add_qkv_weight": (3 * i, C), "add_qkv_bias": (3 * i,),
           "out_weight": (C, i), "out_bias": (C,), "add_out_weight": (C, i), "add_out_bias": (C,)}
    out.update({n: (hd,) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")})
    for p, f in (("ff", channels), ("ffc", context_channels)):
        out.update({f"{p}1_weight": (f, C), f"{p}1_bias": (f,), f"{p}2_weight": (C, f), f"{p}2_bias": (C,)})
    return out


def single_block_shapes(heads: int, channels: int, head_dim: int, width: int) -> dict[str, tuple[int, ...]]:
    """The shape of every weight field of a compact single block with these kept counts."""
    i = heads * head_dim
    return {"proj_weight": (3 * i + channels, width), "proj_bias": (3 * i + channels,),
            "out_weight": (width, i + channels), "out_bias": (width,), "norm_q": (head_dim,), "norm_k": (head_dim,)}


class _CompactFluxBlock(FP8GemmMixin, nn.Module):
    """Construction shared by the two blocks: kept indices as CPU metadata, weights as frozen parameters."""

    weights_class: ClassVar[type[_Weights]]
    #: Row layout of the q/k/v projections: ``"parts"`` (``[q | k | v]``) here, ``"heads"`` (q, k, v of
    #: head 0, then of head 1, ...) in a shared-producer block (`mosaicdiff.families.flux.producers`).
    qkv_layout: ClassVar[str] = "parts"

    def __init__(self, weights: _Weights, head_dim: int, eps: float = 1e-6, qk_eps: float = 1e-6):
        super().__init__()
        self.head_dim, self.eps, self.qk_eps = int(head_dim), float(eps), float(qk_eps)
        name = type(self).__name__
        for field in self.weights_class.index_fields:
            setattr(self, field, getattr(weights, field).detach().to("cpu", torch.int64).reshape(-1))
        if self.heads < 1:
            raise ValueError(f"{name}: the attention keeps at least one head, got {self.heads}")
        for field, shape in self.shapes(int(weights.out_bias.shape[0])).items():
            t = getattr(weights, field)
            if tuple(t.shape) != shape:
                raise ValueError(f"{type(weights).__name__}.{field}: expected shape {shape}, got {tuple(t.shape)}")
            setattr(self, field, frozen(t))

    @staticmethod
    def shapes_for(counts: tuple[int, ...], head_dim: int, width: int) -> dict[str, tuple[int, ...]]:
        """The weight shapes of a block with these kept counts (`weights_class.index_fields` order)."""
        raise NotImplementedError

    def shapes(self, width: int) -> dict[str, tuple[int, ...]]:
        counts = tuple(int(getattr(self, k).numel()) for k in self.weights_class.index_fields)
        return self.shapes_for(counts, self.head_dim, width)

    @property
    def heads(self) -> int:
        return int(self.kept_heads.numel())

    @property
    def width(self) -> int:
        return int(self.out_bias.shape[0])

    def weights(self) -> _Weights:
        """The block's tensors as its weights dataclass (no copy)."""
        cls = self.weights_class
        return cls(**{n: getattr(self, n) for n in cls.index_fields},
                   **{n: getattr(self, n).detach() for n in cls.weight_fields()})

    def _qkv_view(self, y: torch.Tensor) -> torch.Tensor:
        """A ``(B, S, 3 * h * hd)`` q/k/v projection as a ``(B, S, 3, h, hd)`` view (`qkv_layout`)."""
        if self.qkv_layout == "heads":
            return y.unflatten(-1, (self.heads, 3, self.head_dim)).transpose(2, 3)
        return y.unflatten(-1, (3, self.heads, self.head_dim))

    def _joint_qkv(self, streams, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The joint ``(B, L, 3 * h * hd)`` q/k/v (``[q | k | v]`` per token) of the streams, in sequence
        order: each a ``((B, S, 3, h, hd) projections, (q norm, k norm) weights)`` pair, q and k
        RMSNorm'd and rotated (``rms_norm_rope``) straight into the buffer attention reads, v copied."""
        ops = _ops()
        B, h, hd = streams[0][0].shape[0], self.heads, self.head_dim
        lengths = [qkv.shape[1] for qkv, _ in streams]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        if torch.is_grad_enabled() and (any(qkv.requires_grad for qkv, _ in streams)
                                        or any(w.requires_grad for _, ws in streams for w in ws)):
            # out= has no autograd: the differentiable form, one concatenation
            parts = [torch.stack([ops.rms_norm_rope(qkv[:, :, 0], wq, cos[a:a + n], sin[a:a + n], self.qk_eps),
                                  ops.rms_norm_rope(qkv[:, :, 1], wk, cos[a:a + n], sin[a:a + n], self.qk_eps),
                                  qkv[:, :, 2]], dim=2)
                     for (qkv, (wq, wk)), a, n in zip(streams, starts, lengths)]
            return torch.cat(parts, dim=1).flatten(2)
        joint = streams[0][0].new_empty(B, sum(lengths), 3, h, hd)
        for (qkv, weights), a, n in zip(streams, starts, lengths):
            for part, weight in enumerate(weights):
                ops.rms_norm_rope(qkv[:, :, part], weight, cos[a:a + n], sin[a:a + n], self.qk_eps,
                                  out=joint[:, a:a + n, part])
            joint[:, a:a + n, 2].copy_(qkv[:, :, 2])
        return joint.flatten(2)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, mlp_width={self.mlp_width}"


class CompactFluxDoubleBlock(_CompactFluxBlock):
    r"""One pruned double-stream Flux block, computed with the fused `mosaic_kernels.ops`.

    Args:
        weights (`CompactFluxDoubleWeights`): used as given (no copy).
        head_dim (`int`): channels per head (128 in FLUX.1).
        eps (`float`): the LayerNorms' epsilon (1e-6); qk_eps (`float`): the q/k RMSNorms' (1e-6).

    Raises:
        ValueError: weight shapes that do not fit each other, or an attention without heads.
    """

    weights_class = CompactFluxDoubleWeights
    #: The GEMM weights `mosaicdiff.quantize` may store as float8 (each with a ``<name>_scale``).
    fp8_weights = ("qkv_weight", "add_qkv_weight", "out_weight", "add_out_weight", "ff1_weight", "ff2_weight",
                   "ffc1_weight", "ffc2_weight")

    @staticmethod
    def shapes_for(counts: tuple[int, ...], head_dim: int, width: int) -> dict[str, tuple[int, ...]]:
        return double_block_shapes(*counts, head_dim, width)

    @property
    def mlp_width(self) -> int:
        return int(self.kept_channels.numel())

    def norm1(self, img: torch.Tensor, txt: torch.Tensor, mod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The modulated norm1 of each stream: what `forward_normed` takes as ``x_img``, ``x_txt``."""
        ops = _ops()
        return ops.ln_modulate(img, mod[:, 0], mod[:, 1], self.eps), ops.ln_modulate(txt, mod[:, 6], mod[:, 7], self.eps)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mod: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the image and text streams.

        Args:
            img (`torch.Tensor` of shape `(B, Si, C)`), txt (`(B, St, C)`): the contiguous streams.
            mod (`torch.Tensor` of shape `(B, 12, C)`): the block's modulation, image chunks 0..5
                (shift, scale, gate of the attention, then of the MLP), text chunks 6..11.
            cos, sin (`torch.Tensor` of shape `(St + Si, hd)`, float32): RoPE of the joint sequence.

        Returns:
            ``(img, txt)``, the streams after the block.
        """
        return self.forward_normed(img, txt, *self.norm1(img, txt, mod), mod, cos, sin)[:2]

    def forward_normed(self, img: torch.Tensor, txt: torch.Tensor, x_img: torch.Tensor, x_txt: torch.Tensor,
                       mod: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, next_norm: NextNorm | None = None):
        """The block on streams whose modulated norm1 (`norm1`) is already computed.

        Args:
            img, txt, mod, cos, sin: as `forward`.
            x_img, x_txt: `norm1` of the streams (or the previous block's outputs normed by this block's
                modulation).
            next_norm (*optional*): ``(shift_img, scale_img, shift_txt, scale_txt, eps)`` of the norm
                that reads this block's outputs (the next block's norm1); given, each MLP's gated
                residual is fused with it (``gated_residual_ln_modulate``), otherwise with its GEMM.

        Returns:
            ``(img, txt, x_img_next, x_txt_next)``, the last two None without `next_norm`.
        """
        ops = _ops()
        St, h = txt.shape[1], self.heads
        # 1. q/k/v of each stream, q/k normed and rotated into the joint buffer; joint attention.
        joint = self._joint_qkv([(self._qkv_view(self.producer_gemm("add_qkv", x_txt)),
                                  (self.norm_added_q, self.norm_added_k)),
                                 (self._qkv_view(self.producer_gemm("qkv", x_img)), (self.norm_q, self.norm_k))],
                                cos, sin)
        a = ops.attention(joint, h)
        # 2. Per stream: out projection, gated residual fused with the modulated norm2, then the MLP
        #    (tanh-GELU epilogue) with its gated residual fused with the next norm or in the GEMM's epilogue.
        streams = ((img, a[:, St:], "out", 0, "ff1", "ff2"), (txt, a[:, :St], "add_out", 6, "ffc1", "ffc2"))
        out, normed = [], []
        for k, (h_s, a_s, out_gemm, m, ff1, ff2) in enumerate(streams):
            h_s, x = ops.gated_residual_ln_modulate(h_s, mod[:, m + 2], self.own_gemm(out_gemm, a_s),
                                                    mod[:, m + 3], mod[:, m + 4], self.eps)
            f = self.producer_gemm(ff1, x, "gelu_tanh")
            if next_norm is None:
                out.append(self.own_gemm(ff2, f, "gated_residual", gate=mod[:, m + 5], res=h_s))
                normed.append(None)
                continue
            h_s, x = ops.gated_residual_ln_modulate(h_s, mod[:, m + 5], self.own_gemm(ff2, f),
                                                    next_norm[2 * k], next_norm[2 * k + 1], next_norm[4])
            out.append(h_s)
            normed.append(x)
        return out[0], out[1], normed[0], normed[1]


class CompactFluxSingleBlock(_CompactFluxBlock):
    r"""One pruned single-stream Flux block, computed with the fused `mosaic_kernels.ops`.

    Args:
        weights (`CompactFluxSingleWeights`): used as given (no copy).
        head_dim, eps, qk_eps: as `CompactFluxDoubleBlock`.
    """

    weights_class = CompactFluxSingleWeights
    #: The GEMM weights `mosaicdiff.quantize` may store as float8 (each with a ``<name>_scale``).
    fp8_weights = ("proj_weight", "out_weight")

    @staticmethod
    def shapes_for(counts: tuple[int, ...], head_dim: int, width: int) -> dict[str, tuple[int, ...]]:
        return single_block_shapes(*counts, head_dim, width)

    @property
    def mlp_width(self) -> int:
        return int(self.kept_channels.numel())

    def producer_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``((B, L, 3, h, hd) q/k/v view, (B, L, F) MLP pre-activation)`` of the normed stream: one GEMM."""
        i = self.heads * self.head_dim
        y = self.producer_gemm("proj", x)
        return self._qkv_view(y[..., :3 * i]), y[..., 3 * i:]

    def norm1(self, h: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """The modulated norm: what `forward_normed` takes as ``x``."""
        return _ops().ln_modulate(h, mod[:, 0], mod[:, 1], self.eps)

    def forward(self, h: torch.Tensor, mod: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The block on the joint stream.

        Args:
            h (`torch.Tensor` of shape `(B, L, C)`): the contiguous ``[text | image]`` stream.
            mod (`torch.Tensor` of shape `(B, 3, C)`): shift, scale, gate.
            cos, sin (`torch.Tensor` of shape `(L, hd)`, float32): RoPE of the joint sequence.

        Returns:
            `torch.Tensor` of shape `(B, L, C)`.
        """
        return self.forward_normed(h, self.norm1(h, mod), mod, cos, sin)[0]

    def forward_normed(self, h: torch.Tensor, x: torch.Tensor, mod: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, next_norm: SingleNextNorm | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block on the stream `h` whose modulated norm `x` is already computed.

        Args:
            h, mod, cos, sin: as `forward`; x: `norm1` of `h`.
            next_norm (*optional*): ``(shift, scale, eps)`` of the norm that reads the output (the next
                block's); given, the gated residual is fused with it, otherwise with ``proj_out``'s GEMM.

        Returns:
            ``(h_out, x_next)``, ``x_next`` None without `next_norm`.
        """
        ops = _ops()
        # 1. q, k, v and the MLP's first layer (one GEMM), q/k normed and rotated.
        qkv, f = self.producer_outputs(x)
        joint = self._joint_qkv([(qkv, (self.norm_q, self.norm_k))], cos, sin)
        # 2. Attention and tanh-GELU side by side; proj_out with the gated residual in its epilogue,
        #    or fused with the next norm.
        z = torch.cat([ops.attention(joint, self.heads), F.gelu(f, approximate="tanh")], -1)
        if next_norm is None:
            return self.own_gemm("out", z, "gated_residual", gate=mod[:, 2], res=h), None
        return ops.gated_residual_ln_modulate(h, mod[:, 2], self.own_gemm("out", z), *next_norm)
