r"""Structured Optimal Brain Surgeon: remove groups of input columns of a linear layer, compensate the rest.

For a linear layer ``y = x W^T`` with weight ``W`` (out x in) and calibration inputs ``X``, the
Hessian of the layer-output error is ``H = X^T X`` (float64, averaged over tokens). Removing a
group ``G`` of input columns and optimally re-fitting the others costs (``Hinv = H^-1``)::

    saliency(G) = sum_i W[i,G] (Hinv[G,G])^-1 W[i,G]^T
    W    <- W - W[:,G] (Hinv[G,G])^-1 Hinv[G,:]             (then drop the columns G)
    Hinv <- Hinv - Hinv[:,G] (Hinv[G,G])^-1 Hinv[G,:]

Greedy OBS removes the lowest-saliency group, updates, and repeats. For a fixed final kept set
``K`` the result equals the least-squares optimum ``W H[:,K] H[K,K]^-1``.

Implementation (exact, not an approximation): the saliencies only need the diagonal blocks of
``Hinv`` and of the Gram matrix ``Gm = W^T W``, and one step only needs the columns ``G`` of
``Hinv``, ``Gm`` and ``W``. So the updates of ``Hinv``, ``Gm`` and ``W`` are kept as low-rank
accumulators and applied with one GEMM every `block` removed columns (after dropping the
removed rows and columns), as in GPTQ's lazy batch updates. A step costs O(n * block) instead
of the O(n^2) of explicit rank-``g`` updates; all math is float64.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "group_saliency",
    "inverse_hessian",
    "magnitude_prune_columns",
    "prune_columns",
    "prune_columns_joint",
    "random_prune_columns",
]

_REL_PIVOT_EPS = 1e-10  # Cholesky pivots below this (relative to mean diag H) count as failure


def _check(weight: torch.Tensor, n_remove_groups: int, group_size: int) -> tuple[int, int, int]:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out, n = weight.shape
    if int(group_size) != group_size or group_size < 1 or n % group_size:
        raise ValueError(f"group_size must be a positive divisor of in_features={n}, got {group_size}")
    m = n // int(group_size)
    if int(n_remove_groups) != n_remove_groups or not 0 <= n_remove_groups < m:
        raise ValueError(
            f"n_remove_groups must be an integer in [0, {m - 1}] (at least one of {m} groups kept), "
            f"got {n_remove_groups}"
        )
    return out, n, m


def _check_forced(must_remove, n_remove_groups: int, m: int, device) -> torch.Tensor:
    """`must_remove` as sorted unique int64 group indices on `device` (empty when None).

    Raises:
        ValueError: indices outside [0, m), repeated, or more of them than `n_remove_groups`.
    """
    if must_remove is None:
        return torch.empty(0, dtype=torch.int64, device=device)
    forced = torch.as_tensor(must_remove).reshape(-1).to(device=device, dtype=torch.int64)
    if forced.numel() and (int(forced.min()) < 0 or int(forced.max()) >= m):
        raise ValueError(f"must_remove holds group indices outside [0, {m})")
    if forced.unique().numel() != forced.numel():
        raise ValueError("must_remove holds a group index twice")
    if forced.numel() > int(n_remove_groups):
        raise ValueError(f"must_remove names {forced.numel()} groups, more than the {int(n_remove_groups)} "
                         f"to remove")
    return forced.sort().values


def _group_cols(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Column indices of the given group indices, ascending within each group."""
    offs = torch.arange(group_size, device=groups.device)
    return (groups[:, None] * group_size + offs).reshape(-1)


def inverse_hessian(hessian: torch.Tensor, damp: float = 0.01, max_tries: int = 8) -> torch.Tensor:
    """``H^-1`` in float64, after fixing dead columns and damping if needed.

    Dead columns (``H_jj == 0``: the input is never active) get ``H_jj = 1``. If the Cholesky
    factorization fails (or has a pivot below ``1e-10 * mean(diag H)``, i.e. numerically
    singular), ``damp * mean(diag H)`` is added to the diagonal, multiplied by 10 on each retry.

    Args:
        hessian (`torch.Tensor`): (n, n) symmetric positive semi-definite.
        damp (`float`, *optional*, defaults to 0.01): first damping, relative to mean(diag H).
        max_tries (`int`, *optional*, defaults to 8): damping attempts before giving up.

    Returns:
        `torch.Tensor` (n, n) float64.

    Raises:
        ValueError: on a non-square or non-finite Hessian, or if damping never makes it definite.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square (n, n), got shape {tuple(hessian.shape)}")
    H = hessian.detach().to(torch.float64).clone()
    if not torch.isfinite(H).all():
        raise ValueError("hessian has non-finite entries")
    H = 0.5 * (H + H.T)
    diag = H.diagonal()
    dead = diag == 0
    if dead.any():
        logger.debug("%d dead input columns (H_jj = 0) set to H_jj = 1", int(dead.sum()))
        diag[dead] = 1.0
    mean_diag = float(diag.mean())
    amount = 0.0
    for attempt in range(max_tries + 1):
        if attempt:
            amount = damp * mean_diag * 10 ** (attempt - 1)
            Hd = H + amount * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        else:
            Hd = H
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0 and float(L.diagonal().min()) ** 2 > _REL_PIVOT_EPS * mean_diag:
            if attempt:
                logger.debug("Hessian damped by %.3g (%.3g x mean diag) to factorize", amount, amount / mean_diag)
            return torch.cholesky_inverse(L)
    raise ValueError(f"hessian is not positive definite even after damping by {amount:.3g}")


def group_saliency(weight: torch.Tensor, hinv: torch.Tensor, group_size: int) -> torch.Tensor:
    """OBS saliency of removing each group alone: ``sum_i W[i,G] (Hinv[G,G])^-1 W[i,G]^T``.

    Equals the increase of ``||(W - W') X^T||^2`` (with ``X^T X = H``) when the group's columns
    are removed and the others optimally compensated.

    Args:
        weight (`torch.Tensor`): (out, n).
        hinv (`torch.Tensor`): (n, n) inverse Hessian.
        group_size (`int`): consecutive columns per group (n must be divisible by it).

    Returns:
        `torch.Tensor` (n // group_size,) float64.
    """
    out, n, m = _check(weight, 0, group_size)
    if hinv.shape != (n, n):
        raise ValueError(f"hinv must be ({n}, {n}), got {tuple(hinv.shape)}")
    W = weight.detach().to(torch.float64)
    Hi = hinv.detach().to(W.device, torch.float64)
    g = int(group_size)
    if g == 1:
        return (W * W).sum(0) / Hi.diagonal()
    blocks = _block_diag(Hi, g)  # (m, g, g)
    WG = W.view(out, m, g).permute(1, 2, 0)  # (m, g, out)
    Y = torch.linalg.solve_triangular(torch.linalg.cholesky(blocks), WG, upper=False)
    return (Y * Y).sum((1, 2))


def _block_diag(M: torch.Tensor, g: int) -> torch.Tensor:
    """The (m, g, g) diagonal blocks of an (m*g, m*g) matrix, as a new tensor."""
    m = M.shape[0] // g
    return M.reshape(m, g, m, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()


def _saliency_from_blocks(hd: torch.Tensor, gd: torch.Tensor) -> torch.Tensor:
    """``tr(hd^-1 gd)`` per group, with hd = blocks of Hinv and gd = blocks of W^T W."""
    if hd.shape[-1] == 1:
        return gd[:, 0, 0] / hd[:, 0, 0]
    L, info = torch.linalg.cholesky_ex(hd)
    X = torch.cholesky_solve(gd, L)
    sal = X.diagonal(dim1=-2, dim2=-1).sum(-1)
    bad = info != 0  # removed groups: hd is (numerically) zero
    return sal.masked_fill(bad, math.inf)


class _LazyOBS:
    """Greedy group OBS with lazily applied low-rank updates (see the module docstring).

    State after k steps, in "base" coordinates (the rows/cols alive at the last flush)::

        Hinv_k = Hb - U P^T
        Gm_k   = Gb - P Gc^T - R P^T
        W_k^T  = WbT - P A^T

    with one column block per step: ``U = Hinv_k[:, S]``, ``P = U D^-1`` (``D = U[S]``),
    ``Gc = Gm_k[:, S]``, ``R = Gc - P Gm_k[S, S]``, ``A = W_k[:, S]``. ``Hb`` and ``Gb`` are
    symmetric, so their columns ``S`` are read as rows; the weight is kept transposed and the
    accumulators are stored as rows (``Ut = U^T`` ...) so every access is a contiguous row gather.
    """

    def __init__(self, W: torch.Tensor, Hinv: torch.Tensor, group_size: int, block: int, cap: int):
        self.g = group_size
        self.block = block
        self.cap = cap
        self.out = W.shape[0]
        self.cols = torch.arange(W.shape[1], device=W.device)  # original index of each base column
        self.WbT = W.T.contiguous()
        self.Hb = Hinv
        self.Gb = self.WbT @ self.WbT.T
        self._reset()

    def _reset(self):
        nb, dev = self.Hb.shape[0], self.Hb.device
        kw = dict(dtype=torch.float64, device=dev)
        self.Ut = torch.empty(self.cap, nb, **kw)
        self.Pt = torch.empty(self.cap, nb, **kw)
        self.Gct = torch.empty(self.cap, nb, **kw)
        self.Rt = torch.empty(self.cap, nb, **kw)
        self.At = torch.empty(self.cap, self.out, **kw)
        self.r = 0
        self.hd = _block_diag(self.Hb, self.g)
        self.gd = _block_diag(self.Gb, self.g)
        self.alive = torch.ones(nb // self.g, dtype=torch.bool, device=dev)

    def saliency(self) -> torch.Tensor:
        """Each base group's saliency now (inf for removed groups)."""
        return _saliency_from_blocks(self.hd, self.gd).masked_fill(~self.alive, math.inf)

    def step(self, pick: torch.Tensor):
        """Removes the alive groups `pick` (sorted base group indices) jointly, with the exact update."""
        g, r = self.g, self.r
        S = _group_cols(pick, g)
        Ut, Pt, Gct, Rt, At = (t[:r] for t in (self.Ut, self.Pt, self.Gct, self.Rt, self.At))
        PS = Pt.index_select(1, S).T  # (s, r) = P[S]
        UcurT = torch.addmm(self.Hb.index_select(0, S), PS, Ut, alpha=-1)  # Hinv_k[S, :]
        D = UcurT.index_select(1, S)
        D = 0.5 * (D + D.T)
        L, info = torch.linalg.cholesky_ex(D)
        if int(info) != 0:
            raise ValueError("OBS: Hinv[G, G] lost positive definiteness; increase damping")
        PcurT = torch.cholesky_inverse(L) @ UcurT  # (U D^-1)^T
        GcurT = self.Gb.index_select(0, S) - Gct.index_select(1, S).T @ Pt - PS @ Rt  # Gm_k[S, :]
        RcurT = GcurT - GcurT.index_select(1, S) @ PcurT  # (Gc - P Gm_k[S, S])^T
        AcurT = torch.addmm(self.WbT.index_select(0, S), PS, At, alpha=-1)  # W_k[:, S]^T
        s = S.numel()
        m = self.alive.numel()
        Ub, Pb, Gb_, Rb = (t.T.reshape(m, g, s) for t in (UcurT, PcurT, GcurT, RcurT))
        self.hd -= Ub @ Pb.transpose(1, 2)
        self.gd -= Pb @ Gb_.transpose(1, 2) + Rb @ Pb.transpose(1, 2)
        self.Ut[r:r + s] = UcurT
        self.Pt[r:r + s] = PcurT
        self.Gct[r:r + s] = GcurT
        self.Rt[r:r + s] = RcurT
        self.At[r:r + s] = AcurT
        self.r = r + s
        self.alive[pick] = False

    def flush(self, compact: bool | None = None) -> bool:
        """Applies the accumulated updates; drops the removed rows/columns when worthwhile.

        Args:
            compact: drop removed rows/columns now (default: when over 15% of the base are removed).

        Returns:
            `bool`: whether it compacted.
        """
        nb = self.Hb.shape[0]
        n_alive = int(self.alive.sum()) * self.g
        if compact is None:
            compact = n_alive < 0.85 * nb
        keep = _group_cols(self.alive.nonzero().reshape(-1), self.g) if compact else None
        r = self.r
        if r:
            Ut, Pt, Gct, Rt = (t[:r] for t in (self.Ut, self.Pt, self.Gct, self.Rt))
            if compact:
                Ut, Pt, Gct, Rt = (t.index_select(1, keep) for t in (Ut, Pt, Gct, Rt))
        if compact:
            self.Hb = self.Hb.index_select(0, keep).index_select(1, keep)
            self.Gb = self.Gb.index_select(0, keep).index_select(1, keep)
            self.WbT = self.WbT.index_select(0, keep)
            self.cols = self.cols[keep]
        if r:
            # in place: Hb -= U P^T ; Gb -= P Gc^T + R P^T ; WbT -= P A^T (U P^T is symmetric)
            self.Hb.addmm_(Ut.T, Pt, alpha=-1)
            self.Gb.addmm_(torch.cat([Pt, Rt], 0).T, torch.cat([Gct, Pt], 0), alpha=-1)
            self.WbT.addmm_(Pt.T, self.At[:r], alpha=-1)
        alive = self.alive
        self._reset()
        if not compact:
            self.alive = alive
        return compact

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flushes, compacts, and returns (W restricted to kept columns, kept original indices)."""
        self.flush(compact=True)
        return self.WbT.T, self.cols


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    """Temporarily sets torch's intra-op CPU thread count (no-op for None)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prune_columns(weight: torch.Tensor, hessian: torch.Tensor, n_remove_groups: int, group_size: int,
                  damp: float = 0.01, groups_per_step: int = 1, block: int | None = None,
                  must_remove: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy structured OBS: removes `n_remove_groups` groups of input columns, compensating the rest.

    Args:
        weight (`torch.Tensor`): (out, n) weight of the consumer layer.
        hessian (`torch.Tensor`): (n, n) ``X^T X`` of the layer's inputs (any float dtype).
        n_remove_groups (`int`): groups to remove, in ``[0, n // group_size - 1]``.
        group_size (`int`): consecutive input columns per group (head_dim for heads, 1 for MLP
            channels).
        damp (`float`, *optional*, defaults to 0.01): damping used if Cholesky fails, relative to
            mean(diag H); see `inverse_hessian`.
        groups_per_step (`int`, *optional*, defaults to 1): 1 is the exact greedy of the method.
            ``k > 1`` removes the k lowest-saliency groups per iteration, jointly and with the
            exact OBS update for that set (fewer iterations, slightly different choices).
        block (`int`, *optional*): lazy-update interval in removed columns (default: 128, at
            least one step). A performance knob only; results agree to rounding.
        must_remove (`torch.Tensor`, *optional*): group indices that are removed whatever their
            saliency (first, jointly, with the exact update); the greedy picks the remaining
            ``n_remove_groups - len(must_remove)`` among the others. Used to keep a stage's
            units a subset of another stage's (shared producer storage).

    Returns:
        `(weight_kept, kept_idx)`: the compensated weight restricted to the kept columns
        (out, n_kept) in `weight`'s dtype and device, and the kept column indices (sorted, int64).

    Raises:
        ValueError: on bad shapes or counts (see `inverse_hessian` for the Hessian).
    """
    out, n, m = _check(weight, n_remove_groups, group_size)
    if hessian.shape != (n, n):
        raise ValueError(f"hessian must be ({n}, {n}) for weight {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if int(groups_per_step) != groups_per_step or groups_per_step < 1:
        raise ValueError(f"groups_per_step must be a positive integer, got {groups_per_step}")
    if int(n_remove_groups) == 0:
        _check_forced(must_remove, n_remove_groups, m, weight.device)
        return weight.detach().clone(), torch.arange(n, device=weight.device)
    Hinv = inverse_hessian(hessian.to(weight.device), damp=damp)
    weights, kept_idx = prune_columns_joint([weight], [Hinv], n_remove_groups, group_size,
                                            groups_per_step=groups_per_step, block=block, must_remove=must_remove)
    return weights[0], kept_idx


def prune_columns_joint(weights: list[torch.Tensor], hinvs: list[torch.Tensor], n_remove_groups: int,
                        group_size: int, groups_per_step: int = 1, block: int | None = None,
                        must_remove: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Greedy structured OBS on several layers that read the same column groups (joint attention's
    ``to_out[0]`` and ``to_add_out`` read the same heads): a group's cost is the sum of its
    saliencies in every layer, and each layer is compensated with its own inverse Hessian.

    Args:
        weights (`list[torch.Tensor]`): (out_i, n) weights, one per layer.
        hinvs (`list[torch.Tensor]`): (n, n) inverse Hessians (`inverse_hessian`), one per layer.
        n_remove_groups, group_size, groups_per_step, block, must_remove: as in `prune_columns`.

    Returns:
        `(weights_kept, kept_idx)`: each layer's compensated weight on the kept columns (in its
        dtype and device) and the kept column indices (sorted, int64).
    """
    if not weights or len(weights) != len(hinvs):
        raise ValueError(f"prune_columns_joint needs one inverse Hessian per weight, got {len(weights)} weights "
                         f"and {len(hinvs)} inverse Hessians")
    out, n, m = _check(weights[0], n_remove_groups, group_size)
    for w, hi in zip(weights, hinvs):
        if w.dim() != 2 or w.shape[1] != n or hi.shape != (n, n):
            raise ValueError(f"every weight must be (out, {n}) with a ({n}, {n}) inverse Hessian, got "
                             f"{tuple(w.shape)} and {tuple(hi.shape)}")
    if int(groups_per_step) != groups_per_step or groups_per_step < 1:
        raise ValueError(f"groups_per_step must be a positive integer, got {groups_per_step}")
    n_remove_groups, g = int(n_remove_groups), int(group_size)
    device = weights[0].device
    forced = _check_forced(must_remove, n_remove_groups, m, device)
    if n_remove_groups == 0:
        return [w.detach().clone() for w in weights], torch.arange(n, device=device)
    step_cols = int(groups_per_step) * g
    block = max(int(block) if block is not None else 128, step_cols)
    engines = [_LazyOBS(w.detach().to(torch.float64).clone(), hi.to(device, torch.float64), g, block=block,
                        cap=block + step_cols) for w, hi in zip(weights, hinvs)]
    one_thread = 1 if device.type == "cpu" else None

    def step(pick: torch.Tensor) -> None:
        for engine in engines:
            engine.step(pick)

    # 1. The forced groups, in chunks that fit the accumulators (no flush has run: the base
    # group indices are still the original ones).
    removed = 0
    with _cpu_threads(one_thread):
        while removed < forced.numel():
            if engines[0].r >= block:
                for engine in engines:
                    engine.flush(compact=False)
            k = min(forced.numel() - removed, max(int(groups_per_step), (block - engines[0].r) // g))
            step(forced[removed:removed + k])
            removed += k
    # 2. The greedy removals.
    while removed < n_remove_groups:
        # The steps are many small O(n * block) ops: on a CPU, intra-op threading only adds
        # synchronization latency to them (severe on a loaded machine), so they run on one
        # thread; the flush GEMMs use all threads.
        with _cpu_threads(one_thread):
            while removed < n_remove_groups and engines[0].r < block:
                k = min(int(groups_per_step), n_remove_groups - removed)
                sal = engines[0].saliency()
                for engine in engines[1:]:
                    sal = sal + engine.saliency()
                pick = sal.argmin().reshape(1) if k == 1 else torch.topk(sal, k, largest=False).indices.sort().values
                step(pick)
                removed += k
        compact = None
        for engine in engines:  # compact together: the engines' base group indices must stay equal
            compact = engine.flush(compact)
    results = [engine.result() for engine in engines]
    kept_idx = results[0][1].clone()
    return [w.to(orig.dtype).contiguous() for (w, _), orig in zip(results, weights)], kept_idx


def magnitude_prune_columns(weight: torch.Tensor, n_remove_groups: int, group_size: int,
                            must_remove: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops the column groups of least L2 norm, without compensation (magnitude baseline).

    `must_remove` groups are dropped first (as in `prune_columns`), the rest by norm.

    Returns:
        `(weight_kept, kept_idx)` as in `prune_columns`.
    """
    out, n, m = _check(weight, n_remove_groups, group_size)
    forced = _check_forced(must_remove, n_remove_groups, m, weight.device)
    norms = weight.detach().to(torch.float64).view(out, m, int(group_size)).pow(2).sum((0, 2))
    norms[forced] = -math.inf  # least of all: always in the dropped set
    drop = torch.topk(norms, int(n_remove_groups), largest=False).indices
    return _keep_all_but(weight, drop, m, int(group_size))


def random_prune_columns(weight: torch.Tensor, n_remove_groups: int, group_size: int,
                         generator: torch.Generator | None = None,
                         must_remove: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops uniformly random column groups, without compensation (random baseline).

    `must_remove` groups are dropped first (as in `prune_columns`), the rest at random.

    Returns:
        `(weight_kept, kept_idx)` as in `prune_columns`.
    """
    out, n, m = _check(weight, n_remove_groups, group_size)
    forced = _check_forced(must_remove, n_remove_groups, m, "cpu")
    order = torch.randperm(m, generator=generator)
    free = order[~torch.isin(order, forced)]  # the random order of the groups not forced out
    drop = torch.cat([forced, free[: int(n_remove_groups) - forced.numel()]]).to(weight.device)
    return _keep_all_but(weight, drop, m, int(group_size))


def _keep_all_but(weight: torch.Tensor, drop_groups: torch.Tensor, m: int, g: int):
    keep = torch.ones(m, dtype=torch.bool, device=weight.device)
    keep[drop_groups] = False
    cols = _group_cols(keep.nonzero().reshape(-1), g)
    return weight.detach()[:, cols].clone(), cols
