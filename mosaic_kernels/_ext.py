"""Loader of the compiled extension ``mosaic_kernels._C`` (the ``torch.ops.mosaic_C`` ops).

The extension is optional. :func:`load_extension` never raises: it returns the module, or
``None`` and the reason, which :mod:`mosaic_kernels.ops` logs before falling back to the
Triton or torch backends.

A module compiled against one torch release does not load into another (undefined C++
symbols at best). So the build info written next to the module at build time
(``_build_info.json``: torch and CUDA versions, arches, date) is compared with the installed
torch *before* the shared library is imported, and a mismatch disables the extension with one
warning that names both versions and the command that rebuilds it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger(__name__)

EXTENSION_NAME = "mosaic_kernels._C"
BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")
REBUILD_HINT = (
    "rebuild it against the installed torch from the MosaicDiff source tree with "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` "
    "(editable checkouts: `pip install --no-build-isolation --no-deps -e .`)"
)


class ExtensionMismatchWarning(RuntimeWarning):
    """The compiled extension was built against another torch or CUDA than the installed one."""


def read_build_info(path: Path = BUILD_INFO_PATH) -> dict[str, Any] | None:
    """Reads the build info written next to the compiled module.

    Args:
        path: the ``_build_info.json`` file.

    Returns:
        The decoded JSON object, or None when the file does not exist.

    Raises:
        ValueError: the file exists but is not a JSON object.
    """
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(info).__name__}")
    return info


def installed_versions() -> dict[str, str | None]:
    """The versions that a compiled module must match: ``torch_version`` and ``cuda_version``."""
    return {"torch_version": torch.__version__, "cuda_version": torch.version.cuda}


def build_mismatch(info: dict[str, Any], installed: dict[str, str | None]) -> str | None:
    """Compares the build info with the installed torch.

    Args:
        info: the build info (``torch_version``, ``cuda_version``).
        installed: the output of :func:`installed_versions`.

    Returns:
        A message naming both versions and how to rebuild, or None when they match.
    """
    built_torch, built_cuda = info.get("torch_version"), info.get("cuda_version")
    have_torch, have_cuda = installed["torch_version"], installed["cuda_version"]
    if built_torch == have_torch and str(built_cuda) == str(have_cuda):
        return None
    return (
        f"{EXTENSION_NAME} was built against torch {built_torch} (CUDA {built_cuda}) but torch "
        f"{have_torch} (CUDA {have_cuda}) is installed; the compiled kernels are disabled "
        f"(Triton/torch backends are used instead). To use them, {REBUILD_HINT}."
    )


def _extension_spec() -> Any:
    """The import spec of the compiled module, or None when it was not built."""
    return importlib.util.find_spec(EXTENSION_NAME)


def _import_extension() -> ModuleType:
    """Imports the compiled module, which registers the ``torch.ops.mosaic_C`` ops."""
    return importlib.import_module(EXTENSION_NAME)


@functools.lru_cache(maxsize=None)
def load_extension() -> tuple[ModuleType | None, str]:
    """Imports ``mosaic_kernels._C`` if it was built for the installed torch. Cached.

    Importing the module registers the ``torch.ops.mosaic_C`` ops. The build info is checked
    first, so a module built for another torch is never loaded. A version mismatch is warned
    about once (:class:`ExtensionMismatchWarning`); every other reason is logged at debug level.

    Returns:
        ``(module, message)`` when loaded, where the message describes the build;
        ``(None, reason)`` otherwise. Never raises.
    """
    try:
        if _extension_spec() is None:
            reason = (
                f"not built ({EXTENSION_NAME} is absent: the package was installed without nvcc "
                "or a CUDA build of torch, with MOSAIC_BUILD_EXT=0, or its build failed; "
                "`pip install -v` shows why)"
            )
            logger.debug("%s", reason)
            return None, reason
        info = read_build_info()
    except (ImportError, ValueError) as exc:
        reason = f"{EXTENSION_NAME} is unusable ({exc}); {REBUILD_HINT}"
        logger.debug("%s", reason)
        return None, reason
    if info is None:
        reason = (
            f"{EXTENSION_NAME} exists but its build info {BUILD_INFO_PATH.name} is missing, so "
            f"it cannot be checked against the installed torch; {REBUILD_HINT}"
        )
        logger.debug("%s", reason)
        return None, reason
    mismatch = build_mismatch(info, installed_versions())
    if mismatch is not None:
        warnings.warn(mismatch, ExtensionMismatchWarning, stacklevel=2)
        return None, mismatch
    try:
        module = _import_extension()
    except (ImportError, OSError) as exc:
        reason = f"{EXTENSION_NAME} failed to load ({exc}); {REBUILD_HINT}"
        logger.debug("%s", reason)
        return None, reason
    message = (
        f"loaded (built {info.get('build_date')} against torch {info.get('torch_version')}, "
        f"CUDA {info.get('cuda_version')}, arches {','.join(info.get('cuda_arch_list', []))})"
    )
    logger.debug("%s: %s", EXTENSION_NAME, message)
    return module, message
