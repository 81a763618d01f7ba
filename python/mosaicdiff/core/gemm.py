"""`gemm`: every GEMM of a compact block in one call, in whatever storage its weight has.

A compact block's GEMMs run the fused bf16/fp32 ops of `mosaic_kernels.ops` (``F.linear``,
``linear_gelu``, ``linear_gated_residual``, ``linear_residual``, ``linear_geglu``) until
`mosaicdiff.quantize` stores the weight as ``float8_e4m3fn`` with a per-output-channel scale;
from then on the same call runs ``mosaic_kernels.ops.fp8_gemm`` with the same epilogue. So a
family's forward names each GEMM once (weight, bias, scale, epilogue) and works in both storages.

`FP8GemmMixin` gives a compact block the pieces `mosaicdiff.quantize` relies on: ``fp8_weights``
(the GEMM weights it may store as float8; the family's block class lists them, and a block of a
kind that lacks one, such as SD3's last block without a text MLP, simply has no such attribute), ``fp8_mode`` (the
activations of the FP8 GEMMs, set by `quantize`), ``weight_scale(name)`` (the scale beside
``<name>_weight``, None before `quantize`) and ``_gemm``; and the one accessor of a GEMM's operands,
``operands(name)`` (`GemmOperands` per row block), which ``producer_gemm`` runs.
`SharedProducerRowsMixin` makes a shared-producer stage view read its producers' operands as row
ranges of the block position's storage.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["EPILOGUES", "FP8GemmMixin", "GemmOperands", "SharedProducerRowsMixin", "gemm"]

#: The fused epilogues every GEMM storage supports (``mosaic_kernels.ops.FP8_EPILOGUES``).
EPILOGUES = ("none", "gelu_tanh", "gated_residual", "residual", "geglu")


class GemmOperands(NamedTuple):
    """One row block of a GEMM: what `gemm` takes after ``x``."""

    weight: torch.Tensor  # (N, K), float8 once quantized
    bias: torch.Tensor | None  # (N,)
    scale: torch.Tensor | None  # (N,) fp32 row scales of a float8 weight, else None


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None,
         epilogue: str = "none", *, mode: str = "weight_only", gate: torch.Tensor | None = None,
         res: torch.Tensor | None = None, gate_weight: torch.Tensor | None = None,
         gate_bias: torch.Tensor | None = None, gate_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``epilogue(x @ weight.T + bias)``: the bf16/fp32 op, or ``fp8_gemm`` for a float8 ``weight``.

    Args:
        x, weight, bias: the GEMM's operands (``weight`` (N, K), float8 once quantized).
        scale (`torch.Tensor` of shape `(N,)`, *optional*): ``weight``'s fp32 row scales; required
            exactly when ``weight`` is float8.
        epilogue (`str`): one of `EPILOGUES`.
        mode (`str`): the FP8 GEMMs' activations (``"weight_only"`` or ``"per_token"``); unused
            for a float weight.
        gate, res: the ``gated_residual`` (gate and residual) and ``residual`` (residual) operands.
        gate_weight, gate_bias, gate_scale: a ``geglu``'s gate rows as a separate weight (a
            shared-producer block's two row ranges), with its scale when float8.

    Raises:
        ValueError: an unknown epilogue, or a float8 weight without its scale.
    """
    from mosaic_kernels import ops

    if epilogue not in EPILOGUES:
        raise ValueError(f"gemm: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if scale is not None:  # fp8_gemm reads a contiguous x (F.linear reads a strided view, such as an
        # attention output of one stream, as it is: no copy on that path)
        return ops.fp8_gemm(x.contiguous(), weight, scale, bias, epilogue=epilogue, mode=mode, gate=gate, res=res,
                            gate_weight=gate_weight, gate_weight_scale=gate_scale, gate_bias=gate_bias)
    if weight.dtype == torch.float8_e4m3fn:
        raise ValueError("gemm: a float8_e4m3fn weight needs its per-row scale (see mosaicdiff.quantize)")
    if epilogue == "gelu_tanh":
        return ops.linear_gelu(x, weight, bias)
    if epilogue == "gated_residual":
        return ops.linear_gated_residual(x, weight, bias, gate, res)
    if epilogue == "residual":
        return ops.linear_residual(x, weight, bias, res)
    if epilogue == "geglu":
        if gate_weight is None:
            return ops.linear_geglu(x, weight, bias)
        return ops.linear_geglu(x, weight, bias, gate_weight, gate_bias)
    return F.linear(x, weight, bias)


class FP8GemmMixin:
    """What `mosaicdiff.quantize` needs of a compact block, and the block's `gemm` (put it before
    ``nn.Module`` in the bases)."""

    #: The GEMM weights `mosaicdiff.quantize` may store as float8 (each gets a ``<name>_scale``).
    fp8_weights: ClassVar[tuple[str, ...]] = ()
    #: The activations of the FP8 GEMMs once the weights are float8 (set by `mosaicdiff.quantize`).
    fp8_mode = "weight_only"

    def weight_scale(self, name: str) -> torch.Tensor | None:
        """The fp32 row scale of the float8 ``<name>_weight`` (``"out1"`` -> ``out1_weight_scale``), or None."""
        return getattr(self, f"{name}_weight_scale", None)

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              scale: torch.Tensor | None = None, epilogue: str = "none", **kw) -> torch.Tensor:
        """`gemm` in this block's `fp8_mode`."""
        return gemm(x, weight, bias, scale, epilogue, mode=self.fp8_mode, **kw)

    def _own_operands(self, name: str) -> GemmOperands:
        return GemmOperands(getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"), self.weight_scale(name))

    def operands(self, name: str) -> tuple[GemmOperands, ...]:
        """The operands of GEMM ``name`` (``"qkv"`` -> ``qkv_weight``, ``qkv_bias``, `weight_scale`), one
        `GemmOperands` per row block: one here; a shared-producer view reads its producers' from the
        storage (`SharedProducerRowsMixin`), a GEGLU's value and gate rows as two blocks."""
        return (self._own_operands(name),)

    def producer_gemm(self, name: str, x: torch.Tensor, epilogue: str = "none") -> torch.Tensor:
        """`gemm` of GEMM ``name`` on ``x`` with its `operands` (two row blocks, a GEGLU's value and
        gate rows, as one ``"geglu"`` call)."""
        main, *gate = self.operands(name)
        if gate:
            (g,) = gate
            return self._gemm(x, *main, epilogue, gate_weight=g.weight, gate_bias=g.bias, gate_scale=g.scale)
        return self._gemm(x, *main, epilogue)

    def own_gemm(self, name: str, x: torch.Tensor, epilogue: str = "none", **kw) -> torch.Tensor:
        """`gemm` of the block's own ``<name>_weight`` and ``<name>_bias`` (a consumer such as ``"out1"``)."""
        return self._gemm(x, *self._own_operands(name), epilogue, **kw)


class SharedProducerRowsMixin:
    """Makes a compact block a stage view of shared producers: put it before the block class in the
    bases. The block holds its position's storage as ``_producers`` (a module with ``<name>_weight``,
    ``<name>_bias`` and, after `mosaicdiff.quantize`, ``<name>_weight_scale`` per producer) and says
    which storage rows are this stage's with `_producer_rows`; weight, bias and scale are cut with
    the same slices (views, no copy)."""

    _producers: torch.nn.Module

    def _producer_rows(self, name: str) -> list[slice]:
        """This stage's rows of the stored producer ``name``, one slice per row block."""
        raise NotImplementedError

    def operands(self, name: str) -> tuple[GemmOperands, ...]:
        """`FP8GemmMixin.operands`: a stored producer's cut to this stage's rows of the storage, any
        other GEMM's (a consumer's) the block's own."""
        p = self._producers
        if not hasattr(p, f"{name}_weight"):
            return super().operands(name)
        weight, bias = getattr(p, f"{name}_weight"), getattr(p, f"{name}_bias")
        scale = getattr(p, f"{name}_weight_scale", None)
        return tuple(GemmOperands(weight[r], bias[r], None if scale is None else scale[r])
                     for r in self._producer_rows(name))
