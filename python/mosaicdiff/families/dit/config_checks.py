"""The DiT mosaic's config: its stage entries (`stage_config`), their fit to the architecture
(`check_stage_layout`) and the type checks of a saved config.json beyond the common ones
(`check_config_fields`): a bad value is one clear error naming the file and the field."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mosaicdiff.core.serialization import check_common_fields
from mosaicdiff.core.stages import StageSpec, check_stage_ranges
from mosaicdiff.families.dit.adapter import DIT_CONFIG_KEYS

__all__ = ["REQUIRED_KEYS", "check_config_fields", "check_stage_layout", "stage_config"]

#: Keys a format 2.x config must have (the file's envelope and everything that shapes the model).
REQUIRED_KEYS = ("format_version", "dtype", "stages", "shared_embedder", "dense_reference", *DIT_CONFIG_KEYS)


def check_config_fields(cls, config: dict, cfg_path: Path) -> None:
    """Raise ValueError ``MosaicDiT.from_pretrained: <file>: <field> must be <what>, got <value>``."""
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ValueError(f"{cls.__name__}.from_pretrained: {cfg_path} lacks the key {key!r}")
    need = check_common_fields(cls, config, cfg_path, ("kept_heads", "kept_channels"))
    need(isinstance(config["dense_reference"], dict), "dense_reference", "an object", config["dense_reference"])
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size"):
        need(_is_int(config[key]) and config[key] > 0, key, "a positive integer", config[key])
    need(isinstance(config["norm_eps"], (int, float)) and not isinstance(config["norm_eps"], bool), "norm_eps",
         "a number", config["norm_eps"])
    need(isinstance(config["shared_embedder"], bool), "shared_embedder", "true or false", config["shared_embedder"])
    layers = config["num_layers"]
    for i, s in enumerate(config["stages"]):
        need(len(s["blocks"]) == layers, f"stages[{i}].blocks", f"a list of {layers} blocks (num_layers)",
             s["blocks"])
    shared = config.get("shared_producers")
    need(shared is None or (isinstance(shared, list) and len(shared) == layers), "shared_producers",
         f"null or a list of {layers} entries (num_layers)", shared)
    for j, p in enumerate(shared or []):
        for key in ("heads", "channels"):
            v = p.get(key) if isinstance(p, dict) else None
            need(isinstance(v, list) and all(_is_int(x) for x in v), f"shared_producers[{j}].{key}",
                 "a list of integers", v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def stage_config(spec: StageSpec) -> dict[str, Any]:
    """The config entry of one stage (its kept indices as lists)."""
    if not isinstance(spec, StageSpec):
        raise TypeError(f"stages must be StageSpec, got {type(spec).__name__}")
    return {
        "name": spec.name, "t_start": int(spec.t_start), "t_end": int(spec.t_end), "sparsity": float(spec.sparsity),
        "blocks": [{"kept_heads": [int(i) for i in w.kept_heads.tolist()],
                    "kept_channels": [int(i) for i in w.kept_channels.tolist()]} for w in spec.blocks],
    }


def check_stage_layout(stages: Sequence[dict], num_layers: int, num_heads: int, mlp_hidden: int) -> None:
    """Validate stage ranges, block counts and kept index ranges against the dense model.

    Raises:
        ValueError: quoting the offending stage and values.
    """
    check_stage_ranges(stages, "MosaicDiT")
    for s in stages:
        name = s["name"]
        if len(s["blocks"]) != num_layers:
            raise ValueError(f"stage {name!r}: expected {num_layers} blocks, got {len(s['blocks'])}")
        for j, b in enumerate(s["blocks"]):
            for key, limit in (("kept_heads", num_heads), ("kept_channels", mlp_hidden)):
                idx = list(b[key])
                if idx and (min(idx) < 0 or max(idx) >= limit):
                    raise ValueError(f"stage {name!r} block {j}: {key} must lie in [0, {limit}), got "
                                     f"[{min(idx)}, {max(idx)}]")
                if len(set(idx)) != len(idx):
                    raise ValueError(f"stage {name!r} block {j}: {key} must not repeat an index")
