"""Public kernel ops and their backend dispatch (differentiable). One module per op.

Every op except ``attention`` is a ``torch.library`` custom op ``mosaic::<op>`` with one fake
(``register_fake``, computed from shapes alone), so ``torch.compile(fullgraph=True)`` traces
through it without a graph break. The public function validates its inputs once (clear
``ValueError`` / ``TypeError``), then calls ``torch.ops.mosaic.<op>``, whose body picks a
backend per call (:mod:`._dispatch`: compiled CUDA -> Triton -> torch reference, pins with
``MOSAIC_KERNELS_BACKEND`` or :func:`use_backend`).

Everything about an op is in ``mosaic_kernels/ops/<op>.py``: the custom op, its fake, its
validation, the public function and its benchmark case (``register(BenchCase(...))``, found by
the benchmarks in :data:`BENCH_CASES`). The import lines below are the registration: adding an
op is its own files plus one line here (docs/adding_an_op.md). Note that
``mosaic_kernels.ops.<op>`` is the function; reach the module's internals with
``from mosaic_kernels.ops.<op> import ...``.

Every op is differentiable. No op has a backward kernel: each custom op registers (with
``torch.library.register_autograd``, one line after its fake) the backward of its reference,
recomputed in fp32 and differentiated by torch (:mod:`._autograd`), whichever backend ran the
forward; ``attention`` is plain torch around SDPA and uses SDPA's backward. Gradients reach every
floating tensor input that requires grad (activations, weights, biases, modulation vectors) in its
own dtype; double backward is not supported. ``torch.compile(fullgraph=True)`` traces the backward
too.
"""

from __future__ import annotations

from ._dispatch import BACKEND_ENV, backends, current_backend, record_dispatch, select_backend, use_backend
from ..op_registry import CASES as BENCH_CASES

# The ops, one registration line each.
from .ln_modulate import ln_modulate
from .gated_residual import gated_residual
from .gated_residual_ln_modulate import gated_residual_ln_modulate
from .linear_gelu import linear_gelu
from .linear_gated_residual import linear_gated_residual
from .attention import attention
from .layer_norm import layer_norm
from .linear_geglu import linear_geglu
from .residual_layer_norm import residual_layer_norm
from .linear_residual import linear_residual
from .ln_modulate_table import ln_modulate_table
from .gated_residual_ln_modulate_table import gated_residual_ln_modulate_table
from .rms_norm_rope import rms_norm_rope

# Float8 weights: one op for every GEMM epilogue (not a BenchCase: it has no sm_80 kernel to compile).
from .fp8 import fp8_gemm, quantize_fp8_weight, quantize_rows_fp8

#: The public names: the backend controls, then every registered op, then the float8 GEMM.
__all__ = ["BACKEND_ENV", "backends", "current_backend", "record_dispatch", "select_backend", "use_backend",
           *BENCH_CASES, "fp8_gemm", "quantize_fp8_weight", "quantize_rows_fp8"]
