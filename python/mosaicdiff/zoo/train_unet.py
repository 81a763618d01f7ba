"""Train the embedded text-conditioned U-Net on the scikit-learn digits (pixel space).

The "prompt" of a digit is its class label: a learned table of label tokens (`LabelTokens`,
``NUM_CLASSES + 1`` rows of ``TOKENS`` tokens, the last row the null prompt for classifier-free
guidance) is the U-Net's ``encoder_hidden_states``, trained with it and shipped next to the
weights (``label_tokens.safetensors``). The U-Net is a diffusers ``UNet2DConditionModel`` with
cross-attention and GEGLU feed-forwards at both resolutions and several heads per attention, so
head and channel pruning of its transformer blocks is meaningful.

Reproduce with::

    OMP_NUM_THREADS=2 python -m mosaicdiff.zoo.train_unet --out python/mosaicdiff/zoo/digits_unet

Recipe: DDPM epsilon objective on SDXL's ``scaled_linear`` betas (0.00085..0.012, T = 1000; the
U-Net family's default schedule), AdamW lr 5e-4 with cosine decay, 1500 steps of batch 64, 10% prompt dropout
to the null row, seed 0. A checkpoint every ``--save-every`` steps; ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mosaicdiff.core.atomic_io import atomic_write, write_json_atomic
from mosaicdiff.zoo.data import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors, train_test_split
from mosaicdiff.zoo.training import add_training_arguments, digits_split, held_out_eps_mse, noisy_batch

TEXT_WIDTH = 64
TOKENS = 4
MODEL_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=(4, 8), norm_num_groups=16, use_linear_projection=True,
)
TOKENS_FILE = "label_tokens.safetensors"


class LabelTokens(nn.Module):
    """The prompt table: ``(NUM_CLASSES + 1, TOKENS, TEXT_WIDTH)``, row ``NUM_CLASSES`` the null prompt."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(NUM_CLASSES + 1, TOKENS, TEXT_WIDTH) * 0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table[labels]


def build_model():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**MODEL_CONFIG)


def scaled_linear_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def held_out_loss(model, tokens, images, labels, seed: int = 1, repeats: int = 4) -> float:
    """Epsilon MSE on held-out images, averaged over fixed random (t, noise) draws."""
    model.eval()
    return held_out_eps_mse(lambda x_t, t: model(x_t, t, tokens(labels)).sample, images,
                            scaled_linear_alphas_cumprod(), seed, repeats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(p, steps=1500, batch_size=64, lr=5e-4, save_every=250)
    p.add_argument("--export-only", action="store_true", help="only export the weights of the checkpoint in --out")
    args = p.parse_args(argv)
    if args.export_only:
        export(args.out)
        return
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    x_train, y_train, _ = digits_split()
    model, tokens = build_model(), LabelTokens()
    params = list(model.parameters()) + list(tokens.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    abar = scaled_linear_alphas_cumprod()
    ckpt = args.out / "train_state.pt"
    start, state = 0, None
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        tokens.load_state_dict(state["tokens"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    g = torch.Generator().manual_seed(args.seed + 1)
    if state is not None:
        g.set_state(state["data_rng"])
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model.train()
    bar = tqdm(range(start, args.steps), desc="train digits U-Net", initial=start, total=args.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        xt, t, y, noise = noisy_batch(x_train, y_train, args.batch_size, abar, args.label_dropout, g)
        loss = F.mse_loss(model(xt, t, tokens(y)).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            with atomic_write(ckpt, "wb") as f:
                torch.save({"model": model.state_dict(), "tokens": tokens.state_dict(), "opt": opt.state_dict(),
                            "data_rng": g.get_state(), "step": step + 1}, f)
    info = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "label_dropout": args.label_dropout,
            "seed": args.seed, "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
            "schedule": "scaled_linear 0.00085..0.012", "model_config": MODEL_CONFIG}
    write_json_atomic(args.out / "training.json", json.loads(json.dumps(info)), indent=2)
    export(args.out)


def export(out: Path) -> None:
    """Write the checkpoint as a diffusers U-Net folder plus the label-token table."""
    state = torch.load(out / "train_state.pt", weights_only=True)
    model, tokens = build_model(), LabelTokens()
    model.load_state_dict(state["model"])
    tokens.load_state_dict(state["tokens"])
    model.eval().save_pretrained(out)
    save_file({"table": tokens.table.detach().contiguous()}, str(out / TOKENS_FILE))
    info_path = out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    images, labels = load_digits_tensors()
    _, test_idx = train_test_split(len(images))
    info.update(checkpoint_step=state["step"],
                held_out_eps_mse=held_out_loss(model, tokens, images[test_idx], labels[test_idx]))
    write_json_atomic(info_path, info, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
