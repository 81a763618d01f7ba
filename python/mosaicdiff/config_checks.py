"""Type checks of a saved mosaic's config.json: every field the loader reads, so that a bad value
is one clear error naming the file and the field, not a traceback from deep in the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mosaicdiff.integrations.diffusers_dit import DIT_CONFIG_KEYS

__all__ = ["REQUIRED_KEYS", "check_config_fields", "format_major_minor"]

#: Keys a format 2.x config must have (the file's envelope and everything that shapes the model).
REQUIRED_KEYS = ("format_version", "dtype", "stages", "shared_embedder", "dense_reference", *DIT_CONFIG_KEYS)


def format_major_minor(version: str, what: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(version).split(".")[:2])
    except ValueError:
        raise ValueError(f"{what}: format_version must look like 'MAJOR.MINOR', got {version!r}") from None
    return major, minor


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config_fields(config: dict, cfg_path: Path) -> None:
    """Raise ValueError ``MosaicDiT.from_pretrained: <file>: <field> must be <what>, got <value>``."""
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path} lacks the key {key!r}")

    def need(ok: bool, field: str, expected: str, got: Any) -> None:
        if not ok:
            r = repr(got)
            r = r if len(r) <= 60 else r[:57] + "..."
            raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path}: {field} must be {expected}, got {r}")

    need(isinstance(config["format_version"], str), "format_version", "a string", config["format_version"])
    need(isinstance(config["dtype"], str), "dtype", "a string", config["dtype"])
    need(isinstance(config["dense_reference"], dict), "dense_reference", "an object", config["dense_reference"])
    need(isinstance(config["stages"], list), "stages", "a list", config["stages"])
    need(config.get("meta") is None or isinstance(config["meta"], dict), "meta", "an object", config.get("meta"))
    need(isinstance(config.get("weights_id", ""), str), "weights_id", "a string", config.get("weights_id"))
    dtype = getattr(torch, config["dtype"], None)
    need(isinstance(dtype, torch.dtype) and dtype.is_floating_point, "dtype", "a torch float dtype name",
         config["dtype"])
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size"):
        need(_is_int(config[key]) and config[key] > 0, key, "a positive integer", config[key])
    need(_is_number(config["norm_eps"]), "norm_eps", "a number", config["norm_eps"])
    need(isinstance(config["shared_embedder"], bool), "shared_embedder", "true or false", config["shared_embedder"])
    need(len(config["stages"]) > 0, "stages", "a non-empty list", config["stages"])
    layers = config["num_layers"]
    for i, s in enumerate(config["stages"]):
        need(isinstance(s, dict), f"stages[{i}]", "an object", s)
        need(isinstance(s.get("name"), str), f"stages[{i}].name", "a string", s.get("name"))
        for key in ("t_start", "t_end"):
            need(_is_int(s.get(key)), f"stages[{i}].{key}", "an integer", s.get(key))
        need(_is_number(s.get("sparsity")), f"stages[{i}].sparsity", "a number", s.get("sparsity"))
        blocks = s.get("blocks")
        need(isinstance(blocks, list) and len(blocks) == layers, f"stages[{i}].blocks",
             f"a list of {layers} blocks (num_layers)", blocks)
        for j, b in enumerate(blocks):
            for key in ("kept_heads", "kept_channels"):
                v = b.get(key) if isinstance(b, dict) else None
                need(isinstance(v, list) and all(_is_int(x) for x in v), f"stages[{i}].blocks[{j}].{key}",
                     "a list of integers", v)
    shared = config.get("shared_producers")
    need(shared is None or (isinstance(shared, list) and len(shared) == layers), "shared_producers",
         f"null or a list of {layers} entries (num_layers)", shared)
    for j, p in enumerate(shared or []):
        for key in ("heads", "channels"):
            v = p.get(key) if isinstance(p, dict) else None
            need(isinstance(v, list) and all(_is_int(x) for x in v), f"shared_producers[{j}].{key}",
                 "a list of integers", v)
