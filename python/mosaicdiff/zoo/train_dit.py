"""Train the embedded class-conditional DiT on the scikit-learn digits (pixel space).

Reproduce the shipped weights with::

    OMP_NUM_THREADS=1 python -m mosaicdiff.zoo.train_dit --out python/mosaicdiff/zoo/digits_dit

Recipe (the shipped weights used exactly these defaults, seed 0, OMP_NUM_THREADS=1): DDPM
epsilon objective, linear beta schedule 1e-4..0.02 with T = 1000, AdamW lr 5e-4 with cosine
decay, 2000 steps of batch 128, 10% label dropout to the null class (index 10) for
classifier-free guidance.

The exported weights are the raw model's (`--export model`, the default), not the EMA's: an
EMA with decay 0.999 over only 2000 steps still holds 0.999^2000 = 13.5% of the random
initialisation and samples far worse (measured in docs/results.md, "The embedded models"). The
EMA stays in the checkpoint; `--export ema` writes it instead. The per-block
timestep/class embedders are tied during training (as in the original DiT, where one embedder
feeds all blocks) and written out as identical copies, so the model has the same structure as
the converted DiT-XL/2. A checkpoint is written every `--save-every` steps so nothing is lost if
training is interrupted; `--resume` continues from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mosaic_kernels.atomic_io import atomic_write, write_json_atomic
from mosaicdiff.zoo.data import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors, train_test_split

MODEL_CONFIG = dict(
    num_attention_heads=6,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    sample_size=IMAGE_SIZE,
    patch_size=4,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero",
)


def build_model():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**MODEL_CONFIG)


def tie_embedders(model) -> None:
    """Make every block use block 0's timestep/class embedder (one module, one set of weights)."""
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared


def untie_embedders(model):
    """Return a copy whose blocks hold separate but identical embedder copies (saveable)."""
    model = copy.deepcopy(model)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(shared)
    return model


def linear_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


@torch.no_grad()
def held_out_loss(model, images, labels, seed: int = 1, repeats: int = 4) -> float:
    """Epsilon MSE on held-out images, averaged over fixed random (t, noise) draws."""
    model.eval()
    abar = linear_alphas_cumprod()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        t = torch.randint(0, 1000, (len(images),), generator=g)
        noise = torch.randn(images.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * images + (1 - a).sqrt() * noise
        pred = model(xt, timestep=t, class_labels=labels).sample
        total += F.mse_loss(pred, noise).item()
    return total / repeats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export", choices=("model", "ema"), default="model",
                   help="which weights to write out (see the module docstring)")
    p.add_argument("--export-only", action="store_true",
                   help="only export the weights of an existing checkpoint in --out")
    args = p.parse_args(argv)
    if args.export_only:
        export(args.out, args.export)
        return

    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    images, labels = load_digits_tensors()
    train_idx, test_idx = train_test_split(len(images))
    x_train, y_train = images[train_idx], labels[train_idx]

    model = build_model()
    tie_embedders(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    tie_embedders(ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    abar = linear_alphas_cumprod()
    ckpt = args.out / "train_state.pt"
    start = 0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        start = state["step"]

    g = torch.Generator().manual_seed(args.seed + 1)
    if args.resume and ckpt.exists() and "data_rng" in state:
        g.set_state(state["data_rng"])
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model.train()
    # the built-in LabelEmbedding dropout would drop independently per call; we drop once per batch
    for m in model.modules():
        if hasattr(m, "dropout_prob"):
            m.dropout_prob_saved, m.dropout_prob = m.dropout_prob, 0.0
    bar = tqdm(range(start, args.steps), desc="train digits DiT", initial=start, total=args.steps)
    for step in bar:
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=g)
        x0, y = x_train[idx], y_train[idx].clone()
        y[torch.rand(len(y), generator=g) < args.label_dropout] = NUM_CLASSES
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            with atomic_write(ckpt, "wb") as f:
                torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                            "rng": torch.get_rng_state(), "data_rng": g.get_state(), "step": step + 1}, f)

    info = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
        "label_dropout": args.label_dropout, "seed": args.seed,
        "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
    }
    write_json_atomic(args.out / "training.json", info, indent=2)
    export(args.out, args.export)


def export(out: Path, which: str = "model") -> None:
    """Write the checkpoint's `which` weights ("model" or "ema") as a diffusers model in `out`."""
    state = torch.load(out / "train_state.pt", weights_only=False)
    model = build_model()
    tie_embedders(model)
    model.load_state_dict(state[which])
    final = untie_embedders(model).eval()
    final.save_pretrained(out)
    info_path = out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    images, labels = load_digits_tensors()
    _, test_idx = train_test_split(len(images))
    info.update(exported=which, checkpoint_step=state["step"],
                held_out_eps_mse=held_out_loss(final, images[test_idx], labels[test_idx]))
    write_json_atomic(info_path, info, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
