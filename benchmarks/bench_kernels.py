"""Kernel benchmarks: every provider of every registered mosaic op, at the shapes models run.

The cases are discovered, not listed here: each op registers a ``BenchCase`` next to its
function (``mosaic_kernels/ops/<op>.py``: input maker for a canonical shape, the bytes it must
move and the FLOPs it must do, its reference and providers), found in
``mosaic_kernels.ops.BENCH_CASES``. ``linear``, the plain GEMM (F.linear, cuBLAS) that the
runtime runs for qkv, proj and, with block-boundary fusion, fc2, is the one case defined here.
Canonical shapes: row ops (B, L, D), GEMMs (M, N, K), attention (B, L, H, hd).

`validate` compares a provider against the fp32 reference before anything is timed; `bench_op`
times with `triton.testing.do_bench` (CUDA events, median of quantiles [0.5, 0.2, 0.8]; a
perf_counter median on the CPU, for the dry run: `mosaic_kernels.timing`) and reports GB/s and,
for GEMMs and attention, TFLOP/s.

`stage_cases` gives the cases a mosaic really runs (its stages' head counts and MLP widths);
`model_cases` every op at the shapes its model runs. Run on a GPU::

    python benchmarks/bench_kernels.py --batches 16 64

It is also used by `benchmarks/gpu_suite.py` and, at tiny shapes on the CPU, by
`benchmarks/test_bench_kernels.py` (pytest-benchmark).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mosaic_kernels import ops
from mosaicdiff.core.atomic_io import write_json_atomic
from mosaic_kernels.op_registry import BenchCase, random_maker
from mosaic_kernels.timing import time_ms


def _linear_ref(x, w, b):
    return F.linear(x.double(), w.double(), b.double()).to(x.dtype)


def _linear_inputs(shape, dtype, device, generator):
    M, N, K = shape
    rnd = random_maker(device, dtype, generator)
    return rnd(1, M, K), rnd(N, K, scale=K**-0.5), rnd(N, scale=0.1)


#: The plain GEMM: not a mosaic op, the bar the fused GEMM epilogues are measured against.
LINEAR = BenchCase(
    op="linear",
    make_inputs=_linear_inputs,
    bytes_moved=lambda s, e: e * (s[0] * s[2] + s[1] * s[2] + s[1] + s[0] * s[1]),
    flops=lambda s: 2 * s[0] * s[1] * s[2],
    reference=_linear_ref,
    providers=lambda: {"cublas_linear": F.linear},
    model_shapes=lambda batch: [],  # its shapes come from the stages (stage_cases)
    tiny_shape=(32, 64, 72),
)

#: Every case: the registered ops, then ``linear``.
CASES: dict[str, BenchCase] = {**ops.BENCH_CASES, "linear": LINEAR}


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple  # the op's canonical shape
    dtype: torch.dtype
    device: str

    @property
    def spec(self) -> BenchCase:
        return CASES[self.op]

    @property
    def label(self) -> str:
        return f"{self.op}{list(self.shape)}:{str(self.dtype).removeprefix('torch.')}"


def make_inputs(case: Case, seed: int = 0) -> tuple:
    """Random inputs (never zeros) for one case."""
    g = torch.Generator(device=case.device).manual_seed(seed)
    return case.spec.make_inputs(tuple(case.shape), case.dtype, torch.device(case.device), g)


def bytes_moved(case: Case) -> int:
    """The fewest bytes the op must move: each input read once, each output written once."""
    return case.spec.bytes_moved(tuple(case.shape), torch.tensor([], dtype=case.dtype).element_size())


def flops(case: Case) -> int:
    return case.spec.flops(tuple(case.shape))


def providers(op: str) -> dict[str, Callable]:
    """Name -> callable with the op's signature: ``reference`` first. Unavailable ones are
    filtered by the caller."""
    spec = CASES[op]
    return {"reference": spec.reference, **spec.providers()}


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
    return relative_error(provider(*inputs), case.spec.reference(*up))


def _error_row(case: Case, name: str, exc: Exception) -> dict:
    return {"case": case.label, "provider": name, "error": f"{type(exc).__name__}: {exc}"[:300]}


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
                rows.append(_error_row(case, name, exc))
                continue
        try:
            ms, lo, hi = time_ms(lambda: fn(*inputs), case.device, rep_ms)
        except Exception as exc:  # noqa: BLE001 - e.g. a compile failure: a row, not a crash
            rows.append(_error_row(case, name, exc))
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

    The fused ops come from ``mosaic.stage_kernel_shapes`` (what the runtime configures per
    stage, in the canonical shapes); the plain GEMMs (qkv, proj, fc2 before the fused norm) and
    attention from each block's kept heads and MLP width.
    """
    info = mosaic.runtime_info
    C, hd = info["width"], info["head_dim"]
    tokens = (int(mosaic.config.sample_size) // int(mosaic.config.patch_size)) ** 2
    cases: dict[str, Case] = {}
    for B in batches:
        M = B * tokens
        for stage in range(mosaic.num_stages):
            found = [Case(op, tuple(shape), dtype, device)
                     for op, shape, _ in mosaic.stage_kernel_shapes(stage, B, tokens, dtype)]
            for block in mosaic.stage_blocks[stage]:
                h, f = block.num_heads, block.mlp_width
                if h:
                    found += [Case("linear", (M, 3 * h * hd, C), dtype, device),  # qkv
                              Case("linear", (M, C, h * hd), dtype, device),      # proj
                              Case("attention", (B, tokens, h, hd), dtype, device)]
                if f and mosaic.fuse_block_boundaries:
                    found.append(Case("linear", (M, C, f), dtype, device))       # fc2
            for case in found:
                cases.setdefault(case.label, case)
    return list(cases.values())


def model_cases(batches=(16, 64), dtype=torch.bfloat16, device="cuda", ops_: list[str] | None = None) -> list[Case]:
    """Every registered op (or ``ops_``) at the shapes its model runs (``BenchCase.model_shapes``)."""
    return [Case(op, tuple(shape), dtype, device)
            for B in batches for op, spec in CASES.items() if ops_ is None or op in ops_
            for shape in spec.model_shapes(B)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--ops", nargs="+", choices=sorted(CASES), default=None, help="only these ops")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [r for c in model_cases(tuple(args.batches), device=device, ops_=args.ops) for r in bench_op(c)]
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<48} {r['provider']:<14} ERROR {r['error']}")
        else:
            print(f"{r['case']:<48} {r['provider']:<14} {r['ms'] * 1e3:9.1f} us  {r['gbps']:8.0f} GB/s  "
                  f"{r.get('tflops', 0):6.0f} TF  err {r['rel_err']:.1e}")
    if args.json:
        write_json_atomic(args.json, rows)


if __name__ == "__main__":
    main()
