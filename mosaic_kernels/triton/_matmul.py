"""The one GEMM kernel of the GEMM ops: ``x @ w.T`` tiles with an epilogue constexpr and a TMA switch.

Structure of Triton tutorial 03: one program per ``BLOCK_M x BLOCK_N`` output tile, visited in
grouped-M order (``GROUP_M`` row tiles share each column sweep, so weight tiles stay in L2), a
K-loop of ``BLOCK_K`` slices, fp32 accumulation, then ``EPILOGUE`` on the accumulator before the
single store (the ``ACTIVATION`` pattern of the tutorial; :mod:`._epilogues`):

- ``"gelu_tanh"``: ``gelu_tanh(acc + bias)`` (``linear_gelu``);
- ``"gated_residual"``: ``res + gate[m // L] * (acc + bias)``, on two column halves of the tile
  one after the other (``linear_gated_residual``: with full-width gate and residual tiles live
  next to the accumulator, 128x128 and wider tiles spilled up to ~880 B per thread,
  ``benchmarks/compile_check.py``; with halves none do);
- ``"residual"``: ``res + (acc + bias)``, the same column-half stores without the gate
  (``linear_residual``: an SD/SDXL block's out projection or ff2 with its residual add);
- ``"geglu"``: two accumulators, the value columns ``w[n]`` and the gate columns ``wg[n]``,
  then ``(acc + b[n]) * gelu_erf(acc_gate + bg[n])`` (``linear_geglu``). The value and gate
  weights are two (N, K) operands with their own strides: the two halves of one (2N, K)
  weight, or two separate views (a shared-producer U-Net block reads its kept value rows and
  gate rows as two row ranges of one storage, ``mosaicdiff.families.unet.producers``).

``USE_TMA`` reads the tiles through host-built tensor descriptors
(``triton.tools.tensor_descriptor.TensorDescriptor``: TMA bulk copies on Hopper, emulated by the
interpreter), the weight tile transposed in the dot as in Triton's persistent-matmul tutorial,
out-of-bounds reads zero-filled and out-of-bounds stores dropped by the descriptors. It needs
16-byte aligned bases and row strides (:func:`tma_ok`); otherwise the pointer loop runs. Its
speed against cuBLAS is not measured yet, so only a pinned config (``"tma": True``) takes it.

``"none"``: ``acc + bias`` alone (a plain linear: the qkv and proj GEMMs of an FP8 block, whose
float8 weights cuBLAS through ``F.linear`` cannot read).

``FP8`` (weights stored ``float8_e4m3fn`` (N, K) with a per-output-channel fp32 scale (N,),
``mosaic_kernels.ops.fp8``): ``"weight"`` converts each float8 weight tile to ``x``'s dtype in
registers (exact: every e4m3 value is a bf16/fp16/fp32 value) and runs the dot in that dtype;
``"rowwise"`` takes ``x`` already quantized per token (float8 (M, K), fp32 scale (M,),
:mod:`.quantize_rows`) and runs a float8 x float8 dot (wgmma with e4m3 operands on sm_90a). Either
way the fp32 accumulator is scaled (``acc * w_scale[n]``, times ``x_scale[m]`` for ``"rowwise"``)
before the bias and the epilogue, so every epilogue applies unchanged. ``"none"``: no scale is read.

Under the Triton interpreter bf16 ``tl.dot`` returns garbage (upstream bug), so ``UPCAST_DOT``
converts the operands to fp32 there. Float8 ``tl.dot`` is exact in the interpreter (no upcast
needed; ``UPCAST_DOT`` converts them anyway, exactly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings
from ._common import INTERPRETED, device_guard, launch_checks
from ._epilogues import gated_residual_store, gated_residual_store_tma, gelu_erf, gelu_tanh

EPILOGUES = ("none", "gelu_tanh", "gated_residual", "residual", "geglu")
#: ``FP8`` modes of the kernel: no float8 operand, float8 weights, float8 weights and rows.
FP8_MODES = ("none", "weight", "rowwise")
#: The epilogues that add a residual: stored in two column halves (``res`` is described by halves).
RESIDUAL_EPILOGUES = ("gated_residual", "residual")


@triton.jit
def grouped_tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (pid_m, pid_n) in grouped-M order."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _gemm_kernel(
    # Operands: pointers, or tensor descriptors when USE_TMA
    x,  # (M, K) input; descriptor block [BLOCK_M, BLOCK_K]
    w,  # (N, K) weight (nn.Linear layout; the value rows for geglu); descriptor block [BLOCK_N, BLOCK_K]
    wg,  # (N, K) gate weight (geglu; otherwise unused); descriptor block [BLOCK_N, BLOCK_K]
    bias_ptr,  # (N,) bias; read only when HAS_BIAS
    gate_bias_ptr,  # (N,) gate bias (geglu); read only when HAS_BIAS
    w_scale_ptr,  # (N,) fp32 per-output-channel scale of a float8 w (FP8 != "none")
    wg_scale_ptr,  # (N,) fp32 scale of a float8 wg (geglu with FP8 != "none")
    x_scale_ptr,  # (M,) fp32 per-token scale of a float8 x (FP8 == "rowwise")
    gate_ptr,  # (B, N) per-sample gate, row stride stride_gb, unit last-dim stride (gated_residual)
    res,  # (M, N) contiguous residual (gated_residual, residual); descriptor block [BLOCK_M, BLOCK_N // 2]
    out,  # (M, N) output, row stride stride_om; descriptor block [BLOCK_M, BLOCK_N] (halves: *residual)
    # Sizes and strides (elements)
    M, N, K,
    L,  # tokens per sample: the gate row of output row m is m // L (gated_residual)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_wgn, stride_wgk, stride_om, stride_gb,
    M_BUCKET,  # unused by the code: the M part of the autotune key (settings.gemm_m_bucket)
    # Meta-parameters
    EPILOGUE: tl.constexpr,  # "none" | "gelu_tanh" | "gated_residual" | "residual" | "geglu"
    FP8: tl.constexpr,  # "none" | "weight" (float8 w, converted to x's dtype) | "rowwise" (float8 x and w)
    USE_TMA: tl.constexpr,  # operands (and res/out) are tensor descriptors
    HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,  # tl dtype of out
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # convert operands to fp32 before tl.dot (interpreter)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # geglu only
    if USE_TMA:
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = x.load([pid_m * BLOCK_M, k * BLOCK_K])  # (BLOCK_M, BLOCK_K)
            b = w.load([pid_n * BLOCK_N, k * BLOCK_K])  # (BLOCK_N, BLOCK_K)
            if FP8 == "weight":
                b = b.to(a.dtype)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
            if EPILOGUE == "geglu":  # rows past N are zero-filled: their columns are never stored
                bg = wg.load([pid_n * BLOCK_N, k * BLOCK_K])
                if FP8 == "weight":
                    bg = bg.to(a.dtype)
                if UPCAST_DOT:
                    bg = bg.to(tl.float32)
                acc_gate = tl.dot(a, bg.T, acc_gate, input_precision=INPUT_PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        mask_m = offs_m < M
        x_ptrs = x + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
        w_ptrs = w + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N) = w.T tile
        wg_ptrs = wg + offs_k[:, None] * stride_wgk + offs_n[None, :] * stride_wgn  # gate rows (geglu)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            mask_k = offs_k < K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if FP8 == "weight":
                b = b.to(a.dtype)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            if EPILOGUE == "geglu":
                bg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if FP8 == "weight":
                    bg = bg.to(a.dtype)
                if UPCAST_DOT:
                    bg = bg.to(tl.float32)
                acc_gate = tl.dot(a, bg, acc_gate, input_precision=INPUT_PRECISION)
                wg_ptrs += BLOCK_K * stride_wgk
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    if FP8 != "none":  # dequantize the accumulator: per output channel, and per token for "rowwise"
        acc = acc * tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if EPILOGUE == "geglu":
            acc_gate = acc_gate * tl.load(wg_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if FP8 == "rowwise":
            row_scale = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
            acc = acc * row_scale
            if EPILOGUE == "geglu":
                acc_gate = acc_gate * row_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == "geglu":
            acc_gate += tl.load(gate_bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    if EPILOGUE == "gated_residual" or EPILOGUE == "residual":
        # Two column halves, one after the other: gate and residual tiles of half the width are
        # live next to the accumulator, not full ones (full ones spill at 128x128 and wider).
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        if USE_TMA:
            gated_residual_store_tma(acc0, m0, n0, M, N, L, gate_ptr, stride_gb, res, out,
                                     BLOCK_M, BLOCK_N // 2, OUT_DTYPE, EPILOGUE == "gated_residual")
            gated_residual_store_tma(acc1, m0, n0 + BLOCK_N // 2, M, N, L, gate_ptr, stride_gb, res, out,
                                     BLOCK_M, BLOCK_N // 2, OUT_DTYPE, EPILOGUE == "gated_residual")
        else:
            gated_residual_store(acc0, m0, n0, M, N, L, gate_ptr, stride_gb, res, out,
                                 BLOCK_M, BLOCK_N // 2, OUT_DTYPE, EPILOGUE == "gated_residual")
            gated_residual_store(acc1, m0, n0 + BLOCK_N // 2, M, N, L, gate_ptr, stride_gb, res, out,
                                 BLOCK_M, BLOCK_N // 2, OUT_DTYPE, EPILOGUE == "gated_residual")
    else:
        if EPILOGUE == "none":
            y = acc
        elif EPILOGUE == "gelu_tanh":
            y = gelu_tanh(acc)
        else:  # geglu
            y = acc * gelu_erf(acc_gate)
        if USE_TMA:
            out.store([m0, n0], y.to(OUT_DTYPE))  # out-of-bounds rows/columns dropped
        else:
            mask = (offs_m < M)[:, None] & mask_n[None, :]
            tl.store(out + offs_m[:, None] * stride_om + offs_n[None, :], y.to(OUT_DTYPE), mask=mask)


# Autotuned at the first call of each key (CUDA graph capture comes after a warm-up call, so the
# benchmarking never runs inside a capture). Pointer loads only: a TMA config needs its
# descriptors' block shapes set by a pre_hook, which turns off the timings' disk cache.
def _autotuned(configs: list):
    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "N", "K", "EPILOGUE", "HAS_BIAS", "FP8"],  # + the dtypes of the tensor arguments
        prune_configs_by={"early_config_prune": settings.prune_gemm_configs},
        cache_results=True,
    )(_gemm_kernel)


_gemm_kernel_autotuned = _autotuned(settings.GEMM_CONFIGS)
# Float8 weights: the same kernel over its own list (BLOCK_K = 128 tiles: 128 bytes of e4m3 per row).
_gemm_kernel_fp8_autotuned = _autotuned(settings.FP8_GEMM_CONFIGS)


def dot_options(dtype: torch.dtype) -> dict:
    """``UPCAST_DOT`` and ``INPUT_PRECISION`` for operands of ``dtype``.

    fp32 operands follow ``torch.get_float32_matmul_precision()``: ``"highest"`` (torch's
    default) keeps IEEE fp32 like ``F.linear``; anything else allows TF32.
    """
    precision = "ieee"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        precision = "tf32"
    return {"UPCAST_DOT": INTERPRETED, "INPUT_PRECISION": precision}


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def fp8_mode(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The kernel's ``FP8`` constexpr for these operands (see the module docstring)."""
    if weight.dtype != torch.float8_e4m3fn:
        return "none"
    return "rowwise" if x.dtype == torch.float8_e4m3fn else "weight"


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can address these 2-D tensors here.

    Requires unit last-dim stride, 16-byte aligned base and row stride, and either the
    interpreter or a CUDA device of compute capability >= 9.0 (Hopper TMA).
    """
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    device = tensors[0].device
    if device.type == "cuda":
        return not INTERPRETED and torch.cuda.get_device_capability(device)[0] >= 9
    return INTERPRETED


def make_descriptor(t: torch.Tensor, block_shape: list[int]):
    """A host-side tensor descriptor over the 2-D tensor ``t`` with tiles of ``block_shape``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block_shape)


def _tile_meta(config: dict) -> dict:
    return {"BLOCK_M": int(config["BLOCK_M"]), "BLOCK_N": int(config["BLOCK_N"]), "BLOCK_K": int(config["BLOCK_K"]),
            "GROUP_M": int(config.get("GROUP_M", 8)), "num_warps": int(config.get("num_warps", 4)),
            "num_stages": int(config.get("num_stages", 3))}


def launch_gemm(
    epilogue: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    res: torch.Tensor | None = None,
    L: int = 1,
    gate_weight: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    config: dict | None = None,
    w_scale: torch.Tensor | None = None,
    gate_w_scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> None:
    """Launch :func:`_gemm_kernel` for ``out (M, N) = epilogue(x (M, K) @ weight.T)``.

    ``config``: None -> ``triton.autotune`` over :data:`.settings.GEMM_CONFIGS` (pointer loads);
    a dict -> exactly that tile config (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``,
    ``num_warps``, ``num_stages``), with ``"tma": True`` taking the tensor-descriptor path where
    :func:`tma_ok` allows (and K > 0: no tile to describe otherwise). ``gated_residual`` takes
    ``gate`` (B, N) and ``res`` (M, N) contiguous, ``residual`` ``res`` alone; ``geglu`` a weight
    of 2N rows (value, then gate), or the value ``weight`` (N, K) and ``bias`` with a separate
    ``gate_weight`` (N, K) and ``gate_bias`` (N,) (views of anything, read through their strides).

    Float8 (``float8_e4m3fn``) ``weight`` (and ``gate_weight``) take their (N,) fp32 scales
    ``w_scale`` (``gate_w_scale``; with one (2N, K) geglu weight ``w_scale`` is (2N,)); a float8
    ``x`` (``FP8="rowwise"``) its (M,) fp32 ``x_scale``. The output dtype is ``out``'s.
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown GEMM epilogue {epilogue!r}, expected one of {EPILOGUES}")
    M, K = x.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return
    launch_checks(x)
    if epilogue == "geglu" and gate_weight is None:  # one (2N, K) weight: its two halves
        weight, gate_weight = weight[:N], weight[N:]
        bias, gate_bias = (None, None) if bias is None else (bias[:N], bias[N:])
        w_scale, gate_w_scale = (None, None) if w_scale is None else (w_scale[:N], w_scale[N:])
    wg = weight if gate_weight is None else gate_weight  # (unused but for geglu)
    strides = (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), wg.stride(0), wg.stride(1),
               out.stride(0), gate.stride(0) if gate is not None else 0)
    fp8 = fp8_mode(x, weight)
    flags = {"EPILOGUE": epilogue, "FP8": fp8, "HAS_BIAS": bias is not None, "OUT_DTYPE": _TL_DTYPES[out.dtype],
             **dot_options(x.dtype)}
    scales = (w_scale, gate_w_scale, x_scale)
    sizes = (M, N, K, L, *strides, settings.gemm_m_bucket(M))
    if config is None:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        tuned = _gemm_kernel_autotuned if fp8 == "none" else _gemm_kernel_fp8_autotuned
        with device_guard(x):
            tuned[grid](x, weight, wg, bias, gate_bias, *scales, gate, res, out, *sizes, USE_TMA=False, **flags)
        return
    meta = _tile_meta(config)
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    operands = (x, weight, wg, bias, gate_bias, *scales, gate, res, out)
    described = (x, weight, *([wg] if epilogue == "geglu" else []), *([] if res is None else [res]), out)
    use_tma = bool(config.get("tma", False)) and K > 0 and tma_ok(*described)
    if use_tma:
        out_block = [bm, bn // 2] if epilogue in RESIDUAL_EPILOGUES else [bm, bn]  # the epilogue's halves
        w_desc = make_descriptor(weight, [bn, bk])
        wg_desc = make_descriptor(wg, [bn, bk]) if epilogue == "geglu" else w_desc
        operands = (make_descriptor(x, [bm, bk]), w_desc, wg_desc, bias, gate_bias, *scales, gate,
                    None if res is None else make_descriptor(res, out_block), make_descriptor(out, out_block))
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    with device_guard(x):
        _gemm_kernel[grid](*operands, *sizes, USE_TMA=use_tma, **flags, **meta)
