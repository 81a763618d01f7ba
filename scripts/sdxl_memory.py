"""Parameter memory of an SDXL-config MosaicUNet (random config, no weights touched) vs the dense U-Net,
with shared producer storage (the default of ``mosaicdiff.prune``) and with a copy per stage.

The dense U-Net is built on the meta device; the mosaics' skeletons and compact blocks are
allocated but never written (their pages stay untouched), so this runs in seconds and ~1 GB on a
CPU. The stages and their kept widths are what ``mosaicdiff.prune`` plans for the target sparsity
(three stages on SDXL's schedule, the MLP width aligned to 64); the kept units are nested (each
stage keeps a prefix), as ``prune(share_producers=True)`` selects them, so one storage per block
position holds every stage's producer rows (``mosaicdiff.families.unet.producers``).

    python scripts/sdxl_memory.py --sparsity 0.3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from mosaicdiff.method import compact
from mosaicdiff.families.unet.adapter import UNET, transformer_blocks
from mosaicdiff.core.schedulers import sampler_timesteps, scheduler_alphas_cumprod
from mosaicdiff.core.weight_init import skip_weight_init
from mosaicdiff.families.unet.model import MosaicUNet
from mosaicdiff.method.stage_plan import plan_stages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sdxl_config import SDXL  # noqa: E402 - shared with the GPU suite's sdxl stage

KINDS = {"kept_heads1": "heads1", "kept_heads2": "heads2", "kept_channels": "channels"}


def planned_stages(blocks, sparsity: float) -> list[dict]:
    """`MosaicUNet` stage configs with the kept widths `prune` gives at this target (prefixes of each group)."""
    sched = UNET.default_scheduler()
    planned, _ = plan_stages(sparsity, method="mosaic", boundaries=None, stage_sparsities=None,
                             alphas_cumprod=scheduler_alphas_cumprod(sched), timesteps=sampler_timesteps(50, sched),
                             speed_threshold=0.55, log_snr_weight=0.0, x0_sq_norm=1.0, s_max=None)
    stages = []
    for name, t0, t1, sp in planned:
        kept = []
        for block in blocks:
            g = UNET.groups(block)
            widths = {key: g[group].num_units - compact.units_to_remove(g[group], sp, 64)
                      for key, group in (("kept_heads1", "attn1"), ("kept_heads2", "attn2"), ("kept_channels", "ff"))}
            kept.append({key: list(range(n)) for key, n in widths.items()})
        stages.append({"name": name, "t_start": t0, "t_end": t1, "sparsity": sp, "blocks": kept})
    return stages


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.3, help="target mean sparsity (default 0.3)")
    args = p.parse_args(argv)
    start = time.time()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL)
    dense = sum(p.numel() for p in unet.parameters())
    blocks = transformer_blocks(unet)
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    print(f"dense U-Net: {dense / 1e9:.3f} B params, {len(blocks)} transformer blocks ({block_params / 1e9:.3f} B)")
    stages = planned_stages(blocks, args.sparsity)
    for s in stages:
        print(f"  stage {s['name']:>6} [{s['t_start']}, {s['t_end']}): sparsity {s['sparsity']:.3f}")
    # the storage of a block position: the union of the stages' (prefix) kept units
    units = [{KINDS[key]: max((s["blocks"][j][key] for s in stages), key=len) for key in KINDS}
             for j in range(len(blocks))]
    cfg = dict(unet.config)
    for label, shared in (("copies per stage", None), ("shared producers", units)):
        with skip_weight_init():  # only the shapes are counted
            mosaic = MosaicUNet(cfg, stages, dense_reference={"params": dense}, shared_producers=shared)
        report = mosaic.memory_report()
        per_stage = ", ".join(f"{k} {v['params'] / 1e9:.3f}" for k, v in report["stages"].items())
        print(f"{label:>17}: {report['mosaic_params'] / 1e9:.3f} B params = {report['ratio']:.2f}x dense "
              f"(skeleton {report['shared_params'] / 1e9:.3f}, producer storage {report['producer_params'] / 1e9:.3f}, "
              f"per stage {per_stage})")
    print(f"({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
