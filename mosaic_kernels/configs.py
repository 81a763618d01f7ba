"""Per-shape choices that are not Triton tiles: vendor vs Triton GEMM, and the SDPA kernel.

Every pruning stage of a model has its own widths, and a few decisions depend on them:

- the GEMM ops (``linear_gelu``, ``linear_gated_residual``, ``linear_geglu``):
  ``{"backend": "vendor" | "triton"}``: cuBLAS(Lt) through torch (the default) or the Triton
  GEMM with the epilogue fused;
- ``attention``: ``{"sdpa_backend": "auto" | "flash" | "efficient" | "cudnn"}`` (at DiT's
  head_dim 72 the winner differs with the head count, so per stage).

Each op declares its choice next to its function (:class:`mosaic_kernels.op_registry.Choice`).
:func:`get_config` answers from a memo, then from the measurements persisted in one small JSON
file (``$MOSAIC_KERNELS_CACHE``, default ``~/.cache/mosaic_kernels/configs.json``), else with
the op's default. :func:`measure` times every option with ``triton.testing.do_bench`` (through
the op's benchmark providers) and persists the winner.

Triton tiles are not decided here: the row kernels take their block size and warps from a
function of D and dtype, and the Triton GEMM runs under ``triton.autotune``
(``mosaic_kernels/triton/settings.py``). No shipped table: one would exist only for a card it
was measured on.

Call :func:`select_configs_for_shapes` when a stage is entered, so every per-call lookup of
that stage is a dict hit.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import op_registry as _registry
from .timing import time_ms

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV",
    "cache_path",
    "clear_memo",
    "config_key",
    "default_config",
    "device_name",
    "get_config",
    "measure",
    "select_configs_for_shapes",
    "shape_bucket",
]

CACHE_ENV = "MOSAIC_KERNELS_CACHE"
CACHE_VERSION = 2
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_CARD_TOKENS = ("H100", "H200", "GH200", "H800", "A100", "A800")

_lock = threading.Lock()
_memo: dict[tuple[Any, ...], dict[str, Any]] = {}  # (op, shape, dtype, device) -> config
_persisted: tuple[Path, dict[str, Any]] | None = None  # the cache file as last read or written


def _choice(op: str) -> _registry.Choice | None:
    case = _registry.CASES.get(op)
    if case is None:
        raise ValueError(f"unknown op {op!r}, expected one of {tuple(_registry.CASES)}")
    return case.choice


def _required_choice(op: str) -> _registry.Choice:
    choice = _choice(op)
    if choice is None:
        raise ValueError(f"{op}: nothing is chosen per shape (its launch settings are a function of D and dtype)")
    return choice


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

    The token of ``torch.cuda.get_device_name`` that looks like a model number
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
        if token.upper() in _CARD_TOKENS or (token[:1].isalpha() and token[1:].isdigit() and len(token) >= 3):
            return token.upper()
    return name.replace(" ", "_")


def shape_bucket(op: str, shape: Sequence[int]) -> str:
    """The shape part of a key (``"M4096_N2304_K1152"``, ``"B16_L256_H6_hd72"``).

    Raises:
        ValueError: for an unknown op, an op with nothing chosen per shape, or a malformed shape.
    """
    return _required_choice(op).bucket(op, shape)


def config_key(op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> str:
    """``"<op>/<bucket>/<dtype>/<device name>"``, the key of the persisted measurements."""
    return f"{op}/{shape_bucket(op, shape)}/{dtype_name(dtype)}/{device_name(device)}"


def default_config(op: str) -> dict[str, Any]:
    """The op's choice before any measurement (``{"backend": "vendor"}``, ``{"sdpa_backend": "auto"}``)."""
    choice = _required_choice(op)
    return {choice.field: choice.default}


# ---------------------------------------------------------------------------------------------
# The persisted measurements
# ---------------------------------------------------------------------------------------------


def cache_path() -> Path:
    """``$MOSAIC_KERNELS_CACHE``, else ``~/.cache/mosaic_kernels/configs.json``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mosaic_kernels" / "configs.json"


def _read_cache_file(path: Path) -> dict[str, Any]:
    empty = {"version": CACHE_VERSION, "entries": {}}
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return empty
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("mosaic_kernels: ignoring unreadable config cache %s (%s)", path, exc)
        return empty
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        logger.warning("mosaic_kernels: ignoring config cache %s with unknown format", path)
        return empty
    return data


def _persisted_entries() -> dict[str, Any]:
    global _persisted
    path = cache_path()
    if _persisted is None or _persisted[0] != path:
        _persisted = (path, _read_cache_file(path))
    return _persisted[1]["entries"]


def _persist(key: str, entry: dict[str, Any]) -> None:
    """Merge one entry into the cache file (re-read first: another process may have added some)."""
    global _persisted
    path = cache_path()
    data = _read_cache_file(path)
    data["entries"][key] = entry
    _write_json_replacing(path, data)
    _persisted = (path, data)


def _write_json_replacing(path: Path, data: dict[str, Any]) -> None:
    """Write the cache through a temporary file and one rename: readers see the old or the new
    file, never a half-written one. (A cache: losing an update to a crash costs one re-tune, so
    no fsync; the application's durable file layer is `mosaicdiff.core.atomic_io`.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data, sort_keys=True, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clear_memo() -> None:
    """Forget resolved configs and the loaded cache (e.g. after changing ``$MOSAIC_KERNELS_CACHE``)."""
    global _persisted
    with _lock:
        _memo.clear()
        _persisted = None


# ---------------------------------------------------------------------------------------------
# Lookup and measurement
# ---------------------------------------------------------------------------------------------


def get_config(op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> dict[str, Any]:
    """The choice for one call: memo, else the persisted measurement, else the op's default.

    Args:
        op: an op with a per-shape choice (a GEMM op or ``attention``).
        shape: canonical shape: ``(M, N, K)`` for GEMM ops, ``(B, L, H, hd)`` for attention.
        dtype: input dtype.
        device: the inputs' device.

    Returns:
        A fresh dict, e.g. ``{"backend": "vendor"}``.

    Raises:
        ValueError: for an unknown op, an op without a choice, or a malformed shape.
        TypeError: for an unsupported dtype.
    """
    memo_key = (op, tuple(shape), dtype, torch.device(device))
    cfg = _memo.get(memo_key)
    if cfg is None:
        key = config_key(op, shape, dtype, device)
        with _lock:
            entry = _persisted_entries().get(key)
            choice = _required_choice(op)
            value = entry.get("config", {}).get(choice.field) if isinstance(entry, dict) else None
            cfg = {choice.field: value} if value in choice.options else default_config(op)
            _memo[memo_key] = cfg
    return dict(cfg)


def measure(
    op: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    timer: Callable[[Callable[[], Any]], float] | None = None,
    persist: bool = True,
) -> dict[str, Any]:
    """Time every option of ``op``'s choice at ``shape``, keep the fastest, and persist it.

    Each option runs the provider it names in the op's benchmark case on the case's inputs.

    Args:
        op: an op with a per-shape choice.
        shape: canonical shape.
        dtype: input dtype.
        device: the device the kernels run on.
        timer: ``fn -> milliseconds``; default the median of :func:`mosaic_kernels.timing.time_ms`
            (``triton.testing.do_bench`` on CUDA).
        persist: write the winner to the cache file.

    Returns:
        The fastest option as a config, e.g. ``{"sdpa_backend": "flash"}``.

    Raises:
        RuntimeError: if every option failed to run.
    """
    device = torch.device(device)
    choice = _required_choice(op)
    case = _registry.CASES[op]
    timer = timer or (lambda fn: time_ms(fn, device)[0])
    inputs = case.make_inputs(tuple(shape), dtype, device, torch.Generator(device=device).manual_seed(0))
    providers = case.providers()
    timings: dict[str, float] = {}
    for option, provider in choice.options.items():
        fn = providers[provider]
        try:
            ms = float(timer(lambda fn=fn: fn(*inputs)))
        except Exception as exc:  # noqa: BLE001 - an option this card or shape cannot run is skipped
            logger.info("measure %s %s: %s failed: %s", op, tuple(shape), option, exc)
            continue
        if math.isfinite(ms):
            timings[option] = ms
    if not timings:
        raise RuntimeError(f"measure {op} {tuple(shape)}: all {len(choice.options)} options failed")
    best = min(timings, key=timings.get)
    cfg = {choice.field: best}
    key = config_key(op, shape, dtype, device)
    logger.info("measure %s: %s at %.4f ms (%s)", key, best, timings[best], timings)
    with _lock:
        _memo[(op, tuple(shape), dtype, device)] = cfg
        if persist:
            _persist(key, {"config": cfg, "timings_ms": timings, "torch": torch.__version__,
                           "triton": _triton_version(),
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return dict(cfg)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def select_configs_for_shapes(
    items: Iterable[tuple[str, Sequence[int], torch.dtype]],
    device: torch.device | str | None = None,
    *,
    tune: bool = False,
) -> dict[str, dict[str, Any]]:
    """Resolve the choices of a stage's shapes up front (called when a stage is entered).

    Args:
        items: ``(op, shape, dtype)`` triples, e.g. ``("linear_gelu", (M, N, K), torch.bfloat16)``.
            Ops with nothing chosen per shape (the row ops) are accepted and get no entry.
        device: the device; default the current CUDA device, else CPU.
        tune: :func:`measure` (and persist) keys without a persisted measurement; CUDA only,
            otherwise ignored.

    Returns:
        ``{config_key: config}`` for every item with a choice, in first-seen order.

    Raises:
        ValueError: for an unknown op.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out: dict[str, dict[str, Any]] = {}
    for op, shape, dtype in items:
        if _choice(op) is None:
            continue
        key = config_key(op, shape, dtype, device)
        if key in out:
            continue
        if tune and device.type == "cuda" and key not in _persisted_entries():
            out[key] = measure(op, shape, dtype, device)
        else:
            out[key] = get_config(op, shape, dtype, device)
    return out

