"""What a command starts from: the model, its calibration data, the labels to sample.

`load_model` and `load_calibration` check a user's files before any long work and say in one
line what is wrong; `digits_calibration` and `sample_labels` are the embedded digits' defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mosaicdiff import zoo
from mosaicdiff.app.errors import one_line

#: The diffusers class `mosaicdiff` prunes (``_class_name`` in a model folder's config.json).
DIT_CLASS_NAME = "DiTTransformer2DModel"
#: (in_channels, sample_size, classes) of the embedded digits DiT, which the demo and eval measure.
DIGITS_SHAPE = (1, 16, 10)


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"model config {path} is not valid JSON ({exc}); restore or re-save the model") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _model_config(p: Path) -> tuple[Path, str | None]:
    """The config.json of a model folder `p` and the subfolder holding it (a pipeline's ``transformer``)."""
    if not p.exists():
        raise FileNotFoundError(f"model folder {p} does not exist; pass a DiT folder, or omit --model for "
                                f"the embedded digits DiT")
    if not p.is_dir():
        raise NotADirectoryError(f"model {p} is a file; pass the folder that holds its config.json")
    if (p / "config.json").is_file():
        return p / "config.json", None
    if (p / "transformer" / "config.json").is_file():
        return p / "transformer" / "config.json", "transformer"
    raise FileNotFoundError(f"model folder {p} has no config.json (nor transformer/config.json): expected a "
                            f"{DIT_CLASS_NAME} folder (save_pretrained), a DiTPipeline folder or a mosaic "
                            f"saved by `mosaicdiff prune`")


def load_model(path: str | None, device: str = "cpu", *, allow_mosaic: bool = True):
    """Load the embedded digits DiT (`path` None), a saved `MosaicDiT` folder, or a diffusers DiT folder.

    A diffusers pipeline folder (with a ``transformer/`` subfolder) is accepted too. The class is
    read from ``_class_name`` in config.json first: another model class is refused (diffusers
    would otherwise build a randomly initialised DiT from its config and load none of its weights).

    Raises:
        FileNotFoundError: `path` or its config.json does not exist.
        NotADirectoryError: `path` is a file.
        ValueError: invalid config.json, another model class, a mosaic where `allow_mosaic` is
            False, or weights diffusers cannot load.
    """
    from mosaicdiff.families.dit.model import MosaicDiT

    if path is None:
        return zoo.load_digits_dit(device)
    p = Path(path)
    config_path, subfolder = _model_config(p)
    config = _read_config(config_path)
    if config.get("format") == MosaicDiT.format_name:
        if not allow_mosaic:
            raise ValueError(f"model {p} is an already pruned MosaicDiT; pass the dense {DIT_CLASS_NAME} "
                             f"it was pruned from")
        return MosaicDiT.from_pretrained(str(p), device=device).eval()
    found = config.get("_class_name")
    if found != DIT_CLASS_NAME:
        what = f"a {found}" if found else "a model without a _class_name"
        raise ValueError(f"model {p} holds {what} ({config_path}), not a {DIT_CLASS_NAME}: mosaicdiff prunes and "
                         f"samples diffusers DiT transformers only")
    from diffusers import DiTTransformer2DModel

    try:
        model = DiTTransformer2DModel.from_pretrained(str(p), subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:  # missing or mismatched weights
        raise ValueError(f"cannot load the {DIT_CLASS_NAME} in {p}: {one_line(exc)}") from None
    return model.to(device).eval()


def load_calibration(path: str | None, model):
    """Calibration data on the model's device: a safetensors file with ``x0`` and ``labels``, or the
    digits for digits-shaped models.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: not a safetensors file, tensors missing or of the wrong kind or shape for
            the model (`Calibration.check_model`), or no file given for a model that is not
            digits-shaped (1 x 16 x 16).
    """
    from mosaicdiff.method.calibrate import Calibration

    null_class = int(model.config.num_embeds_ada_norm)
    model_device = next(model.parameters()).device
    if path is None:
        shape = (int(model.config.in_channels), int(model.config.sample_size))
        if shape != (1, 16):
            raise ValueError(f"no calibration data for a model with (in_channels, sample_size)={shape}; the "
                             f"built-in digits fit (1, 16). Pass --calibration FILE.safetensors with x0 "
                             f"(N, C, H, W) clean latents and labels (N,)")
        calib = digits_calibration(null_class)
        return Calibration(calib.x0.to(model_device), calib.labels.to(model_device), null_class=null_class)
    x0, labels = _read_calibration_file(Path(path))
    try:
        calib = Calibration(x0=x0.float().to(model_device), labels=labels.long().to(model_device),
                            null_class=null_class)
        calib.check_model(model)  # shapes and classes of this model, before any long work
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--calibration {path}: {exc}") from None
    return calib


def _read_calibration_file(p: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hint = "write one with safetensors.torch.save_file({'x0': x0, 'labels': labels}, PATH)"
    if not p.exists():
        raise FileNotFoundError(f"--calibration {p}: no such file; {hint}")
    if not p.is_file():
        raise IsADirectoryError(f"--calibration {p} is a folder; pass the .safetensors file ({hint})")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"--calibration {p} is not a safetensors file ({one_line(exc)}); {hint}") from None
    missing = {"x0", "labels"} - set(tensors)
    if missing:
        raise ValueError(f"--calibration {p} lacks the tensors {sorted(missing)} (has {sorted(tensors)}); {hint}")
    x0, labels = tensors["x0"], tensors["labels"]
    if not x0.is_floating_point():
        raise ValueError(f"--calibration {p}: x0 must be floating point (N, C, H, W) data, got {x0.dtype}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"--calibration {p}: labels must be integer class ids, got {labels.dtype}")
    return x0, labels


def digits_calibration(null_class: int = 10, split: str = "train"):
    """A `Calibration` from the real digits (`zoo.data`; `split` "train" = the DiT's training split, or "all")."""
    from mosaicdiff.method.calibrate import Calibration
    from mosaicdiff.zoo.data import load_digits_tensors, train_test_split

    images, labels = load_digits_tensors()
    if split == "train":
        idx, _ = train_test_split(len(images))
        images, labels = images[idx], labels[idx]
    elif split != "all":
        raise ValueError(f"digits_calibration: split must be 'train' or 'all', got {split!r}")
    return Calibration(x0=images, labels=labels, null_class=null_class)


def load_digits_shaped_model(path: str):
    """`load_model` for the demo and eval, which measure digits: a dense DiT shaped like the embedded one.

    Raises:
        ValueError: a model that is not shaped like the digits DiT (1 channel, 16 x 16, 10 classes),
            and every error of `load_model`.
    """
    model = load_model(path, allow_mosaic=False)
    cfg = model.config
    shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.num_embeds_ada_norm))
    if shape != DIGITS_SHAPE:
        raise ValueError(f"--model {path}: (in_channels, sample_size, classes) = {shape}, but the demo and "
                         f"eval measure digits {DIGITS_SHAPE}; use `mosaicdiff prune` for other models")
    return model


def sample_labels(num_samples: int, num_classes: int = 10) -> torch.Tensor:
    """Balanced labels 0, 1, ..., 9, 0, 1, ... (a grid with 10 columns shows one digit per column)."""
    return torch.arange(num_samples) % num_classes
