"""The rules `compile_check.py` applies to its records (shared with tests/kernels/test_compile_check.py).

A record is one compiled kernel: ``kind`` ("triton" or "cuda"), ``op`` and ``family`` ("row" or
"gemm", from the op's registered ``TritonCase``), ``arch``/``capability``, and the figures read
from Triton's metadata, the PTX and ``ptxas -v``. Every rule returns one line per finding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cross_compile import SMEM_LIMIT


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
            if r.get("kind") == "triton" and r.get("ok") and r.get("tensor_descriptors")
            and r["capability"] == 90 and not r.get("tma_bulk_tensor")]


def spilling(records: Iterable[dict[str, Any]], kind: str, family: str | None = None) -> list[str]:
    """Kernels of ``kind`` ("triton" or "cuda"; Triton ones limited to ``family``) that spill."""
    return [f"{_describe(r)}: spills {r.get('spill_stores')} B stores / {r.get('spill_loads')} B loads"
            for r in records
            if r.get("kind") == kind and r.get("ok") and (family is None or r.get("family") == family)
            and r.get("spill_bytes", 0) > 0]


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
    tri, cu = report.get("triton", []), report.get("cuda", [])
    triton_skipped = any(s.startswith("triton:") for s in report.get("skipped", []))
    caps = [] if triton_skipped else [c["capability"] for c in report.get("meta", {}).get("cards", [])]
    return {
        "compile_failures": compile_failures(tri + cu),
        "smem_over_limit": smem_over_limit(tri + cu),
        "gemm_without_wgmma": gemm_without_wgmma(tri),
        "tma_without_bulk_copies": tma_without_bulk_copies(tri),
        "row_kernel_spills": spilling(tri, "triton", "row"),
        "cuda_kernel_spills": spilling(cu, "cuda"),
        "missing_coverage": missing_coverage(tri, caps, report.get("meta", {}).get("families", {})),
    }
