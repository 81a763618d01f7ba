"""Kernel benchmarks: every provider of every mosaic op at DiT-XL/2 shapes.

Each op has: an input maker, the bytes it must move (memory-bound ops) or the FLOPs it must do
(GEMMs), and providers with one signature. `validate` compares a provider against the fp32
torch reference before anything is timed; `bench_op` times with `triton.testing.do_bench`
(CUDA events, median of quantiles [0.5, 0.2, 0.8]; a perf_counter median on the CPU, for the
dry run) and reports GB/s or TFLOP/s. ``linear`` is the plain GEMM (F.linear, cuBLAS) that the
runtime runs for qkv, proj and, with block-boundary fusion, fc2.

`stage_cases` gives the cases a mosaic really runs (its stages' head counts and MLP widths);
`dit_cases` fixed DiT-XL/2 widths. Run on a GPU::

    python benchmarks/bench_kernels.py --batches 16 64

It is also used by `benchmarks/gpu_suite.py` and, at tiny shapes on the CPU, by
`benchmarks/test_bench_kernels.py` (pytest-benchmark).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mosaic_kernels import ops
from mosaic_kernels import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_models import TORCH_OPS  # noqa: E402

QUANTILES = [0.5, 0.2, 0.8]


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple  # op-specific, see make_inputs
    dtype: torch.dtype
    device: str

    @property
    def label(self) -> str:
        return f"{self.op}{list(self.shape)}:{str(self.dtype).removeprefix('torch.')}"


def make_inputs(case: Case, seed: int = 0) -> tuple:
    """Random inputs (never zeros) for one case."""
    g = torch.Generator(device=case.device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=case.device) * scale).to(case.dtype)

    if case.op in ("ln_modulate",):
        B, L, D = case.shape
        return rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, D, scale=0.5)
    if case.op == "gated_residual_ln_modulate":
        B, L, D = case.shape
        return rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, L, D), rnd(B, D, scale=0.5), rnd(B, D, scale=0.5)
    if case.op in ("linear_gelu", "linear"):
        M, K, N = case.shape
        return rnd(1, M, K), rnd(N, K, scale=K**-0.5), rnd(N, scale=0.1)
    if case.op == "linear_gated_residual":
        B, L, K, N = case.shape
        return rnd(B, L, K), rnd(N, K, scale=K**-0.5), rnd(N, scale=0.1), rnd(B, N, scale=0.5), rnd(B, L, N)
    if case.op == "attention":
        B, L, H, hd = case.shape
        return rnd(B, L, 3 * H * hd), H
    raise ValueError(f"unknown op {case.op!r}")


def bytes_moved(case: Case) -> int:
    """The fewest bytes the op must move: each input read once, each output written once."""
    e = torch.tensor([], dtype=case.dtype).element_size()
    if case.op == "ln_modulate":
        B, L, D = case.shape
        return e * (2 * B * L * D + 2 * B * D)
    if case.op == "gated_residual_ln_modulate":
        B, L, D = case.shape
        return e * (4 * B * L * D + 3 * B * D)
    if case.op in ("linear_gelu", "linear"):
        M, K, N = case.shape
        return e * (M * K + N * K + N + M * N)
    if case.op == "linear_gated_residual":
        B, L, K, N = case.shape
        return e * (B * L * K + N * K + N + B * N + 2 * B * L * N)
    if case.op == "attention":
        B, L, H, hd = case.shape
        return e * (B * L * 4 * H * hd)
    raise ValueError(case.op)


def flops(case: Case) -> int:
    if case.op in ("linear_gelu", "linear"):
        M, K, N = case.shape
        return 2 * M * K * N
    if case.op == "linear_gated_residual":
        B, L, K, N = case.shape
        return 2 * B * L * K * N
    if case.op == "attention":
        B, L, H, hd = case.shape
        return 4 * B * H * L * L * hd
    return 0


def _pinned(fn: Callable, backend: str) -> Callable:
    def run(*args):
        with ops.use_backend(backend):
            return fn(*args)

    return run


def providers(op: str) -> dict[str, Callable]:
    """Name -> callable with the op's signature. Unavailable ones are filtered by the caller."""
    if op == "linear":
        return {"reference": _linear_ref, "cublas_linear": F.linear}
    public = getattr(ops, op)
    out: dict[str, Callable] = {"reference": getattr(ref, f"{op}_ref")}
    if op in ("ln_modulate", "gated_residual_ln_modulate"):
        # what diffusers does: LayerNorm kernel, then elementwise kernels, in the input dtype
        out["torch_eager"] = TORCH_OPS[op]
        out["torch_compile"] = torch.compile(TORCH_OPS[op], dynamic=False)
    if op in ("linear_gelu", "linear_gated_residual"):
        # the plain GEMM of the same shape, no epilogue: the bar the epilogues must stay within 5% of
        out["cublas_linear"] = lambda x, w, b, *rest: F.linear(x, w, b)
        out["vendor"] = _pinned(public, "auto")
        out["triton"] = _pinned(public, "triton")
    elif op == "attention":  # each SDPA kernel pinned (head_dim 72: which one wins is measured)
        for backend in ("auto", "flash", "efficient", "cudnn"):
            out[f"sdpa_{backend}"] = lambda qkv, h, _b=backend: public(qkv, h, backend=_b)
    else:
        out["triton"] = _pinned(public, "triton")
        out["cuda"] = _pinned(public, "cuda")
    return out


def _linear_ref(x, w, b):
    return F.linear(x.double(), w.double(), b.double()).to(x.dtype)


def relative_error(out, expected) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    err = 0.0
    for o, e in zip(outs, exps):
        o, e = o.double(), e.double()
        if not torch.isfinite(o).all():
            return math.inf
        err = max(err, ((o - e).norm() / e.norm().clamp_min(1e-30)).item())
    return err


def validate(case: Case, provider: Callable, inputs: tuple) -> float:
    """Relative error of a provider against the reference on upcast fp32 inputs."""
    up = tuple(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs)
    expected = providers(case.op)["reference"](*up) if case.op == "linear" else getattr(ref, f"{case.op}_ref")(*up)
    return relative_error(provider(*inputs), expected)


def time_ms(fn: Callable, device: str, rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) ms: `triton.testing.do_bench` on CUDA, a perf_counter loop on the CPU."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=QUANTILES, rep=rep_ms))
    fn()  # warm-up (compiles)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor(QUANTILES)).tolist()
    return q[0], q[1], q[2]


def bench_op(case: Case, names: list[str] | None = None, rep_ms: int = 100) -> list[dict]:
    """Validate, then time every available provider of one case. Returns one row per provider."""
    inputs = make_inputs(case)
    rows = []
    for name, fn in providers(case.op).items():
        if names and name not in names:
            continue
        if name == "cublas_linear" and case.op != "linear":
            err = float("nan")  # a different function (no epilogue): timed, not validated
        else:
            try:
                err = validate(case, fn, inputs)
            except Exception as exc:  # noqa: BLE001 - an unavailable backend is a row, not a crash
                rows.append({"case": case.label, "provider": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
        try:
            ms, lo, hi = time_ms(lambda: fn(*inputs), case.device, rep_ms)
        except Exception as exc:  # noqa: BLE001 - e.g. a compile failure: a row, not a crash
            rows.append({"case": case.label, "provider": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        row = {"case": case.label, "op": case.op, "shape": list(case.shape), "provider": name,
               "ms": ms, "ms_p20": lo, "ms_p80": hi, "rel_err": err}
        if flops(case):
            row["tflops"] = flops(case) / ms / 1e9
        row["gbps"] = bytes_moved(case) / ms / 1e6
        rows.append(row)
    return rows


def stage_cases(mosaic, batches=(16, 64), dtype=torch.bfloat16, device="cuda") -> list[Case]:
    """The distinct kernel cases a `MosaicDiT` runs over all its stages, at each forward batch.

    Row ops and fc1 come from ``mosaic.stage_kernel_shapes`` (what the runtime configures per
    stage); the plain GEMMs (qkv, proj, fc2 before the fused norm) and attention from each
    block's kept heads and MLP width.
    """
    info = mosaic.runtime_info
    C, hd = info["width"], info["head_dim"]
    tokens = (int(mosaic.config.sample_size) // int(mosaic.config.patch_size)) ** 2
    cases: dict[str, Case] = {}
    for B in batches:
        M = B * tokens
        for stage in range(mosaic.num_stages):
            for op, shape, _ in mosaic.stage_kernel_shapes(stage, B, tokens, dtype):
                if op in ("linear_gelu", "linear_gated_residual"):  # (M, N, K) -> this file's layout
                    m, n, k = shape
                    shape = (m, k, n) if op == "linear_gelu" else (B, tokens, k, n)
                cases.setdefault(f"{op}{shape}", Case(op, tuple(shape), dtype, device))
            for block in mosaic.stage_blocks[stage]:
                h, f = block.num_heads, block.mlp_width
                more = [Case("linear", (M, C, 3 * h * hd), dtype, device),  # qkv
                        Case("linear", (M, h * hd, C), dtype, device),      # proj
                        Case("attention", (B, tokens, h, hd), dtype, device)] if h else []
                if f and mosaic.fuse_block_boundaries:
                    more.append(Case("linear", (M, f, C), dtype, device))   # fc2
                for case in more:
                    cases.setdefault(case.label, case)
    return list(cases.values())


def dit_cases(batches=(16, 64), dtype=torch.bfloat16, device="cuda") -> list[Case]:
    """DiT-XL/2 shapes (C=1152, 256 tokens), dense and pruned widths."""
    cases = []
    for B in batches:
        M = B * 256
        cases.append(Case("ln_modulate", (B, 256, 1152), dtype, device))
        cases.append(Case("gated_residual_ln_modulate", (B, 256, 1152), dtype, device))
        for n in (4608, 3200, 2304):  # fc1: dense, 30%, 50%
            cases.append(Case("linear_gelu", (M, 1152, n), dtype, device))
            cases.append(Case("linear_gated_residual", (B, 256, n, 1152), dtype, device))  # fc2
        for k in (1152, 576):  # proj: 16 heads, 8 heads
            cases.append(Case("linear_gated_residual", (B, 256, k, 1152), dtype, device))
        for h in (16, 8):
            cases.append(Case("attention", (B, 256, h, 72), dtype, device))
    return cases


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    rows = [r for c in dit_cases(tuple(args.batches)) for r in bench_op(c)]
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<48} {r['provider']:<14} ERROR {r['error']}")
        else:
            print(f"{r['case']:<48} {r['provider']:<14} {r['ms'] * 1e3:9.1f} us  {r['gbps']:8.0f} GB/s  "
                  f"{r.get('tflops', 0):6.0f} TF  err {r['rel_err']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
