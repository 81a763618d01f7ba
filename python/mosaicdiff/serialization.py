"""Saving and loading a `MosaicDiT` as a folder: ``config.json`` + ``model.safetensors``.

Layout (format 3.x; 2.x is the same without ``shared_producers``)::

    <dir>/config.json         the model's diffusers config (``_class_name``, the dense DiT's
                              architecture keys, ``stages`` with their kept heads and channels
                              per block, ``shared_embedder``, ``shared_producers``,
                              ``dense_reference``, ``meta``) plus
                              ``format``, ``format_version``, ``package_version``, ``dtype`` and
                              ``weights_id``: the id of the save that wrote the weights
    <dir>/model.safetensors   the model's state dict ("shared.*", "producer_storage.<j>.<field>",
                              "stage_blocks.<i>.<j>.<field>": each tensor once);
                              its header repeats ``mosaicdiff_weights_id``

Folders of format 1.x (mosaicdiff 0.1: the DiT config under ``dense_config``, shapes under
``runtime``, block keys "stages.<i>.blocks.<j>.<field>") still load (`mosaicdiff.legacy_format`).

The config alone builds the model's skeleton (``MosaicDiT.from_config``); loading then checks every
key, shape and dtype of the weights against that skeleton, with errors naming the file and the key,
and assigns them. How a save stays crash-safe is `mosaicdiff.model_folder`'s job.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mosaicdiff import legacy_format, model_folder
from mosaicdiff._version import __version__
from mosaicdiff.config_checks import check_config_fields, format_major_minor
from mosaicdiff.model_folder import (
    CONFIG_NAME,
    FORMAT_NAME,
    STAGING_PREFIX,
    WEIGHTS_NAME,
    validate_save_directory,
    write_probe_error,
)
from mosaicdiff.stage_layout import coverage_problem

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME", "FORMAT_NAME", "FORMAT_VERSION", "STAGING_PREFIX", "WEIGHTS_NAME", "load_model", "read_config",
    "save_model", "validate_save_directory", "write_probe_error",
]

#: "major.minor": majors in `READABLE_MAJORS` are read (a newer minor with a warning).
#: 3.0: ``shared_producers`` (qkv/fc1 rows stored once per block position, under
#: "producer_storage.<j>.*"; readers of 2.x would miss those tensors); 2.0: a diffusers config
#: (ModelMixin/ConfigMixin); 1.1 added ``weights_id``; 1.0 the first.
FORMAT_VERSION = "3.0"
READABLE_MAJORS = (1, 2, 3)
#: Keys of config.json that describe the file, not the model (not passed to ``from_config``).
ENVELOPE_KEYS = ("format", "format_version", "package_version", "dtype", "weights_id")
#: torch_dtype names accepted by `load_model`.
DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32,
}


def json_safe(value: Any) -> Any:
    """Convert a config value to plain JSON types (tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ------------------------------------------------------------------ save


def state_tensors(model) -> dict[str, torch.Tensor]:
    """Flat name -> contiguous CPU tensor; tensors sharing memory are cloned (safetensors rule)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_model(model, save_directory: str | os.PathLike) -> Path:
    """Save a `MosaicDiT` (its public ``config`` and ``state_dict``) into a folder, crash-safely.

    Raises:
        FileExistsError / NotADirectoryError / PermissionError: see `validate_save_directory`.
        BlockingIOError: another save into the same folder is in progress.
        ValueError: the stages do not cover the model's timesteps (the model could not be loaded).
        OSError: writing failed (e.g. disk full); the folder is left as it was.
    """
    validate_save_directory(save_directory)
    from diffusers import __version__ as diffusers_version

    body = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config = {"_class_name": type(model).__name__, "_diffusers_version": diffusers_version,
              "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "package_version": __version__,
              "dtype": str(model.dtype).removeprefix("torch."), **json_safe(body)}
    problem = coverage_problem(config["stages"], config["meta"])
    if problem:
        raise ValueError(f"save_pretrained: cannot save this MosaicDiT: {problem}")
    header = {"format": "pt", "mosaicdiff_format_version": FORMAT_VERSION}
    target = model_folder.save_folder(save_directory, config, state_tensors(model), header)
    logger.info("saved MosaicDiT (%d stages) to %s", len(config["stages"]), target)
    return target


# ------------------------------------------------------------------ load


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the ``config.json`` of a saved mosaic (format 1.x configs are upgraded).

    Returns:
        `dict`: the config in the 2.x layout.

    Raises:
        FileNotFoundError: the directory or its config is missing.
        ValueError: the config is not valid JSON, not a MosaicDiT config, lacks a key, has a field
            of the wrong type (named), stages that do not cover the timesteps, or an incompatible
            format version (both versions are named).
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"MosaicDiT.from_pretrained: {path} is not a directory")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"MosaicDiT.from_pretrained: {cfg_path} not found (not a saved MosaicDiT)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path} has format {found!r}, expected {FORMAT_NAME!r}")
    if "format_version" not in config:
        raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path} lacks the key 'format_version'")
    saved = format_major_minor(config["format_version"], str(cfg_path))
    ours = format_major_minor(FORMAT_VERSION, "mosaicdiff")
    if saved[0] not in READABLE_MAJORS:
        raise ValueError(
            f"MosaicDiT.from_pretrained: {path} has format version {config['format_version']} "
            f"(written by mosaicdiff {config.get('package_version', '?')}), but mosaicdiff {__version__} "
            f"reads format versions {', '.join(f'{m}.x' for m in READABLE_MAJORS)} (writes {FORMAT_VERSION}); "
            f"re-save it with a matching version"
        )
    if saved[0] == ours[0] and saved[1] > ours[1]:
        logger.warning("%s has format version %s, newer than %s read by mosaicdiff %s; unknown fields are ignored",
                       path, config["format_version"], FORMAT_VERSION, __version__)
    if saved[0] == 1:
        config = legacy_format.upgrade_config(config, cfg_path)
    check_config_fields(config, cfg_path)
    problem = coverage_problem(config["stages"], config.get("meta"))
    if problem:
        raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path}: {problem}")
    return config


def _read_weights(wpath: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """All tensors of a weights file and its save id."""
    if not wpath.is_file():
        raise FileNotFoundError(f"MosaicDiT.from_pretrained: {wpath} not found")
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {}).get(model_folder.WEIGHTS_ID_KEY)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"MosaicDiT.from_pretrained: {wpath} is truncated or corrupt ({type(exc).__name__}: {exc}); "
            f"save the mosaic again"
        ) from None


def _pair_weights(path: Path, config: dict, tensors: dict, weights_id: str | None):
    """Resolve a config whose ``weights_id`` is not the one in model.safetensors."""
    want = config["weights_id"]
    staged = model_folder.staged_weights(path, want)
    if staged is not None:
        # A save was interrupted after committing config.json: its complete weights are staged.
        logger.warning("%s: loading the weights of an interrupted save from %s; save again to tidy up",
                       path, staged.parent.name)
        return config, _read_weights(staged)[0], staged
    if weights_id is None:  # weights rewritten by hand (no id): only the shapes are checked
        return config, tensors, path / WEIGHTS_NAME
    newer = read_config(path)  # a concurrent save may have committed since we read the config
    if newer.get("weights_id") == weights_id:
        return newer, tensors, path / WEIGHTS_NAME
    raise ValueError(
        f"MosaicDiT.from_pretrained: {path / WEIGHTS_NAME} is not the weights {path / CONFIG_NAME} was saved "
        f"with (weights_id {weights_id!r}, expected {want!r}); save the mosaic again"
    )


def _check_tensor(key: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                  where: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"MosaicDiT.from_pretrained: {where} lacks the tensor {key!r} required by the config")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"MosaicDiT.from_pretrained: tensor {key!r} in {where} has shape {tuple(t.shape)}, "
                         f"the config expects {tuple(shape)}")
    if t.is_floating_point() and t.dtype != dtype:
        raise ValueError(f"MosaicDiT.from_pretrained: tensor {key!r} in {where} has dtype {t.dtype}, "
                         f"the config says {dtype}")
    return t


def resolve_dtype(torch_dtype: Any) -> torch.dtype | None:
    if torch_dtype is None or (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        return torch_dtype
    if isinstance(torch_dtype, str) and torch_dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[torch_dtype.removeprefix("torch.")]
    raise TypeError(f"MosaicDiT.from_pretrained: torch_dtype must be a floating torch.dtype or one of "
                    f"{', '.join(map(repr, DTYPE_NAMES))}, got {torch_dtype!r}")


def resolve_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"MosaicDiT.from_pretrained: device {device!r} is not a torch device; use 'cpu', "
                         f"'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RuntimeError(f"MosaicDiT.from_pretrained: device {device!r} requested, but no CUDA device is "
                               f"available (torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= count:
            raise RuntimeError(f"MosaicDiT.from_pretrained: device {device!r} requested, but only {count} "
                               f"CUDA device(s) exist")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"MosaicDiT.from_pretrained: device {device!r} requested, but MPS is not available; "
                           f"use device='cpu'")
    return dev


def load_model(cls, directory: str | os.PathLike, *, device=None, torch_dtype=None):
    """Load a model of class `cls` (`MosaicDiT`) saved by `save_model`; see ``MosaicDiT.from_pretrained``."""
    torch_dtype = resolve_dtype(torch_dtype)  # argument errors first, before any reading
    device = resolve_device(device)
    path = Path(directory)
    config = read_config(path)
    cfg_path = path / CONFIG_NAME
    where = path / WEIGHTS_NAME
    tensors, weights_id = _read_weights(where)
    if config.get("weights_id") not in (None, weights_id):
        config, tensors, where = _pair_weights(path, config, tensors, weights_id)
    tensors = legacy_format.upgrade_keys(tensors) if config.get("_legacy") else tensors
    dtype = getattr(torch, config["dtype"])
    try:
        model = cls.from_config({k: v for k, v in config.items() if k != "_legacy"})
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        message = str(exc)
        if not message.startswith("stage"):
            message = f"the config does not describe a DiT ({type(exc).__name__}: {exc})"
        raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path}: {message}") from None
    expected = model.state_dict()
    state = {key: _check_tensor(key, tensors, tuple(ref.shape), dtype, where) for key, ref in expected.items()}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"MosaicDiT.from_pretrained: {where} has tensors the config does not describe: "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    # nn.Module.to: ModelMixin.to warns about fp32 modules on every cast (diffusers 0.42), we have none
    nn.Module.to(model, dtype)  # the non-persistent buffers (sin-cos positions) follow the weights
    if device is not None or torch_dtype is not None:
        nn.Module.to(model, device=device, dtype=torch_dtype)
    model.eval()
    logger.info("loaded MosaicDiT (%d stages) from %s", model.num_stages, path)
    return model
