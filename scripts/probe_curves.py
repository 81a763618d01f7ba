"""The stepwise probe as a curve: each window's probe error at several sparsities (issue 24).

`method="stepwise"` allocates with ``s_w = clip((L - ln c_w) / a, 0, s_max)``, which assumes
that a window's error grows as ``c_w exp(a s)`` with one rate ``a`` for every window and
sparsity. This script measures that assumption on the embedded models: per model, the sampler's
steps cut into `--num-stages` equal-step windows (`equal_step_stages`), and the magnitude probe
(`probe_errors`, the pruning's align, its held-out inputs) at each of `--sparsities`. The local
slope of ``ln c_w(s)`` between two sparsities is the rate there. Forwards only (no pruning, no
sampling): a few minutes per model on the CPU.

    OMP_NUM_THREADS=1 python scripts/probe_curves.py --models digits-dit digits-unet \\
        --out docs/data/probe_curves_dit_unet.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mosaicdiff.core.atomic_io import write_json_atomic
from mosaicdiff.families import family_for
from mosaicdiff.method import step_allocation
from mosaicdiff.method.calibrate import prepare_calibration

from _digits_run import prepare_run

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def probe_curve(model_name: str, sparsities, num_stages: int) -> dict[str, list[float]]:
    """``{sparsity: [probe error per window, high t first]}`` of one embedded model."""
    run = prepare_run(model_name)
    dense, adapter = run.dense, family_for(run.dense).adapter
    process = adapter.noise_process(dense, run.subject.scheduler(), run.calibration)
    timesteps = process.sampler_timesteps(len(run.scheduler.timesteps))
    windows = step_allocation.equal_step_stages(timesteps, num_stages, process.timestep_end)
    calibration = prepare_calibration(dense, adapter, run.calibration, cfg=False)
    curve = {}
    for s in sparsities:
        curve[f"{s:g}"] = step_allocation.probe_errors(dense, adapter, calibration, windows, s,
                                                       process=process).tolist()
        print(f"{model_name} s={s:g} ln c_w: {np.round(np.log(curve[f'{s:g}']), 2).tolist()}", flush=True)
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["digits-dit", "digits-unet"], help="embedded models")
    p.add_argument("--sparsities", nargs="+", type=float, default=list(DEFAULT_SPARSITIES),
                   help="probe sparsities, each in (0, 1)")
    p.add_argument("--num-stages", type=int, default=step_allocation.DEFAULT_NUM_STAGES, help="windows")
    p.add_argument("--out", type=Path, required=True, help="the JSON report (written atomically at the end)")
    args = p.parse_args(argv)
    if not all(0 < s < 1 for s in args.sparsities):
        p.error(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    if args.num_stages < 1:
        p.error(f"--num-stages must be >= 1, got {args.num_stages}")
    report = {name: probe_curve(name, args.sparsities, args.num_stages) for name in args.models}
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
