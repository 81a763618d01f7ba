"""Scale check: prune a DiT-XL/2-size model (random weights, fp32) for three stages on the CPU.

Reports the wall time of each phase (model build, per-stage calibration pass, per-block OBS,
MosaicDiT assembly) and the peak resident memory, and writes them as JSON. Not a test: it takes
tens of minutes on a 2-core machine. Run it under ``/usr/bin/time -v`` for an independent peak
RSS figure::

    PYTHONPATH=python:. /usr/bin/time -v python scripts/scale_check.py --out out/scale_check.json

Options shrink it (``--layers 2``) for a quick try, or time only one DiT-XL/2 fc2 layer
(``--fc2-only``: 4608 inputs, 2304 channels removed by exact greedy OBS).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import resource
import sys
import time

import torch

logger = logging.getLogger("scale_check")

XL_CONFIG = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                 sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class Timer:
    """Accumulates wall time of wrapped calls under a name."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.totals[name] = self.totals.get(name, 0.0) + dt
                self.counts[name] = self.counts.get(name, 0) + 1
                logger.info("%s #%d: %.1f s (peak RSS %.2f GiB)", name, self.counts[name], dt, peak_rss_gib())
        return inner


def fc2_only(args) -> dict:
    """Times exact greedy OBS on one DiT-XL/2-size fc2 (1152 x 4608, remove 2304 channels)."""
    from mosaicdiff.method import obs

    torch.manual_seed(0)
    n, out = 4608, 1152
    tokens = args.tokens
    t0 = time.perf_counter()
    X = torch.nn.functional.gelu(torch.randn(tokens, 1152) @ (torch.randn(1152, n) / 34)).double()
    H = X.T @ X / tokens
    del X
    W = torch.randn(out, n) / 68
    t_h = time.perf_counter() - t0
    t0 = time.perf_counter()
    obs.inverse_hessian(H)
    t_inv = time.perf_counter() - t0
    t0 = time.perf_counter()
    obs.prune_columns(W, H, n // 2, 1, groups_per_step=args.groups_per_step)
    t_prune = time.perf_counter() - t0
    return {"mode": "fc2-only", "tokens": tokens, "hessian_build_s": t_h, "inverse_hessian_s": t_inv,
            "prune_columns_s (incl. inverse)": t_prune, "groups_per_step": args.groups_per_step}


def full(args) -> dict:
    from diffusers import DiTTransformer2DModel

    import mosaicdiff.api as api_mod
    import mosaicdiff.method.pruning as prune_mod
    from mosaicdiff.method import compact
    from mosaicdiff.method.calibrate import Calibration

    timer = Timer()
    prune_mod.collect_hessians = timer.wrap("collect_hessians (one stage)", prune_mod.collect_hessians)
    compact.prune_groups = timer.wrap("prune_groups (one block)", compact.prune_groups)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = dict(XL_CONFIG, num_layers=args.layers)
    model = DiTTransformer2DModel(**cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    t_build = time.perf_counter() - t0
    logger.info("built %s (%d layers, %.1fM params) in %.1f s, peak RSS %.2f GiB", type(model).__name__,
                args.layers, n_params / 1e6, t_build, peak_rss_gib())

    g = torch.Generator().manual_seed(0)
    calib = Calibration(torch.randn(args.calib_size, 4, 32, 32, generator=g),
                        torch.randint(0, 1000, (args.calib_size,), generator=g), null_class=1000)
    t0 = time.perf_counter()
    mosaic = api_mod.prune(model, calib, args.sparsity, samples_per_stage=args.samples_per_stage,
                             batch_size=args.batch_size, groups_per_step=args.groups_per_step, progress=False)
    t_prune = time.perf_counter() - t0
    return {
        "mode": "full",
        "config": cfg,
        "params_M": n_params / 1e6,
        "target_sparsity": args.sparsity,
        "samples_per_stage": args.samples_per_stage,
        "cfg_duplicated_inputs_per_stage": 2 * args.samples_per_stage,
        "groups_per_step": args.groups_per_step,
        "build_s": t_build,
        "prune_total_s": t_prune,
        "phase_totals_s": timer.totals,
        "phase_counts": timer.counts,
        "boundaries": mosaic.meta.get("boundaries"),
        "stage_sparsities": mosaic.meta.get("stage_sparsities"),
        "stage_widths": mosaic.meta.get("stage_widths"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--samples-per-stage", type=int, default=4)
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--groups-per-step", type=int, default=1)
    p.add_argument("--fc2-only", action="store_true")
    p.add_argument("--tokens", type=int, default=2048, help="--fc2-only: calibration tokens of the fake Hessian")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    result = fc2_only(args) if args.fc2_only else full(args)
    result.update(wall_s=time.perf_counter() - t0, peak_rss_gib=peak_rss_gib(), torch=torch.__version__,
                  threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  machine=platform.processor() or platform.machine(),
                  load_avg_at_end=os.getloadavg())
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
