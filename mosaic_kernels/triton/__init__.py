"""Triton kernels of mosaic_kernels, one module per fused op (kernel + launcher).

Importing this package imports Triton. Set ``TRITON_INTERPRET=1`` *before* the first import to
run the kernels on CPU tensors (tests); :data:`INTERPRETED` records which mode the kernels were
built in. :mod:`mosaic_kernels.ops` imports this package lazily, on the first op call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._common import INTERPRETED
from .gated_residual import gated_residual_triton
from .gated_residual_ln_modulate import gated_residual_ln_modulate_triton
from .linear_gated_residual import linear_gated_residual_triton
from .linear_gelu import linear_gelu_triton
from .ln_modulate import ln_modulate_triton

__all__ = [
    "INTERPRETED",
    "gated_residual_ln_modulate_triton",
    "gated_residual_triton",
    "linear_gated_residual_triton",
    "linear_gelu_triton",
    "ln_modulate_triton",
    "make_bench_fn",
]


def _random_inputs(op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)

    if op in ("ln_modulate", "gated_residual", "gated_residual_ln_modulate"):
        B, L, D = shape if len(shape) == 3 else (1, *shape)
        return {"x": rnd(B, L, D), "y": rnd(B, L, D), "v1": rnd(B, D), "v2": rnd(B, D), "v3": rnd(B, D)}
    if op == "attention":
        B, L, H, hd = shape
        return {"qkv": rnd(B, L, 3 * H * hd)}
    M, N, K = shape
    return {"x": rnd(M, K), "w": rnd(N, K) * K ** -0.5, "bias": rnd(N), "gate": rnd(1, N), "res": rnd(1, M, N)}


def make_bench_fn(
    op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str
) -> Callable[[dict[str, Any]], float]:
    """A ``config -> median milliseconds`` benchmark on random inputs (CUDA only).

    GEMM configs with ``"backend": "vendor"`` time the vendor path (cuBLAS(Lt) through torch),
    so :func:`mosaic_kernels.configs.autotune` also decides vendor vs Triton per shape.
    """
    import triton.testing

    device = torch.device(device)
    if device.type != "cuda" or INTERPRETED:
        raise RuntimeError(f"make_bench_fn needs CUDA tensors without the interpreter, got {device}")
    t = _random_inputs(op, shape, dtype, device)

    def run_for(cfg: dict[str, Any]) -> Callable[[], Any]:
        if op == "attention":  # the SDPA kernel choice: no Triton kernel involved
            from ..ops import attention

            return lambda: attention(t["qkv"], int(shape[2]), backend=cfg["sdpa_backend"])
        if op == "ln_modulate":
            return lambda: ln_modulate_triton(t["x"], t["v1"], t["v2"], 1e-6, config=cfg)
        if op == "gated_residual":
            return lambda: gated_residual_triton(t["x"], t["v1"], t["y"], config=cfg)
        if op == "gated_residual_ln_modulate":
            return lambda: gated_residual_ln_modulate_triton(
                t["x"], t["v1"], t["y"], t["v2"], t["v3"], 1e-6, config=cfg)
        vendor = cfg.get("backend", "triton") == "vendor"
        if op == "linear_gelu":
            if vendor:
                return lambda: torch._addmm_activation(t["bias"], t["x"], t["w"].t(), use_gelu=True)
            return lambda: linear_gelu_triton(t["x"], t["w"], t["bias"], config=cfg)
        x3 = t["x"].unsqueeze(0)
        if vendor:
            def vendor_fn() -> torch.Tensor:
                y = torch.addmm(t["bias"], t["x"], t["w"].t()).unsqueeze(0)
                return gated_residual_triton(t["res"], t["gate"], y)
            return vendor_fn
        return lambda: linear_gated_residual_triton(x3, t["w"], t["bias"], t["gate"], t["res"], config=cfg)

    def bench(cfg: dict[str, Any]) -> float:
        return float(triton.testing.do_bench(run_for(cfg), quantiles=None, return_mode="median"))

    return bench
