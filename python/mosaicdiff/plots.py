"""Figures for the Divide step: closed-form and measured trajectory curves with the stage bands."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from mosaicdiff import schedule

logger = logging.getLogger(__name__)

__all__ = ["plot_stage_curves"]

_BAND_COLORS = {"early": "#9ecae1", "middle": "#fdae6b", "late": "#a1d99b"}


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
        alphas_cumprod: ``abar_t`` for t = 0..T-1.
        boundaries (`tuple[int, int]`): ``(t_low, t_high)`` of the middle stage.
        empirical (`tuple`, *optional*): ``(timesteps, mse)`` from a sampling run (see
            `schedule.empirical_curve`), timesteps in sampling order.
        x0_sq_norm (`float`, *optional*, defaults to 1.0): ``||x_0||^2 / d`` for the closed form.
        title (`str`, *optional*): figure title.

    Returns:
        `str`: the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    T = abar.size
    stages = schedule.stages_from_boundaries(*boundaries, T=T)
    t = np.arange(T)
    mse = schedule.expected_mse(abar, x0_sq_norm)
    grad = schedule.learning_grad(abar, x0_sq_norm)

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
        # rate between consecutive sampler steps; the last step (t_n -> clean sample, dt = 1) is
        # left out: its tiny dt would dominate the normalisation and flatten the rest
        rate = (emse[:-1] - emse[1:]) / np.maximum(ts[:-1] - ts[1:], 1e-12)
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
