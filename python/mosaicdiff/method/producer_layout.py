"""One row order for a block position's producer units, in which every stage's kept units are a run.

Pruning only slices the producers (q/k/v rows of kept heads, fc1 rows of kept channels: see
`mosaicdiff.method.compact`), so every stage's producer rows are rows of one dense matrix. If the units
are stored once in an order where each stage's kept units are consecutive, each stage's producer
weight is a contiguous row range of that storage: a view, no copy, and still a dense GEMM operand.

Such an order exists when the kept sets are a chain (each inside the next larger one: each is a
prefix), or when one set contains all the others and there are at most two others (then the order
is ``A only | A and B | B only | the rest of the largest``). `mosaicdiff.prune` with
``share_producers=True`` chooses the kept sets so that one of the two holds (the more pruned
stages keep a subset of the least pruned stage's units).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["head_major", "interval_order", "part_major", "permute_unit_columns", "unit_positions", "unit_ranges"]


def unit_positions(units: torch.Tensor) -> torch.Tensor:
    """A lookup table: ``table[unit]`` = the unit's position in `units` (-1 where absent)."""
    table = torch.full((int(units.max()) + 1 if units.numel() else 0,), -1, dtype=torch.int64)
    table[units] = torch.arange(units.numel())
    return table


def _is_run(order: list[int], units: set[int]) -> bool:
    positions = sorted(i for i, u in enumerate(order) if u in units)
    return not positions or positions[-1] - positions[0] + 1 == len(units) == len(positions)


def interval_order(kept_sets: Sequence[Sequence[int]]) -> list[int] | None:
    """An order of the union of `kept_sets` in which each set is a contiguous run, or None.

    Args:
        kept_sets: the kept unit indices of each stage (any order, no repeats within a set).

    Returns:
        `list[int]`: every unit of the union once; within each region units ascend. None when no
        order of the two supported shapes (a chain, or one superset and at most two others) fits.
    """
    sets = [set(int(u) for u in s) for s in kept_sets]
    if not sets:
        return []
    by_size = sorted(sets, key=len, reverse=True)
    largest = by_size[0]
    if all(s <= largest for s in sets):
        if all(b <= a for a, b in zip(by_size, by_size[1:])):  # a chain: deepest units first
            order = sorted(largest, key=lambda u: (-sum(u in s for s in sets), u))
        else:
            others = [s for s in by_size[1:] if s != largest]
            distinct = list({frozenset(s): s for s in others}.values())
            if len(distinct) > 2:
                return None
            a, b = distinct if len(distinct) == 2 else (distinct[0], set())
            order = sorted(a - b) + sorted(a & b) + sorted(b - a) + sorted(largest - a - b)
    else:
        return None
    return order if all(_is_run(order, s) for s in sets) else None


def unit_ranges(order: Sequence[int], kept_sets: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each kept set in `order` (each must be a run of it).

    Raises:
        ValueError: a set that is not a contiguous run of `order` (or has units not in it).
    """
    position = {int(u): i for i, u in enumerate(order)}
    ranges = []
    for i, s in enumerate(kept_sets):
        units = [int(u) for u in s]
        if any(u not in position for u in units):
            raise ValueError(f"kept set {i} has units that the shared storage does not hold")
        pos = sorted(position[u] for u in units)
        if not pos:
            ranges.append((0, 0))
            continue
        if pos[-1] - pos[0] + 1 != len(pos):
            raise ValueError(f"kept set {i} is not a contiguous run of the shared storage's units")
        ranges.append((pos[0], pos[-1] + 1))
    return ranges


def head_major(t: torch.Tensor, parts: int, heads: int, head_dim: int) -> torch.Tensor:
    """``[part 0 of every head | part 1 ...]`` rows (e.g. ``[q | k | v]``) -> ``[every part of head 0 |
    of head 1 ...]``: a run of heads is then a run of rows."""
    return t.reshape(parts, heads, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def part_major(t: torch.Tensor, parts: int, heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of `head_major`."""
    return t.reshape(heads, parts, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def permute_unit_columns(w: torch.Tensor, kept: torch.Tensor, order: Sequence[int], unit: int) -> torch.Tensor:
    """`w`'s column groups (`unit` columns per unit of `kept`, in `kept`'s order) reordered to follow
    `order` (a consumer's columns in a shared storage's unit order)."""
    groups = unit_positions(kept.cpu())[torch.as_tensor(list(order), dtype=torch.int64)]
    idx = (groups[:, None] * unit + torch.arange(unit)).reshape(-1)
    return w.index_select(1, idx.to(w.device)).contiguous()
