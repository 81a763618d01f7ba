"""Train the embedded class-conditional DiT on the scikit-learn digits (pixel space).

The shipped weights come from two runs. The first, from a random initialisation with the
defaults (seed 0, OMP_NUM_THREADS=1)::

    OMP_NUM_THREADS=1 python -m mosaicdiff.zoo.train_dit --out runs/dit_first

DDPM epsilon objective, linear beta schedule 1e-4..0.02 with T = 1000, AdamW lr 5e-4 with cosine
decay, 2000 steps of batch 128, 10% label dropout to the null class (index 10) for
classifier-free guidance. The second continued from the first run's exported weights
(`--init-from`: a fresh optimiser, a linear warm-up and a new cosine decay; the EMA starts from
the same weights)::

    OMP_NUM_THREADS=1 python -m mosaicdiff.zoo.train_dit --out runs/dit_ft_a --init-from runs/dit_first \
        --steps 4000 --lr 1e-4 --warmup-steps 100 --ema 0.9995 --seed 1

Its `training.json` (shipped) records both runs, the second's held-out loss every `--save-every`
steps, and nests the first's record under ``init_from``. Why these weights and not the other
candidates: docs/results.md, "A stronger dense DiT".

The exported weights are the raw model's (`--export model`, the default); `--export ema
--export-only --export-dir DIR` writes a run's EMA as its own model folder. From a random
initialisation an EMA with decay 0.999 over 2000 steps still holds 0.999^2000 = 13.5% of it and
samples far worse; started from trained weights it is as good as the raw weights on FID (the
comparison is in docs/results.md). The per-block timestep/class embedders are tied during
training (as in the original DiT, where one embedder feeds all blocks) and written out as
identical copies, so the model has the same structure as the converted DiT-XL/2. A checkpoint is
written every `--save-every` steps so nothing is lost if training is interrupted; `--resume`
continues from it.
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

from mosaicdiff.core.atomic_io import atomic_write, write_json_atomic
from mosaicdiff.zoo.data import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors, train_test_split
from mosaicdiff.zoo.training import add_training_arguments, digits_split, held_out_eps_mse, noisy_batch

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


def load_init(model, folder: Path) -> dict:
    """Load an exported model from `folder` into the tied `model`; return its training record.

    An exported model holds one identical embedder copy per block (`untie_embedders`); copies that
    differ (a model not written by this script) cannot be tied back without changing the model.
    """
    from diffusers import DiTTransformer2DModel

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"--init-from {folder}: no exported model there (config.json missing)")
    source = DiTTransformer2DModel.from_pretrained(folder)
    if any(source.config.get(k) != v for k, v in MODEL_CONFIG.items()):
        raise ValueError(f"--init-from {folder}: config differs from this script's MODEL_CONFIG")
    first = source.transformer_blocks[0].norm1.emb.state_dict()
    for i, block in enumerate(source.transformer_blocks[1:], start=1):
        if any(not torch.equal(first[k], v) for k, v in block.norm1.emb.state_dict().items()):
            raise ValueError(f"--init-from {folder}: block {i}'s timestep/class embedder differs from "
                             "block 0's, so the embedders cannot be tied")
    model.load_state_dict(source.state_dict())
    record = folder / "training.json"
    return json.loads(record.read_text()) if record.exists() else {}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def linear_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def held_out_loss(model, images, labels, seed: int = 1, repeats: int = 4) -> float:
    """Epsilon MSE on held-out images, averaged over fixed random (t, noise) draws."""
    model.eval()
    return held_out_eps_mse(lambda x_t, t: model(x_t, timestep=t, class_labels=labels).sample, images,
                            linear_alphas_cumprod(), seed, repeats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(p, steps=2000, batch_size=128, lr=5e-4, save_every=500)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from the weights of an exported model folder (see the module docstring)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="linear learning-rate warm-up before the cosine decay (default 0)")
    p.add_argument("--export", choices=("model", "ema"), default="model",
                   help="which weights to write out (see the module docstring)")
    p.add_argument("--export-only", action="store_true",
                   help="only export the weights of an existing checkpoint in --out")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="with --export-only: write the model there instead of into --out")
    args = p.parse_args(argv)
    if args.export_only:
        export(args.out, args.export, args.export_dir)
        return
    if args.export_dir is not None:
        p.error("--export-dir goes with --export-only")
    if not 0 <= args.warmup_steps < args.steps:
        p.error(f"--warmup-steps must be in [0, --steps), got {args.warmup_steps}")

    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    x_train, y_train, held_out = digits_split()

    model = build_model()
    tie_embedders(model)
    init_record = load_init(model, args.init_from) if args.init_from is not None else None
    ema = copy.deepcopy(model).requires_grad_(False)
    tie_embedders(ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    abar = linear_alphas_cumprod()
    ckpt = args.out / "train_state.pt"
    start, history = 0, []
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        start, history = state["step"], state.get("history", [])

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
        lr = lr_at(step, args.steps, args.lr, args.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        xt, t, y, noise = noisy_batch(x_train, y_train, args.batch_size, abar, args.label_dropout, g)
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
            # the held-out curve of both weight sets, to see over- or under-training in training.json
            history.append({"step": step + 1, "model": held_out_loss(model, *held_out),
                            "ema": held_out_loss(ema, *held_out)})
            model.train()
            with atomic_write(ckpt, "wb") as f:
                torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                            "rng": torch.get_rng_state(), "data_rng": g.get_state(), "step": step + 1,
                            "history": history}, f)

    info = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
        "label_dropout": args.label_dropout, "seed": args.seed, "warmup_steps": args.warmup_steps,
        "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
        "held_out_eps_mse_history": history,
    }
    if init_record is not None:
        info["init_from"] = {"path": str(args.init_from), "training": init_record}
    write_json_atomic(args.out / "training.json", info, indent=2)
    export(args.out, args.export)


def export(out: Path, which: str = "model", dest: Path | None = None) -> None:
    """Write the checkpoint's `which` weights ("model" or "ema") in `out` as a diffusers model in
    `dest` (default `out`), with the run's `training.json`."""
    dest = out if dest is None else dest
    ckpt = out / "train_state.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint to export at {ckpt}")
    state = torch.load(ckpt, weights_only=True)
    model = build_model()
    tie_embedders(model)
    model.load_state_dict(state[which])
    final = untie_embedders(model).eval()
    final.save_pretrained(dest)
    info_path = out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info_path = dest / "training.json"
    images, labels = load_digits_tensors()
    _, test_idx = train_test_split(len(images))
    info.update(exported=which, checkpoint_step=state["step"],
                held_out_eps_mse=held_out_loss(final, images[test_idx], labels[test_idx]))
    write_json_atomic(info_path, info, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
