"""``gated_residual_ln_modulate_table``: a PixArt sub-block's gated residual update fused with the
next adaLN-single norm (gate, shift and scale each a per-sample chunk plus a per-channel table row).

Kernel: ``mosaic_kernels/triton/gated_residual_ln_modulate_table.py`` (the shared LayerNorm row
kernel with ``HAS_TABLE``); reference ``reference.gated_residual_ln_modulate_table_ref``; tests
``tests/kernels/test_gated_residual_ln_modulate_table.py``. No compiled CUDA kernel.
"""

from __future__ import annotations

import torch

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ..op_registry import BenchCase, eager_providers, random_maker, register, row_triton_case
from .ln_modulate_table import ln_modulate_table_eager

OP = "gated_residual_ln_modulate_table"


@torch.library.custom_op("mosaic::gated_residual_ln_modulate_table", mutates_args=())
def _gated_residual_ln_modulate_table_op(
    res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    gate_table: torch.Tensor, shift_table: torch.Tensor, scale_table: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _dispatch.dispatched(OP, _dispatch.select_backend(OP, res.device))
    if backend == "triton":
        return _dispatch.triton_package()[0].gated_residual_ln_modulate_table_triton(
            res, gate, y, shift, scale, gate_table.contiguous(), shift_table.contiguous(), scale_table.contiguous(),
            eps)
    return ref.gated_residual_ln_modulate_table_ref(res, gate, y, shift, scale, gate_table, shift_table, scale_table,
                                                    eps)


@_gated_residual_ln_modulate_table_op.register_fake
def _(res, gate, y, shift, scale, gate_table, shift_table, scale_table, eps):
    return torch.empty_like(res), torch.empty_like(res)


_autograd.register_reference_backward(_gated_residual_ln_modulate_table_op, ref.gated_residual_ln_modulate_table_ref)


def gated_residual_ln_modulate_table(
    res: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    gate_table: torch.Tensor,
    shift_table: torch.Tensor,
    scale_table: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = res + (gate[:, None] + gate_table) * y``;
    ``normed = LN(h) * (1 + scale[:, None] + scale_table) + shift[:, None] + shift_table``.

    One pass over the rows: the end of one PixArt (adaLN-single) sub-block fused with the norm
    and modulation of the next; ``normed`` is computed from ``h`` before it is rounded to the
    output dtype. Differentiable.

    Args:
        res: (B, L, D) contiguous residual stream.
        gate: (B, D) per-sample gate.
        y: (B, L, D) contiguous branch output, dtype of ``res``.
        shift: (B, D) per-sample shift of the next norm.
        scale: (B, D) per-sample scale of the next norm.
        gate_table: (D,) per-channel gate row.
        shift_table: (D,) per-channel shift row of the next norm.
        scale_table: (D,) per-channel scale row of the next norm.
        eps: variance epsilon: a finite real number > 0 (not a bool).

    Returns:
        ``(h, normed)``, both (B, L, D) tensors of ``res.dtype``.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, ``y.dtype != res.dtype``, or an
            ``eps`` that is not a number.
        ValueError: for wrong ranks or shapes, non-contiguous ``res``/``y`` or table rows, mixed
            devices, or an ``eps`` that is not finite and > 0.
        RuntimeError: if a pinned backend cannot run.
    """
    _checks.check_gated_inputs(OP, res, gate, y)
    _checks.check_ln_inputs(OP, res, shift, scale, eps, x_name="res")
    tables = {"gate_table": gate_table, "shift_table": shift_table, "scale_table": scale_table}
    _checks.check_table_rows(OP, res.shape[-1], tables)
    _checks.check_same_device(OP, {"res": res, "gate": gate, "y": y, "shift": shift, "scale": scale, **tables})
    return torch.ops.mosaic.gated_residual_ln_modulate_table(res, gate, y, shift, scale, gate_table, shift_table,
                                                             scale_table, float(eps))


def gated_residual_ln_modulate_table_eager(res, gate, y, shift, scale, gate_table, shift_table, scale_table, eps=1e-6):
    """What diffusers runs: the gated residual update, then LayerNorm and modulation, in the input dtype."""
    h = res + (gate + gate_table)[:, None] * y
    return h, ln_modulate_table_eager(h, shift, scale, shift_table, scale_table, eps)


def _inputs(shape, dtype, device, generator):
    B, L, D = shape
    rnd = random_maker(device, dtype, generator)
    return (rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, D, scale=0.5),
            rnd(D, scale=0.2), rnd(D, scale=0.2), rnd(D, scale=0.2))


def _launch_triton(shape, dtype, config, alloc):
    B, L, D = shape
    _dispatch.triton_package()[0].gated_residual_ln_modulate_table_triton(
        alloc(B, L, D), alloc(B, D), alloc(B, L, D), alloc(B, D), alloc(B, D), alloc(D), alloc(D), alloc(D), 1e-6,
        config=config)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=lambda shape, e: e * (4 * shape[0] * shape[1] * shape[2] + 3 * shape[0] * shape[2] + 3 * shape[2]),
    reference=ref.gated_residual_ln_modulate_table_ref,
    providers=lambda: {**eager_providers(gated_residual_ln_modulate_table_eager),
                       "triton": _dispatch.pinned(gated_residual_ln_modulate_table, "triton")},
    # PixArt-Sigma 1024 px (4096 tokens) and 2K (16384), alpha 512 px (1024), width 1152
    model_shapes=lambda batch: [(batch, 4096, 1152), (batch, 16384, 1152), (batch, 1024, 1152)],
    tiny_shape=(2, 16, 72),
    eager=gated_residual_ln_modulate_table_eager,
    triton=row_triton_case(OP, _launch_triton),
))
