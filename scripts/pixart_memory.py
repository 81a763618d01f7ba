"""Parameter memory of a PixArt-Sigma-config MosaicPixArt (nothing allocated: meta device) vs the dense
transformer, with shared producer storage (the default of ``mosaicdiff.prune``) and with a copy per stage.

    python scripts/pixart_memory.py --sparsity 0.3 0.5
"""

from __future__ import annotations

import argparse
import time

from mosaicdiff.families.pixart.configs import PIXART_ALPHA_1024, PIXART_SIGMA_1024
from mosaicdiff.families.pixart.memory import memory_ratios


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5], help="target mean sparsities")
    p.add_argument("--model", choices=("sigma", "alpha"), default="sigma", help="PixArt-Sigma or -alpha 1024")
    args = p.parse_args(argv)
    start = time.time()
    config = PIXART_SIGMA_1024 if args.model == "sigma" else PIXART_ALPHA_1024
    for sparsity in args.sparsity:
        r = memory_ratios(config, sparsity)
        print(f"PixArt-{args.model} 1024, mean sparsity {sparsity}: dense {r['dense_params'] / 1e6:.1f} M params")
        for name, t0, t1, sp in r["stages"]:
            print(f"  stage {name:>6} [{t0}, {t1}): sparsity {sp:.3f}")
        for label in ("shared", "copies"):
            rep = r[label]
            print(f"  {label:>6}: {rep['mosaic_params'] / 1e6:.1f} M params = {rep['ratio']:.3f}x dense (skeleton "
                  f"{rep['shared_params'] / 1e6:.1f} M, producer storage {rep['producer_params'] / 1e6:.1f} M)")
    print(f"({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
