"""``linear_geglu``: GEMM + bias, then GEGLU ``h * gelu(gate)`` (diffusers ``GEGLU``, SDXL's FeedForward).

Kernel: ``mosaic_kernels/triton/linear_geglu.py`` (the Triton GEMM with a GEGLU epilogue); the
vendor path is cuBLAS through torch, then the GEGLU in the input dtype. Reference
``reference.linear_geglu_ref``; tests ``tests/kernels/test_linear_geglu.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ._gemm import GEMM_CHOICE, gemm_bias_inputs, gemm_bias_launch, gemm_flops, gemm_providers, gemm_triton_case
from ..op_registry import BenchCase, register

OP = "linear_geglu"


def _vendor_linear_geglu(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         gate_weight: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """The vendor path on (M, K) rows: cuBLAS GEMM(s), then the GEGLU (as diffusers runs it)."""
    if gate_weight is None:
        h, gate = F.linear(x2d, weight, bias).chunk(2, dim=-1)
    else:  # two GEMMs on the two views (no concatenated copy of the weight)
        h, gate = F.linear(x2d, weight, bias), F.linear(x2d, gate_weight, gate_bias)
    return h * F.gelu(gate)


@torch.library.custom_op("mosaic::linear_geglu", mutates_args=())
def _linear_geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     gate_weight: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None) -> torch.Tensor:
    rows, K = weight.shape
    inner = rows if gate_weight is not None else rows // 2
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # not reshape(-1, K): K may be 0
    # the per-shape choice is keyed on the GEMM's full (2 * inner) width in both forms
    path = _dispatch.dispatched(OP, _dispatch.gemm_path(OP, x, x2d.shape[0], 2 * inner, K))
    if path == "triton":
        out = _dispatch.triton_package()[0].linear_geglu_triton(x2d, weight, bias, gate_weight=gate_weight,
                                                                gate_bias=gate_bias)
    elif path == "vendor":
        out = _vendor_linear_geglu(x2d, weight, bias, gate_weight, gate_bias)
    else:
        return ref.linear_geglu_ref(x, weight, bias, gate_weight, gate_bias)
    return out.view(*x.shape[:-1], inner)


@_linear_geglu_op.register_fake
def _(x, weight, bias, gate_weight=None, gate_bias=None):
    inner = weight.shape[0] if gate_weight is not None else weight.shape[0] // 2
    return x.new_empty((*x.shape[:-1], inner))


_autograd.register_reference_backward(_linear_geglu_op, ref.linear_geglu_ref)


def _check_gate(x: torch.Tensor, weight: torch.Tensor, bias, gate_weight, gate_bias) -> None:
    """The separate gate operands: `gate_weight` shaped and typed as `weight`, biases both or neither."""
    if gate_weight is None:
        if gate_bias is not None:
            raise ValueError(f"{OP}: gate_bias needs gate_weight")
        if weight.shape[0] % 2:
            raise ValueError(f"{OP}: weight must have 2 * inner rows (value, then gate), got {weight.shape[0]}")
        return
    _checks.check_linear_inputs(OP, x, gate_weight, gate_bias, None)
    if tuple(gate_weight.shape) != tuple(weight.shape):
        raise ValueError(f"{OP}: gate_weight must have the value weight's shape {tuple(weight.shape)}, "
                         f"got {tuple(gate_weight.shape)}")
    if (bias is None) != (gate_bias is None):
        raise ValueError(f"{OP}: pass both bias and gate_bias or neither")
    for name, b in (("bias", bias), ("gate_bias", gate_bias)):
        if b is not None:
            _checks.check_contiguous(OP, name, b)


def linear_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 gate_weight: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``h, gate = (x @ weight.T + bias).chunk(2, -1)``; ``y = h * gelu(gate)`` (exact erf GELU). Differentiable.

    On CUDA the default is the vendor path (cuBLAS GEMM, then the GEGLU); the Triton GEMM with
    the GEGLU fused into its epilogue runs where :mod:`mosaic_kernels.configs` measured it
    faster for the shape, or when ``triton`` is pinned.

    With `gate_weight` the value and gate rows are two separate tensors, ``h = x @ weight.T +
    bias`` and ``gate = x @ gate_weight.T + gate_bias``: e.g. two row ranges of one storage that
    several pruned models share (read in place, never concatenated).

    Args:
        x: (..., K) contiguous input, float32/float16/bfloat16.
        weight: (2 * inner, K) weight of ``x.dtype``: rows [0, inner) the value, [inner, 2 * inner)
            the gate (diffusers ``GEGLU.proj.weight``); with `gate_weight`, the (inner, K) value
            rows. Contiguous in one dim (a row range of a contiguous matrix is).
        bias: (2 * inner,) bias of ``x.dtype``, or None (with `gate_weight`: the (inner,) value bias).
        gate_weight (*optional*): (inner, K) gate rows of ``x.dtype``.
        gate_bias (*optional*): (inner,) gate bias; given exactly when `bias` is (with `gate_weight`).

    Returns:
        (..., inner) tensor of ``x.dtype``.

    Raises:
        TypeError: for a non-tensor or mismatched/unsupported dtypes.
        ValueError: for a 0-d ``x``, mismatched K, an odd number of weight rows, a wrong bias
            shape, a non-contiguous ``x``, a `gate_weight` of another shape than `weight`, one
            of `bias` / `gate_bias` without the other, or a `gate_bias` without `gate_weight`.
        RuntimeError: if a pinned backend cannot run.
    """
    _checks.check_linear_inputs(OP, x, weight, bias, None)
    _check_gate(x, weight, bias, gate_weight, gate_bias)
    _checks.check_same_device(OP, {"x": x, "weight": weight, "bias": bias, "gate_weight": gate_weight,
                                   "gate_bias": gate_bias})
    return torch.ops.mosaic.linear_geglu(x, weight, bias, gate_weight, gate_bias)


def linear_geglu_eager(x, weight, bias):
    """What diffusers' ``GEGLU`` runs: the GEMM, then the GEGLU, in the input dtype."""
    h, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return h * F.gelu(gate)


register(BenchCase(
    op=OP,
    make_inputs=gemm_bias_inputs,
    # x and the weight read, the (M, N / 2) output written
    bytes_moved=lambda s, e: e * (s[0] * s[2] + s[1] * s[2] + s[1] + s[0] * s[1] // 2),
    flops=gemm_flops,
    reference=ref.linear_geglu_ref,
    providers=lambda: gemm_providers(linear_geglu),
    # SDXL at 1024 px: FeedForward proj of 640 -> 2 x 2560 at 4096 tokens, 1280 -> 2 x 5120 at 1024
    model_shapes=lambda batch: [(batch * 4096, 5120, 640), (batch * 1024, 10240, 1280)],
    tiny_shape=(32, 64, 72),
    eager=linear_geglu_eager,
    choice=GEMM_CHOICE,
    triton=gemm_triton_case("geglu", gemm_bias_launch("linear_geglu_triton")),
))
