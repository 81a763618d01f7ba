"""Sample quality of the embedded digits MMDiT, recorded in its ``training.json``.

Draws ``--per-class`` samples of each digit (Euler, ``--steps`` steps on `digits_mmdit_scheduler`,
one forward per step: no guidance) and measures the shipped classifier's accuracy on the requested
digits and the FID to the 1797 real digits (`mosaicdiff.eval.quality`). A script, not part of the
trainer, because the zoo may not import the evaluation layer::

    OMP_NUM_THREADS=2 python scripts/digits_mmdit_quality.py            # 200 samples, 28 steps, seed 0
    python scripts/digits_mmdit_quality.py --no-write                    # print only
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mosaicdiff.core.atomic_io import write_json_atomic
from mosaicdiff.eval import quality
from mosaicdiff.zoo import DIGITS_MMDIT_DIR, load_digits_mmdit, load_digits_mmdit_conditioning
from mosaicdiff.zoo.data import NUM_CLASSES
from mosaicdiff.zoo.train_mmdit import sample


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print the numbers, leave training.json as it is")
    args = p.parse_args(argv)
    if args.per_class < 1 or args.steps < 1:
        p.error(f"--per-class and --steps must be >= 1, got {args.per_class} and {args.steps}")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    t0 = time.time()
    images = sample(load_digits_mmdit(), load_digits_mmdit_conditioning(labels), len(labels), args.steps,
                    torch.Generator().manual_seed(args.seed))
    record = {"num_samples": len(labels), "seed": args.seed, "guidance": "none (one forward per step)",
              "sampler": f"Euler, FlowMatchEulerDiscreteScheduler(shift=1.0), {args.steps} steps",
              "class_accuracy": quality.class_accuracy(images, labels), "fid_to_real": quality.fid_to_real(images),
              "seconds": round(time.time() - t0, 1)}
    print(json.dumps(record, indent=2))
    if not args.no_write:
        path = DIGITS_MMDIT_DIR / "training.json"
        info = json.loads(path.read_text())
        info[f"samples_{len(labels)}"] = record
        write_json_atomic(path, info, indent=2)
    return record


if __name__ == "__main__":
    main()
