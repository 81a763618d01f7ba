"""Saving and loading a `MosaicDiT` as a directory: ``config.json`` + ``model.safetensors``.

Layout::

    <dir>/config.json         format + version, package version, dtype, the dense model's config
                              (to rebuild the shared skeleton), runtime shapes, the stages (name,
                              t_start, t_end, sparsity, kept heads and channels per block), meta,
                              and ``weights_id``: the id of the save that wrote the weights
    <dir>/model.safetensors   "shared.<name>" (skeleton state) and
                              "stages.<i>.blocks.<j>.<field>" (compact block weights); its header
                              metadata repeats ``mosaicdiff_weights_id``

Save semantics (as diffusers' ``save_pretrained``): the two files are written into the folder next
to whatever else is there; nothing else in it is touched. A missing folder (and its parents) is
created; folders and files get the modes the umask gives. A folder holding another kind of model
(a foreign ``config.json``, a diffusers pipeline, weights without a MosaicDiT config) is refused,
before anything is written (`validate_save_directory`, which callers run before long work).

Crash safety. Both files are first written and fsynced in a hidden staging folder inside the target
(``.mosaicdiff-staging-<weights_id>/``, which also catches safetensors' own temp file), then moved
into place with ``os.replace``: config.json first -- that rename is the commit -- then the weights.
A crash before the commit leaves the old model; a crash between the two renames leaves the new
config next to the old weights, which the loader detects by ``weights_id`` and resolves by reading
the new, complete weights from the staging folder. So a crash at any point leaves the old or the new
model loadable, and a new config is never paired with old weights (nor the reverse); weights without
an id (rewritten by hand) are accepted on their shapes alone. The next save into the folder finishes
such an interrupted commit and removes staging leftovers (cleanup on start), and removes the hidden
``.NAME.tmp-*`` / ``.NAME.old-*`` sibling folders killed saves of earlier versions left.

Concurrency: a save holds an exclusive ``flock`` on the target folder; a second save into the same
folder fails at once with `BlockingIOError` (platforms without ``fcntl`` save unlocked).

Loading validates the format version, every config field's type, the stage coverage, the presence
and integrity of the weights, and every key and shape against the config, with errors naming the
file and the key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
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
    "validate_save_directory",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "mosaicdiff.MosaicDiT"
#: "major.minor": a different major cannot be read; a newer minor is read with a warning.
#: 1.1 adds ``weights_id`` (optional: 1.0 folders load without the pairing check).
FORMAT_VERSION = "1.1"
#: Hidden per-save folder inside the target; its name ends with the save's weights_id.
STAGING_PREFIX = ".mosaicdiff-staging-"
_PROBE_PREFIX = ".mosaicdiff-probe-"
_WEIGHTS_ID_KEY = "mosaicdiff_weights_id"
#: torch_dtype names accepted by `load_mosaic`.
DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32,
}

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


def _other_model(folder: Path) -> str | None:
    """What other kind of model `folder` holds (saving would clobber or confuse it), or None."""
    cfg = folder / CONFIG_NAME
    if cfg.exists():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"a {CONFIG_NAME} that is not valid JSON"
        if isinstance(data, dict) and data.get("format") == FORMAT_NAME:
            return None
        kind = data.get("_class_name") if isinstance(data, dict) else None
        return f"the {CONFIG_NAME} of another model ({kind})" if kind else f"a {CONFIG_NAME} of another kind"
    if (folder / "model_index.json").exists():
        return "a diffusers pipeline (model_index.json)"
    if (folder / WEIGHTS_NAME).exists():
        return f"a {WEIGHTS_NAME} without a MosaicDiT {CONFIG_NAME}"
    return None


def write_probe_error(folder: Path) -> OSError | None:
    """Create and remove a probe file in `folder` (the only test that also holds for root and
    ACLs); the error it raised, or None when the folder is writable."""
    probe = folder / f"{_PROBE_PREFIX}{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        return exc
    return None


def _probe_writable(folder: Path, target: Path) -> None:
    exc = write_probe_error(folder)
    if exc is not None:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(
                f"save_pretrained: cannot write into {folder} ({exc.strerror}); "
                f"choose a folder you can write to for {target}"
            ) from None
        raise OSError(f"save_pretrained: cannot write into {folder} ({exc.strerror or exc})") from None


def validate_save_directory(path: str | os.PathLike) -> Path:
    """Check that a mosaic can be saved to `path`, before any long work; writes nothing.

    Accepted: a missing folder (it and its missing parents are created by the save, like
    ``mkdir -p``), an empty folder, a previously saved mosaic, or a folder of unrelated files (the
    model's two files are written next to them). A symlink to a folder is followed.

    Args:
        path (`str` or `os.PathLike`): the folder to save to.

    Returns:
        `Path`: `path` made absolute (symlinks not resolved).

    Raises:
        FileExistsError: `path` is a file or a dangling symlink, or a folder holding another kind
            of model (a foreign ``config.json``, a diffusers pipeline, or a ``model.safetensors``
            without a MosaicDiT config).
        NotADirectoryError: a parent of `path` is a file.
        PermissionError: the folder (or, if missing, its nearest existing parent) is not writable.
        OSError: the write probe failed otherwise (e.g. no free inodes).
    """
    target = Path(path).absolute()
    if target.is_symlink() and not target.exists():
        raise FileExistsError(
            f"save_pretrained: {target} is a symlink to a missing folder ({os.readlink(target)}); "
            f"create that folder or remove the link"
        )
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"save_pretrained: {target} exists and is a file, not a folder; choose a folder path")
        other = _other_model(target)
        if other:
            raise FileExistsError(
                f"save_pretrained: {target} holds {other}; saving a MosaicDiT there would overwrite or "
                f"mix with it; choose an empty or new folder"
            )
        _probe_writable(target, target)
        return target
    parent = target.parent
    while not (parent.exists() or parent.is_symlink()):
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"save_pretrained: cannot create {target}: {parent} is a file, not a folder")
    _probe_writable(parent, target)
    return target


def _weights_id(path: Path) -> str | None:
    """The save id in a weights file's header (None for unreadable or pre-1.1 files)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get(_WEIGHTS_ID_KEY)
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Hold an exclusive flock on `folder` (its own fd: no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; saves are not serialised
        yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(
                f"save_pretrained: another save into {folder} is in progress; wait for it to finish "
                f"or save to another folder"
            ) from None
        except OSError:  # a file system without flock (some NFS mounts): save unlocked
            logger.debug("flock unsupported on %s; saving without a lock", folder)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_json_dict(folder: Path) -> dict | None:
    """The parsed config.json of `folder` if it is a JSON object, else None."""
    try:
        data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finish_interrupted_save(target: Path) -> None:
    """Cleanup on start (under the lock): complete a commit a crash interrupted, drop staging leftovers."""
    leftovers = sorted(target.glob(f"{STAGING_PREFIX}*"))
    if not leftovers:
        return
    want = (_read_json_dict(target) or {}).get("weights_id")
    staged = target / f"{STAGING_PREFIX}{want}" / WEIGHTS_NAME
    if want and _weights_id(target / WEIGHTS_NAME) != want and _weights_id(staged) == want:
        os.replace(staged, target / WEIGHTS_NAME)  # config.json was committed: roll forward
        _fsync_path(target)
        logger.warning("%s: completed a save that was interrupted after its commit", target)
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)


def _remove_legacy_leftovers(target: Path) -> None:
    """Remove the hidden sibling folders (".NAME.tmp-*", ".NAME.old-*") that killed saves of earlier
    versions left beside the target, if they hold only a model's files (or safetensors' ".tmp*")."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    with contextlib.suppress(OSError):
        for p in target.parent.iterdir():
            if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink() \
                    and all(c.name in (CONFIG_NAME, WEIGHTS_NAME) or c.name.startswith(".tmp") for c in p.iterdir()):
                shutil.rmtree(p, ignore_errors=True)


def _write_failed(what: Path, target: Path, exc: BaseException) -> OSError:
    err = OSError(
        f"save_pretrained: writing {what.name} into {target} failed ({getattr(exc, 'strerror', None) or exc}); "
        f"the folder was left as it was; free disk space or fix the folder, then save again"
    )
    err.errno = getattr(exc, "errno", None)
    return err


def _write_json(path: Path, data: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0o666 & ~umask
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_mosaic(mosaic, save_directory: str | os.PathLike) -> Path:
    """Save a `MosaicDiT` into a folder, crash-safely (see the module docstring).

    Args:
        mosaic (`MosaicDiT`): the model.
        save_directory (`str` or `os.PathLike`): the folder; created if missing. Only its
            ``config.json`` and ``model.safetensors`` are replaced; other files stay.

    Returns:
        `Path` of the saved folder (absolute).

    Raises:
        FileExistsError / NotADirectoryError / PermissionError: see `validate_save_directory`.
        BlockingIOError: another save into the same folder is in progress.
        ValueError: the stages do not cover the model's timesteps (the model could not be loaded).
        OSError: writing failed (e.g. disk full); the folder is left as it was.
    """
    target = validate_save_directory(save_directory)
    config = _config_dict(mosaic)
    problem = _coverage_problem(config["stages"], config["meta"])
    if problem:
        raise ValueError(f"save_pretrained: cannot save this MosaicDiT: {problem}")
    tensors = _state_tensors(mosaic)
    created = [p for p in (target, *target.parents) if not (p.exists() or p.is_symlink())]  # deepest first
    target.mkdir(parents=True, exist_ok=True)  # modes from the umask
    try:
        with _folder_lock(target):
            validate_save_directory(target)  # again under the lock: the folder may have changed
            _finish_interrupted_save(target)
            _commit(target, config, tensors)
    except BaseException:
        for p in created:  # a failed first save leaves no empty folders behind
            try:
                p.rmdir()
            except OSError:
                break
        raise
    _remove_legacy_leftovers(Path(save_directory).absolute())
    logger.info("saved MosaicDiT (%d stages) to %s", len(config["stages"]), target)
    return target


def _commit(target: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Stage both files, then rename config.json (the commit) and the weights into `target`."""
    weights_id = config["weights_id"] = secrets.token_hex(8)
    staging = target / f"{STAGING_PREFIX}{weights_id}"
    staging.mkdir()
    try:
        try:
            save_file(tensors, str(staging / WEIGHTS_NAME),
                      metadata={"format": "pt", "mosaicdiff_format_version": FORMAT_VERSION,
                                _WEIGHTS_ID_KEY: weights_id})
            # safetensors writes 0600: give the weights the mode the umask gave the staging folder
            os.chmod(staging / WEIGHTS_NAME, staging.stat().st_mode & 0o666)
            _fsync_path(staging / WEIGHTS_NAME)
        except (OSError, SafetensorError) as exc:
            raise _write_failed(target / WEIGHTS_NAME, target, exc) from exc
        try:
            _write_json(staging / CONFIG_NAME, config)
        except OSError as exc:
            raise _write_failed(target / CONFIG_NAME, target, exc) from exc
        _fsync_path(staging)
        os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)  # the commit
        _fsync_path(target)
        os.replace(staging / WEIGHTS_NAME, target / WEIGHTS_NAME)
        _fsync_path(target)
    except BaseException:
        # Read the commit from disk, not a flag: an interrupt may land just after the rename.
        committed = (_read_json_dict(target) or {}).get("weights_id") == weights_id
        if committed:  # the new config is in place: its weights must follow
            with contextlib.suppress(OSError):
                os.replace(staging / WEIGHTS_NAME, target / WEIGHTS_NAME)
        if not (staging / WEIGHTS_NAME).exists() or not committed:
            shutil.rmtree(staging, ignore_errors=True)  # else kept: the loader reads it from there
        raise
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coverage_problem(stages: list[dict], meta: Any) -> str | None:
    """Why the stages do not tile [0, T) (every sampling step needs exactly one stage), or None.

    T is ``meta["num_train_timesteps"]`` (written by `mosaicdiff.prune`), else 1000.
    """
    from mosaicdiff.mosaic import NUM_TRAIN_TIMESTEPS

    T = meta.get("num_train_timesteps") if isinstance(meta, dict) else None
    T = T if _is_int(T) and T > 0 else NUM_TRAIN_TIMESTEPS
    spans = sorted(((s["t_start"], s["t_end"], s["name"]) for s in stages), key=lambda x: x[:2])
    need = f"the stages must cover [0, {T}) without gaps or overlaps"
    if spans[0][0] != 0:
        return f"stage {spans[0][2]!r} starts at t={spans[0][0]}, so t in [0, {spans[0][0]}) has no stage; {need}"
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if a1 != b0:
            kind = "overlap" if a1 > b0 else "leave a gap"
            return f"stages {a!r} [{a0}, {a1}) and {b!r} [{b0}, {b1}) {kind}; {need}"
    if spans[-1][1] != T:
        return f"the last stage {spans[-1][2]!r} ends at t={spans[-1][1]}, not at {T}; {need}"
    return None


def _check_config_fields(config: dict, cfg_path: Path) -> None:
    """Type-check every field the loader reads, so that a bad value is named, not a traceback."""

    def need(ok: bool, field: str, expected: str, got: Any) -> None:
        if not ok:
            r = repr(got)
            r = r if len(r) <= 60 else r[:57] + "..."
            raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path}: {field} must be {expected}, got {r}")

    for key, typ, what in (("format_version", str, "a string"), ("dtype", str, "a string"),
                           ("dense_config", dict, "an object"), ("runtime", dict, "an object"),
                           ("dense_reference", dict, "an object"), ("stages", list, "a list")):
        need(isinstance(config[key], typ), key, what, config[key])
    need(config.get("meta") is None or isinstance(config["meta"], dict), "meta", "an object", config.get("meta"))
    need(isinstance(config.get("weights_id", ""), str), "weights_id", "a string", config.get("weights_id"))
    dtype = getattr(torch, config["dtype"], None)
    need(isinstance(dtype, torch.dtype) and dtype.is_floating_point, "dtype", "a torch float dtype name",
         config["dtype"])
    rt = config["runtime"]
    for key in ("num_layers", "width", "num_heads", "head_dim", "mlp_hidden"):
        need(_is_int(rt.get(key)) and rt[key] > 0, f"runtime.{key}", "a positive integer", rt.get(key))
    for key in ("attn_norm_eps", "mlp_norm_eps"):
        need(isinstance(rt.get(key), (int, float)) and not isinstance(rt[key], bool), f"runtime.{key}",
             "a number", rt.get(key))
    need(isinstance(rt.get("shared_embedder"), bool), "runtime.shared_embedder", "true or false",
         rt.get("shared_embedder"))
    need(len(config["stages"]) > 0, "stages", "a non-empty list", config["stages"])
    for i, s in enumerate(config["stages"]):
        need(isinstance(s, dict), f"stages[{i}]", "an object", s)
        need(isinstance(s.get("name"), str), f"stages[{i}].name", "a string", s.get("name"))
        for key in ("t_start", "t_end"):
            need(_is_int(s.get(key)), f"stages[{i}].{key}", "an integer", s.get(key))
        need(isinstance(s.get("sparsity"), (int, float)) and not isinstance(s["sparsity"], bool),
             f"stages[{i}].sparsity", "a number", s.get("sparsity"))
        blocks = s.get("blocks")
        need(isinstance(blocks, list) and len(blocks) == rt["num_layers"], f"stages[{i}].blocks",
             f"a list of {rt['num_layers']} blocks (runtime.num_layers)", blocks)
        for j, b in enumerate(blocks):
            for key in ("kept_heads", "kept_channels"):
                v = b.get(key) if isinstance(b, dict) else None
                need(isinstance(v, list) and all(_is_int(x) for x in v), f"stages[{i}].blocks[{j}].{key}",
                     "a list of integers", v)
    problem = _coverage_problem(config["stages"], config.get("meta"))
    if problem:
        raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path}: {problem}")


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
    _check_config_fields(config, cfg_path)
    return config


def _read_weights(wpath: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """All tensors of a weights file and its save id."""
    if not wpath.is_file():
        raise FileNotFoundError(f"MosaicDiT.from_pretrained: {wpath} not found")
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {}).get(_WEIGHTS_ID_KEY)
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


def _resolve_dtype(torch_dtype: Any) -> torch.dtype | None:
    if torch_dtype is None or (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        return torch_dtype
    if isinstance(torch_dtype, str) and torch_dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[torch_dtype.removeprefix("torch.")]
    raise TypeError(
        f"MosaicDiT.from_pretrained: torch_dtype must be a floating torch.dtype or one of "
        f"{', '.join(map(repr, DTYPE_NAMES))}, got {torch_dtype!r}"
    )


def _resolve_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"MosaicDiT.from_pretrained: device {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RuntimeError(
                f"MosaicDiT.from_pretrained: device {device!r} requested, but no CUDA device is available "
                f"(torch.cuda.is_available() is False); use device='cpu'"
            )
        if dev.index is not None and dev.index >= count:
            raise RuntimeError(f"MosaicDiT.from_pretrained: device {device!r} requested, but only {count} "
                               f"CUDA device(s) exist")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"MosaicDiT.from_pretrained: device {device!r} requested, but MPS is not available; "
                           f"use device='cpu'")
    return dev


def _pair_weights(path: Path, config: dict, tensors: dict, weights_id: str | None):
    """Resolve a config whose ``weights_id`` is not the one in model.safetensors."""
    want = config["weights_id"]
    staged = path / f"{STAGING_PREFIX}{want}" / WEIGHTS_NAME
    if staged.is_file() and _weights_id(staged) == want:
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


def load_mosaic(
    directory: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
):
    """Load a `MosaicDiT` saved by `save_mosaic`.

    Args:
        directory (`str` or `os.PathLike`): the saved mosaic.
        device (`torch.device` or `str`, *optional*): move the model there.
        torch_dtype (`torch.dtype` or `str`, *optional*): cast the model to this dtype; names
            ``"float16"``/``"fp16"``, ``"bfloat16"``/``"bf16"``, ``"float32"``/``"fp32"`` work too.

    Returns:
        `MosaicDiT` (in eval mode).

    Raises:
        TypeError: `torch_dtype` is not a float dtype or one of its names (the valid ones listed).
        ValueError: `device` is not a device; corrupt or truncated weights; an invalid config
            (the file and field named); an incompatible format version; weights that do not match
            the config (missing, unexpected or mis-shaped keys, named) or come from another save.
        RuntimeError: `device` names a CUDA/MPS device this machine does not have.
        FileNotFoundError: missing directory, config or weights.
    """
    from mosaicdiff.mosaic import MosaicDiT, build_skeleton

    torch_dtype = _resolve_dtype(torch_dtype)  # argument errors first, before any reading
    device = _resolve_device(device)
    path = Path(directory)
    config = read_config(path)
    cfg_path = path / CONFIG_NAME
    where = path / WEIGHTS_NAME
    tensors, weights_id = _read_weights(where)
    if config.get("weights_id") not in (None, weights_id):
        config, tensors, where = _pair_weights(path, config, tensors, weights_id)
    dtype = getattr(torch, config["dtype"])
    runtime = config["runtime"]
    head_dim, width = runtime["head_dim"], runtime["width"]

    # 1. Shared skeleton from the dense config, filled from "shared.*".
    try:
        skeleton = build_skeleton(config["dense_config"], runtime).to(dtype)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"MosaicDiT.from_pretrained: {cfg_path}: dense_config does not describe a DiT ({type(exc).__name__}: {exc})"
        ) from None
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
        stages.append(StageSpec(s["name"], s["t_start"], s["t_end"], float(s["sparsity"]), blocks))
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(
            f"MosaicDiT.from_pretrained: {where} has tensors the config does not describe: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )

    try:
        mosaic = MosaicDiT._from_parts(
            config["dense_config"], skeleton, stages, runtime, config["dense_reference"], config.get("meta") or {},
        )
    except (TypeError, ValueError) as exc:  # e.g. kept indices out of range: name the file
        raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path}: {exc}") from None
    if device is not None or torch_dtype is not None:
        mosaic.to(device=device, dtype=torch_dtype)
    logger.info("loaded MosaicDiT (%d stages) from %s", len(stages), path)
    return mosaic
