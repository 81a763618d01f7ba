"""Parameter memory of an SDXL-config MosaicUNet (random config, no weights touched) vs the dense U-Net.

The dense U-Net is built on the meta device; the mosaic's skeleton and compact blocks are allocated
but never written (their pages stay untouched), so this runs in seconds and ~1 GB on a CPU.

    python scripts/sdxl_memory.py --sparsity 0.3
"""

import argparse
import time

import torch
from diffusers import UNet2DConditionModel
from mosaicdiff.integrations.diffusers_unet import UNET, transformer_blocks
from mosaicdiff.integrations.schedulers import scheduler_alphas_cumprod, sampler_timesteps
from mosaicdiff.stage_plan import plan_stages
from mosaicdiff.mosaic_unet import MosaicUNet
from mosaicdiff import compact
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--sparsity", type=float, default=0.3)
args = p.parse_args()
t0 = time.time()
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            use_linear_projection=True)
with torch.device("meta"):
    unet = UNet2DConditionModel(**SDXL)
dense = sum(p.numel() for p in unet.parameters())
blocks = transformer_blocks(unet)
print("dense params", dense/1e9, "blocks", len(blocks), "block params", sum(p.numel() for b in blocks for p in b.parameters())/1e9, time.time()-t0)
sched = UNET.default_scheduler()
planned, info = plan_stages(args.sparsity, method="mosaic", boundaries=None, stage_sparsities=None, alphas_cumprod=scheduler_alphas_cumprod(sched), timesteps=sampler_timesteps(50, sched), speed_threshold=0.55, log_snr_weight=0.0, x0_sq_norm=1.0, s_max=None)
print(planned)
stages = []
for name, a, b, sp in planned:
    bl = []
    for blk in blocks:
        g = UNET.groups(blk)
        k1 = g["attn1"].num_units - compact.units_to_remove(g["attn1"], sp)
        k2 = g["attn2"].num_units - compact.units_to_remove(g["attn2"], sp)
        kf = g["ff"].num_units - compact.units_to_remove(g["ff"], sp, 64)
        bl.append({"kept_heads1": list(range(k1)), "kept_heads2": list(range(k2)), "kept_channels": list(range(kf))})
    stages.append({"name": name, "t_start": a, "t_end": b, "sparsity": sp, "blocks": bl})
cfg = {k: v for k, v in dict(unet.config).items()}
m = MosaicUNet(cfg, stages, dense_reference={"params": dense})
r = m.memory_report()
print({k: (v if not isinstance(v, int) else v/1e9) for k, v in r.items()}, time.time()-t0)
