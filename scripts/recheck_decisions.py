"""Re-check, with intervals, two demo decisions first taken on single runs (issue 13).

1. The allocation cap ``s_max = target + 0.1`` (`mosaicdiff.method.stage_plan.default_s_max`) against the
   uncapped allocation (``s_max = 0.9``), MosaicDiff at mean sparsity 0.5.
2. Guidance 1.5 (`DEFAULT_GUIDANCE`) against 3.0 (or each `--other-guidance`) for the dense model.

Each pair is sampled from the same noise and labels (``--num-seeds`` seeds of ``--num-samples``
images) and compared with the paired differences of `mosaicdiff.eval.measure` (95% intervals).

    python scripts/recheck_decisions.py --out runs/recheck    # about 10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mosaicdiff.core.atomic_io import write_json_atomic
from mosaicdiff import api
from mosaicdiff.app import experiment
from mosaicdiff.eval import measure

from _digits_run import prepare_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=experiment.DEFAULT_NUM_SAMPLES)
    p.add_argument("--num-seeds", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--other-guidance", type=float, action="append", default=None,
                   help="guidance scales compared with the default (repeatable; default 3.0)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    others = args.other_guidance or [3.0]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = prepare_run(num_samples=args.num_samples, num_seeds=args.num_seeds)  # the demo's steps and calibration
    report: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    def save():
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(args.out / "recheck.json", json.loads(json.dumps(report)))

    g = experiment.DEFAULT_GUIDANCE
    dense, _ = run.sample(run.dense, g)
    m_default = measure.measure(dense, run.labels, None, run.per_seed)
    report["guidance"] = {f"{g}": m_default.summary()}
    for other in others:
        m_other = measure.measure(run.sample(run.dense, other)[0], run.labels, None, run.per_seed)
        report["guidance"][f"{other}"] = m_other.summary()
        report["guidance"][f"{g} - {other}"] = measure.difference(m_default, m_other)
        save()

    measured = {}
    for name, s_max in (("capped", None), ("uncapped", 0.9)):
        mosaic = api.prune(run.dense, run.calibration, args.sparsity, boundaries=run.boundaries,
                               num_inference_steps=run.steps, scheduler=run.subject.scheduler(),
                               samples_per_stage=run.samples_per_stage, seed=run.seed, progress=False, s_max=s_max)
        images, _ = run.sample(mosaic, g)
        measured[name] = measure.measure(images, run.labels, dense, run.per_seed)
        report[name] = {**measured[name].summary(), "stages": experiment.stage_info(mosaic)}
        save()
    report["capped - uncapped"] = measure.difference(measured["capped"], measured["uncapped"])
    save()
    for other in others:
        print(f"{g} - {other}: {measure.format_difference(report['guidance'][f'{g} - {other}'])}")
    print(f"capped - uncapped: {measure.format_difference(report['capped - uncapped'])}")


if __name__ == "__main__":
    main()
