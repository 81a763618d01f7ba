"""A saved model folder on disk: ``config.json`` + the weights, written crash-safely.

diffusers' ``save_pretrained`` writes its files in place: a crash leaves a torn folder, or a new
config next to old weights of the same shapes, which loads silently wrong. This helper keeps the
guarantees diffusers lacks; files are written with `mosaicdiff.core.atomic_io`.

Weights sets. A folder holds one model (one ``config.json``) and one or more sets of its weights,
named as diffusers names them, from our ``model.safetensors``:

- the default set (no variant): ``model.safetensors``, or sharded (``max_shard_size``) as
  ``model-00001-of-0000N.safetensors`` ... with the index ``model.safetensors.index.json``
  (``{"metadata": {"total_size", "mosaicdiff_weights_id", ...}, "weight_map": {tensor: shard}}``);
- a variant ``v`` (``variant="fp16"``): ``model.v.safetensors``, or ``model.v-00001-of-0000N.safetensors``
  ... with ``model.safetensors.index.v.json``.

Every set has a ``weights_id`` (the id of the save that wrote it): in ``config.json`` (the default
set's as ``weights_id``, a variant's in ``variants[v].weights_id``), in the header of each of its
safetensors files and in its index's metadata. The loader pairs them (`locate_weights`). A save
writes one set: the sets of the folder's other variants are kept when the config is unchanged (the
same model in another dtype, as diffusers' variants) and removed otherwise; files of the set's
previous layout (a single file replaced by shards, a different shard count) are removed after the
commit (`remove_stale_weights`; files named like a variant no config of the folder listed are
never touched).

Save semantics (as diffusers'): the model's files are written into the folder next to whatever else
is there; nothing else in it is touched. A missing folder (and its parents) is created; folders and
files get the modes the umask gives. A symlinked folder is written through. A folder holding
another kind of model (a foreign ``config.json``, a diffusers pipeline, weights without a mosaic
config) is refused before anything is written (`validate_save_directory`, which callers run before
long work).

Crash safety. All the files of a save are first written and fsynced in a hidden staging folder
inside the target (``.mosaicdiff-staging-<weights_id>/``, which also catches safetensors' own temp
file), then moved into place with ``os.replace``: config.json first -- that rename is the commit --
then the shards, then the index (or the single file). A crash before the commit leaves the old
model; a crash after it leaves the new config next to old (or partly moved) weights, which the
loader detects by ``weights_id`` and resolves by reading the new, complete set from the staging
folder, each shard from wherever its copy with the right id is (`locate_weights`). The next save
finishes such an interrupted commit and removes staging leftovers and stale weights files, and
removes the hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` sibling folders killed saves of earlier
versions left.

Concurrency: a save holds an exclusive ``flock`` on the target folder; a second save into the same
folder fails at once with `BlockingIOError` (platforms without ``fcntl`` save unlocked).
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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mosaicdiff.core.atomic_io import fsync_path, write_json_atomic
from mosaicdiff.core.folder_lock import folder_lock

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME", "ENVELOPE_KEYS", "INDEX_NAME", "STAGING_PREFIX", "WEIGHTS_ID_KEY", "WEIGHTS_NAME",
    "WeightsLocation", "check_variant", "config_sets", "index_name", "index_weights_id", "locate_weights",
    "parse_size", "read_json_dict", "remove_stale_weights", "save_folder", "shard_name", "split_shards",
    "staged_weights", "validate_save_directory", "weights_id", "weights_name", "write_probe_error",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Hidden per-save folder inside the target; its name ends with the save's weights_id.
STAGING_PREFIX = ".mosaicdiff-staging-"
PROBE_PREFIX = ".mosaicdiff-probe-"
#: Header metadata key of the weights file repeating the config's ``weights_id``.
WEIGHTS_ID_KEY = "mosaicdiff_weights_id"
#: The index of a sharded default set (diffusers' ``diffusion_pytorch_model.safetensors.index.json``).
INDEX_NAME = "model.safetensors.index.json"
#: Keys of config.json that describe the files, not the model (not passed to ``from_config``; two
#: configs that differ only in these describe the same model).
ENVELOPE_KEYS = ("format", "format_version", "package_version", "dtype", "weights_id", "variants",
                 "_diffusers_version")

_VARIANT = r"[A-Za-z0-9_]+"
_SINGLE_RE = re.compile(rf"model(?:\.(?P<variant>{_VARIANT}))?\.safetensors")
_SHARD_RE = re.compile(rf"model(?:\.(?P<variant>{_VARIANT}))?-(?P<i>\d{{5}})-of-(?P<n>\d{{5}})\.safetensors")
_INDEX_RE = re.compile(rf"model\.safetensors\.index(?:\.(?P<variant>{_VARIANT}))?\.json")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ------------------------------------------------------------------ names and sets


def check_variant(variant: str | None) -> str | None:
    """`variant` if it is None or a file-name-safe name (letters, digits, ``_``), else ValueError."""
    if variant is None or (isinstance(variant, str) and re.fullmatch(_VARIANT, variant)):
        return variant
    raise ValueError(f"variant must be a name of letters, digits and '_' (as 'fp16'), got {variant!r}")


def weights_name(variant: str | None = None) -> str:
    """``model.safetensors``, or ``model.<variant>.safetensors`` (diffusers' ``_add_variant``)."""
    return WEIGHTS_NAME if variant is None else f"model.{variant}.safetensors"


def index_name(variant: str | None = None) -> str:
    """``model.safetensors.index.json``, or ``model.safetensors.index.<variant>.json``."""
    return INDEX_NAME if variant is None else f"model.safetensors.index.{variant}.json"


def shard_name(variant: str | None, i: int, n: int) -> str:
    """Shard `i` (1-based) of `n`: ``model-00001-of-00003.safetensors`` / ``model.<v>-00001-of-...``."""
    return weights_name(variant).replace(".safetensors", f"-{i:05d}-of-{n:05d}.safetensors")


def _classify(name: str) -> tuple[str, str | None] | None:
    """``(kind, variant)`` of a weights file name of ours (kind "single", "shard" or "index"), else None."""
    for kind, pattern in (("single", _SINGLE_RE), ("shard", _SHARD_RE), ("index", _INDEX_RE)):
        m = pattern.fullmatch(name)
        if m:
            return kind, m.group("variant")
    return None


def parse_size(size: int | str) -> int:
    """Bytes of ``max_shard_size``: an int, or a string as diffusers takes (``"10GB"``, ``"500MB"``,
    ``"75KB"``: powers of 1000; ``"2GiB"``: of 1024).

    Raises:
        ValueError: anything else, or a size that is not positive.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", size) if isinstance(size, str) else None
        unit = m.group(2).upper() if m else None
        if unit not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size must be a number of bytes or a size such as '10GB', '500MB' or "
                             f"'2GiB', got {size!r}")
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def split_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """The tensor names per shard, in order: a shard is closed before a tensor that would take it
    past `max_bytes` (a tensor larger than that gets a shard of its own), as diffusers splits."""
    shards: list[list[str]] = []
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if not shards or (shards[-1] and size + n > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def config_sets(config: dict) -> dict[str | None, str | None]:
    """The weights sets `config` lists: variant (None for the default) -> its ``weights_id``
    (None for a folder saved before ids existed)."""
    variants = config.get("variants") if isinstance(config.get("variants"), dict) else {}
    sets: dict[str | None, str | None] = {}
    if "weights_id" in config or not variants:
        sets[None] = config.get("weights_id")
    for v, entry in variants.items():
        sets[v] = entry.get("weights_id") if isinstance(entry, dict) else None
    return sets


def index_weights_id(path: Path) -> str | None:
    """The save id in an index's metadata (None for an unreadable index or one without)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return (data.get("metadata") or {}).get(WEIGHTS_ID_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def index_shards(path: Path) -> list[str]:
    """The shard file names an index maps tensors to (empty for an unreadable index)."""
    try:
        weight_map = json.loads(Path(path).read_text(encoding="utf-8")).get("weight_map") or {}
        return sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, AttributeError):
        return []


def read_json_dict(folder: Path) -> dict | None:
    """The parsed config.json of `folder` if it is a JSON object, else None."""
    try:
        data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def weights_id(path: Path) -> str | None:
    """The save id in a weights file's header (None for unreadable or pre-1.1 files)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get(WEIGHTS_ID_KEY)
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None


def staged_weights(folder: Path, want: str) -> Path | None:
    """The complete single-file default weights of the interrupted save `want` in its staging folder, if there."""
    staged = folder / f"{STAGING_PREFIX}{want}" / WEIGHTS_NAME
    return staged if staged.is_file() and weights_id(staged) == want else None


@dataclass(frozen=True)
class WeightsLocation:
    """Where a weights set is read from: ``kind`` "single" (``path`` is the file) or "index"
    (``path`` is the index; its shards are looked up in ``search``, in order); ``staged``: the
    set of an interrupted save, read from its staging folder."""

    kind: str
    path: Path
    search: tuple[Path, ...]
    staged: bool = False


def locate_weights(folder: Path, variant: str | None, want: str | None) -> WeightsLocation | None:
    """Where the weights set `variant` of save `want` is (the index or file whose id is `want`, in
    the folder, else in the staging folder of an interrupted save); failing that, whatever file of
    the set is there (its id is then checked by the reader), or None when there is none."""
    folder = Path(folder)
    index, single = folder / index_name(variant), folder / weights_name(variant)
    if want is not None:
        staging = folder / f"{STAGING_PREFIX}{want}"
        if index.is_file() and index_weights_id(index) == want:
            return WeightsLocation("index", index, (folder, staging))
        if single.is_file() and weights_id(single) == want:
            return WeightsLocation("single", single, (folder,))
        staged_index, staged_single = staging / index_name(variant), staging / weights_name(variant)
        if staged_index.is_file() and index_weights_id(staged_index) == want:  # shards partly moved: both places
            return WeightsLocation("index", staged_index, (staging, folder), staged=True)
        if staged_single.is_file() and weights_id(staged_single) == want:
            return WeightsLocation("single", staged_single, (staging,), staged=True)
    if single.is_file():
        return WeightsLocation("single", single, (folder,))
    if index.is_file():
        return WeightsLocation("index", index, (folder,))
    return None


def _set_files(folder: Path, variant: str | None, want: str | None) -> list[str] | None:
    """The names of the files in `folder` holding set `variant` of save `want` in its current
    layout (shards before their index), or None when it is not (completely) there."""
    where = locate_weights(folder, variant, want)
    if where is None or where.staged or where.path.parent != folder:
        return None
    if want is not None and (index_weights_id(where.path) if where.kind == "index" else weights_id(where.path)) != want:
        return None
    if where.kind == "single":
        return [where.path.name]
    shards = index_shards(where.path)
    if not shards or not all((folder / n).is_file() for n in shards):
        return None
    return [*shards, where.path.name]


def remove_stale_weights(folder: Path, config: dict, dropped: set[str | None] = frozenset()) -> list[str]:
    """Remove the weights files of `folder` that `config` no longer uses: a listed set's files of
    a previous layout (a set whose current files cannot be told is left alone), and the files of
    the sets in `dropped` (listed by the config this one replaced, not by this one). Only names of
    ours (`weights_name`, `shard_name`, `index_name`) of those sets are touched: a file named like
    a variant no config listed (a user's ``model.ema.safetensors``) is left alone. Returns the
    names removed."""
    sets = config_sets(config)
    current: dict[str | None, list[str] | None] = {}
    removed = []
    for f in sorted(folder.iterdir()):
        kind_variant = _classify(f.name)
        if kind_variant is None or f.is_symlink() or not f.is_file():
            continue
        variant = kind_variant[1]
        if variant in sets:
            if variant not in current:
                current[variant] = _set_files(folder, variant, sets[variant])
            keep = current[variant] is None or f.name in current[variant]
        else:
            keep = variant not in dropped
        if not keep:
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f.name)
    return removed


# ------------------------------------------------------------------ where a save may go


def _other_model(folder: Path, format_name: str) -> str | None:
    """What other kind of model `folder` holds (saving would clobber or confuse it), or None."""
    cfg = folder / CONFIG_NAME
    if cfg.exists():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"a {CONFIG_NAME} that is not valid JSON"
        if isinstance(data, dict) and data.get("format") == format_name:
            return None
        kind = data.get("_class_name") if isinstance(data, dict) else None
        return f"the {CONFIG_NAME} of another model ({kind})" if kind else f"a {CONFIG_NAME} of another kind"
    if (folder / "model_index.json").exists():
        return "a diffusers pipeline (model_index.json)"
    if (folder / WEIGHTS_NAME).exists():
        return f"a {WEIGHTS_NAME} without a {format_name.rsplit('.', 1)[-1]} {CONFIG_NAME}"
    with contextlib.suppress(OSError):
        ours = sorted(p.name for p in folder.iterdir() if _classify(p.name) is not None)
        if ours:
            return f"a {ours[0]} without a {format_name.rsplit('.', 1)[-1]} {CONFIG_NAME}"
    return None


def write_probe_error(folder: Path) -> OSError | None:
    """Create and remove a probe file in `folder` (the only test that also holds for root and
    ACLs); the error it raised, or None when the folder is writable."""
    probe = folder / f"{PROBE_PREFIX}{secrets.token_hex(4)}"
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


def validate_save_directory(path: str | os.PathLike, format_name: str) -> Path:
    """Check that a mosaic (of ``config["format"] == format_name``) can be saved to `path`, before
    any long work; writes nothing.

    Accepted: a missing folder (it and its missing parents are created by the save, like
    ``mkdir -p``), an empty folder, a previously saved mosaic, or a folder of unrelated files (the
    model's two files are written next to them). A symlink to a folder is followed.

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
        other = _other_model(target, format_name)
        if other:
            raise FileExistsError(
                f"save_pretrained: {target} holds {other}; saving a {format_name.rsplit('.', 1)[-1]} there "
                f"would overwrite or mix with it; choose an empty or new folder"
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


# ------------------------------------------------------------------ the save


def _folder_lock(folder: Path):
    """Hold an exclusive flock on `folder` (`mosaicdiff.core.folder_lock`; no lock file is left behind)."""
    return folder_lock(folder, f"save_pretrained: another save into {folder} is in progress; wait for it to "
                               f"finish or save to another folder")


def _move_staged(staging: Path, target: Path, names: list[str]) -> None:
    """Move the files `names` still in `staging` into `target`, in order (shards before their
    index: an index in place means its shards are), fsyncing the folder before the last one."""
    present = [n for n in names if (staging / n).exists()]
    for n in present[:-1]:
        os.replace(staging / n, target / n)
    if present:
        if len(present) > 1:
            fsync_path(target)
        os.replace(staging / present[-1], target / present[-1])
        fsync_path(target)


def _staged_set_names(staging: Path, variant: str | None) -> list[str]:
    """The names of set `variant`'s files in a staging folder, in move order (shards, then index or file)."""
    shards = sorted(p.name for p in staging.iterdir()
                    if _classify(p.name) == ("shard", variant)) if staging.is_dir() else []
    last = [n for n in (index_name(variant), weights_name(variant)) if (staging / n).exists()]
    return shards + last


def _finish_interrupted_save(target: Path) -> None:
    """Cleanup on start (under the lock): complete a commit a crash interrupted, drop staging
    leftovers and stale weights files."""
    leftovers = sorted(target.glob(f"{STAGING_PREFIX}*"))
    if not leftovers:
        return
    config = read_json_dict(target) or {}
    for variant, want in config_sets(config).items():
        staging = target / f"{STAGING_PREFIX}{want}"
        if isinstance(want, str) and staging.is_dir() and _set_files(target, variant, want) is None:
            located = locate_weights(target, variant, want)
            if located is not None and located.staged:  # config.json was committed: roll forward
                _move_staged(staging, target, _staged_set_names(staging, variant))
                logger.warning("%s: completed a save that was interrupted after its commit", target)
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    remove_stale_weights(target, config)


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


def _with_weight_sets(target: Path, config: dict, variant: str | None, save_id: str) -> tuple[dict, set]:
    """`config` listing the set this save writes (`variant`, id `save_id`, dtype ``config["dtype"]``)
    and, when the folder's current config describes the same model, its other sets; and the sets
    the current config lists that the new one does not (their files go after the commit)."""
    config = {k: v for k, v in config.items() if k not in ("weights_id", "variants")}
    sets: dict[str | None, dict] = {}
    old = read_json_dict(target)
    if old is not None and old.get("format") == config.get("format") and \
            {k: v for k, v in old.items() if k not in ENVELOPE_KEYS} == \
            {k: v for k, v in config.items() if k not in ENVELOPE_KEYS}:
        for v, want in config_sets(old).items():
            if v != variant and isinstance(want, str):  # (a set saved before ids existed is replaced)
                dtype = old.get("dtype") if v is None else old["variants"][v].get("dtype")
                sets[v] = {"weights_id": want, "dtype": dtype}
    sets[variant] = {"weights_id": save_id, "dtype": config["dtype"]}
    if None in sets:
        config["weights_id"], config["dtype"] = sets[None]["weights_id"], sets[None]["dtype"]
    variants = {v: sets[v] for v in sorted(v for v in sets if v is not None)}
    if variants:
        config["variants"] = variants
    listed = set(config_sets(old)) if old is not None and old.get("format") == config.get("format") else set()
    return config, listed - set(sets)


def _commit(target: Path, config: dict, tensors: dict[str, torch.Tensor], header: dict[str, str],
            variant: str | None, max_shard_bytes: int | None) -> dict:
    """Stage the set's files and the config, then rename config.json (the commit) and the weights
    files into `target`; returns the config written."""
    save_id = secrets.token_hex(8)
    config, dropped = _with_weight_sets(target, config, variant, save_id)
    metadata = {**header, WEIGHTS_ID_KEY: save_id}
    groups = split_shards(tensors, max_shard_bytes) if max_shard_bytes is not None else [list(tensors)]
    staging = target / f"{STAGING_PREFIX}{save_id}"
    staging.mkdir()
    names: list[str] = []
    try:
        writing = target / weights_name(variant)
        try:
            if len(groups) <= 1:  # fits one file: no index, as diffusers
                names = [weights_name(variant)]
                files = [(names[0], tensors)]
            else:
                names = [shard_name(variant, i + 1, len(groups)) for i in range(len(groups))]
                files = [(n, {k: tensors[k] for k in keys}) for n, keys in zip(names, groups)]
            for name, part in files:
                writing = target / name
                save_file(part, str(staging / name), metadata=metadata)
                # safetensors writes 0600: give the weights the mode the umask gave the staging folder
                os.chmod(staging / name, staging.stat().st_mode & 0o666)
                fsync_path(staging / name)
            if len(groups) > 1:
                writing = target / index_name(variant)
                total = sum(t.numel() * t.element_size() for t in tensors.values())
                index = {"metadata": {"total_size": total, **metadata},
                         "weight_map": {k: n for n, keys in zip(names, groups) for k in keys}}
                write_json_atomic(staging / index_name(variant), index, indent=2, sort_keys=True)
                names.append(index_name(variant))
        except (OSError, SafetensorError) as exc:
            raise _write_failed(writing, target, exc) from exc
        try:
            write_json_atomic(staging / CONFIG_NAME, config, indent=2)
        except OSError as exc:
            raise _write_failed(target / CONFIG_NAME, target, exc) from exc
        fsync_path(staging)
        os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)  # the commit
        fsync_path(target)
        _move_staged(staging, target, names)
    except BaseException:
        # Read the commit from disk, not a flag: an interrupt may land just after the rename.
        committed = config_sets(read_json_dict(target) or {}).get(variant, "") == save_id
        if committed:  # the new config is in place: its weights must follow
            with contextlib.suppress(OSError):
                _move_staged(staging, target, names)
        if not any((staging / n).exists() for n in names) or not committed:
            shutil.rmtree(staging, ignore_errors=True)  # else kept: the loader reads it from there
        raise
    shutil.rmtree(staging, ignore_errors=True)
    if remove_stale_weights(target, config, dropped):
        fsync_path(target)
    return config


def save_folder(save_directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                header: dict[str, str], format_name: str, variant: str | None = None,
                max_shard_size: int | str | None = None) -> Path:
    """Write `config` (listing the set with a fresh ``weights_id``) and `tensors` into the folder,
    crash-safely.

    Args:
        save_directory: the folder; created if missing. Only the model's files are replaced.
        config: the JSON config (``format`` must be `format_name`; ``dtype`` the tensors').
        tensors: contiguous CPU tensors not sharing memory (the safetensors rule).
        header: extra safetensors header metadata (also in a sharded set's index metadata).
        variant: the weights set (`check_variant`); None the default.
        max_shard_size: shard the set into files of at most this size (`parse_size`); None (default):
            one file. A set that fits one shard is written as one file.

    Returns:
        `Path` of the saved folder (absolute).

    Raises:
        ValueError: an invalid `variant` or `max_shard_size`.
        FileExistsError / NotADirectoryError / PermissionError: see `validate_save_directory`.
        BlockingIOError: another save into the same folder is in progress.
        OSError: writing failed (e.g. disk full); the folder is left as it was.
    """
    variant = check_variant(variant)
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    target = validate_save_directory(save_directory, format_name)
    created = [p for p in (target, *target.parents) if not (p.exists() or p.is_symlink())]  # deepest first
    target.mkdir(parents=True, exist_ok=True)  # modes from the umask
    try:
        with _folder_lock(target):
            validate_save_directory(target, format_name)  # again under the lock: the folder may have changed
            _finish_interrupted_save(target)
            _commit(target, config, tensors, header, variant, max_bytes)
    except BaseException:
        for p in created:  # a failed first save leaves no empty folders behind
            try:
                p.rmdir()
            except OSError:
                break
        raise
    _remove_legacy_leftovers(Path(save_directory).absolute())
    return target
