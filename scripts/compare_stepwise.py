"""Three stages vs K probed stages vs the searched schedule, on one embedded model (issue 24, item 3).

At each mean sparsity, on the demo's setup (DDIM-50, the subject's guidance, `--num-samples`
images of each `--seeds` noise, pooled), side by side in one run:

- ``mosaic``: the paper's three closed-form stages (`Experiment.prune("mosaic", s)`);
- ``stepwise``: ``method="stepwise"`` with shared (nested) producers, the default;
- ``stepwise-copies``: the same with a producer copy per stage (``share_producers=False``): what
  the nesting costs;
- ``stepwise-kK`` (``--stepwise-stages K ...``): the nested stepwise mosaic with ``K`` stages
  instead of ten: whether the probed curve pays without ten stages' consumers;
- ``searched``: the searched ten-stage schedule. ``--searched run`` searches here
  (`mosaicdiff.app.searched`, minutes per sparsity); ``--searched FILE`` re-prunes the per-stage
  sparsities a stored search found (its ``searches`` entry, as `scripts/compare_schedule_search.py`
  and a ``--searched run`` of this script write) with that search's calibration settings, so the
  model is the searched one without searching again (its pruning time is then the stored search's
  ``seconds``).

Reported per model: FID, class accuracy, PSNR and SSIM to dense with 95% intervals, memory ratio
and pruning seconds; paired differences stepwise - each other. The JSON is rewritten atomically
after every model:

    OMP_NUM_THREADS=1 python scripts/compare_stepwise.py --model digits-dit --sparsities 0.3 0.5 \\
        --searched docs/data/schedule_search_stronger_dit.json --out docs/data/stepwise_dit.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mosaicdiff.app import experiment
from mosaicdiff.app.searched import searched_mosaic
from mosaicdiff.app.subjects import SUBJECTS
from mosaicdiff.core.atomic_io import json_safe, write_json_atomic
from mosaicdiff.eval import measure
from mosaicdiff.families import family_for
from mosaicdiff.search.cache import StagePruneCache
from mosaicdiff.search.search import uniform_stages

from _digits_run import prepare_run, summary_line

METHODS = ("mosaic", "stepwise", "stepwise-copies", "searched")


def stored_searched(run, path: Path, sparsity: float):
    """The mosaic of a stored search's best sparsities at `sparsity`, re-pruned with its settings."""
    log = json.loads(path.read_text())["searches"][f"{sparsity:g}"]
    stages = [tuple(s) for s in log["stages"]] if "stages" in log else uniform_stages(log["num_stages"])
    cache = StagePruneCache(run.dense, run.calibration, stages, samples_per_stage=log["samples_per_stage"],
                            cfg=log["cfg"], seed=log["seed"], align=log["align"],
                            groups_per_step=log["groups_per_step"], alphas_cumprod=run.subject.scheduler())
    specs = [cache.stage_spec(i, s) for i, s in enumerate(log["stage_sparsities"])]
    model = family_for(run.dense).mosaic_class.from_dense(run.dense, specs, share_producers=None,
                                                          meta={"method": "searched", "mean_sparsity": log["mean_sparsity"]})
    return model, float(log["seconds"])


def build(run, method: str, sparsity: float, searched: str, searches: dict,
          stepwise: dict | None = None) -> tuple[object, float]:
    """The model `method` at `sparsity` and its pruning seconds; a search run here adds its log to
    `searches` (the report's ``searches``: the report can then be a later run's ``--searched FILE``);
    `stepwise`: more `mosaicdiff.prune` options of the stepwise models (``s_max``)."""
    if method == "searched" and searched != "run":
        return stored_searched(run, Path(searched), sparsity)
    if method == "searched":
        model, log = searched_mosaic(run, sparsity, run.subject.guidance_scale)
        searches[f"{sparsity:g}"] = log
        return model, float(log["seconds"])
    if not method.startswith("stepwise"):
        return run.prune(method, sparsity)  # mosaic
    options = dict(stepwise or {})
    if method == "stepwise-copies":
        options["share_producers"] = False
    elif method.startswith("stepwise-k"):  # nested stepwise with fewer (or more) stages: --stepwise-stages
        options["num_stages"] = int(method.removeprefix("stepwise-k"))
    return run.prune("stepwise", sparsity, **options)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-dit", choices=sorted(SUBJECTS))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--stepwise-stages", type=int, nargs="*", default=[], metavar="K",
                   help="also the nested stepwise mosaic with K stages, as model 'stepwise-kK' (e.g. 3 4 5)")
    p.add_argument("--s-max", type=float, default=None,
                   help="the stepwise models' allocation cap (default: mosaicdiff's, 0.8)")
    p.add_argument("--searched", default="run", help="'run' (search here) or a stored search's JSON")
    p.add_argument("--seeds", type=int, default=1, help="noise seeds 0 .. seeds-1, images pooled")
    p.add_argument("--num-samples", type=int, default=experiment.DEFAULT_NUM_SAMPLES, help="images per seed")
    p.add_argument("--steps", type=int, default=experiment.DEFAULT_STEPS)
    p.add_argument("--samples-per-stage", type=int, default=experiment.DEFAULT_SAMPLES_PER_STAGE)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    run = prepare_run(args.model, steps=args.steps, seed=0, num_samples=args.num_samples,
                      samples_per_stage=args.samples_per_stage, num_seeds=args.seeds)
    subject = run.subject
    dense_images, _ = run.sample(run.dense, subject.guidance_scale)
    report = {"model": args.model, "seeds": args.seeds, "num_samples": args.num_samples, "steps": run.steps,
              "guidance_scale": subject.guidance_scale, "searched": args.searched, "s_max": args.s_max,
              "environment": experiment.environment(), "configs": {}, "differences": {}, "searches": {}}
    for sp in args.sparsities:
        measured = {}
        for method in [*args.methods, *(f"stepwise-k{k}" for k in args.stepwise_stages)]:
            model, seconds = build(run, method, sp, args.searched, report["searches"],
                                   {} if args.s_max is None else {"s_max": args.s_max})
            images, _ = run.sample(model, subject.guidance_scale)
            measured[method] = measure.measure(images, run.labels, dense_images, run.per_seed)
            report["configs"][f"{sp:g}/{method}"] = {
                **measured[method].summary(), "prune_seconds": round(seconds, 2),
                "memory_ratio": model.memory_report()["ratio"], "num_stages": model.num_stages,
                "stage_sparsities": [round(r[3], 4) for r in model.stage_ranges],
                "mean_sparsity": experiment.step_mean_sparsity(model, run.scheduler.timesteps),
                "realized_mean_sparsity": (model.meta or {}).get("realized_mean_sparsity")}
            write_json_atomic(args.out, json_safe(report), indent=2)
            c = report["configs"][f"{sp:g}/{method}"]
            print(f"{sp:g} {method:16s} {summary_line(c)}, memory {c['memory_ratio']:.2f}, "
                  f"prune {c['prune_seconds']:.1f} s", flush=True)
        leads = [m for m in measured if m.startswith("stepwise")]  # each pair once, the earlier lead first
        for i, lead in enumerate(leads):
            for other in measured:
                if other != lead and other not in leads[:i]:
                    report["differences"][f"{sp:g}/{lead} - {other}"] = measure.difference(measured[lead],
                                                                                          measured[other])
        write_json_atomic(args.out, json_safe(report), indent=2)
    for key, d in report["differences"].items():
        print(key, measure.format_difference(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
