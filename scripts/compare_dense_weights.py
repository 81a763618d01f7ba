"""Compare dense digits-DiT weights with intervals: which weights to ship (issue 13, item 3).

Every weights folder is sampled the way the demo samples its dense model (DDIM-50, classifier-free
guidance, balanced labels) from the same noise (``--num-seeds`` seeds from ``--seed``), scored by
`mosaicdiff.eval.measure` and compared with the baseline (default: the shipped weights) by paired
differences with 95% bootstrap intervals. A row of real digits at the same image count is the
floor of FID and pixel W1.

Pick the winner on one set of seeds and confirm it on fresh ones: a candidate chosen among several
on the same images its interval is computed on looks better than it is::

    python scripts/compare_dense_weights.py --out runs/dense_select --seed 0 a=runs/dit_ft_a b=runs/dit_ft_b
    python scripts/compare_dense_weights.py --out runs/dense_confirm --seed 100 b=runs/dit_ft_b \
        b-ema=runs/dit_ft_b_ema --pair b-ema:b

Each folder is a diffusers `DiTTransformer2DModel` (`zoo.train_dit` writes one; `--export-only
--export ema --export-dir DIR` writes a run's EMA weights as another).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mosaicdiff import zoo
from mosaicdiff.core.atomic_io import json_safe
from mosaicdiff.app import experiment
from mosaicdiff.eval import measure


def named_folder(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    if not (Path(folder) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{folder}: not a saved model folder (no config.json)")
    return name, Path(folder)


def pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"expected A:B (the difference A - B), got {text!r}")
    return a, b


def load(folder: Path):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(str(folder), local_files_only=True).eval()


def training_record(folder: Path) -> dict:
    path = folder / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates", nargs="+", type=named_folder, metavar="NAME=FOLDER")
    p.add_argument("--baseline", type=Path, default=zoo.DIGITS_DIT_DIR, help="default: the shipped weights")
    p.add_argument("--guidance", type=float, default=experiment.DEFAULT_GUIDANCE)
    p.add_argument("--num-samples", type=int, default=experiment.DEFAULT_NUM_SAMPLES, help="images per seed")
    p.add_argument("--num-seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="first noise seed")
    p.add_argument("--steps", type=int, default=experiment.DEFAULT_STEPS)
    p.add_argument("--pair", type=pair, action="append", default=[], metavar="A:B",
                   help="also report the paired difference A - B of two named models (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    names = [name for name, _ in args.candidates]
    if "baseline" in names or len(set(names)) != len(names):
        p.error(f"candidate names must be unique and not 'baseline': {names}")
    unknown = sorted({n for ab in args.pair for n in ab} - {"baseline", *names})
    if unknown:
        p.error(f"--pair names {unknown} are not among the models {['baseline', *names]}")

    args.out.mkdir(parents=True, exist_ok=True)
    report = experiment.ReportFile(args.out / "dense_weights.json", {
        "settings": {k: json_safe(v) for k, v in vars(args).items()}, "models": {},
        "environment": experiment.environment()})
    with report.keeping_errors():
        baseline = load(args.baseline)
        run = experiment.prepare(baseline, steps=args.steps, seed=args.seed, num_samples=args.num_samples,
                                 samples_per_stage=experiment.DEFAULT_SAMPLES_PER_STAGE, boundaries=None,
                                 speed_threshold=0.55, log_snr_weight=0.0, progress=True, num_seeds=args.num_seeds)
        real = experiment.real_reference_images(len(run.labels), args.seed)
        real_measured = measure.measure(real, run.labels, None, run.per_seed).summary()
        # real digits carry their own labels: the accuracy against the sampled labels means nothing
        report.data["real_digits"] = {k: v for k, v in real_measured.items() if k != "class_accuracy"}
        measured = {}
        for name, folder in [("baseline", args.baseline), *args.candidates]:
            model = baseline if name == "baseline" else load(folder)
            images, seconds = run.sample(model, args.guidance)
            measured[name] = measure.measure(images, run.labels, None, run.per_seed)
            entry = {"folder": str(folder), "training": training_record(folder), **measured[name].summary(),
                     "seconds_per_image": seconds}
            if name != "baseline":
                entry["minus_baseline"] = measure.difference(measured[name], measured["baseline"])
                print(f"{name} - baseline: {measure.format_difference(entry['minus_baseline'])}")
            report.data["models"][name] = entry
            report.save()
        report.data["pairs"] = {}
        for a, b in args.pair:
            report.data["pairs"][f"{a} - {b}"] = measure.difference(measured[a], measured[b])
            print(f"{a} - {b}: {measure.format_difference(report.data['pairs'][f'{a} - {b}'])}")
            report.save()
    print(f"wrote {report.path}")


if __name__ == "__main__":
    main()
