"""Could the K stages of `method="stepwise"` share their compensated consumers? (issue 24)

A nested stepwise mosaic stores its producers once, but every stage keeps its own OBS-compensated
consumers (attention out-projection, fc2), which is what makes its memory grow with K (2.3x dense
at K = 10 on the digits DiT). This script measures what sharing them would cost in quality, before
any engine support is built: per block and consumer, one matrix ``W'`` over the union of the kept
units of a group of stages, compensated jointly,

    min_W' sum_s w_s tr((W - W'_s) H_s (W - W'_s)^T),   W'_s = W' on stage s's kept columns,

(``W`` the dense consumer, ``H_s`` stage s's input Hessian of that consumer, ``w_s`` its sampler
steps over the Hessian's mean diagonal, or its steps alone): a linear least-squares problem with
normal equations ``sum_s w_s P_s H_s[K_s, K_s] P_s^T W'^T = sum_s w_s P_s H_s[K_s, :] W^T``. Each
stage of the group then reads its columns of ``W'``. Variants: all K stages share one matrix, or
contiguous groups of stages do (3 groups, 2 groups); against the stepwise mosaic itself (own
consumers) and the three closed-form stages, all sampled from the same noise.

The stages' Hessians are the ones the stepwise pruning collects (captured by wrapping
`mosaicdiff.method.pruning.collect_hessians` for the duration of the prune), so the shared
consumers are fitted on exactly the calibration inputs the own ones were. The digits DiT only
(its two consumer groups, ``proj`` and ``fc2``). The report is written atomically at the end:

    OMP_NUM_THREADS=1 python scripts/compare_shared_consumers.py --sparsity 0.3 \\
        --out docs/data/shared_consumers_dit_0.3.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Iterator, Sequence

import torch

import mosaicdiff.method.pruning as pruning
from mosaicdiff.core.adapter import hessian_keys
from mosaicdiff.core.atomic_io import json_safe, write_json_atomic
from mosaicdiff.eval import measure
from mosaicdiff.families import family_for

from _digits_run import paired_difference, prepare_run_from_args, run_options, summary_line

#: The DiT block's consumer groups: (kept-unit field, consumer weight field) of a compact block.
GROUP_FIELDS = {"proj": ("kept_heads", "proj_weight"), "fc2": ("kept_channels", "fc2_weight")}


@contextlib.contextmanager
def captured_hessians(ranges: list) -> Iterator[dict[int, list]]:
    """Every stage's Hessians as the pruning collects them, keyed by the stage whose t range holds
    the calibration timesteps (`ranges` is filled with the mosaic's stage ranges afterwards)."""
    calls, original = [], pruning.collect_hessians

    def collect(model, x_t, t, condition, **kw):
        out = original(model, x_t, t, condition, **kw)
        calls.append((int(t.min()), int(t.max()), [{k: v.clone() for k, v in h.items()} for h in out]))
        return out

    by_stage: dict[int, list] = {}
    pruning.collect_hessians = collect
    try:
        yield by_stage
    finally:
        pruning.collect_hessians = original
    for tmin, tmax, hessians in calls:
        stage = next(i for i, (_, a, b, _) in enumerate(ranges) if a <= tmin and tmax < b)
        by_stage[stage] = hessians


def low_rank_correction(delta: torch.Tensor, hessian: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-`rank` matrix ``D`` closest to `delta` in the stage's output error
    ``tr((delta - D) H (delta - D)^T)``: the truncated SVD of ``delta L`` (``H = L L^T``), mapped back."""
    H = hessian + 1e-6 * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    L = torch.linalg.cholesky(H)
    U, S, Vh = torch.linalg.svd(delta @ L, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    return torch.linalg.solve_triangular(L, best, upper=False, left=False)  # best @ L^-1


def share_consumers(mosaic, dense_blocks, adapter, hessians: dict[int, list], stage_groups: Sequence[Sequence[int]],
                    weighting: str, rank: int = 0):
    """A copy of `mosaic` whose stages in each of `stage_groups` read one jointly compensated
    consumer, plus (``rank > 0``) each its own rank-`rank` correction towards its own compensated
    consumer; and the parameters those corrections add (``rank * (rows + columns)`` each)."""
    model, extra = copy.deepcopy(mosaic), 0
    steps = mosaic.meta["steps_per_stage"]
    for i, dense_block in enumerate(dense_blocks):
        groups = adapter.groups(dense_block)
        for name, (kept_field, weight_field) in GROUP_FIELDS.items():
            group = groups[name]
            key, u = hessian_keys(name, group)[0], int(group.unit_size)
            W = group.consumer.weight.detach().double()
            for stages in stage_groups:
                stages = [s for s in stages if s in hessians]
                if len(stages) < 2:
                    continue
                cols = {}
                for s in stages:
                    units = getattr(model.stage_blocks[s][i], kept_field).long()
                    cols[s] = (units[:, None] * u + torch.arange(u)[None, :]).reshape(-1)
                union = max(cols.values(), key=len)
                if not all(torch.isin(c, union).all() for c in cols.values()):
                    raise ValueError("the stages' kept sets are not nested")
                where = {int(c): j for j, c in enumerate(union)}
                pos = {s: torch.tensor([where[int(c)] for c in cols[s]]) for s in stages}
                A = torch.zeros(len(union), len(union), dtype=torch.float64)
                B = torch.zeros(len(union), W.shape[0], dtype=torch.float64)
                for s in stages:
                    H, c, p = hessians[s][i][key].double(), cols[s], pos[s]
                    w = steps[mosaic.stage_names[s]] / (float(H.diagonal().mean()) if weighting == "unit" else 1.0)
                    A[p[:, None], p[None, :]] += w * H[c][:, c]
                    B[p] += w * H[c] @ W.T
                A += 1e-6 * A.diagonal().mean() * torch.eye(len(union), dtype=torch.float64)  # dead columns
                shared = torch.linalg.solve(A, B).T  # (C, |union|)
                for s in stages:
                    weight = getattr(model.stage_blocks[s][i], weight_field)
                    mine = shared[:, pos[s]]
                    if rank > 0:  # towards the stage's own compensated consumer (the weight before)
                        c = cols[s]
                        mine = mine + low_rank_correction(weight.detach().double() - mine,
                                                          hessians[s][i][key].double()[c][:, c], rank)
                        extra += rank * sum(mine.shape)
                    weight.data.copy_(mine.to(weight.dtype))
    return model, extra


def contiguous_groups(k: int, n: int) -> list[list[int]]:
    """`n` runs of consecutive stage indices (sampling order), sizes differing by at most one."""
    return [r.tolist() for r in torch.arange(k).tensor_split(n) if len(r)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[run_options(num_samples=200)])
    p.add_argument("--sparsity", type=float, default=0.3, help="the mean sparsity")
    p.add_argument("--ranks", type=int, nargs="*", default=[8, 32],
                   help="ranks of the per-stage corrections on one shared consumer")
    args = p.parse_args(argv)
    started = time.perf_counter()
    run = prepare_run_from_args(args)
    ranges: list = []
    with captured_hessians(ranges) as hessians:
        mosaic, prune_s = run.prune("stepwise", args.sparsity)
        ranges.extend(mosaic.stage_ranges)
    adapter = family_for(run.dense).adapter
    dense_blocks, k = adapter.blocks(run.dense), mosaic.num_stages
    report_memory = mosaic.memory_report()
    stage_bytes = [v["bytes"] for v in report_memory["stages"].values()]
    dense_bytes = report_memory["mosaic_bytes"] / report_memory["ratio"]
    element = next(p for p in mosaic.parameters() if p.is_floating_point()).element_size()

    def memory(groups, extra_params) -> float:
        """Estimated ratio: the stepwise mosaic with per group the widest stage's consumer bytes."""
        kept = sum(max(stage_bytes[s] for s in g) for g in groups)
        return (report_memory["mosaic_bytes"] - sum(stage_bytes) + kept + extra_params * element) / dense_bytes

    variants = {"stepwise, own consumers": (mosaic, report_memory["ratio"])}
    plans = [("one shared consumer (unit)", [list(range(k))], "unit", 0),
             ("one shared consumer (steps)", [list(range(k))], "steps", 0),
             ("3 consumer groups (unit)", contiguous_groups(k, 3), "unit", 0),
             ("2 consumer groups (unit)", contiguous_groups(k, 2), "unit", 0)]
    plans += [(f"one shared consumer + rank {r} per stage", [list(range(k))], "unit", r) for r in args.ranks]
    for name, groups, weighting, rank in plans:
        model, extra = share_consumers(mosaic, dense_blocks, adapter, hessians, groups, weighting, rank)
        variants[name] = (model, memory(groups, extra))
    three, _ = run.prune("mosaic", args.sparsity)
    variants["three stages"] = (three, three.memory_report()["ratio"])
    g = run.subject.guidance_scale
    dense_images, _ = run.sample(run.dense, g)
    measured, report = {}, {"model": "digits-dit", "sparsity": args.sparsity, "steps": args.steps,
                            "num_samples": args.num_samples, "seed": args.seed, "prune_seconds": round(prune_s, 1),
                            "stage_sparsities": [r[3] for r in mosaic.stage_ranges],
                            "stage_bytes": dict(zip(mosaic.stage_names, stage_bytes)),
                            "models": {}, "differences": {}}
    for name, (model, ratio) in variants.items():
        images, _ = run.sample(model, g)
        measured[name] = measure.measure(images, run.labels, dense_images, run.per_seed)
        report["models"][name] = {"memory_ratio": round(ratio, 3), **measured[name].summary()}
        print(f"{name}: {summary_line(report['models'][name])}", flush=True)
    for base in ("stepwise, own consumers", "three stages"):
        for name in variants:
            if name != base:
                report["differences"][f"{name} - {base}"] = paired_difference(measured, name, base)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(args.out, json_safe(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
