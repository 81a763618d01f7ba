"""Launch settings of the Triton kernels: a function of D and dtype for the row kernels, a short
``triton.autotune`` list for the GEMM kernel. No shipped tables: a table belongs here only once
it was tuned on a real card (with card, date and commit).

Row kernels (Liger-Kernel's ``calculate_settings`` shape): :func:`row_settings` derives the
column chunks, rows per program and warps from the row width D alone. A row of width D is held
as a power-of-two main chunk plus a power-of-two tail (:func:`row_blocks`: D = 1152 -> 1024 +
128, no masked lane, where one ``next_power_of_2(D)`` block would leave 44% of the lanes masked).

GEMM (:data:`GEMM_CONFIGS`): autotuned by Triton at the first call of each shape bucket (a
bucketed M, N, K, the epilogue and the dtypes), timings cached on disk (``cache_results``).
Under ``TRITON_INTERPRET=1`` there is a single config: the interpreter cannot benchmark.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import triton

from ._common import INTERPRETED

__all__ = [
    "FP8_GEMM_CONFIGS",
    "GEMM_CONFIGS",
    "MAX_FUSED_D",
    "NORM_OPS",
    "ROW_OPS",
    "column_tiles",
    "fit_row_config",
    "gemm_candidate_configs",
    "gemm_m_bucket",
    "lane_utilization",
    "prune_gemm_configs",
    "row_blocks",
    "row_settings",
    "rows_aligned",
]

#: Row ops that hold whole rows (a LayerNorm needs the row's statistics).
NORM_OPS = ("ln_modulate", "gated_residual_ln_modulate", "layer_norm", "residual_layer_norm",
            "ln_modulate_table", "gated_residual_ln_modulate_table", "rms_norm_rope")
#: Every row op: the norms and the elementwise gated residual (2-D tiles).
ROW_OPS = ("gated_residual", *NORM_OPS)
#: Widest row a single-pass row kernel holds in registers (as Liger-Kernel's limit).
MAX_FUSED_D = 65536
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Interpreter programs cost a fixed several ms each (measured on a loaded 2-core machine:
# (8, 64, 1152) ln_modulate took 8.9 s at 1 row per program, 0.47 s at 128), so there a program
# takes up to 2**17 elements, at most 256 rows.
_INTERPRETER_ELEMS = 1 << 17
_INTERPRETER_MAX_ROWS = 256


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _prev_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n).bit_length() - 1)


def _is_power_of_2(n: Any) -> bool:
    try:
        n = operator.index(n)
    except TypeError:
        return False
    return n >= 1 and n & (n - 1) == 0


def row_blocks(D: int) -> tuple[int, int]:
    """Column chunks of the norm row kernels: ``(BLOCK_D, TAIL_D)``, powers of two (TAIL_D may be 0).

    ``BLOCK_D`` is the largest power of two <= D, ``TAIL_D`` the next power of two >= ``D -
    BLOCK_D`` (0 when D is a power of two). D = 1152 -> (1024, 128), no masked lane; 2301 ->
    (2048, 256); 72 -> (64, 8); 4096 -> (4096, 0). Only the tail has masked lanes, and the two
    chunks never hold more lanes than ``next_power_of_2(D)``.

    Raises:
        ValueError: for D < 1.
    """
    D = int(D)
    if D < 1:
        raise ValueError(f"row_blocks: D must be >= 1, got {D}")
    block_d = _prev_power_of_2(D)
    rem = D - block_d
    return block_d, (_next_power_of_2(rem) if rem else 0)


def column_tiles(D: int, block_d: int) -> tuple[int, int, int]:
    """Column tiles of the elementwise ``gated_residual`` kernel: ``(BLOCK_D, n_full, TAIL_D)``.

    ``block_d`` (a power of two) is clamped to the largest power of two <= D. A row is ``n_full =
    D // BLOCK_D`` unmasked tiles plus, when BLOCK_D does not divide D, a tail chunk of the next
    power of two >= ``D % BLOCK_D`` columns, done by the program of the last full tile (so no
    program is mostly masked). D = 1152: (1024, 1, 128) or (256, 4, 128), no masked lane.

    Raises:
        ValueError: for D < 1 or a ``block_d`` that is not a power of two.
    """
    D = int(D)
    if D < 1:
        raise ValueError(f"column_tiles: D must be >= 1, got {D}")
    if not _is_power_of_2(block_d):
        raise ValueError(f"column_tiles: BLOCK_D must be a power of two, got {block_d!r}")
    block_d = min(block_d, _prev_power_of_2(D))
    n_full, rem = divmod(D, block_d)
    return block_d, n_full, (_next_power_of_2(rem) if rem else 0)


def _check_row_op(op: str, D: int, dtype: torch.dtype | None = None) -> None:
    if op not in ROW_OPS:
        raise ValueError(f"unknown row op {op!r}, expected one of {ROW_OPS}")
    if dtype is not None and dtype not in _DTYPES:
        raise TypeError(f"{op}: unsupported dtype {dtype}, expected one of {list(_DTYPES)}")
    if int(D) < 1:
        raise ValueError(f"{op}: D must be >= 1, got {D}")
    if int(D) > MAX_FUSED_D:
        raise NotImplementedError(f"{op}: D={D} exceeds the single-pass row limit {MAX_FUSED_D}")


def _num_warps(elems: int) -> int:
    """Warps for a program holding ``elems`` fp32 values (Liger's calculate_settings thresholds)."""
    if elems >= 32768:
        return 32
    if elems >= 8192:
        return 16
    if elems >= 2048:
        return 8
    return 4


def row_settings(op: str, D: int, dtype: torch.dtype) -> dict[str, int]:
    """Launch settings of a row kernel from the row width D (and the dtype, validated).

    The kernels load any dtype and compute in fp32, so the register footprint (what the
    settings size) is that of fp32 values whatever ``dtype`` is.

    Returns:
        ``{"BLOCK_M", "BLOCK_D", "TAIL_D", "num_warps"}``. Norm ops: whole rows as
        :func:`row_blocks`, ``BLOCK_M`` rows of ~2048 values per program (at most 16),
        warps by the program's size. ``gated_residual``: 2-D tiles of ~4096 elements, at most
        1024 columns plus a tail (:func:`column_tiles`), 4 warps. Under the interpreter: as
        many rows as fit 2**17 elements (at most 256) and whole rows.

    Raises:
        ValueError: for an unknown op or D < 1. TypeError: for an unsupported dtype.
        NotImplementedError: for D above :data:`MAX_FUSED_D`.
    """
    _check_row_op(op, D, dtype)
    D = int(D)
    if op == "gated_residual":
        block_d, _, tail_d = column_tiles(D, MAX_FUSED_D if INTERPRETED else 1024)
    else:
        block_d, tail_d = row_blocks(D)
    lanes = block_d + tail_d
    if INTERPRETED:
        block_m = min(_INTERPRETER_MAX_ROWS, _prev_power_of_2(_INTERPRETER_ELEMS // lanes))
        return {"BLOCK_M": block_m, "BLOCK_D": block_d, "TAIL_D": tail_d, "num_warps": 4}
    if op == "gated_residual":
        return {"BLOCK_M": max(1, 4096 // block_d), "BLOCK_D": block_d, "TAIL_D": tail_d, "num_warps": 4}
    block_m = _prev_power_of_2(max(1, min(16, 2048 // lanes)))
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "TAIL_D": tail_d, "num_warps": _num_warps(block_m * lanes)}


def fit_row_config(op: str, D: int, config: dict[str, Any]) -> dict[str, int]:
    """A pinned row config (tests, compile checks) completed and fitted to D, as the kernel runs it.

    Norm ops hold whole rows: ``BLOCK_D``/``TAIL_D`` come from :func:`row_blocks` (whatever
    ``config`` says). ``gated_residual``: ``BLOCK_D`` (default :func:`row_settings`') is clamped
    by :func:`column_tiles` and ``TAIL_D`` set to match. ``num_warps`` defaults to 4.

    Raises:
        ValueError: for a ``BLOCK_M`` (or gated_residual ``BLOCK_D``) that is not a power of two,
            or a gated_residual ``BLOCK_D`` so narrow that the column tiles exceed CUDA's 65535.
    """
    _check_row_op(op, D)
    out = dict(config)
    if not _is_power_of_2(out.get("BLOCK_M")):
        raise ValueError(f"{op}: BLOCK_M must be a power of two, got {out.get('BLOCK_M')!r}")
    if op in NORM_OPS:
        out["BLOCK_D"], out["TAIL_D"] = row_blocks(D)
    else:
        width = out.get("BLOCK_D") or row_settings(op, D, torch.float32)["BLOCK_D"]
        out["BLOCK_D"], n_full, out["TAIL_D"] = column_tiles(D, width)
        if n_full > 65535:  # CUDA's limit on grid axis 1 (the column tiles)
            raise ValueError(f"{op}: BLOCK_D={width} gives {n_full} column tiles for D={D}, over 65535")
    out.setdefault("num_warps", 4)
    return out


def lane_utilization(op: str, D: int, config: dict[str, Any] | None = None) -> float:
    """Fraction of a row kernel's column lanes that hold one of the row's D values (1.0: none masked).

    Norm ops: ``D / (BLOCK_D + TAIL_D)``; ``gated_residual``: ``D / (n_full * BLOCK_D + TAIL_D)`` for
    ``config``'s ``BLOCK_D`` (default :func:`row_settings`'). D = 1152 gives 1.0.
    """
    cfg = fit_row_config(op, D, {"BLOCK_M": 1, **(config or {})})
    n_full = D // cfg["BLOCK_D"] if op == "gated_residual" else 1
    return D / (n_full * cfg["BLOCK_D"] + cfg["TAIL_D"])


# ---------------------------------------------------------------------------------------------
# GEMM: the short autotune list of the one GEMM kernel (mosaic_kernels.triton._matmul)
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): Triton matmul tutorial tiles for
# sm_80/sm_90, all compile-checked for both (benchmarks/compile_check.py); GROUP_M = 8.
_GEMM_TILES = ((128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4),
               (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 64, 4, 4))
# Float8 weights (mosaic_kernels.ops.fp8): the fp8 tiles of Triton's matmul tutorial (BLOCK_K = 128;
# compile-checked for sm_90a, benchmarks/compile_check.py). Not measured on a card yet.
_FP8_TILES = ((128, 256, 128, 8, 3), (128, 128, 128, 8, 3), (128, 128, 128, 4, 4), (64, 128, 128, 4, 4),
              (128, 64, 128, 4, 4), (64, 64, 128, 4, 4))
# The interpreter's single config: 64-wide tiles keep the program count (its cost) low.
_INTERPRETER_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
# Operand buffers must fit the smaller opt-in shared memory of the supported cards (A100: 163 KB).
_SMEM_BUDGET = 166912
# The epilogue "geglu" keeps two accumulators (value and gate columns).
_ACCUMULATORS = {"none": 1, "gelu_tanh": 1, "gated_residual": 1, "residual": 1, "geglu": 2}
# Above 128 fp32 accumulator values per thread the kernel spills (255 registers per thread).
_MAX_ACC_PER_THREAD = 128
# Rows whose stride is not a multiple of 16 elements (Triton's divisibility specialization; e.g.
# K = 936, a 13-head proj) are not loaded by async copies: every stage's operand tiles pass through
# registers (32-bit words per thread) beside the accumulator. At 255 registers, sm_90a ptxas spilled
# (452-3042 B, linear_gated_residual at K = 936) every tile where accumulator + stage words reached
# 256, and none at 160; tiles above this budget are left out for such rows.
_MAX_UNALIGNED_REGS = 192


def _gemm_dicts(fp8: bool = False) -> list[dict[str, int]]:
    if INTERPRETED:
        return [dict(_INTERPRETER_TILE)]
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}
            for bm, bn, bk, w, s in (_FP8_TILES if fp8 else _GEMM_TILES)]


def _to_config(cfg: dict[str, int]) -> triton.Config:
    meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    return triton.Config(meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


#: The autotune list of the GEMM kernel (one config under the interpreter).
GEMM_CONFIGS: list[triton.Config] = [_to_config(c) for c in _gemm_dicts()]
#: The autotune list of the GEMM kernel with float8 weights (one config under the interpreter).
FP8_GEMM_CONFIGS: list[triton.Config] = [_to_config(c) for c in _gemm_dicts(fp8=True)]


def _fits(cfg: dict[str, int], element_size: int, epilogue: str, weight_size: int | None = None,
          aligned: bool = True) -> bool:
    n_acc = _ACCUMULATORS[epilogue]
    weight_size = element_size if weight_size is None else weight_size  # float8 weights: 1 byte
    smem = cfg["num_stages"] * (cfg["BLOCK_M"] * element_size + n_acc * cfg["BLOCK_N"] * weight_size) * cfg["BLOCK_K"]
    threads = 32 * cfg["num_warps"]
    acc_per_thread = n_acc * cfg["BLOCK_M"] * cfg["BLOCK_N"] // threads
    if not aligned and acc_per_thread + smem // (4 * threads) > _MAX_UNALIGNED_REGS:
        return False
    return smem <= _SMEM_BUDGET and acc_per_thread <= _MAX_ACC_PER_THREAD


def rows_aligned(*row_strides: int) -> bool:
    """Whether every operand row stride (elements) is a multiple of 16: Triton's alignment
    specialization, which lets the loads be async copies (see ``_MAX_UNALIGNED_REGS``)."""
    return all(int(s) % 16 == 0 for s in row_strides)


def gemm_candidate_configs(dtype: torch.dtype, epilogue: str = "gelu_tanh",
                           weight_dtype: torch.dtype | None = None, aligned: bool = True) -> list[dict[str, int]]:
    """The configs autotune benchmarks for operands of ``dtype`` and an epilogue, as dicts.

    ``weight_dtype=torch.float8_e4m3fn`` (weights of ``mosaic_kernels.ops.fp8``; ``dtype`` is then
    the activations', float8 too when quantized per token) takes :data:`FP8_GEMM_CONFIGS` instead.

    :data:`GEMM_CONFIGS` less those whose operand buffers exceed 163 KB of shared memory (fp32
    keeps the BLOCK_K = 32 and 64x64 tiles) or whose accumulators exceed 128 fp32 values per
    thread (``geglu`` keeps two); with ``aligned=False`` (an operand row stride that is not a
    multiple of 16 elements, :func:`rows_aligned`) also those whose accumulator plus stage
    buffers exceed 192 registers per thread (they spill). A dict passed as ``config=`` runs the
    pointer kernel; add ``"tma": True`` for the tensor-descriptor variant.
    """
    if epilogue not in _ACCUMULATORS:
        raise ValueError(f"unknown GEMM epilogue {epilogue!r}, expected one of {tuple(_ACCUMULATORS)}")
    element_size = torch.empty((), dtype=dtype).element_size()
    fp8 = weight_dtype == torch.float8_e4m3fn
    weight_size = 1 if fp8 else element_size
    fitting = [c for c in _gemm_dicts(fp8) if _fits(c, element_size, epilogue, weight_size, aligned)]
    return fitting or _gemm_dicts(fp8)[-1:]


def prune_gemm_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """``early_config_prune`` of the GEMM autotuner: :func:`gemm_candidate_configs`' rule on the
    launch's operand dtypes, epilogue and row alignment."""
    element_size, weight_size = named_args["x"].element_size(), named_args["w"].element_size()
    epilogue = kwargs["EPILOGUE"]
    aligned = rows_aligned(named_args["stride_xm"], named_args["stride_wn"], named_args["stride_wgn"])
    fitting = [c for c in configs if _fits({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages},
                                           element_size, epilogue, weight_size, aligned)]
    return fitting or configs[-1:]


def gemm_m_bucket(M: int) -> int:
    """The M part of the GEMM autotune key: the next power of two (capped at 2**20), so a stage's
    batch sizes share a tuning instead of retuning for every M."""
    return min(_next_power_of_2(M), 1 << 20)
