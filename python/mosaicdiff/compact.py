"""Compact: prune one DiT block's heads and MLP channels into smaller dense matrices.

Heads are groups of ``head_dim`` input columns of the attention output projection ``proj``;
removing a head drops those columns of ``proj`` (compensated by OBS) and the head's rows of
``q``, ``k`` and ``v`` (sliced). MLP channels are input columns of ``fc2`` (compensated) and
rows of ``fc1`` (sliced). Only the consumers are compensated; the producers are sliced.

This module only sees ``nn.Linear`` layers and tensors (from
`mosaicdiff.integrations.diffusers_dit.block_linears`), never model classes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn

from mosaicdiff import obs
from mosaicdiff.types import CompactBlockWeights

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "align_width", "heads_to_remove", "mlp_width", "prune_block"]

#: Column-removal methods of `prune_block`.
METHODS = ("obs", "magnitude", "random")


def align_width(n_keep: int, multiple: int | None = 64, n_total: int | None = None) -> int:
    """Rounds a kept width to the nearest multiple of `multiple`, within ``[1, n_total]``.

    Odd GEMM widths are slow on tensor cores (N=2301 ran 6-8x slower than N=2304 on H100).

    Args:
        n_keep (`int`): the width the sparsity asks for, ``>= 0``.
        multiple (`int`, *optional*, defaults to 64): alignment; ``None`` or 1 disables it.
        n_total (`int`, *optional*): the dense width; the result never exceeds it.

    Returns:
        `int`: the nearest multiple (ties round up); ``0`` only when ``n_keep == 0``; at least
        ``min(multiple, n_total)`` otherwise; capped at `n_total` (the unpruned width is kept
        even when it is not itself a multiple).

    Raises:
        ValueError: on negative widths, a non-positive multiple, or ``n_keep > n_total``.
    """
    if int(n_keep) != n_keep or n_keep < 0:
        raise ValueError(f"n_keep must be a non-negative integer, got {n_keep!r}")
    if n_total is not None and (int(n_total) != n_total or n_total < 0 or n_keep > n_total):
        raise ValueError(f"n_total must be an integer >= n_keep={n_keep}, got {n_total!r}")
    if multiple is not None and (int(multiple) != multiple or multiple < 1):
        raise ValueError(f"multiple must be a positive integer or None, got {multiple!r}")
    n_keep = int(n_keep)
    if n_keep == 0 or multiple is None or multiple == 1:
        return n_keep
    multiple = int(multiple)
    width = (2 * n_keep + multiple) // (2 * multiple) * multiple  # nearest, ties up
    width = max(width, multiple)
    if n_total is not None:
        width = min(width, int(n_total))
    return width


def heads_to_remove(num_heads: int, sparsity: float) -> int:
    """``round(num_heads * sparsity)`` (halves up); raises ValueError if that removes every head."""
    _check_sparsity("head_sparsity", sparsity)
    n_remove = _round_half_up(num_heads * float(sparsity))
    if n_remove >= num_heads:
        raise ValueError(
            f"head_sparsity={sparsity} removes {n_remove} of {num_heads} heads; at least one head "
            f"must be kept (use head_sparsity < {(num_heads - 0.5) / num_heads:.4f})"
        )
    return n_remove


def mlp_width(width: int, sparsity: float, align: int | None = 64) -> int:
    """Kept MLP width: ``align_width(round(width * (1 - sparsity)), align, width)``, at least 1.

    Raises:
        ValueError: on a bad sparsity, or an `align` of ``width`` or more with ``sparsity > 0``
            (every kept width would round up to the dense width: nothing would be pruned).
    """
    _check_sparsity("mlp_sparsity", sparsity)
    if isinstance(align, bool):
        raise ValueError(f"align must be a positive integer or None, got {align!r}")
    if align is not None and 1 < align and align >= width and sparsity > 0:
        raise ValueError(f"align={align} is not smaller than the MLP width {width}: the kept width would "
                         f"round up to all {width} channels (nothing pruned); use a smaller align or None")
    n_keep = max(1, _round_half_up(width * (1.0 - float(sparsity))))
    return align_width(n_keep, align, width)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _check_sparsity(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _bias(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias.detach()
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)


def _remove_columns(weight, hessian, n_remove, group_size, method, generator, name, obs_kwargs):
    if method == "obs":
        if hessian is None:
            raise ValueError(f"method='obs' needs the Hessian of {name!r}, got None")
        return obs.prune_columns(weight, hessian, n_remove, group_size, **obs_kwargs)
    if method == "magnitude":
        return obs.magnitude_prune_columns(weight, n_remove, group_size)
    return obs.random_prune_columns(weight, n_remove, group_size, generator=generator)


def prune_block(block_linears: Mapping[str, nn.Linear], hessians: Mapping[str, torch.Tensor] | None,
                num_heads: int, head_sparsity: float, mlp_sparsity: float, method: str = "obs",
                align: int | None = 64, generator: torch.Generator | None = None,
                **obs_kwargs) -> CompactBlockWeights:
    """Prunes one block's heads and MLP channels into a `CompactBlockWeights`.

    Args:
        block_linears (`Mapping[str, nn.Linear]`): ``q, k, v, proj, fc1, fc2`` as from
            `mosaicdiff.integrations.diffusers_dit.block_linears`.
        hessians (`Mapping[str, torch.Tensor]`, *optional*): ``proj`` and ``fc2`` input
            Hessians (as from `mosaicdiff.calibrate.collect_hessians`); needed for ``"obs"``.
        num_heads (`int`): heads of the block (``proj.in_features`` must be divisible by it).
        head_sparsity (`float`): fraction of heads to remove, in [0, 1); rounded to the nearest
            head count; at least one head is always kept.
        mlp_sparsity (`float`): fraction of MLP channels to remove, in [0, 1); the kept width is
            rounded to a multiple of `align` (see `align_width`).
        method (`str`, *optional*, defaults to ``"obs"``): ``"obs"`` (greedy OBS with
            compensation of ``proj``/``fc2``), ``"magnitude"`` (drop least-norm column groups of
            the consumer, no compensation) or ``"random"``.
        align (`int`, *optional*, defaults to 64): MLP width alignment; None disables it.
        generator (`torch.Generator`, *optional*): for ``"random"``.
        **obs_kwargs: passed to `mosaicdiff.obs.prune_columns` (``damp``, ``groups_per_step``
            (used for the MLP channels only), ``block``).

    Returns:
        `CompactBlockWeights` in the dtype and device of the block's weights.

    Raises:
        ValueError: on an unknown method, bad sparsities, a sparsity that removes every head,
            missing Hessians or inconsistent shapes.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    missing = [k for k in ("q", "k", "v", "proj", "fc1", "fc2") if k not in block_linears]
    if missing:
        raise ValueError(f"block_linears is missing {missing}")
    lin = block_linears
    inner = lin["proj"].in_features
    if int(num_heads) != num_heads or num_heads < 1 or inner % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of proj.in_features={inner}, got {num_heads}")
    num_heads = int(num_heads)
    head_dim = inner // num_heads
    for n in "qkv":
        if lin[n].out_features != inner:
            raise ValueError(f"{n}.out_features={lin[n].out_features} != proj.in_features={inner}")
    width = lin["fc2"].in_features
    if lin["fc1"].out_features != width:
        raise ValueError(f"fc1.out_features={lin['fc1'].out_features} != fc2.in_features={width}")
    hessians = hessians or {}

    # 1. Heads: groups of head_dim input columns of proj; slice the rows of q, k, v.
    n_remove_heads = heads_to_remove(num_heads, head_sparsity)
    head_kwargs = {k: v for k, v in obs_kwargs.items() if k != "groups_per_step"}
    proj_w, proj_cols = _remove_columns(lin["proj"].weight, hessians.get("proj"), n_remove_heads,
                                        head_dim, method, generator, "proj", head_kwargs)
    kept_heads = proj_cols.view(-1, head_dim)[:, 0] // head_dim
    rows = proj_cols.to(lin["q"].weight.device)
    qkv_weight = torch.cat([lin[n].weight.detach().index_select(0, rows) for n in "qkv"], 0)
    qkv_bias = torch.cat([_bias(lin[n]).index_select(0, rows) for n in "qkv"], 0)

    # 2. MLP channels: input columns of fc2; slice the rows of fc1.
    n_keep = mlp_width(width, mlp_sparsity, align)
    fc2_w, channels = _remove_columns(lin["fc2"].weight, hessians.get("fc2"), width - n_keep, 1,
                                      method, generator, "fc2", obs_kwargs)
    channels = channels.to(lin["fc1"].weight.device)
    fc1_weight = lin["fc1"].weight.detach().index_select(0, channels)
    fc1_bias = _bias(lin["fc1"]).index_select(0, channels)

    logger.debug("pruned block (%s): heads %d -> %d, MLP %d -> %d", method, num_heads,
                 kept_heads.numel(), width, channels.numel())
    return CompactBlockWeights(
        kept_heads=kept_heads.long(),
        kept_channels=channels.long(),
        qkv_weight=qkv_weight.contiguous(),
        qkv_bias=qkv_bias.contiguous(),
        proj_weight=proj_w.contiguous(),
        proj_bias=_bias(lin["proj"]).clone(),
        fc1_weight=fc1_weight.contiguous(),
        fc1_bias=fc1_bias.contiguous(),
        fc2_weight=fc2_w.contiguous(),
        fc2_bias=_bias(lin["fc2"]).clone(),
    )
