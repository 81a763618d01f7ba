"""``linear_gated_residual``: GEMM + bias, then the gated residual ``res + gate * y`` (proj, fc2).

Kernel: ``mosaic_kernels/triton/linear_gated_residual.py`` (the Triton GEMM with the gate and
residual in its epilogue); the vendor path is cuBLAS ``addmm``, then the ``gated_residual``
kernel. Reference ``reference.linear_gated_residual_ref``; tests
``tests/kernels/test_linear_gated_residual.py``, ``tests/kernels/test_vendor_path.py``.
"""

from __future__ import annotations

import math

import torch

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ._gemm import DIT_MLP_WIDTHS, DIT_PROJ_WIDTHS, DIT_WIDTH, GEMM_CHOICE, gemm_flops, gemm_providers, gemm_triton_case
from ..op_registry import BenchCase, random_maker, register

OP = "linear_gated_residual"


def _vendor_linear_gated_residual(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  gate: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """The vendor path: cuBLAS ``addmm``, then the gated residual (the Triton kernel where it
    runs on these tensors, else the reference). Plain torch."""
    y2d = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
    y = y2d.view(res.shape)
    if _dispatch.triton_runs_on(res.device):
        return _dispatch.triton_package()[0].gated_residual_triton(res, gate, y)
    return ref.gated_residual_ref(res, gate, y)


@torch.library.custom_op("mosaic::linear_gated_residual", mutates_args=())
def _linear_gated_residual_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, res: torch.Tensor
) -> torch.Tensor:
    N, K = weight.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # not reshape(-1, K): K may be 0
    path = _dispatch.dispatched(OP, _dispatch.gemm_path(OP, x, x2d.shape[0], N, K))
    if path == "triton":
        return _dispatch.triton_package()[0].linear_gated_residual_triton(x, weight, bias, gate, res)
    if path == "vendor":
        return _vendor_linear_gated_residual(x2d, weight, bias, gate, res)
    return ref.linear_gated_residual_ref(x, weight, bias, gate, res)


@_linear_gated_residual_op.register_fake
def _(x, weight, bias, gate, res):
    return torch.empty_like(res)


_autograd.register_reference_backward(_linear_gated_residual_op, ref.linear_gated_residual_ref)


def linear_gated_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, res: torch.Tensor
) -> torch.Tensor:
    """``out = res + gate[:, None, :] * (x @ weight.T + bias)``. Differentiable.

    On CUDA the default is the vendor path (cuBLAS ``addmm``, then the Triton ``gated_residual``
    kernel); the Triton GEMM with the gate/residual epilogue fused runs where
    :mod:`mosaic_kernels.configs` measured it faster for the shape, or when ``triton`` is pinned.

    Args:
        x: (B, L, K) contiguous input.
        weight: (N, K) weight of ``x.dtype``.
        bias: (N,) bias of ``x.dtype``, or None.
        gate: (B, N) per-sample gate (unit stride in the last dim).
        res: (B, L, N) contiguous residual stream of ``x.dtype``.

    Returns:
        (B, L, N) tensor of ``res.dtype``. K = 0 gives ``res + gate * bias`` (``res`` without
        a bias), as ``F.linear``.

    Raises:
        TypeError: for a non-tensor or mismatched/unsupported dtypes.
        ValueError: for wrong ranks or shapes, or non-contiguous ``x``/``res``.
        RuntimeError: if a pinned backend cannot run.
    """
    _checks.check_linear_inputs(OP, x, weight, bias, 3)
    _checks.check_tensor(OP, "gate", gate, 2)
    _checks.check_tensor(OP, "res", res, 3)
    B, L, _ = x.shape
    N = weight.shape[0]
    if tuple(res.shape) != (B, L, N):
        raise ValueError(f"{OP}: res must be (B, L, N)=({B}, {L}, {N}), got {tuple(res.shape)}")
    if res.dtype != x.dtype:
        raise TypeError(f"{OP}: res must have the dtype of x ({x.dtype}), got {res.dtype}")
    _checks.check_contiguous(OP, "res", res)
    _checks.check_vector(OP, "gate", gate, B, N, what="(B, N)")
    _checks.check_same_device(OP, {"x": x, "weight": weight, "bias": bias, "gate": gate, "res": res})
    return torch.ops.mosaic.linear_gated_residual(x, weight, bias, gate, res)


def linear_gated_residual_eager(x, weight, bias, gate, res):
    """Plain torch in the input dtype: the GEMM, then the gated residual."""
    return res + gate[:, None] * torch.nn.functional.linear(x, weight, bias)


def _inputs(shape, dtype, device, generator):
    """(M, N, K) as one sample of M rows: B = 1, so the gate is a single (1, N) row."""
    M, N, K = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(1, M, K), rnd(N, K, scale=K**-0.5), rnd(N, scale=0.1), rnd(1, N, scale=0.5), rnd(1, M, N)


def _bytes(shape, e):
    M, N, K = shape
    return e * (M * K + N * K + N + N + 2 * M * N)


def _launch_triton(shape, dtype, config, alloc):
    M, N, K = shape
    _dispatch.triton_package()[0].linear_gated_residual_triton(
        alloc(1, M, K), alloc(N, K), alloc(N), alloc(1, N), alloc(1, M, N), config=config)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=_bytes,
    flops=gemm_flops,
    reference=ref.linear_gated_residual_ref,
    providers=lambda: gemm_providers(linear_gated_residual),
    # DiT-XL/2: fc2 at the MLP widths, the attention proj at the kept head counts
    model_shapes=lambda batch: [(batch * 256, DIT_WIDTH, k) for k in (*DIT_MLP_WIDTHS, *DIT_PROJ_WIDTHS)],
    tiny_shape=(32, 72, 64),
    eager=linear_gated_residual_eager,
    choice=GEMM_CHOICE,
    triton=gemm_triton_case("gated_residual", _launch_triton),
))
