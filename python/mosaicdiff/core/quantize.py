"""`quantize`: store a mosaic's compact GEMM weights as float8 and run them through the FP8 GEMMs.

A compact block (or a shared producer storage) names its GEMM weights in a class attribute
``fp8_weights`` (the DiT family's ``CompactDiTBlock``: ``qkv_weight``, ``proj_weight``,
``fc1_weight``, ``fc2_weight``); `quantize` replaces each by its ``float8_e4m3fn`` rows and adds
the per-output-channel fp32 scale beside it as ``<name>_scale`` (both frozen parameters, so
``memory_report``, ``.to(device)`` and the state dict see them). The blocks' forwards then call
``mosaic_kernels.fp8_gemm`` with the same fused epilogues (bias, tanh-GELU, gated residual).
This module knows no family: a family opts in by declaring ``fp8_weights`` on its compact blocks
and producer storages and running their GEMMs through `mosaicdiff.core.gemm` (every registered
family does). A quantized mosaic saves and loads as such (``_quantization`` in its config, read by
`quantize_layout`), and ``.to(dtype)`` casts everything but the float8 weights and their scales
(`cast_unquantized`).

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

__all__ = ["QUANTIZE_MODES", "cast_unquantized", "quantization_spec", "quantize", "quantize_layout", "quantized_keys",
           "quantized_modules"]

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
        NotImplementedError: when no submodule declares FP8 GEMM weights (not a mosaic).
        RuntimeError: on a model with layerwise casting (``enable_layerwise_casting``): its
            weights are already stored in another dtype.

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
    if model.__dict__.get("_layerwise_casting"):
        raise RuntimeError(f"quantize: {type(model).__name__} has layerwise casting enabled; quantize a model without it "
                           f"(the two store the weights in different ways)")
    targets = quantized_modules(model)
    if not targets:
        raise NotImplementedError(
            f"quantize: {type(model).__name__} has no compact blocks with FP8 GEMM weights (fp8_weights); "
            f"pass a mosaic (or the engine's dense model) of a registered family")
    from mosaic_kernels import quantize_fp8_weight

    done: dict[tuple, tuple[nn.Parameter, nn.Parameter]] = {}
    count = 0
    for name, module in targets:
        for attr in type(module).fp8_weights:
            w = getattr(module, attr, None)  # None: a weight this block's kind lacks
            if w is None or w.dtype == torch.float8_e4m3fn or w.numel() == 0:
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


def _quantized_items(model: nn.Module):
    """``(key, tensor)`` of every float8 weight and its scale, keys as in the state dict."""
    for name, module in quantized_modules(model):
        for attr in type(module).fp8_weights:
            # a float8 weight without a scale is layerwise casting's storage, not quantization
            w, scale = getattr(module, attr, None), getattr(module, f"{attr}_scale", None)
            if w is not None and scale is not None and w.dtype == torch.float8_e4m3fn:
                prefix = f"{name}." if name else ""
                yield f"{prefix}{attr}", w
                yield f"{prefix}{attr}_scale", scale


def quantized_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the float8 weights and their fp32 scales (empty for an unquantized model)."""
    return {key for key, _ in _quantized_items(model)}


def quantization_spec(model: nn.Module) -> dict[str, str] | None:
    """``{"mode": "fp8", "activations": ...}`` of a quantized model (what a saved config records), else None."""
    modes = {m.fp8_mode for _, m in quantized_modules(model) if hasattr(m, "fp8_mode")}
    if not quantized_keys(model):
        return None
    return {"mode": "fp8", "activations": modes.pop() if len(modes) == 1 else "weight_only"}


def quantize_layout(model: nn.Module, spec: dict[str, str]) -> nn.Module:
    """Give ``model`` the tensors of a quantized one without computing them (for loading saved
    weights into it): each ``fp8_weights`` entry an uninitialised float8 tensor of its shape, with an
    fp32 ``<name>_scale``, on the weight's device (the meta device included).

    Raises:
        ValueError: a ``spec`` other than `quantization_spec` writes.
    """
    if not isinstance(spec, dict) or spec.get("mode") not in QUANTIZE_MODES \
            or spec.get("activations") not in FP8_ACTIVATIONS:
        raise ValueError(f"quantize_layout: spec must be {{'mode': one of {QUANTIZE_MODES}, 'activations': one of "
                         f"{FP8_ACTIVATIONS}}}, got {spec!r}")
    done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    for _, module in quantized_modules(model):
        for attr in type(module).fp8_weights:
            w = getattr(module, attr, None)  # None: a weight this block's kind lacks
            if w is None or w.dtype == torch.float8_e4m3fn or w.numel() == 0:
                continue
            if id(w) not in done:  # a tensor held by several modules stays one tensor
                done[id(w)] = (frozen(torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)),
                               frozen(torch.empty(w.shape[0], dtype=torch.float32, device=w.device)))
            q, scale = done[id(w)]
            setattr(module, attr, q)
            setattr(module, f"{attr}_scale", scale)
        if hasattr(module, "fp8_mode"):
            module.fp8_mode = spec["activations"]
    return model


def cast_unquantized(model: nn.Module, device=None, dtype: torch.dtype | None = None,
                     non_blocking: bool = False) -> nn.Module:
    """Move ``model`` to ``device`` and cast its floating tensors to ``dtype``, except the float8
    weights and their fp32 scales (a cast would drop the quantization: float8 values without their
    scales). What a quantized mosaic's ``.to(...)`` does."""
    keep = {id(t) for _, t in _quantized_items(model)}

    def convert(t: torch.Tensor) -> torch.Tensor:
        cast = dtype if t.is_floating_point() and id(t) not in keep else None
        return t.to(device=device, dtype=cast, non_blocking=non_blocking)

    return model._apply(convert)
