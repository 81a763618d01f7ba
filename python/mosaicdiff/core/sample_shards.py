"""The sampling folder on disk: shards with their sha256, the manifest, the lock, the assembly.

`mosaicdiff.core.sharded_sampling` decides what the images are; this module keeps them:

- ``out_dir/shards/images-<start>-<end>-<sha256>.npy``: the uint8 NHWC images ``start .. end-1``
  (8-digit indices, end exclusive), the sha256 of the file's bytes in its name. A shard and its
  digest are written in one atomic rename (`mosaicdiff.core.atomic_io`), so ranks never edit a shared
  file, and a shard whose bytes no longer match its name (a flipped bit, a truncated copy) is
  found on resume (sampled again) and on assembly (refused).
- ``out_dir/shards/manifest.json``: the settings (rank 0 writes it before any shard). A folder
  holding shards or a ``samples.npz`` of other or unknown settings is refused, never mixed or
  overwritten; a folder with a manifest but no shard yet (a run stopped before its first shard)
  may start over with new settings.
- ``out_dir/samples.npz``: ``arr_0``, uint8 ``(N, H, W, 3)``, streamed from the shards one at a
  time in fixed-size chunks: open files and memory stay bounded for any N (FID-50K at 256 px is
  9.8 GB).
- Rank 0 holds an exclusive lock on ``out_dir`` (`mosaicdiff.core.folder_lock`) from `prepare` to
  the end of `assemble`: a second run into the folder fails at once. Under the lock, `prepare`
  removes the temporaries of our naming a killed run left (``.samples.npz.*.tmp``,
  ``shards/.images-*.tmp``, ``shards/.manifest.json.*.tmp``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mosaicdiff.core.atomic_io import atomic_write, write_json_atomic
from mosaicdiff.core.folder_lock import folder_lock

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST", "SAMPLES", "SHARDS", "Plan", "assemble", "check_output_dir", "prepare", "undo_fresh_start",
           "write_shard"]

SHARDS = "shards"
MANIFEST = "manifest.json"
SAMPLES = "samples.npz"
MAX_SHARDS = 10**6  # files in one folder; also bounds the list of missing shards rank 0 broadcasts
_SHARD_NAME = re.compile(r"images-(\d{8,})-(\d{8,})-([0-9a-f]{64})\.npy")
_NPY_HEADER_BYTES = 128  # numpy pads the header of an (N, H, W, 3) uint8 array to 128 bytes
_NPZ_OVERHEAD_BYTES = 1024  # zip local header, zip64 extras, central directory and the npy header
_CHUNK_BYTES = 8 * 2**20  # assembly and verification read shards in chunks of this size


class Plan(NamedTuple):
    """What `prepare` found (rank 0 broadcasts it).

    Attributes:
        missing: indices of the shards to sample.
        fresh: this run wrote the manifest (the folder held none of these settings).
        created: this run created `out_dir`.
    """

    missing: list[int]
    fresh: bool
    created: bool


# ----------------------------------------------------------------------------- up-front checks

def check_output_dir(out_dir: Path) -> None:
    """`out_dir`, its ``samples.npz`` and ``shards`` are not taken by the wrong kind of entry (writes nothing).

    Raises:
        FileExistsError: `out_dir` or ``shards`` is a file. IsADirectoryError: ``samples.npz`` is a folder.
    """
    out_dir = Path(out_dir)
    advice = "move it away or use another output folder"
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, but the samples go into a folder of that name; {advice}")
    if (out_dir / SAMPLES).is_dir():
        raise IsADirectoryError(f"{out_dir / SAMPLES} is a folder, but the samples are written to that name; {advice}")
    shards = out_dir / SHARDS
    if shards.exists() and not shards.is_dir():
        raise FileExistsError(f"{shards} is a file, but it must be the folder of the shards; {advice}")


def _human(num_bytes: float) -> str:
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    while num_bytes >= 1000 and len(units) > 1:
        num_bytes /= 1000
        units.pop(0)
    return f"{num_bytes:.1f} {units[0]}"


def _check_size(out_dir: Path, ranges: Sequence[tuple[int, int]], size: int, on_disk: int) -> None:
    """The shard count is bounded and the output fits the free disk (the sizes are known up front)."""
    num_images = ranges[-1][1]
    pixels = num_images * size * size * 3
    npz = pixels + _NPZ_OVERHEAD_BYTES
    need = npz + max(0, pixels + len(ranges) * _NPY_HEADER_BYTES - on_disk)
    base = out_dir
    while not base.exists() and base != base.parent:
        base = base.parent
    free = shutil.disk_usage(base).free
    if need > free:
        raise ValueError(f"sample_to_npz: num_images={num_images} images of {size}x{size}x3 need {_human(need)} on "
                         f"disk (samples.npz {_human(npz)} and the shards not yet written), but {base} has "
                         f"{_human(free)} free; sample fewer images or use an output folder on a larger disk")
    if len(ranges) > MAX_SHARDS:
        raise ValueError(f"sample_to_npz: num_images={num_images} in shards of {ranges[0][1] - ranges[0][0]} makes "
                         f"{len(ranges)} shard files, more than {MAX_SHARDS}; raise shard_size (--shard-size)")


# ----------------------------------------------------------------------------- shards

def _shard_files(out_dir: Path) -> dict[tuple[int, int], list[tuple[Path, str]]]:
    """The shard files in ``out_dir/shards`` by image range: [(path, sha256 in its name)], sorted."""
    found: dict[tuple[int, int], list[tuple[Path, str]]] = {}
    shards = out_dir / SHARDS
    if not shards.is_dir():
        return found
    with os.scandir(shards) as entries:
        for entry in entries:
            m = _SHARD_NAME.fullmatch(entry.name)
            if m:
                found.setdefault((int(m[1]), int(m[2])), []).append((Path(entry.path), m[3]))
    for files in found.values():
        files.sort()
    return found


def write_shard(out_dir: Path, start: int, end: int, pixels: np.ndarray) -> Path:
    """Write images ``start .. end-1`` (uint8 NHWC) as a shard named with its sha256, atomically."""
    pixels = np.ascontiguousarray(pixels)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(pixels))
    digest = hashlib.sha256(header.getbuffer())
    digest.update(pixels.data)
    path = out_dir / SHARDS / f"images-{start:08d}-{end:08d}-{digest.hexdigest()}.npy"
    with atomic_write(path, "wb") as f:
        f.write(header.getbuffer())
        f.write(pixels.data)
    return path


def _stream_shard(path: Path, digest: str, count: int, size: int, buffer: bytearray,
                  sink: Callable[[memoryview], Any] | None = None) -> str | None:
    """Read a shard in chunks into `buffer`, giving its image bytes to `sink`; None if it is whole, of
    shape ``(count, size, size, 3)`` uint8 and matches `digest`, else why not."""
    h = hashlib.sha256()
    view = memoryview(buffer)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return f"is an .npy file of version {version}"
            shape, fortran, dtype = read_header(f)
            if dtype != np.uint8 or fortran or shape != (count, size, size, 3):
                return f"holds {dtype} {shape}, expected uint8 {(count, size, size, 3)}"
            head = f.tell()
            f.seek(0)
            h.update(f.read(head))
            remaining = count * size * size * 3
            while remaining:
                n = f.readinto(view[:min(len(view), remaining)])
                if not n:
                    return "is truncated"
                h.update(view[:n])
                if sink is not None:
                    sink(view[:n])
                remaining -= n
            if f.read(1):
                return "has bytes after its images"
    except (OSError, ValueError) as exc:  # unreadable, or not an .npy file
        return f"is unreadable ({exc})"
    if h.hexdigest() != digest:
        return "fails its sha256 check (its bytes changed after it was written)"
    return None


def _verified_shards(out_dir: Path, ranges: Sequence[tuple[int, int]], size: int) -> set[tuple[int, int]]:
    """The ranges with a whole shard on disk; shards failing their check (and spare copies) are removed."""
    num_images, shard_size = ranges[-1][1], ranges[0][1] - ranges[0][0]
    buffer = bytearray(_CHUNK_BYTES)
    good = set()
    for (start, end), files in _shard_files(out_dir).items():
        if start % shard_size or end != min(start + shard_size, num_images):
            logger.warning("%s: %s is not a shard of these settings; ignored", out_dir, files[0][0].name)
            continue
        for path, digest in files:
            why = "is a spare copy" if (start, end) in good else _stream_shard(path, digest, end - start, size, buffer)
            if why is None:
                good.add((start, end))
                continue
            logger.warning("shard %s %s; %s", path.name, why,
                           "removing it" if (start, end) in good else "sampling it again")
            path.unlink(missing_ok=True)
    return good


# ----------------------------------------------------------------------------- the folder

def _read_manifest(manifest: Path) -> dict | str | None:
    """The saved settings; None without a manifest; why not, if it is not a JSON object."""
    if not manifest.is_file():
        return None
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"not valid JSON: {' '.join(str(exc).split())}"
    return saved if isinstance(saved, dict) else f"a JSON {type(saved).__name__}, not an object"


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> bool:
    """Refuse a folder whose shards or samples.npz have other or unknown settings; True if the
    manifest must be (re)written (no manifest, or one without any result yet)."""
    shards = out_dir / SHARDS
    manifest = shards / MANIFEST
    has_shards = any(shards.glob("images-*.npy"))
    results = has_shards or (out_dir / SAMPLES).is_file()
    held = "shards" if has_shards else "a finished samples.npz"
    advice = f"use another output folder, or move {shards} and {out_dir / SAMPLES} out of it to start over"
    saved = _read_manifest(manifest)
    if isinstance(saved, str):
        if results:
            raise ValueError(f"{manifest} is corrupt ({saved}), so the settings of the {held} in {out_dir} are "
                             f"unknown; {advice}")
        logger.warning("%s is corrupt (%s) and no shard is finished: writing it anew", manifest, saved)
        return True
    if saved is None:
        if results:
            raise ValueError(f"{out_dir} holds {held} but no {MANIFEST} in {SHARDS}/ (the settings are unknown); "
                             f"{advice}")
        return True
    differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if differ and results:
        detail = "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ[:4])
        raise ValueError(f"{out_dir} holds {held} sampled with other settings ({detail}); {advice}")
    if differ:
        logger.info("%s: no shard was finished under the settings there; starting over with these", out_dir)
    return bool(differ)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporaries of our naming a killed run left (`atomic_io` names them ``.<name>.<random>.tmp``)."""
    shards = out_dir / SHARDS
    stale = [*out_dir.glob(f".{SAMPLES}.*.tmp"), *shards.glob(".images-*.tmp"), *shards.glob(f".{MANIFEST}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logger.info("%s: removed %d temporary file(s) a stopped run left", out_dir, len(stale))


def prepare(out_dir: Path, settings: dict[str, Any], ranges: Sequence[tuple[int, int]], size: int,
            held: contextlib.ExitStack) -> Plan:
    """Rank 0, before any sampling: check the folder and the free disk, create the folder, lock it
    (the lock joins `held`), remove stale temporaries, check or write the manifest, and list the
    shards still to sample (verifying those on disk).

    Raises:
        FileExistsError / IsADirectoryError: see `check_output_dir`. ValueError: too many shards,
            not enough free disk, or a folder of other or unknown settings.
        BlockingIOError: another run holds the folder.
    """
    check_output_dir(out_dir)
    _check_size(out_dir, ranges, size, sum(path.stat().st_size for files in _shard_files(out_dir).values()
                                           for path, _ in files))
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    locked = held.enter_context(folder_lock(out_dir, f"another run (mosaicdiff sample / sample_to_npz) into "
                                                     f"{out_dir} is in progress; wait for it to finish or use "
                                                     f"another output folder"))
    if locked:  # a temporary is stale only when no other run can be writing it
        _remove_stale_temporaries(out_dir)
    fresh = _check_settings(out_dir, settings)
    if fresh:
        write_json_atomic(out_dir / SHARDS / MANIFEST, settings)
    done = _verified_shards(out_dir, ranges, size)
    missing = [k for k in range(len(ranges)) if ranges[k] not in done]
    if len(missing) < len(ranges):
        logger.info("%s: %d of %d shards already sampled; sampling the other %d", out_dir,
                    len(ranges) - len(missing), len(ranges), len(missing))
    return Plan(missing, fresh, created)


def undo_fresh_start(out_dir: Path, plan: Plan) -> None:
    """After a failure before the first shard: remove the manifest and folders this run created."""
    shards = out_dir / SHARDS
    if not plan.fresh or any(shards.glob("images-*.npy")):
        return
    with contextlib.suppress(OSError):  # best effort: the error that ended the run is the one to report
        (shards / MANIFEST).unlink(missing_ok=True)
        shards.rmdir()  # fails if not empty: someone else's files stay
        if plan.created:
            out_dir.rmdir()


def assemble(out_dir: Path, ranges: Sequence[tuple[int, int]], size: int) -> Path:
    """Rank 0: stream the shards, one open at a time and in chunks, into ``samples.npz`` (``arr_0``,
    uint8 NHWC), atomically, checking each shard's sha256 on the way.

    Raises:
        RuntimeError: shards are missing. OSError: a shard fails its check (nothing is written).
    """
    files = _shard_files(out_dir)
    missing = [f"{s}-{e}" for s, e in (ranges[k] for k in range(len(ranges))) if (s, e) not in files]
    if missing:
        raise RuntimeError(f"{out_dir}: shards of images {missing[:4]} are missing after sampling; run the same "
                           f"command again to sample them")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (ranges[-1][1], size, size, 3)}
    buffer = bytearray(_CHUNK_BYTES)
    path = out_dir / SAMPLES
    with (atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf,
          zf.open("arr_0.npy", "w", force_zip64=True) as member):
        np.lib.format.write_array_header_1_0(member, header)
        for k in range(len(ranges)):
            start, end = ranges[k]
            shard, digest = files[(start, end)][0]
            why = _stream_shard(shard, digest, end - start, size, buffer, member.write)
            if why is not None:
                raise OSError(f"sample_to_npz: shard {shard} {why}; nothing was written: run the same command "
                              f"again, it samples that shard anew")
    return path
