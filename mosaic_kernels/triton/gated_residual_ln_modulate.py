"""Gated residual fused with the next adaLN norm: two outputs from one read of the rows.

``h = res + gate * y`` (stored: the new residual stream), then
``normed = LN(h) * (1 + scale) + shift`` from the fp32 ``h`` still in registers. Replaces three
memory passes (update, LayerNorm, modulate) of an eager DiT block with one. Each program holds
``BLOCK_M`` whole rows (``BLOCK_D`` = next power of two of D), int64 row offsets, fp32 math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import configs
from ._common import device_guard, launch_checks


@triton.jit
def _gated_residual_ln_modulate_kernel(
    # Pointers
    res_ptr,  # (B*L, D) residual rows, contiguous
    gate_ptr,  # (B, D) per-sample gate, row stride stride_gate_b
    y_ptr,  # (B*L, D) branch output rows, contiguous
    shift_ptr,  # (B, D) per-sample shift of the next norm, row stride stride_shift_b
    scale_ptr,  # (B, D) per-sample scale of the next norm, row stride stride_scale_b
    h_ptr,  # (B*L, D) output: updated residual rows, dtype of res
    normed_ptr,  # (B*L, D) output: modulated norm of h, dtype of res
    # Sizes and strides
    n_rows,  # B*L
    L,  # tokens per sample
    D,  # row width
    stride_gate_b,
    stride_shift_b,
    stride_scale_b,
    eps,  # variance epsilon
    # Meta-parameters
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    b = rows // L
    offs = rows[:, None] * D + cols[None, :]

    res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b[:, None] * stride_gate_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = res + gate * y  # masked lanes are 0
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)

    mean = tl.sum(h, axis=1) / D
    hc = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(hc * hc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(shift_ptr + b[:, None] * stride_shift_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b[:, None] * stride_scale_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    normed = hc * rstd[:, None] * (1.0 + scale) + shift
    tl.store(normed_ptr + offs, normed.to(normed_ptr.dtype.element_ty), mask=mask)


def gated_residual_ln_modulate_triton(
    res: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_gated_residual_ln_modulate_kernel`: (1) check, (2) allocate, (3) launch.

    Args:
        res: (B, L, D) contiguous residual.
        gate: (B, D), unit last-dim stride.
        y: (B, L, D) contiguous branch output.
        shift: (B, D), unit last-dim stride.
        scale: (B, D), unit last-dim stride.
        eps: variance epsilon.
        out: optional ``(h, normed)`` preallocated (B, L, D) contiguous outputs of ``res.dtype``.
        config: optional ``{"BLOCK_M", "num_warps"}``; default from
            :func:`mosaic_kernels.configs.get_gated_residual_ln_modulate_config`.

    Returns:
        ``(h, normed)``.
    """
    B, L, D = res.shape
    assert res.is_contiguous() and y.is_contiguous() and y.shape == res.shape, "bad res/y"
    for v in (gate, shift, scale):
        assert v.shape == (B, D) and (D == 1 or v.stride(1) == 1), "bad (B, D) vector"
    h, normed = out if out is not None else (torch.empty_like(res), torch.empty_like(res))
    for o in (h, normed):
        assert o.shape == res.shape and o.dtype == res.dtype and o.is_contiguous(), "bad out"
    n_rows = B * L
    if n_rows == 0 or D == 0:
        return h, normed
    cfg = config if config is not None else configs.get_gated_residual_ln_modulate_config(
        (B, L, D), res.dtype, res.device)
    block_m = int(cfg["BLOCK_M"])
    block_d = triton.next_power_of_2(D)
    launch_checks(res)
    grid = (triton.cdiv(n_rows, block_m),)
    with device_guard(res):
        _gated_residual_ln_modulate_kernel[grid](
            res, gate, y, shift, scale, h, normed,
            n_rows, L, D, gate.stride(0), shift.stride(0), scale.stride(0), eps,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=int(cfg.get("num_warps", 4)),
        )
    return h, normed
