"""What the zoo's training scripts share: their common command-line options, the digits split, the
noisy batch of one DDPM training step (the class label / prompt dropped to the null row for CFG)
and the held-out epsilon MSE; for rectified-flow models the interpolated batch and the held-out
velocity MSE; and the optimizer / EMA step, the resumable checkpoint and the phases of
``training.json``."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from mosaicdiff.core.atomic_io import atomic_write, write_json_atomic
from mosaicdiff.zoo.data import NUM_CLASSES, load_digits_tensors, train_test_split

__all__ = ["add_training_arguments", "digits_split", "held_out_eps_mse", "noisy_batch", "flow_batch",
           "flow_times", "held_out_velocity_mse", "optimizer_step", "ema_copies", "parse_training_arguments",
           "save_train_state", "load_train_state",
           "write_training_info"]


def add_training_arguments(p: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float,
                           save_every: int, label_dropout: float = 0.1) -> argparse.ArgumentParser:
    """Add the options every zoo training script has, with that script's defaults."""
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--label-dropout", type=float, default=label_dropout)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=save_every)
    p.add_argument("--resume", action="store_true")
    return p


def parse_training_arguments(p: argparse.ArgumentParser, argv, *, warmup_steps: int, ema: float) -> argparse.Namespace:
    """Add ``--warmup-steps``, ``--ema`` and ``--export-only`` (with these defaults) to a parser that
    has `add_training_arguments`'s options, parse `argv` and check the warm-up fits in ``--steps``."""
    p.add_argument("--warmup-steps", type=int, default=warmup_steps)
    p.add_argument("--ema", type=float, default=ema)
    p.add_argument("--export-only", action="store_true", help="only export the weights of the checkpoint in --out")
    args = p.parse_args(argv)
    if not args.export_only and not 0 <= args.warmup_steps < args.steps:
        p.error(f"--warmup-steps must be in [0, --steps), got {args.warmup_steps}")
    return args


def ema_copies(*modules: torch.nn.Module):
    """Frozen copies of `modules` to hold their exponential moving average.

    Returns:
        ``(copies, pairs)``: the copies in order, and ``(ema_param, param)`` over all parameters (for
        `optimizer_step`).
    """
    copies = [copy.deepcopy(m).requires_grad_(False) for m in modules]
    pairs = [(pe, pm) for c, m in zip(copies, modules) for pe, pm in zip(c.parameters(), m.parameters())]
    return copies, pairs


def noisy_batch(x_train: torch.Tensor, y_train: torch.Tensor, batch_size: int, alphas_cumprod: torch.Tensor,
                label_dropout: float, generator: torch.Generator):
    """One training batch: images and labels drawn with replacement, labels dropped to the null row
    `NUM_CLASSES` with probability `label_dropout`, a uniform timestep and Gaussian noise per image.

    Returns:
        ``(x_t, t, y, noise)``: the noised images, timesteps, labels and the noise (the target).
    """
    idx = torch.randint(0, len(x_train), (batch_size,), generator=generator)
    x0, y = x_train[idx], y_train[idx].clone()
    y[torch.rand(len(y), generator=generator) < label_dropout] = NUM_CLASSES
    t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y, noise


def digits_split() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(x_train, y_train, (x_held_out, y_held_out))`` of the digits (`zoo.data.train_test_split`)."""
    images, labels = load_digits_tensors()
    train_idx, test_idx = train_test_split(len(images))
    return images[train_idx], labels[train_idx], (images[test_idx], labels[test_idx])


@torch.no_grad()
def held_out_eps_mse(predict, images: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int = 1,
                     repeats: int = 4) -> float:
    """Epsilon MSE of ``predict(x_t, t)`` on `images`, averaged over `repeats` fixed random draws
    of (t, noise) from `seed` (the same draws for every model: comparable across checkpoints)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        t = torch.randint(0, len(alphas_cumprod), (len(images),), generator=g)
        noise = torch.randn(images.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        total += torch.nn.functional.mse_loss(predict(a.sqrt() * images + (1 - a).sqrt() * noise, t), noise).item()
    return total / repeats


def flow_times(n: int, generator: torch.Generator, sampling: str = "logit-normal") -> torch.Tensor:
    """`n` rectified-flow times ``s`` in (0, 1): ``"logit-normal"`` (sigmoid of a standard normal, SD3's
    default: most weight on the middle, where the velocity is hardest) or ``"uniform"``."""
    if sampling == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    if sampling == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"flow_times: sampling must be one of ['logit-normal', 'uniform'], got {sampling!r}")


def _interpolate(x0: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def flow_batch(x_train: torch.Tensor, y_train: torch.Tensor, batch_size: int, label_dropout: float,
               generator: torch.Generator, sampling: str = "logit-normal"):
    """One rectified-flow training batch: images and labels drawn with replacement (labels dropped to
    the null row `NUM_CLASSES` with probability `label_dropout`), a time ``s`` per image
    (`flow_times`) and Gaussian noise ``eps``; ``x_s = (1 - s) x0 + s eps``.

    Returns:
        ``(x_s, s, y, v)``: the interpolated images, times, labels and the velocity ``eps - x0`` (the target).
    """
    idx = torch.randint(0, len(x_train), (batch_size,), generator=generator)
    x0, y = x_train[idx], y_train[idx].clone()
    y[torch.rand(len(y), generator=generator) < label_dropout] = NUM_CLASSES
    s = flow_times(len(x0), generator, sampling)
    noise = torch.randn(x0.shape, generator=generator)
    return _interpolate(x0, s, noise), s, y, noise - x0


@torch.no_grad()
def held_out_velocity_mse(predict, images: torch.Tensor, seed: int = 1, repeats: int = 4,
                          sampling: str = "logit-normal") -> float:
    """Velocity MSE of ``predict(x_s, s)`` against ``eps - x0`` on `images`, averaged over `repeats`
    fixed random draws of (s, eps) from `seed` (comparable across checkpoints). It has a floor above 0:
    given ``x_s`` the velocity is still random."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        s = flow_times(len(images), g, sampling)
        noise = torch.randn(images.shape, generator=g)
        total += torch.nn.functional.mse_loss(predict(_interpolate(images, s, noise), s), noise - images).item()
    return total / repeats


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float, ema_pairs, ema: float,
                   clip: float = 1.0) -> None:
    """Backward `loss`, clip the gradient norm of the optimized parameters to `clip`, step `opt` at
    learning rate `lr`, then move each EMA parameter of ``ema_pairs`` (``(ema_param, param)``) a
    fraction ``1 - ema`` towards its parameter."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip)
    opt.step()
    with torch.no_grad():
        for pe, pm in ema_pairs:
            pe.lerp_(pm, 1 - ema)


def save_train_state(path: Path, modules: dict, opt: torch.optim.Optimizer, data_rng: torch.Generator, step: int,
                     history: list, phases: list) -> None:
    """Write a resumable checkpoint atomically: each module's state dict under its name, the optimizer,
    the data generator's state, the step, the held-out history and the phases so far (the running
    one included, so a killed run's phase is not lost)."""
    with atomic_write(path, "wb") as f:
        torch.save({**{k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(),
                    "data_rng": data_rng.get_state(), "step": step, "history": history, "phases": phases}, f)


def load_train_state(path: Path, modules: dict, opt: torch.optim.Optimizer, data_rng: torch.Generator):
    """Restore a `save_train_state` checkpoint into `modules`, `opt` and `data_rng`.

    Returns:
        ``(step, history, phases)``.
    """
    state = torch.load(path, weights_only=True)  # tensors, dicts and numbers only
    for key, module in modules.items():
        module.load_state_dict(state[key])
    opt.load_state_dict(state["opt"])
    data_rng.set_state(state["data_rng"])
    return state["step"], state["history"], state.get("phases", [])


def write_training_info(out: Path, info: dict, phases: list) -> dict:
    """Write ``out/training.json`` atomically: `info` plus its ``phases`` (one per run of the
    trainer, as `save_train_state` keeps them).

    Returns:
        What was written (tuples as lists, as they read back).
    """
    info = json.loads(json.dumps({**info, "phases": phases}))
    write_json_atomic(out / "training.json", info, indent=2)
    return info
