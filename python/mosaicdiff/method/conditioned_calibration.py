"""`ConditionedCalibration`: clean latents with the dense model's forward arguments, for every family.

The conditions are a dict of the dense model's forward keyword arguments besides the noisy input
and the timestep. Tensors with one row per latent (and nested dicts of them) are split with the
latents when a stage's inputs are drawn (`mosaicdiff.method.calibrate.stage_inputs`); everything
else is wrapped in `Shared` and passed unchanged to every forward. The null conditions give the
classifier-free-guidance branch. `mosaicdiff.method.calibrate.Calibration` (class labels) and
`mosaicdiff.method.text_calibration.TextCalibration` (prompt embeddings) build it; the public
names are in `mosaicdiff.calibrate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mosaicdiff.core.distributed import tensors_digest

__all__ = ["ConditionedCalibration", "Shared", "check_finite", "shape_of"]


# ----------------------------------------------------------------------------- conditions


class Shared:
    """A condition entry passed unchanged to every forward, not split by row.

    `ConditionedCalibration` wraps every entry of its conditions that is not a tensor with one
    row per latent (or a dict of such); wrap one yourself when a tensor whose first dimension
    happens to equal the number of latents must not be split (e.g. Flux's ``txt_ids``).
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value.value if isinstance(value, Shared) else value

    def __repr__(self) -> str:
        return f"Shared({_describe(self.value)})"


def shape_of(value: Any) -> Any:
    """A tensor's shape, or a non-tensor's type name (for the families' one-line errors)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_finite(where: str, t: torch.Tensor) -> None:
    """Raise ValueError naming `where` and the first bad rows when a floating tensor holds NaN/inf
    (integer and meta tensors pass)."""
    if not t.is_floating_point() or t.device.type == "meta" or bool(torch.isfinite(t).all()):
        return
    bad = ~torch.isfinite(t)
    rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().reshape(-1).tolist() if bad.dim() else []
    raise ValueError(f"{where} contains NaN/inf (rows {rows[:8]}); drop or fix those samples")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, Shared):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def _key(where: str, key: str) -> str:
    return f"{where}[{key!r}]"


def _split(conditions: Any, n: int, where: str) -> dict[str, Any]:
    """`conditions` with every entry that is not split by row wrapped in `Shared` (validated)."""
    if not isinstance(conditions, Mapping):
        raise TypeError(f"{where} must be a dict of the model's forward keyword arguments, "
                        f"got {type(conditions).__name__}")
    out: dict[str, Any] = {}
    for key, value in conditions.items():
        if not isinstance(key, str):
            raise TypeError(f"{where} keys must be the forward's argument names (str), got {key!r}")
        if isinstance(value, Shared):
            out[key] = value
        elif isinstance(value, Mapping):
            out[key] = _split(value, n, _key(where, key))
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
            out[key] = value.detach()
        else:
            out[key] = Shared(value.detach() if isinstance(value, torch.Tensor) else value)
    return out


def _split_nulls(nulls: Any, conditions: dict[str, Any], n: int, where: str, cond_where: str) -> dict[str, Any]:
    """Validated null conditions: per key of `conditions` split by row, a tensor of 1 or `n` rows."""
    if not isinstance(nulls, Mapping):
        raise TypeError(f"{where} must be a dict like conditions (the unconditional forward's keyword "
                        f"arguments), got {type(nulls).__name__}")
    out: dict[str, Any] = {}
    for key, value in nulls.items():
        if key not in conditions:
            raise ValueError(f"{_key(where, key)} has no counterpart in {cond_where} "
                             f"(keys {sorted(conditions)})")
        cond = conditions[key]
        if isinstance(cond, Shared):
            raise ValueError(f"{_key(where, key)}: {_key(cond_where, key)} is passed unchanged to every forward "
                             f"(not one row per latent), so both CFG branches share it; leave it out of {where}")
        if isinstance(cond, dict):
            out[key] = _split_nulls(value, cond, n, _key(where, key), _key(cond_where, key))
            continue
        rows = tuple(cond.shape[1:])
        if not isinstance(value, torch.Tensor) or value.dim() != cond.dim() or value.shape[0] not in (1, n) \
                or tuple(value.shape[1:]) != rows:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{_key(where, key)} must be a tensor of 1 row (broadcast) or {n} rows (one per latent) "
                             f"shaped like the rows {rows} of {_key(cond_where, key)}, got {got}")
        if value.is_floating_point() != cond.is_floating_point():
            raise TypeError(f"{_key(where, key)} is {value.dtype} but {_key(cond_where, key)} is {cond.dtype}")
        out[key] = value.detach().to(cond.device, cond.dtype)
    return out


def _unwrap(condition: Any) -> Any:
    """The forward's arguments: `Shared` entries replaced by their values."""
    if isinstance(condition, Shared):
        return condition.value
    if isinstance(condition, Mapping):
        return {k: _unwrap(v) for k, v in condition.items()}
    return condition


def _rows_of(conditions: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    out = {}
    for key, value in conditions.items():
        if isinstance(value, dict):
            out[key] = _rows_of(value, index)
        elif isinstance(value, torch.Tensor):
            out[key] = value[index.to(value.device)]
        else:
            out[key] = value  # Shared
    return out


def _null_rows_of(nulls: dict[str, Any], conditions: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    out = {}
    for key, cond in conditions.items():
        null = nulls.get(key)
        if isinstance(cond, dict):
            out[key] = _null_rows_of(null or {}, cond, index)
        elif isinstance(cond, Shared):
            out[key] = cond
        elif null is None:  # not given: the same in both branches
            out[key] = cond[index.to(cond.device)]
        elif null.shape[0] == 1:
            out[key] = null.expand(index.numel(), *null.shape[1:])
        else:
            out[key] = null[index.to(null.device)]
    return out


def _float_entries(conditions: dict[str, Any], where: str):
    """(name, tensor) of every floating tensor of the conditions, `Shared` ones included."""
    for key, value in conditions.items():
        value = value.value if isinstance(value, Shared) else value
        if isinstance(value, Mapping):
            yield from _float_entries(value, _key(where, key))
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            yield _key(where, key), value


def _row_entries(conditions: dict[str, Any], where: str):
    """(name, tensor) of every entry split by row."""
    for key, value in conditions.items():
        if isinstance(value, dict):
            yield from _row_entries(value, _key(where, key))
        elif isinstance(value, torch.Tensor):
            yield _key(where, key), value


class ConditionedCalibration:
    """Clean calibration latents with the dense model's conditioning: one type for every family.

    Parameters:
        latents (`torch.Tensor` of shape `(N, C, H, W)`): clean latents as the model sees them at
            t = 0 (VAE latents times the VAE scaling factor; pixels for a pixel-space model).
        conditions (`dict`): the dense model's forward keyword arguments besides the noisy input
            and the timestep. A tensor whose first dimension is ``N`` is one row per latent: the
            calibration draws take its rows with the latents' (and, with CFG, the null rows
            after them). A nested dict (e.g. SDXL's ``added_cond_kwargs``) is split the same
            way, entry by entry. Everything else (non-tensors, tensors of another first
            dimension such as Flux's ``txt_ids``, values wrapped in `Shared`) is passed
            unchanged to every forward.
        null_conditions (`dict`, *optional*): the unconditional (CFG) branch's arguments: for
            keys of `conditions` split by row, a tensor of 1 row (used for every latent) or of
            ``N`` rows (taken with the latents), shaped like the conditions' rows; nested dicts
            alike. A key it omits is the same in both branches (SDXL's ``time_ids``); entries
            passed unchanged cannot differ between the branches. None with ``cfg=True``: the
            model family's default (`mosaicdiff.prune` asks the adapter: the null class for a
            DiT, zero embeddings for a U-Net) or an error where it has none.
        cfg (`bool`, *optional*, defaults to True): whether the model is sampled with
            classifier-free guidance. False (guidance-distilled models such as Flux): no null
            conditions, and the calibration inputs are never duplicated, whatever
            ``prune(cfg=...)`` says.

    Raises:
        ValueError: latents not a non-empty (N, C, H, W) tensor or with NaN/inf (NaN/inf in a
            floating tensor of the conditions or null conditions: `check`, which `mosaicdiff.prune`
            calls before any calibration pass), null conditions of the wrong shape, for a key
            conditions lack or share, or given with ``cfg=False``.
        TypeError: non-float latents, conditions or null conditions that are not dicts (or not
            str-keyed), a null tensor of another kind (float / integer) than its condition.

    Examples:
        >>> import torch
        >>> latents = torch.randn(4, 4, 8, 8)
        >>> calib = ConditionedCalibration(latents, {"class_labels": torch.tensor([0, 1, 2, 3])},
        ...                                {"class_labels": torch.tensor([10])})
        >>> calib.null_conditions
        {'class_labels': tensor([10])}
    """

    #: How messages name the class and its latents.
    _latents_name = "latents"

    def __init__(self, latents: torch.Tensor, conditions: Mapping[str, Any],
                 null_conditions: Mapping[str, Any] | None = None, cfg: bool = True):
        name = type(self).__name__
        self.latents = latents
        self._check_latents()
        n = len(self)
        if not isinstance(cfg, (bool, np.bool_)):
            raise TypeError(f"{name}.cfg must be True or False, got {cfg!r}")
        self.cfg = bool(cfg)
        self._conditions = _split(conditions, n, f"{name}.conditions")
        if null_conditions is not None and not self.cfg:
            raise ValueError(f"{name}: null_conditions given with cfg=False (a model sampled without "
                             f"classifier-free guidance has no unconditional branch); drop one of them")
        self._nulls = None if null_conditions is None else _split_nulls(
            null_conditions, self._conditions, n, f"{name}.null_conditions", f"{name}.conditions")
        self._check_finite(conditions=False)  # the conditions: by `check`, before any calibration pass

    # ------------------------------------------------------------------ checks

    def _check_latents(self) -> None:
        name, field, x = type(self).__name__, self._latents_name, self.latents
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}.{field} must be a non-empty (N, C, H, W) tensor, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"{name}.{field} must be floating point, got {x.dtype}")

    def _check_finite(self, conditions: bool = True) -> None:
        # a NaN here would surface much later as bad stage boundaries, a NaN in the saved config or
        # "hessian has non-finite entries" after the calibration pass
        name = type(self).__name__
        entries = [("calibration latents", self.latents)]
        if conditions:
            entries += [*_float_entries(self._conditions, f"{name}.conditions"),
                        *_float_entries(self._nulls or {}, f"{name}.null_conditions")]
        for where, x in entries:
            if x.device.type == "meta":  # no values to check
                continue
            finite = torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(1) if x.dim() else torch.isfinite(x)
            if not bool(finite.all()):
                idx = (~finite).nonzero().reshape(-1).tolist()
                verb = "contain" if where == "calibration latents" else "contains"
                raise ValueError(f"{where} {verb} NaN/inf at index {idx[:8]} ({len(idx)} of {finite.numel()} "
                                 f"samples); drop or fix those samples")

    def check(self) -> None:
        """Checks the data again (`mosaicdiff.prune` calls it: the latents may have been replaced).

        Raises:
            ValueError / TypeError: as the constructor, on conditions whose rows no longer match
                the latents, and on NaN/inf in any floating tensor of the conditions or null
                conditions (the entry and the rows named).
        """
        self._check_latents()
        n, name = len(self), type(self).__name__
        for where, tensor in _row_entries(self._conditions, f"{name}.conditions"):
            if tensor.shape[0] != n:
                raise ValueError(f"{where} has {tensor.shape[0]} rows but there are {n} latents")
        self._check_finite()

    # ------------------------------------------------------------------ what the calibration loop reads

    @property
    def conditions(self) -> dict[str, Any]:
        """The forward's keyword arguments as given (nested dicts included)."""
        return _unwrap(self._conditions)

    @property
    def null_conditions(self) -> dict[str, Any] | None:
        """The CFG branch's arguments as validated (None: not given)."""
        return None if self._nulls is None else _unwrap(self._nulls)

    @property
    def x0(self) -> torch.Tensor:
        """The clean latents (the name the method uses)."""
        return self.latents

    @x0.setter
    def x0(self, value: torch.Tensor) -> None:
        self.latents = value

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def device(self) -> torch.device:
        return self.latents.device

    @property
    def x0_sq_norm(self) -> float:
        """``r = ||x_0||^2 / d`` averaged over the samples (the closed form's data term)."""
        return float(self.latents.detach().to(torch.float64).pow(2).mean())

    def condition_rows(self, index: torch.Tensor) -> dict[str, Any]:
        """The conditions of the latents `index`: their rows of every entry split by row, the
        other entries as `Shared`."""
        return _rows_of(self._conditions, index)

    def null_condition_rows(self, index: torch.Tensor) -> dict[str, Any]:
        """The CFG branch's conditions of the latents `index` (null rows, broadcast or taken with the
        latents; the conditions' rows where null conditions omit a key).

        Raises:
            ValueError: no null conditions (``cfg=False``, or none given and not yet filled in).
        """
        if self._nulls is None:
            raise ValueError(f"{type(self).__name__} has no null_conditions for the CFG branch "
                             f"(cfg={self.cfg}); pass null_conditions, or calibrate with cfg=False")
        return _null_rows_of(self._nulls, self._conditions, index)

    def with_null_conditions(self, null_conditions: Mapping[str, Any]) -> ConditionedCalibration:
        """A `ConditionedCalibration` of the same data with these null conditions (validated)."""
        return ConditionedCalibration(self.latents, self._conditions, null_conditions, cfg=True)

    def digest(self) -> str:
        """A SHA-256 of the data (latents, conditions, null conditions, cfg): the same calibration
        on any device (`mosaicdiff prune` compares it across ranks before calibrating)."""
        def named(prefix: str, value: Any):
            if isinstance(value, Mapping):
                for k in sorted(value):
                    yield from named(f"{prefix}.{k}", value[k])
            else:
                yield prefix, value.value if isinstance(value, Shared) else value

        return tensors_digest([*named("latents", self.latents), *named("conditions", self._conditions),
                               *named("null_conditions", self._nulls or {}), ("cfg", self.cfg)])

    def __repr__(self) -> str:
        parts = [f"latents={tuple(self.latents.shape)} {self.latents.dtype} on {self.latents.device}",
                 f"conditions={_describe(self._conditions)}"]
        if self._nulls is not None:
            parts.append(f"null_conditions={_describe(self._nulls)}")
        parts.append(f"cfg={self.cfg}")
        return f"{type(self).__name__}({', '.join(parts)})"
