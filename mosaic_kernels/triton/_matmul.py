"""The tiled GEMM main loop shared by the GEMM ops (Triton tutorial 03 structure).

``acc = x @ w.T`` for one ``BLOCK_M x BLOCK_N`` output tile, fp32 accumulation, K-loop over
``BLOCK_K`` slices with masked tails. Tiles are visited in grouped-M order (``GROUP_M`` row
tiles share each column sweep) so that weight tiles stay in L2. Each GEMM op file adds its own
epilogue on ``acc``.

Under the Triton interpreter bf16 ``tl.dot`` returns garbage (upstream bug), so launchers pass
``UPCAST_DOT=True`` there and the operands are converted to fp32 before the dot.

A second main loop, :func:`matmul_tile_tma`, reads the tiles through host-built tensor
descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``: TMA bulk copies on Hopper,
emulated by the interpreter), with the weight tile transposed in the dot as in Triton's
persistent-matmul tutorial. It needs 16-byte aligned bases and row strides (:func:`tma_ok`); the
launchers fall back to the pointer loop otherwise. Its speed against cuBLAS is not measured yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED


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
def matmul_tile(
    x_ptr,  # (M, K) input, strides (stride_xm, stride_xk)
    w_ptr,  # (N, K) weight (nn.Linear layout), strides (stride_wn, stride_wk)
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk,
    pid_m, pid_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # convert operands to fp32 before tl.dot (interpreter)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
):
    """Return ``(acc, offs_m, offs_n)``: the fp32 (BLOCK_M, BLOCK_N) tile of ``x @ w.T`` and its indices."""
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N) = w.T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc, offs_m, offs_n


@triton.jit
def matmul_tile_tma(
    x_desc,  # descriptor over x (M, K), block [BLOCK_M, BLOCK_K]
    w_desc,  # descriptor over w (N, K), block [BLOCK_N, BLOCK_K]
    K,
    pid_m, pid_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The fp32 (BLOCK_M, BLOCK_N) tile of ``x @ w.T``; out-of-bounds reads are zero-filled by TMA."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])  # (BLOCK_M, BLOCK_K)
        b = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])  # (BLOCK_N, BLOCK_K)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def gelu_tanh(x):
    """``0.5 * x * (1 + tanh(u))`` with ``u = sqrt(2/pi) * (x + 0.044715 x^3)``, as ``x * sigmoid(2u)``.

    The sigmoid is evaluated from ``e = exp(-2|u|)`` in (0, 1], which never overflows, so the
    values at the extremes are torch's ``F.gelu(approximate="tanh")``: -0 for x << 0 (also when
    ``x**3`` overflows), x for x >> 0, +inf at +inf, and NaN at -inf (``-inf * 0``, as
    ``0.5 * x * (1 + tanh(-inf))``) and at NaN. (A clamped ``x / (1 + exp(min(-2u, 80)))`` gave
    -inf at -inf and ``x / 5.5e34`` instead of -0 for |x| > 1e30.)
    """
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))
    sig = tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return x * sig


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


def tl_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of a torch dtype (passed as a constexpr to descriptor stores)."""
    return _TL_DTYPES[dtype]


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


def gemm_grid(M: int, N: int, cfg: dict) -> tuple[int]:
    """One program per output tile."""
    return (triton.cdiv(M, int(cfg["BLOCK_M"])) * triton.cdiv(N, int(cfg["BLOCK_N"])),)


def gemm_meta(cfg: dict, dtype: torch.dtype) -> dict:
    """Launch keyword arguments (constexprs and launch options) from a GEMM config."""
    meta = {
        "BLOCK_M": int(cfg["BLOCK_M"]), "BLOCK_N": int(cfg["BLOCK_N"]), "BLOCK_K": int(cfg["BLOCK_K"]),
        "GROUP_M": int(cfg.get("GROUP_M", 8)),
        "num_warps": int(cfg.get("num_warps", 4)), "num_stages": int(cfg.get("num_stages", 3)),
    }
    meta.update(dot_options(dtype))
    return meta
