"""GEMMs with float8 weights: ``out = epilogue((x @ dequant(w).T) + bias)``, every epilogue of the one kernel.

Weights are ``float8_e4m3fn`` (N, K) with a per-output-channel fp32 scale (N,)
(``dequant(w)[n] = w[n] * w_scale[n]``). Two modes (``FP8_ACT_MODES``):

- ``"weight_only"``: ``x`` stays bf16/fp16/fp32; the kernel converts each weight tile to ``x``'s
  dtype in registers (``FP8="weight"`` of :mod:`._matmul`). Halves the weight bytes read; the
  tensor-core math is that of the unquantized GEMM.
- ``"per_token"``: ``x`` is quantized per row first (:mod:`.quantize_rows`: a float8 copy of
  ``x`` and an (M,) scale), then a float8 x float8 dot (``FP8="rowwise"``: wgmma with e4m3
  operands on sm_90a, twice bf16's peak) with both scales applied to the fp32 accumulator.

Both need FP8 support in the compiler's target: compute capability >= 8.9 (Ada, Hopper); an
older card (A100) is refused with one line (:func:`check_fp8_target`) before anything compiles.

References:
    Triton tutorial 03 (fp8 matmul); torchao float8 (per-row scaling).
"""

from __future__ import annotations

import torch

from ._common import INTERPRETED, device_guard
from ._matmul import launch_gemm
from .quantize_rows import quantize_rows_fp8_triton

#: How the activations meet the float8 weights.
FP8_ACT_MODES = ("weight_only", "per_token")
#: Lowest compute capability with float8 (e4m3) tensor cores, as (major, minor).
MIN_FP8_CAPABILITY = (8, 9)


def fp8_refusal(target) -> str | None:
    """The one-line reason Triton's ``target`` (a ``GPUTarget``) cannot run float8 GEMMs, or None."""
    if target.backend == "cuda" and divmod(int(target.arch), 10) >= MIN_FP8_CAPABILITY:
        return None
    have = (f"compute capability {divmod(int(target.arch), 10)}" if target.backend == "cuda"
            else f"backend {target.backend!r}")
    return (f"fp8 GEMM: float8_e4m3fn needs FP8 tensor cores (CUDA compute capability >= 8.9), got {have}; "
            f"keep this model in bf16 here")


def check_fp8_target(x: torch.Tensor) -> None:
    """Raise ``NotImplementedError`` (one line) when Triton's target for ``x`` has no FP8 tensor cores.

    The target is what Triton compiles for (the active driver's current target: ``x``'s CUDA
    device, or the stand-in card of ``benchmarks/compile_check.py``). The interpreter passes.
    """
    if INTERPRETED:
        return
    from triton.runtime import driver

    with device_guard(x):
        reason = fp8_refusal(driver.active.get_current_target())
    if reason is not None:
        raise NotImplementedError(reason)


def fp8_gemm_triton(
    epilogue: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    mode: str = "weight_only",
    gate: torch.Tensor | None = None,
    res: torch.Tensor | None = None,
    L: int = 1,
    gate_weight: torch.Tensor | None = None,
    gate_w_scale: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """(1) check, (2) quantize the rows (``"per_token"``), (3) launch the GEMM kernel.

    Args:
        epilogue: one of :data:`._matmul.EPILOGUES`.
        x: (M, K) input, float32/float16/bfloat16, unit column stride.
        weight: (N, K) ``float8_e4m3fn`` (geglu: (2N, K), or the value rows with ``gate_weight``).
        w_scale: (N,) contiguous fp32 (geglu with one weight: (2N,)).
        bias, gate, res, L, gate_weight, gate_bias, config: as :func:`._matmul.launch_gemm`.
        out: (M, N) output (``res``'s dtype for the residual epilogues, else ``x``'s).
        mode: ``"weight_only"`` or ``"per_token"``.
        gate_w_scale: (N,) fp32 scale of ``gate_weight``.

    Returns:
        ``out``.
    """
    assert mode in FP8_ACT_MODES, f"mode must be one of {FP8_ACT_MODES}, got {mode!r}"
    assert weight.dtype == torch.float8_e4m3fn and w_scale.dtype == torch.float32, "bad fp8 weight or scale"
    check_fp8_target(x)
    x_scale = None
    if mode == "per_token":
        x, x_scale = quantize_rows_fp8_triton(x)
    launch_gemm(epilogue, x, weight, bias, out, gate=gate, res=res, L=L, gate_weight=gate_weight,
                gate_bias=gate_bias, config=config, w_scale=w_scale, gate_w_scale=gate_w_scale, x_scale=x_scale)
    return out
