"""LoRA adapters on a mosaic: diffusers' ``load_lora_adapter`` / ``fuse_lora`` / ``set_adapters`` API,
applied to each stage's kept rows and columns.

A LoRA trained on the dense model names the dense linears (``transformer_blocks.0.attn1.to_q``) and
adds ``scale * B @ A`` to each weight. A mosaic has no such linears: a stage's compact blocks hold
the producers' kept rows (``to_q/k/v``, ``fc1``) and the consumers' kept, OBS-compensated columns
(``to_out``, ``fc2``), and with shared producers one storage holds the rows of every stage. So each
family says where a dense linear's weight lives (`mosaicdiff.core.lora_layout.LoraTarget`: slots
of (tensor, rows, columns) in dense indices, a shared storage once), and the delta is added there:
a producer gets ``B[kept rows] @ A``, a consumer ``B @ A[:, kept columns]`` on top of its
compensated weight.

The adapters' deltas are always materialised in the weights (no extra low-rank path in the
forward, so the fused kernels, CUDA graphs and compiled graphs run unchanged): loading an adapter
applies it at weight 1, `set_adapters` / `disable_lora` / `delete_adapters` move the weights to the
new combination, `fuse_lora(lora_scale)` applies the fused adapters at ``lora_scale`` times their
weight, and `unfuse_lora` returns to the state before fusing. The base weights come back (up to
float rounding) when every adapter is unloaded. A saved mosaic holds the weights as they are.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mosaicdiff.core.lora_layout import LoraSlot, LoraTarget

__all__ = ["MosaicLoraMixin", "parse_lora_state_dict"]

#: The weight file diffusers' ``save_lora_weights`` writes into a folder.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def _check_dtype(t: torch.Tensor) -> None:
    if not t.is_floating_point() or t.element_size() < 2:
        raise TypeError(f"LoRA: cannot add an adapter to {t.dtype} weights; load it before enable_layerwise_casting "
                        f"or quantisation")


def _add_delta(slot: LoraSlot, a: torch.Tensor, b: torch.Tensor, coef: float) -> None:
    """Add ``coef * B[rows] @ A[:, cols]`` to the slot's tensor at its rows and columns."""
    t = slot.tensor
    b = b.to(t.device) if slot.rows is None else b.to(t.device)[slot.rows[1].to(t.device)]
    a = a.to(t.device) if slot.cols is None else a.to(t.device)[:, slot.cols[1].to(t.device)]
    delta = ((b @ a) * coef).to(t.dtype)
    if slot.rows is None and slot.cols is None:
        t.add_(delta)
    elif slot.cols is None:
        t.index_add_(0, slot.rows[0].to(t.device), delta)
    elif slot.rows is None:
        t.index_add_(1, slot.cols[0].to(t.device), delta)
    else:
        t[slot.rows[0].to(t.device)[:, None], slot.cols[0].to(t.device)[None, :]] += delta


def _pattern_value(patterns: Mapping[str, float], module: str) -> float | None:
    """The value of the first PEFT ``rank_pattern`` / ``alpha_pattern`` key matching `module`."""
    for key, value in patterns.items():
        key = key.removeprefix("^")
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return float(value)
    return None


def parse_lora_state_dict(state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, LoraTarget],
                          network_alphas: Mapping[str, float] | None = None, metadata: Mapping | None = None,
                          owner: str = "load_lora_adapter") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Check a PEFT LoRA state dict against the targets: ``module -> (A, B, scale)`` (float32).

    Args:
        state_dict: ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight`` ``(out, r)``.
        targets: the mosaic's `LoraTarget` per dense module name.
        network_alphas: kohya alphas per module (``<module>.alpha`` or ``<module>``); scale alpha / r.
        metadata: PEFT ``LoraConfig`` fields (``lora_alpha``, ``alpha_pattern``); scale alpha / r.
            Without either the scale is 1 (diffusers' convention).

    Raises:
        ValueError: a key of another format, a module the mosaic has no target for, a missing
            half, or A/B shapes that do not fit each other (rank) or the dense linear.
    """
    if network_alphas and metadata:
        raise ValueError(f"{owner}: pass network_alphas or metadata, not both")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _KEY.match(key)
        if m is None:
            kind = ("DoRA" if "lora_magnitude_vector" in key else "a LoRA bias" if ".lora_B.bias" in key
                    else "LoKr" if ".lokr_" in key else "a non-PEFT key")
            raise ValueError(f"{owner}: key {key!r} is {kind}; a mosaic takes PEFT LoRA keys "
                             f"'<module>.lora_A.weight' and '<module>.lora_B.weight'")
        parts.setdefault(m["module"], {})[m["part"]] = value
    if not parts:
        raise ValueError(f"{owner}: the state dict has no LoRA weights")
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in (network_alphas or {}).items()}
    out = {}
    for module, ab in parts.items():
        if module not in targets:
            known = sorted(targets)
            raise ValueError(f"{owner}: {module!r} names no module the mosaic can adapt; it adapts the dense "
                             f"model's {', '.join(known[:4])}, ... ({len(known)} modules)")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{owner}: {module!r} has lora_{''.join(ab)} but not lora_{'AB'.replace(''.join(ab), '')}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{owner}: {module!r} has rank mismatch: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} must be (r, in) and (out, r)")
        out_f, in_f = targets[module].shape
        if (b.shape[0], a.shape[1]) != (out_f, in_f):
            raise ValueError(f"{owner}: {module!r} has shape mismatch: lora_B @ lora_A is "
                             f"{(b.shape[0], a.shape[1])}, the dense weight is {(out_f, in_f)}")
        rank = int(a.shape[0])
        if metadata:
            alpha = _pattern_value(metadata.get("alpha_pattern") or {}, module)
            alpha = float(metadata.get("lora_alpha", rank)) if alpha is None else alpha
        else:
            alpha = alphas.get(module, float(rank))
        out[module] = (a.detach().float(), b.detach().float(), alpha / rank)
    return out


def _read_lora(source, weight_name: str | None, owner: str) -> tuple[dict, dict | None]:
    """A state dict and its PEFT metadata from a dict, a safetensors file or a local folder."""
    if isinstance(source, Mapping):
        return dict(source), None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{owner}: pass a state dict or a local path, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        path = path / (weight_name or LORA_WEIGHT_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: no LoRA weights at {str(path)!r} (a local .safetensors file or a folder "
                                f"holding {LORA_WEIGHT_NAME}; hub ids are not downloaded)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors file, not a dict)
    meta = header.get("lora_adapter_metadata")
    return state, (json.loads(meta) if meta else None)


class MosaicLoraMixin:
    """diffusers' LoRA API on a `mosaicdiff.core.model.MosaicModel` (see the module docstring).

    A family implements `_lora_targets`.
    """

    def _lora_targets(self) -> dict[str, LoraTarget]:
        """The dense linears a LoRA may adapt, by dense module name, and where they live (family hook)."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA adapters yet")

    # -------------------------------------------------------------- state

    def _lora(self) -> dict:
        """The adapters (``adapters``: name -> module -> (A, B, scale)), their ``weights``, the
        ``active`` names, ``enabled``, ``fused`` (name -> coefficient) and ``applied`` (name ->
        the coefficient now in the weights)."""
        state = self.__dict__.get("_lora_state")
        if state is None:
            state = {"adapters": {}, "weights": {}, "active": [], "enabled": True, "fused": {}, "applied": {}}
            self.__dict__["_lora_state"] = state
        return state

    def _lora_wanted(self, name: str) -> float:
        s = self._lora()
        if name in s["fused"]:
            return s["fused"][name]
        return s["weights"][name] if s["enabled"] and name in s["active"] else 0.0

    @torch.no_grad()
    def _lora_sync(self) -> None:
        """Move the weights to the wanted combination: each adapter's coefficient change applied once."""
        s = self._lora()
        changes = {name: self._lora_wanted(name) - s["applied"].get(name, 0.0) for name in s["adapters"]}
        changes = {name: c for name, c in changes.items() if c != 0.0}
        if not changes:
            return
        targets = self._lora_targets()
        for name in changes:  # every tensor checked before any is changed
            for module in s["adapters"][name]:
                for slot in targets[module].slots:
                    _check_dtype(slot.tensor)
        for name, change in changes.items():
            for module, (a, b, scale) in s["adapters"][name].items():
                for slot in targets[module].slots:
                    _add_delta(slot, a, b, change * scale)
            s["applied"][name] = self._lora_wanted(name)

    def _lora_names(self, adapter_names, owner: str) -> list[str]:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self._lora()["adapters"]]
        if missing:
            raise ValueError(f"{owner}: adapter(s) {missing} are not loaded; loaded: {list(self._lora()['adapters'])}")
        return names

    # -------------------------------------------------------------- diffusers' API

    @property
    def peft_config(self) -> dict[str, dict]:
        """The loaded adapters (name -> ``r``, ``lora_alpha`` scale, ``target_modules``): diffusers'
        pipelines list a component's adapters from it."""
        return {name: {"target_modules": sorted(mods), "r": max(int(a.shape[0]) for a, _, _ in mods.values())}
                for name, mods in self._lora()["adapters"].items()}

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix: str | None = "transformer",
                          hotswap: bool = False, **kwargs) -> None:
        r"""Load a PEFT-format LoRA of the dense model and apply it to every stage (weight 1, active).

        Parameters:
            pretrained_model_name_or_path_or_dict (`dict`, `str` or `os.PathLike`): the state dict
                (``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, the dense model's module
                names), a ``.safetensors`` file or a folder holding ``pytorch_lora_weights.safetensors``.
            prefix (`str`, *optional*, defaults to `"transformer"`): keys starting with ``prefix.``
                are taken, the prefix removed (a pipeline's LoRA file); a dict with no such key is
                taken as is.
            hotswap (`bool`): replace the weights of the already loaded adapter `adapter_name`.
            adapter_name (`str`, *optional*): defaults to ``default_<n>``.
            network_alphas (`dict`, *optional*), metadata (`dict`, *optional*): the scale ``alpha / r``
                per module (kohya alphas, or PEFT's ``lora_alpha`` / ``alpha_pattern``); else 1.
            weight_name (`str`, *optional*): the file in a folder.

        The loading options diffusers' pipelines pass (``_pipeline``, ``low_cpu_mem_usage``) are accepted.

        Raises:
            ValueError: a name in use (or, with `hotswap`, not loaded), keys of another format, a
                module the mosaic cannot adapt, a rank or shape mismatch (`parse_lora_state_dict`).
        """
        owner = f"{type(self).__name__}.load_lora_adapter"
        adapter_name = kwargs.pop("adapter_name", None)
        network_alphas, metadata = kwargs.pop("network_alphas", None), kwargs.pop("metadata", None)
        state, file_meta = _read_lora(pretrained_model_name_or_path_or_dict, kwargs.pop("weight_name", None), owner)
        for ignored in ("_pipeline", "low_cpu_mem_usage", "use_safetensors", "local_files_only", "subfolder"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"{owner}: unexpected keyword argument(s) {sorted(kwargs)}")
        metadata = metadata if metadata is not None else file_meta
        if prefix and any(k.startswith(prefix + ".") for k in state):
            state = {k.removeprefix(prefix + "."): v for k, v in state.items() if k.startswith(prefix + ".")}
            if network_alphas:
                network_alphas = {k.removeprefix(prefix + "."): v for k, v in network_alphas.items()
                                  if k.startswith(prefix + ".")}
        s = self._lora()
        if adapter_name is None:
            adapter_name = f"default_{len(s['adapters'])}"
        if hotswap != (adapter_name in s["adapters"]):
            raise ValueError(f"{owner}: adapter_name {adapter_name!r} " + (
                "is not loaded (hotswap replaces a loaded adapter)" if hotswap else
                "is already in use; pick another name or pass hotswap=True"))
        modules = parse_lora_state_dict(state, self._lora_targets(), network_alphas, metadata, owner)
        if hotswap:
            keep = (s["weights"][adapter_name], adapter_name in s["active"])
            self.delete_adapters(adapter_name)
        else:
            keep = (1.0, True)
        s["adapters"][adapter_name], s["weights"][adapter_name] = modules, keep[0]
        if keep[1]:
            s["active"].append(adapter_name)
        try:
            self._lora_sync()
        except Exception:  # nothing was applied (`_lora_sync` checks first): forget the adapter
            s["active"] = [n for n in s["active"] if n != adapter_name]
            for table in ("adapters", "weights"):
                s[table].pop(adapter_name, None)
            raise

    def set_adapters(self, adapter_names: str | Sequence[str], weights: float | Sequence[float | None] | None = None
                     ) -> None:
        """Make `adapter_names` the active adapters, with `weights` (one number for all, one per
        adapter, None for 1.0).

        Raises:
            ValueError: an adapter not loaded, a weights list of another length, a fused adapter
                (``unfuse_lora`` first).
            TypeError: per-block weight dicts (not supported on a mosaic).
        """
        owner = f"{type(self).__name__}.set_adapters"
        names = self._lora_names(adapter_names, owner)
        weights = [weights] * len(names) if weights is None or isinstance(weights, (int, float)) else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"{owner}: {len(names)} adapter names and {len(weights)} weights")
        if any(isinstance(w, Mapping) for w in weights):
            raise TypeError(f"{owner}: weights must be numbers (per-block weight dicts are not supported)")
        s = self._lora()
        if s["fused"]:
            raise ValueError(f"{owner}: adapters {list(s['fused'])} are fused; call unfuse_lora() first")
        for name, w in zip(names, weights):
            s["weights"][name] = 1.0 if w is None else float(w)
        s["active"] = names
        self._lora_sync()

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make `adapter_name` the active adapter(s), weights as they were set."""
        names = self._lora_names(adapter_name, f"{type(self).__name__}.set_adapter")
        self.set_adapters(names, [self._lora()["weights"][n] for n in names])

    def active_adapters(self) -> list[str]:
        """The active adapters' names (a method, as diffusers' ``PeftAdapterMixin.active_adapters``)."""
        return list(self._lora()["active"])

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: Sequence[str] | None = None) -> None:
        """Fuse the active adapters (or `adapter_names`) at ``lora_scale`` times their weight.

        Raises:
            ValueError: an adapter not loaded; with `safe_fusing`, a delta that is not finite (nothing fused).
        """
        owner = f"{type(self).__name__}.fuse_lora"
        if not math.isfinite(lora_scale):
            raise ValueError(f"{owner}: lora_scale must be a finite number, got {lora_scale}")
        s = self._lora()
        names = self._lora_names(adapter_names, owner) if adapter_names is not None else list(s["active"])
        if safe_fusing:
            bad = [n for n in names for a, b, _ in s["adapters"][n].values()
                   if not (torch.isfinite(a).all() and torch.isfinite(b).all())]
            if bad:
                raise ValueError(f"{owner}: adapter(s) {sorted(set(bad))} have non-finite weights; nothing fused")
        for name in names:
            s["fused"][name] = float(lora_scale) * s["weights"][name]
        self._lora_sync()

    def unfuse_lora(self) -> None:
        """Return to the state before `fuse_lora` (the adapters active at their weights)."""
        self._lora()["fused"].clear()
        self._lora_sync()

    def disable_lora(self) -> None:
        """Run without the (unfused) adapters, keeping them loaded."""
        self._lora()["enabled"] = False
        self._lora_sync()

    def enable_lora(self) -> None:
        """Undo `disable_lora`."""
        self._lora()["enabled"] = True
        self._lora_sync()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove adapters: their deltas leave the weights (fused or not).

        Raises:
            ValueError: an adapter not loaded.
        """
        s = self._lora()
        for name in self._lora_names(adapter_names, f"{type(self).__name__}.delete_adapters"):
            s["fused"].pop(name, None)
            s["active"] = [n for n in s["active"] if n != name]
            s["weights"][name] = 0.0
            self._lora_sync()
            for table in ("adapters", "weights", "applied"):
                s[table].pop(name, None)

    def unload_lora(self) -> None:
        """Remove every adapter: the weights return to the base mosaic's."""
        names = list(self._lora()["adapters"])
        if names:
            self.delete_adapters(names)

