"""Sample the trained digits U-Net (DDIM-50 + CFG over its label tokens) and score it like the DiT.

    python scripts/check_digits_unet.py --model python/mosaicdiff/zoo/digits_unet --num-samples 200

A first look at the model before it is wired into `mosaicdiff demo --model digits-unet`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mosaicdiff import quality
from mosaicdiff.zoo.data import NUM_CLASSES


@torch.no_grad()
def sample(unet, table, labels, steps=50, guidance=1.5, seed=0):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, 16, 16, generator=g)
    cond, null = table[labels], table[torch.full_like(labels, NUM_CLASSES)]
    text = torch.cat([cond, null])
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, text).sample
        e_c, e_u = eps.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return x.clamp(-1, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--grid", type=Path, default=None)
    args = p.parse_args()
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(args.model)).eval()
    table = load_file(str(args.model / "label_tokens.safetensors"))["table"]
    labels = torch.arange(args.num_samples) % NUM_CLASSES
    images = sample(unet, table, labels, guidance=args.guidance)
    out = {"fid": quality.fid_to_real(images), "class_accuracy": quality.class_accuracy(images, labels),
           "num_samples": args.num_samples, "guidance": args.guidance}
    print(json.dumps(out, indent=2))
    if args.grid:
        from mosaicdiff.plots import save_image_grid

        save_image_grid(images[:100], args.grid, nrow=10)


if __name__ == "__main__":
    main()
