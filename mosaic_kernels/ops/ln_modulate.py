"""``ln_modulate``: LayerNorm without affine, then the adaLN modulation, in one pass over the rows.

Kernels: ``csrc/ln_modulate.{cu,cpp}`` (``torch.ops.mosaic_C.ln_modulate``),
``mosaic_kernels/triton/ln_modulate.py``; reference ``reference.ln_modulate_ref``; tests
``tests/kernels/test_ln_modulate.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ..op_registry import BenchCase, eager_providers, random_maker, register, row_triton_case

OP = "ln_modulate"
_dispatch.declare_compiled_kernel(OP)


@torch.library.custom_op("mosaic::ln_modulate", mutates_args=())
def _ln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    backend = _dispatch.dispatched(OP, _dispatch.select_backend(
        OP, x.device, _dispatch.cuda_inputs_status(OP, x, shift, scale)))
    if backend == "cuda":
        out = torch.empty_like(x)
        torch.ops.mosaic_C.ln_modulate(out, x, shift.contiguous(), scale.contiguous(), eps)
        return out
    if backend == "triton":
        return _dispatch.triton_package()[0].ln_modulate_triton(x, shift, scale, eps)
    return ref.ln_modulate_ref(x, shift, scale, eps)


@_ln_modulate_op.register_fake
def _(x, shift, scale, eps):
    return torch.empty_like(x)


_autograd.register_reference_backward(_ln_modulate_op, ref.ln_modulate_ref)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``y = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :]`` (LayerNorm without affine). Differentiable.

    Args:
        x: (B, L, D) contiguous activations, float32/float16/bfloat16.
        shift: (B, D) per-sample shift (any of those dtypes; unit stride in the last dim).
        scale: (B, D) per-sample scale.
        eps: variance epsilon: a finite real number > 0 (Python or NumPy scalar, not a bool).

    Returns:
        (B, L, D) tensor of ``x.dtype``. Empty inputs (B, L or D = 0) give an empty output.
        NaN/inf in a row of ``x`` make that output row NaN; in ``shift``/``scale``, that column
        (as the reference).

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, or an ``eps`` that is not a number.
        ValueError: for wrong ranks, mismatched B or D, a non-contiguous ``x``, or an ``eps``
            that is not finite and > 0.
        RuntimeError: if a pinned backend cannot run (see :func:`use_backend`).
    """
    _checks.check_ln_inputs(OP, x, shift, scale, eps)
    _checks.check_contiguous(OP, "x", x)
    _checks.check_same_device(OP, {"x": x, "shift": shift, "scale": scale})
    return torch.ops.mosaic.ln_modulate(x, shift, scale, float(eps))


def ln_modulate_eager(x, shift, scale, eps=1e-6):
    """What diffusers runs: a LayerNorm kernel, then elementwise kernels, in the input dtype."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def _inputs(shape, dtype, device, generator):
    B, L, D = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, D, scale=0.5)


def _launch_triton(shape, dtype, config, alloc):
    B, L, D = shape
    _dispatch.triton_package()[0].ln_modulate_triton(alloc(B, L, D), alloc(B, D), alloc(B, D), 1e-6, config=config)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=lambda shape, e: e * (2 * shape[0] * shape[1] * shape[2] + 2 * shape[0] * shape[2]),
    reference=ref.ln_modulate_ref,
    providers=lambda: {**eager_providers(ln_modulate_eager),
                       "triton": _dispatch.pinned(ln_modulate, "triton"),
                       "cuda": _dispatch.pinned(ln_modulate, "cuda")},
    model_shapes=lambda batch: [(batch, 256, 1152)],  # DiT-XL/2: 256 tokens of width 1152
    tiny_shape=(2, 16, 72),
    eager=ln_modulate_eager,
    triton=row_triton_case(OP, _launch_triton),
))
