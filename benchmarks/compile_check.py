"""Compile-only resource check of every mosaic_kernels kernel for H100/H200 and A100, no GPU needed.

Triton can compile for a GPU that is not there: a stand-in Triton driver targets
``GPUTarget("cuda", 90 | 80, 32)``, every JIT launch becomes a compile-only warmup
(`cross_compile.py`), and each op's Triton kernel is launched the way its registered
``TritonCase`` says (``mosaic_kernels/ops/<op>.py``: the public launcher
``mosaic_kernels.triton.<op>_triton(..., config=cfg)``) on CPU tensors at the shapes of its
model (``BenchCase.model_shapes``: DiT-XL/2, C=1152, 16*256 and 64*256 tokens, fc1/fc2 at the
dense and stage widths of the 0.3 and 0.5 mosaics). The checks therefore follow whatever the
launchers do (which kernel, which constexprs, TMA or pointer loop). Pointer arguments only feed
Triton's specialization through ``data_ptr() % 16`` and the dtype, so CPU tensors give the same
compile as CUDA tensors (``torch.empty`` never touches the pages: no memory is used).

Configs: what each launcher may run (``TritonCase.configs``): the row kernels' settings
(``triton/settings.py: row_settings``, a function of D and dtype) and every entry of the GEMM
autotune list (``gemm_candidate_configs`` for the op's epilogue), each as the pointer and the
TMA kernel. Identical (kernel, specialization) compiles are recorded once, with every
(config source, shape) using them.

Per compiled kernel: shared memory (Triton's metadata, what Triton checks against the device's
opt-in limit at load), registers and spill bytes (``ptxas -v`` of Triton's own ptxas on the PTX,
for the arch Triton compiled), whether the PTX uses ``wgmma`` and TMA bulk tensor copies
(``cp.async.bulk.tensor``). The CUDA C++ kernels in ``csrc/*.cu`` are compiled with
``nvcc -Xptxas -v`` with the flags of the real build (CMakeLists.txt + torch's CMake config).
The rules applied to the records are in `compile_rules.py`.

FP8 (``--fp8``, on by default; :func:`fp8_check`): the float8-weight GEMM of
``mosaic_kernels.ops.fp8`` through its launcher (``fp8_gemm_triton``), both activation modes, at
the DiT-XL/2 fc1 shape (M = 16 * 256): every epilogue at the first FP8 autotune config (pointer and
TMA), and every FP8 config for ``gelu_tanh``, plus the per-token row quantization kernel. On
sm_90a the per-token kernels must use ``wgmma`` with e4m3 operands; on sm_80 (no FP8 tensor
cores) the launcher must refuse with its one-line ``NotImplementedError`` before compiling. GEMM
spills (any family) are findings unless listed in ``compile_rules.KNOWN_GEMM_SPILLS``.

Arches: Triton compiles capability 9.0 as sm_90a (always, wgmma/TMA allowed) and 8.0 as sm_80;
the real nvcc build uses TORCH_CUDA_ARCH_LIST "8.0;9.0", i.e. sm_90 and sm_80. So ``--arch``
names a card family: ``sm_90a`` and ``sm_90`` both mean Triton sm_90a + nvcc sm_90.

    python benchmarks/compile_check.py                          # sm_90a + sm_80, table, JSON
    python benchmarks/compile_check.py --arch sm_90a --json out.json --no-cuda
    python benchmarks/compile_check.py --ops linear_gelu \\
        --extra 'linear_gelu={"BLOCK_M":256,"BLOCK_N":256,"BLOCK_K":128,"num_warps":8,"num_stages":4}'

Exit status is non-zero only when the script itself crashes (or 2 for bad arguments); compile
failures and over-limit resources are data (``--strict`` makes :func:`problems` findings fail the run).
Tests: tests/kernels/test_compile_check.py.

Tried with Triton 3.6.0 and 3.8.0. Older releases are untested: the script looks for what it
uses (``GPUTarget``, ``driver.set_active``, ``JITFunction.run(..., warmup=True)``;
``triton.tools.tensor_descriptor`` for the TMA variants) and reports a skip reason when one is
missing. On a machine with a real GPU the stand-in still forces the target, so any card checks
both families.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_rules import (  # noqa: E402,F401 - the rules are part of this script's interface
    KNOWN_GEMM_SPILLS,
    compile_failures,
    fp8_not_refused,
    fp8_without_e4m3_wgmma,
    gemm_spills,
    gemm_without_wgmma,
    missing_coverage,
    problems,
    smem_over_limit,
    spilling,
    tma_without_bulk_copies,
)
from cross_compile import (  # noqa: E402,F401 - re-exported: the tests use them through this module
    AMPERE,
    ARCHS,
    HOPPER,
    NVCC_FLAGS,
    REPO,
    SMEM_LIMIT,
    Capture,
    Card,
    _has_tensor_descriptors,
    _run_retrying_exec,
    _uses_descriptors,
    compile_only,
    cuda_check,
    find_nvcc,
    nvcc_version,
    parse_archs,
    parse_ptxas_log,
    ptx_features,
    run_ptxas,
    triton_ptxas,
    triton_unavailable,
)

BATCHES = (16, 64)
_DTYPES = ("bf16", "fp16", "fp32")

# ---------------------------------------------------------------------------------------------
# What to compile: the ops' registered Triton cases
# ---------------------------------------------------------------------------------------------


def kernel_cases() -> dict[str, Any]:
    """op -> its registered ``BenchCase``, for every op with a Triton kernel (imports mosaic_kernels)."""
    sys.path.insert(0, str(REPO))
    from mosaic_kernels import ops

    return {op: case for op, case in ops.BENCH_CASES.items() if case.triton is not None}


def op_shapes(op: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(batch label, canonical shape)`` of ``op`` at its model's sizes: (B, L, D) or (M, N, K)."""
    case = kernel_cases()[op]
    return [(f"B{b}", tuple(shape)) for b in BATCHES for shape in case.model_shapes(b)]


def configs_for(op: str, shape: tuple[int, ...], dtype,
                extra: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """``(source, config)`` pairs to compile for one op and shape: what its launcher may run, then
    the ``--extra`` ones."""
    return kernel_cases()[op].triton.configs(shape, dtype) + [("extra", dict(c)) for c in extra.get(op, [])]


def launch(op: str, shape: tuple[int, ...], dtype, cfg: dict[str, Any]) -> None:
    """Call the public launcher of ``op`` on uninitialized CPU tensors of ``shape``."""
    import torch

    kernel_cases()[op].triton.launch(shape, dtype, cfg, lambda *sizes: torch.empty(*sizes, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Triton check
# ---------------------------------------------------------------------------------------------


def _base_record(op: str, family: str, card: Card, cap: Capture, dtype_name: str) -> dict[str, Any]:
    return {"kind": "triton", "op": op, "family": family, "kernel": cap.fn_name, "arch": card.triton_arch,
            "capability": card.capability, "dtype": dtype_name, "launch_meta": cap.meta,
            "sources": [], "shapes": [], "ok": cap.error is None, "error": cap.error}


def _kernel_record(rec: dict[str, Any], kernel: Any) -> dict[str, Any]:
    md = kernel.metadata
    rec.update(
        kernel=md.name, hash=kernel.hash, shared_bytes=int(md.shared), num_warps=int(md.num_warps),
        num_stages=int(md.num_stages), tensor_descriptors=_uses_descriptors(kernel),
        **ptx_features(kernel.asm["ptx"]))
    return rec


def _launch_captured(op: str, shape, dtype, cfg: dict[str, Any], captures: list[Capture]) -> list[Capture]:
    """The kernels one launch compiled (a launcher error before any kernel is one failed capture)."""
    start = len(captures)
    try:
        launch(op, shape, dtype, cfg)
    except Exception as exc:  # noqa: BLE001 - recorded as data
        if len(captures) == start:
            captures.append(Capture("<launcher>", {"config": cfg}, error=f"{type(exc).__name__}: {exc}"[:4000]))
    return captures[start:]


def triton_check(cards: list[Card], ops: Iterable[str], dtype_names: Iterable[str],
                 extra: dict[str, list[dict[str, Any]]], log: Callable[[str], None]) -> tuple[list, list]:
    """Compile every kernel for every card; return ``(records, skipped)``.

    ptxas runs in a worker thread while the next kernel compiles (it is a separate process, so
    the two use two cores; one worker keeps up with the compiles).
    """
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    families = {op: case.triton.family for op, case in kernel_cases().items()}
    ptxas = triton_ptxas()
    skipped = [] if ptxas else ["ptxas: Triton's NVIDIA backend has no ptxas; registers/spills not measured"]
    records: dict[tuple, dict[str, Any]] = {}
    futures: dict[tuple, tuple[concurrent.futures.Future, tuple[str, str, str]]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        for card in cards:
            t0 = time.perf_counter()
            with compile_only(card) as captures:
                jobs = [(op, dname, role, shape, source, cfg)
                        for op in ops for dname in dtype_names for role, shape in op_shapes(op)
                        for source, cfg in configs_for(op, shape, dtypes[dname], extra)]
                for op, dname, role, shape, source, cfg in jobs:
                    for cap in _launch_captured(op, shape, dtypes[dname], cfg, captures):
                        key = ((card.capability, cap.kernel.hash) if cap.kernel is not None else
                               (card.capability, op, cap.fn_name, dname, str(sorted(cap.meta.items()))))
                        rec = records.get(key)
                        if rec is None:
                            rec = records[key] = _base_record(op, families[op], card, cap, dname)
                            if cap.kernel is not None:
                                _kernel_record(rec, cap.kernel)
                                if ptxas:
                                    ptx_args = (ptxas, cap.kernel.asm["ptx"], card.triton_arch)
                                    futures[key] = (pool.submit(run_ptxas, *ptx_args), ptx_args)
                        if source not in rec["sources"]:
                            rec["sources"].append(source)
                        if [role, list(shape)] not in rec["shapes"]:
                            rec["shapes"].append([role, list(shape)])
                captures.clear()
            n = sum(1 for k in records if k[0] == card.capability)
            log(f"triton {card.triton_arch}: {n} distinct kernels in {time.perf_counter() - t0:.1f} s")
        for key, (fut, ptx_args) in futures.items():
            try:
                try:
                    res = fut.result()
                except OSError:  # could not start even after retries: once more, with no compile beside it
                    res = run_ptxas(*ptx_args)
            except Exception as exc:  # noqa: BLE001 - e.g. a ptxas timeout: data, not a crash
                res = {"ptxas_error": f"{type(exc).__name__}: {exc}"}
            rec = records[key]
            rec.update(res)
            if "ptxas_error" not in res:
                rec["spill_bytes"] = max(res["spill_stores"], res["spill_loads"])
    if not _has_tensor_descriptors():
        skipped.append("TMA variants: triton.tools.tensor_descriptor missing (Triton >= 3.4 needed)")
    return list(records.values()), skipped


# ---------------------------------------------------------------------------------------------
# FP8 check: the float8-weight GEMM (not a registered TritonCase: sm_80 must refuse it)
# ---------------------------------------------------------------------------------------------

#: DiT-XL/2 fc1 at batch 16: (M, N, K).
FP8_SHAPE = (16 * 256, 4608, 1152)
FP8_MODES = ("weight_only", "per_token")
FP8_EPILOGUES = ("none", "gelu_tanh", "gated_residual", "residual", "geglu")
_E4M3_WGMMA = re.compile(r"\bwgmma\.mma_async\S*\.e4m3\.e4m3")


def fp8_jobs(dtype_name: str = "bf16", all_configs: bool = False) -> list[tuple[str, str, str, dict[str, Any]]]:
    """``(source, mode, epilogue, config)`` of the FP8 check, per mode: every epilogue at the first
    FP8 config (pointer), ``gelu_tanh`` also with TMA; ``all_configs`` adds every other FP8
    autotune config for ``gelu_tanh`` (about 2 s of compile each on sm_90a: off in CI)."""
    import torch

    from mosaic_kernels.triton.settings import gemm_candidate_configs

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    jobs = []
    for mode in FP8_MODES:
        x_dtype = torch.float8_e4m3fn if mode == "per_token" else dtype
        cands = gemm_candidate_configs(x_dtype, "gelu_tanh", weight_dtype=torch.float8_e4m3fn)
        for ep in FP8_EPILOGUES:
            first = gemm_candidate_configs(x_dtype, ep, weight_dtype=torch.float8_e4m3fn)[0]
            jobs += [(f"fp8_configs[0]{'+tma' if tma else ''}", mode, ep, {**first, "tma": tma})
                     for tma in ((False, True) if ep == "gelu_tanh" else (False,))]
        if all_configs:
            jobs += [(f"fp8_configs[{i}]", mode, "gelu_tanh", dict(c)) for i, c in enumerate(cands) if i > 0]
    return jobs


def fp8_launch(mode: str, epilogue: str, dtype, cfg: dict[str, Any], shape=FP8_SHAPE) -> None:
    """Call ``fp8_gemm_triton`` on uninitialized CPU tensors (float8 weight, fp32 scales)."""
    import torch

    from mosaic_kernels.triton import fp8_gemm_triton

    M, N, K = shape
    e = functools.partial(torch.empty, dtype=dtype)
    rows = 2 * N if epilogue == "geglu" else N
    w, scale = torch.empty(rows, K, dtype=torch.float8_e4m3fn), torch.empty(rows, dtype=torch.float32)
    res = e(M, N) if epilogue in ("gated_residual", "residual") else None
    gate = e(1, N) if epilogue == "gated_residual" else None
    fp8_gemm_triton(epilogue, e(M, K), w, scale, e(rows), e(M, N), mode=mode, gate=gate, res=res, L=M, config=cfg)


def fp8_check(cards: list[Card], dtype_name: str, log: Callable[[str], None],
              all_configs: bool = False) -> list[dict[str, Any]]:
    """Compile the FP8 jobs for every card: one record per compiled kernel (``kind`` "fp8", with
    ``wgmma_e4m3`` counted in the PTX and ptxas figures), or per refusal/failure (``ok`` False).
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    ptxas = triton_ptxas()
    records: dict[tuple, dict[str, Any]] = {}
    for card in cards:
        t0 = time.perf_counter()
        with compile_only(card) as captures:
            for source, mode, ep, cfg in fp8_jobs(dtype_name, all_configs):
                start = len(captures)
                error = None
                try:
                    fp8_launch(mode, ep, dtype, cfg)
                except Exception as exc:  # noqa: BLE001 - a refusal or a compile failure: data
                    error = f"{type(exc).__name__}: {exc}"[:4000]
                caps = captures[start:] or [Capture("<launcher>", {"config": cfg}, error=error)]
                for cap in caps:
                    key = (card.capability, cap.kernel.hash if cap.kernel is not None else (mode, ep, source))
                    rec = records.get(key)
                    if rec is None:
                        rec = records[key] = {**_base_record(f"fp8_gemm:{mode}:{ep}", "gemm", card, cap, dtype_name),
                                              "kind": "fp8", "mode": mode, "epilogue": ep}
                        if cap.kernel is not None:
                            _kernel_record(rec, cap.kernel)
                            if cap.fn_name != "_gemm_kernel":
                                rec["family"] = "row"  # the per-token row quantization
                            rec["wgmma_e4m3"] = len(_E4M3_WGMMA.findall(cap.kernel.asm["ptx"]))
                            if ptxas:
                                res = run_ptxas(ptxas, cap.kernel.asm["ptx"], card.triton_arch)
                                rec.update(res)
                                if "ptxas_error" not in res:
                                    rec["spill_bytes"] = max(res["spill_stores"], res["spill_loads"])
                        elif cap.error is None:
                            rec.update(ok=False, error=error)
                    if source not in rec["sources"]:
                        rec["sources"].append(source)
            captures.clear()
        n = sum(1 for k in records if k[0] == card.capability)
        log(f"fp8 {card.triton_arch}: {n} records in {time.perf_counter() - t0:.1f} s")
    return list(records.values())


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _span(values: list[int]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _flag(values: list[bool]) -> str:
    return "yes" if all(values) else "no" if not any(values) else "some"


def summary_table(report: dict[str, Any]) -> str:
    """One line per (arch, op, kernel): compiles, smem max (KB), registers, spills, wgmma, TMA."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in report.get("triton", []) + report.get("fp8", []):
        groups.setdefault((r["arch"], r["op"], r["kernel"]), []).append(r)
    for r in report.get("cuda", []):  # one line per .cu file: its template instantiations together
        kernels = {x.get("kernel") for x in report["cuda"] if x["source"] == r["source"] and x["arch"] == r["arch"]}
        groups.setdefault((r["arch"], "cuda:" + Path(r["source"]).stem, f"{len(kernels)} instantiations"),
                          []).append(r)
    head = (f"{'arch':7} {'op':31} {'kernel':34} {'ok':>7} {'smem KB':>8} {'regs':>8} {'spill B':>8} "
            f"{'wgmma':>5} {'TMA':>5}")
    lines = [head, "-" * len(head)]
    for (arch, op, kernel), rs in sorted(groups.items()):
        ok = [r for r in rs if r.get("ok")]
        smem = max((r.get("shared_bytes", 0) + r.get("static_smem_bytes", 0) for r in ok), default=None)
        lines.append(
            f"{arch:7} {op:31} {kernel[:34]:34} {len(ok):>3}/{len(rs):<3} "
            f"{(f'{smem / 1024:.1f}' if smem is not None else '-'):>8} "
            f"{_span([r.get('registers') for r in ok]):>8} {_span([r.get('spill_bytes') for r in ok]):>8} "
            f"{(_flag([bool(r.get('wgmma')) for r in ok]) if ok and rs[0]['kind'] != 'cuda' else '-'):>5} "
            f"{(_flag([bool(r.get('tma_bulk_tensor')) for r in ok]) if ok and rs[0]['kind'] != 'cuda' else '-'):>5}")
    return "\n".join(lines)


def parse_extra(values: Iterable[str], ops: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """``--extra OP=JSON`` values -> {op: [config, ...]} (``OP`` one of ``ops``)."""
    ops = tuple(ops)
    out: dict[str, list[dict[str, Any]]] = {}
    for v in values:
        op, sep, text = v.partition("=")
        if not sep or op not in ops:
            raise argparse.ArgumentTypeError(f"--extra wants OP=JSON with OP in {ops}, got {v!r}")
        out.setdefault(op, []).append(json.loads(text))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", default=None,
                   help="sm_90a | sm_90 | sm_80, repeatable or comma-separated (default: sm_90a,sm_80)")
    p.add_argument("--json", type=Path, default=None, help="write the full report here (atomically)")
    p.add_argument("--ops", default=None, help="comma list of ops (default: every op with a Triton kernel)")
    p.add_argument("--dtype", action="append", default=None, choices=_DTYPES, help="operand dtype (default bf16)")
    p.add_argument("--extra", action="append", default=[], metavar="OP=JSON",
                   help="compile one more config for OP (e.g. to check a tile before shipping it)")
    cuda = p.add_mutually_exclusive_group()
    cuda.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                      help="compile csrc/*.cu with nvcc (default: when nvcc is found)")
    cuda.add_argument("--no-cuda", dest="cuda", action="store_false")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip the float8-weight GEMM check")
    p.add_argument("--fp8-all-configs", action="store_true", help="compile every FP8 autotune config (slow)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a check of problems() has findings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Kernels must be decorated for real compilation: TRITON_INTERPRET is read when
    # mosaic_kernels.triton is first imported, which happens below.
    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0") and "mosaic_kernels.triton" in sys.modules:
        raise SystemExit("mosaic_kernels.triton was imported under TRITON_INTERPRET=1; run this script on its own")
    known = list(kernel_cases())
    try:
        cards = parse_archs(args.arch or ["sm_90a,sm_80"])
        extra = parse_extra(args.extra, known)
    except (argparse.ArgumentTypeError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    ops = [o for o in (s.strip() for s in (args.ops or ",".join(known)).split(",")) if o]
    bad = [o for o in ops if o not in known]
    if bad:
        raise SystemExit(f"unknown ops {bad}, expected {known}")
    dtype_names = args.dtype or ["bf16"]
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    t0 = time.perf_counter()
    report: dict[str, Any] = {"triton": [], "fp8": [], "cuda": [], "skipped": []}
    if args.no_triton:
        report["skipped"].append("triton: --no-triton")
    elif (reason := triton_unavailable()) is not None:
        report["skipped"].append(f"triton: {reason}")
    else:
        report["triton"], skipped = triton_check(cards, ops, dtype_names, extra, log)
        report["skipped"] += skipped
        if args.fp8:
            report["fp8"] = fp8_check(cards, dtype_names[0], log, args.fp8_all_configs)
        else:
            report["skipped"].append("fp8: --no-fp8")
    if args.cuda is not False:
        if args.cuda is None and find_nvcc() is None:
            report["skipped"].append("cuda: nvcc not found (set CUDA_HOME or CUDACXX)")
        else:
            report["cuda"], skipped = cuda_check(cards, log)
            report["skipped"] += skipped
    report["meta"] = _meta(cards, ops, dtype_names, time.perf_counter() - t0)
    findings = problems(report)
    report["problems"] = findings

    print(summary_table(report))
    for reason in report["skipped"]:
        print(f"skipped: {reason}")
    for rule, items in findings.items():
        for item in items[:20]:
            print(f"{rule}: {item}")
        if len(items) > 20:
            print(f"{rule}: ... {len(items) - 20} more")
    print(f"compile check: {len(report['triton'])} Triton kernels, {len(report['fp8'])} FP8 records, "
          f"{len(report['cuda'])} CUDA kernels, "
          f"{sum(map(len, findings.values()))} findings, {report['meta']['runtime_s']:.1f} s")
    if args.json is not None:
        from mosaicdiff.core.atomic_io import write_json_atomic

        write_json_atomic(args.json, report, sort_keys=True)
    return 1 if args.strict and any(findings.values()) else 0


def _meta(cards: list[Card], ops: list[str], dtype_names: list[str], runtime_s: float) -> dict[str, Any]:
    import torch

    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    with contextlib.suppress(Exception):
        import triton

        versions["triton"] = triton.__version__
    ptxas = None
    with contextlib.suppress(Exception):
        ptxas = triton_ptxas()
    if ptxas:
        with contextlib.suppress(Exception):
            out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
            versions["triton_ptxas"] = re.search(r"release ([\d.]+)", out).group(1)
    versions["nvcc"] = nvcc_version(find_nvcc())
    families = {op: case.triton.family for op, case in kernel_cases().items() if op in ops}
    return {"cards": [dataclasses.asdict(c) for c in cards], "ops": ops, "families": families,
            "dtypes": dtype_names, "versions": versions, "nvcc_flags": list(NVCC_FLAGS),
            "runtime_s": round(runtime_s, 2), "shapes": {op: op_shapes(op) for op in ops}}


if __name__ == "__main__":
    sys.exit(main())
