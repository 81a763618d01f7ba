"""Type checks of a mosaic's config fields: a bad value is one ValueError naming the field.

A config comes from a constructor call (``MosaicUNet(**config)``) or from a folder on disk
(`mosaicdiff.core.serialization`, whose messages name the file); both check with a `FieldChecker`
so that a wrong type is refused before it surfaces as a ``KeyError`` or a negative tensor dimension
deep inside the build.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["FieldChecker", "check_stage_fields", "is_int", "is_number", "positive_int", "positive_ints"]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v: Any) -> bool:
    return is_int(v) and v > 0


def positive_ints(v: Any) -> bool:
    """A positive integer or a non-empty list of them (diffusers' per-level fields)."""
    return positive_int(v) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(positive_int(x) for x in v))


class FieldChecker:
    """``need(ok, field, expected, got)``: ValueError ``<prefix>: <field> must be <expected>, got <got>``.

    Args:
        prefix (`str`): who is checking what (``"MosaicUNet"``, ``"MosaicDiT.from_pretrained: <file>"``).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, ok: bool, field: str, expected: str, got: Any) -> None:
        if not ok:
            r = repr(got)
            r = r if len(r) <= 60 else r[:57] + "..."
            raise ValueError(f"{self.prefix}: {field} must be {expected}, got {r}")


def check_stage_fields(stages: Any, need: FieldChecker, block_keys: Sequence[str] = (),
                       nonempty: bool = True) -> None:
    """``stages``: a list (`nonempty`: not empty) of objects with a string ``name``, integer
    ``t_start`` / ``t_end``, a number ``sparsity`` and a list of ``blocks``, each block an object
    whose `block_keys` are lists of integers."""
    need(isinstance(stages, (list, tuple)), "stages", "a list", stages)
    need(len(stages) > 0 or not nonempty, "stages", "a non-empty list", stages)
    for i, s in enumerate(stages):
        need(isinstance(s, dict), f"stages[{i}]", "an object", s)
        need(isinstance(s.get("name"), str), f"stages[{i}].name", "a string", s.get("name"))
        for key in ("t_start", "t_end"):
            need(is_int(s.get(key)), f"stages[{i}].{key}", "an integer", s.get(key))
        need(is_number(s.get("sparsity")), f"stages[{i}].sparsity", "a number", s.get("sparsity"))
        blocks = s.get("blocks")
        need(isinstance(blocks, (list, tuple)), f"stages[{i}].blocks", "a list", blocks)
        for j, b in enumerate(blocks):
            for key in block_keys:
                v = b.get(key) if isinstance(b, dict) else None
                need(isinstance(v, (list, tuple)) and all(is_int(x) for x in v), f"stages[{i}].blocks[{j}].{key}",
                     "a list of integers", v)
