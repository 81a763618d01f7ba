"""``fp8_gemm``: the GEMM ops with float8 weights (per-output-channel scales), every fused epilogue.

``out = epilogue(x @ (weight * weight_scale[:, None]).T + bias)`` with ``weight`` stored
``float8_e4m3fn`` (N, K) and ``weight_scale`` fp32 (N,) (:func:`quantize_fp8_weight`): half the
weight bytes of bf16. The epilogues are those of the bf16 GEMM ops: ``"none"`` (a plain linear),
``"gelu_tanh"`` (``linear_gelu``), ``"gated_residual"`` (``linear_gated_residual``),
``"residual"`` (``linear_residual``), ``"geglu"`` (``linear_geglu``).

Two activation modes (``mode``):

- ``"weight_only"`` (default): ``x`` stays bf16/fp16/fp32; the Triton kernel converts each weight
  tile to ``x``'s dtype (exact) and scales the fp32 accumulator. Same math as the bf16 GEMM on
  the dequantized weight; the win is the weight bytes (memory-bound GEMMs: small batches).
- ``"per_token"``: ``x`` is quantized per row at run time (float8 + an fp32 scale per token),
  then a float8 x float8 dot (Hopper wgmma e4m3, twice the bf16 tensor-core rate) scales the
  accumulator by both. Adds one pass over ``x`` and the activations' rounding error.

Which one is faster on H100/H200 at DiT shapes is not measured yet (no GPU was lent): measure
both (``benchmarks`` GPU suite, ``M`` = batch x 256 tokens, N/K of the stage widths) before
choosing a default; expect ``per_token`` to win at large M (compute-bound), ``weight_only`` at
small M.

Backends: the Triton kernel (:mod:`mosaic_kernels.triton.fp8_gemm`), on CUDA devices of compute
capability >= 8.9 (elsewhere on CUDA: one-line ``NotImplementedError``), or CPU tensors under
the interpreter; else the torch reference (``reference.fp8_gemm_ref``: dequantize, then the
reference of the bf16 op). Forward only (no autograd formula: the weights are frozen).
Non-finite activations are not supported in ``"per_token"`` mode (a row's scale would be inf/NaN).
Tests: ``tests/kernels/test_fp8_gemm.py``.
"""

from __future__ import annotations

import math

import torch

from .. import reference as ref
from . import _checks, _dispatch

OP = "fp8_gemm"
FP8_DTYPE = torch.float8_e4m3fn
FP8_EPILOGUES = ("none", "gelu_tanh", "gated_residual", "residual", "geglu")
FP8_ACT_MODES = ("weight_only", "per_token")

__all__ = ["FP8_ACT_MODES", "FP8_EPILOGUES", "fp8_gemm", "quantize_fp8_weight", "quantize_rows_fp8"]


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an (N, K) weight per output channel: ``(q float8_e4m3fn (N, K), scale fp32 (N,))``.

    ``scale[n] = max(|weight[n]|) / 448`` (448: e4m3's largest value; an all-zero row gets a
    tiny scale), ``q = round(weight / scale)``; ``q.float() * scale[:, None]`` is the weight the
    FP8 GEMMs compute with. Plain torch, run once per weight.

    Raises:
        TypeError: for a non-floating or already float8 weight. ValueError: for a non-2-D one.
    """
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _checks.SUPPORTED_DTYPES:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"quantize_fp8_weight: weight must be float32, float16 or bfloat16, got {got}")
    if weight.dim() != 2:
        raise ValueError(f"quantize_fp8_weight: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    q, scale = ref.quantize_rows_fp8_ref(weight.detach())
    return q.contiguous(), scale.contiguous()


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of (M, K) rows: ``(q float8_e4m3fn, scale fp32 (M,))``.

    The Triton kernel where it runs (:mod:`mosaic_kernels.triton.quantize_rows`), else
    ``reference.quantize_rows_fp8_ref``; both round to nearest even and saturate at +-448.
    """
    _checks.check_tensor("quantize_rows_fp8", "x", x, 2)
    if _dispatch.dispatched("quantize_rows_fp8", _dispatch.select_backend("quantize_rows_fp8", x.device)) == "triton":
        return _dispatch.triton_package()[0].quantize_rows_fp8_triton(x)
    return ref.quantize_rows_fp8_ref(x)


def _out_shape(x, weight, epilogue, res, gate_weight) -> tuple[int, ...]:
    if epilogue in ("gated_residual", "residual"):
        return tuple(res.shape)
    n = weight.shape[0] // 2 if epilogue == "geglu" and gate_weight is None else weight.shape[0]
    return (*x.shape[:-1], n)


def _triton_fp8_gemm(x, weight, weight_scale, bias, epilogue, mode, gate, res, gate_weight, gate_weight_scale,
                     gate_bias) -> torch.Tensor:
    K = weight.shape[1]
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # not reshape(-1, K): K may be 0
    shape = _out_shape(x, weight, epilogue, res, gate_weight)
    out = torch.empty(shape, device=x.device, dtype=res.dtype if res is not None else x.dtype)
    n = shape[-1]
    if epilogue in ("gated_residual", "residual"):
        # The residual epilogue's in-block offsets are 32-bit (as linear_gated_residual_triton checks).
        if 256 * n >= 2**31 or (gate is not None and gate.shape[0] * max(gate.stride(0), 1) >= 2**31):
            raise ValueError(f"{OP}: N={n} is too wide for the residual epilogue's 32-bit block offsets")
    _dispatch.triton_package()[0].fp8_gemm_triton(
        epilogue, x2d, weight, weight_scale, bias, out.view(-1, n), mode=mode, gate=gate,
        res=None if res is None else res.view(-1, n), L=x.shape[1] if epilogue == "gated_residual" else 1,
        gate_weight=gate_weight, gate_w_scale=gate_weight_scale, gate_bias=gate_bias)
    return out


@torch.library.custom_op("mosaic::fp8_gemm", mutates_args=())
def _fp8_gemm_op(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, epilogue: str,
    mode: str, gate: torch.Tensor | None, res: torch.Tensor | None, gate_weight: torch.Tensor | None,
    gate_weight_scale: torch.Tensor | None, gate_bias: torch.Tensor | None,
) -> torch.Tensor:
    args = (x, weight, weight_scale, bias, epilogue, mode, gate, res, gate_weight, gate_weight_scale, gate_bias)
    if _dispatch.dispatched(OP, _dispatch.select_backend(OP, x.device)) == "triton":
        return _triton_fp8_gemm(*args)
    return ref.fp8_gemm_ref(epilogue, x, weight, weight_scale, bias, mode, gate, res, gate_weight,
                            gate_weight_scale, gate_bias)


@_fp8_gemm_op.register_fake
def _(x, weight, weight_scale, bias, epilogue, mode, gate, res, gate_weight, gate_weight_scale, gate_bias):
    return x.new_empty(_out_shape(x, weight, epilogue, res, gate_weight), dtype=(res if res is not None else x).dtype)


def _check_fp8_weight(name: str, w: torch.Tensor, scale: torch.Tensor, rows: int | None = None) -> None:
    scale_name = f"{name}_scale"
    if not isinstance(w, torch.Tensor) or w.dtype != FP8_DTYPE:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"{OP}: {name} must be float8_e4m3fn (see quantize_fp8_weight), got {got}")
    if w.dim() != 2 or (rows is not None and w.shape[0] != rows):
        raise ValueError(f"{OP}: {name} must be ({rows if rows is not None else 'N'}, K), got {tuple(w.shape)}")
    if w.shape[1] > 1 and w.stride(1) != 1:
        raise ValueError(f"{OP}: {name} must have unit stride in its last dim, got strides {w.stride()}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise TypeError(f"{OP}: {scale_name} must be a float32 tensor, got {got}")
    if tuple(scale.shape) != (w.shape[0],) or not scale.is_contiguous():
        raise ValueError(f"{OP}: {scale_name} must be contiguous ({w.shape[0]},) (one per output channel of "
                         f"{name}), got shape {tuple(scale.shape)}")


def _check_row_vector(name: str, t: torch.Tensor | None, n: int, dtype: torch.dtype) -> None:
    if t is None:
        return
    _checks.check_tensor(OP, name, t, 1)
    if tuple(t.shape) != (n,):
        raise ValueError(f"{OP}: {name} must be ({n},), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{OP}: {name} must have the dtype of x ({dtype}), got {t.dtype}")
    _checks.check_contiguous(OP, name, t)


def _check_inputs(x, weight, weight_scale, bias, epilogue, mode, gate, res, gate_weight, gate_weight_scale,
                  gate_bias) -> None:
    if epilogue not in FP8_EPILOGUES:
        raise ValueError(f"{OP}: epilogue must be one of {FP8_EPILOGUES}, got {epilogue!r}")
    if mode not in FP8_ACT_MODES:
        raise ValueError(f"{OP}: mode must be one of {FP8_ACT_MODES}, got {mode!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{OP}: x must be a tensor of shape (..., K), got {getattr(x, 'shape', type(x).__name__)}")
    _checks.check_tensor(OP, "x", x, 3 if epilogue == "gated_residual" else x.dim())
    _checks.check_contiguous(OP, "x", x)
    _check_fp8_weight("weight", weight, weight_scale)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{OP}: x's last dim must equal weight.shape[1]={K}, got x shape {tuple(x.shape)}")
    if epilogue == "geglu" and gate_weight is None and N % 2:
        raise ValueError(f"{OP}: a geglu weight without gate_weight must have 2 * inner rows, got {N}")
    if epilogue == "geglu" and gate_weight is not None:
        _check_fp8_weight("gate_weight", gate_weight, gate_weight_scale, rows=N)
        if gate_weight.shape != weight.shape:
            raise ValueError(f"{OP}: gate_weight must have weight's shape {tuple(weight.shape)}, "
                             f"got {tuple(gate_weight.shape)}")
        if (bias is None) != (gate_bias is None):
            raise ValueError(f"{OP}: bias and gate_bias must be given together")
        _check_row_vector("gate_bias", gate_bias, N, x.dtype)
    elif gate_weight is not None or gate_weight_scale is not None or gate_bias is not None:
        raise ValueError(f"{OP}: gate_weight, gate_weight_scale and gate_bias belong to the geglu epilogue "
                         f"(with gate_weight), got epilogue {epilogue!r}")
    _check_row_vector("bias", bias, N, x.dtype)
    n_out = _out_shape(x, weight, "none", None, None)
    if epilogue in ("gated_residual", "residual"):
        _checks.check_tensor(OP, "res", res, x.dim())
        if tuple(res.shape) != n_out:
            raise ValueError(f"{OP}: res must be {n_out} (x's leading dims, N), got {tuple(res.shape)}")
        if res.dtype != x.dtype:
            raise TypeError(f"{OP}: res must have the dtype of x ({x.dtype}), got {res.dtype}")
        _checks.check_contiguous(OP, "res", res)
    elif res is not None:
        raise ValueError(f"{OP}: res belongs to the residual epilogues, got epilogue {epilogue!r}")
    if epilogue == "gated_residual":
        _checks.check_tensor(OP, "gate", gate, 2)
        _checks.check_vector(OP, "gate", gate, x.shape[0], N, what="(B, N)")
        if gate.dtype != x.dtype:
            raise TypeError(f"{OP}: gate must have the dtype of x ({x.dtype}), got {gate.dtype}")
    elif gate is not None:
        raise ValueError(f"{OP}: gate belongs to the gated_residual epilogue, got epilogue {epilogue!r}")
    _checks.check_same_device(OP, {"x": x, "weight": weight, "weight_scale": weight_scale, "bias": bias, "gate": gate,
                                   "res": res, "gate_weight": gate_weight, "gate_weight_scale": gate_weight_scale,
                                   "gate_bias": gate_bias})


def fp8_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    epilogue: str = "none",
    mode: str = "weight_only",
    gate: torch.Tensor | None = None,
    res: torch.Tensor | None = None,
    gate_weight: torch.Tensor | None = None,
    gate_weight_scale: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``epilogue(x @ (weight * weight_scale[:, None]).T + bias)`` with float8 weights. Forward only.

    Args:
        x: (..., K) contiguous activations, float32/float16/bfloat16 ((B, L, K) for
            ``gated_residual``).
        weight: (N, K) ``float8_e4m3fn`` with unit last-dim stride (geglu: (2 * inner, K), value
            rows then gate rows, unless ``gate_weight`` is given).
        weight_scale: (N,) contiguous float32, one per output channel.
        bias: (N,) of ``x.dtype``, or None.
        epilogue: ``"none"``, ``"gelu_tanh"``, ``"gated_residual"`` (``res + gate[:, None] * y``),
            ``"residual"`` (``res + y``) or ``"geglu"`` (``value * gelu(gate)``).
        mode: ``"weight_only"`` (activations stay in their dtype) or ``"per_token"``
            (activations quantized per row to float8 at run time).
        gate: (B, N) of ``x.dtype`` for ``gated_residual``.
        res: (..., N) contiguous residual of ``x.dtype`` for ``gated_residual``/``residual``.
        gate_weight, gate_weight_scale, gate_bias: geglu's gate rows as a separate float8 (inner, K)
            weight with its (inner,) scale and bias.

    Returns:
        (..., N) tensor of ``x.dtype`` ((..., inner) for geglu).

    Raises:
        TypeError: a weight that is not float8_e4m3fn, a scale that is not float32, mismatched dtypes.
        ValueError: an unknown epilogue or mode, wrong shapes (a scale not (N,)), non-contiguous inputs.
        NotImplementedError: on a CUDA device without FP8 tensor cores (compute capability < 8.9).

    Examples:
        >>> import torch, mosaic_kernels as mk
        >>> w, s = mk.quantize_fp8_weight(torch.randn(16, 32))
        >>> mk.fp8_gemm(torch.randn(2, 32), w, s, epilogue="gelu_tanh").shape
        torch.Size([2, 16])
    """
    args = (x, weight, weight_scale, bias, epilogue, mode, gate, res, gate_weight, gate_weight_scale, gate_bias)
    _check_inputs(*args)
    return torch.ops.mosaic.fp8_gemm(*args)
