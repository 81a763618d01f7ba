"""Stage calibration: noised inputs per stage and the input Hessians of every block's consumers.

For a stage ``[t_start, t_end)`` the calibration set is clean data ``x_0`` (VAE latents for
DiT-XL/2, pixels for the embedded model) noised to ``t ~ U[t_start, t_end)`` with the model's
training schedule. With classifier-free guidance each batch is duplicated with the null
condition, so both branches enter the statistics. The Hessians ``H = X^T X / n_tokens`` of the
inputs of every prunable group's consumer (for a DiT: each block's ``proj`` and ``fc2``) are
accumulated in float64 by forward pre-hooks during one pass of the dense model.

Under ``torchrun`` (an initialised torch.distributed process group) every rank draws the same
inputs, runs its contiguous share of the model batches (`mosaicdiff.distributed.batch_shard`)
and the float64 sums ``X^T X`` and token counts are all-reduced before the division, so each
rank ends with the Hessians of all the inputs: those of one process up to the order of the
float64 additions (the forward passes are the very same batches). Every rank then prunes
(`mosaicdiff.pruning.prune`): the Hessians are the same bits on all ranks and OBS is
deterministic, so they compute the same model with no broadcast, and `prune` returns it on
every rank as in one process; `mosaicdiff prune` saves it from rank 0 only. Pruning on rank 0
alone would not be faster (the other ranks would wait) and would need the model broadcast.

The loop knows a model only through its adapter (`mosaicdiff.integrations.base.ModelAdapter`:
blocks, groups, how to run it) and a calibration set only through `x0`, `condition_rows` and
`null_condition`; a condition is a batch-first tensor or a dict/tuple of them (text embeddings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mosaicdiff import distributed, schedule
from mosaicdiff.integrations.base import ModelAdapter, unwrap_model
from mosaicdiff.integrations.schedulers import scheduler_alphas_cumprod
from mosaicdiff.text_calibration import TextCalibration  # the text-conditioned counterpart (U-Nets)

logger = logging.getLogger(__name__)

__all__ = ["Calibration", "TextCalibration", "cat_rows", "collect_hessians", "resolve_alphas_cumprod", "stage_inputs",
           "take_rows"]

_CHUNK_ELEMENTS = 1 << 24  # float64 temporaries of at most 128 MiB while accumulating X^T X


@dataclass
class Calibration:
    """Clean calibration data.

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

    x0: torch.Tensor
    labels: torch.Tensor
    null_class: int = 1000

    def __post_init__(self):
        if not isinstance(self.x0, torch.Tensor) or self.x0.dim() != 4:
            shape = tuple(self.x0.shape) if isinstance(self.x0, torch.Tensor) else type(self.x0).__name__
            raise ValueError(f"Calibration.x0 must be a (N, C, H, W) tensor, got {shape}")
        if not self.x0.is_floating_point():
            raise TypeError(f"Calibration.x0 must be floating point, got {self.x0.dtype}")
        if self.x0.shape[0] == 0:
            raise ValueError("Calibration is empty: x0 has 0 samples")
        labels = torch.as_tensor(self.labels)
        if labels.dim() != 1 or labels.shape[0] != self.x0.shape[0]:
            raise ValueError(f"Calibration.labels must be ({self.x0.shape[0]},): one class id per sample of x0 "
                             f"({self.x0.shape[0]} samples), got shape {tuple(labels.shape)}")
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise TypeError("Calibration.labels must be integer class ids")
        self.labels = labels.to(device=self.x0.device, dtype=torch.long)
        if isinstance(self.null_class, bool) or int(self.null_class) != self.null_class or self.null_class < 0:
            raise ValueError(f"Calibration.null_class must be a non-negative integer, got {self.null_class!r}")
        self.null_class = int(self.null_class)
        self._check_values()

    def _check_values(self) -> None:
        """Labels in range and finite data: checked where the data enters (one host read each)."""
        if self.x0.device.type == "meta":  # no values to check
            return
        bad = ((self.labels < 0) | (self.labels > self.null_class)).nonzero().reshape(-1)
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"Calibration.labels must be class ids in [0, {self.null_class}) or the null class "
                f"{self.null_class} (null_class), got {int(self.labels[i])} at index {i}; set null_class "
                f"to the model's config.num_embeds_ada_norm")
        # a NaN here would surface much later as bad stage boundaries or a NaN in the saved config
        finite = torch.isfinite(self.x0.detach()).flatten(1).all(1)
        if not bool(finite.all()):
            idx = (~finite).nonzero().reshape(-1).tolist()
            raise ValueError(f"calibration latents contain NaN/inf at index {idx[:8]} "
                             f"({len(idx)} of {len(self)} samples); drop or fix those samples")

    def check_model(self, model: nn.Module) -> None:
        """Checks that this data fits `model` (a diffusers DiT): sample shape and null class.

        Raises:
            ValueError: naming what the model expects and what the data has.
        """
        config = getattr(unwrap_model(model), "config", None) or {}
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        channels, size = get("in_channels"), get("sample_size")
        if channels is not None and size is not None:
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            want, got = (int(channels), int(h), int(w)), tuple(self.x0.shape[1:])
            if got != want:
                raise ValueError(
                    f"calibration samples are (C, H, W) = {got} but the model expects {want} "
                    f"(config in_channels={channels}, sample_size={size}); pass x0 of shape (N, {want[0]}, "
                    f"{want[1]}, {want[2]}) (for DiT-XL/2: VAE latents, not pixels)")
        num_classes = get("num_embeds_ada_norm")
        if num_classes is not None and int(num_classes) != self.null_class:
            raise ValueError(
                f"Calibration.null_class={self.null_class} but the model's null class "
                f"(config.num_embeds_ada_norm) is {int(num_classes)}; pass Calibration(x0, labels, "
                f"null_class={int(num_classes)}) with labels in [0, {int(num_classes)})")
        self._check_values()  # the fields may have been replaced since construction

    def condition_rows(self, index: torch.Tensor) -> torch.Tensor:
        """The conditioning of the samples `index` (their class labels)."""
        return self.labels[index]

    def null_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """The unconditional (CFG) counterpart of `condition`: the null class."""
        return torch.full_like(condition, self.null_class)

    def __repr__(self) -> str:
        return (f"Calibration(x0={tuple(self.x0.shape)} {self.x0.dtype} on {self.x0.device}, "
                f"labels={tuple(self.labels.shape)}, null_class={self.null_class})")

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x0.device

    @property
    def x0_sq_norm(self) -> float:
        """``r = ||x_0||^2 / d`` averaged over the samples (the closed form's data term)."""
        return float(self.x0.detach().to(torch.float64).pow(2).mean())


def resolve_alphas_cumprod(alphas_cumprod=None) -> torch.Tensor:
    """``alphas_cumprod`` as float64 CPU tensor from None (DiT's linear schedule), an array or a scheduler."""
    if alphas_cumprod is None:
        return torch.from_numpy(schedule.linear_alphas_cumprod())
    if hasattr(alphas_cumprod, "alphas_cumprod"):
        return scheduler_alphas_cumprod(alphas_cumprod)
    if isinstance(alphas_cumprod, np.ndarray):
        return torch.from_numpy(alphas_cumprod.astype(np.float64))
    return torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)


def stage_inputs(calibration: Calibration, t_start: int, t_end: int, n_samples: int, cfg: bool = True,
                 generator: torch.Generator | None = None,
                 alphas_cumprod=None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Calibration inputs of one stage: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

    Samples are drawn from `calibration` in random order, cycling through it when `n_samples`
    exceeds its size; ``t`` is uniform on ``[t_start, t_end)``.

    Args:
        calibration (`Calibration`): the clean data.
        t_start (`int`): first timestep of the stage (inclusive).
        t_end (`int`): end of the stage (exclusive), ``<= len(alphas_cumprod)``.
        n_samples (`int`): noised samples to draw (before CFG duplication).
        cfg (`bool`, *optional*, defaults to True): append a copy of the batch with the condition
            replaced by ``calibration.null_condition`` (so the result has ``2 * n_samples`` rows).
        generator (`torch.Generator`, *optional*): CPU generator for indices, t and noise.
        alphas_cumprod (*optional*): ``abar`` (array/tensor of length T) or a diffusers scheduler;
            default: DiT's linear schedule (1e-4 .. 0.02, T = 1000).

    Returns:
        `(x_t, t, condition)` on the calibration's device: ``x_t`` like ``x0`` (its dtype), ``t``
        int64, ``condition`` the samples' conditioning (class labels: int64).

    Raises:
        ValueError: on an empty or out-of-range t interval or a non-positive `n_samples`.
    """
    abar = resolve_alphas_cumprod(alphas_cumprod)
    T = abar.numel()
    if not (0 <= t_start < t_end <= T):
        raise ValueError(f"need 0 <= t_start < t_end <= T={T}, got t_start={t_start}, t_end={t_end}")
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    n_samples = int(n_samples)
    N = len(calibration)
    reps = -(-n_samples // N)
    idx = torch.cat([torch.randperm(N, generator=generator) for _ in range(reps)])[:n_samples]
    t = torch.randint(int(t_start), int(t_end), (n_samples,), generator=generator)
    x0 = calibration.x0.detach()
    noise = torch.randn((n_samples, *x0.shape[1:]), generator=generator, dtype=torch.float32)
    a = abar[t].to(torch.float32).view(-1, 1, 1, 1)
    dev = x0.device
    x_t = a.sqrt().to(dev) * x0[idx.to(dev)].float() + (1 - a).sqrt().to(dev) * noise.to(dev)
    x_t = x_t.to(x0.dtype)
    t = t.to(dev)
    condition = calibration.condition_rows(idx.to(dev))
    if cfg:
        x_t = torch.cat([x_t, x_t])
        t = torch.cat([t, t])
        condition = cat_rows(condition, calibration.null_condition(condition))
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
    """Rows `index` (a slice or an index tensor) of a batch-first tensor, or of each tensor of a dict/tuple."""
    if isinstance(condition, torch.Tensor):
        return condition[index]
    if isinstance(condition, dict):
        return {k: take_rows(v, index) for k, v in condition.items()}
    return type(condition)(take_rows(v, index) for v in condition)


def cat_rows(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch (tensors, or dicts/tuples of tensors)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: cat_rows(a[k], b[k]) for k in a}
    return type(a)(cat_rows(x, y) for x, y in zip(a, b))


def _to(condition: Any, device: torch.device) -> Any:
    if isinstance(condition, torch.Tensor):
        return condition.to(device)
    if isinstance(condition, dict):
        return {k: _to(v, device) for k, v in condition.items()}
    return type(condition)(_to(v, device) for v in condition)


def _rows(condition: Any) -> int:
    if isinstance(condition, torch.Tensor):
        return int(condition.shape[0]) if condition.dim() else -1
    values = list(condition.values()) if isinstance(condition, dict) else list(condition)
    return _rows(values[0]) if values else -1


@torch.no_grad()
def collect_hessians(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Any,
                     batch_size: int = 64, progress: bool = True,
                     adapter: ModelAdapter | None = None) -> list[dict[str, torch.Tensor]]:
    """Runs the dense model on the calibration inputs and returns each block's input Hessians.

    Args:
        model (`nn.Module`): a model its adapter accepts (for a DiT, see
            `mosaicdiff.integrations.diffusers_dit.validate_dit`).
        x_t (`torch.Tensor`): (B, C, H, W) noised inputs (as from `stage_inputs`).
        t (`torch.Tensor`): (B,) timesteps.
        condition: (B, ...) conditioning rows (class labels for a DiT).
        batch_size (`int`, *optional*, defaults to 64): model batch size.
        progress (`bool`, *optional*, defaults to True): show a tqdm progress bar.
        adapter (`ModelAdapter`, *optional*): the model's adapter; default `mosaicdiff.models.adapter_for`.

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
    if adapter is None:
        from mosaicdiff.models import adapter_for

        adapter = adapter_for(model)
    adapter.validate(model)
    B = x_t.shape[0]
    if B == 0 or t.shape != (B,) or _rows(condition) != B:
        shape = tuple(condition.shape) if isinstance(condition, torch.Tensor) else type(condition).__name__
        raise ValueError(f"expected x_t (B>0, ...), t (B,), condition (B, ...); got {tuple(x_t.shape)}, "
                         f"{tuple(t.shape)}, {shape}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    param = next(model.parameters())
    hooks, handles = [], []
    for block in adapter.blocks(model):
        entry = {}
        for name, group in adapter.groups(block).items():
            hook = _HessianHook(group.consumer.in_features, param.device)
            handles.append(group.consumer.register_forward_pre_hook(hook))
            entry[name] = hook
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
                        _to(take_rows(condition, sl), param.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if distributed.is_distributed():
        _all_reduce_hooks(hooks, param.device)
    out = []
    for entry in hooks:
        out.append({name: hook.H.div_(max(hook.tokens, 1)) for name, hook in entry.items()})
    logger.debug("collected Hessians of %d blocks from %d samples", len(out), B)
    return out


def _all_reduce_hooks(hooks: list[dict[str, _HessianHook]], device: torch.device) -> None:
    """Sum the hooks' ``X^T X`` and token counts over the ranks (before the division by the tokens)."""
    sums = {f"{i}.{name}": hook.H for i, entry in enumerate(hooks) for name, hook in entry.items()}
    tokens = torch.tensor([float(hook.tokens) for entry in hooks for hook in entry.values()],
                          dtype=torch.float64, device=device)  # exact: counts far below 2**53
    distributed.all_reduce_sums({**sums, "tokens": tokens})
    for hook, count in zip((h for entry in hooks for h in entry.values()), tokens.tolist()):
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
    if isinstance(condition, torch.Tensor):
        return [condition]
    values = condition.values() if isinstance(condition, dict) else condition
    return [t for v in values for t in _tensors(v)]
