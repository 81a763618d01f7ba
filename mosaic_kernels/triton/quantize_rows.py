"""Per-row dynamic float8 quantization: ``scale[m] = max(amax(|x[m]|), eps) / 448``, ``q = x / scale``.

The activations of the ``"per_token"`` FP8 GEMMs (:mod:`mosaic_kernels.ops.fp8`): each row of
``x`` (M, K) becomes ``float8_e4m3fn`` values ``q[m] = sat(x[m] / scale[m])`` (round to nearest
even, saturated to +-448, e4m3's largest finite value) and an fp32 scale, so ``x ~ q * scale``.
One program holds ``BLOCK_M`` rows and sweeps their columns twice: the row maxima, then the
quantized values (the rows are re-read from L2; K <= 4608 at DiT widths).

Under the Triton interpreter the fp32 -> fp8e4nv cast loses the carry when the rounding crosses a
power of two (124.2 -> 64 instead of 128; Triton 3.8), so there ``ROUND_IN_FP32`` rounds to the
e4m3 grid in fp32 first (:func:`round_to_e4m3`) and the cast only sees representable values. On a
GPU the cast is the hardware's ``cvt.rn.satfinite``.

References:
    Micikevicius et al., "FP8 Formats for Deep Learning" (2022); torchao's
    ``float8_dynamic_activation_float8_weight`` (per-row granularity).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, device_guard, launch_checks

#: Largest finite ``float8_e4m3fn`` value.
E4M3_MAX = 448.0
#: Floor of a row's maximum: an all-zero row gets a tiny positive scale (its values stay 0).
AMAX_EPS = 1e-12


@triton.jit
def round_to_e4m3(v):
    """``v`` (fp32, |v| <= 448) rounded to nearest even on the e4m3 grid: 3 mantissa bits,
    normal from 2**-6, subnormal steps of 2**-9."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step_exponent = tl.maximum(exponent, -6) - 3
    step = ((step_exponent + 127) << 23).to(tl.float32, bitcast=True)  # 2**step_exponent, exactly
    y = v / step  # exact: a power-of-two division
    r = tl.floor(y + 0.5)
    r = tl.where((r - y == 0.5) & (r % 2 != 0), r - 1.0, r)  # ties to even
    return r * step


@triton.jit
def _quantize_rows_fp8_kernel(
    x_ptr,  # (M, K) input, row stride stride_xm, unit column stride
    q_ptr,  # (M, K) float8_e4m3fn output, row stride stride_qm
    scale_ptr,  # (M,) fp32 output scales
    M, K, stride_xm, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ROUND_IN_FP32: tl.constexpr,  # interpreter: round on the e4m3 grid before the cast
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    mask_m = rows < M
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        c = k * BLOCK_K + cols
        mask = mask_m[:, None] & (c < K)[None, :]
        v = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    scale = tl.maximum(amax, 1e-12) / 448.0  # AMAX_EPS, E4M3_MAX
    tl.store(scale_ptr + rows, scale, mask=mask_m)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        c = k * BLOCK_K + cols
        mask = mask_m[:, None] & (c < K)[None, :]
        v = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(v / scale[:, None], -448.0), 448.0)
        if ROUND_IN_FP32:
            q = round_to_e4m3(q)
        tl.store(q_ptr + rows[:, None] * stride_qm + c[None, :], q.to(tl.float8e4nv), mask=mask)


def quantize_rows_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1) check, (2) allocate, (3) launch the per-row float8 quantization.

    Args:
        x: (M, K) float32/float16/bfloat16 input with unit column stride.

    Returns:
        ``(q, scale)``: (M, K) contiguous ``float8_e4m3fn`` and (M,) fp32, ``x ~ q * scale[:, None]``.
    """
    assert x.dim() == 2 and (x.shape[1] <= 1 or x.stride(1) == 1), "x must be (M, K) with unit column stride"
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M == 0:
        return q, scale
    launch_checks(x)
    block_m, block_k = (64, 512) if INTERPRETED else (4, 512)  # interpreter programs are costly; keep few
    with device_guard(x):
        _quantize_rows_fp8_kernel[(triton.cdiv(M, block_m),)](
            x, q, scale, M, K, x.stride(0), q.stride(0), BLOCK_M=block_m, BLOCK_K=block_k,
            ROUND_IN_FP32=INTERPRETED, num_warps=4)
    return q, scale
