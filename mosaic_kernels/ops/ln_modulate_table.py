"""``ln_modulate_table``: LayerNorm without affine, then the adaLN-single modulation (a per-sample
chunk plus a per-channel table row), in one pass over the rows.

Kernel: ``mosaic_kernels/triton/ln_modulate_table.py`` (the shared LayerNorm row kernel with
``HAS_TABLE``); reference ``reference.ln_modulate_table_ref``; tests
``tests/kernels/test_ln_modulate_table.py``. No compiled CUDA kernel: the auto order is Triton,
then the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ..op_registry import BenchCase, eager_providers, random_maker, register, row_triton_case

OP = "ln_modulate_table"


@torch.library.custom_op("mosaic::ln_modulate_table", mutates_args=())
def _ln_modulate_table_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, shift_table: torch.Tensor,
                          scale_table: torch.Tensor, eps: float) -> torch.Tensor:
    backend = _dispatch.dispatched(OP, _dispatch.select_backend(OP, x.device))
    if backend == "triton":
        return _dispatch.triton_package()[0].ln_modulate_table_triton(x, shift, scale, shift_table.contiguous(),
                                                                      scale_table.contiguous(), eps)
    return ref.ln_modulate_table_ref(x, shift, scale, shift_table, scale_table, eps)


@_ln_modulate_table_op.register_fake
def _(x, shift, scale, shift_table, scale_table, eps):
    return torch.empty_like(x)


_autograd.register_reference_backward(_ln_modulate_table_op, ref.ln_modulate_table_ref)


def ln_modulate_table(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, shift_table: torch.Tensor,
                      scale_table: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``y = LN(x) * (1 + scale[:, None] + scale_table) + shift[:, None] + shift_table``. Differentiable.

    PixArt's adaLN-single norm + modulate: ``shift``/``scale`` are chunks of the model's one
    ``adaln_single`` output (row-strided views of it, no copy), ``shift_table``/``scale_table``
    the block's rows of its ``scale_shift_table``. The sums are formed in fp32 inside the kernel.

    Args:
        x: (B, L, D) contiguous activations, float32/float16/bfloat16.
        shift: (B, D) per-sample shift (unit stride in the last dim).
        scale: (B, D) per-sample scale.
        shift_table: (D,) per-channel shift row (any unit-stride (D,) view).
        scale_table: (D,) per-channel scale row.
        eps: variance epsilon: a finite real number > 0 (not a bool).

    Returns:
        (B, L, D) tensor of ``x.dtype``.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, or an ``eps`` that is not a number.
        ValueError: for wrong ranks or shapes, a non-contiguous ``x`` or table row, mixed devices,
            or an ``eps`` that is not finite and > 0.
        RuntimeError: if a pinned backend cannot run (see :func:`use_backend`).
    """
    _checks.check_ln_inputs(OP, x, shift, scale, eps)
    _checks.check_contiguous(OP, "x", x)
    _checks.check_table_rows(OP, x.shape[-1], {"shift_table": shift_table, "scale_table": scale_table})
    _checks.check_same_device(OP, {"x": x, "shift": shift, "scale": scale, "shift_table": shift_table,
                                   "scale_table": scale_table})
    return torch.ops.mosaic.ln_modulate_table(x, shift, scale, shift_table, scale_table, float(eps))


def ln_modulate_table_eager(x, shift, scale, shift_table, scale_table, eps=1e-6):
    """What diffusers runs: the table sum, a LayerNorm kernel, then elementwise kernels, in the input dtype."""
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)
    return normed * (1 + (scale + scale_table)[:, None]) + (shift + shift_table)[:, None]


def _inputs(shape, dtype, device, generator):
    B, L, D = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, D, scale=0.5), rnd(D, scale=0.2), rnd(D, scale=0.2)


def _launch_triton(shape, dtype, config, alloc):
    B, L, D = shape
    _dispatch.triton_package()[0].ln_modulate_table_triton(alloc(B, L, D), alloc(B, D), alloc(B, D), alloc(D),
                                                           alloc(D), 1e-6, config=config)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=lambda shape, e: e * (2 * shape[0] * shape[1] * shape[2] + 2 * shape[0] * shape[2] + 2 * shape[2]),
    reference=ref.ln_modulate_table_ref,
    providers=lambda: {**eager_providers(ln_modulate_table_eager),
                       "triton": _dispatch.pinned(ln_modulate_table, "triton")},
    # PixArt-Sigma: 1024 px = 4096 tokens, 2K = 16384 tokens, of width 1152; alpha 512 px: 1024 tokens
    model_shapes=lambda batch: [(batch, 4096, 1152), (batch, 16384, 1152), (batch, 1024, 1152)],
    tiny_shape=(2, 16, 72),
    eager=ln_modulate_table_eager,
    triton=row_triton_case(OP, _launch_triton),
))
