"""The stages of a mosaic as its config describes them, and the checks that they fit the model.

A stage in the config is ``{"name", "t_start", "t_end", "sparsity", "blocks": [{"kept_heads",
"kept_channels"}, ...]}``: everything needed to build the compact blocks' skeleton (their
weights come from the safetensors file or from the pruner).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mosaicdiff.types import StageSpec

__all__ = ["NUM_TRAIN_TIMESTEPS", "check_stage_layout", "coverage_problem", "stage_config", "stage_index"]

#: Default trajectory range [0, NUM_TRAIN_TIMESTEPS) (DiT's training schedule).
NUM_TRAIN_TIMESTEPS = 1000


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
    if not stages:
        raise ValueError("MosaicDiT needs at least one stage, got none")
    for s in stages:
        name = s["name"]
        if not s["t_start"] < s["t_end"]:
            raise ValueError(f"stage {name!r}: t_start must be < t_end, got [{s['t_start']}, {s['t_end']})")
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
    ordered = sorted(stages, key=lambda s: s["t_start"])  # the caller's order is kept for indexing
    for a, b in zip(ordered, ordered[1:]):
        if a["t_end"] != b["t_start"]:
            kind = "overlap" if a["t_end"] > b["t_start"] else "leave a gap"
            raise ValueError(
                f"stages {a['name']!r} [{a['t_start']}, {a['t_end']}) and {b['name']!r} "
                f"[{b['t_start']}, {b['t_end']}) {kind}; stage ranges must be contiguous"
            )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def coverage_problem(stages: Sequence[dict], meta: Any) -> str | None:
    """Why the stages do not tile [0, T) (every sampling step needs exactly one stage), or None.

    T is ``meta["num_train_timesteps"]`` (written by `mosaicdiff.prune`), else 1000.
    """
    T = meta.get("num_train_timesteps") if isinstance(meta, dict) else None
    T = T if _is_int(T) and T > 0 else NUM_TRAIN_TIMESTEPS
    spans = sorted(((s["t_start"], s["t_end"], s["name"]) for s in stages), key=lambda x: x[:2])
    need = f"the stages must cover [0, {T}) without gaps or overlaps"
    if spans[0][0] != 0:
        return f"stage {spans[0][2]!r} starts at t={spans[0][0]}, so t in [0, {spans[0][0]}) has no stage; {need}"
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if a1 != b0:
            kind = "overlap" if a1 > b0 else "leave a gap"
            return f"stages {a!r} [{a0}, {a1}) and {b!r} [{b0}, {b1}) {kind}; {need}"
    if spans[-1][1] != T:
        return f"the last stage {spans[-1][2]!r} ends at t={spans[-1][1]}, not at {T}; {need}"
    return None


def stage_index(ranges: Sequence[tuple[str, int, int, float]], t: float) -> int:
    """Index of the ``(name, t_start, t_end, sparsity)`` range with ``t_start <= t < t_end``.

    Raises:
        ValueError: if no range contains `t` (the ranges are listed).
    """
    for i, (_, t0, t1, _) in enumerate(ranges):
        if t0 <= t < t1:
            return i
    listed = ", ".join(f"{n}[{a},{b})" for n, a, b, _ in ranges)
    raise ValueError(f"timestep {t:g} is outside every stage: {listed}")
