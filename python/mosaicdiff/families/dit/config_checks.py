"""The DiT mosaic's config: its stage entries (`stage_config`), their fit to the architecture
(`check_stage_layout`), the dense DiT's keys (`check_dense_fields`, constructor and loader alike) and
the type checks of a saved config.json beyond the common ones (`check_config_fields`): a bad value is
one clear error naming the field (and the file)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mosaicdiff.core.config_fields import FieldChecker, is_int, is_number, positive_int
from mosaicdiff.core.serialization import check_common_fields
from mosaicdiff.core.stages import StageSpec, check_stage_ranges
from mosaicdiff.families.dit.adapter import DIT_CONFIG_KEYS

__all__ = ["FIXED_FIELDS", "REQUIRED_KEYS", "check_config_fields", "check_dense_fields", "check_stage_layout",
           "stage_config"]

#: Keys a format 2.x config must have (the file's envelope and everything that shapes the model).
REQUIRED_KEYS = ("format_version", "dtype", "stages", "shared_embedder", "dense_reference", *DIT_CONFIG_KEYS)
#: The dense keys with one possible value: what the compact block computes (adaLN-Zero, tanh-GELU,
#: norms without affine weights; `mosaicdiff.families.dit.adapter.validate_dit` refuses other DiTs).
FIXED_FIELDS = {"activation_fn": "gelu-approximate", "norm_type": "ada_norm_zero", "norm_elementwise_affine": False}


def check_dense_fields(config: dict, need: FieldChecker) -> None:
    """The dense ``DiTTransformer2DModel`` keys of a mosaic's config (`DIT_CONFIG_KEYS`, all present).

    Raises:
        ValueError: ``<prefix>: <field> must be <what>, got <value>`` (`FieldChecker`).
    """
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size",
                "sample_size", "num_embeds_ada_norm", "norm_num_groups"):
        need(positive_int(config[key]), key, "a positive integer", config[key])
    out = config["out_channels"]
    need(out is None or positive_int(out), "out_channels", "null or a positive integer", out)
    for key, value in FIXED_FIELDS.items():
        need(config[key] == value and type(config[key]) is type(value), key,
             f"{value!r} (the only DiT variant MosaicDiT computes)", config[key])
    need(is_number(config["norm_eps"]) and config["norm_eps"] > 0, "norm_eps", "a positive number",
         config["norm_eps"])
    need(is_number(config["dropout"]) and 0 <= config["dropout"] < 1, "dropout", "a number in [0, 1)",
         config["dropout"])
    for key in ("attention_bias", "upcast_attention"):
        need(isinstance(config[key], bool), key, "true or false", config[key])


def check_config_fields(cls, config: dict, cfg_path: Path) -> None:
    """Raise ValueError ``MosaicDiT.from_pretrained: <file>: <field> must be <what>, got <value>``."""
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ValueError(f"{cls.__name__}.from_pretrained: {cfg_path} lacks the key {key!r}")
    need = check_common_fields(cls, config, cfg_path, ("kept_heads", "kept_channels"))
    need(isinstance(config["dense_reference"], dict), "dense_reference", "an object", config["dense_reference"])
    check_dense_fields(config, need)
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
            need(isinstance(v, list) and all(is_int(x) for x in v), f"shared_producers[{j}].{key}",
                 "a list of integers", v)


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
