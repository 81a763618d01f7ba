r"""A (mu + lambda) evolution strategy over per-stage sparsities with a fixed step-weighted mean.

The searched-schedule baseline (Diff-ES style, `mosaicdiff.search.search`) looks for one
sparsity per stage. Candidates live on a grid: stage ``i`` has sparsity ``k_i * step`` with an
integer level ``0 <= k_i <= max_level`` (``max_level = floor(s_cap / step)``), and every
candidate has the target's step-weighted mean exactly::

    sum_i w_i k_i = target / step * sum_i w_i          (w_i: the sampler's steps in stage i)

A mutation moves sparsity between two stages: ``k_i += w_j / g``, ``k_j -= w_i / g`` with
``g = gcd(w_i, w_j)`` (one level each way when the stages have as many steps), which keeps the
weighted sum and is applied only when both stay within ``[0, max_level]``. So every candidate
the search ever evaluates satisfies the constraint; nothing is repaired or penalised.

This module knows nothing of models: the fitness is any function of the levels (higher is
better). All randomness comes from one ``numpy`` generator seeded by `EvolutionConfig.seed`, so
a search with a deterministic fitness is deterministic.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

__all__ = ["EvolutionConfig", "SearchResult", "SparsityGrid", "evolve"]

Levels = tuple[int, ...]
#: Tolerance of "is this sparsity a multiple of the grid step" (floats like 0.3 / 0.05).
_ON_GRID_TOL = 1e-9
#: Random pair draws per mutation move before giving up on finding a feasible one.
_TRIES_PER_STAGE = 20


def positive_int(name: str, value, minimum: int = 1) -> int:
    try:
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return v


def _fraction(name: str, value, *, open_low: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not ((0 < value) if open_low else (0 <= value)) or not value < 1:
        interval = "(0, 1)" if open_low else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SparsityGrid:
    """The candidates: per-stage levels on a grid with a fixed step-weighted mean sparsity.

    Build it with `create`, which validates the inputs.

    Attributes:
        weights: sampler steps per stage (positive integers), in stage order.
        step: grid spacing of the sparsities.
        max_level: largest level (sparsity ``max_level * step``, at most ``s_cap``).
        target_level: the target sparsity in levels (``target / step``, an integer).
    """

    weights: tuple[int, ...]
    step: float
    max_level: int
    target_level: int

    @classmethod
    def create(cls, weights: Sequence[int], target: float, step: float, s_cap: float) -> SparsityGrid:
        """The grid of `weights` (steps per stage) for mean `target`, spacing `step`, cap `s_cap`.

        Raises:
            ValueError: empty or non-positive weights; `step` outside (0, 1); `target` outside
                [0, 1) or not a multiple of `step`; `s_cap` outside (0, 1) or below `target`.
        """
        weights = tuple(positive_int("stage weight (sampler steps per stage)", w) for w in weights)
        if not weights:
            raise ValueError("SparsityGrid needs at least one stage, got no weights")
        step = _fraction("grid", step, open_low=True)
        target = _fraction("target_sparsity", target, open_low=False)
        s_cap = _fraction("s_cap", s_cap, open_low=True)
        level = target / step
        if abs(level - round(level)) > _ON_GRID_TOL * max(1.0, level):
            raise ValueError(f"target_sparsity={target:g} is not a multiple of the grid step {step:g}: "
                             f"the all-stages-at-target start would be off the grid; use a target that "
                             f"is a multiple of the grid (e.g. {round(level) * step:g}) or another grid")
        if s_cap < target:
            raise ValueError(f"s_cap={s_cap:g} is below target_sparsity={target:g}: no schedule has that "
                             f"mean; use s_cap >= target_sparsity")
        max_level = int(math.floor(s_cap / step + _ON_GRID_TOL))
        return cls(weights=weights, step=step, max_level=max_level, target_level=int(round(level)))

    @property
    def num_stages(self) -> int:
        return len(self.weights)

    def uniform(self) -> Levels:
        """Every stage at the target (always feasible)."""
        return (self.target_level,) * self.num_stages

    def sparsities(self, levels: Sequence[int]) -> list[float]:
        """The sparsity of every stage (rounded to 12 digits: 6 * 0.05 is 0.3, not 0.30000000000000004)."""
        return [round(k * self.step, 12) for k in levels]

    def mean_sparsity(self, levels: Sequence[int]) -> float:
        """The step-weighted mean sparsity of `levels`."""
        return sum(w * k for w, k in zip(self.weights, levels)) * self.step / sum(self.weights)

    def is_feasible(self, levels: Sequence[int]) -> bool:
        """On the grid, within [0, max_level] and with exactly the target's weighted sum."""
        return (len(levels) == self.num_stages and all(0 <= k <= self.max_level for k in levels)
                and sum(w * k for w, k in zip(self.weights, levels)) == self.target_level * sum(self.weights))

    def mutate(self, levels: Levels, rng: np.random.Generator, moves: int = 1) -> Levels:
        """`levels` after `moves` random feasible moves of sparsity from one stage to another.

        A move that would leave ``[0, max_level]`` is redrawn (a bounded number of times); with
        one stage, or no feasible move, the levels come back unchanged.
        """
        k = list(levels)
        n = self.num_stages
        if n < 2:
            return tuple(k)
        for _ in range(int(moves)):
            for _ in range(_TRIES_PER_STAGE * n):
                i, j = (int(v) for v in rng.choice(n, size=2, replace=False))
                g = math.gcd(self.weights[i], self.weights[j])
                up, down = self.weights[j] // g, self.weights[i] // g  # keeps sum w k fixed
                if k[i] + up <= self.max_level and k[j] - down >= 0:
                    k[i] += up
                    k[j] -= down
                    break
        return tuple(k)


@dataclass(frozen=True)
class EvolutionConfig:
    """Settings of `evolve`.

    Attributes:
        population: parents kept per generation (``mu``).
        offspring: children per generation (``lambda``), each a mutation of a random parent.
        generations: generations after the initial population.
        max_moves: a child is its parent after ``1..max_moves`` moves (uniform).
        init_moves: the random initial parents are the uniform schedule after
            ``1..init_moves`` moves (default: the number of stages).
        patience: stop after this many generations without improvement (None: never).
        seed: of the search's random generator.
    """

    population: int = 4
    offspring: int = 12
    generations: int = 25
    max_moves: int = 3
    init_moves: int | None = None
    patience: int | None = None
    seed: int = 0

    def __post_init__(self):
        positive_int("population", self.population)
        positive_int("offspring", self.offspring)
        positive_int("generations", self.generations, minimum=0)
        positive_int("max_moves", self.max_moves)
        if self.init_moves is not None:
            positive_int("init_moves", self.init_moves)
        if self.patience is not None:
            positive_int("patience", self.patience)
        positive_int("seed", self.seed, minimum=0)


@dataclass
class SearchResult:
    """What `evolve` found and how.

    Attributes:
        best: the best levels.
        best_fitness: their fitness.
        evaluations: distinct candidates evaluated (a repeated candidate is looked up, not rerun).
        seconds: wall time of the search.
        log: one entry per generation (0 = the initial population): ``generation``,
            ``best_fitness``, ``best_levels``, ``evaluations`` and ``seconds`` so far.
        fitness_by_levels: every evaluated candidate's fitness.
    """

    best: Levels
    best_fitness: float
    evaluations: int
    seconds: float
    log: list[dict[str, Any]] = field(default_factory=list)
    fitness_by_levels: dict[Levels, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: everything except the table of every candidate."""
        out = asdict(self)
        out.pop("fitness_by_levels")
        out["best"] = list(self.best)
        return out


def _ranked(candidates, fitness_by_levels) -> list[Levels]:
    """Best first; ties broken by the levels themselves, so the order never depends on set order."""
    return sorted(set(candidates), key=lambda c: (-fitness_by_levels[c], c))


def evolve(fitness: Callable[[Levels], float], grid: SparsityGrid, config: EvolutionConfig | None = None, *,
           progress: bool = True) -> SearchResult:
    """Maximises `fitness` over the feasible levels of `grid` with a (mu + lambda) evolution strategy.

    The initial parents are the uniform schedule (every stage at the target) and random
    mutations of it; each generation adds `EvolutionConfig.offspring` mutated children and keeps
    the best `EvolutionConfig.population` distinct candidates of parents and children (plus
    selection: the best never gets worse). Every candidate is feasible (see the module
    docstring). A NaN fitness counts as the worst possible.

    Args:
        fitness: levels -> score (higher is better); called once per distinct candidate.
        grid: the feasible set.
        config: the search settings (default `EvolutionConfig()`).
        progress: a tqdm bar over the generations.

    Returns:
        `SearchResult`.
    """
    config = config or EvolutionConfig()
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    scores: dict[Levels, float] = {}

    def evaluate(levels: Levels) -> None:
        if levels not in scores:
            value = float(fitness(levels))
            scores[levels] = -math.inf if math.isnan(value) else value

    init_moves = config.init_moves or grid.num_stages
    population = [grid.uniform()]
    for _ in range(20 * config.population):  # distinct random starts (a tiny grid may have fewer)
        if len(population) >= config.population:
            break
        child = grid.mutate(grid.uniform(), rng, int(rng.integers(1, init_moves + 1)))
        if child not in population:
            population.append(child)
    for levels in population:
        evaluate(levels)
    population = _ranked(population, scores)[:config.population]

    def record(generation: int) -> None:
        best = population[0]
        log.append({"generation": generation, "best_fitness": scores[best], "best_levels": list(best),
                    "evaluations": len(scores), "seconds": round(time.perf_counter() - started, 3)})

    log: list[dict[str, Any]] = []
    record(0)
    stale = 0
    bar = tqdm(range(1, config.generations + 1), desc="schedule search", disable=not progress, leave=False)
    for generation in bar:
        children = []
        for _ in range(config.offspring):
            parent = population[int(rng.integers(len(population)))]
            children.append(grid.mutate(parent, rng, int(rng.integers(1, config.max_moves + 1))))
        for child in children:
            evaluate(child)
        before = scores[population[0]]
        population = _ranked(population + children, scores)[:config.population]
        record(generation)
        bar.set_postfix(best=f"{scores[population[0]]:.3f}", evals=len(scores))
        stale = 0 if scores[population[0]] > before else stale + 1
        if config.patience is not None and stale >= config.patience:
            break
    bar.close()
    best = population[0]
    return SearchResult(best=best, best_fitness=scores[best], evaluations=len(scores),
                        seconds=time.perf_counter() - started, log=log, fitness_by_levels=dict(scores))
