"""Hopper/Ampere resource checks of every kernel without a GPU (benchmarks/compile_check.py).

The script compiles every Triton kernel of mosaic_kernels, in every config its launcher may run
(the row settings; every GEMM autotune config, pointer and TMA) at DiT-XL/2 shapes, for sm_90a
(H100/H200) and sm_80 (A100) through a stand-in Triton driver, and the CUDA kernels of csrc/
with nvcc. It runs once per module, in a
subprocess without TRITON_INTERPRET (the root conftest sets it for the interpreter tests, and the
kernels must be decorated for real compilation). Its rules live in the script
(:func:`problems`) so that a failing check here and its line in the script's output agree.

One deliberately oversized config (``OVERSIZED``) is compiled with the rest: it must be flagged
as over the shared-memory limit on both cards, which shows the limit check can fail. It is left
out of the other assertions.

The FP8 GEMM (``mosaic_kernels.ops.fp8``) is compiled by the script's ``fp8_check``: every
epilogue in both activation modes on sm_90a (wgmma with e4m3 operands), refused on sm_80.

Cost: about 2 minutes on a 2-core machine with a cold Triton cache (the FP8 part ~25 s), ~20 s warm.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "compile_check.py"

_spec = importlib.util.spec_from_file_location("mosaic_compile_check", SCRIPT)
cc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cc  # dataclasses look their module up there
_spec.loader.exec_module(cc)  # stdlib-only at import: nothing is compiled or interpreted here

# 128x256x128 tiles, 4 stages of bf16: 384 KB of operand buffers on sm_90a, 288 KB on sm_80.
OVERSIZED = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8,
             "num_warps": 8, "num_stages": 4}


def _unavailable() -> str | None:
    reason = cc.triton_unavailable()
    if reason is None and cc.triton_ptxas() is None:
        reason = "Triton's NVIDIA backend has no ptxas"
    return reason


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The script's JSON report for sm_90a + sm_80 (and nvcc when present), made once."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(f"cannot cross-compile Triton kernels here: {reason}")
    out = tmp_path_factory.mktemp("compile_check") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--arch", "sm_90a,sm_80", "--json", str(out), "--quiet",
           "--extra", "linear_gelu=" + json.dumps(OVERSIZED)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"compile_check crashed (rc {proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    data = json.loads(out.read_text())
    data["stdout"] = proc.stdout
    return data


def _shipped(records: list[dict]) -> list[dict]:
    """Records of the real configs: without the deliberately oversized extra one."""
    return [r for r in records if r.get("sources") != ["extra"]]


@pytest.fixture(scope="module")
def triton_records(report) -> list[dict]:
    return _shipped(report["triton"])


# ---------------------------------------------------------------------------------------------
# The checks on the real kernels
# ---------------------------------------------------------------------------------------------


def test_every_kernel_compiles_for_sm90a_and_sm80(report, triton_records):
    assert not cc.compile_failures(triton_records), "\n".join(cc.compile_failures(triton_records))
    assert {r["arch"] for r in triton_records} == {"sm_90a", "sm_80"}
    families = report["meta"]["families"]
    assert set(families) == set(cc.kernel_cases()) and {"row", "gemm"} == set(families.values()), families
    assert {r["op"] for r in triton_records} == set(families)
    problems = cc.missing_coverage(triton_records, [90, 80], families)
    assert not problems, "\n".join(problems)


def test_shared_memory_fits_the_card(triton_records):
    over = cc.smem_over_limit(triton_records)
    assert not over, "\n".join(over)


def test_gemms_use_wgmma_on_hopper(triton_records):
    gemms = [r for r in triton_records if r["family"] == "gemm" and r["arch"] == "sm_90a"]
    assert gemms
    missing = cc.gemm_without_wgmma(triton_records)
    assert not missing, "\n".join(missing)


def test_tma_variants_use_bulk_tensor_copies(triton_records):
    tma = [r for r in triton_records if r.get("tensor_descriptors")]
    assert tma and all(r["arch"] == "sm_90a" for r in tma), "TMA kernels must compile for Hopper only"
    missing = cc.tma_without_bulk_copies(triton_records)
    assert not missing, "\n".join(missing)


def test_row_kernels_do_not_spill(triton_records):
    rows = [r for r in triton_records if r["family"] == "row"]
    assert rows and all(r.get("registers", 0) > 0 for r in rows), "ptxas figures missing"
    spills = cc.spilling(triton_records, "triton", "row")
    assert not spills, "\n".join(spills)


def test_cuda_norm_kernels_compile_and_do_not_spill(report):
    if not report["cuda"]:
        pytest.skip("; ".join(s for s in report["skipped"] if s.startswith("cuda")) or "no nvcc records")
    cuda = report["cuda"]
    assert not cc.compile_failures(cuda), "\n".join(cc.compile_failures(cuda))
    assert {r["arch"] for r in cuda} == {"sm_90", "sm_80"}
    assert not cc.smem_over_limit(cuda)
    spills = cc.spilling(cuda, "cuda")
    assert not spills, "\n".join(spills)


def test_gemm_kernels_do_not_spill_unless_known(report, triton_records):
    """Every GEMM record carries its ptxas figures, and none spills but the listed known ones
    (the K = 936 configs of linear_gated_residual that spilled up to 3042 B on sm_90a are gone)."""
    gemms = [r for r in triton_records + report["fp8"] if r["family"] == "gemm" and r.get("ok")]
    assert gemms and all("spill_bytes" in r and r["registers"] > 0 for r in gemms)
    spills = cc.gemm_spills(triton_records + report["fp8"])
    assert not spills, "\n".join(spills)
    lgr = [r for r in triton_records if r["op"] == "linear_gated_residual" and r["arch"] == "sm_90a"]
    assert any(shape[2] == 936 for r in lgr for _, shape in r["shapes"]), "the unaligned K = 936 case was not compiled"


# ---------------------------------------------------------------------------------------------
# FP8: wgmma with e4m3 operands on Hopper, a one-line refusal on Ampere
# ---------------------------------------------------------------------------------------------


def test_fp8_gemms_use_e4m3_wgmma_on_hopper(report):
    fp8 = [r for r in report["fp8"] if r["arch"] == "sm_90a" and r["family"] == "gemm"]
    assert not cc.compile_failures(fp8), "\n".join(cc.compile_failures(fp8))
    assert {(r["mode"], r["epilogue"]) for r in fp8} == {(m, e) for m in cc.FP8_MODES for e in cc.FP8_EPILOGUES}
    missing = cc.fp8_without_e4m3_wgmma(fp8)
    assert not missing, "\n".join(missing)
    per_token = [r for r in fp8 if r["mode"] == "per_token"]
    assert per_token and all(r["wgmma_e4m3"] > 0 for r in per_token)
    assert any(r.get("tensor_descriptors") and r.get("tma_bulk_tensor") for r in fp8), "no FP8 TMA kernel"
    rows = [r for r in report["fp8"] if r["arch"] == "sm_90a" and r["family"] == "row"]
    assert rows and all(r.get("ok") and r.get("spill_bytes") == 0 for r in rows), "row quantization kernel"


def test_fp8_is_refused_on_ampere_in_one_line(report):
    a100 = [r for r in report["fp8"] if r["arch"] == "sm_80"]
    assert a100 and not any(r.get("ok") for r in a100)
    assert not cc.fp8_not_refused(report["fp8"]), "\n".join(cc.fp8_not_refused(report["fp8"]))
    assert "compute capability >= 8.9" in a100[0]["error"]


# ---------------------------------------------------------------------------------------------
# The checks can fail
# ---------------------------------------------------------------------------------------------


def test_oversized_config_is_over_the_limit_on_both_cards(report):
    extra = [r for r in report["triton"] if r.get("sources") == ["extra"]]
    assert {r["arch"] for r in extra} == {"sm_90a", "sm_80"}, "the oversized config was not compiled"
    flagged = cc.smem_over_limit(extra)
    assert len(flagged) == len(extra), f"not all flagged: {flagged}"
    assert all(r["shared_bytes"] > cc.SMEM_LIMIT[r["capability"]] for r in extra)
    assert any("smem_over_limit" in line for line in report["stdout"].splitlines())


def test_detectors_are_not_vacuous(triton_records):
    """Row kernels have no wgmma/TMA on Hopper; Ampere GEMMs use mma.sync, not wgmma."""
    rows_h = [r for r in triton_records if r["family"] == "row" and r["arch"] == "sm_90a"]
    assert rows_h and not any(r["wgmma"] or r["tma_bulk_tensor"] for r in rows_h)
    gemm_a = [r for r in triton_records if r["family"] == "gemm" and r["arch"] == "sm_80"]
    assert gemm_a and all(r["wgmma"] == 0 and r["mma_sync"] > 0 for r in gemm_a)
    pointer_h = [r for r in triton_records if r["family"] == "gemm" and r["arch"] == "sm_90a"
                 and not r["tensor_descriptors"]]
    assert pointer_h and not any(r["tma_bulk_tensor"] for r in pointer_h)


def _record(**kw) -> dict:
    base = {"kind": "triton", "op": "linear_gelu", "family": "gemm", "kernel": "k", "arch": "sm_90a", "capability": 90,
            "dtype": "bf16", "ok": True, "shared_bytes": 1024, "static_smem_bytes": 0, "wgmma": 4,
            "tma_bulk_tensor": 0, "tensor_descriptors": False, "spill_bytes": 0, "launch_meta": {}}
    return {**base, **kw}


def test_smem_rule_on_synthetic_records():
    assert cc.smem_over_limit([_record(shared_bytes=232448)]) == []
    assert len(cc.smem_over_limit([_record(shared_bytes=232449)])) == 1
    assert len(cc.smem_over_limit([_record(shared_bytes=232000, static_smem_bytes=1024)])) == 1
    a100 = dict(arch="sm_80", capability=80, wgmma=0)
    assert cc.smem_over_limit([_record(shared_bytes=166912, **a100)]) == []
    assert len(cc.smem_over_limit([_record(shared_bytes=166913, **a100)])) == 1


def test_instruction_rules_on_synthetic_records():
    assert len(cc.gemm_without_wgmma([_record(wgmma=0)])) == 1
    assert cc.gemm_without_wgmma([_record(wgmma=0, op="ln_modulate", family="row")]) == []  # not a GEMM
    assert cc.gemm_without_wgmma([_record(wgmma=0, arch="sm_80", capability=80)]) == []
    assert len(cc.tma_without_bulk_copies([_record(tensor_descriptors=True)])) == 1
    assert cc.tma_without_bulk_copies([_record(tensor_descriptors=True, tma_bulk_tensor=3)]) == []
    assert len(cc.spilling([_record(op="gated_residual", family="row", spill_bytes=4)], "triton", "row")) == 1
    assert cc.spilling([_record(spill_bytes=500)], "triton", "row") == []  # GEMM spills: reported only
    assert len(cc.compile_failures([_record(ok=False, error="CompilationError: boom")])) == 1
    assert len(cc.gemm_spills([_record(spill_bytes=500)])) == 1  # GEMM spills are findings now
    meta = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    known = _record(op="linear_gated_residual", arch="sm_80", capability=80, spill_bytes=64, launch_meta=meta)
    assert cc.gemm_spills([known]) == [] and len(cc.gemm_spills([{**known, "arch": "sm_90a"}])) == 1
    fp8 = dict(kind="fp8", mode="per_token", wgmma_e4m3=0)
    assert len(cc.fp8_without_e4m3_wgmma([_record(**fp8)])) == 1
    assert cc.fp8_without_e4m3_wgmma([_record(**{**fp8, "wgmma_e4m3": 2})]) == []
    assert len(cc.fp8_without_e4m3_wgmma([_record(kind="fp8", mode="weight_only", wgmma=0)])) == 1
    refusal = "NotImplementedError: fp8 GEMM: ... (CUDA compute capability >= 8.9), got compute capability (8, 0)"
    ampere = dict(kind="fp8", arch="sm_80", capability=80)
    assert cc.fp8_not_refused([_record(ok=False, error=refusal, **ampere)]) == []
    assert len(cc.fp8_not_refused([_record(ok=True, **ampere)])) == 1  # compiled: not refused
    assert len(cc.fp8_not_refused([_record(ok=False, error="CompilationError: fp8e4nv", **ampere)])) == 1
    assert len(cc.missing_coverage([_record()], [90], {"linear_gelu": "gemm"})) == 1  # no TMA variant
    assert cc.missing_coverage([_record(tensor_descriptors=True)], [90], {"linear_gelu": "gemm"}) == []
    assert len(cc.missing_coverage([_record()], [90], {"linear_gelu": "gemm", "ln_modulate": "row"})) == 2


def test_ptxas_log_parser():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 596 bytes spill stores, 600 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 144 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'bar' for 'sm_90a'
ptxas info    : Function properties for bar
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
"""
    got = cc.parse_ptxas_log(log)
    assert got["_Z3fooPf"] == {"registers": 255, "stack_bytes": 16, "spill_stores": 596, "spill_loads": 600,
                               "static_smem_bytes": 144}
    assert got["bar"]["registers"] == 40 and got["bar"]["static_smem_bytes"] == 0


def test_arch_names():
    assert cc.parse_archs(["sm_90a,sm_80", "sm_90"]) == [cc.HOPPER, cc.AMPERE]
    with pytest.raises(Exception, match="unknown arch"):
        cc.parse_archs(["sm_70"])


def test_a_process_that_failed_to_start_is_retried(monkeypatch):
    """CI saw one ptxas ``execve`` fail with EFAULT while a compile ran beside it: retried."""
    calls = []

    def flaky_run(cmd, **kwargs):
        calls.append(cmd)
        if len(calls) < 3:
            raise OSError(14, "Bad address")
        return subprocess.CompletedProcess(cmd, 0, "ok", "")

    monkeypatch.setattr(cc.subprocess, "run", flaky_run)
    monkeypatch.setattr(cc.time, "sleep", lambda s: None)
    assert cc._run_retrying_exec(["ptxas"]).stdout == "ok" and len(calls) == 3

    def never_starts(cmd, **kwargs):
        raise OSError(14, "Bad address")

    monkeypatch.setattr(cc.subprocess, "run", never_starts)
    with pytest.raises(OSError):
        cc._run_retrying_exec(["ptxas"], attempts=2)
