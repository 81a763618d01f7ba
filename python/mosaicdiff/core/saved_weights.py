"""A saved weights set read in two steps: its safetensors headers, then its tensors.

The header of every file of a set (one ``model.safetensors``, or an index and its shards, laid
out as `mosaicdiff.core.model_folder` says) gives each tensor's name, shape and dtype and the id
of the save that wrote it, without reading any tensor data. The loader
(`mosaicdiff.core.serialization`) compares that with the skeleton its config describes before it
allocates anything; only then are the tensors read (`read_tensors`). Errors are one line naming
the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mosaicdiff.core import model_folder

__all__ = ["SAFETENSORS_DTYPES", "TensorInfo", "WeightsHeader", "read_set_header", "read_tensors"]

#: safetensors' dtype names (a header's ``dtype``) as torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a header: its shape, its dtype (the safetensors name when torch has none), the
    file holding it and its name there."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str
    file: Path
    name: str

    @property
    def nbytes(self) -> int:
        size = self.dtype.itemsize if isinstance(self.dtype, torch.dtype) else 1
        return math.prod(self.shape) * size


@dataclass(frozen=True)
class WeightsHeader:
    """The tensors of a set (name -> `TensorInfo`), its save id and the file or index read (``where``)."""

    tensors: dict[str, TensorInfo]
    weights_id: str | None
    where: Path

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def renamed(self, names: dict[str, str]) -> WeightsHeader:
        """The header under new names (``{new name: stored name}``, as an upgrade hook maps them)."""
        return WeightsHeader({new: self.tensors[old] for new, old in names.items()}, self.weights_id, self.where)


def _corrupt(who: str, path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"{who}: {path} is truncated or corrupt ({type(exc).__name__}: {exc}); save the mosaic again")


def _file_header(who: str, wpath: Path) -> tuple[dict[str, TensorInfo], str | None]:
    """The tensors of one safetensors file (from its header only) and its save id."""
    if not wpath.is_file():
        raise FileNotFoundError(f"{who}: {wpath} not found")
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            tensors = {}
            for key in f.keys():
                view = f.get_slice(key)
                name = view.get_dtype()
                tensors[key] = TensorInfo(tuple(int(d) for d in view.get_shape()), SAFETENSORS_DTYPES.get(name, name),
                                          wpath, key)
            return tensors, (f.metadata() or {}).get(model_folder.WEIGHTS_ID_KEY)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise _corrupt(who, wpath, exc) from None


def _sharded_header(who: str, where: model_folder.WeightsLocation) -> WeightsHeader:
    """The header of a sharded set (its index at ``where.path``): every shard must carry the
    index's save id and hold exactly the tensors the index maps to it."""
    index = where.path
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        want = (data.get("metadata") or {}).get(model_folder.WEIGHTS_ID_KEY)
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(who, index, exc) from None
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard.startswith("."):
            raise ValueError(f"{who}: {index} maps tensors to {shard!r}, not a file of the folder")
        copies = [d / shard for d in where.search if (d / shard).is_file()]
        if not copies:
            raise FileNotFoundError(f"{who}: {index.parent / shard} not found (a shard {index.name} lists); "
                                    f"save the mosaic again")
        pick = next((c for c in copies if model_folder.weights_id(c) == want), copies[0])
        part, shard_id = _file_header(who, pick)
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
    return WeightsHeader(tensors, want, index)


def read_set_header(who: str, where: model_folder.WeightsLocation) -> WeightsHeader:
    """The header of the set at `where` (`mosaicdiff.core.model_folder.locate_weights`); no tensor is read.

    Raises:
        FileNotFoundError: a file of the set is missing.
        ValueError: a truncated or corrupt file, or shards that do not match their index.
    """
    if where.kind == "index":
        return _sharded_header(who, where)
    tensors, got = _file_header(who, where.path)
    return WeightsHeader(tensors, got, where.path)


def read_tensors(who: str, header: WeightsHeader) -> dict[str, torch.Tensor]:
    """The tensors `header` lists (under its names), read from their files.

    Raises:
        ValueError: a file changed into one that cannot be read since its header was.
    """
    by_file: dict[Path, list[str]] = {}
    for key, info in header.tensors.items():
        by_file.setdefault(info.file, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in keys:
                    tensors[key] = f.get_tensor(header.tensors[key].name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise _corrupt(who, path, exc) from None
    return tensors
