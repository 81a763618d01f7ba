"""``gated_residual``: the adaLN-Zero residual update ``res + gate * y``.

Kernel: ``mosaic_kernels/triton/gated_residual.py``; reference ``reference.gated_residual_ref``;
tests ``tests/kernels/test_gated_residual.py``.
"""

from __future__ import annotations

import torch

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ..op_registry import BenchCase, eager_providers, random_maker, register, row_triton_case

OP = "gated_residual"


@torch.library.custom_op("mosaic::gated_residual", mutates_args=())
def _gated_residual_op(res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    backend = _dispatch.dispatched(OP, _dispatch.select_backend(OP, res.device))
    if backend == "triton":
        return _dispatch.triton_package()[0].gated_residual_triton(res, gate, y)
    return ref.gated_residual_ref(res, gate, y)


@_gated_residual_op.register_fake
def _(res, gate, y):
    return torch.empty_like(res)


_autograd.register_reference_backward(_gated_residual_op, ref.gated_residual_ref)


def gated_residual(res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out = res + gate[:, None, :] * y``. Differentiable.

    Args:
        res: (B, L, D) contiguous residual stream.
        gate: (B, D) per-sample gate (unit stride in the last dim).
        y: (B, L, D) contiguous branch output, dtype of ``res``.

    Returns:
        (B, L, D) tensor of ``res.dtype``.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, or ``y.dtype != res.dtype``.
        ValueError: for wrong ranks or shapes, or non-contiguous ``res``/``y``.
        RuntimeError: if a pinned backend cannot run.
    """
    _checks.check_gated_inputs(OP, res, gate, y)
    _checks.check_same_device(OP, {"res": res, "gate": gate, "y": y})
    return torch.ops.mosaic.gated_residual(res, gate, y)


def gated_residual_eager(res, gate, y):
    """Plain torch in the input dtype."""
    return res + gate[:, None] * y


def _inputs(shape, dtype, device, generator):
    B, L, D = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, L, D)


def _launch_triton(shape, dtype, config, alloc):
    B, L, D = shape
    _dispatch.triton_package()[0].gated_residual_triton(alloc(B, L, D), alloc(B, D), alloc(B, L, D), config=config)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=lambda shape, e: e * (3 * shape[0] * shape[1] * shape[2] + shape[0] * shape[2]),
    reference=ref.gated_residual_ref,
    providers=lambda: {**eager_providers(gated_residual_eager), "triton": _dispatch.pinned(gated_residual, "triton")},
    model_shapes=lambda batch: [(batch, 256, 1152)],  # DiT-XL/2 (MLP-pruned blocks, unfused boundaries)
    tiny_shape=(2, 16, 72),
    eager=gated_residual_eager,
    triton=row_triton_case(OP, _launch_triton),
))
