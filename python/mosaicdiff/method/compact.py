"""Compact: prune a block's structured units (heads, MLP channels) into smaller dense matrices.

A unit is a group of input columns of a *consumer* linear and the matching output rows of its
*producers* (a `mosaicdiff.core.adapter.PrunableGroup`). Heads are groups of ``head_dim``
input columns of the attention output projection; removing a head drops those columns
(compensated by OBS) and the head's rows of ``q``, ``k`` and ``v`` (sliced). MLP channels are
single input columns of ``fc2`` (compensated) and rows of ``fc1`` (sliced). Only consumers are
compensated; producers are sliced.

This module only sees ``nn.Linear`` layers and tensors, never model classes: the model's adapter
says where the groups are and assembles the runtime's compact block from the result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from mosaicdiff.core.adapter import PrunableGroup, PrunedGroup, linear_bias
from mosaicdiff.method import obs

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "align_width", "heads_to_remove", "mlp_width", "prune_group", "prune_groups", "units_to_remove"]

#: Column-removal methods of `prune_group`.
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


def _remove_columns(weight, hessian, n_remove, group_size, method, generator, name, forced, obs_kwargs):
    if method == "obs":
        if hessian is None:
            raise ValueError(f"method='obs' needs the Hessian of {name!r}, got None")
        return obs.prune_columns(weight, hessian, n_remove, group_size, must_remove=forced, **obs_kwargs)
    if method == "magnitude":
        return obs.magnitude_prune_columns(weight, n_remove, group_size, must_remove=forced)
    return obs.random_prune_columns(weight, n_remove, group_size, generator=generator, must_remove=forced)


def _outside(group: PrunableGroup, keep_within, n_keep: int, name: str) -> torch.Tensor | None:
    """The units not in `keep_within` (removed first), or None without a constraint."""
    if keep_within is None:
        return None
    within = torch.as_tensor(keep_within).reshape(-1).to("cpu", torch.int64)
    if within.numel() < n_keep:
        raise ValueError(f"{name}: keep_within has {within.numel()} units, fewer than the {n_keep} to keep")
    mask = torch.ones(group.num_units, dtype=torch.bool)
    mask[within] = False
    return mask.nonzero().reshape(-1)


def units_to_remove(group: PrunableGroup, sparsity: float, align: int | None = 64) -> int:
    """How many units of `group` a sparsity removes: `heads_to_remove` or the `mlp_width` rule."""
    if group.kind == "heads":
        return heads_to_remove(group.num_units, sparsity)
    return group.num_units - mlp_width(group.num_units, sparsity, align)


def prune_group(group: PrunableGroup, hessian: torch.Tensor | None, sparsity: float, method: str = "obs",
                align: int | None = 64, generator: torch.Generator | None = None, name: str = "consumer",
                keep_within: torch.Tensor | None = None, **obs_kwargs) -> PrunedGroup:
    """Removes a fraction of one group's units: the consumer's columns (compensated), the producers' rows.

    Args:
        group (`PrunableGroup`): the consumer, its producers and the unit size.
        hessian (`torch.Tensor`, *optional*): the consumer's input Hessian (as from
            `mosaicdiff.method.calibrate.collect_hessians`); needed for ``"obs"``.
        sparsity (`float`): fraction of units to remove, in [0, 1) (see `units_to_remove`).
        method (`str`, *optional*, defaults to ``"obs"``): ``"obs"`` (greedy OBS with
            compensation), ``"magnitude"`` (drop least-norm column groups, no compensation) or
            ``"random"``.
        align (`int`, *optional*, defaults to 64): width alignment of ``"channels"`` groups.
        generator (`torch.Generator`, *optional*): for ``"random"``.
        name (`str`, *optional*): the group's name, for error messages.
        keep_within (`torch.Tensor`, *optional*): unit indices the kept units must be chosen
            from (the others are removed first); how a more pruned stage keeps a subset of a
            less pruned one's units, so that both can share one producer storage.
        **obs_kwargs: passed to `mosaicdiff.method.obs.prune_columns` (``damp``, ``groups_per_step``
            (used for single-column units only), ``block``).

    Returns:
        `PrunedGroup` in the dtype and device of the group's weights.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    consumer, size = group.consumer, int(group.unit_size)
    n_remove = units_to_remove(group, sparsity, align)
    forced = _outside(group, keep_within, group.num_units - n_remove, name)
    kwargs = obs_kwargs if size == 1 else {k: v for k, v in obs_kwargs.items() if k != "groups_per_step"}
    weight, cols = _remove_columns(consumer.weight, hessian, n_remove, size, method, generator, name, forced,
                                   kwargs)
    kept = (cols.view(-1, size)[:, 0] // size).long()
    weights, biases = [], []
    for producer in group.producers:
        rows = cols if group.producer_rows is None else group.producer_rows(cols)
        rows = rows.to(producer.weight.device)
        weights.append(producer.weight.detach().index_select(0, rows).contiguous())
        biases.append(linear_bias(producer).index_select(0, rows).contiguous())
    return PrunedGroup(kept=kept, consumer_weight=weight.contiguous(), consumer_bias=linear_bias(consumer).clone(),
                       producer_weights=weights, producer_biases=biases)


def prune_groups(groups: Mapping[str, PrunableGroup], hessians: Mapping[str, torch.Tensor] | None,
                 sparsities: float | Mapping[str, float], method: str = "obs", align: int | None = 64,
                 generator: torch.Generator | None = None, keep_within: Mapping[str, torch.Tensor] | None = None,
                 **obs_kwargs: Any) -> dict[str, PrunedGroup]:
    """`prune_group` on every group of a block, in order (one sparsity for all, or one per group name;
    `keep_within` per group name, see `prune_group`).

    Raises:
        ValueError: on an unknown method, bad sparsities, a sparsity that removes every head, a
            missing Hessian, or a Hessian that does not match its consumer.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    hessians = hessians or {}
    out = {}
    for name, group in groups.items():
        sp = sparsities[name] if isinstance(sparsities, Mapping) else sparsities
        within = keep_within.get(name) if keep_within is not None else None
        out[name] = prune_group(group, hessians.get(name), sp, method, align, generator, name=name,
                                keep_within=within, **obs_kwargs)
        logger.debug("pruned %s (%s): %d -> %d units", name, method, group.num_units, out[name].kept.numel())
    return out
