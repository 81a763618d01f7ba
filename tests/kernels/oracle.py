"""Independent float64 formulations of every mosaic op: the oracle the kernel tests compare with.

``mosaic_kernels.reference`` is what the ``torch`` backend returns, so a test that compared the
torch backend with the reference compared the reference with itself (a mutant in reference.py
survived 94 such tests). These functions are written differently on purpose and computed in
float64: torch's own ``F.layer_norm`` and ``F.gelu(approximate="tanh")`` instead of the
reference's hand-written mean/variance and tanh formula, ``torch.addcmul`` for the gated
updates, and ``einsum`` + ``softmax`` for attention. The reference itself is checked against
them, and against diffusers' own modules, in ``test_reference.py``.

Every function returns float64 (the caller compares a kernel's output with it under the
tolerance of the kernel's dtype). ``exact_gemm=True`` computes ``x @ w.T`` as an explicit
broadcast product and sum instead of a BLAS call: IEEE semantics for every term, which the
non-finite tests need (whether an inf meets a zero or an inf of the other sign does not depend
on a BLAS kernel's shortcuts). Small shapes only (it materialises (M, N, K)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float64)


def ln_modulate(x, shift, scale, eps: float = 1e-6) -> torch.Tensor:
    """``F.layer_norm(x) * (scale + 1) + shift`` per sample, float64."""
    x64 = _f64(x)
    normed = F.layer_norm(x64, x64.shape[-1:], eps=eps)
    return torch.addcmul(_f64(shift).unsqueeze(1), normed, _f64(scale).unsqueeze(1) + 1)


def ln_modulate_table(x, shift, scale, shift_table, scale_table, eps: float = 1e-6) -> torch.Tensor:
    """PixArt's adaLN-single: the table rows broadcast onto the per-sample vectors as diffusers
    does (``scale_shift_table[None] + t_emb``), then `ln_modulate`, float64."""
    return ln_modulate(x, _f64(shift) + _f64(shift_table)[None], _f64(scale) + _f64(scale_table)[None], eps)


def gated_residual_ln_modulate_table(res, gate, y, shift, scale, gate_table, shift_table, scale_table,
                                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, ln_modulate_table(h))`` with ``h = gated_residual(res, gate + gate_table, y)``, float64."""
    h = gated_residual(res, _f64(gate) + _f64(gate_table)[None], y)
    return h, ln_modulate_table(h, shift, scale, shift_table, scale_table, eps)


def layer_norm(x, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` with its own affine, float64."""
    x64 = _f64(x)
    return F.layer_norm(x64, x64.shape[-1:], _f64(weight), _f64(bias), eps=eps)


def residual_layer_norm(res, y, weight, bias, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, F.layer_norm(h))`` with ``h = res + y``, float64."""
    h = _f64(res) + _f64(y)
    return h, layer_norm(h, weight, bias, eps)


def rms_norm_rope(x, weight, cos=None, sin=None, eps: float = 1e-6) -> torch.Tensor:
    """``F.rms_norm`` over head_dim, then the rotation of each pair ``(2i, 2i+1)`` written out on
    the even and odd lanes, float64 (no intermediate rounding)."""
    x64 = _f64(x)
    y = F.rms_norm(x64, x64.shape[-1:], _f64(weight), eps=eps)
    if cos is None:
        return y
    c, s = _f64(cos)[:, None, :], _f64(sin)[:, None, :]  # (S, 1, D): broadcast over heads
    even, odd = y[..., 0::2], y[..., 1::2]
    out_even = even * c[..., 0::2] - odd * s[..., 0::2]
    out_odd = odd * c[..., 1::2] + even * s[..., 1::2]
    return torch.stack((out_even, out_odd), dim=-1).flatten(-2)


def gated_residual(res, gate, y) -> torch.Tensor:
    """``res + gate * y`` per sample, float64 (``addcmul``)."""
    return torch.addcmul(_f64(res), _f64(gate).unsqueeze(1), _f64(y))


def gated_residual_ln_modulate(res, gate, y, shift, scale, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, ln_modulate(h))`` with ``h = gated_residual(res, gate, y)``, float64."""
    h = gated_residual(res, gate, y)
    return h, ln_modulate(h, shift, scale, eps)


def linear(x, weight, bias, exact_gemm: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` in float64 (``exact_gemm``: broadcast product + sum, no BLAS)."""
    x64, w64 = _f64(x), _f64(weight)
    if exact_gemm:
        out = (x64.unsqueeze(-2) * w64).sum(-1)
    else:
        out = x64 @ w64.T
    return out if bias is None else out + _f64(bias)


def gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    """torch's tanh-approximate GELU (the DiT MLP activation, diffusers' "gelu-approximate")."""
    return F.gelu(_f64(z), approximate="tanh")


def linear_gelu(x, weight, bias, exact_gemm: bool = False) -> torch.Tensor:
    return gelu_tanh(linear(x, weight, bias, exact_gemm))


def linear_geglu(x, weight, bias, exact_gemm: bool = False) -> torch.Tensor:
    """diffusers ``GEGLU``: ``value * F.gelu(gate)`` of the two halves of the projection, float64."""
    value, gate = linear(x, weight, bias, exact_gemm).chunk(2, dim=-1)
    return value * F.gelu(gate)


def linear_gated_residual(x, weight, bias, gate, res, exact_gemm: bool = False) -> torch.Tensor:
    return gated_residual(res, gate, linear(x, weight, bias, exact_gemm))


def linear_residual(x, weight, bias, res, exact_gemm: bool = False) -> torch.Tensor:
    """``res + linear(x)`` in float64 (``torch.add`` with the residual as the first operand)."""
    return torch.add(_f64(res), linear(x, weight, bias, exact_gemm))


def attention(qkv, num_heads: int) -> torch.Tensor:
    """Per head ``softmax(q k^T / sqrt(hd)) v`` with einsum, float64; ``qkv`` is ``[q | k | v]``."""
    B, L, width = qkv.shape
    hd = width // (3 * num_heads)
    q, k, v = _f64(qkv).reshape(B, L, 3, num_heads, hd).unbind(2)  # each (B, L, H, hd)
    weights = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / hd**0.5, dim=-1)
    return torch.einsum("bhlm,bmhd->blhd", weights, v).reshape(B, L, num_heads * hd)
