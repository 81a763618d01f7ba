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

The config alone builds the model's skeleton (``cls.from_config``). A folder may come from
anywhere, so loading builds it first on the meta device (`mosaicdiff.core.meta_build`: shapes and
dtypes, no storage) and checks every key, shape and dtype against the weights' safetensors headers
(`mosaicdiff.core.saved_weights`; no tensor read), with errors naming the file, the key and the
config fields that set its shape (the class's ``shape_fields``); a buffer the config derives (a
positional table) may not outgrow the weights. Only then are the tensors read and assigned to the
skeleton built for real (weights left uninitialised: `mosaicdiff.core.weight_init.skip_weight_init`).
Older format majors are upgraded by the class's hooks (``upgrade_saved_config``,
``upgrade_saved_tensors``); family-specific field checks are ``check_saved_config``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mosaicdiff._version import __version__
from mosaicdiff.core import model_folder, quantize
from mosaicdiff.core.atomic_io import json_safe
from mosaicdiff.core.config_fields import FieldChecker, check_stage_fields
from mosaicdiff.core.meta_build import TooManyTensors, floats_on_meta
from mosaicdiff.core.model_folder import CONFIG_NAME, ENVELOPE_KEYS, validate_save_directory
from mosaicdiff.core.saved_weights import WeightsHeader, read_set_header, read_tensors
from mosaicdiff.core.stages import coverage_problem
from mosaicdiff.core.weight_init import skip_weight_init

logger = logging.getLogger(__name__)

__all__ = ["DERIVED_BYTES", "ENVELOPE_KEYS", "check_common_fields", "format_major_minor", "load_model", "read_config",
           "resolve_device", "resolve_dtype", "save_model", "state_tensors"]

#: A buffer the config derives (a positional table) may take as many bytes as the weights, or this
#: many for a small model (a legitimate table is a small fraction of the model; a lying
#: ``sample_size`` asks for gigabytes).
DERIVED_BYTES = 64 * 2**20
#: A config's build may make this many floating tensors per tensor of its weights (a model makes
#: about 1.5: parameters, the dense layers a family reads its shapes from, positional tables).
MAX_TENSORS_PER_WEIGHT = 4
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


def check_common_fields(cls, config: dict, cfg_path: Path, block_keys: tuple[str, ...] = ()) -> FieldChecker:
    """The fields every mosaic's config has; returns the checker for the family's own checks."""
    for key in ("format_version", "dtype", "stages"):
        if key not in config:
            raise ValueError(f"{cls.__name__}.from_pretrained: {cfg_path} lacks the key {key!r}")
    need = FieldChecker(f"{cls.__name__}.from_pretrained: {cfg_path}")
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
    check_stage_fields(config["stages"], need, block_keys)
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
    spec = quantize.quantization_spec(model)
    if spec is not None:  # read back by load_model (a "_" key: not a constructor argument)
        config["_quantization"] = spec
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


def _set_dtype(config: dict, variant: str | None) -> str:
    return config["dtype"] if variant is None else config["variants"][variant]["dtype"]


def _read_weight_set(cls, path: Path, config: dict, variant: str | None) -> tuple[dict, WeightsHeader]:
    """``(config, header)``: the header of the weights set `variant` the config lists, paired by
    id (`model_folder.locate_weights`; an interrupted save's staged set, a concurrent save's newer
    config). No tensor is read."""
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
    header = read_set_header(who, where)
    got = header.weights_id
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
    return config, header


def _build(cls, config: dict, cfg_path: Path, *, meta: WeightsHeader | None = None):
    """The model `config` describes, weights uninitialised (quantized as its ``_quantization``
    says); with `meta` (the weights' header), its floating tensors on the meta device (shapes and
    dtypes only: `mosaicdiff.core.meta_build`), and no more of them than `MAX_TENSORS_PER_WEIGHT`
    per tensor of the weights."""
    model = _build_unquantized(cls, config, cfg_path, meta=meta)
    spec = config.get("_quantization")
    if spec is not None:
        try:
            quantize.quantize_layout(model, spec)
        except ValueError as exc:
            raise ValueError(f"{cls.__name__}.from_pretrained: {cfg_path}: _quantization: {exc}") from None
    return model


def _build_unquantized(cls, config: dict, cfg_path: Path, *, meta: WeightsHeader | None = None):
    body = {k: v for k, v in config.items() if not k.startswith("_")}
    limit = None if meta is None else MAX_TENSORS_PER_WEIGHT * len(meta.tensors) + 1000
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(skip_weight_init())  # the weights are assigned after the checks
            if meta is not None:
                stack.enter_context(floats_on_meta(limit))
            return cls.from_config(body)
    except TooManyTensors:
        raise ValueError(f"{cls.__name__}.from_pretrained: {cfg_path}: the config describes a model of more than "
                         f"{limit} tensors, but {meta.where} holds {len(meta.tensors)}: a layer or block count of "
                         f"the config does not fit its weights") from None
    except Exception as exc:  # noqa: BLE001 - a config from disk: whatever its constructor raised, said in one line
        if meta is None and not isinstance(exc, (TypeError, ValueError, KeyError, AttributeError)):
            raise  # (the meta build of the same config succeeded: a real failure, e.g. out of memory)
        message = " ".join(str(exc).split())
        if not message.startswith("stage"):
            message = f"the config does not describe a {cls.__name__} ({type(exc).__name__}: {message})"
        raise ValueError(f"{cls.__name__}.from_pretrained: {cfg_path}: {message}") from None


def _fields(cls, key: str, config: dict) -> str:
    """`` (from <field>=<value>, ... in config.json)``: the config fields that set the shape of
    tensor `key` (the family's `shape_fields`), or nothing."""
    for prefix, names in cls.shape_fields:
        if key.startswith(prefix):
            shown = []
            for f in names:
                value = repr(config.get(f))
                shown.append(f"{f}={value}" if len(value) <= 40 else f)
            return f" (set by {', '.join(shown)} in {CONFIG_NAME})"
    return ""


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _check_layout(cls, skeleton: nn.Module, header: WeightsHeader, dtype: torch.dtype, config: dict,
                  cfg_path: Path) -> None:
    """Every tensor of the skeleton (built on meta) against the header: present, of the same shape,
    of the config's dtype (floating ones; others the skeleton's); none left over; and no buffer the
    config derives (a positional table) larger than the weights it goes with, or `DERIVED_BYTES`."""
    who = f"{cls.__name__}.from_pretrained"
    expected, stored_as_is = skeleton.state_dict(), quantize.quantized_keys(skeleton)
    for key, ref in expected.items():
        info = header.tensors.get(key)
        if info is None:
            raise ValueError(f"{who}: {header.where} lacks the tensor {key!r} required by the config")
        if info.shape != tuple(ref.shape):
            raise ValueError(f"{who}: tensor {key!r} in {info.file} has shape {info.shape}, the config expects "
                             f"{tuple(ref.shape)}{_fields(cls, key, config)}")
        want = dtype if ref.is_floating_point() and key not in stored_as_is else ref.dtype
        if info.dtype != want:
            raise ValueError(f"{who}: tensor {key!r} in {info.file} has dtype {info.dtype}, the config says "
                             f"{want}{' (its dtype field)' if want == dtype else ''}")
    unexpected = sorted(set(header.tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{who}: {header.where} has tensors the config does not describe: "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    budget = max(header.nbytes, DERIVED_BYTES)
    for name, buf in skeleton.named_buffers():
        nbytes = buf.numel() * buf.element_size()
        if name not in expected and nbytes > budget:
            raise ValueError(f"{who}: {cfg_path}: the config makes the buffer {name!r} {tuple(buf.shape)}, "
                             f"{_mib(nbytes)}, more than the {_mib(header.nbytes)} of weights it goes with"
                             f"{_fields(cls, name, config)}; refusing a config that does not fit its weights")


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
    config, header = _read_weight_set(cls, path, config, variant)
    header = header.renamed(cls.upgrade_saved_tensors(config, {k: k for k in header.tensors}))
    dtype = getattr(torch, _set_dtype(config, variant))
    # An untrusted config is checked against the weights before anything is allocated.
    _check_layout(cls, _build(cls, config, cfg_path, meta=header), header, dtype, config, cfg_path)
    tensors = read_tensors(who, header)
    model = _build(cls, config, cfg_path)
    state = {key: tensors[key] for key in model.state_dict()}
    model.load_state_dict(state, strict=True, assign=True)
    # (not ModelMixin.to: it warns about fp32 modules on every cast, diffusers 0.42, and we have none;
    # the float8 weights and scales of a quantized mosaic keep their dtype)
    quantize.cast_unquantized(model, dtype=dtype)  # the non-persistent buffers (sin-cos positions) follow the weights
    if device is not None or torch_dtype is not None:
        quantize.cast_unquantized(model, device, torch_dtype)
    model.eval()
    logger.info("loaded %s (%d stages%s) from %s", cls.__name__, model.num_stages,
                f", variant {variant}" if variant else "", path)
    return model
