"""Saving and loading a `MosaicUNet` as ``config.json`` + ``model.safetensors`` (format 2.0; 1.x loads).

The config is the mosaic's diffusers config (the dense U-Net's keys, ``stages`` with the kept heads
and channels of every block, ``shared_producers``, ``dense_reference``, ``meta``) plus ``format``,
``format_version``, ``package_version`` and ``dtype``; it alone builds the skeleton
(`MosaicUNet.__init__`, the dense blocks never allocated), whose every key and shape the weights
are checked against. Crash safety is `mosaicdiff.model_folder`'s (the same guarantees as a
`MosaicDiT` folder).

Format 2.0 adds ``shared_producers``: with it, each block position's producer rows are stored
once (``producer_storage.<j>.*``, `mosaicdiff.unet_shared_producers`) and each stage's blocks
hold only their norms and consumers; it is null for a mosaic whose stages store copies, whose
tensors are those of format 1.0. A 1.x folder (no ``shared_producers``) loads as such a mosaic.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from mosaicdiff import model_folder
from mosaicdiff._version import __version__
from mosaicdiff.config_checks import format_major_minor
from mosaicdiff.serialization import json_safe, resolve_device, resolve_dtype, state_tensors

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_unet_mosaic", "save_unet_mosaic"]

FORMAT_NAME = "mosaicdiff.MosaicUNet"
FORMAT_VERSION = "2.0"
#: The major format versions this package reads.
READABLE_MAJORS = (1, 2)
#: The mosaic's own config keys (the rest are the dense U-Net's).
MOSAIC_KEYS = ("stages", "dense_reference", "meta", "shared_producers")
ENVELOPE_KEYS = ("format", "format_version", "package_version", "dtype", "weights_id")


def save_unet_mosaic(model, save_directory: str | os.PathLike) -> Path:
    """Save `model` crash-safely; see `mosaicdiff.model_folder.save_folder` for the errors."""
    from diffusers import __version__ as diffusers_version

    model_folder.validate_save_directory(save_directory, FORMAT_NAME)
    body = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config = {"_class_name": type(model).__name__, "_diffusers_version": diffusers_version, "format": FORMAT_NAME,
              "format_version": FORMAT_VERSION, "package_version": __version__,
              "dtype": str(model.dtype).removeprefix("torch."), **json_safe(body)}
    header = {"format": "pt", "mosaicdiff_format_version": FORMAT_VERSION}
    target = model_folder.save_folder(save_directory, config, state_tensors(model), header, FORMAT_NAME)
    logger.info("saved MosaicUNet (%d stages) to %s", len(config["stages"]), target)
    return target


def _fail(path: Path, message: str) -> ValueError:
    return ValueError(f"MosaicUNet.from_pretrained: {path}: {message}")


def load_unet_mosaic(cls, directory: str | os.PathLike, *, device=None, torch_dtype=None):
    """Load a folder written by `save_unet_mosaic`.

    Raises:
        FileNotFoundError: a missing folder, config or weights file.
        ValueError: a config that is not a MosaicUNet's (or of another major format version), or
            weights that do not match it (the key named).
        TypeError / RuntimeError: a bad `torch_dtype` / an unavailable `device`.
    """
    torch_dtype, device = resolve_dtype(torch_dtype), resolve_device(device)
    path = Path(directory)
    cfg_path, wpath = path / model_folder.CONFIG_NAME, path / model_folder.WEIGHTS_NAME
    for p in (cfg_path, wpath):
        if not p.is_file():
            raise FileNotFoundError(f"MosaicUNet.from_pretrained: {p} not found (not a saved MosaicUNet)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise _fail(cfg_path, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise _fail(cfg_path, f"format {config.get('format') if isinstance(config, dict) else None!r}, "
                              f"expected {FORMAT_NAME!r}")
    major = format_major_minor(config.get("format_version", "?"), str(cfg_path))[0]
    if major not in READABLE_MAJORS:
        raise _fail(cfg_path, f"format version {config['format_version']}; mosaicdiff {__version__} reads 1.x and 2.x")
    if major == 1 and config.get("shared_producers") is not None:
        raise _fail(cfg_path, "a format 1.x config with shared_producers (introduced in format 2.0)")
    missing = [k for k in (*MOSAIC_KEYS[:1], "dtype") if k not in config]
    if missing:
        raise _fail(cfg_path, f"lacks the key(s) {missing}")
    unet_config = {k: v for k, v in config.items()
                   if k not in MOSAIC_KEYS and k not in ENVELOPE_KEYS and not k.startswith("_")}
    try:
        model = cls(unet_config, config["stages"], dense_reference=config.get("dense_reference"),
                    meta=config.get("meta"), shared_producers=config.get("shared_producers"))
    except (TypeError, ValueError, KeyError) as exc:
        raise _fail(cfg_path, f"the config does not describe a U-Net mosaic ({type(exc).__name__}: {exc})") from None
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise _fail(wpath, f"truncated or corrupt ({type(exc).__name__}: {exc}); save the mosaic again") from None
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in tensors:
            raise _fail(wpath, f"lacks the tensor {key!r} required by the config")
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise _fail(wpath, f"tensor {key!r} has shape {tuple(tensors[key].shape)}, the config expects "
                               f"{tuple(ref.shape)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise _fail(wpath, f"has tensors the config does not describe: {unexpected[:5]}")
    model.load_state_dict(tensors, strict=True, assign=True)
    nn.Module.to(model, device=device, dtype=torch_dtype)
    logger.info("loaded MosaicUNet (%d stages) from %s", model.num_stages, path)
    return model.eval()
