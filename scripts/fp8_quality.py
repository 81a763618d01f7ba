"""What do FP8 compact GEMMs cost in quality? Mosaic vs mosaic + FP8 on an embedded digits model.

Issue 23, item 3: prune the embedded `--model` (default the digits DiT) at `--sparsity` (the
closed-form stages, as the demo), then quantize the mosaic's compact GEMM weights to float8_e4m3fn
with per-output-channel scales (`mosaicdiff.quantize`) in both activation modes, and the engine's
dense model (one stage at sparsity 0) too. Every model samples the same noise and labels as in
`scripts/stage_sensitivity.py` (`mosaicdiff.app.experiment`); each is measured against the dense
model's images (PSNR/SSIM to dense with 95% bootstrap intervals, class accuracy, FID), and each
FP8 model against its unquantized twin (paired differences with intervals). Also the bytes of the
compact weights in bf16 and FP8 (`memory_report`).

On CPU the FP8 ops run their torch reference (dequantize, then the bf16 op's reference): the same
math as the Triton kernel up to fp32 summation order (tests/kernels/test_fp8_gemm.py), so the
quality is the quantization's, not a kernel's. The report is written atomically at the end:

    OMP_NUM_THREADS=1 python scripts/fp8_quality.py --out docs/data/fp8_quality_dit.json
    OMP_NUM_THREADS=1 python scripts/fp8_quality.py --model digits-unet --out docs/data/fp8_quality_unet.json
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import mosaicdiff
from mosaicdiff.core.atomic_io import json_safe, write_json_atomic
from mosaicdiff.eval import measure
from mosaicdiff.app.subjects import SUBJECTS

from _digits_run import paired_difference, prepare_run_from_args, run_options, summary_line


def compact_bytes(model) -> int:
    """Bytes of the compact blocks and shared producer storage (`memory_report`)."""
    r = model.memory_report()
    return int(r["producer_bytes"] + sum(s["bytes"] for s in r["stages"].values()))


def bf16_and_fp8_bytes(model) -> dict:
    """The compact weight bytes of a bf16 copy of `model`, before and after `quantize`."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    before = compact_bytes(bf16)
    mosaicdiff.quantize(bf16, "fp8")
    after = compact_bytes(bf16)
    return {"bf16": before, "fp8": after, "ratio": after / before}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                parents=[run_options(num_samples=100, models=sorted(SUBJECTS))])
    p.add_argument("--sparsity", type=float, default=0.3, help="the mosaic's mean sparsity")
    args = p.parse_args(argv)
    run = prepare_run_from_args(args)
    subject = run.subject
    g = subject.guidance_scale
    started = time.perf_counter()
    dense_images, _ = run.sample(run.dense, g)
    mosaic, prune_s = run.prune("mosaic", args.sparsity)
    engine = mosaicdiff.prune(run.dense, None, 0.0, method="magnitude", align=None, progress=False)  # one dense stage
    models = {"dense_engine": engine, f"mosaic_{args.sparsity:g}": mosaic}
    for base in list(models):
        for act in ("weight_only", "per_token"):
            models[f"{base}+fp8_{act}"] = mosaicdiff.quantize(copy.deepcopy(models[base]), "fp8", activations=act)
    report = {"model": args.model, "sparsity": args.sparsity, "steps": args.steps, "num_samples": args.num_samples,
              "seed": args.seed, "guidance_scale": g, "sampler": subject.sampler, "prune_seconds": round(prune_s, 1),
              "boundaries": list(run.boundaries), "backend": "torch reference (dequantize, then the bf16 op)",
              "bytes": {"dense_engine": bf16_and_fp8_bytes(engine), "mosaic": bf16_and_fp8_bytes(mosaic)},
              "models": {}, "fp8_vs_unquantized": {}}
    measured = {}
    for name, model in models.items():
        images, sec = run.sample(model, g)
        measured[name] = measure.measure(images, run.labels, dense_images, run.per_seed)
        report["models"][name] = {"seconds_per_image": round(sec, 4), **measured[name].summary()}
        print(f"{name}: {summary_line(report['models'][name])}", flush=True)
    for name in measured:
        base, _, act = name.partition("+fp8_")
        if act:
            report["fp8_vs_unquantized"][name] = paired_difference(measured, name, base)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(args.out, json_safe(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
