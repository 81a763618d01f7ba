"""Train the embedded digits PixArt: a text-conditioned DiT in PixArt's layout on the scikit-learn digits.

The model is a diffusers ``PixArtTransformer2DModel`` (adaLN-single: one timestep MLP for the
whole model plus a learned ``scale_shift_table`` per block; self-attention, cross-attention to the
text states, tanh-GELU MLP), 6 blocks of 6 heads x 32, patch 4 on 16x16x1 pixels. Its "prompt" is
the digit's row of learned label tokens (`mosaicdiff.zoo.train_unet.LabelTokens`: 4 tokens of
width 64, the last row the null prompt for classifier-free guidance), trained with it and shipped
next to the weights (``label_tokens.safetensors``), as the digits U-Net's.

Reproduce the shipped weights with (three phases: each resume with a longer ``--steps`` restarts the
cosine where the longer schedule is; ``training.json`` records the phases)::

    OUT=python/mosaicdiff/zoo/digits_pixart
    OMP_NUM_THREADS=2 python -m mosaicdiff.zoo.train_pixart --out $OUT
    OMP_NUM_THREADS=2 python -m mosaicdiff.zoo.train_pixart --out $OUT --steps 3000 --resume
    OMP_NUM_THREADS=2 python -m mosaicdiff.zoo.train_pixart --out $OUT --steps 5000 --resume

Recipe: DDPM epsilon objective on PixArt's linear betas (0.0001..0.02, T = 1000), AdamW lr 5e-4
with 100 warm-up steps and cosine decay, batches of 64, 10% prompt dropout to the null row, EMA
0.999 of the weights (the exported weights are the EMA's or the raw model's, whichever has the
lower held-out epsilon MSE), seed 0. A checkpoint every ``--save-every`` steps; ``--resume``
continues.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mosaicdiff.core.atomic_io import atomic_write, write_json_atomic
from mosaicdiff.zoo.data import IMAGE_SIZE
from mosaicdiff.zoo.train_dit import linear_alphas_cumprod, lr_at
from mosaicdiff.zoo.train_unet import TEXT_WIDTH, TOKENS_FILE, LabelTokens
from mosaicdiff.zoo.training import add_training_arguments, digits_split, held_out_eps_mse, noisy_batch

MODEL_CONFIG = dict(
    num_attention_heads=6, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
    cross_attention_dim=192, sample_size=IMAGE_SIZE, patch_size=4, caption_channels=TEXT_WIDTH,
    norm_type="ada_norm_single", activation_fn="gelu-approximate", norm_elementwise_affine=False, norm_eps=1e-6,
    num_embeds_ada_norm=1000, use_additional_conditions=False, attention_bias=True,
)


def build_model():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**MODEL_CONFIG)


def predict(model, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The model's epsilon prediction (PixArt's forward takes the text states before the timestep)."""
    return model(x_t, encoder_hidden_states=text, timestep=t, return_dict=False)[0]


def held_out_loss(model, tokens, images, labels, seed: int = 1, repeats: int = 4) -> float:
    """Epsilon MSE on held-out images, averaged over fixed random (t, noise) draws."""
    was_training = model.training
    model.eval()
    loss = held_out_eps_mse(lambda x_t, t: predict(model, x_t, t, tokens(labels)), images, linear_alphas_cumprod(),
                            seed, repeats)
    model.train(was_training)
    return loss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(p, steps=1500, batch_size=64, lr=5e-4, save_every=250)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--export-only", action="store_true", help="only export the weights of the checkpoint in --out")
    args = p.parse_args(argv)
    if args.export_only:
        export(args.out)
        return
    if not 0 <= args.warmup_steps < args.steps:
        p.error(f"--warmup-steps must be in [0, --steps), got {args.warmup_steps}")
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    x_train, y_train, held_out = digits_split()
    model, tokens = build_model(), LabelTokens()
    ema_model, ema_tokens = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(tokens).requires_grad_(False)
    params = list(model.parameters()) + list(tokens.parameters())
    ema_params = list(ema_model.parameters()) + list(ema_tokens.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    abar = linear_alphas_cumprod()
    ckpt = args.out / "train_state.pt"
    start, history = 0, []
    g = torch.Generator().manual_seed(args.seed + 1)
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)  # tensors, dicts and numbers only
        for module, key in ((model, "model"), (tokens, "tokens"), (ema_model, "ema_model"), (ema_tokens, "ema_tokens")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        g.set_state(state["data_rng"])
        start, history = state["step"], state["history"]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model.train()
    bar = tqdm(range(start, args.steps), desc="train digits PixArt", initial=start, total=args.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup_steps)
        x_t, t, y, noise = noisy_batch(x_train, y_train, args.batch_size, abar, args.label_dropout, g)
        loss = F.mse_loss(predict(model, x_t, t, tokens(y)), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema_params, params):
                pe.lerp_(pm, 1 - args.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, "model": held_out_loss(model, tokens, *held_out),
                            "ema": held_out_loss(ema_model, ema_tokens, *held_out)})
            with atomic_write(ckpt, "wb") as f:
                torch.save({"model": model.state_dict(), "tokens": tokens.state_dict(),
                            "ema_model": ema_model.state_dict(), "ema_tokens": ema_tokens.state_dict(),
                            "opt": opt.state_dict(), "data_rng": g.get_state(), "step": step + 1,
                            "history": history}, f)
    info = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
            "ema": args.ema, "label_dropout": args.label_dropout, "seed": args.seed,
            "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
            "schedule": "linear 0.0001..0.02", "model_config": MODEL_CONFIG, "held_out_eps_mse_history": history}
    # a resumed run (longer --steps) appends its phase: the cosine restarts where the longer one is
    previous = args.out / "training.json"
    phases = json.loads(previous.read_text()).get("phases", []) if args.resume and previous.exists() else []
    info["phases"] = [*phases, {"to_step": args.steps, "train_seconds": info["train_seconds"],
                                "resumed": bool(args.resume and start > 0)}]
    write_json_atomic(args.out / "training.json", json.loads(json.dumps(info)), indent=2)
    export(args.out)


def export(out: Path) -> None:
    """Write the checkpoint's better weight set (raw or EMA, by held-out MSE) as a diffusers
    PixArt folder plus the label-token table."""
    state = torch.load(out / "train_state.pt", weights_only=True)
    held_out = digits_split()[2]
    scores = {}
    for prefix in ("", "ema_"):
        model, tokens = build_model(), LabelTokens()
        model.load_state_dict(state[prefix + "model"])
        tokens.load_state_dict(state[prefix + "tokens"])
        scores[prefix] = (held_out_loss(model, tokens, *held_out), model, tokens)
    which = min(scores, key=lambda k: scores[k][0])
    loss, model, tokens = scores[which]
    model.eval().save_pretrained(out)
    save_file({"table": tokens.table.detach().contiguous()}, str(out / TOKENS_FILE))
    info_path = out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update(checkpoint_step=state["step"], exported="ema" if which else "model", held_out_eps_mse=loss,
                held_out_eps_mse_other={("model" if which else "ema"): scores["" if which else "ema_"][0]})
    write_json_atomic(info_path, info, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
