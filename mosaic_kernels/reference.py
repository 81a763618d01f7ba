"""Plain-torch definitions of every mosaic_kernels op: the ground truth in tests.

Every function computes in fp32 and casts the result back to the dtype of its main input
(``x`` or ``res``; for ``attention``, ``qkv``). They are deliberately plain: no fusion, no
in-place tricks, no backend dispatch. Kernels (Triton, CUDA) are tested against them.

Shapes use B = batch, L = tokens, D = model width (C in the runtime), K = GEMM input width,
N = GEMM output width, H = heads, hd = head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention_ref",
    "dequantize_fp8_ref",
    "fp8_gemm_ref",
    "gated_residual_ln_modulate_ref",
    "gated_residual_ln_modulate_table_ref",
    "gated_residual_ref",
    "gelu_erf_ref",
    "gelu_tanh_ref",
    "layer_norm_ref",
    "linear_geglu_ref",
    "linear_gated_residual_ref",
    "linear_gelu_ref",
    "linear_residual_ref",
    "ln_modulate_ref",
    "ln_modulate_table_ref",
    "quantize_rows_fp8_ref",
    "residual_layer_norm_ref",
    "rms_norm_rope_ref",
]


def _layer_norm_fp32(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine over the last dim, on an fp32 tensor (biased variance)."""
    mean = x.mean(dim=-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dim=-1, keepdim=True)
    return xc * torch.rsqrt(var + eps)


def ln_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``y = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :]`` (LayerNorm without affine).

    ``LN(x) = (x - mean(x)) / sqrt(var(x) + eps)`` over the last dim, with the biased variance
    (as ``torch.nn.LayerNorm``). This is the adaLN-Zero "norm + modulate" of a DiT block.

    Args:
        x: (B, L, D) activations.
        shift: (B, D) per-sample shift.
        scale: (B, D) per-sample scale (the modulation is ``1 + scale``).
        eps: variance epsilon.

    Returns:
        (B, L, D) tensor of ``x.dtype``.
    """
    xf = x.float()
    y = _layer_norm_fp32(xf, eps) * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return y.to(x.dtype)


def _modulate_table_fp32(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, shift_table: torch.Tensor,
                         scale_table: torch.Tensor, eps: float) -> torch.Tensor:
    """``LN(x) * (1 + scale + scale_table) + shift + shift_table`` on an fp32 ``x``, the sums in fp32."""
    s = (scale.float() + scale_table.float())[:, None, :]
    return _layer_norm_fp32(x, eps) * (1.0 + s) + (shift.float() + shift_table.float())[:, None, :]


def ln_modulate_table_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    shift_table: torch.Tensor,
    scale_table: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``y = LN(x) * (1 + scale[:, None, :] + scale_table) + shift[:, None, :] + shift_table``.

    The adaLN-single "norm + modulate" of a PixArt block: the per-sample modulation (a chunk of
    the model's one ``adaln_single`` output) plus the block's learned per-channel row of its
    ``scale_shift_table``. The sums ``scale + scale_table`` and ``shift + shift_table`` are
    formed in fp32.

    Args:
        x: (B, L, D) activations.
        shift: (B, D) per-sample shift.
        scale: (B, D) per-sample scale.
        shift_table: (D,) per-channel shift row.
        scale_table: (D,) per-channel scale row.
        eps: variance epsilon.

    Returns:
        (B, L, D) tensor of ``x.dtype``.
    """
    return _modulate_table_fp32(x.float(), shift, scale, shift_table, scale_table, eps).to(x.dtype)


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """``y = LN(x) * weight + bias`` over the last dim (``torch.nn.LayerNorm``; SDXL's norms).

    Args:
        x: (..., D) activations.
        weight: (D,) scale, or None (``elementwise_affine=False``).
        bias: (D,) shift, or None.
        eps: variance epsilon.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    y = _layer_norm_fp32(x.float(), eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _rotate_pairs(y: torch.Tensor) -> torch.Tensor:
    """``(-y[2i+1], y[2i])`` for every pair of the last dim (diffusers' ``use_real_unbind_dim=-1``)."""
    real, imag = y.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-imag, real), dim=-1).flatten(-2)


def rms_norm_rope_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``y = x * rsqrt(mean(x^2) + eps) * weight``, then RoPE on pairs: ``y * cos + rot(y) * sin``.

    The per-head q/k norm of SD3.5 and Flux followed, when ``cos``/``sin`` are given, by Flux's
    ``apply_rotary_emb(y, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)``:
    ``out[2i] = y[2i] cos[2i] - y[2i+1] sin[2i]``, ``out[2i+1] = y[2i+1] cos[2i+1] + y[2i]
    sin[2i+1]``. Computed in fp32 with the roundings of the diffusers modules each form replaces
    (diffusers 0.42), so that for a weight of ``x``'s dtype the result is theirs up to the order
    of the fp32 sums:

    - without RoPE, SD3.5's ``attn.norm_q`` (diffusers' ``RMSNorm``): the normalized row is
      rounded to a half-precision weight's dtype before the product, and the product to that
      dtype; without a weight it is rounded to ``x.dtype``;
    - with RoPE, Flux's ``attn.norm_q`` (``torch.nn.RMSNorm``): ``x * rstd * weight`` rounded
      once to ``x.dtype`` (what ``apply_rotary_emb`` receives); RoPE then runs in fp32 on that
      and is rounded once to ``x.dtype``.

    Args:
        x: (B, S, H, D) queries or keys, any strides.
        weight: (D,) RMSNorm scale, or None (``elementwise_affine=False``).
        cos: (S, D) float32 cosines (Flux's ``image_rotary_emb[0]``), or None (no RoPE).
        sin: (S, D) float32 sines, or None (with ``cos``).
        eps: the RMSNorm epsilon.

    Returns:
        (B, S, H, D) tensor of ``x.dtype``.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None and cos is None and weight.dtype in (torch.float16, torch.bfloat16):
        y = (y.to(weight.dtype).float() * weight.float()).to(weight.dtype).float()
    elif weight is not None:
        y = y * weight.float()
    if cos is None:
        return y.to(x.dtype)
    y = y.to(x.dtype).float()
    return (y * cos.float()[:, None, :] + _rotate_pairs(y) * sin.float()[:, None, :]).to(x.dtype)


def gated_residual_ref(res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out = res + gate[:, None, :] * y``.

    Args:
        res: (B, L, D) residual stream.
        gate: (B, D) per-sample gate.
        y: (B, L, D) branch output.

    Returns:
        (B, L, D) tensor of ``res.dtype``.
    """
    out = res.float() + gate.float()[:, None, :] * y.float()
    return out.to(res.dtype)


def gated_residual_ln_modulate_ref(
    res: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = res + gate[:, None, :] * y``; ``normed = LN(h) * (1 + scale[:, None, :]) + shift[:, None, :]``.

    Step 1: the gated residual update ``h`` (the new residual stream).
    Step 2: ``normed`` is ``ln_modulate`` of ``h`` for the next sub-block. It is computed from
    the fp32 ``h`` (before ``h`` is rounded to the output dtype), as a fused kernel does.

    Args:
        res: (B, L, D) residual stream.
        gate: (B, D) per-sample gate.
        y: (B, L, D) branch output.
        shift: (B, D) per-sample shift of the next norm.
        scale: (B, D) per-sample scale of the next norm.
        eps: variance epsilon.

    Returns:
        ``(h, normed)``, both (B, L, D) tensors of ``res.dtype``.
    """
    h = res.float() + gate.float()[:, None, :] * y.float()
    normed = _layer_norm_fp32(h, eps) * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return h.to(res.dtype), normed.to(res.dtype)


def gated_residual_ln_modulate_table_ref(
    res: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    gate_table: torch.Tensor,
    shift_table: torch.Tensor,
    scale_table: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = res + (gate[:, None, :] + gate_table) * y``; ``normed = ln_modulate_table(h, ...)``.

    Step 1: the gated residual update of a PixArt sub-block, its gate the per-sample chunk plus
    the block's per-channel table row (formed in fp32).
    Step 2: ``normed`` is `ln_modulate_table_ref` of the fp32 ``h`` (before ``h`` is rounded to
    the output dtype), as a fused kernel does: the next block's norm, or the final layer's.

    Args:
        res: (B, L, D) residual stream.
        gate: (B, D) per-sample gate.
        y: (B, L, D) branch output.
        shift: (B, D) per-sample shift of the next norm.
        scale: (B, D) per-sample scale of the next norm.
        gate_table: (D,) per-channel gate row.
        shift_table: (D,) per-channel shift row of the next norm.
        scale_table: (D,) per-channel scale row of the next norm.
        eps: variance epsilon.

    Returns:
        ``(h, normed)``, both (B, L, D) tensors of ``res.dtype``.
    """
    h = res.float() + (gate.float() + gate_table.float())[:, None, :] * y.float()
    return h.to(res.dtype), _modulate_table_fp32(h, shift, scale, shift_table, scale_table, eps).to(res.dtype)


def residual_layer_norm_ref(
    res: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = res + y``; ``normed = LN(h) * weight + bias`` over the last dim (an SD/SDXL block's
    residual add and the next ``nn.LayerNorm``).

    ``normed`` is computed from the fp32 ``h`` (before ``h`` is rounded to the output dtype), as a
    fused kernel does.

    Args:
        res: (..., D) residual stream.
        y: branch output of ``res``'s shape.
        weight: (D,) scale, or None.
        bias: (D,) shift, or None.
        eps: variance epsilon.

    Returns:
        ``(h, normed)``, both of ``res``'s shape and dtype.
    """
    h = res.float() + y.float()
    normed = _layer_norm_fp32(h, eps)
    if weight is not None:
        normed = normed * weight.float()
    if bias is not None:
        normed = normed + bias.float()
    return h.to(res.dtype), normed.to(res.dtype)


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``, in fp32.

    Args:
        x: tensor of any shape.

    Returns:
        fp32 tensor of the same shape.
    """
    xf = x.float()
    inner = math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)
    return 0.5 * xf * (1.0 + torch.tanh(inner))


def gelu_erf_ref(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU ``0.5 * x * (1 + erf(x / sqrt(2)))``, in fp32 (``F.gelu``'s default).

    Written out rather than ``F.gelu``: torch's vectorized CPU kernel returns NaN at +inf where
    the formula (and its CUDA kernel) gives +inf.

    Args:
        x: tensor of any shape.

    Returns:
        fp32 tensor of the same shape.
    """
    xf = x.float()
    return 0.5 * xf * (1.0 + torch.erf(xf * (1.0 / math.sqrt(2.0))))


def linear_gelu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y = gelu_tanh(x @ weight.T + bias)`` (the DiT fc1 with its tanh-GELU).

    Args:
        x: (..., K) input.
        weight: (N, K) weight, as ``nn.Linear.weight``.
        bias: (N,) bias, or None.

    Returns:
        (..., N) tensor of ``x.dtype``.
    """
    acc = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return gelu_tanh_ref(acc).to(x.dtype)


def linear_geglu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    gate_weight: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h, gate = (x @ weight.T + bias).chunk(2, -1); y = h * gelu(gate)`` (diffusers ``GEGLU``).

    Args:
        x: (..., K) input.
        weight: (2 * inner, K) weight: rows [0, inner) the value, [inner, 2 * inner) the gate;
            with `gate_weight`, the (inner, K) value rows alone.
        bias: (2 * inner,) bias, or None (with `gate_weight`: the (inner,) value bias).
        gate_weight: optional (inner, K) gate rows, in place of `weight`'s second half.
        gate_bias: (inner,) gate bias, or None.

    Returns:
        (..., inner) tensor of ``x.dtype``.
    """
    def f32(t):
        return None if t is None else t.float()

    if gate_weight is None:
        acc = F.linear(x.float(), weight.float(), f32(bias))
        h, gate = acc.chunk(2, dim=-1)
    else:
        h = F.linear(x.float(), weight.float(), f32(bias))
        gate = F.linear(x.float(), gate_weight.float(), f32(gate_bias))
    return (h * gelu_erf_ref(gate)).to(x.dtype)


def linear_gated_residual_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    res: torch.Tensor,
) -> torch.Tensor:
    """``out = res + gate[:, None, :] * (x @ weight.T + bias)`` (attention proj or fc2 of a DiT block).

    Args:
        x: (B, L, K) input.
        weight: (N, K) weight, as ``nn.Linear.weight``.
        bias: (N,) bias, or None.
        gate: (B, N) per-sample gate.
        res: (B, L, N) residual stream.

    Returns:
        (B, L, N) tensor of ``res.dtype``.
    """
    acc = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    out = res.float() + gate.float()[:, None, :] * acc
    return out.to(res.dtype)


def linear_residual_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, res: torch.Tensor
) -> torch.Tensor:
    """``out = res + (x @ weight.T + bias)`` (an SD/SDXL block's out projection or ff2 with its
    residual add).

    Args:
        x: (..., K) input.
        weight: (N, K) weight, as ``nn.Linear.weight``.
        bias: (N,) bias, or None.
        res: (..., N) residual stream, ``x``'s leading dims.

    Returns:
        Tensor of ``res``'s shape and dtype.
    """
    acc = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return (res.float() + acc).to(res.dtype)


def attention_ref(qkv: torch.Tensor, num_heads: int, layout: str = "qkv") -> torch.Tensor:
    """``out = softmax(q @ k^T / sqrt(hd)) @ v`` per head, heads concatenated.

    ``layout="qkv"``: ``qkv`` is ``[q | k | v]`` along the last dim, each part ``H * hd`` wide
    with heads contiguous (head ``i`` is columns ``i*hd:(i+1)*hd`` of its part).
    ``layout="heads"``: head-major, head ``i``'s q, k, v are columns ``(3i + p)*hd : (3i + p + 1)*hd``
    for p = 0, 1, 2. Non-causal, no mask.

    Args:
        qkv: (B, L, 3 * H * hd) fused projections.
        num_heads: H.
        layout: ``"qkv"`` or ``"heads"``.

    Returns:
        (B, L, H * hd) tensor of ``qkv.dtype``.
    """
    B, L, three_hd = qkv.shape
    hd = three_hd // (3 * num_heads)
    parts = (3, num_heads, hd) if layout == "qkv" else (num_heads, 3, hd)
    x = qkv.float().view(B, L, *parts)
    x = x if layout == "qkv" else x.transpose(2, 3)  # -> (B, L, 3, H, hd)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
    out = scores.softmax(dim=-1) @ v  # (B, H, L, hd)
    return out.transpose(1, 2).reshape(B, L, num_heads * hd).to(qkv.dtype)


# ---------------------------------------------------------------------------------------------
# Float8 weights (mosaic_kernels.ops.fp8): dequantize, then the references above
# ---------------------------------------------------------------------------------------------

#: Largest finite ``float8_e4m3fn`` value, and the floor of a row's maximum (all-zero rows).
_E4M3_MAX = 448.0
_AMAX_EPS = 1e-12


def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale[m] = max(amax(|x[m]|), 1e-12) / 448``, ``q[m] = sat(x[m] / scale[m])`` in float8_e4m3fn.

    Rounds to nearest even and saturates to +-448. Per output channel for an (N, K) weight, per
    token for (M, K) activations.

    Args:
        x: (R, K) tensor.

    Returns:
        ``(q, scale)``: (R, K) ``float8_e4m3fn`` and (R,) fp32, ``x ~ q.float() * scale[:, None]``.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=1) if xf.shape[1] else xf.new_zeros(xf.shape[0])
    scale = amax.clamp(min=_AMAX_EPS) / _E4M3_MAX
    q = (xf / scale[:, None]).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8_ref(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q.float() * scale[:, None]``: the fp32 rows a float8 (R, K) tensor with (R,) scales stands for."""
    return q.float() * scale.float()[:, None]


def fp8_gemm_ref(
    epilogue: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    mode: str = "weight_only",
    gate: torch.Tensor | None = None,
    res: torch.Tensor | None = None,
    gate_weight: torch.Tensor | None = None,
    gate_w_scale: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GEMM op of ``epilogue`` on the dequantized weight (and, for ``mode="per_token"``, on
    ``x`` quantized per row and dequantized): ``linear_gelu_ref(x, dequant(weight), bias)`` etc.

    Args:
        epilogue: ``"none"`` (``x @ w.T + bias``), ``"gelu_tanh"``, ``"gated_residual"``,
            ``"residual"`` or ``"geglu"``.
        x: (..., K) activations ((B, L, K) for ``gated_residual``).
        weight: (N, K) ``float8_e4m3fn``; w_scale: (N,) fp32.
        bias, gate, res, gate_weight (float8), gate_w_scale, gate_bias: as the epilogue's op.
        mode: ``"weight_only"`` or ``"per_token"``.

    Returns:
        Tensor of ``x.dtype`` (``res.dtype`` for the residual epilogues).
    """
    out_dtype, xf = x.dtype, x.float()
    if mode == "per_token":  # kept in fp32: the kernel applies the row scale to its fp32 accumulator
        xf = dequantize_fp8_ref(*quantize_rows_fp8_ref(xf.reshape(-1, x.shape[-1]))).view(x.shape)
    w = dequantize_fp8_ref(weight, w_scale)
    if epilogue == "none":
        return F.linear(xf, w, None if bias is None else bias.float()).to(out_dtype)
    if epilogue == "gelu_tanh":
        return linear_gelu_ref(xf, w, bias).to(out_dtype)
    if epilogue == "gated_residual":
        return linear_gated_residual_ref(xf, w, bias, gate, res)
    if epilogue == "residual":
        return linear_residual_ref(xf, w, bias, res)
    if epilogue == "geglu":
        wg = None if gate_weight is None else dequantize_fp8_ref(gate_weight, gate_w_scale)
        return linear_geglu_ref(xf, w, bias, wg, gate_bias).to(out_dtype)
    raise ValueError(f"fp8_gemm_ref: unknown epilogue {epilogue!r}")
