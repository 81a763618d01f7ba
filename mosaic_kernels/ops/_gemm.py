"""What the GEMM ops share: their per-shape choice and the parts of their benchmark cases.

A GEMM op's canonical shape is ``(M, N, K)``: ``x`` is (M, K) rows, ``weight`` is (N, K).
"""

from __future__ import annotations

import torch.nn.functional as F

from typing import Any

from . import _dispatch
from ..op_registry import Choice, TritonCase, gemm_bucket, random_maker

#: vendor (cuBLAS(Lt) through torch, the default: a plain tiled Triton GEMM loses to it on H100)
#: or the Triton GEMM with the epilogue fused, measured per shape.
GEMM_CHOICE = Choice(field="backend", options={"vendor": "vendor", "triton": "triton"}, default="vendor",
                     bucket=gemm_bucket)

#: DiT-XL/2 widths: hidden 1152; the MLP widths a mosaic really runs (fc1 N, fc2 K): dense, then
#: the stages' kept widths at mean sparsity 0.3 (3776 / 2752) and 0.5 (2816 / 1856); the attention
#: proj K = kept heads * 72 (16, 13, 10, 6 heads).
DIT_WIDTH = 1152
DIT_MLP_WIDTHS = (4608, 3776, 2816, 2752, 1856)
DIT_PROJ_WIDTHS = (1152, 936, 720, 432)


def gemm_flops(shape) -> int:
    M, N, K = shape
    return 2 * M * N * K


def gemm_providers(public) -> dict:
    """The plain GEMM of the same shape (no epilogue: the bar an epilogue must stay within 5%
    of), and the op on each of its GEMM paths."""
    return {"cublas_linear": lambda x, w, b, *rest: F.linear(x, w, b),
            "vendor": _dispatch.on_gemm_path(public, "vendor"),
            "triton": _dispatch.on_gemm_path(public, "triton")}


def gemm_triton_case(epilogue: str, launch) -> TritonCase:
    """A GEMM op's :class:`TritonCase`: every autotune config for its epilogue, pointer and TMA."""

    def configs(shape, dtype) -> list[tuple[str, dict[str, Any]]]:
        from ..triton.settings import gemm_candidate_configs, rows_aligned

        aligned = rows_aligned(shape[2])  # x and weight rows are K apart in the cases
        return [(f"gemm_configs[{i}]{'+tma' if tma else ''}", {**cfg, "tma": tma})
                for i, cfg in enumerate(gemm_candidate_configs(dtype, epilogue, aligned=aligned))
                for tma in (False, True)]

    return TritonCase(family="gemm", configs=configs, launch=launch)


def gemm_bias_inputs(shape, dtype, device, generator):
    """``(x, weight, bias)`` of a ``y = epilogue(x @ weight^T + bias)`` op at ``(M, N, K)``."""
    M, N, K = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(1, M, K), rnd(N, K, scale=K**-0.5), rnd(N, scale=0.1)


def gemm_bias_launch(launcher: str):
    """A :class:`TritonCase` launch that calls the Triton launcher named ``launcher`` on
    ``(x, weight, bias)`` buffers from ``alloc``."""

    def launch(shape, dtype, config, alloc):
        M, N, K = shape
        getattr(_dispatch.triton_package()[0], launcher)(alloc(M, K), alloc(N, K), alloc(N), config=config)

    return launch
