"""A saved model folder on disk: ``config.json`` + ``model.safetensors``, written crash-safely.

diffusers' ``save_pretrained`` writes both files in place: a crash leaves a torn folder, or a new
config next to old weights of the same shapes, which loads silently wrong. This helper keeps the
guarantees diffusers lacks; files are written with `mosaic_kernels.atomic_io`.

Save semantics (as diffusers'): the two files are written into the folder next to whatever else is
there; nothing else in it is touched. A missing folder (and its parents) is created; folders and
files get the modes the umask gives. A symlinked folder is written through. A folder holding
another kind of model (a foreign ``config.json``, a diffusers pipeline, weights without a MosaicDiT
config) is refused before anything is written (`validate_save_directory`, which callers run before
long work).

Crash safety. Both files are first written and fsynced in a hidden staging folder inside the target
(``.mosaicdiff-staging-<weights_id>/``, which also catches safetensors' own temp file), then moved
into place with ``os.replace``: config.json first -- that rename is the commit -- then the weights.
A crash before the commit leaves the old model; a crash between the two renames leaves the new
config next to the old weights, which the loader detects by ``weights_id`` (in the config and in
the weights' header) and resolves by reading the new, complete weights from the staging folder
(`staged_weights`). The next save finishes such an interrupted commit and removes staging
leftovers, and removes the hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` sibling folders killed saves of
earlier versions left.

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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mosaic_kernels.atomic_io import fsync_path, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME", "FORMAT_NAME", "STAGING_PREFIX", "WEIGHTS_ID_KEY", "WEIGHTS_NAME", "read_json_dict",
    "save_folder", "staged_weights", "validate_save_directory", "weights_id", "write_probe_error",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: ``config["format"]`` of a saved mosaic: how a folder is recognised as ours.
FORMAT_NAME = "mosaicdiff.MosaicDiT"
#: Hidden per-save folder inside the target; its name ends with the save's weights_id.
STAGING_PREFIX = ".mosaicdiff-staging-"
PROBE_PREFIX = ".mosaicdiff-probe-"
#: Header metadata key of the weights file repeating the config's ``weights_id``.
WEIGHTS_ID_KEY = "mosaicdiff_weights_id"


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
    """The complete weights of the interrupted save `want` in its staging folder, if there."""
    staged = folder / f"{STAGING_PREFIX}{want}" / WEIGHTS_NAME
    return staged if staged.is_file() and weights_id(staged) == want else None


# ------------------------------------------------------------------ where a save may go


def _other_model(folder: Path, format_name: str = FORMAT_NAME) -> str | None:
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


def validate_save_directory(path: str | os.PathLike, format_name: str = FORMAT_NAME) -> Path:
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


def _finish_interrupted_save(target: Path) -> None:
    """Cleanup on start (under the lock): complete a commit a crash interrupted, drop staging leftovers."""
    leftovers = sorted(target.glob(f"{STAGING_PREFIX}*"))
    if not leftovers:
        return
    want = (read_json_dict(target) or {}).get("weights_id")
    staged = staged_weights(target, want) if isinstance(want, str) else None
    if staged is not None and weights_id(target / WEIGHTS_NAME) != want:
        os.replace(staged, target / WEIGHTS_NAME)  # config.json was committed: roll forward
        fsync_path(target)
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


def _commit(target: Path, config: dict, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    """Stage both files, then rename config.json (the commit) and the weights into `target`."""
    save_id = config["weights_id"] = secrets.token_hex(8)
    staging = target / f"{STAGING_PREFIX}{save_id}"
    staging.mkdir()
    try:
        try:
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata={**header, WEIGHTS_ID_KEY: save_id})
            # safetensors writes 0600: give the weights the mode the umask gave the staging folder
            os.chmod(staging / WEIGHTS_NAME, staging.stat().st_mode & 0o666)
            fsync_path(staging / WEIGHTS_NAME)
        except (OSError, SafetensorError) as exc:
            raise _write_failed(target / WEIGHTS_NAME, target, exc) from exc
        try:
            write_json_atomic(staging / CONFIG_NAME, config, indent=2)
        except OSError as exc:
            raise _write_failed(target / CONFIG_NAME, target, exc) from exc
        fsync_path(staging)
        os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)  # the commit
        fsync_path(target)
        os.replace(staging / WEIGHTS_NAME, target / WEIGHTS_NAME)
        fsync_path(target)
    except BaseException:
        # Read the commit from disk, not a flag: an interrupt may land just after the rename.
        committed = (read_json_dict(target) or {}).get("weights_id") == save_id
        if committed:  # the new config is in place: its weights must follow
            with contextlib.suppress(OSError):
                os.replace(staging / WEIGHTS_NAME, target / WEIGHTS_NAME)
        if not (staging / WEIGHTS_NAME).exists() or not committed:
            shutil.rmtree(staging, ignore_errors=True)  # else kept: the loader reads it from there
        raise
    shutil.rmtree(staging, ignore_errors=True)


def save_folder(save_directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                header: dict[str, str], format_name: str = FORMAT_NAME) -> Path:
    """Write `config` (gets a fresh ``weights_id``) and `tensors` into the folder, crash-safely.

    Args:
        save_directory: the folder; created if missing. Only its two files are replaced.
        config: the JSON config (``format`` must be `format_name`).
        tensors: contiguous CPU tensors not sharing memory (the safetensors rule).
        header: extra safetensors header metadata.

    Returns:
        `Path` of the saved folder (absolute).

    Raises:
        FileExistsError / NotADirectoryError / PermissionError: see `validate_save_directory`.
        BlockingIOError: another save into the same folder is in progress.
        OSError: writing failed (e.g. disk full); the folder is left as it was.
    """
    target = validate_save_directory(save_directory, format_name)
    created = [p for p in (target, *target.parents) if not (p.exists() or p.is_symlink())]  # deepest first
    target.mkdir(parents=True, exist_ok=True)  # modes from the umask
    try:
        with _folder_lock(target):
            validate_save_directory(target, format_name)  # again under the lock: the folder may have changed
            _finish_interrupted_save(target)
            _commit(target, config, tensors, header)
    except BaseException:
        for p in created:  # a failed first save leaves no empty folders behind
            try:
                p.rmdir()
            except OSError:
                break
        raise
    _remove_legacy_leftovers(Path(save_directory).absolute())
    return target
