"""LoRA on a pruned model: load a LoRA into a mosaic, or prune the LoRA-fused dense model?

Issue 23, item 4. A random-but-fixed rank-`--rank` LoRA on every attention and MLP linear of the
embedded digits DiT (each delta ``B @ A`` scaled to `--strength` of its weight's Frobenius norm, so
it visibly changes the samples) stands in for a user's adapter. The reference is the dense model
with the LoRA fused (``W + B @ A``). Against its images (same noise and labels) the report measures:

- ``mosaic_plus_lora``: the mosaic pruned from the plain dense model at `--sparsity`, the LoRA
  then loaded into it (`mosaicdiff.core.lora`: each stage adapts its kept rows and columns);
- ``pruned_fused``: the LoRA-fused dense model pruned at `--sparsity` (calibrated on it);
- ``mosaic_without_lora`` and ``dense_without_lora``: how far the LoRA moves the samples;

each with PSNR / SSIM to the reference (95% bootstrap intervals), class accuracy and FID, and the
paired difference ``mosaic_plus_lora - pruned_fused``, one run per `--strength` (the mosaic is
pruned once); ``mosaic_to_dense_without_lora`` is the pruning loss without any LoRA. The report is
rewritten atomically after every model:

    OMP_NUM_THREADS=1 python scripts/lora_quality.py --out docs/data/lora_quality_dit.json
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from mosaicdiff.core.atomic_io import json_safe, write_json_atomic
from mosaicdiff.eval import measure

from _digits_run import paired_difference, prepare_run_from_args, run_options, summary_line

#: The adapted linears of each DiT block (the ones diffusers' LoRA trainers target, and the MLP).
LORA_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")


def random_lora(dense, rank: int, strength: float, seed: int) -> dict[str, torch.Tensor]:
    """A PEFT state dict: per adapted linear a random A ``(rank, in)`` and B ``(out, rank)`` whose
    product has `strength` times the Frobenius norm of the weight it adapts."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j in range(len(dense.transformer_blocks)):
        for name in LORA_MODULES:
            module = f"transformer_blocks.{j}.{name}"
            w = dense.get_submodule(module).weight.detach().float()
            a = torch.randn(rank, w.shape[1], generator=g)
            b = torch.randn(w.shape[0], rank, generator=g)
            b *= strength * w.norm() / (b @ a).norm()
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
    return out


@torch.no_grad()
def fused_dense(dense, lora: dict[str, torch.Tensor]):
    """A copy of `dense` with every LoRA delta added to its weight (the dense model + LoRA)."""
    fused = copy.deepcopy(dense)
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            w = fused.get_submodule(module).weight
            w += (lora[f"{module}.lora_B.weight"] @ a).to(w.dtype)
    return fused


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                parents=[run_options(num_samples=100, models=["digits-dit"])])
    p.add_argument("--sparsity", type=float, default=0.3, help="the mosaic's target sparsity")
    p.add_argument("--rank", type=int, default=4, help="the LoRA's rank")
    p.add_argument("--strength", type=float, nargs="+", default=[0.3, 0.1],
                   help="|B @ A| / |W| per adapted linear: one run per value")
    p.add_argument("--lora-seed", type=int, default=0, help="the LoRA's seed")
    args = p.parse_args(argv)
    run = prepare_run_from_args(args)
    subject = run.subject
    g = subject.guidance_scale
    report = {"model": args.model, "sparsity": args.sparsity, "rank": args.rank,
              "lora_modules": list(LORA_MODULES), "steps": args.steps, "num_samples": args.num_samples,
              "guidance_scale": g, "sampler": subject.sampler, "samples_per_stage": args.samples_per_stage,
              "seed": args.seed, "lora_seed": args.lora_seed, "boundaries": list(run.boundaries),
              "reference": "the dense model with the LoRA fused", "runs": []}
    started = time.perf_counter()
    dense_images, _ = run.sample(run.dense, g)
    mosaic, _ = run.prune("mosaic", args.sparsity)  # pruned once, without any LoRA
    mosaic_images, _ = run.sample(mosaic, g)
    report["mosaic_to_dense_without_lora"] = measure.measure(mosaic_images, run.labels, dense_images,
                                                             run.per_seed).summary()
    for strength in args.strength:
        lora = random_lora(run.dense, args.rank, strength, args.lora_seed)
        fused_run = copy.copy(run)
        fused_run.dense = fused_dense(run.dense, lora)  # the reference, calibrated and pruned as it is
        reference, _ = run.sample(fused_run.dense, g)
        entry, measured = {"strength": strength, "models": {}}, {}
        report["runs"].append(entry)

        def record(name: str, images, entry=entry, measured=measured, reference=reference) -> None:
            measured[name] = measure.measure(images, run.labels, reference, run.per_seed)
            entry["models"][name] = s = measured[name].summary()
            report["seconds"] = round(time.perf_counter() - started, 1)
            write_json_atomic(args.out, json_safe(report))
            print(f"strength {entry['strength']:g} {name} (to dense+LoRA): {summary_line(s)}", flush=True)

        record("dense_without_lora", dense_images)
        record("mosaic_without_lora", mosaic_images)
        mosaic.load_lora_adapter(lora, adapter_name="lora")
        record("mosaic_plus_lora", run.sample(mosaic, g)[0])
        mosaic.delete_adapters("lora")
        record("pruned_fused", run.sample(fused_run.prune("mosaic", args.sparsity)[0], g)[0])
        entry["mosaic_plus_lora_minus_pruned_fused"] = paired_difference(measured, "mosaic_plus_lora", "pruned_fused")
        write_json_atomic(args.out, json_safe(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
