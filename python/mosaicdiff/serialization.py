"""Saving and loading a `MosaicDiT` as a directory: ``config.json`` + ``model.safetensors``.

Layout::

    <dir>/config.json         format + version, package version, dtype, the dense model's config
                              (to rebuild the shared skeleton), runtime shapes, the stages (name,
                              t_start, t_end, sparsity, kept heads and channels per block), meta
    <dir>/model.safetensors   "shared.<name>" (skeleton state) and
                              "stages.<i>.blocks.<j>.<field>" (compact block weights)

Saving is atomic: everything is written and fsynced in a temporary directory beside the target,
which then replaces the target with a rename; on any failure the temporary directory is removed
and an existing target is left as it was. Loading validates the format version, the presence and
integrity of the weights, and every key and shape against the config, with errors naming the key.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mosaicdiff._version import __version__
from mosaicdiff.types import CompactBlockWeights, StageSpec

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "load_mosaic",
    "read_config",
    "save_mosaic",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "mosaicdiff.MosaicDiT"
#: "major.minor": a different major cannot be read; a newer minor is read with a warning.
FORMAT_VERSION = "1.0"

_BLOCK_FLOAT_FIELDS = (
    "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
    "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
)


def _block_key(stage: int, block: int, field: str) -> str:
    return f"stages.{stage}.blocks.{block}.{field}"


def _block_shapes(heads: int, channels: int, head_dim: int, width: int) -> dict[str, tuple[int, ...]]:
    inner = heads * head_dim
    return {
        "qkv_weight": (3 * inner, width),
        "qkv_bias": (3 * inner,),
        "proj_weight": (width, inner),
        "proj_bias": (width,),
        "fc1_weight": (channels, width),
        "fc1_bias": (channels,),
        "fc2_weight": (width, channels),
        "fc2_bias": (width,),
    }


def _json_safe(value: Any) -> Any:
    """Convert a diffusers config value to plain JSON types (tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def _config_dict(mosaic) -> dict[str, Any]:
    stages = []
    for (name, t0, t1, sp), blocks in zip(mosaic._stage_meta, mosaic.stage_blocks):
        stages.append({
            "name": name,
            "t_start": t0,
            "t_end": t1,
            "sparsity": sp,
            "blocks": [
                {"kept_heads": b.kept_heads.tolist(), "kept_channels": b.kept_channels.tolist()}
                for b in blocks
            ],
        })
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "dtype": str(mosaic.dtype).removeprefix("torch."),
        "dense_config": _json_safe(dict(mosaic.config)),
        "runtime": _json_safe(mosaic._runtime),
        "dense_reference": _json_safe(mosaic._dense_ref),
        "meta": _json_safe(mosaic.meta),
        "stages": stages,
    }


def _state_tensors(mosaic) -> dict[str, torch.Tensor]:
    """Flat name -> contiguous CPU tensor; tensors sharing memory are cloned (safetensors rule)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t

    for name, t in mosaic.shared.state_dict().items():
        put(f"shared.{name}", t)
    for i, blocks in enumerate(mosaic.stage_blocks):
        for j, block in enumerate(blocks):
            for field in _BLOCK_FLOAT_FIELDS:
                put(_block_key(i, j, field), getattr(block, field))
    return out


def _fsync_path(path: Path) -> None:
    """fsync a file or (where the OS allows) a directory."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_mosaic_dir(path: Path) -> bool:
    try:
        with open(path / CONFIG_NAME, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def save_mosaic(mosaic, save_directory: str | os.PathLike) -> Path:
    """Save a `MosaicDiT` atomically.

    Args:
        mosaic (`MosaicDiT`): the model.
        save_directory (`str` or `os.PathLike`): the target directory. An existing target is
            replaced only if it is empty or a previously saved mosaic, and only after the new
            one is completely written.

    Returns:
        `Path` of the saved directory.

    Raises:
        FileExistsError: if the target exists and is a file or a non-empty directory that is not
            a saved mosaic.
    """
    target = Path(save_directory).absolute()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"save_pretrained: {target} exists and is not a directory")
        if any(target.iterdir()) and not _is_mosaic_dir(target):
            raise FileExistsError(
                f"save_pretrained: {target} exists and is not a saved MosaicDiT (no {CONFIG_NAME} with "
                f"format {FORMAT_NAME!r}); refusing to replace it"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    backup: Path | None = None
    try:
        config = _config_dict(mosaic)
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        save_file(
            _state_tensors(mosaic),
            str(tmp / WEIGHTS_NAME),
            metadata={"format": "pt", "mosaicdiff_format_version": FORMAT_VERSION},
        )
        _fsync_path(tmp / WEIGHTS_NAME)
        _fsync_path(tmp)
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            backup.rmdir()
            os.replace(target, backup)
        try:
            os.replace(tmp, target)
        except BaseException:
            if backup is not None:
                os.replace(backup, target)
                backup = None
            raise
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    logger.info("saved MosaicDiT (%d stages) to %s", len(config["stages"]), target)
    return target


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def _major_minor(version: str, what: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(version).split(".")[:2])
    except ValueError:
        raise ValueError(f"{what}: format_version must look like 'MAJOR.MINOR', got {version!r}") from None
    return major, minor


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the ``config.json`` of a saved mosaic.

    Args:
        directory (`str` or `os.PathLike`): the saved mosaic.

    Returns:
        `dict`: the parsed config.

    Raises:
        FileNotFoundError: the directory or its config is missing.
        ValueError: the config is not valid JSON, not a MosaicDiT config, lacks a key, or has
            an incompatible format version (both versions are named).
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"MosaicDiT.from_pretrained: {path} is not a directory")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"MosaicDiT.from_pretrained: {cfg_path} not found (not a saved MosaicDiT)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as exc:
        raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path} has format {found!r}, expected {FORMAT_NAME!r}")
    for key in ("format_version", "dtype", "dense_config", "runtime", "dense_reference", "stages"):
        if key not in config:
            raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path} lacks the key {key!r}")
    saved = _major_minor(config["format_version"], str(cfg_path))
    ours = _major_minor(FORMAT_VERSION, "mosaicdiff")
    if saved[0] != ours[0]:
        raise ValueError(
            f"MosaicDiT.from_pretrained: {path} has format version {config['format_version']} "
            f"(written by mosaicdiff {config.get('package_version', '?')}), but mosaicdiff {__version__} "
            f"reads format version {FORMAT_VERSION} (major {ours[0]}); re-save it with a matching version"
        )
    if saved[1] > ours[1]:
        logger.warning(
            "%s has format version %s, newer than %s read by mosaicdiff %s; unknown fields are ignored",
            path, config["format_version"], FORMAT_VERSION, __version__,
        )
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        raise FileNotFoundError(f"MosaicDiT.from_pretrained: {wpath} not found")
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"MosaicDiT.from_pretrained: {wpath} is truncated or corrupt ({type(exc).__name__}: {exc}); "
            f"save the mosaic again"
        ) from None


def _check_tensor(key: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                  where: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"MosaicDiT.from_pretrained: {where} lacks the tensor {key!r} required by the config")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"MosaicDiT.from_pretrained: tensor {key!r} in {where} has shape {tuple(t.shape)}, "
            f"the config expects {tuple(shape)}"
        )
    if t.is_floating_point() and t.dtype != dtype:
        raise ValueError(
            f"MosaicDiT.from_pretrained: tensor {key!r} in {where} has dtype {t.dtype}, the config says {dtype}"
        )
    return t


def load_mosaic(
    directory: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Load a `MosaicDiT` saved by `save_mosaic`.

    Args:
        directory (`str` or `os.PathLike`): the saved mosaic.
        device (`torch.device` or `str`, *optional*): move the model there.
        torch_dtype (`torch.dtype`, *optional*): cast the model to this dtype.

    Returns:
        `MosaicDiT` (in eval mode).

    Raises:
        FileNotFoundError: missing directory, config or weights.
        ValueError: corrupt or truncated weights, an incompatible format version, or weights
            that do not match the config (missing, unexpected or mis-shaped keys, named).
    """
    from mosaicdiff.mosaic import MosaicDiT, build_skeleton

    path = Path(directory)
    config = read_config(path)
    tensors = _read_weights(path)
    where = path / WEIGHTS_NAME
    try:
        dtype = getattr(torch, config["dtype"])
        runtime = config["runtime"]
        head_dim, width = int(runtime["head_dim"]), int(runtime["width"])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"MosaicDiT.from_pretrained: malformed {path / CONFIG_NAME} ({exc!r})") from None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"MosaicDiT.from_pretrained: unknown dtype {config['dtype']!r} in {path / CONFIG_NAME}")

    # 1. Shared skeleton from the dense config, filled from "shared.*".
    skeleton = build_skeleton(config["dense_config"], runtime).to(dtype)
    expected_shared = skeleton.state_dict()
    shared_state = {}
    for name, ref in expected_shared.items():
        shared_state[name] = _check_tensor(f"shared.{name}", tensors, tuple(ref.shape), dtype, where)
    skeleton.load_state_dict(shared_state, strict=True)
    used = {f"shared.{name}" for name in expected_shared}

    # 2. Stages: compact block weights, shapes from the kept indices in the config.
    stages = []
    for i, s in enumerate(config["stages"]):
        blocks = []
        for j, b in enumerate(s["blocks"]):
            heads = torch.tensor(b["kept_heads"], dtype=torch.int64)
            channels = torch.tensor(b["kept_channels"], dtype=torch.int64)
            fields = {}
            for field, shape in _block_shapes(heads.numel(), channels.numel(), head_dim, width).items():
                key = _block_key(i, j, field)
                fields[field] = _check_tensor(key, tensors, shape, dtype, where)
                used.add(key)
            blocks.append(CompactBlockWeights(kept_heads=heads, kept_channels=channels, **fields))
        stages.append(StageSpec(s["name"], int(s["t_start"]), int(s["t_end"]), float(s["sparsity"]), blocks))
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(
            f"MosaicDiT.from_pretrained: {where} has tensors the config does not describe: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )

    mosaic = MosaicDiT._from_parts(
        config["dense_config"], skeleton, stages, runtime, config["dense_reference"], config.get("meta") or {},
    )
    if device is not None or torch_dtype is not None:
        mosaic.to(device=device, dtype=torch_dtype)
    logger.info("loaded MosaicDiT (%d stages) from %s", len(stages), path)
    return mosaic
