"""Saving and loading a mosaic (`mosaicdiff.core.model.MosaicModel`) as a folder: ``config.json``
+ ``model.safetensors``. One serializer for every family.

Layout::

    <dir>/config.json         the model's diffusers config (``_class_name``, the dense model's
                              architecture keys, ``stages`` with their kept units per block,
                              ``shared_producers``, ``dense_reference``, ``meta``, family keys) plus
                              ``format`` (the class's `format_name`), ``format_version``,
                              ``package_version``, ``dtype`` and ``weights_id``: the dtype of the
                              default weights and the id of the save that wrote them; and, when
                              variants were saved, ``variants``: ``{name: {"weights_id", "dtype"}}``
    <dir>/model.safetensors   the model's state dict, each tensor once; its header repeats
                              ``mosaicdiff_weights_id`` (the default weights, one file: the default)

Sharded (``save_pretrained(max_shard_size="5GB")``, as hubs ship big transformers) the default
weights are instead::

    <dir>/model-00001-of-0000N.safetensors ...   the tensors, split in order into files of at most
                              max_shard_size (a larger tensor alone); each header repeats the id
    <dir>/model.safetensors.index.json           {"metadata": {"total_size": bytes,
                              "mosaicdiff_weights_id": id, ...}, "weight_map": {tensor: shard file}}

A variant (``save_pretrained(variant="fp16")``, read by ``from_pretrained(variant="fp16")``) is
another set of the same model's weights, named as diffusers names them: ``model.fp16.safetensors``,
or ``model.fp16-00001-of-0000N.safetensors`` ... with ``model.safetensors.index.fp16.json``; its
id and dtype are ``variants["fp16"]`` in the config. A folder may hold the default set and any
variants (a save keeps the other sets when the config is unchanged), or only variants. Which files
belong to which save, and how a save stays crash-safe, is `mosaicdiff.core.model_folder`'s job.

The config alone builds the model's skeleton (``cls.from_config``, weights left uninitialised:
`mosaicdiff.core.weight_init.skip_weight_init`); loading then checks every key, shape and dtype of the
weights against that skeleton, with errors naming the file and the key, and assigns them. Older
format majors are upgraded by the class's hooks (``upgrade_saved_config``, ``upgrade_saved_tensors``);
family-specific field checks are ``check_saved_config``.
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

from mosaicdiff._version import __version__
from mosaicdiff.core import model_folder
from mosaicdiff.core.atomic_io import json_safe
from mosaicdiff.core.model_folder import CONFIG_NAME, ENVELOPE_KEYS, validate_save_directory
from mosaicdiff.core.stages import coverage_problem

logger = logging.getLogger(__name__)

__all__ = ["ENVELOPE_KEYS", "format_major_minor", "load_model", "read_config", "resolve_device", "resolve_dtype",
           "save_model", "state_tensors"]

#: torch_dtype names accepted by `load_model`.
DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32,
}


def format_major_minor(version: str, what: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(version).split(".")[:2])
    except ValueError:
        raise ValueError(f"{what}: format_version must look like 'MAJOR.MINOR', got {version!r}") from None
    return major, minor


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Checker:
    """``need(ok, field, expected, got)``: ValueError ``<Class>.from_pretrained: <file>: <field> must be ...``."""

    def __init__(self, cls_name: str, cfg_path: Path):
        self.prefix = f"{cls_name}.from_pretrained: {cfg_path}"

    def __call__(self, ok: bool, field: str, expected: str, got: Any) -> None:
        if not ok:
            r = repr(got)
            r = r if len(r) <= 60 else r[:57] + "..."
            raise ValueError(f"{self.prefix}: {field} must be {expected}, got {r}")


def check_common_fields(cls, config: dict, cfg_path: Path, block_keys: tuple[str, ...] = ()) -> _Checker:
    """The fields every mosaic's config has; returns the checker for the family's own checks."""
    for key in ("format_version", "dtype", "stages"):
        if key not in config:
            raise ValueError(f"{cls.__name__}.from_pretrained: {cfg_path} lacks the key {key!r}")
    need = _Checker(cls.__name__, cfg_path)
    need(isinstance(config["format_version"], str), "format_version", "a string", config["format_version"])
    need(isinstance(config["dtype"], str), "dtype", "a string", config["dtype"])
    dtype = getattr(torch, config["dtype"], None)
    need(isinstance(dtype, torch.dtype) and dtype.is_floating_point, "dtype", "a torch float dtype name",
         config["dtype"])
    ref = config.get("dense_reference")
    need(ref is None or isinstance(ref, dict), "dense_reference", "an object", ref)
    need(config.get("meta") is None or isinstance(config["meta"], dict), "meta", "an object", config.get("meta"))
    need(isinstance(config.get("weights_id", ""), str), "weights_id", "a string", config.get("weights_id"))
    variants = config.get("variants", {})
    need(isinstance(variants, dict), "variants", "an object", variants)
    for name, entry in variants.items():
        need(isinstance(entry, dict) and isinstance(entry.get("weights_id"), str), f"variants.{name}",
             "an object with a string weights_id", entry)
        v_dtype = getattr(torch, str(entry.get("dtype")), None)
        need(isinstance(v_dtype, torch.dtype) and v_dtype.is_floating_point, f"variants.{name}.dtype",
             "a torch float dtype name", entry.get("dtype"))
    need(isinstance(config["stages"], list), "stages", "a list", config["stages"])
    need(len(config["stages"]) > 0, "stages", "a non-empty list", config["stages"])
    for i, s in enumerate(config["stages"]):
        need(isinstance(s, dict), f"stages[{i}]", "an object", s)
        need(isinstance(s.get("name"), str), f"stages[{i}].name", "a string", s.get("name"))
        for key in ("t_start", "t_end"):
            need(_is_int(s.get(key)), f"stages[{i}].{key}", "an integer", s.get(key))
        need(_is_number(s.get("sparsity")), f"stages[{i}].sparsity", "a number", s.get("sparsity"))
        blocks = s.get("blocks")
        need(isinstance(blocks, list), f"stages[{i}].blocks", "a list", blocks)
        for j, b in enumerate(blocks):
            for key in block_keys:
                v = b.get(key) if isinstance(b, dict) else None
                need(isinstance(v, list) and all(_is_int(x) for x in v), f"stages[{i}].blocks[{j}].{key}",
                     "a list of integers", v)
    return need


# ------------------------------------------------------------------ save


def state_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Flat name -> contiguous CPU tensor; tensors sharing memory are cloned (safetensors rule).
    With `dtype`, floating tensors of another dtype are cast to it (a layerwise-cast model's)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_model(model, save_directory: str | os.PathLike, *, variant: str | None = None,
               max_shard_size: int | str | None = None) -> Path:
    """Save a mosaic (its public ``config`` and ``state_dict``) into a folder, crash-safely.

    Args:
        variant: save the weights set of this name (``"fp16"``: ``model.fp16.safetensors``).
        max_shard_size: shard the weights into files of at most this size (``"5GB"``, bytes);
            None (default): one ``model.safetensors``.

    A layerwise-cast model (``enable_layerwise_casting``) is saved in its compute dtype.

    Raises:
        FileExistsError / NotADirectoryError / PermissionError: see `validate_save_directory`.
        BlockingIOError: another save into the same folder is in progress.
        ValueError: the stages do not cover the model's timesteps (the model could not be loaded),
            or an invalid `variant` / `max_shard_size`.
        OSError: writing failed (e.g. disk full); the folder is left as it was.
    """
    cls = type(model)
    variant = model_folder.check_variant(variant)
    if max_shard_size is not None:
        model_folder.parse_size(max_shard_size)  # argument errors before any work
    validate_save_directory(save_directory, cls.format_name)
    from diffusers import __version__ as diffusers_version

    casting = model.__dict__.get("_layerwise_casting")
    body = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config = {"_class_name": cls.__name__, "_diffusers_version": diffusers_version,
              "format": cls.format_name, "format_version": cls.format_version, "package_version": __version__,
              "dtype": str(model.dtype).removeprefix("torch."), **json_safe(body)}
    problem = coverage_problem(config["stages"], config.get("meta"))
    if problem:
        raise ValueError(f"save_pretrained: cannot save this {cls.__name__}: {problem}")
    header = {"format": "pt", "mosaicdiff_format_version": cls.format_version}
    tensors = state_tensors(model, casting["compute_dtype"] if casting else None)
    target = model_folder.save_folder(save_directory, config, tensors, header, cls.format_name,
                                      variant=variant, max_shard_size=max_shard_size)
    logger.info("saved %s (%d stages%s) to %s", cls.__name__, len(config["stages"]),
                f", variant {variant}" if variant else "", target)
    return target


# ------------------------------------------------------------------ load


def read_config(cls, directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the ``config.json`` of a saved mosaic of class `cls` (older majors upgraded).

    Raises:
        FileNotFoundError: the directory or its config is missing.
        ValueError: the config is not valid JSON, not a `cls` config, lacks a key, has a field of
            the wrong type (named), stages that do not cover the timesteps, or an incompatible
            format version (both versions are named).
    """
    name = cls.__name__
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{name}.from_pretrained: {path} is not a directory")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{name}.from_pretrained: {cfg_path} not found (not a saved {name})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{name}.from_pretrained: {cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != cls.format_name:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{name}.from_pretrained: {cfg_path} has format {found!r}, expected {cls.format_name!r}")
    if "format_version" not in config:
        raise ValueError(f"{name}.from_pretrained: {cfg_path} lacks the key 'format_version'")
    saved = format_major_minor(config["format_version"], str(cfg_path))
    ours = format_major_minor(cls.format_version, "mosaicdiff")
    if saved[0] not in cls.readable_majors:
        raise ValueError(
            f"{name}.from_pretrained: {path} has format version {config['format_version']} "
            f"(written by mosaicdiff {config.get('package_version', '?')}), but mosaicdiff {__version__} "
            f"reads format versions {', '.join(f'{m}.x' for m in cls.readable_majors)} (writes "
            f"{cls.format_version}); re-save it with a matching version"
        )
    if saved[0] == ours[0] and saved[1] > ours[1]:
        logger.warning("%s has format version %s, newer than %s read by mosaicdiff %s; unknown fields are ignored",
                       path, config["format_version"], cls.format_version, __version__)
    config = cls.upgrade_saved_config(config, cfg_path, saved[0])
    cls.check_saved_config(config, cfg_path)
    problem = coverage_problem(config["stages"], config.get("meta"))
    if problem:
        raise ValueError(f"{name}.from_pretrained: {cfg_path}: {problem}")
    return config


def _read_weights(cls, wpath: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """All tensors of a weights file and its save id."""
    if not wpath.is_file():
        raise FileNotFoundError(f"{cls.__name__}.from_pretrained: {wpath} not found")
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {}).get(model_folder.WEIGHTS_ID_KEY)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"{cls.__name__}.from_pretrained: {wpath} is truncated or corrupt ({type(exc).__name__}: {exc}); "
            f"save the mosaic again"
        ) from None


def _read_sharded(cls, where: model_folder.WeightsLocation) -> tuple[dict[str, torch.Tensor], str | None]:
    """All tensors of a sharded set (its index at ``where.path``) and the index's save id; every
    shard must carry that id and hold exactly the tensors the index maps to it."""
    who, index = f"{cls.__name__}.from_pretrained", where.path
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        want = (data.get("metadata") or {}).get(model_folder.WEIGHTS_ID_KEY)
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{who}: {index} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                         f"save the mosaic again") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard.startswith("."):
            raise ValueError(f"{who}: {index} maps tensors to {shard!r}, not a file of the folder")
        copies = [d / shard for d in where.search if (d / shard).is_file()]
        if not copies:
            raise FileNotFoundError(f"{who}: {index.parent / shard} not found (a shard {index.name} lists); "
                                    f"save the mosaic again")
        pick = next((c for c in copies if model_folder.weights_id(c) == want), copies[0])
        part, shard_id = _read_weights(cls, pick)
        if want is not None and shard_id != want:
            raise ValueError(f"{who}: {pick} is a shard of another save (weights_id {shard_id!r}) than "
                             f"{index} ({want!r}); save the mosaic again")
        for key in part:
            if weight_map.get(key) != shard:
                raise ValueError(f"{who}: {pick} holds the tensor {key!r}, which {index.name} maps to "
                                 f"{weight_map.get(key)!r}")
        tensors.update(part)
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{who}: {index} lists tensors its shards lack: {missing[:5]}")
    return tensors, want


def _set_dtype(config: dict, variant: str | None) -> str:
    return config["dtype"] if variant is None else config["variants"][variant]["dtype"]


def _read_weight_set(cls, path: Path, config: dict, variant: str | None):
    """``(config, tensors, where)``: the weights set `variant` the config lists, paired by id
    (`model_folder.locate_weights`; an interrupted save's staged set, a concurrent save's newer
    config); `where` names the file or index read."""
    who = f"{cls.__name__}.from_pretrained"
    sets = model_folder.config_sets(config)
    name = model_folder.weights_name(variant)
    if variant not in sets:
        held = ", ".join("the default weights" if v is None else f"variant {v!r}" for v in sets)
        raise FileNotFoundError(f"{who}: {path / name} not found: {path} holds {held} (pass "
                                f"{'variant=...' if variant is None else 'another variant'})")
    want = sets[variant]
    where = model_folder.locate_weights(path, variant, want)
    if where is None:
        raise FileNotFoundError(f"{who}: {path / name} not found")
    tensors, got = _read_sharded(cls, where) if where.kind == "index" else _read_weights(cls, where.path)
    if where.staged:
        # A save was interrupted after committing config.json: its complete weights are staged.
        logger.warning("%s: loading the weights of an interrupted save from %s; save again to tidy up",
                       path, where.path.parent.name)
    elif want is not None and got != want and got is not None:  # (no id: rewritten by hand, shapes checked)
        newer = read_config(cls, path)  # a concurrent save may have committed since we read the config
        if model_folder.config_sets(newer).get(variant) != got:
            raise ValueError(
                f"{who}: {where.path} is not the weights {path / CONFIG_NAME} was saved with (weights_id "
                f"{got!r}, expected {want!r}); save the mosaic again")
        config = newer
    return config, tensors, where.path


def _check_tensor(cls, key: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                  where: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{cls.__name__}.from_pretrained: {where} lacks the tensor {key!r} required by the config")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{cls.__name__}.from_pretrained: tensor {key!r} in {where} has shape {tuple(t.shape)}, "
                         f"the config expects {tuple(shape)}")
    if t.is_floating_point() and t.dtype != dtype:
        raise ValueError(f"{cls.__name__}.from_pretrained: tensor {key!r} in {where} has dtype {t.dtype}, "
                         f"the config says {dtype}")
    return t


def resolve_dtype(torch_dtype: Any, who: str = "from_pretrained") -> torch.dtype | None:
    if torch_dtype is None or (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        return torch_dtype
    if isinstance(torch_dtype, str) and torch_dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[torch_dtype.removeprefix("torch.")]
    raise TypeError(f"{who}: torch_dtype must be a floating torch.dtype or one of "
                    f"{', '.join(map(repr, DTYPE_NAMES))}, got {torch_dtype!r}")


def resolve_device(device: Any, who: str = "from_pretrained") -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{who}: device {device!r} is not a torch device; use 'cpu', "
                         f"'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RuntimeError(f"{who}: device {device!r} requested, but no CUDA device is "
                               f"available (torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= count:
            raise RuntimeError(f"{who}: device {device!r} requested, but only {count} CUDA device(s) exist")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"{who}: device {device!r} requested, but MPS is not available; use device='cpu'")
    return dev


def load_model(cls, directory: str | os.PathLike, *, device=None, torch_dtype=None, variant: str | None = None):
    """Load a mosaic of class `cls` saved by `save_model`; see ``MosaicModel.from_pretrained``."""
    from mosaicdiff.core.weight_init import skip_weight_init

    who = f"{cls.__name__}.from_pretrained"
    torch_dtype = resolve_dtype(torch_dtype, who)  # argument errors first, before any reading
    device = resolve_device(device, who)
    try:
        variant = model_folder.check_variant(variant)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None
    path = Path(directory)
    config = read_config(cls, path)
    cfg_path = path / CONFIG_NAME
    config, tensors, where = _read_weight_set(cls, path, config, variant)
    tensors = cls.upgrade_saved_tensors(config, tensors)
    dtype = getattr(torch, _set_dtype(config, variant))
    try:
        with skip_weight_init():  # the weights are assigned below
            model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        message = str(exc)
        if not message.startswith("stage"):
            message = f"the config does not describe a {cls.__name__} ({type(exc).__name__}: {exc})"
        raise ValueError(f"{who}: {cfg_path}: {message}") from None
    expected = model.state_dict()
    state = {key: _check_tensor(cls, key, tensors, tuple(ref.shape), dtype, where) for key, ref in expected.items()}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{who}: {where} has tensors the config does not describe: "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    # nn.Module.to: ModelMixin.to warns about fp32 modules on every cast (diffusers 0.42), we have none
    nn.Module.to(model, dtype)  # the non-persistent buffers (sin-cos positions) follow the weights
    if device is not None or torch_dtype is not None:
        nn.Module.to(model, device=device, dtype=torch_dtype)
    model.eval()
    logger.info("loaded %s (%d stages%s) from %s", cls.__name__, model.num_stages,
                f", variant {variant}" if variant else "", path)
    return model
