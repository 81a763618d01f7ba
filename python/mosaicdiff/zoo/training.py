"""What the zoo's training scripts share: their common command-line options, the digits split, the
noisy batch of one DDPM training step (the class label / prompt dropped to the null row for CFG)
and the held-out epsilon MSE."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mosaicdiff.zoo.data import NUM_CLASSES, load_digits_tensors, train_test_split

__all__ = ["add_training_arguments", "digits_split", "held_out_eps_mse", "noisy_batch"]


def add_training_arguments(p: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float,
                           save_every: int) -> argparse.ArgumentParser:
    """Add the options every zoo training script has, with that script's defaults."""
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=save_every)
    p.add_argument("--resume", action="store_true")
    return p


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
