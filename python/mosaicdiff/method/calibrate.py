"""Stage calibration: noised inputs per stage and the input Hessians of every block's consumers.

For a stage ``[t_start, t_end)`` the calibration set is clean data ``x_0`` (VAE latents for
DiT-XL/2, pixels for the embedded model) noised to ``t ~ U[t_start, t_end)`` with the model's
training schedule. With classifier-free guidance each batch is duplicated with the null
conditions, so both branches enter the statistics. The Hessians ``H = X^T X / n_tokens`` of the
inputs of every prunable group's consumer (for a DiT: each block's ``proj`` and ``fc2``) are
accumulated in float64 by forward pre-hooks during one pass of the dense model.

Under ``torchrun`` (an initialised torch.distributed process group) every rank draws the same
inputs, runs its contiguous share of the model batches (`mosaicdiff.core.distributed.batch_shard`)
and the float64 sums ``X^T X`` and token counts are all-reduced before the division, so each
rank ends with the Hessians of all the inputs: those of one process up to the order of the
float64 additions (the forward passes are the very same batches). Every rank then prunes
(`mosaicdiff.api.prune`): the Hessians are the same bits on all ranks and OBS is
deterministic, so they compute the same model with no broadcast, and `prune` returns it on
every rank as in one process; `mosaicdiff prune` saves it from rank 0 only. Pruning on rank 0
alone would not be faster (the other ranks would wait) and would need the model broadcast.

One calibration type serves every family: `ConditionedCalibration(latents, conditions,
null_conditions, cfg)`, where ``conditions`` are the dense model's forward keyword arguments.
`Calibration` (class labels, DiT) and `TextCalibration` (prompt embeddings, U-Net) build it.
The loop knows a model only through its adapter (`mosaicdiff.core.adapter.ModelAdapter`:
blocks, groups, how to run it) and a calibration only through `ConditionedCalibration`; a
batch's condition is a dict of batch-first tensors, nested dicts of them and `Shared` entries
(passed unchanged to every forward), which `take_rows` / `cat_rows` slice and concatenate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mosaicdiff.core import distributed
from mosaicdiff.core.adapter import ModelAdapter, hessian_keys, unwrap_model
from mosaicdiff.core.schedulers import noise_process, scheduler_alphas_cumprod
from mosaicdiff.method import schedule
from mosaicdiff.method.conditioned_calibration import ConditionedCalibration, Shared, _describe, _unwrap
from mosaicdiff.method.text_calibration import TextCalibration  # the text-conditioned constructor (U-Nets)

logger = logging.getLogger(__name__)

__all__ = ["Calibration", "ConditionedCalibration", "Shared", "TextCalibration", "cat_rows", "check_class_ids",
           "check_latent_shape", "collect_hessians", "prepare_calibration", "resolve_alphas_cumprod", "stage_inputs",
           "take_rows"]

_CHUNK_ELEMENTS = 1 << 24  # float64 temporaries of at most 128 MiB while accumulating X^T X


class Calibration(ConditionedCalibration):
    """Clean calibration data of a class-conditional model (DiT).

    A `ConditionedCalibration` with ``conditions={"class_labels": labels}`` and
    ``null_conditions={"class_labels": tensor([null_class])}``.

    Parameters:
        x0 (`torch.Tensor` of shape `(N, C, H, W)`): clean latents (or pixels) as the model
            sees them at t = 0 (for DiT-XL/2: VAE latents times the VAE scaling factor).
        labels (`torch.Tensor` of shape `(N,)`): class labels (converted to int64).
        null_class (`int`, *optional*, defaults to 1000): the unconditional class id used for
            classifier-free guidance (DiT: 1000 = ``num_embeds_ada_norm``).

    Raises:
        ValueError: on a wrong shape, an empty set, one label per sample missing, labels outside
            ``[0, null_class]`` or NaN/inf in `x0`. `check_model` (called by `mosaicdiff.prune`)
            also checks the sample shape and the null class against the model.
        TypeError: on non-float `x0` or non-integer labels.
    """

    _latents_name = "x0"

    def __init__(self, x0: torch.Tensor, labels, null_class: int = 1000):
        if not isinstance(x0, torch.Tensor) or x0.dim() != 4:
            shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise ValueError(f"Calibration.x0 must be a (N, C, H, W) tensor, got {shape}")
        if not x0.is_floating_point():
            raise TypeError(f"Calibration.x0 must be floating point, got {x0.dtype}")
        if x0.shape[0] == 0:
            raise ValueError("Calibration is empty: x0 has 0 samples")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != x0.shape[0]:
            raise ValueError(f"Calibration.labels must be ({x0.shape[0]},): one class id per sample of x0 "
                             f"({x0.shape[0]} samples), got shape {tuple(labels.shape)}")
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise TypeError("Calibration.labels must be integer class ids")
        labels = labels.to(device=x0.device, dtype=torch.long)
        if isinstance(null_class, bool) or int(null_class) != null_class or null_class < 0:
            raise ValueError(f"Calibration.null_class must be a non-negative integer, got {null_class!r}")
        self.null_class = int(null_class)
        check_class_ids(labels, self.null_class, "Calibration.labels",
                         "; set null_class to the model's config.num_embeds_ada_norm", "null_class")
        super().__init__(x0, {"class_labels": labels},
                         {"class_labels": torch.full((1,), self.null_class, dtype=torch.long, device=x0.device)})

    @property
    def labels(self) -> torch.Tensor:
        """The class labels (int64), ``conditions["class_labels"]``."""
        return self._conditions["class_labels"]

    def check(self) -> None:
        super().check()
        check_class_ids(self.labels, self.null_class, "Calibration.labels",
                         "; set null_class to the model's config.num_embeds_ada_norm", "null_class")

    def check_model(self, model: nn.Module) -> None:
        """Checks that this data fits `model` (a diffusers DiT): sample shape and null class.

        Raises:
            ValueError: naming what the model expects and what the data has.
        """
        check_latent_shape(self.x0, model)
        num_classes = _config_get(model, "num_embeds_ada_norm")
        if num_classes is not None and int(num_classes) != self.null_class:
            raise ValueError(
                f"Calibration.null_class={self.null_class} but the model's null class "
                f"(config.num_embeds_ada_norm) is {int(num_classes)}; pass Calibration(x0, labels, "
                f"null_class={int(num_classes)}) with labels in [0, {int(num_classes)})")
        self.check()  # the fields may have been replaced since construction

    def __repr__(self) -> str:
        return (f"Calibration(x0={tuple(self.x0.shape)} {self.x0.dtype} on {self.x0.device}, "
                f"labels={tuple(self.labels.shape)}, null_class={self.null_class})")


def check_class_ids(labels: torch.Tensor, num_classes: int, where: str, hint: str = "",
                     source: str = "config.num_embeds_ada_norm") -> None:
    """Class ids in ``[0, num_classes]`` (the last one the null class); one host read."""
    if labels.device.type == "meta":
        return
    bad = ((labels < 0) | (labels > num_classes)).nonzero().reshape(-1)
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{where} must be class ids in [0, {num_classes}) or the null class {num_classes} "
                         f"({source}), got {int(labels.reshape(-1)[i])} at index {i}{hint}")


def _config_get(model: nn.Module, key: str, default=None):
    config = getattr(unwrap_model(model), "config", None) or {}
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def check_latent_shape(latents: torch.Tensor, model: nn.Module) -> None:
    """The latents' (C, H, W) against the model's ``config.in_channels`` and ``sample_size`` (where
    it has both: diffusers transformers such as DiT).

    Raises:
        ValueError: naming what the model expects and what the data has.
    """
    channels, size = _config_get(model, "in_channels"), _config_get(model, "sample_size")
    if channels is None or size is None:
        return
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    want, got = (int(channels), int(h), int(w)), tuple(latents.shape[1:])
    if got != want:
        raise ValueError(
            f"calibration samples are (C, H, W) = {got} but the model expects {want} "
            f"(config in_channels={channels}, sample_size={size}); pass x0 of shape (N, {want[0]}, "
            f"{want[1]}, {want[2]}) (for DiT-XL/2: VAE latents, not pixels)")


def prepare_calibration(model: nn.Module, adapter: ModelAdapter, calibration: Any, *,
                        cfg: bool = True) -> ConditionedCalibration:
    """Checks `calibration` against `model` before any long work; fills in the null conditions.

    `mosaicdiff.prune` and the schedule search call it. Where the CFG branch is calibrated
    (`cfg` and ``calibration.cfg``) and the calibration has no null conditions, the adapter's
    ``default_null_conditions(model, calibration)`` supplies them (the null class for a DiT, zero
    embeddings for a U-Net); an adapter without one leaves it an error.

    Returns:
        The calibration to draw from (`calibration` itself, or a copy with the default null
        conditions).

    Raises:
        TypeError: not a `ConditionedCalibration`, or one the adapter refuses as the wrong kind.
        ValueError: data on another device than the model, that does not fit it, or no null
            conditions for the CFG branch.
    """
    if not isinstance(calibration, ConditionedCalibration):
        raise TypeError(f"calibration must be a mosaicdiff.calibrate.ConditionedCalibration (Calibration for a "
                        f"class-conditional DiT, TextCalibration for a text-conditioned U-Net), got "
                        f"{type(calibration).__name__}")
    calibration.check()
    param = next(model.parameters())
    if calibration.device != param.device:
        raise ValueError(f"calibration data is on {calibration.device} but the model is on {param.device}; "
                         f"move one of them (Calibration(x0.to(device), labels.to(device), ...))")
    adapter.check_calibration(model, calibration)  # shape, keys, null class, labels: before long work
    if cfg and calibration.cfg and calibration.null_conditions is None:
        nulls = adapter.default_null_conditions(model, calibration)
        if nulls is None:
            raise ValueError(f"{type(calibration).__name__} has no null_conditions for the classifier-free-guidance "
                             f"branch and the {adapter.name or type(adapter).__name__} adapter has no default; pass "
                             f"null_conditions (the unconditional forward's arguments), or cfg=False for a model "
                             f"sampled without guidance")
        calibration = calibration.with_null_conditions(nulls)
    return calibration


def resolve_alphas_cumprod(alphas_cumprod=None) -> torch.Tensor:
    """``alphas_cumprod`` as float64 CPU tensor from None (DiT's linear schedule), an array, a scheduler
    or a `mosaicdiff.core.schedulers.NoiseProcess` (rectified flow: the variance-preserving
    equivalent, `mosaicdiff.core.schedulers.flow_alphas_cumprod`)."""
    if alphas_cumprod is None:
        return torch.from_numpy(schedule.linear_alphas_cumprod())
    if isinstance(alphas_cumprod, np.ndarray):
        return torch.from_numpy(alphas_cumprod.astype(np.float64))
    if isinstance(alphas_cumprod, (torch.Tensor, list, tuple)):
        return torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    return scheduler_alphas_cumprod(alphas_cumprod)


def stage_inputs(calibration: ConditionedCalibration, t_start: int, t_end: int, n_samples: int, cfg: bool = True,
                 generator: torch.Generator | None = None,
                 alphas_cumprod=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Calibration inputs of one stage: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (DDPM) or
    ``x_t = (1 - s) x_0 + s eps`` with ``s = t / T`` (rectified flow).

    Samples are drawn from `calibration` in random order, cycling through it when `n_samples`
    exceeds its size; ``t`` is uniform on ``[t_start, t_end)``: integers for DDPM, floats in
    ``[t_start, min(t_end, T)]`` for flow (the model's training timestep ``1000 s``; an adapter
    whose model wants ``s`` divides).

    Args:
        calibration (`ConditionedCalibration`): the clean data and its conditions.
        t_start (`int`): first timestep of the stage (inclusive).
        t_end (`int`): end of the stage (exclusive), ``<= T`` (``<= T + 1`` for flow).
        n_samples (`int`): noised samples to draw (before CFG duplication).
        cfg (`bool`, *optional*, defaults to True): append a copy of the batch with the
            calibration's null conditions (so the result has ``2 * n_samples`` rows); ignored
            for a calibration with ``cfg=False``.
        generator (`torch.Generator`, *optional*): CPU generator for indices, t and noise.
        alphas_cumprod (*optional*): ``abar`` (array/tensor of length T), a diffusers scheduler or a
            `mosaicdiff.core.schedulers.NoiseProcess` (a ``FlowMatchEulerDiscreteScheduler`` or
            ``noise_process(scheduler, mu=...)`` for rectified flow); default: DiT's linear
            schedule (1e-4 .. 0.02, T = 1000).

    Returns:
        `(x_t, t, condition)`: ``x_t`` like ``x0`` (its dtype and device), ``t`` on that device
        (int64; float32 for flow), ``condition`` the rows' conditions (a dict like ``calibration.conditions``, each
        entry split by row holding the drawn rows and then their null rows; the others as
        `Shared`). For a `Calibration`: ``{"class_labels": int64 labels}``.

    Raises:
        ValueError: on an empty or out-of-range t interval, a non-positive `n_samples`, or
            `cfg` with a calibration that has no null conditions.
    """
    process = noise_process(alphas_cumprod)
    T = process.timestep_end
    if not (0 <= t_start < t_end <= T):
        raise ValueError(f"need 0 <= t_start < t_end <= T={T}, got t_start={t_start}, t_end={t_end}")
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    cfg = bool(cfg) and calibration.cfg
    if cfg and calibration.null_conditions is None:
        raise ValueError(f"stage_inputs: cfg=True but this {type(calibration).__name__} has no null_conditions; "
                         f"pass them (mosaicdiff.prune fills in the model family's default), or cfg=False")
    n_samples = int(n_samples)
    N = len(calibration)
    reps = -(-n_samples // N)
    idx = torch.cat([torch.randperm(N, generator=generator) for _ in range(reps)])[:n_samples]
    t = process.draw_timesteps(t_start, t_end, n_samples, generator)
    x0 = calibration.x0.detach()
    noise = torch.randn((n_samples, *x0.shape[1:]), generator=generator, dtype=torch.float32)
    dev = x0.device
    x_t = process.add_noise(x0[idx.to(dev)], noise, t).to(x0.dtype)
    t = t.to(dev)
    condition = calibration.condition_rows(idx)
    if cfg:
        x_t = torch.cat([x_t, x_t])
        t = torch.cat([t, t])
        condition = cat_rows(condition, calibration.null_condition_rows(idx))
    return x_t, t, condition


class _HessianHook:
    """Forward pre-hook accumulating ``X^T X`` (float64) of a linear layer's input."""

    def __init__(self, n: int, device: torch.device):
        self.n = n
        self.H = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.tokens = 0

    def __call__(self, module: nn.Module, args):
        x = args[0].detach().reshape(-1, self.n)
        rows = max(1, _CHUNK_ELEMENTS // self.n)
        for chunk in x.split(rows):
            c = chunk.to(torch.float64)
            self.H.addmm_(c.T, c)
        self.tokens += x.shape[0]


def take_rows(condition: Any, index) -> Any:
    """Rows `index` (a slice or an index tensor) of a batch-first tensor, or of each tensor of a dict/tuple;
    `Shared` entries (and other non-tensors) unchanged."""
    if isinstance(condition, torch.Tensor):
        return condition[index.to(condition.device) if isinstance(index, torch.Tensor) else index]
    if isinstance(condition, Mapping):
        return {k: take_rows(v, index) for k, v in condition.items()}
    if isinstance(condition, (tuple, list)):
        return type(condition)(take_rows(v, index) for v in condition)
    return condition


def cat_rows(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch (tensors, or dicts/tuples of tensors); `Shared`
    entries (the same in both) once."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b.to(a.device)])
    if isinstance(a, Mapping):
        return {k: cat_rows(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(cat_rows(x, y) for x, y in zip(a, b))
    return a


def _to(condition: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Tensors moved to `device`, floating ones cast to `dtype` (the model's), `Shared` ones included."""
    if isinstance(condition, torch.Tensor):
        if dtype is not None and condition.is_floating_point():
            return condition.to(device, dtype)
        return condition.to(device)
    if isinstance(condition, Shared):
        return Shared(_to(condition.value, device, dtype))
    if isinstance(condition, Mapping):
        return {k: _to(v, device, dtype) for k, v in condition.items()}
    if isinstance(condition, (tuple, list)):
        return type(condition)(_to(v, device, dtype) for v in condition)
    return condition


def _rows(condition: Any) -> set[int]:
    """The first dimensions of the tensors split by row (not `Shared`); -1 for a 0-d tensor."""
    if isinstance(condition, torch.Tensor):
        return {int(condition.shape[0]) if condition.dim() else -1}
    if isinstance(condition, Mapping):
        values = list(condition.values())
    elif isinstance(condition, (tuple, list)):
        values = list(condition)
    else:
        return set()
    return set().union(*(_rows(v) for v in values))


@torch.no_grad()
def collect_hessians(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Any,
                     batch_size: int = 64, progress: bool = True, *,
                     adapter: ModelAdapter) -> list[dict[str, torch.Tensor]]:
    """Runs the dense model on the calibration inputs and returns each block's input Hessians.

    Args:
        model (`nn.Module`): a model its adapter accepts (for a DiT, see
            `mosaicdiff.families.dit.adapter.validate_dit`).
        x_t (`torch.Tensor`): (B, C, H, W) noised inputs (as from `stage_inputs`).
        t (`torch.Tensor`): (B,) timesteps.
        condition: the rows' conditions, as from `stage_inputs`: a dict of (B, ...) tensors (nested
            dicts of them) and `Shared` entries, passed to ``adapter.run`` per batch as plain
            keyword arguments (tensors on the model's device, floating ones in its dtype; `Shared`
            entries unwrapped, whole). A (B, ...) tensor or a tuple of them is passed as it is.
        batch_size (`int`, *optional*, defaults to 64): model batch size.
        progress (`bool`, *optional*, defaults to True): show a tqdm progress bar.
        adapter (`ModelAdapter`): the model's adapter (`mosaicdiff.families.adapter_for(model)`).

    Returns:
        `list[dict]`, one per block: group name -> float64 (in, in) matrix ``X^T X / n_tokens`` of
        the group's consumer input (for a DiT ``{"proj": H, "fc2": H}``), on the model's device.

    Under a torch.distributed process group this is a collective: every rank passes the same
    inputs (checked), runs its share of the batches, and gets the Hessians of all of them (the
    float64 sums all-reduced, then normalised); the progress bar shows on rank 0 only. Without
    a process group one process runs every batch, as before.

    Raises:
        ValueError: on mismatched batch sizes, an empty batch, a bad `batch_size`, a model the
            adapter does not accept, or (under a process group) ranks with different inputs.
    """
    adapter.validate(model)
    B = x_t.shape[0]
    rows = _rows(condition)
    if B == 0 or t.shape != (B,) or rows - {B}:
        shape = tuple(condition.shape) if isinstance(condition, torch.Tensor) else _describe(condition)
        raise ValueError(f"expected x_t (B>0, ...), t (B,), condition (B, ...); got {tuple(x_t.shape)}, "
                         f"{tuple(t.shape)}, {shape}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    param = next(model.parameters())
    hooks, handles = [], []
    for block in adapter.blocks(model):
        entry, by_consumer = {}, {}
        for name, group in adapter.groups(block).items():
            for consumer, key in zip(group.consumers, hessian_keys(name, group)):
                hook = by_consumer.get(id(consumer))
                if hook is None:  # a consumer read by two groups (Flux's proj_out) is hooked once
                    hook = by_consumer[id(consumer)] = _HessianHook(consumer.in_features, param.device)
                    handles.append(consumer.register_forward_pre_hook(hook))
                entry[key] = hook
        hooks.append(entry)
    # every rank must sum over the same rows: a different seed or data on one rank is an error
    distributed.check_same_tensor(_fingerprint(x_t, t, condition, param.device),
                                  "the calibration inputs (x_t, t, condition)")
    was_training = model.training
    model.eval()
    try:
        starts = distributed.batch_shard(B, int(batch_size))  # all batches in one process
        show = progress and distributed.is_main_process()
        for s in tqdm(starts, desc="calibrating", disable=not show, leave=False):
            sl = slice(s, s + int(batch_size))
            adapter.run(model, x_t[sl].to(param.device, param.dtype), t[sl].to(param.device),
                        _unwrap(_to(take_rows(condition, sl), param.device, param.dtype)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if distributed.is_distributed():
        _all_reduce_hooks(hooks, param.device)
    for hook in _distinct(hooks):
        hook.H.div_(max(hook.tokens, 1))
    out = [{key: hook.H for key, hook in entry.items()} for entry in hooks]
    logger.debug("collected Hessians of %d blocks from %d samples", len(out), B)
    return out


def _distinct(hooks: list[dict[str, _HessianHook]]) -> list[_HessianHook]:
    """Every hook once (a shared consumer's hook appears under several keys)."""
    return list({id(hook): hook for entry in hooks for hook in entry.values()}.values())


def _all_reduce_hooks(hooks: list[dict[str, _HessianHook]], device: torch.device) -> None:
    """Sum the hooks' ``X^T X`` and token counts over the ranks (before the division by the tokens)."""
    distinct = _distinct(hooks)
    sums = {str(i): hook.H for i, hook in enumerate(distinct)}
    tokens = torch.tensor([float(hook.tokens) for hook in distinct],
                          dtype=torch.float64, device=device)  # exact: counts far below 2**53
    distributed.all_reduce_sums({**sums, "tokens": tokens})
    for hook, count in zip(distinct, tokens.tolist()):
        hook.tokens = int(count)


def _fingerprint(x_t: torch.Tensor, t: torch.Tensor, condition: Any, device: torch.device) -> torch.Tensor:
    """A few float64 sums that differ when the ranks' calibration inputs differ."""
    if not distributed.is_distributed():
        return torch.zeros(0)
    parts = [x_t.detach().to(torch.float64), t.detach().to(torch.float64)]
    parts += [c.detach().to(torch.float64) for c in _tensors(condition)]
    values = [float(x_t.shape[0])] + [v for p in parts for v in (float(p.sum()), float(p.abs().sum()))]
    return torch.tensor(values, dtype=torch.float64, device=device)


def _tensors(condition: Any) -> list[torch.Tensor]:
    """Every tensor of a condition (`Shared` ones included); plain numbers as 0-d tensors."""
    if isinstance(condition, torch.Tensor):
        return [condition]
    if isinstance(condition, Shared):
        return _tensors(condition.value)
    if isinstance(condition, (bool, int, float)):
        return [torch.tensor(float(condition))]
    if isinstance(condition, Mapping):
        values = list(condition.values())
    elif isinstance(condition, (tuple, list)):
        values = list(condition)
    else:
        return []
    return [t for v in values for t in _tensors(v)]
