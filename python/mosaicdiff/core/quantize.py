"""`quantize`: store a mosaic's compact GEMM weights as float8 and run them through the FP8 GEMMs.

A compact block (or a shared producer storage) names its GEMM weights in a class attribute
``fp8_weights`` (the DiT family's ``CompactDiTBlock``: ``qkv_weight``, ``proj_weight``,
``fc1_weight``, ``fc2_weight``); `quantize` replaces each by its ``float8_e4m3fn`` rows and adds
the per-output-channel fp32 scale beside it as ``<name>_scale`` (both frozen parameters, so
``memory_report``, ``.to(device)`` and the state dict see them). The blocks' forwards then call
``mosaic_kernels.fp8_gemm`` with the same fused epilogues (bias, tanh-GELU, gated residual).
This module knows no family: a family opts in by declaring ``fp8_weights`` (and reading the
scales in its forward). Families that do not yet: U-Net, PixArt, SD3, Flux (refused clearly).

Why not torchao's ``quantize_``: it swaps the ``weight`` of ``nn.Linear`` modules for a tensor
subclass, and a mosaic's compact GEMM weights are parameters of the blocks, not ``nn.Linear``
modules (they are sliced per stage, shared between stages, and consumed by fused custom ops), so
``quantize_`` only reaches the skeleton's few ``nn.Linear`` (final layer, embedder); see
docs/results.md ("FP8 compact GEMMs").
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mosaicdiff.core.stages import frozen

logger = logging.getLogger(__name__)

__all__ = ["QUANTIZE_MODES", "quantize", "quantized_modules"]

#: What `quantize` can store.
QUANTIZE_MODES = ("fp8",)
#: How the FP8 GEMMs treat activations (``mosaic_kernels.ops.fp8``).
FP8_ACTIVATIONS = ("weight_only", "per_token")


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule that declares ``fp8_weights`` (non-empty)."""
    return [(name, m) for name, m in model.named_modules() if getattr(type(m), "fp8_weights", ())]


def quantize(model: nn.Module, mode: str = "fp8", *, activations: str = "weight_only") -> nn.Module:
    r"""Store the compact GEMM weights of ``model`` as float8 with per-output-channel scales, in place.

    Every module declaring ``fp8_weights`` (a mosaic's compact blocks and shared producer
    storages; the engine's dense model of a family, ``from_dense_unpruned``, is made of the same
    blocks) gets each named (N, K) weight replaced by ``float8_e4m3fn`` rows and an fp32 (N,)
    scale ``<name>_scale`` (``mosaic_kernels.quantize_fp8_weight``); tensors shared by several
    blocks are quantized once and stay shared. Its forward then runs the FP8 GEMMs: half the
    weight bytes of bf16 (``memory_report``). Run it after ``.to(dtype)``: a later cast of the
    model would convert the float8 weights too. Idempotent (float8 weights are left as they are).

    Args:
        model (`nn.Module`): a mosaic (e.g. `MosaicDiT`) or any module holding compact blocks.
        mode (`str`, *optional*, defaults to ``"fp8"``): the storage; only ``"fp8"``.
        activations (`str`, *optional*, defaults to ``"weight_only"``): ``"weight_only"``
            (activations stay in the model's dtype; each weight tile is converted in the kernel)
            or ``"per_token"`` (activations quantized per token to float8 at run time).

    Returns:
        `nn.Module`: ``model`` itself.

    Raises:
        ValueError: for an unknown ``mode`` or ``activations``.
        NotImplementedError: when no submodule declares FP8 GEMM weights (a family not supported yet).

    Examples:
        >>> import mosaicdiff
        >>> from mosaicdiff.zoo import load_digits_dit
        >>> mosaic = mosaicdiff.MosaicDiT.from_dense_unpruned(load_digits_dit())
        >>> before = mosaic.memory_report()["mosaic_bytes"]
        >>> _ = mosaicdiff.quantize(mosaic, "fp8")
        >>> mosaic.memory_report()["mosaic_bytes"] < before
        True
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize: mode must be one of {QUANTIZE_MODES}, got {mode!r}")
    if activations not in FP8_ACTIVATIONS:
        raise ValueError(f"quantize: activations must be one of {FP8_ACTIVATIONS}, got {activations!r}")
    targets = quantized_modules(model)
    if not targets:
        raise NotImplementedError(
            f"quantize: {type(model).__name__} has no compact blocks with FP8 GEMM weights (fp8_weights); "
            f"supported: the DiT family (MosaicDiT)")
    from mosaic_kernels import quantize_fp8_weight

    done: dict[tuple, tuple[nn.Parameter, nn.Parameter]] = {}
    count = 0
    for name, module in targets:
        for attr in type(module).fp8_weights:
            w = getattr(module, attr)
            if w.dtype == torch.float8_e4m3fn or w.numel() == 0:
                continue
            key = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))
            if key not in done:
                q, scale = quantize_fp8_weight(w)
                done[key] = (frozen(q), frozen(scale))
                count += 1
            q, scale = done[key]
            setattr(module, attr, q)
            setattr(module, f"{attr}_scale", scale)
        if hasattr(module, "fp8_mode"):
            module.fp8_mode = activations
    logger.debug("quantize: %d weights of %d modules to float8 (%s activations)", count, len(targets), activations)
    return model
