"""Triton kernels of mosaic_kernels, one module per fused op (kernel + launcher).

Importing this package imports Triton. Set ``TRITON_INTERPRET=1`` *before* the first import to
run the kernels on CPU tensors (tests); :data:`INTERPRETED` records which mode the kernels were
built in. :mod:`mosaic_kernels.ops` imports this package lazily, on the first op call.
"""

from __future__ import annotations

from ._common import INTERPRETED
from .fp8_gemm import fp8_gemm_triton
from .gated_residual import gated_residual_triton
from .gated_residual_ln_modulate import gated_residual_ln_modulate_triton
from .gated_residual_ln_modulate_table import gated_residual_ln_modulate_table_triton
from .layer_norm import layer_norm_triton
from .linear_geglu import linear_geglu_triton
from .linear_gated_residual import linear_gated_residual_triton
from .linear_gelu import linear_gelu_triton
from .linear_residual import linear_residual_triton
from .ln_modulate import ln_modulate_triton
from .ln_modulate_table import ln_modulate_table_triton
from .quantize_rows import quantize_rows_fp8_triton
from .residual_layer_norm import residual_layer_norm_triton
from .rms_norm_rope import rms_norm_rope_triton

__all__ = [
    "INTERPRETED",
    "fp8_gemm_triton",
    "gated_residual_ln_modulate_table_triton",
    "gated_residual_ln_modulate_triton",
    "gated_residual_triton",
    "layer_norm_triton",
    "linear_geglu_triton",
    "linear_gated_residual_triton",
    "linear_gelu_triton",
    "linear_residual_triton",
    "ln_modulate_table_triton",
    "ln_modulate_triton",
    "quantize_rows_fp8_triton",
    "residual_layer_norm_triton",
    "rms_norm_rope_triton",
]

