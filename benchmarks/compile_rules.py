"""The rules `compile_check.py` applies to its records (shared with tests/kernels/test_compile_check.py).

A record is one compiled kernel: ``kind`` ("triton" or "cuda"), ``op`` and ``family`` ("row" or
"gemm", from the op's registered ``TritonCase``), ``arch``/``capability``, and the figures read
from Triton's metadata, the PTX and ``ptxas -v``. Every rule returns one line per finding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cross_compile import SMEM_LIMIT

#: GEMM configs allowed to spill, as ``(op, arch, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``
#: with the reason. The 6 pointer-loop ``linear_gated_residual`` configs that spilled 452-3042 B
#: on sm_90a at K = 936 (rows not 16-element aligned) are no longer autotune candidates for such
#: rows (``settings._MAX_UNALIGNED_REGS``); of the two left, one spills a little on sm_80.
#: The rest are A100-only pointer-loop spills (none on sm_90a), measured with Triton 3.8's ptxas;
#: the autotuner times each against the configs that do not spill.
KNOWN_GEMM_SPILLS: dict[tuple, str] = {
    ("linear_gated_residual", "sm_80", 128, 128, 64, 8, 3):
        "64 B at K = 936 (rows not 16-element aligned); the 64x64 tile beside it does not spill",
    ("linear_gelu", "sm_80", 64, 256, 64, 4, 4): "4 B",
    ("linear_geglu", "sm_80", 128, 128, 64, 8, 3): "212 B: two 128x128 accumulators (value and gate)",
    ("linear_geglu", "sm_80", 128, 64, 64, 4, 4): "300 B: two accumulators, 4 stages",
}
#: Lowest capability (major * 10 + minor) with float8 tensor cores.
FP8_MIN_CAPABILITY = 89


def _describe(rec: dict[str, Any]) -> str:
    if rec.get("kind") == "cuda":
        return f"{rec['source']}:{rec.get('kernel')} [{rec['arch']}]"
    return f"{rec['op']}:{rec['kernel']} [{rec['arch']}] {rec.get('launch_meta', {})}"


def compile_failures(records: Iterable[dict[str, Any]]) -> list[str]:
    """Records that did not compile (Triton or nvcc) or that ptxas rejected."""
    out = []
    for r in records:
        if not r.get("ok", False):
            out.append(f"{_describe(r)}: {(r.get('error') or '?').splitlines()[0][:300]}")
        elif r.get("ptxas_error"):
            out.append(f"{_describe(r)}: ptxas: {r['ptxas_error'].splitlines()[0][:300]}")
    return out


def smem_over_limit(records: Iterable[dict[str, Any]]) -> list[str]:
    """Kernels whose shared memory (dynamic + static) exceeds their card's per-block opt-in limit."""
    out = []
    for r in records:
        limit = SMEM_LIMIT.get(r.get("capability"))
        used = int(r.get("shared_bytes", 0)) + int(r.get("static_smem_bytes", 0))
        if r.get("ok") and limit is not None and used > limit:
            out.append(f"{_describe(r)}: {used} B shared memory > {limit} B")
    return out


def gemm_without_wgmma(records: Iterable[dict[str, Any]]) -> list[str]:
    """Hopper GEMM kernels (bf16/fp16) that do not use warpgroup MMA."""
    return [f"{_describe(r)}: no wgmma in the PTX" for r in records
            if r.get("kind") == "triton" and r.get("ok") and r.get("family") == "gemm" and r["capability"] == 90
            and r.get("dtype") in ("bf16", "fp16") and not r.get("wgmma")]


def tma_without_bulk_copies(records: Iterable[dict[str, Any]]) -> list[str]:
    """Hopper tensor-descriptor kernels whose PTX has no TMA bulk tensor copy."""
    return [f"{_describe(r)}: no cp.async.bulk.tensor in the PTX" for r in records
            if r.get("kind") in ("triton", "fp8") and r.get("ok") and r.get("tensor_descriptors")
            and r["capability"] == 90 and not r.get("tma_bulk_tensor")]


def spilling(records: Iterable[dict[str, Any]], kind: str, family: str | None = None) -> list[str]:
    """Kernels of ``kind`` ("triton" or "cuda"; Triton ones limited to ``family``) that spill."""
    return [f"{_describe(r)}: spills {r.get('spill_stores')} B stores / {r.get('spill_loads')} B loads"
            for r in records
            if r.get("kind") == kind and r.get("ok") and (family is None or r.get("family") == family)
            and r.get("spill_bytes", 0) > 0]


def _spill_key(rec: dict[str, Any]) -> tuple:
    m = rec.get("launch_meta", {})
    return (rec["op"], rec["arch"], *(m.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")))


def gemm_spills(records: Iterable[dict[str, Any]]) -> list[str]:
    """GEMM kernels (registered ops and the FP8 GEMM) that spill, less :data:`KNOWN_GEMM_SPILLS`."""
    records = list(records)
    found = spilling(records, "triton", "gemm") + spilling(records, "fp8", "gemm")
    known = {_describe(r) for r in records if _spill_key(r) in KNOWN_GEMM_SPILLS}
    return [line for line in found if line.split(": spills")[0] not in known]


def fp8_without_e4m3_wgmma(records: Iterable[dict[str, Any]]) -> list[str]:
    """Hopper FP8 GEMMs without warpgroup MMA: per-token ones need ``wgmma`` with e4m3 operands,
    weight-only ones (weights converted to the activations' dtype) a ``wgmma`` of that dtype."""
    out = []
    for r in records:
        if r.get("kind") != "fp8" or not r.get("ok") or r.get("family") != "gemm" or r["capability"] != 90:
            continue
        if r.get("mode") == "per_token" and not r.get("wgmma_e4m3"):
            out.append(f"{_describe(r)}: no wgmma with e4m3 operands in the PTX")
        elif r.get("mode") == "weight_only" and r.get("dtype") in ("bf16", "fp16") and not r.get("wgmma"):
            out.append(f"{_describe(r)}: no wgmma in the PTX")
    return out


def fp8_not_refused(records: Iterable[dict[str, Any]]) -> list[str]:
    """FP8 launches on cards without FP8 tensor cores that compiled, or failed other than by the
    launcher's one-line refusal (``NotImplementedError`` naming the compute capability)."""
    out = []
    for r in records:
        if r.get("kind") != "fp8" or r["capability"] >= FP8_MIN_CAPABILITY:
            continue
        error = r.get("error") or ""
        if r.get("ok") or not error.startswith("NotImplementedError") or "compute capability" not in error \
                or "\n" in error:
            out.append(f"{_describe(r)}: expected the one-line FP8 refusal, got "
                       f"{'a compiled kernel' if r.get('ok') else error[:200]!r}")
    return out


def missing_coverage(records: Iterable[dict[str, Any]], capabilities: Iterable[int],
                     families: dict[str, str]) -> list[str]:
    """(op, card) pairs without a compiled kernel, and Hopper GEMMs without a TMA variant.

    ``families``: op -> ``"row"`` or ``"gemm"`` for every op that was to be compiled.

    Guards the check itself: a launcher change that stopped compiling something (or stopped
    reaching the TMA path) would otherwise pass every other rule vacuously.
    """
    records = [r for r in records if r.get("kind") == "triton" and r.get("ok")]
    out = []
    for cap in capabilities:
        for op, family in families.items():
            mine = [r for r in records if r["op"] == op and r["capability"] == cap]
            if not mine:
                out.append(f"{op} [capability {cap}]: no kernel compiled")
            elif family == "gemm" and cap >= 90 and not any(r.get("tensor_descriptors") for r in mine):
                out.append(f"{op} [capability {cap}]: no tensor-descriptor (TMA) kernel compiled")
    return out


def problems(report: dict[str, Any]) -> dict[str, list[str]]:
    """Every rule's findings on a report (empty lists when all is well)."""
    tri, cu, fp8 = report.get("triton", []), report.get("cuda", []), report.get("fp8", [])
    fp8_capable = [r for r in fp8 if r["capability"] >= FP8_MIN_CAPABILITY]
    triton_skipped = any(s.startswith("triton:") for s in report.get("skipped", []))
    caps = [] if triton_skipped else [c["capability"] for c in report.get("meta", {}).get("cards", [])]
    return {
        "compile_failures": compile_failures(tri + cu + fp8_capable),
        "smem_over_limit": smem_over_limit(tri + cu + fp8),
        "gemm_without_wgmma": gemm_without_wgmma(tri),
        "fp8_without_e4m3_wgmma": fp8_without_e4m3_wgmma(fp8),
        "fp8_not_refused": fp8_not_refused(fp8),
        "tma_without_bulk_copies": tma_without_bulk_copies(tri + fp8),
        "row_kernel_spills": spilling(tri, "triton", "row") + spilling(fp8, "fp8", "row"),
        "gemm_kernel_spills": gemm_spills(tri + fp8),
        "cuda_kernel_spills": spilling(cu, "cuda"),
        "missing_coverage": missing_coverage(tri, caps, report.get("meta", {}).get("families", {})),
    }
