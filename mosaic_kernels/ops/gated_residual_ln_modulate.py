"""``gated_residual_ln_modulate``: one sub-block's residual update fused with the next norm.

Kernels: ``csrc/gated_residual_ln_modulate.{cu,cpp}``, ``mosaic_kernels/triton/gated_residual_ln_modulate.py``;
reference ``reference.gated_residual_ln_modulate_ref``; tests
``tests/kernels/test_gated_residual_ln_modulate.py``.
"""

from __future__ import annotations

import torch

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ..op_registry import BenchCase, eager_providers, random_maker, register, row_triton_case
from .ln_modulate import ln_modulate_eager

OP = "gated_residual_ln_modulate"
_dispatch.declare_compiled_kernel(OP)


@torch.library.custom_op("mosaic::gated_residual_ln_modulate", mutates_args=())
def _gated_residual_ln_modulate_op(
    res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _dispatch.dispatched(OP, _dispatch.select_backend(
        OP, res.device, _dispatch.cuda_inputs_status(OP, res, gate, y, shift, scale)))
    if backend == "cuda":
        h = torch.empty_like(res)
        out = torch.empty_like(res)
        torch.ops.mosaic_C.gated_residual_ln_modulate(
            h, out, res, gate.contiguous(), y, shift.contiguous(), scale.contiguous(), eps)
        return h, out
    if backend == "triton":
        return _dispatch.triton_package()[0].gated_residual_ln_modulate_triton(res, gate, y, shift, scale, eps)
    return ref.gated_residual_ln_modulate_ref(res, gate, y, shift, scale, eps)


@_gated_residual_ln_modulate_op.register_fake
def _(res, gate, y, shift, scale, eps):
    return torch.empty_like(res), torch.empty_like(res)


_autograd.register_reference_backward(_gated_residual_ln_modulate_op, ref.gated_residual_ln_modulate_ref)


def gated_residual_ln_modulate(
    res: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = res + gate[:, None, :] * y``; ``normed = LN(h) * (1 + scale[:, None, :]) + shift[:, None, :]``.

    One pass over the rows: the residual update of one sub-block fused with the norm and
    modulation of the next. ``normed`` is computed from ``h`` before it is rounded to the
    output dtype. Differentiable.

    Args:
        res: (B, L, D) contiguous residual stream.
        gate: (B, D) per-sample gate.
        y: (B, L, D) contiguous branch output, dtype of ``res``.
        shift: (B, D) per-sample shift of the next norm.
        scale: (B, D) per-sample scale of the next norm.
        eps: variance epsilon: a finite real number > 0 (not a bool).

    Returns:
        ``(h, normed)``, both (B, L, D) tensors of ``res.dtype``.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, ``y.dtype != res.dtype``, or an
            ``eps`` that is not a number.
        ValueError: for wrong ranks or shapes, non-contiguous ``res``/``y``, or an ``eps`` that
            is not finite and > 0.
        RuntimeError: if a pinned backend cannot run.
    """
    _checks.check_gated_inputs(OP, res, gate, y)
    _checks.check_ln_inputs(OP, res, shift, scale, eps, x_name="res")
    _checks.check_same_device(OP, {"res": res, "gate": gate, "y": y, "shift": shift, "scale": scale})
    return torch.ops.mosaic.gated_residual_ln_modulate(res, gate, y, shift, scale, float(eps))


def gated_residual_ln_modulate_eager(res, gate, y, shift, scale, eps=1e-6):
    """What diffusers runs: the residual update, then LayerNorm and modulation, in the input dtype."""
    h = res + gate[:, None] * y
    return h, ln_modulate_eager(h, shift, scale, eps)


def _inputs(shape, dtype, device, generator):
    B, L, D = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, D, scale=0.5)


def _launch_triton(shape, dtype, config, alloc):
    B, L, D = shape
    _dispatch.triton_package()[0].gated_residual_ln_modulate_triton(
        alloc(B, L, D), alloc(B, D), alloc(B, L, D), alloc(B, D), alloc(B, D), 1e-6, config=config)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=lambda shape, e: e * (4 * shape[0] * shape[1] * shape[2] + 3 * shape[0] * shape[2]),
    reference=ref.gated_residual_ln_modulate_ref,
    providers=lambda: {**eager_providers(gated_residual_ln_modulate_eager),
                       "triton": _dispatch.pinned(gated_residual_ln_modulate, "triton"),
                       "cuda": _dispatch.pinned(gated_residual_ln_modulate, "cuda")},
    model_shapes=lambda batch: [(batch, 256, 1152)],  # DiT-XL/2
    tiny_shape=(2, 16, 72),
    eager=gated_residual_ln_modulate_eager,
    triton=row_triton_case(OP, _launch_triton),
))
