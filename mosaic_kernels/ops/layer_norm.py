"""``layer_norm``: affine LayerNorm over the last dim (SDXL's BasicTransformerBlock norm1/2/3).

Kernel: ``mosaic_kernels/triton/layer_norm.py`` (the shared LayerNorm row kernel); reference
``reference.layer_norm_ref``; tests ``tests/kernels/test_layer_norm.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ..op_registry import BenchCase, eager_providers, random_maker, register, row_triton_case

OP = "layer_norm"


@torch.library.custom_op("mosaic::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    backend = _dispatch.dispatched(OP, _dispatch.select_backend(OP, x.device))
    if backend == "triton" and x.numel() > 0:
        return _dispatch.triton_package()[0].layer_norm_triton(x, weight, bias, eps)
    return ref.layer_norm_ref(x, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


_autograd.register_reference_backward(_layer_norm_op, ref.layer_norm_ref)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last dim. Differentiable.

    ``torch.nn.LayerNorm`` (biased variance), with either affine part optional
    (``elementwise_affine=False``: both None).

    Args:
        x: (..., D) contiguous activations, float32/float16/bfloat16.
        weight: (D,) contiguous scale of any of those dtypes, or None.
        bias: (D,) contiguous shift of any of those dtypes, or None.
        eps: variance epsilon: a finite real number > 0 (not a bool).

    Returns:
        Tensor of ``x``'s shape and dtype (computed in fp32). Empty inputs give an empty output.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, or an ``eps`` that is not a number.
        ValueError: for a 0-d ``x``, a weight or bias that is not (D,) and contiguous, a
            non-contiguous ``x``, mismatched devices, or an ``eps`` that is not finite and > 0.
        RuntimeError: if a pinned backend cannot run.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least 1 dim (..., D), got shape {tuple(x.shape)}")
    _checks.check_tensor(OP, "x", x, x.dim())
    _checks.check_contiguous(OP, "x", x)
    _checks.check_affine(OP, x.shape[-1], weight, bias)
    eps = _checks.check_eps(OP, eps)
    _checks.check_same_device(OP, {"x": x, "weight": weight, "bias": bias})
    return torch.ops.mosaic.layer_norm(x, weight, bias, eps)


def layer_norm_eager(x, weight, bias, eps=1e-5):
    """What diffusers runs: ``F.layer_norm`` in the input dtype."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _inputs(shape, dtype, device, generator):
    B, L, D = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(B, L, D), 1 + rnd(D, scale=0.5), rnd(D, scale=0.5)


def _launch_triton(shape, dtype, config, alloc):
    B, L, D = shape
    _dispatch.triton_package()[0].layer_norm_triton(alloc(B, L, D), alloc(D), alloc(D), 1e-5, config=config)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=lambda shape, e: e * (2 * shape[0] * shape[1] * shape[2] + 2 * shape[2]),
    reference=ref.layer_norm_ref,
    providers=lambda: {**eager_providers(layer_norm_eager), "triton": _dispatch.pinned(layer_norm, "triton")},
    # SDXL at 1024 px: the transformer blocks at 64x64 tokens of 640 and 32x32 tokens of 1280
    model_shapes=lambda batch: [(batch, 4096, 640), (batch, 1024, 1280)],
    tiny_shape=(2, 16, 72),
    eager=layer_norm_eager,
    triton=row_triton_case(OP, _launch_triton),
))
