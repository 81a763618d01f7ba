"""Output locations, checked before the long work starts (writing nothing).

Each check raises the error `mosaicdiff.app.errors.describe_error` maps to exit 2, with a
message naming the flag the user gave.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def _nearest_existing(path: Path) -> Path:
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a probe file in `folder` (the one test that also holds for root and ACLs).

    Raises:
        PermissionError: `folder` cannot be written.
    """
    from mosaicdiff.core.model_folder import write_probe_error

    exc = write_probe_error(folder)
    if exc is None:
        return
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise PermissionError(f"{flag} {target}: cannot write into {folder} ({exc.strerror}); "
                              f"choose another {flag}") from None
    raise exc


def check_output_folder(path: Path, flag: str = "--out", target: Path | None = None) -> None:
    """`path` is, or can be created as, a writable folder (checked before long work; writes nothing).

    `target` (default `path`) is what the user gave for `flag`, named in the messages.

    Raises:
        FileExistsError: `path` is a file. NotADirectoryError: a parent is a file.
        PermissionError: not writable.
    """
    target = path if target is None else target
    if path.exists() and not path.is_dir():
        what = f"{flag} {target}" if target == path else f"{flag} {target}: {path}"
        raise FileExistsError(f"{what} is a file, but it must be a folder; choose another {flag}")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise NotADirectoryError(f"{flag} {target}: {base} is a file, not a folder; choose another {flag}")
    check_writable_folder(base, flag, target)


def check_output_image(path: Path, flag: str = "--out") -> None:
    """`path` can be written as an image file (a known image suffix, not a folder, a writable folder).

    Raises:
        ValueError: unknown image suffix. IsADirectoryError: `path` is a folder.
        NotADirectoryError / PermissionError: see `check_output_folder`.
    """
    from PIL import Image

    Image.init()
    savable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give an image file name such as {path / 'samples.png'}")
    if path.suffix.lower() not in savable:
        raise ValueError(f"{flag} {path}: unknown image type {path.suffix or '(no suffix)'!r}; "
                         f"use a name ending in .png (or .jpg, .bmp, .tif)")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {path} exists and is not writable; choose another {flag}")
    check_output_folder(path.parent, flag, target=path)


def check_model_folder(path: Path, flag: str = "--out") -> Path:
    """`model_folder.validate_save_directory` for a MosaicDiT, its message in CLI terms (writes nothing)."""
    from mosaicdiff.core.model_folder import validate_save_directory
    from mosaicdiff.families.dit.model import MosaicDiT

    try:
        return validate_save_directory(path, MosaicDiT.format_name)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        message = str(exc).removeprefix("save_pretrained: ")
        raise type(exc)(f"{flag} {path}: {message}") from None
