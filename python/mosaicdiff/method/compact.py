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
from torch import nn

from mosaicdiff.core.adapter import PrunableGroup, PrunedGroup, hessian_keys, linear_bias
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


class _SharedConsumer:
    """The compensation state of a consumer read by several groups (Flux's ``proj_out``), or by one
    group that spans only part of it: the groups are pruned in order, each on the weight the earlier
    removals left (optimally compensated over every column still alive)."""

    def __init__(self, linear: nn.Linear, hessian: torch.Tensor | None, damp: float):
        self.linear = linear
        self.w0 = linear.weight.detach().to(torch.float64)
        self.hinv = None if hessian is None else obs.inverse_hessian(hessian.to(self.w0.device), damp=damp)
        self.removed: list[torch.Tensor] = []

    def _update(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, Hinv) after the removals so far: the joint OBS update for the removed columns R,
        ``W - W[:, R] Hinv[R, R]^-1 Hinv[R, :]`` (the least-squares optimum over the kept ones)."""
        if not self.removed or self.hinv is None:
            return self.w0, self.hinv
        R = torch.cat(self.removed).to(self.w0.device)
        X = torch.linalg.solve(self.hinv[R][:, R], self.hinv[R])  # (r, n)
        return self.w0 - self.w0[:, R] @ X, self.hinv - self.hinv[:, R] @ X

    def columns(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The current weight and inverse Hessian on the columns `cols`."""
        W, hinv = self._update()
        return W[:, cols], None if hinv is None else hinv[cols][:, cols]

    def final(self) -> torch.Tensor:
        return self._update()[0]


def _shared_consumers(groups: Mapping[str, PrunableGroup]) -> dict[int, list[str]]:
    """The consumers that need a `_SharedConsumer` (read by several groups, or by part of one), by
    id, with their groups' names; checks that those groups cover every input column exactly once."""
    users: dict[int, list[str]] = {}
    for name, group in groups.items():
        for consumer in group.consumers:
            users.setdefault(id(consumer), []).append(name)
    shared = {}
    for key, names in users.items():
        first = groups[names[0]]
        consumer = next(c for c in first.consumers if id(c) == key)
        if len(names) == 1 and first.columns == slice(0, consumer.in_features):
            continue
        spans = sorted((groups[n].columns.start, groups[n].columns.stop) for n in names)
        edges = [0] + [e for span in spans for e in span] + [consumer.in_features]
        if any(a != b for a, b in zip(edges[::2], edges[1::2])):
            raise ValueError(f"groups {names} share a consumer ({consumer.in_features} input columns) but their "
                             f"columns {spans} do not cover each column exactly once")
        shared[key] = names
    return shared


def units_to_remove(group: PrunableGroup, sparsity: float, align: int | None = 64) -> int:
    """How many units of `group` a sparsity removes: `heads_to_remove` or the `mlp_width` rule."""
    if group.kind == "heads":
        return heads_to_remove(group.num_units, sparsity)
    return group.num_units - mlp_width(group.num_units, sparsity, align)


def _select(group: PrunableGroup, weights: list[torch.Tensor], hinvs: list[torch.Tensor | None], n_remove: int,
            method: str, generator, forced, obs_kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The kept columns of a group (counted from its first column) and its consumers' weights on them."""
    size = int(group.unit_size)
    if method == "obs":
        return obs.prune_columns_joint(weights, hinvs, n_remove, size, must_remove=forced, **obs_kwargs)
    stacked = torch.cat([w.to(torch.float64) for w in weights])  # a unit's norm over every consumer
    if method == "magnitude":
        _, cols = obs.magnitude_prune_columns(stacked, n_remove, size, must_remove=forced)
    else:
        _, cols = obs.random_prune_columns(stacked, n_remove, size, generator=generator, must_remove=forced)
    return [w[:, cols.to(w.device)] for w in weights], cols


def prune_group(group: PrunableGroup, hessian: torch.Tensor | None, sparsity: float, method: str = "obs",
                align: int | None = 64, generator: torch.Generator | None = None, name: str = "consumer",
                keep_within: torch.Tensor | None = None, **obs_kwargs) -> PrunedGroup:
    """Removes a fraction of one group's units: the consumer's columns (compensated), the producers' rows.

    Args:
        group (`PrunableGroup`): the consumer, its producers and the unit size.
        hessian (`torch.Tensor`, *optional*): the consumer's input Hessian (as from
            `mosaicdiff.method.calibrate.collect_hessians`); needed for ``"obs"``. A group with
            `PrunableGroup.more_consumers` takes a list, one per consumer (or use `prune_groups`).
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
    hessians = list(hessian) if isinstance(hessian, (list, tuple)) else [hessian]
    keys = hessian_keys(name, group)
    if len(hessians) != len(keys):
        raise ValueError(f"{name}: expected {len(keys)} Hessians (one per consumer), got {len(hessians)}")
    return prune_groups({name: group}, dict(zip(keys, hessians)), sparsity, method, align, generator,
                        None if keep_within is None else {name: keep_within}, **obs_kwargs)[name]


def prune_groups(groups: Mapping[str, PrunableGroup], hessians: Mapping[str, torch.Tensor] | None,
                 sparsities: float | Mapping[str, float], method: str = "obs", align: int | None = 64,
                 generator: torch.Generator | None = None, keep_within: Mapping[str, torch.Tensor] | None = None,
                 **obs_kwargs: Any) -> dict[str, PrunedGroup]:
    """Prunes every group of a block, in order (one sparsity for all, or one per group name;
    `keep_within` per group name, see `prune_group`); `hessians` keyed as `hessian_keys` says.

    A group with several consumers removes the units of least summed OBS cost and compensates each
    consumer with its own Hessian. Groups sharing one consumer are pruned in order on one weight:
    a later group is chosen and compensated on the weight the earlier removals left, and each
    group's `PrunedGroup.consumer_weight` is the final weight on its kept columns.

    Raises:
        ValueError: on an unknown method, bad sparsities, a sparsity that removes every head, a
            missing Hessian, a Hessian that does not match its consumer, or groups that share a
            consumer without covering its columns exactly once.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    hessians = hessians or {}
    damp = obs_kwargs.get("damp", 0.01)
    shared_names = _shared_consumers(groups)
    states: dict[int, _SharedConsumer] = {}
    out, cols_of = {}, {}
    for name, group in groups.items():
        sp = sparsities[name] if isinstance(sparsities, Mapping) else sparsities
        size = int(group.unit_size)
        n_remove = units_to_remove(group, sp, align)
        within = keep_within.get(name) if keep_within is not None else None
        forced = _outside(group, within, group.num_units - n_remove, name)
        # damp went into the inverse Hessians; groups_per_step is for single-column units only
        kwargs = {k: v for k, v in obs_kwargs.items() if k != "damp" and (size == 1 or k != "groups_per_step")}
        group_cols = torch.arange(group.columns.start, group.columns.stop)
        weights, hinvs = [], []
        for consumer, key in zip(group.consumers, hessian_keys(name, group)):
            h = hessians.get(key)
            if method == "obs" and h is None:
                raise ValueError(f"method='obs' needs the Hessian of {key!r}, got None")
            if h is not None and h.shape != (consumer.in_features, consumer.in_features):
                raise ValueError(f"the Hessian of {key!r} must be ({consumer.in_features}, {consumer.in_features}) "
                                 f"for its consumer, got {tuple(h.shape)}")
            if id(consumer) in shared_names:
                state = states.get(id(consumer))
                if state is None:
                    state = states[id(consumer)] = _SharedConsumer(consumer, h if method == "obs" else None, damp)
                w, hi = state.columns(group_cols.to(state.w0.device))
            elif method == "obs":
                w, hi = consumer.weight.detach(), obs.inverse_hessian(h.to(consumer.weight.device), damp=damp)
            else:
                w, hi = consumer.weight.detach(), None
            weights.append(w)
            hinvs.append(hi)
        kept_weights, cols = _select(group, weights, hinvs, n_remove, method, generator, forced, kwargs)
        cols = cols.to("cpu")
        removed = group_cols[~torch.isin(torch.arange(group_cols.numel()), cols)]
        for consumer in group.consumers:
            if id(consumer) in states:
                states[id(consumer)].removed.append(removed)
        producer_rows = cols if group.producer_rows is None else group.producer_rows(cols)
        weights_p, biases_p = [], []
        for producer in group.producers:
            rows = producer_rows.to(producer.weight.device)
            weights_p.append(producer.weight.detach().index_select(0, rows).contiguous())
            biases_p.append(linear_bias(producer).index_select(0, rows).contiguous())
        consumer_weights = [w.to(c.weight.dtype).contiguous() for w, c in zip(kept_weights, group.consumers)]
        out[name] = PrunedGroup(kept=(cols.view(-1, size)[:, 0] // size).long(), consumer_weight=consumer_weights[0],
                                consumer_bias=linear_bias(group.consumer).clone(),
                                producer_weights=weights_p, producer_biases=biases_p,
                                more_consumer_weights=consumer_weights[1:],
                                more_consumer_biases=[linear_bias(c).clone() for c in group.more_consumers])
        cols_of[name] = group_cols[cols]
        logger.debug("pruned %s (%s): %d -> %d units", name, method, group.num_units, out[name].kept.numel())
    # a shared consumer's weight is final only once every group on it is pruned
    for key, state in states.items():
        final = state.final() if method == "obs" else state.w0
        for name in shared_names[key]:
            group = groups[name]
            index = next(i for i, c in enumerate(group.consumers) if id(c) == key)
            w = final[:, cols_of[name].to(final.device)].to(state.linear.weight.dtype).contiguous()
            if index == 0:
                out[name].consumer_weight = w
            else:
                out[name].more_consumer_weights[index - 1] = w
    return out
