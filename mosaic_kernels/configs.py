"""Kernel configurations keyed by (op, shape bucket, dtype, device), and the autotune cache.

Every pruning stage of a model has its own widths, so every stage wants its own kernel
configurations. :func:`get_config` resolves one config per ``(op, shape, dtype, device)``:

1. under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``): one small fixed config;
2. the persistent autotune cache (``$MOSAIC_KERNELS_CACHE``, default
   ``~/.cache/mosaic_kernels/configs.json``), exact key, written by :func:`autotune`;
3. the shipped table for the device family (``mosaic_kernels/configs/<family>.json``): the
   first entry whose ``match`` holds, over
4. the heuristic defaults (named functions below).

For the GEMM ops (``linear_gelu``, ``linear_gated_residual``) a config also says which
implementation runs: ``"backend": "vendor"`` (cuBLAS(Lt) through torch, the default) or
``"triton"`` (the tiled Triton GEMM with the epilogue fused).

Canonical shapes: row ops (``ln_modulate``, ``gated_residual``, ``gated_residual_ln_modulate``)
take ``(B, L, D)`` (or ``(rows, D)``); GEMM ops take ``(M, N, K)`` with ``M`` = rows of ``x``;
``attention`` takes ``(B, L, H, hd)`` and its config names the SDPA kernel (``{"sdpa_backend":
"auto" | "flash" | "efficient" | "cudnn"}``: at DiT's head_dim 72 the winner is measured per
stage, since the stages differ in head count).

Call :func:`select_configs_for_shapes` when a stage is entered to resolve (and optionally
autotune) all of its configs at once, so the per-call lookup is a dict hit.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import operator
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION_OPS",
    "CACHE_ENV",
    "GEMM_OPS",
    "OPS",
    "ROW_OPS",
    "autotune",
    "cache_path",
    "candidate_configs",
    "clear_memo",
    "column_tiles",
    "config_key",
    "default_config",
    "device_name",
    "fit_row_config",
    "get_config",
    "get_attention_config",
    "get_gated_residual_config",
    "get_gated_residual_ln_modulate_config",
    "get_linear_gated_residual_config",
    "get_linear_gelu_config",
    "get_ln_modulate_config",
    "interpreter_config",
    "lane_utilization",
    "row_blocks",
    "select_configs_for_shapes",
    "shape_bucket",
]

CACHE_ENV = "MOSAIC_KERNELS_CACHE"
ROW_OPS = ("ln_modulate", "gated_residual", "gated_residual_ln_modulate")
GEMM_OPS = ("linear_gelu", "linear_gated_residual")
ATTENTION_OPS = ("attention",)
OPS = ROW_OPS + GEMM_OPS + ATTENTION_OPS
#: SDPA kernels an attention config may name ("auto": torch's own choice).
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn")
_NORM_OPS = ("ln_modulate", "gated_residual_ln_modulate")
CACHE_VERSION = 1
# Widest row a single-pass row kernel holds in registers (as Liger-Kernel's limit).
MAX_FUSED_D = 65536
# Device families that share a shipped table (same SM architecture).
_TABLE_FAMILY = {"H100": "h100", "H200": "h100", "GH200": "h100", "H800": "h100", "A100": "a100", "A800": "a100"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

_lock = threading.Lock()
_memo: dict[str, dict[str, Any]] = {}
# Per-call fast path: (op, shape, dtype, device) -> config, skipping key formatting.
_fast: dict[tuple[Any, ...], dict[str, Any]] = {}
_FAST_MAX = 4096
_tables: dict[str, dict[str, Any]] = {}
_cache: dict[str, Any] | None = None
_cache_loaded_from: Path | None = None


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def prev_power_of_2(n: int) -> int:
    """Largest power of two <= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n).bit_length() - 1)


def _is_power_of_2(n: Any) -> bool:
    try:
        n = operator.index(n)
    except TypeError:
        return False
    return n >= 1 and n & (n - 1) == 0


def row_blocks(D: int) -> tuple[int, int]:
    """Column chunks of the norm row kernels: ``(BLOCK_D, TAIL_D)``, powers of two (TAIL_D may be 0).

    A program holds a whole row as a main chunk of ``BLOCK_D`` = the largest power of two <= D
    columns plus a tail chunk of ``TAIL_D`` = the next power of two >= ``D - BLOCK_D`` columns
    (0 when D is a power of two). D = 1152 -> (1024, 128), no masked lane; 2301 -> (2048, 256);
    72 -> (64, 8); 4096 -> (4096, 0). Only the tail has masked lanes, and the two chunks never
    hold more lanes than ``next_power_of_2(D)``.

    Raises:
        ValueError: for D < 1.
    """
    D = int(D)
    if D < 1:
        raise ValueError(f"row_blocks: D must be >= 1, got {D}")
    block_d = prev_power_of_2(D)
    rem = D - block_d
    return block_d, (next_power_of_2(rem) if rem else 0)


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
    block_d = min(block_d, prev_power_of_2(D))
    n_full, rem = divmod(D, block_d)
    return block_d, n_full, (next_power_of_2(rem) if rem else 0)


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}, expected one of {OPS}")


def _row_shape(op: str, shape: Sequence[int]) -> tuple[int, int]:
    """(rows, D) from (B, L, D) or (rows, D)."""
    if len(shape) == 3:
        return int(shape[0]) * int(shape[1]), int(shape[2])
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    raise ValueError(f"{op}: shape must be (B, L, D) or (rows, D), got {tuple(shape)}")


def _attention_shape(op: str, shape: Sequence[int]) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"{op}: shape must be (B, L, H, hd), got {tuple(shape)}")
    B, L, H, hd = (int(s) for s in shape)
    return B, L, H, hd


def _gemm_shape(op: str, shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"{op}: shape must be (M, N, K), got {tuple(shape)}")
    M, N, K = (int(s) for s in shape)
    return M, N, K


def dtype_name(dtype: torch.dtype) -> str:
    """``"fp32"``, ``"fp16"`` or ``"bf16"``.

    Raises:
        TypeError: for another dtype.
    """
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {dtype}, expected one of {list(_DTYPE_NAMES)}") from None


def device_name(device: torch.device | str) -> str:
    """Short device name used in keys: ``"cpu"``, or the GPU model (``"H100"``, ``"A100"``, ...).

    Args:
        device: a torch device.

    Returns:
        The model token of ``torch.cuda.get_device_name`` that looks like a model number
        (``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``), else the full name without spaces.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_device_name(index)


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    name = torch.cuda.get_device_name(index)
    for token in name.replace("-", " ").split():
        if token.upper() in _TABLE_FAMILY or (token[:1].isalpha() and token[1:].isdigit() and len(token) >= 3):
            return token.upper()
    return name.replace(" ", "_")


def shape_bucket(op: str, shape: Sequence[int]) -> str:
    """The shape part of a key: ``"D<BLOCK_D>+<TAIL_D>"`` (``"D<BLOCK_D>"`` without a tail) for row
    ops, ``"M<pow2>_N<N>_K<K>"`` for GEMMs.

    Row kernels depend on D through its column chunks (:func:`row_blocks`: 1152 -> ``"D1024+128"``);
    GEMM configs on the exact N and K (a stage's widths) and on the order of magnitude of M
    (batch * tokens).
    """
    _check_op(op)
    if op in ROW_OPS:
        _, D = _row_shape(op, shape)
        block_d, tail_d = row_blocks(max(D, 1))
        return f"D{block_d}+{tail_d}" if tail_d else f"D{block_d}"
    if op in ATTENTION_OPS:  # the kernel choice depends on sequence, heads and head_dim
        B, L, H, hd = _attention_shape(op, shape)
        return f"B{next_power_of_2(B)}_L{L}_H{H}_hd{hd}"
    M, N, K = _gemm_shape(op, shape)
    return f"M{min(next_power_of_2(M), 1 << 20)}_N{N}_K{K}"


def config_key(op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> str:
    """``"<op>/<bucket>/<dtype>/<device name>"``, the key of the cache and the memo."""
    return f"{op}/{shape_bucket(op, shape)}/{dtype_name(dtype)}/{device_name(device)}"


# ---------------------------------------------------------------------------------------------
# Heuristic defaults
# ---------------------------------------------------------------------------------------------


def rowwise_num_warps(block_elems: int) -> int:
    """Warps for a row kernel holding ``block_elems`` fp32 values (Liger's calculate_settings)."""
    if block_elems >= 32768:
        return 32
    if block_elems >= 8192:
        return 16
    if block_elems >= 2048:
        return 8
    return 4


def rows_per_program(block_d: int, target_elems: int = 2048, max_rows: int = 16) -> int:
    """Rows per program (a power of two) for a row kernel of ``block_d`` lanes per row: several
    short rows per program, one long row."""
    return prev_power_of_2(max(1, min(max_rows, target_elems // block_d)))


def _check_row_width(op: str, D: int) -> None:
    if D > MAX_FUSED_D:
        raise NotImplementedError(f"{op}: D={D} exceeds the single-pass row limit {MAX_FUSED_D}")


def fit_row_config(op: str, D: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of a row-op config with its column blocks fitted to D, as the kernels run it.

    Norm ops hold whole rows: ``BLOCK_D``/``TAIL_D`` are set from :func:`row_blocks` (whatever
    ``cfg`` said). ``gated_residual``: ``BLOCK_D`` (default: :func:`default_config`'s) is clamped
    by :func:`column_tiles` and ``TAIL_D`` set to match. ``num_warps`` defaults to 4.

    Raises:
        ValueError: for a ``BLOCK_M`` (or gated_residual ``BLOCK_D``) that is not a power of two,
            or a gated_residual ``BLOCK_D`` so narrow that the column tiles exceed CUDA's 65535.
    """
    if op not in ROW_OPS:
        raise ValueError(f"fit_row_config: {op!r} is not a row op {ROW_OPS}")
    out = dict(cfg)
    block_m = out.get("BLOCK_M")
    if not _is_power_of_2(block_m):
        raise ValueError(f"{op}: BLOCK_M must be a power of two, got {block_m!r}")
    if op in _NORM_OPS:
        out["BLOCK_D"], out["TAIL_D"] = row_blocks(D)
    else:
        width = out.get("BLOCK_D")
        if width is None:
            width = default_config(op, (1, D), torch.float32, "cpu")["BLOCK_D"]
        out["BLOCK_D"], n_full, out["TAIL_D"] = column_tiles(D, width)
        if n_full > 65535:  # CUDA's limit on grid axis 1 (the column tiles)
            raise ValueError(f"{op}: BLOCK_D={width} gives {n_full} column tiles for D={D}, over 65535")
    out.setdefault("num_warps", 4)
    return out


def lane_utilization(op: str, D: int, cfg: dict[str, Any] | None = None) -> float:
    """Fraction of a row kernel's column lanes that hold one of the row's D values.

    ``D / (BLOCK_D + TAIL_D)`` for the norm ops (their lanes per row, :func:`row_blocks`); for
    ``gated_residual`` ``D / (n_full * BLOCK_D + TAIL_D)`` of :func:`column_tiles` for ``cfg``'s
    ``BLOCK_D`` (default :func:`default_config`'s). 1.0 means no masked lane; D = 1152 gives 1.0.
    Masked rows of a last partial row tile are not counted.
    """
    _check_op(op)
    if op not in ROW_OPS:
        raise ValueError(f"lane_utilization: {op!r} is not a row op {ROW_OPS}")
    if op in _NORM_OPS:
        block_d, tail_d = row_blocks(D)
        return D / (block_d + tail_d)
    width = (cfg or {}).get("BLOCK_D") or default_config(op, (1, D), torch.float32, "cpu")["BLOCK_D"]
    block_d, n_full, tail_d = column_tiles(D, width)
    return D / (n_full * block_d + tail_d)


def default_config(op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> dict[str, Any]:
    """Heuristic config when neither the cache nor the shipped table has one.

    Args:
        op: op name.
        shape: canonical shape (see module docstring).
        dtype: input dtype.
        device: target device.

    Returns:
        Row ops: ``{"BLOCK_M", "BLOCK_D", "TAIL_D", "num_warps"}`` (column blocks fitted to D:
        :func:`row_blocks`, :func:`column_tiles`). GEMM ops: ``{"backend", "BLOCK_M",
        "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}`` (optionally ``"TMA"``).
    """
    _check_op(op)
    if op in ROW_OPS:
        _, D = _row_shape(op, shape)
        _check_row_width(op, D)
        if op == "gated_residual":  # elementwise: 2-D tiles of ~4096 elements, <= 1024 columns + tail
            block_d, _, tail_d = column_tiles(D, 1024)
            block_m = max(1, 4096 // block_d)
            return {"BLOCK_M": block_m, "BLOCK_D": block_d, "TAIL_D": tail_d, "num_warps": 4}
        block_d, tail_d = row_blocks(D)
        block_m = rows_per_program(block_d + tail_d)
        return {"BLOCK_M": block_m, "BLOCK_D": block_d, "TAIL_D": tail_d,
                "num_warps": rowwise_num_warps(block_m * (block_d + tail_d))}
    if op in ATTENTION_OPS:
        _attention_shape(op, shape)
        return {"sdpa_backend": "auto"}
    # GEMM: the Triton matmul tutorial's first CUDA config; vendor path by default (anchors.md).
    return {"backend": "vendor", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
            "num_warps": 8, "num_stages": 3}


def interpreter_config(op: str, shape: Sequence[int]) -> dict[str, Any]:
    """The single config used under the Triton interpreter (it cannot autotune over several).

    Programs are expensive in the interpreter (a fixed cost of several ms each on a loaded
    2-core machine, measured: (8, 64, 1152) ln_modulate took 8.9 s at 1 row per program and
    0.47 s at 128), so row kernels take up to 2**17 elements per program and GEMMs 64-wide tiles.
    """
    _check_op(op)
    if op in ROW_OPS:
        rows, D = _row_shape(op, shape)
        _check_row_width(op, D)
        if op == "gated_residual":  # whole rows: one column tile (+ tail) per program
            block_d, _, tail_d = column_tiles(max(D, 1), MAX_FUSED_D)
        else:
            block_d, tail_d = row_blocks(max(D, 1))
        block_m = max(1, min(next_power_of_2(rows), prev_power_of_2((1 << 17) // (block_d + tail_d))))
        return {"BLOCK_M": block_m, "BLOCK_D": block_d, "TAIL_D": tail_d, "num_warps": 4}
    if op in ATTENTION_OPS:
        return {"sdpa_backend": "auto"}
    return {"backend": "vendor", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4,
            "num_warps": 4, "num_stages": 1}


def candidate_configs(op: str, shape: Sequence[int], dtype: torch.dtype) -> list[dict[str, Any]]:
    """A small search space for :func:`autotune` on a GPU.

    GEMM candidates include ``{"backend": "vendor"}`` so tuning also decides vendor vs Triton.
    """
    _check_op(op)
    if op in ROW_OPS:
        _, D = _row_shape(op, shape)
        _check_row_width(op, D)
        if op == "gated_residual":
            p = prev_power_of_2(D)
            widths = {min(p, 256), min(p, 1024)}
            exact = D & -D  # the largest power of two dividing D: tiles with no tail at all
            if 64 <= exact <= 1024:
                widths.add(exact)
            out = []
            for bd in sorted(widths):
                tail_d = column_tiles(D, bd)[2]
                for elems in (2048, 8192):
                    out += [{"BLOCK_M": max(1, elems // bd), "BLOCK_D": bd, "TAIL_D": tail_d, "num_warps": w}
                            for w in (4, 8)]
            return out
        block_d, tail_d = row_blocks(D)
        lanes = block_d + tail_d
        out = []
        for bm in sorted({1, 2, 4, rows_per_program(lanes)}):
            if bm * lanes > 4 * MAX_FUSED_D // 2:
                continue
            default_w = rowwise_num_warps(bm * lanes)
            for w in sorted({default_w, 4, 8, 16}):
                # over 32 fp32 values per thread per row tensor the fused kernel spills (Triton 3.6,
                # sm_80, BLOCK_M=4 x (1024 + 128) on 4 warps): keep only the heuristic's warps there
                if w == default_w or bm * lanes <= 32 * 32 * w:
                    out.append({"BLOCK_M": bm, "BLOCK_D": block_d, "TAIL_D": tail_d, "num_warps": w})
        return out
    if op in ATTENTION_OPS:
        _attention_shape(op, shape)
        return [{"sdpa_backend": b} for b in SDPA_BACKENDS]
    cands: list[dict[str, Any]] = [{"backend": "vendor"}]
    for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                             (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                             (128, 128, 32, 4, 4), (64, 64, 64, 4, 4)):
        for tma in (False, True):  # TMA: tensor-descriptor loads (Hopper; aligned shapes only)
            cands.append({"backend": "triton", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                          "num_warps": w, "num_stages": s, "TMA": tma})
    return cands


# ---------------------------------------------------------------------------------------------
# Shipped tables
# ---------------------------------------------------------------------------------------------


def _load_table(family: str) -> dict[str, Any]:
    if family not in _tables:
        try:
            text = resources.files(__package__).joinpath("configs", f"{family}.json").read_text()
            table = json.loads(text)
        except (FileNotFoundError, json.JSONDecodeError, OSError) as exc:
            logger.warning("mosaic_kernels: shipped config table %s.json unreadable (%s); using defaults",
                           family, exc)
            table = {"entries": []}
        _tables[family] = table
    return _tables[family]


def _matches(match: dict[str, Any], op: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
    dtypes = match.get("dtype")
    if dtypes is not None and dtype_name(dtype) not in (dtypes if isinstance(dtypes, list) else [dtypes]):
        return False
    if op in ROW_OPS:
        rows, D = _row_shape(op, shape)
        dims = {"D": D, "rows": rows}
    elif op in ATTENTION_OPS:
        dims = dict(zip(("B", "L", "H", "hd"), _attention_shape(op, shape)))
    else:
        M, N, K = _gemm_shape(op, shape)
        dims = {"M": M, "N": N, "K": K}
    for name, value in dims.items():
        if name in match and match[name] != value:
            return False
        if f"{name}_min" in match and value < match[f"{name}_min"]:
            return False
        if f"{name}_max" in match and value > match[f"{name}_max"]:
            return False
    return True


def table_config(op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> dict[str, Any] | None:
    """The first matching entry of the shipped table for ``device``'s family, or None."""
    family = _TABLE_FAMILY.get(device_name(device))
    if family is None:
        return None
    for entry in _load_table(family).get("entries", []):
        if entry.get("op") == op and _matches(entry.get("match", {}), op, shape, dtype):
            return dict(entry["config"])
    return None


# ---------------------------------------------------------------------------------------------
# Persistent autotune cache
# ---------------------------------------------------------------------------------------------


def cache_path() -> Path:
    """``$MOSAIC_KERNELS_CACHE``, else ``~/.cache/mosaic_kernels/configs.json``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mosaic_kernels" / "configs.json"


def _read_cache_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": CACHE_VERSION, "entries": {}}
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("mosaic_kernels: ignoring unreadable autotune cache %s (%s)", path, exc)
        return {"version": CACHE_VERSION, "entries": {}}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        logger.warning("mosaic_kernels: ignoring autotune cache %s with unknown format", path)
        return {"version": CACHE_VERSION, "entries": {}}
    return data


def _cache_entries() -> dict[str, Any]:
    global _cache, _cache_loaded_from
    path = cache_path()
    if _cache is None or _cache_loaded_from != path:
        _cache = _read_cache_file(path)
        _cache_loaded_from = path
    return _cache["entries"]


def _write_cache_entry(key: str, entry: dict[str, Any]) -> Path:
    """Merge one entry into the cache file atomically (temp file in the same dir, then rename)."""
    global _cache, _cache_loaded_from
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache_file(path)  # re-read: another process may have added entries
    data["entries"][key] = entry
    fd, tmp = tempfile.mkstemp(prefix=".configs.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_os_error():
            os.unlink(tmp)
        raise
    _cache, _cache_loaded_from = data, path
    return path


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


def clear_memo() -> None:
    """Forget resolved configs and the loaded cache (e.g. after changing ``$MOSAIC_KERNELS_CACHE``)."""
    global _cache, _cache_loaded_from
    with _lock:
        _memo.clear()
        _fast.clear()
        _tables.clear()
        _cache, _cache_loaded_from = None, None


# ---------------------------------------------------------------------------------------------
# Lookup and tuning
# ---------------------------------------------------------------------------------------------


def _interpreting(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    from .ops import _triton_package  # lazy: configs must import without triton

    package, _ = _triton_package()
    return package is not None and package.INTERPRETED


def get_config(op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> dict[str, Any]:
    """The kernel config for one call (see the module docstring for the lookup order).

    Args:
        op: op name, one of :data:`OPS`.
        shape: canonical shape: ``(B, L, D)`` for row ops, ``(M, N, K)`` for GEMM ops.
        dtype: input dtype.
        device: the inputs' device.

    Returns:
        A fresh dict of kernel meta-parameters (and ``"backend"`` for GEMM ops).

    Raises:
        ValueError: for an unknown op or a malformed shape.
        TypeError: for an unsupported dtype.
        NotImplementedError: for a row op with D above :data:`MAX_FUSED_D`.
    """
    device = torch.device(device)
    fast_key = (op, tuple(shape), dtype, device)
    cfg = _fast.get(fast_key)
    if cfg is not None:
        return dict(cfg)
    if _interpreting(device):
        cfg = interpreter_config(op, shape)
        _remember_fast(fast_key, cfg)
        return dict(cfg)
    key = config_key(op, shape, dtype, device)
    with _lock:
        cfg = _memo.get(key)
        if cfg is None:
            cached = _cache_entries().get(key)
            if cached is not None:
                cfg = dict(cached["config"])
            else:
                cfg = default_config(op, shape, dtype, device)
                table = table_config(op, shape, dtype, device)
                if table is not None:
                    cfg.update(table)
            if op in ROW_OPS:  # column blocks fitted to D (a norm program holds whole rows)
                cfg = fit_row_config(op, _row_shape(op, shape)[1], cfg)
            _memo[key] = cfg
        _remember_fast(fast_key, cfg)
    return dict(cfg)


def _remember_fast(fast_key: tuple[Any, ...], cfg: dict[str, Any]) -> None:
    if len(_fast) >= _FAST_MAX:
        _fast.clear()
    _fast[fast_key] = cfg


def autotune(
    op: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str,
    candidates: Iterable[dict[str, Any]] | None = None,
    bench_fn: Callable[[dict[str, Any]], float] | None = None,
    *,
    persist: bool = True,
) -> dict[str, Any]:
    """Time each candidate, keep the fastest, and store it in the persistent cache.

    Args:
        op: op name.
        shape: canonical shape.
        dtype: input dtype.
        device: the device the kernels run on.
        candidates: configs to try; default :func:`candidate_configs`.
        bench_fn: ``config -> milliseconds``. Default: a CUDA benchmark with
            ``triton.testing.do_bench`` on random inputs (GPU only).
        persist: write the winner to the cache file.

    Returns:
        The fastest config.

    Raises:
        RuntimeError: if ``bench_fn`` is None and ``device`` is not CUDA, or every candidate failed.
    """
    device = torch.device(device)
    candidates = list(candidates) if candidates is not None else candidate_configs(op, shape, dtype)
    if bench_fn is None:
        if device.type != "cuda":
            raise RuntimeError(f"autotune benchmarks on a CUDA device, got {device}; pass bench_fn to tune elsewhere")
        from .triton import make_bench_fn  # lazy: needs triton

        bench_fn = make_bench_fn(op, shape, dtype, device)
    timings: list[tuple[float, int]] = []
    for i, cfg in enumerate(candidates):
        try:
            ms = float(bench_fn(dict(cfg)))
        except Exception as exc:  # noqa: BLE001 - a candidate that does not compile/run is skipped
            logger.info("autotune %s %s: candidate %s failed: %s", op, tuple(shape), cfg, exc)
            continue
        if math.isfinite(ms):
            timings.append((ms, i))
    if not timings:
        raise RuntimeError(f"autotune {op} {tuple(shape)}: all {len(candidates)} candidates failed")
    best_ms, best_i = min(timings)
    best = dict(candidates[best_i])
    key = config_key(op, shape, dtype, device)
    logger.info("autotune %s: best %s at %.4f ms of %d candidates", key, best, best_ms, len(timings))
    with _lock:
        if op in ROW_OPS:
            best = fit_row_config(op, _row_shape(op, shape)[1], best)
        _memo[key] = best
        _fast.clear()
        if persist:
            import triton  # noqa: PLC0415 - only for the version stamp; tuning needs triton anyway

            _write_cache_entry(key, {
                "config": best,
                "time_ms": best_ms,
                "torch": torch.__version__,
                "triton": getattr(triton, "__version__", "?"),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            })
    return dict(best)


def select_configs_for_shapes(
    items: Iterable[tuple[str, Sequence[int], torch.dtype]],
    device: torch.device | str | None = None,
    *,
    tune: bool = False,
) -> dict[str, dict[str, Any]]:
    """Resolve the configs of a stage's shapes up front (called when a stage is entered).

    Args:
        items: ``(op, shape, dtype)`` triples, e.g. ``("linear_gelu", (M, F, C), torch.bfloat16)``.
        device: the device; default the current CUDA device, else CPU.
        tune: autotune (and persist) keys missing from the cache; CUDA only, otherwise ignored.

    Returns:
        ``{config_key: config}`` for every item.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out: dict[str, dict[str, Any]] = {}
    for op, shape, dtype in items:
        key = config_key(op, shape, dtype, device)
        if key in out:
            continue
        if tune and device.type == "cuda" and key not in _cache_entries():
            out[key] = autotune(op, shape, dtype, device)
        else:
            out[key] = get_config(op, shape, dtype, device)
    return out


def _op_getter(op: str) -> Callable[..., dict[str, Any]]:
    def getter(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> dict[str, Any]:
        return get_config(op, shape, dtype, device)

    getter.__name__ = f"get_{op}_config"
    getter.__doc__ = f"``get_config({op!r}, shape, dtype, device)``."
    return getter


get_ln_modulate_config = _op_getter("ln_modulate")
get_gated_residual_config = _op_getter("gated_residual")
get_gated_residual_ln_modulate_config = _op_getter("gated_residual_ln_modulate")
get_linear_gelu_config = _op_getter("linear_gelu")
get_linear_gated_residual_config = _op_getter("linear_gated_residual")
get_attention_config = _op_getter("attention")
