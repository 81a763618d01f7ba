"""The searched-schedule baseline: the constrained evolution strategy, the stage cache, the whole search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import mosaicdiff.search.cache as cache_mod
from mosaicdiff.method import compact
from mosaicdiff.method.calibrate import Calibration
from mosaicdiff.core.schedulers import default_scheduler, sampler_timesteps
from mosaicdiff.api import prune_stages
from mosaicdiff.search.search import search_schedule, uniform_stages
from mosaicdiff.search.cache import StagePruneCache
from mosaicdiff.search.es import EvolutionConfig, SparsityGrid, evolve
from mosaicdiff.search.fitness import HeldOutFidelity


def tiny_dit(heads: int = 4, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def tiny_calibration(n: int = 12, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randn(n, 4, 8, 8, generator=g), torch.arange(n) % 10, null_class=10)


def weighted_mean(weights, sparsities) -> float:
    return sum(w * s for w, s in zip(weights, sparsities)) / sum(weights)


# ----------------------------------------------------------------- the evolution strategy (no model)


@pytest.mark.parametrize("weights", [(5,) * 10, (3, 2, 5, 1, 4)])
def test_every_candidate_keeps_the_mean_and_the_bounds(weights):
    target, step, cap = 0.3, 0.05, 0.6
    grid = SparsityGrid.create(weights, target, step, cap)
    seen = []

    def fitness(levels):
        seen.append(levels)
        return float(np.dot(levels, np.arange(len(levels))))  # drives sparsity to the caps and zeros

    evolve(fitness, grid, EvolutionConfig(population=3, offspring=8, generations=15, max_moves=4, seed=3),
           progress=False)
    assert len(seen) > 50
    assert len({tuple(s) for s in seen}) > 20, "the search must move away from the uniform start"
    for levels in seen:
        sparsities = [k * step for k in levels]
        assert all(isinstance(k, int) for k in levels)
        assert all(-1e-12 <= s <= cap + 1e-12 for s in sparsities), levels
        assert math.isclose(weighted_mean(weights, sparsities), target, abs_tol=1e-12), (levels, weights)


def test_search_is_deterministic_under_its_seed():
    grid = SparsityGrid.create((5,) * 10, 0.5, 0.05, 0.8)

    def run(seed):
        calls = []

        def fitness(levels):
            calls.append(levels)
            return float(np.sin(np.arange(10) @ np.asarray(levels)))
        result = evolve(fitness, grid, EvolutionConfig(generations=6, seed=seed), progress=False)
        return calls, [(e["best_fitness"], e["best_levels"], e["evaluations"]) for e in result.log], result.best

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first[0] != other[0], "another seed must draw other candidates"


@pytest.mark.parametrize("weights, step, target, optimum", [
    ((5,) * 10, 0.05, 0.3, (10, 2, 8, 6, 4, 6, 7, 5, 9, 3)),
    ((2, 1, 1), 0.1, 0.3, (2, 4, 4)),
])
def test_search_finds_the_optimum_of_a_known_fitness(weights, step, target, optimum):
    # a separable concave fitness whose maximum is a feasible point far from the uniform start;
    # under a fixed weighted sum its pairwise-move local optimum is the global one
    assert sum(w * k for w, k in zip(weights, optimum)) * step == pytest.approx(target * sum(weights))
    grid = SparsityGrid.create(weights, target, step, 0.6)
    star = np.asarray(optimum, dtype=float)

    def fitness(levels):
        return -float(((np.asarray(levels) - star) ** 2).sum())

    result = evolve(fitness, grid, EvolutionConfig(population=4, offspring=12, generations=80, seed=0),
                    progress=False)
    assert result.best == optimum
    assert result.best_fitness == 0.0
    best = [e["best_fitness"] for e in result.log]
    assert best == sorted(best), "plus selection never loses the best"
    assert result.evaluations == len(result.fitness_by_levels) <= 4 + 12 * 80


def test_repeated_candidates_are_not_reevaluated():
    grid = SparsityGrid.create((1, 1), 0.1, 0.1, 0.2)  # feasible: (1, 1), (0, 2), (2, 0)
    calls = []
    result = evolve(lambda lv: calls.append(lv) or float(lv[0]), grid,
                    EvolutionConfig(population=2, offspring=6, generations=5), progress=False)
    assert sorted(calls) == [(0, 2), (1, 1), (2, 0)]
    assert result.best == (2, 0) and result.evaluations == 3


def test_a_nan_fitness_is_never_reported_as_best():
    # the best candidates (near the optimum) are NaN: a search that ranks NaN anywhere but last keeps them,
    # or loses track of the true best behind them; over many seeds the best must be the best finite score
    grid = SparsityGrid.create((5,) * 6, 0.3, 0.05, 0.6)
    star = np.array([10, 2, 8, 6, 4, 6])

    for seed in range(30):
        calls = {}

        def fitness(levels, calls=calls):
            value = -float(((np.asarray(levels) - star) ** 2).sum())
            calls[levels] = math.nan if (sum(levels[:3]) + levels[0]) % 3 == 0 else value
            return calls[levels]

        result = evolve(fitness, grid, EvolutionConfig(population=3, offspring=6, generations=8, seed=seed),
                        progress=False)
        finite = [v for v in calls.values() if not math.isnan(v)]
        assert any(math.isnan(v) for v in calls.values()), "the fitness must have returned NaN"
        assert not math.isnan(calls[result.best]), (seed, result.best)
        assert result.best_fitness == calls[result.best] == max(finite), (seed, result.best_fitness, max(finite))
        best = [e["best_fitness"] for e in result.log]
        assert not any(math.isnan(b) for b in best) and best == sorted(best), (seed, best)


@pytest.mark.parametrize("patience", [1, 3])
def test_patience_stops_a_search_on_a_plateau(patience):
    grid = SparsityGrid.create((5,) * 10, 0.3, 0.05, 0.6)
    config = EvolutionConfig(population=3, offspring=6, generations=40, patience=patience, seed=2)
    # a flat fitness: no generation improves, so the search stops after `patience` generations
    flat = evolve(lambda levels: 1.0, grid, config, progress=False)
    assert [e["generation"] for e in flat.log] == list(range(patience + 1))
    # better for the first 15 distinct candidates, then a plateau: the search stops `patience`
    # generations after the last one that improved (an improvement resets the count)
    seen = []

    def fitness(levels):
        seen.append(levels)
        return float(min(len(seen), 15))

    result = evolve(fitness, grid, config, progress=False)
    best = [e["best_fitness"] for e in result.log]
    last_gain = max(g for g in range(1, len(best)) if best[g] > best[g - 1])
    assert last_gain >= 2, f"the fitness must improve over more than one generation: {best}"
    assert len(best) - 1 == last_gain + patience < config.generations, best
    assert best[-1] == 15.0
    # without patience the same search runs every generation
    full = evolve(lambda levels: 1.0, grid, EvolutionConfig(population=3, offspring=6, generations=40, seed=2),
                  progress=False)
    assert len(full.log) == 41


def test_grid_and_config_errors():
    with pytest.raises(ValueError, match="not a multiple of the grid step"):
        SparsityGrid.create((5, 5), 0.33, 0.05, 0.8)
    with pytest.raises(ValueError, match="s_cap=0.2 is below target_sparsity=0.3"):
        SparsityGrid.create((5, 5), 0.3, 0.05, 0.2)
    for bad in (0, 1.5, -0.1, True, float("nan")):
        with pytest.raises(ValueError, match="grid must be a number in"):
            SparsityGrid.create((5, 5), 0.3, bad, 0.8)
    with pytest.raises(ValueError, match="target_sparsity must be"):
        SparsityGrid.create((5, 5), 1.0, 0.05, 0.8)
    with pytest.raises(ValueError, match="stage weight"):
        SparsityGrid.create((5, 0), 0.3, 0.05, 0.8)
    with pytest.raises(ValueError, match="population must be an integer >= 1"):
        EvolutionConfig(population=0)
    with pytest.raises(ValueError, match="generations must be an integer >= 0"):
        EvolutionConfig(generations=-1)
    for bad in (0, 1.5, True, 1001):
        with pytest.raises(ValueError, match="num_stages must be an integer in"):
            uniform_stages(bad)


def test_uniform_stages_tile_the_timesteps():
    stages = uniform_stages(10)
    assert stages[0] == ("t900-1000", 900, 1000) and stages[-1] == ("t0-100", 0, 100)
    for n in (1, 3, 7, 10):
        st = uniform_stages(n)
        covered = sorted(t for _, t0, t1 in st for t in range(t0, t1))
        assert covered == list(range(1000)), n


# ----------------------------------------------------------------- the per-stage cache (tiny DiT)


def test_cache_matches_prune_and_prunes_each_stage_level_once(monkeypatch):
    model, calib = tiny_dit(), tiny_calibration()
    stages = [("early", 600, 1000), ("middle", 200, 600), ("late", 0, 200)]
    hessian_calls, prune_calls = [], []
    real_collect, real_prune = cache_mod.collect_hessians, compact.prune_groups
    monkeypatch.setattr(cache_mod, "collect_hessians",
                        lambda *a, **k: hessian_calls.append(1) or real_collect(*a, **k))
    monkeypatch.setattr(compact, "prune_groups", lambda *a, **k: prune_calls.append(a[2]) or real_prune(*a, **k))
    cache = StagePruneCache(model, calib, stages, samples_per_stage=6, align=None, seed=5,
                            alphas_cumprod=default_scheduler())  # the schedule prune() calibrates with
    levels = [0.5, 0.25, 0.5]
    first = [cache.stage_blocks(i, s) for i, s in enumerate(levels)]
    for _ in range(3):  # asked again: nothing recomputed, the very same blocks come back
        again = [cache.stage_blocks(i, s) for i, s in enumerate(levels)]
        assert all(a is b for a, b in zip(first, again))
    assert cache.hessian_passes == 3 and len(hessian_calls) == 3
    assert len(prune_calls) == 3 * 2 and cache.prune_calls == 3, "one prune per stage and level, per block"

    # the same stages through mosaicdiff.prune (its own loop): the same kept units and weights
    ref = prune_stages(model, calib, 0.4, boundaries=(200, 600), stage_sparsities=levels, samples_per_stage=6,
                       align=None, seed=5, progress=False, share_producers=False)
    for spec, blocks in zip(ref, first):
        for r, c in zip(spec.blocks, blocks):
            for name, tensor in r.tensors().items():
                assert_close(getattr(c, name), tensor, rtol=0, atol=0, msg=f"{spec.name} {name}")


def test_cache_shares_levels_with_the_same_widths_and_dense_level_needs_no_calibration(monkeypatch):
    model, calib = tiny_dit(), tiny_calibration()
    cache = StagePruneCache(model, calib, uniform_stages(2), samples_per_stage=4, align=None)
    dense = cache.stage_blocks(0, 0.0)
    assert cache.hessian_passes == 0 and cache.prune_calls == 0
    assert all(b.num_heads == 4 and b.mlp_width == 128 for b in dense)
    # 4 heads: 0.25 and 0.3 remove one head each, but not the same MLP channels (32 vs 38 of 128)
    assert cache.removal(0.25) == (1, 32) and cache.removal(0.3) == (1, 38)
    a, b = cache.stage_blocks(0, 0.25), cache.stage_blocks(0, 0.3)
    assert a is not b and cache.prune_calls == 2
    # 0.248 and 0.25 both remove 1 head and 32 channels: one pruning serves both
    assert cache.stage_blocks(0, 0.248) is a and cache.prune_calls == 2
    counts = {k: v for k, v in cache.stats().items() if not k.endswith("_seconds")}
    assert counts == {"hessian_passes": 1, "prune_calls": 2, "stage_level_requests": 4, "cached_stage_removals": 3}
    assert cache.stats()["calibration_seconds"] > 0 and cache.stats()["pruning_seconds"] > 0
    with pytest.raises(ValueError, match="at least one head must be kept"):
        cache.stage_blocks(1, 0.9)


# ----------------------------------------------------------------- the whole search (tiny DiT)


def test_search_returns_the_best_candidate_with_the_target_mean():
    model, calib = tiny_dit(), tiny_calibration()
    evolution = EvolutionConfig(population=2, offspring=4, generations=3, seed=1)
    mosaic, log = search_schedule(model, calib, 0.3, num_stages=5, grid=0.1, s_cap=0.6, evolution=evolution,
                                  num_inference_steps=5, fitness_images=4, fitness_seed=11, samples_per_stage=4,
                                  align=None, progress=False)
    assert mosaic.num_stages == 5 and mosaic.meta["method"] == "searched"
    ranges = mosaic.stage_ranges
    assert [(t0, t1) for _, t0, t1, _ in ranges] == [(800, 1000), (600, 800), (400, 600), (200, 400), (0, 200)]
    sparsities = [sp for *_, sp in ranges]
    assert sparsities == log["stage_sparsities"]
    assert all(0 <= s <= 0.6 + 1e-12 for s in sparsities)
    # the mean over the sampler's actual steps (5-step DDIM: 800, 600, 400, 200, 0), counted here
    ts = sampler_timesteps(5).tolist()
    per_step = [sparsities[mosaic.stage_for(t)] for t in ts]
    assert sum(per_step) / len(per_step) == pytest.approx(0.3, abs=1e-12)
    # the returned model scores what the log says was best, on a freshly built held-out set
    held_out = HeldOutFidelity.from_dense(model, 4, seed=11, num_inference_steps=5)
    assert held_out(mosaic) == pytest.approx(log["best_fitness"], abs=1e-6)
    best = [g["best_fitness"] for g in log["generations"]]
    assert len(best) == 4 and best == sorted(best) and best[-1] == log["best_fitness"]
    assert log["evaluations"] <= 2 + 4 * 3
    assert log["cache"]["hessian_passes"] <= 5 and log["seconds"] >= log["search_seconds"] > 0
    # each stage's kept widths really are its sparsity's
    for block in mosaic.stages[0].blocks:
        assert block.num_heads == 4 - compact.heads_to_remove(4, sparsities[0])


def test_search_refuses_bad_settings_before_any_calibration(monkeypatch):
    model, calib = tiny_dit(), tiny_calibration()
    monkeypatch.setattr(cache_mod, "collect_hessians", lambda *a, **k: pytest.fail("calibrated before refusing"))
    cases = [
        (dict(num_stages=60), "without a step of the 50-step sampler"),
        (dict(num_stages=0), "num_stages must be an integer in"),
        (dict(target_sparsity=0.33), "not a multiple of the grid step"),
        (dict(target_sparsity=1.2), "target_sparsity must be a number in"),
        (dict(grid=0.0), "grid must be a number in"),
        (dict(s_cap=0.9), "s_cap allows stage sparsity 0.9"),
        (dict(s_cap=0.2), "s_cap=0.2 is below target_sparsity=0.3"),
        (dict(fitness_images=0), "fitness num_images must be an integer >= 1"),
    ]
    for kwargs, message in cases:
        options = {"target_sparsity": 0.3, "align": None, "progress": False, **kwargs}
        with pytest.raises(ValueError, match=message):
            search_schedule(model, calib, **options)
    with pytest.raises(TypeError, match="EvolutionConfig"):
        search_schedule(model, calib, 0.3, evolution={"generations": 1}, progress=False)
    with pytest.raises(ValueError, match="calibration data is on|calibration samples are"):
        bad = Calibration(torch.randn(4, 3, 8, 8), torch.arange(4), null_class=10)
        search_schedule(model, bad, 0.3, progress=False)


def test_a_candidate_whose_samples_diverge_scores_nan_instead_of_ending_the_search():
    """The sampler raises on NaN/inf images; the fitness must turn that into NaN (ranked worst by
    `evolve`), or one over-pruned candidate would abort a whole search."""
    model = tiny_dit()
    held_out = HeldOutFidelity.from_dense(model, 2, seed=3, num_inference_steps=2)
    broken = tiny_dit()
    with torch.no_grad():
        broken.proj_out_2.weight[0, 0] = float("nan")
    assert math.isnan(held_out(broken))
    assert held_out(model) > 50  # the dense model against itself: the PSNR ceiling region
