"""``residual_layer_norm``: an SD/SDXL block's residual add fused with the next affine LayerNorm.

Kernel: ``mosaic_kernels/triton/residual_layer_norm.py`` (the shared LayerNorm row kernel);
reference ``reference.residual_layer_norm_ref``; tests ``tests/kernels/test_residual_layer_norm.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ..op_registry import BenchCase, eager_providers, random_maker, register, row_triton_case

OP = "residual_layer_norm"


@torch.library.custom_op("mosaic::residual_layer_norm", mutates_args=())
def _residual_layer_norm_op(res: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _dispatch.dispatched(OP, _dispatch.select_backend(OP, res.device))
    if backend == "triton" and res.numel() > 0:
        return _dispatch.triton_package()[0].residual_layer_norm_triton(res, y, weight, bias, eps)
    return ref.residual_layer_norm_ref(res, y, weight, bias, eps)


@_residual_layer_norm_op.register_fake
def _(res, y, weight, bias, eps):
    return torch.empty_like(res), torch.empty_like(res)


_autograd.register_reference_backward(_residual_layer_norm_op, ref.residual_layer_norm_ref)


def residual_layer_norm(res: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = res + y``; ``normed = LN(h) * weight + bias`` over the last dim. Differentiable.

    One pass over the rows: the residual update of one sub-block and the norm of the next
    (``norm2`` after self-attention, ``norm3`` after cross-attention). ``normed`` is computed
    from ``h`` before it is rounded to the output dtype.

    Args:
        res: (..., D) contiguous residual stream, float32/float16/bfloat16.
        y: branch output of ``res``'s shape and dtype, contiguous.
        weight: (D,) contiguous scale, or None.
        bias: (D,) contiguous shift, or None.
        eps: variance epsilon: a finite real number > 0 (not a bool).

    Returns:
        ``(h, normed)`` of ``res``'s shape and dtype.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, ``y.dtype != res.dtype``, or an ``eps``
            that is not a number.
        ValueError: for a 0-d ``res``, ``y`` of another shape, non-contiguous inputs, a weight or
            bias that is not (D,), mismatched devices, or an ``eps`` that is not finite and > 0.
        RuntimeError: if a pinned backend cannot run.
    """
    if not isinstance(res, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{OP}: res and y must be torch.Tensors, got {type(res).__name__}, {type(y).__name__}")
    if res.dim() < 1:
        raise ValueError(f"{OP}: res must have at least 1 dim (..., D), got shape {tuple(res.shape)}")
    _checks.check_tensor(OP, "res", res, res.dim())
    _checks.check_tensor(OP, "y", y, res.dim())
    if y.shape != res.shape:
        raise ValueError(f"{OP}: y must have res's shape {tuple(res.shape)}, got {tuple(y.shape)}")
    if y.dtype != res.dtype:
        raise TypeError(f"{OP}: y must have res's dtype {res.dtype}, got {y.dtype}")
    _checks.check_contiguous(OP, "res", res)
    _checks.check_contiguous(OP, "y", y)
    _checks.check_affine(OP, res.shape[-1], weight, bias)
    eps = _checks.check_eps(OP, eps)
    _checks.check_same_device(OP, {"res": res, "y": y, "weight": weight, "bias": bias})
    return torch.ops.mosaic.residual_layer_norm(res, y, weight, bias, eps)


def residual_layer_norm_eager(res, y, weight, bias, eps=1e-5):
    """What diffusers runs: the residual add, then ``F.layer_norm``, in the input dtype."""
    h = res + y
    return h, F.layer_norm(h, h.shape[-1:], weight, bias, eps)


def _inputs(shape, dtype, device, generator):
    B, L, D = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(B, L, D), rnd(B, L, D), 1 + rnd(D, scale=0.5), rnd(D, scale=0.5)


def _launch_triton(shape, dtype, config, alloc):
    B, L, D = shape
    _dispatch.triton_package()[0].residual_layer_norm_triton(alloc(B, L, D), alloc(B, L, D), alloc(D), alloc(D),
                                                             1e-5, config=config)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    # res and y read, h and normed written, the two vectors read
    bytes_moved=lambda shape, e: e * (4 * shape[0] * shape[1] * shape[2] + 2 * shape[2]),
    reference=ref.residual_layer_norm_ref,
    providers=lambda: {**eager_providers(residual_layer_norm_eager),
                       "triton": _dispatch.pinned(residual_layer_norm, "triton")},
    # SDXL at 1024 px: the transformer blocks at 64x64 tokens of 640 and 32x32 tokens of 1280
    model_shapes=lambda batch: [(batch, 4096, 640), (batch, 1024, 1280)],
    tiny_shape=(2, 16, 72),
    eager=residual_layer_norm_eager,
    triton=row_triton_case(OP, _launch_triton),
))
