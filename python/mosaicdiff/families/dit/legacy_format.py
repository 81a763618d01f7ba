"""Reading folders of format 1.x (mosaicdiff 0.1) into the 2.x layout.

1.x kept the dense DiT's config under ``dense_config``, the block shapes and epsilons under
``runtime`` (derived facts the 2.x skeleton recomputes from the architecture) and named the block
tensors ``stages.<i>.blocks.<j>.<field>``; the skeleton's tensors ("shared.*") are unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mosaicdiff.families.dit.adapter import DIT_CONFIG_KEYS

__all__ = ["upgrade_config", "upgrade_keys"]

_LEGACY_KEYS = (("dense_config", dict, "an object"), ("runtime", dict, "an object"),
                ("dense_reference", dict, "an object"), ("stages", list, "a list"))
_BLOCK_KEY = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(\w+)")


def upgrade_config(config: dict[str, Any], cfg_path: Path) -> dict[str, Any]:
    """The 2.x config of a 1.x one (marked ``_legacy`` so that the tensor names are upgraded too)."""
    for key, typ, what in _LEGACY_KEYS:
        if key not in config:
            raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path} lacks the key {key!r}")
        if not isinstance(config[key], typ):
            raise ValueError(f"MosaicDiT.from_pretrained: {cfg_path}: {key} must be {what}, got {config[key]!r}")
    dense = config["dense_config"]
    upgraded = {k: dense[k] for k in DIT_CONFIG_KEYS if k in dense}
    upgraded.update({k: config[k] for k in ("format_version", "dtype", "weights_id", "meta") if k in config})
    upgraded.update(stages=config["stages"], dense_reference=config["dense_reference"],
                    shared_embedder=config["runtime"].get("shared_embedder"), _legacy=True)
    return upgraded


def upgrade_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the 1.x block tensors to the module's state-dict names (``stage_blocks.<i>.<j>.<field>``)."""
    return {_BLOCK_KEY.sub(r"stage_blocks.\1.\2.\3", k) if _BLOCK_KEY.fullmatch(k) else k: v
            for k, v in tensors.items()}
