"""Parameter memory of an SD3.5-config MosaicSD3 (nothing allocated: meta device) vs the dense transformer,
with shared producer storage (the default of ``mosaicdiff.prune``) and with a copy per stage, and against
OBS-Diff's one pruned SD3.5-Large at 30% (6.54 B parameters).

    python scripts/sd3_memory.py --model sd35-large --sparsity 0.3 0.5
"""

from __future__ import annotations

import argparse
import time

from mosaicdiff.families.sd3.configs import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM
from mosaicdiff.families.sd3.memory import OBS_DIFF_SD35_LARGE_30, memory_ratios

CONFIGS = {"sd35-large": SD35_LARGE, "sd35-medium": SD35_MEDIUM, "sd3-medium": SD3_MEDIUM}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5], help="target mean sparsities")
    p.add_argument("--model", choices=sorted(CONFIGS), default="sd35-large", help="the released transformer config")
    p.add_argument("--boundaries", type=int, nargs=2, default=None, help="(t_low, t_high) of the middle stage")
    args = p.parse_args(argv)
    start = time.time()
    for sparsity in args.sparsity:
        r = memory_ratios(CONFIGS[args.model], sparsity, boundaries=args.boundaries and tuple(args.boundaries))
        print(f"{args.model}, mean sparsity {sparsity}: dense {r['dense_params'] / 1e9:.3f} B params")
        for name, t0, t1, sp in r["stages"]:
            print(f"  stage {name:>6} [{t0}, {t1}): sparsity {sp:.3f}")
        for label in ("shared", "copies"):
            rep = r[label]
            print(f"  {label:>6}: {rep['mosaic_params'] / 1e9:.3f} B params = {rep['ratio']:.3f}x dense, "
                  f"{rep['mosaic_params'] / OBS_DIFF_SD35_LARGE_30:.3f}x OBS-Diff's 6.54 B (skeleton "
                  f"{rep['shared_params'] / 1e9:.3f} B, producer storage {rep['producer_params'] / 1e9:.3f} B)")
    print(f"({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
