"""Structured OBS against brute force, a literal reference implementation and least squares.

All problems are small, random and float64. Tolerances: 1e-8 (absolute and relative) for
quantities that are exact up to rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.method import obs

F64 = torch.float64


def _problem(out: int, n: int, tokens: int = 300, seed: int = 0):
    """W (out, n) and H = X^T X / tokens with correlated inputs X."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=F64)
    X = torch.randn(tokens, n, generator=g, dtype=F64) @ mix + 0.3 * torch.randn(n, generator=g, dtype=F64)
    H = X.T @ X / tokens
    W = torch.randn(out, n, generator=g, dtype=F64)
    return W, H, X


def _lstsq_weight(W, H, kept):
    """W H[:, K] H[K, K]^-1: the least-squares optimum for a fixed kept set K."""
    return torch.linalg.solve(H[kept][:, kept], (W @ H[:, kept]).T).T


def _reference_greedy(W, H, n_remove, g, forced=()):
    """docs/method.md, literally: saliency, update, downdate, one group at a time (the `forced`
    groups first, in the given order, whatever their saliency)."""
    W = W.clone()
    Hinv = torch.linalg.inv(H)
    m = W.shape[1] // g
    alive = [True] * m
    for step in range(n_remove):
        best, best_sal = (forced[step], 0) if step < len(forced) else (None, None)
        for G in range(m):
            if not alive[G] or step < len(forced):
                continue
            idx = torch.arange(G * g, (G + 1) * g)
            sal = sum(W[i, idx] @ torch.linalg.inv(Hinv[idx][:, idx]) @ W[i, idx] for i in range(W.shape[0]))
            if best_sal is None or sal < best_sal:
                best, best_sal = G, sal
        idx = torch.arange(best * g, (best + 1) * g)
        Dinv = torch.linalg.inv(Hinv[idx][:, idx])
        W = W - W[:, idx] @ Dinv @ Hinv[idx, :]
        Hinv = Hinv - Hinv[:, idx] @ Dinv @ Hinv[idx, :]
        alive[best] = False
    kept = torch.cat([torch.arange(G * g, (G + 1) * g) for G in range(m) if alive[G]])
    return W[:, kept], kept


@pytest.mark.parametrize("out, n, g, n_remove, block, per_step", [
    (6, 16, 1, 9, None, 1),
    (6, 16, 1, 9, 2, 1),       # several lazy flushes and compactions
    (5, 24, 4, 3, None, 1),    # head-like groups
    (5, 24, 4, 3, 4, 1),
    (4, 40, 1, 33, 5, 1),
    (4, 40, 1, 30, 6, 3),      # batched removal: exact compensation for whatever set it keeps
    (3, 36, 6, 5, 1, 2),
])
def test_compensation_is_least_squares_optimum(out, n, g, n_remove, block, per_step):
    W, H, _ = _problem(out, n, seed=n + g)
    Wk, kept = obs.prune_columns(W, H, n_remove, g, block=block, groups_per_step=per_step)
    assert kept.dtype == torch.int64 and kept.numel() == n - n_remove * g
    assert torch.equal(kept, kept.sort().values), "kept indices must be sorted"
    ref = _lstsq_weight(W, H, kept)
    assert_close(Wk, ref, atol=1e-8, rtol=1e-8,
                 msg=lambda m: f"compensated weight != W H[:,K] H[K,K]^-1 (max diff {(Wk - ref).abs().max():.3g})\n{m}")


@pytest.mark.parametrize("out, n, g, n_remove, block", [
    (5, 12, 1, 7, None), (5, 12, 1, 7, 2), (6, 24, 4, 4, 4), (7, 30, 1, 22, 3), (3, 30, 3, 8, 1)])
def test_greedy_matches_literal_reference(out, n, g, n_remove, block):
    W, H, _ = _problem(out, n, seed=7 * n + g)
    Wr, kr = _reference_greedy(W, H, n_remove, g)
    Wk, kept = obs.prune_columns(W, H, n_remove, g, block=block)
    assert torch.equal(kept, kr), f"greedy choice differs: {kept.tolist()} vs reference {kr.tolist()}"
    assert_close(Wk, Wr, atol=1e-8, rtol=1e-8,
                 msg=lambda m: f"weights differ from the reference updates (max {(Wk - Wr).abs().max():.3g})\n{m}")


@pytest.mark.parametrize("out, n, g, n_remove, forced, block, per_step", [
    (5, 12, 1, 7, [3, 0, 11], None, 1),
    (5, 12, 1, 7, [3, 0, 11], 2, 1),      # forced chunks across lazy flushes
    (6, 24, 4, 4, [5, 1], 4, 1),          # head-like groups
    (7, 30, 1, 22, list(range(0, 30, 3)), 3, 1),
    (4, 20, 1, 12, [2, 7, 9, 19], None, 3),
    (4, 20, 1, 4, [2, 7, 9, 19], None, 1),  # everything removed is forced
])
def test_forced_removals_then_greedy_match_literal_reference(out, n, g, n_remove, forced, block, per_step):
    """must_remove: those groups go first (jointly: order does not matter for an exact update),
    then the greedy picks among the rest, exactly as the literal reference does."""
    W, H, _ = _problem(out, n, seed=11 * n + g)
    Wk, kept = obs.prune_columns(W, H, n_remove, g, block=block, groups_per_step=per_step,
                                 must_remove=torch.tensor(forced))
    assert not set((kept // g).tolist()) & set(forced), "a forced group was kept"
    assert kept.numel() == n - n_remove * g
    assert_close(Wk, _lstsq_weight(W, H, kept), atol=1e-8, rtol=1e-8)
    if per_step == 1:
        Wr, kr = _reference_greedy(W, H, n_remove, g, forced=sorted(forced))
        assert torch.equal(kept, kr), f"choice differs: {kept.tolist()} vs reference {kr.tolist()}"
        assert_close(Wk, Wr, atol=1e-8, rtol=1e-8)


def test_forced_removals_change_the_choice():
    """The constraint is real: forcing out a group the free greedy keeps changes the kept set."""
    W, H, _ = _problem(5, 12, seed=3)
    _, free = obs.prune_columns(W, H, 4, 1)
    must = int(free[0])
    _, kept = obs.prune_columns(W, H, 4, 1, must_remove=torch.tensor([must]))
    assert must in free.tolist() and must not in kept.tolist()


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_baselines_honour_must_remove(method):
    W = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    forced = torch.tensor([0, 5, 6])
    for n_remove in (3, 7):
        if method == "magnitude":
            Wk, kept = obs.magnitude_prune_columns(W, n_remove, 2, must_remove=forced)
        else:
            Wk, kept = obs.random_prune_columns(W, n_remove, 2, generator=torch.Generator().manual_seed(0),
                                                must_remove=forced)
        groups = set((kept // 2).tolist())
        assert len(groups) == 8 - n_remove and not groups & set(forced.tolist())
        assert torch.equal(Wk, W[:, kept])
    if method == "magnitude":  # the free removals are still the least-norm ones among the others
        norms = W.view(3, 8, 2).pow(2).sum((0, 2))
        _, kept = obs.magnitude_prune_columns(W, 5, 2, must_remove=forced)
        free_dropped = set(range(8)) - set((kept // 2).tolist()) - set(forced.tolist())
        others = [G for G in range(8) if G not in forced.tolist()]
        assert free_dropped == set(sorted(others, key=lambda G: float(norms[G]))[:2])


@pytest.mark.parametrize("must, match", [([12], "outside"), ([1, 1], "twice"), ([0, 1, 2, 3, 4], "more than")])
def test_bad_must_remove(must, match):
    W, H, _ = _problem(4, 12)
    with pytest.raises(ValueError, match=match):
        obs.prune_columns(W, H, 4, 1, must_remove=torch.tensor(must))


@pytest.mark.parametrize("g", [1, 3])
def test_group_saliency_matches_brute_force(g):
    """saliency(G) = output error ||(W - W') X^T||^2 / tokens after removing G and refitting the rest."""
    W, H, X = _problem(4, 18, seed=g)
    sal = obs.group_saliency(W, torch.linalg.inv(H), g)
    m = 18 // g
    brute = []
    for G in range(m):
        kept = torch.tensor([j for j in range(18) if j // g != G])
        W2 = torch.zeros_like(W)
        W2[:, kept] = _lstsq_weight(W, H, kept)
        E = (W - W2) @ X.T
        brute.append((E * E).sum() / X.shape[0])
    brute = torch.stack(brute)
    assert_close(sal, brute, atol=1e-8, rtol=1e-8,
                 msg=lambda m: f"saliency vs brute force max diff {(sal - brute).abs().max():.3g}\n{m}")
    Wk, kept = obs.prune_columns(W, H, 1, g)
    assert kept.numel() == 18 - g
    removed = sorted(set(range(m)) - set((kept[::g] // g).tolist()))
    assert removed == [int(brute.argmin())], f"first greedy removal {removed} != argmin {int(brute.argmin())}"


def test_zero_removal_returns_weight_unchanged():
    W, H, _ = _problem(5, 12)
    W32 = W.float()
    Wk, kept = obs.prune_columns(W32, H, 0, 3)
    assert torch.equal(Wk, W32) and Wk.dtype == torch.float32
    assert torch.equal(kept, torch.arange(12))
    assert Wk.data_ptr() != W32.data_ptr(), "must return a copy"


def test_output_dtype_and_device_follow_weight():
    W, H, _ = _problem(5, 12)
    Wk, kept = obs.prune_columns(W.float(), H.float(), 4, 1)
    assert Wk.dtype == torch.float32 and Wk.shape == (5, 8)
    ref = _lstsq_weight(W.float().double(), H.float().double(), kept).float()
    assert_close(Wk, ref, atol=1e-5, rtol=1e-5)


def test_dead_columns_and_singular_hessian():
    W, H, _ = _problem(4, 10)
    H[3, :] = 0
    H[:, 3] = 0  # input 3 never active
    Wk, kept = obs.prune_columns(W, H, 4, 1)
    assert torch.isfinite(Wk).all() and kept.numel() == 6
    # rank-deficient (fewer tokens than inputs): Cholesky fails, damping makes it definite
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 12, generator=g, dtype=F64)
    Hs = X.T @ X
    Hinv = obs.inverse_hessian(Hs)
    assert torch.isfinite(Hinv).all()
    Wk, kept = obs.prune_columns(torch.randn(3, 12, generator=g, dtype=F64), Hs, 6, 1)
    assert torch.isfinite(Wk).all() and kept.numel() == 6


def test_obs_beats_uncompensated_baselines():
    """On correlated inputs, OBS keeps the layer output closer than magnitude or random pruning."""
    W, H, X = _problem(8, 32, tokens=400, seed=3)

    def err(Wk, kept):
        E = X @ W.T - X[:, kept] @ Wk.T
        return float((E * E).mean())

    e_obs = err(*obs.prune_columns(W, H, 16, 1))
    e_mag = err(*obs.magnitude_prune_columns(W, 16, 1))
    e_rand = err(*obs.random_prune_columns(W, 16, 1, generator=torch.Generator().manual_seed(0)))
    assert e_obs < 0.5 * min(e_mag, e_rand), f"obs {e_obs:.4g}, magnitude {e_mag:.4g}, random {e_rand:.4g}"


def test_magnitude_drops_least_norm_groups():
    W = torch.ones(3, 8)
    W[:, 2:4] *= 0.1   # group 1 (size 2) smallest
    W[:, 6:8] *= 0.5   # group 3 next
    Wk, kept = obs.magnitude_prune_columns(W, 2, 2)
    assert kept.tolist() == [0, 1, 4, 5]
    assert torch.equal(Wk, W[:, [0, 1, 4, 5]])


def test_random_is_seeded_and_slices():
    W = torch.randn(3, 12)
    a = obs.random_prune_columns(W, 2, 3, generator=torch.Generator().manual_seed(5))
    b = obs.random_prune_columns(W, 2, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[1], b[1]) and a[1].numel() == 6
    assert torch.equal(a[0], W[:, a[1]])
    groups = set((a[1] // 3).tolist())
    assert len(groups) == 2 and all((a[1] // 3 == G).sum() == 3 for G in groups), "whole groups are kept"


def test_bad_inputs():
    W, H, _ = _problem(4, 12)
    with pytest.raises(ValueError, match="n_remove_groups"):
        obs.prune_columns(W, H, 4, 3)  # all 4 groups
    with pytest.raises(ValueError, match="n_remove_groups"):
        obs.prune_columns(W, H, -1, 1)
    with pytest.raises(ValueError, match="group_size"):
        obs.prune_columns(W, H, 1, 5)
    with pytest.raises(ValueError, match="hessian must be"):
        obs.prune_columns(W, H[:10, :10], 1, 1)
    with pytest.raises(ValueError, match="groups_per_step"):
        obs.prune_columns(W, H, 1, 1, groups_per_step=0)
    with pytest.raises(ValueError, match="2-D"):
        obs.magnitude_prune_columns(W[0], 1, 1)
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        obs.prune_columns(W, bad, 1, 1)
