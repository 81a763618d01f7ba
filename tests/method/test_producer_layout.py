"""producer_layout: one storage order in which every stage's kept units are a contiguous run."""

from __future__ import annotations

import itertools
import random

import pytest

from mosaicdiff.method.producer_layout import interval_order, unit_ranges


def _runs(order, sets):
    """Each set is exactly the units of one slice of `order` (checked by brute force over slices)."""
    slices = {frozenset(order[a:b]) for a in range(len(order) + 1) for b in range(a, len(order) + 1)}
    return all(frozenset(s) in slices for s in sets)


@pytest.mark.parametrize("sets", [
    [[0, 1, 2, 3], [1, 3], [0, 1]],                  # superset + two overlapping subsets
    [[5, 2, 9, 7], [9, 2], [7]],                     # unsorted input, disjoint subsets
    [[0, 1, 2, 3, 4], [0, 1, 2], [0, 1], [1]],       # a chain of four
    [[3, 1], [1, 3], [3, 1]],                        # identical sets
    [[0, 1, 2], [0, 1, 2, 3]],                       # the largest second
    [[4]],
])
def test_supported_shapes_give_an_order_where_every_set_is_a_run(sets):
    order = interval_order(sets)
    assert order is not None
    assert sorted(order) == sorted(set().union(*map(set, sets)))
    assert _runs(order, sets)
    ranges = unit_ranges(order, sets)
    for (a, b), s in zip(ranges, sets):
        assert set(order[a:b]) == set(s) and b - a == len(s)


@pytest.mark.parametrize("sets", [
    [[0, 1], [1, 2]],                                # no set contains the other
    [[0, 1, 2, 3], [0, 1], [0, 2], [0, 3]],          # unit 0 next to 1, 2 and 3: no order exists
])
def test_unsupported_shapes_return_none(sets):
    assert interval_order(sets) is None
    if len(sets) == 4:  # and indeed no order works (brute force over all orders)
        assert not any(_runs(list(p), sets) for p in itertools.permutations(range(4)))


def test_random_nested_sets_always_fit():
    """What `prune(share_producers=True)` produces: subsets of the least pruned stage's units."""
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        anchor = rng.sample(range(60), n)
        subsets = [rng.sample(anchor, rng.randint(1, n)) for _ in range(2)]
        sets = [subsets[0], anchor, subsets[1]]
        order = interval_order(sets)
        assert order is not None and _runs(order, sets), sets


def test_unit_ranges_refuses_a_set_that_is_not_a_run():
    with pytest.raises(ValueError, match="not a contiguous run"):
        unit_ranges([0, 1, 2, 3], [[0, 2]])
    with pytest.raises(ValueError, match="does not hold"):
        unit_ranges([0, 1, 2], [[7]])
