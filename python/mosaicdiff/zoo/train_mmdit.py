"""Train the embedded digits MMDiT: a Flux.1-layout rectified-flow transformer on the scikit-learn digits.

The model is a diffusers ``FluxTransformer2DModel``: double-stream joint-attention blocks (text
and image streams with their own weights, one attention over both), then single-stream blocks
(one stream, attention and MLP in parallel), 3-axis RoPE, adaLN from the timestep plus a pooled
text vector; no guidance embedding (one forward per step, as Flux-schnell). The 16x16x1 pixels in
[-1, 1] are its "latents" (no VAE), packed 2x2 as ``FluxPipeline`` packs latents: 64 tokens of
4 channels on an 8x8 grid (`pack`, `unpack`, `image_ids`). Its "prompt" is the digit label:
`LabelConditioning` holds a learned table of label tokens (`mosaicdiff.zoo.train_unet.LabelTokens`,
4 tokens of width 64, the ``encoder_hidden_states``) and a learned pooled vector per label (the
``pooled_projections``), trained with it and shipped next to the weights
(``label_tokens.safetensors``: ``table`` and ``pooled``; the last rows, the null prompt, stay
untrained since no prompt is dropped).

Reproduce the shipped weights with (``training.json`` records the phases: each run of the trainer,
killed or finished, with the steps it reached; a resume with another ``--steps`` moves the cosine
to that length)::

    OUT=python/mosaicdiff/zoo/digits_mmdit
    OMP_NUM_THREADS=1 python -m mosaicdiff.zoo.train_mmdit --out $OUT --stop-after 1000
    OMP_NUM_THREADS=1 python -m mosaicdiff.zoo.train_mmdit --out $OUT --steps 6000 --resume
    python scripts/digits_mmdit_quality.py   # 200 samples: class accuracy and FID into training.json

(The first run was planned as 7000 steps and killed after its step-1000 checkpoint when the shared
2-core machine slowed it 30-fold; the second finished with the cosine moved to 6000 steps. One
thread: under CPU contention two threads' OpenMP barriers stall.)

Recipe: rectified flow, ``x_s = (1 - s) x0 + s eps``, target velocity ``eps - x0``, ``s`` drawn
logit-normal(0, 1) (SD3's choice: the middle times, where the velocity is least determined, get
the most steps; the sampler's Euler steps are uniform in ``s``), the model called with
``timestep=s`` (it scales by 1000 inside, as ``FluxPipeline`` passes ``t / 1000``). AdamW lr 5e-4,
100 warm-up steps, cosine decay, batches of 64, no prompt dropout (no classifier-free guidance),
EMA 0.999 (the exported weights are the EMA's or the raw model's, whichever has the lower
held-out velocity MSE), seed 0. A checkpoint every ``--save-every`` steps; ``--resume`` continues.
Sampler: Euler on ``FlowMatchEulerDiscreteScheduler(shift=1.0)`` (`sample`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mosaicdiff.core.atomic_io import write_json_atomic
from mosaicdiff.zoo.data import IMAGE_SIZE, NUM_CLASSES
from mosaicdiff.zoo.train_dit import lr_at
from mosaicdiff.zoo.train_unet import TEXT_WIDTH, TOKENS, TOKENS_FILE, LabelTokens
from mosaicdiff.zoo.training import (add_training_arguments, digits_split, ema_copies, flow_batch,
                                     held_out_velocity_mse, load_train_state, optimizer_step,
                                     parse_training_arguments, save_train_state, write_training_info)

POOLED_WIDTH = 64
GRID = IMAGE_SIZE // 2  # packed 2x2: an 8x8 grid of tokens
MODEL_CONFIG = dict(
    patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_single_layers=4, num_attention_heads=4,
    attention_head_dim=16, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=POOLED_WIDTH,
    guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)
TIME_SAMPLING = "logit-normal"


def pack(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: 2x2 patches as tokens, laid out as
    ``FluxPipeline._pack_latents``."""
    b, c, h, w = images.shape
    return images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2 * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of `pack` for ``size x size`` images."""
    b, n, c4 = tokens.shape
    half = size // 2
    return tokens.view(b, half, half, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, size, size)


def image_ids(grid: int = GRID) -> torch.Tensor:
    """``(grid * grid, 3)`` RoPE positions of the packed tokens, as ``FluxPipeline._prepare_latent_image_ids``:
    axis 0 zero, axes 1 and 2 the row and column."""
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1] += torch.arange(grid)[:, None]
    ids[..., 2] += torch.arange(grid)[None, :]
    return ids.reshape(grid * grid, 3)


class LabelConditioning(nn.Module):
    """A digit label's "prompt": its row of label tokens ``(TOKENS, TEXT_WIDTH)`` and pooled vector
    ``(POOLED_WIDTH,)``; row ``NUM_CLASSES`` of each is the (unused) null prompt."""

    def __init__(self):
        super().__init__()
        self.tokens = LabelTokens()
        self.pooled = nn.Parameter(torch.randn(NUM_CLASSES + 1, POOLED_WIDTH) * 0.5)

    def forward(self, labels: torch.Tensor) -> dict:
        """The text keyword arguments of ``FluxTransformer2DModel.forward`` for `labels`, with the
        positions (text all zeros, image `image_ids`)."""
        return {"encoder_hidden_states": self.tokens(labels), "pooled_projections": self.pooled[labels],
                "txt_ids": torch.zeros(TOKENS, 3, device=labels.device), "img_ids": image_ids().to(labels.device)}


def build_model():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**MODEL_CONFIG)


def predict(model, x_s: torch.Tensor, s: torch.Tensor, conditioning: dict) -> torch.Tensor:
    """The velocity at images `x_s` ``(B, 1, 16, 16)`` and times `s` in [0, 1], as images."""
    v = model(pack(x_s), timestep=s.to(x_s.dtype).expand(len(x_s)), return_dict=False, **conditioning)[0]
    return unpack(v)


def held_out_loss(model, conditioning, images, labels, seed: int = 1, repeats: int = 4) -> float:
    """Velocity MSE on held-out images, averaged over fixed random (s, noise) draws (s logit-normal).
    `conditioning` maps labels to the forward's text arguments (a `LabelConditioning`, or
    ``zoo.load_digits_mmdit_conditioning`` for the shipped model)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        cond = conditioning(labels)
    loss = held_out_velocity_mse(lambda x_s, s: predict(model, x_s, s, cond), images, seed, repeats, TIME_SAMPLING)
    model.train(was_training)
    return loss


def euler_scheduler(shift: float = 1.0):
    """Euler on rectified flow: ``FlowMatchEulerDiscreteScheduler`` with T = 1000, by default without
    shift (``shift=1.0``: the times it was trained at are not resolution-shifted)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))


@torch.no_grad()
def sample(model, conditioning: dict, num_images: int, num_inference_steps: int = 28, generator=None,
           scheduler=None) -> torch.Tensor:
    """Euler samples from noise (``s = 1``) to images (``s = 0``) on the flow-matching scheduler.

    Args:
        conditioning: `LabelConditioning`'s output for the `num_images` labels.
        scheduler: default `euler_scheduler`.

    Returns:
        ``(num_images, 1, 16, 16)`` images clamped to [-1, 1].
    """
    scheduler = scheduler or euler_scheduler()
    param = next(model.parameters())
    x = torch.randn(num_images, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(param.device, param.dtype)
    scheduler.set_timesteps(num_inference_steps, device=param.device)
    for t in scheduler.timesteps:
        v = predict(model, x, (t / scheduler.config.num_train_timesteps).reshape(1), conditioning)
        x = scheduler.step(v, t, x).prev_sample
    return x.clamp(-1, 1)


def main(argv=None) -> None:
    p = add_training_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), steps=7000,
                               batch_size=64, lr=5e-4, save_every=500, label_dropout=0.0)
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this run (checkpointed, exported) after this step, the cosine still spanning --steps")
    args = parse_training_arguments(p, argv, warmup_steps=100, ema=0.999)
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.export_only:
        return export(args.out)
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    x_train, y_train, held_out = digits_split()
    model, cond = build_model(), LabelConditioning()
    (ema_model, ema_cond), ema_pairs = ema_copies(model, cond)
    opt = torch.optim.AdamW([*model.parameters(), *cond.parameters()], lr=args.lr, weight_decay=0.0)
    modules = {"model": model, "conditioning": cond, "ema_model": ema_model, "ema_conditioning": ema_cond}
    ckpt = args.out / "train_state.pt"
    g = torch.Generator().manual_seed(args.seed + 1)
    resume = args.resume and ckpt.exists()
    start, history, phases = load_train_state(ckpt, modules, opt, g) if resume else (0, [], [])
    command = " ".join(argv if argv is not None else sys.argv[1:]).replace(str(args.out), "DIR")
    phase = {"from_step": start, "to_step": args.steps, "command": command}  # the cosine spans 0..to_step
    t0 = time.time()
    model.train()
    end = min(args.steps, args.stop_after or args.steps)
    bar = tqdm(range(start, end), desc="train digits MMDiT", initial=start, total=args.steps)
    for step in bar:
        x_s, s, y, v = flow_batch(x_train, y_train, args.batch_size, args.label_dropout, g, TIME_SAMPLING)
        loss = F.mse_loss(predict(model, x_s, s, cond(y)), v)
        optimizer_step(opt, loss, lr_at(step, args.steps, args.lr, args.warmup_steps), ema_pairs, args.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == end:
            history.append({"step": step + 1, "model": held_out_loss(model, cond, *held_out),
                            "ema": held_out_loss(ema_model, ema_cond, *held_out)})
            seconds = round(time.time() - t0, 1)
            phase.update(reached_step=step + 1, train_seconds=seconds, seconds_per_step=seconds / (step + 1 - start))
            save_train_state(ckpt, modules, opt, g, step + 1, history, [*phases, phase])
    phases = [*phases, phase]
    write_training_info(args.out, {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
        "ema": args.ema, "label_dropout": args.label_dropout, "seed": args.seed,
        "train_seconds": round(sum(ph.get("train_seconds", 0) for ph in phases), 1), "torch": torch.__version__,
        "objective": f"rectified flow, velocity eps - x0, s {TIME_SAMPLING}(0, 1)", "model_config": MODEL_CONFIG,
        "parameters": sum(p.numel() for p in model.parameters()), "held_out_velocity_mse_history": history,
    }, phases)
    export(args.out)


def export(out: Path) -> None:
    """Write the checkpoint's better weight set (raw or EMA, by held-out velocity MSE) as a diffusers
    Flux transformer folder plus the label conditioning, and record the choice in ``training.json``."""
    state = torch.load(out / "train_state.pt", weights_only=True)
    held_out = digits_split()[2]
    scores = {}
    for name in ("model", "ema"):
        model, cond = build_model(), LabelConditioning()
        model.load_state_dict(state["model" if name == "model" else "ema_model"])
        cond.load_state_dict(state["conditioning" if name == "model" else "ema_conditioning"])
        scores[name] = (held_out_loss(model, cond, *held_out), model, cond)
    best = min(scores, key=lambda k: scores[k][0])
    loss, model, cond = scores[best]
    model.eval().save_pretrained(out)
    save_file({"table": cond.tokens.table.detach().contiguous(), "pooled": cond.pooled.detach().contiguous()},
              str(out / TOKENS_FILE))
    info_path = out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update(checkpoint_step=state["step"], exported=best, held_out_velocity_mse=loss,
                held_out_velocity_mse_other={k: v[0] for k, v in scores.items() if k != best})
    write_json_atomic(info_path, info, indent=2)
    print(json.dumps({k: v for k, v in info.items() if k != "held_out_velocity_mse_history"}, indent=2))


if __name__ == "__main__":
    main()
