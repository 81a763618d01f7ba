"""The figures `mosaicdiff` writes: image grids, stage curves (the Divide step), FID against sparsity."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mosaicdiff.method import schedule

logger = logging.getLogger(__name__)

__all__ = ["plot_fid_vs_sparsity", "plot_stage_curves", "save_image_grid"]

_BAND_COLORS = {"early": "#9ecae1", "middle": "#fdae6b", "late": "#a1d99b"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 10, scale: int = 2,
                    pad: int = 2) -> str:
    """Save `(N, 1, H, W)` images in [-1, 1] as a PNG grid (row-major, `nrow` per row, gray padding)."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"save_image_grid: expected (N, 1, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    ncol = min(nrow, max(n, 1))
    nrows = max(1, math.ceil(n / ncol))
    hs, ws = h * scale, w * scale
    grid = torch.full((nrows * (hs + pad) + pad, ncol * (ws + pad) + pad), 0.5)
    img = ((images[:, 0].float().clamp(-1, 1) + 1) / 2).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (hs + pad): pad + r * (hs + pad) + hs, pad + c * (ws + pad): pad + c * (ws + pad) + ws] = img[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().to(torch.uint8).numpy(), mode="L").save(path)
    return str(path)


def _norm_max(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    top = np.nanmax(np.abs(x)) if x.size else 0.0
    return x / top if top > 0 else x


def plot_stage_curves(path: str | os.PathLike, alphas_cumprod, boundaries: tuple[int, int],
                      empirical: tuple[Sequence[int], Sequence[float]] | None = None,
                      x0_sq_norm: float = 1.0, title: str | None = None) -> str:
    """Writes a PNG: E[MSE(t)] and its rate Grad(t), closed form and measured, with stage bands.

    Top panel: ``E[MSE(t)]`` (closed form) and the measured MSE of ``x_t`` to the final sample.
    Bottom panel: ``Grad(t)`` and the measured per-t rate. Each curve is divided by its maximum so
    both fit one axis. The early / middle / late bands are shaded.

    Args:
        path (`str` or `os.PathLike`): output PNG path (parent directories are created).
        alphas_cumprod: ``abar_t`` for t = 0..T-1, or the sampler's `NoiseProcess` (a flow model's:
            `mosaicdiff.core.schedulers.noise_process`).
        boundaries (`tuple[int, int]`): ``(t_low, t_high)`` of the middle stage.
        empirical (`tuple`, *optional*): ``(timesteps, mse)`` from a sampling run (see
            `schedule.empirical_curve`), timesteps in sampling order.
        x0_sq_norm (`float`, *optional*, defaults to 1.0): ``||x_0||^2 / d`` for the closed form.
        title (`str`, *optional*): figure title.

    Returns:
        `str`: the path written.
    """
    from mosaicdiff.core.schedulers import NoiseProcess

    plt = _pyplot()
    source = alphas_cumprod if isinstance(alphas_cumprod, NoiseProcess) else np.asarray(alphas_cumprod, np.float64)
    mse = schedule.expected_mse(source, x0_sq_norm)
    grad = schedule.learning_grad(source, x0_sq_norm)
    T = source.timestep_end if isinstance(source, NoiseProcess) else source.size
    stages = schedule.stages_from_boundaries(*boundaries, T=T)
    t = np.arange(mse.size)

    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for ax in axes:
        for name, t_start, t_end in stages:
            ax.axvspan(t_start, t_end, color=_BAND_COLORS.get(name, "#dddddd"), alpha=0.35,
                       label=f"{name} [{t_start}, {t_end})")
    axes[0].plot(t, _norm_max(mse), color="k", label="E[MSE(t)] closed form")
    axes[1].plot(t, _norm_max(grad), color="k", label="Grad(t) closed form")
    if empirical is not None:
        ts, emse = (np.asarray(v, dtype=np.float64) for v in empirical)
        if ts.shape != emse.shape:
            raise ValueError(f"empirical timesteps and mse must have the same length, got {ts.size} and {emse.size}")
        # rate between consecutive sampler steps, per unit of the sampler's uniform axis (t itself for
        # DDPM; T u for a shifted flow sampler, as the closed form's Grad); the last step (t_n ->
        # clean sample) is left out: its tiny step would dominate the normalisation
        axis = source.sampler_axis(ts) if isinstance(source, NoiseProcess) else ts
        rate = (emse[:-1] - emse[1:]) / np.maximum(axis[:-1] - axis[1:], 1e-12)
        axes[0].plot(ts, _norm_max(emse), "o-", ms=3, color="tab:red", label="MSE measured")
        if rate.size:
            axes[1].plot(ts[:-1], _norm_max(rate), "o-", ms=3, color="tab:red", label="rate measured")
    axes[0].set_ylabel("MSE (normalized)")
    axes[1].set_ylabel("rate (normalized)")
    axes[1].set_xlabel("training timestep t")
    for ax in axes:
        ax.set_xlim(0, T)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path


def plot_fid_vs_sparsity(result: dict, path: str | os.PathLike) -> str:
    """One panel per guidance scale of a `mosaicdiff eval` result: FID against mean sparsity per
    method, the dense model as a dashed line."""
    plt = _pyplot()
    gs = result["settings"]["guidance_scales"]
    fig, axes = plt.subplots(1, len(gs), figsize=(4.5 * len(gs), 3.6), squeeze=False)
    for ax, g in zip(axes[0], gs):
        for method in result["settings"]["methods"]:
            pts = sorted((p["sparsity"], p["fid"]) for p in result["points"]
                         if p["method"] == method and p["guidance_scale"] == g)
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        d = result["dense"].get(str(g))
        if d is not None:
            ax.axhline(d["fid"], color="k", ls="--", lw=1, label="dense")
        ax.axhline(result["real_reference_fid"], color="gray", ls=":", lw=1, label="real (same N)")
        ax.set_title(f"guidance {g:g}")
        ax.set_xlabel("mean sparsity")
        ax.set_ylabel("digits-FID")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"FID vs sparsity ({result['settings']['num_samples']} samples, "
                 f"DDIM {result['settings']['steps']}, stages {tuple(result['boundaries'])})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
