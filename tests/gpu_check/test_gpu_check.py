"""The prepared GPU check, rehearsed on the CPU: `benchmarks/gpu_check.sh --dry-run`.

The dry run goes through the suite's real code paths (the same generators, timestep forms and
torch.compile calls) on a tiny DiT. These tests read the files it leaves and check what the GPU
run must deliver: every stage's file, every config measured, each compiled baseline compiled
once per batch (once per stage and batch for compile_pruned), the ratios and targets computed
in the run, at most 8 result files (what the device tool returns), and an exit status that
names the failed stages while the later stages still run. The sdxl stage runs diffusers' tiny
SDXL test U-Net through the same configs as the SDXL base U-Net on the GPU; the second call
(``--part 2``) runs a tiny PixArt through the configs of PixArt-Sigma 1024 px, the third and fourth
(``--part 3``, ``--part 4``) a tiny Flux and SD3.5 through those of FLUX.1-dev and SD3.5-Large, the
fifth (``--part 5``) a tiny DiT through the stacked benchmark (FP8 + first-block cache, per image),
the sixth (``--part 6``) tiny three- and ten-stage DiT mosaics through the K-stage runtime benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402

pytest.importorskip("pytest_timeout", reason="the check runs its GPU tests with --timeout (pytest-timeout)")


def run_check(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    full_env.update(OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run_check(out)
    assert proc.returncode == 0, f"dry run failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    return out


def load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def run_part(out: Path, part: str, stage: str) -> tuple[dict, str]:
    """``gpu_check.sh --dry-run --part PART`` (parts 2 and up): exit 0, only the log and the
    stage's json left, no part-1 stage run, no failed config; its results and the log."""
    proc = run_check(out, "--part", part)
    log = (out / "check.log").read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{log[-3000:]}\n{proc.stderr[-2000:]}"
    assert sorted(p.name for p in out.iterdir()) == ["check.log", f"{stage}.json"]
    assert f"stage {stage}: ok" in log and "stage suite" not in log and "stage tests" not in log
    result = load(out, f"{stage}.json")
    assert not result["errors"], result["errors"]
    return result, log


def test_every_stage_leaves_its_file_and_at_most_eight(dry_run):
    files = sorted(p.name for p in dry_run.iterdir())
    assert files == sorted(["check.log", "correctness.json", "kernels.json", "e2e.json", "e2e.png",
                            "profile.txt", "sdxl.json", "gpu_tests.log"]), files
    log = (dry_run / "check.log").read_text()
    for stage in ("correctness", "kernels", "e2e", "profile", "suite", "sdxl", "tests"):
        assert f"stage {stage}: ok" in log, f"no ok line for {stage}"
    assert "exit status 0" in log
    assert "passed" in (dry_run / "gpu_tests.log").read_text()


def test_correctness_records_errors_backends_and_graphs(dry_run):
    result = load(dry_run, "correctness.json")
    names = [c["check"] for c in result["checks"]]
    assert names[0] == "engine_dense_vs_diffusers" and len(names) == 4, names  # dense + 3 stages of 0.5
    for check in result["checks"]:
        assert check["passed"] and check["rel_err"] <= check["limit"]
        assert check["dispatch"], "the backend of every op must be recorded"
        assert {"graphs_captured", "graphs_failed"} <= set(check)
    assert result["env"]["commit"] and result["env"]["torch"]


def test_e2e_measures_every_config_and_compiles_once_per_batch(dry_run):
    result = load(dry_run, "e2e.json")
    assert not result["errors"], result["errors"]
    by = {(r["config"], r["batch"]): r for r in result["records"]}
    batches = sorted({b for _, b in by}, reverse=True)
    suite_args = type("A", (), {"batches": batches})
    assert list(by) == gpu_suite.e2e_plan(suite_args), "every planned config, in order"
    for (name, _), rec in by.items():
        assert rec["ms_per_forward"] > 0 and rec["ms_per_sample_run"] > 0
        stages = len(rec["per_stage_ms"])
        assert list(rec["compile_s"]) == list(rec["per_stage_ms"]), rec  # compile time per stage
        if name == "diffusers_compile_dense":
            assert rec["dynamo_graphs_compiled"] == 1, f"{name}@{rec['batch']} recompiled: {rec}"
            first, *rest = rec["compile_s"].values()
            assert first > 0 and all(first >= r for r in rest), rec  # compiled on the first stage's first pass
        elif name == "compile_pruned_0.5":
            assert stages == 3 and rec["dynamo_graphs_compiled"] == stages, rec
        else:
            assert rec["dynamo_graphs_compiled"] == 0, rec
    assert set(result["targets"]) == set(gpu_suite.TARGETS)
    assert all(t["ratio"] > 0 for t in result["targets"].values())
    assert any(k.startswith("engine_dense_unfused/engine_dense@") for k in result["ratios"])
    assert (dry_run / "e2e.png").stat().st_size > 1000


def test_sdxl_times_every_config_at_every_stage_and_the_pf8_ratio(dry_run):
    """sdxl.json: every config at each mosaic stage's timestep, step-weighted over Euler-50, the
    compiled U-Net compiled once for all timesteps, the ratios from the records, the prune time."""
    import suite_sdxl

    result = load(dry_run, "sdxl.json")
    assert not result["errors"], result["errors"]
    assert {"env", "model", "dtype", "inputs", "scheduler", "stages", "records", "ratios", "targets", "memory",
            "prune_time"} <= set(result), sorted(result)
    assert result["inputs"]["sample"][0] == 2 and result["inputs"]["time_ids"] == [2, 6]
    stages = result["stages"]
    assert [s["name"] for s in stages] == ["early", "middle", "late"]
    assert sum(s["steps"] for s in stages) == 50
    assert all(s["t_start"] <= s["timestep"] < s["t_end"] for s in stages), stages
    assert len({round(s["sparsity"], 6) for s in stages}) > 1, "the stages have different widths"
    mean = sum(s["sparsity"] * s["steps"] for s in stages) / 50
    assert abs(mean - 0.3) < 0.02, mean
    by = {r["config"]: r for r in result["records"]}
    assert list(by) == list(suite_sdxl.PLAN)
    for name, rec in by.items():
        assert list(rec["per_stage_ms"]) == [str(s["timestep"]) for s in stages], rec
        weighted = sum(rec["per_stage_ms"][str(s["timestep"])] * s["steps"] for s in stages) / 50
        assert rec["ms_per_forward"] == pytest.approx(weighted)
        assert rec["dynamo_graphs_compiled"] == (1 if name == "diffusers_compile_dense" else 0), rec
    pf8 = result["targets"]["PF8_sdxl_mosaic_0.3_vs_compile_dense"]
    assert pf8["target"] == 1.4
    assert pf8["ratio"] == pytest.approx(by["diffusers_compile_dense"]["ms_per_forward"] / by["mosaic_0.3"]["ms_per_forward"])
    assert set(result["ratios"]) == {f"{a}/{b}" for a, b in suite_sdxl.RATIO_PAIRS}
    assert 1.0 < result["memory"]["mosaic_0.3"]["ratio"] < 1.2 and result["memory"]["engine_dense"]["ratio"] > 0
    assert result["prune_time"]["pruner"] == "obs" and result["prune_time"]["seconds"] > 0


def test_part_two_times_pixart_per_step_and_step_weighted(tmp_path):
    """`gpu_check.sh --part 2`: only env and the pixart stage; pixart.json has every config at each
    stage's timestep of DPM-Solver++ 20, the step-weighted mean, the target ratio and memory."""
    import suite_pixart

    result, _ = run_part(tmp_path, "2", "pixart")
    assert result["inputs"]["hidden_states"][0] == 2 and result["inputs"]["encoder_attention_mask"][0] == 2
    stages = result["stages"]
    assert [s["name"] for s in stages] == ["early", "middle", "late"] and sum(s["steps"] for s in stages) == 20
    mean = sum(s["sparsity"] * s["steps"] for s in stages) / 20
    assert abs(mean - 0.3) < 0.03, mean
    by = {r["config"]: r for r in result["records"]}
    assert list(by) == list(suite_pixart.PLAN)
    for name, rec in by.items():
        weighted = sum(rec["per_stage_ms"][str(s["timestep"])] * s["steps"] for s in stages) / 20
        assert rec["ms_per_forward"] == pytest.approx(weighted)
        assert rec["dynamo_graphs_compiled"] == (1 if name == "diffusers_compile_dense" else 0), rec
    target = result["targets"]["pixart_mosaic_0.3_vs_compile_dense"]
    assert target["target"] == 1.4
    assert target["ratio"] == pytest.approx(by["diffusers_compile_dense"]["ms_per_forward"]
                                             / by["mosaic_0.3"]["ms_per_forward"])
    assert result["memory"]["mosaic_0.3"]["ratio"] > 0 and result["memory"]["engine_dense"]["ratio"] > 0


@pytest.mark.parametrize("part, family, steps, batch", [("3", "flux", 28, 1), ("4", "sd3", 28, 2)])
def test_parts_three_and_four_time_the_flow_families(tmp_path, part, family, steps, batch):
    """`gpu_check.sh --part 3` (FLUX.1-dev) and `--part 4` (SD3.5-Large), on tiny configs: only env and
    the family's stage; its json has every config at each stage's timestep of flow-matching Euler 28
    steps (the first step, t = 1000, in the early stage), the step-weighted mean, the 1.4x target
    and the memory of both engine configs (Flux frees each once timed)."""
    result, log = run_part(tmp_path, part, family)
    assert "stage pixart" not in log
    assert result["inputs"]["hidden_states"][0] == batch
    stages = result["stages"]
    assert [s["name"] for s in stages] == ["early", "middle", "late"] and sum(s["steps"] for s in stages) == steps
    assert stages[0]["t_end"] == 1001 and stages[0]["timestep"] == 1000, stages
    by = {r["config"]: r for r in result["records"]}
    assert set(by) == {"diffusers_eager_dense", "mosaic_0.3", "diffusers_compile_dense", "engine_dense"}
    for name, rec in by.items():
        weighted = sum(rec["per_stage_ms"][str(s["timestep"])] * s["steps"] for s in stages) / steps
        assert rec["ms_per_forward"] == pytest.approx(weighted)
        assert rec["dynamo_graphs_compiled"] == (1 if name == "diffusers_compile_dense" else 0), rec
    target = result["targets"][f"{family}_mosaic_0.3_vs_compile_dense"]
    assert target["target"] == 1.4 and target["ratio"] == pytest.approx(
        by["diffusers_compile_dense"]["ms_per_forward"] / by["mosaic_0.3"]["ms_per_forward"])
    assert result["memory"]["mosaic_0.3"]["ratio"] > 0 and result["memory"]["engine_dense"]["ratio"] > 0


def test_kernels_run_at_the_mosaics_stage_shapes(dry_run):
    rows = load(dry_run, "kernels.json")["rows"]
    ops = {r["case"].split("[")[0] for r in rows}
    assert {"ln_modulate", "gated_residual_ln_modulate", "linear_gelu", "linear", "attention"} <= ops
    assert all("error" not in r for r in rows if r["provider"] == "reference")
    fc1 = {tuple(r["shape"])[1] for r in rows if r.get("op") == "linear_gelu"}  # (M, N, K): N
    assert len(fc1) >= 2, f"fc1 widths of several stages expected, got {fc1}"


def test_profile_has_both_tables(dry_run):
    text = (dry_run / "profile.txt").read_text()
    assert "## engine_dense" in text and "## diffusers_compile_dense" in text


def test_failed_stages_set_their_bits_and_later_stages_still_run(tmp_path):
    """A build that cannot work (no CUDA toolkit) and a suite limited to one stage: exit status
    build | correctness | kernels | e2e (1 + 2 + 4 + 8), profile and tests still ran."""
    proc = run_check(tmp_path, MOSAIC_CHECK_BUILD="1", CUDA_HOME="/nonexistent", CUDACXX="/bin/false",
                     MOSAIC_CHECK_SUITE_STAGES="profile")
    log = (tmp_path / "check.log").read_text()
    assert proc.returncode == 1 | 2 | 4 | 8, f"exit {proc.returncode}\n{log[-3000:]}"
    assert "stage build: failed" in log and "stage profile: ok" in log and "stage tests: ok" in log
    assert (ROOT / "mosaic_kernels").is_dir()


def test_guard_fires_and_is_seen_through_wrapping_exceptions():
    """torch.compile re-raises errors from inside a compile wrapped in its own exception types:
    a guard firing there must still count as a timeout, not as a failed config."""
    import time

    with pytest.raises(gpu_suite.StageTimeout):
        with gpu_suite.wall_clock_guard(0.05):
            time.sleep(1)
    try:
        try:
            with gpu_suite.wall_clock_guard(0.05):
                time.sleep(1)
        except gpu_suite.StageTimeout as exc:
            raise RuntimeError("compile failed") from exc
    except RuntimeError as wrapped:
        assert gpu_suite.is_timeout(wrapped)
    assert not gpu_suite.is_timeout(RuntimeError("a real failure"))


def test_part_five_times_the_stacked_recipe_per_image(tmp_path):
    """`gpu_check.sh --part 5` on the tiny DiT: only env and the stacked stage; stacked.json has every
    config of the plan per image, compile time per stage with no recompile after the first passes,
    block evaluations per image from two independent counts (the engine dense model's weighted
    count equals its block count; a 0.5 mosaic's weighs about half), the two targets as ratios of
    the records, and the log says that FP8 ran the torch fallbacks."""
    import suite_stacked

    result, log = run_part(tmp_path, "5", "stacked")
    assert "no FP8 tensor cores here" in log and "torch fallback of mosaic_kernels.fp8_gemm" in log
    assert "no FP8 speed" in log
    assert result["fp8"]["fp8_speed"] is False and "fallback" in result["fp8"]["mosaic"]
    assert result["steps"] == 50 and result["images_per_run"] * 2 == result["batch"]
    stages = result["stages"]
    assert [s["name"] for s in stages] == ["early", "middle", "late"] and sum(s["steps"] for s in stages) == 50
    by = {r["config"]: r for r in result["records"]}
    assert list(by) == list(suite_stacked.PLAN)
    layers = 2  # DIT_TINY
    for name, rec in by.items():
        assert list(rec["compile_s"]) == [str(s["timestep"]) for s in stages], rec
        assert rec["recompiles_after_first_passes"] == 0, rec
        assert rec["ms_per_image"] == pytest.approx(rec["ms_per_sample_run"] / result["images_per_run"])
        assert 0 < rec["block_evaluations_per_image"] <= 2 * 50 * layers, rec
    assert by["diffusers_compile_dense"]["dynamo_graphs_compiled"] == 1
    assert by["diffusers_compile_dense"]["compile_s"][str(stages[0]["timestep"])] > 0
    assert by["diffusers_compile_fp8_fbc"]["dynamo_graphs_compiled"] == 1  # regional: one graph, every block
    for name in ("mosaic_0.5_fp8_fbc", "engine_dense_fp8_fbc"):
        assert by[name]["dynamo_graphs_compiled"] == 0 and by[name]["dispatch"].get("fp8_gemm:torch"), by[name]
    engine = by["engine_dense_fp8_fbc"]
    assert engine["dense_block_equivalents_per_image"] == pytest.approx(engine["block_evaluations_per_image"])
    mosaic = by["mosaic_0.5_fp8_fbc"]
    share = mosaic["dense_block_equivalents_per_image"] / mosaic["block_evaluations_per_image"]
    assert 0.35 < share < 0.65, share
    assert mosaic["memory"]["mosaic_bytes"] < engine["memory"]["mosaic_bytes"]
    for name, (num, den, target) in suite_stacked.TARGETS.items():
        got = result["targets"][name]
        assert got["target"] == target and got["ratio"] == pytest.approx(by[num]["ms_per_image"] / by[den]["ms_per_image"])
    assert {t["target"] for t in result["targets"].values()} == {4.0, 1.5}


def test_fp8_linear_scaled_mm_path_matches_its_fallback_and_the_float_layer():
    """`FP8Linear`: the ``torch._scaled_mm`` path (the GPU's; torch runs it on the CPU too) and the
    dequantized fallback agree, and both stay within e4m3's error of the float ``nn.Linear``."""
    import torch
    from fp8_linear import FP8Linear, swap_fp8_linears

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    fp8 = FP8Linear(linear)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 48)
    fallback = fp8(x)
    with torch.no_grad():
        ref = linear(x)
    assert ((fallback - ref).norm() / ref.norm()).item() < 0.05  # e4m3: 3 mantissa bits
    assert ((fallback - ref).norm() / ref.norm()).item() > 1e-4  # it did quantize
    fp8.uses_scaled_mm = True
    try:
        scaled = fp8(x)
    except (RuntimeError, NotImplementedError) as exc:  # a torch without CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm does not run on this CPU: {exc}")
    torch.testing.assert_close(scaled, fallback, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="include"):
        swap_fp8_linears(torch.nn.Sequential(linear), ("attn1.",))
    with pytest.raises(ValueError, match="multiples of 16"):
        FP8Linear(torch.nn.Linear(10, 16))


def test_diffusers_block_counter_sits_under_the_first_block_cache():
    """The stacked stage's row counter on diffusers' DiT with diffusers' first-block cache: with a
    threshold every step passes, only the first step runs the tail blocks (a counter outside the
    hooks would count every block at every step), and the reset after a run makes the next run
    compute its first step again."""
    import torch
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from dit_models import DIT_TINY, build_dense
    from suite_stacked import RowCounter, cache_context, compile_blocks

    from mosaicdiff.core.sampling import sample

    layers, steps, images = 3, 4, 2
    model = build_dense(dict(DIT_TINY, num_layers=layers), "cpu", torch.float32)
    compile_blocks(model.transformer_blocks, "eager")
    counter = RowCounter(model.transformer_blocks)
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=1e9))
    for _ in range(2):
        counter.rows = 0
        with torch.no_grad(), cache_context(model):
            sample(model, torch.tensor([1, 2]), num_inference_steps=steps, guidance_scale=4.0, progress=False,
                   generator=torch.Generator().manual_seed(0))
        rows = 2 * images  # CFG
        assert counter.rows == rows * (layers + (steps - 1)), counter.rows


def test_stacked_stage_records_a_failed_config_and_stops_on_its_guard():
    """A config that fails is recorded and the stage goes on; a guard timeout wrapped by
    torch.compile's errors still ends the stage."""
    from suite_stacked import record_failure

    result = {"errors": []}
    record_failure(result, "mosaic_0.5_fp8_fbc", NotImplementedError("no FP8 tensor cores"))
    assert result["errors"] == [{"config": "mosaic_0.5_fp8_fbc", "error": "NotImplementedError: no FP8 tensor cores"}]
    try:
        raise RuntimeError("compile failed") from gpu_suite.StageTimeout("past its guard")
    except RuntimeError as wrapped:
        with pytest.raises(gpu_suite.StageTimeout):
            record_failure(result, "diffusers_compile_dense", wrapped)
    assert len(result["errors"]) == 1


def test_part_six_times_k_stages_against_three(tmp_path):
    """`gpu_check.sh --part 6` on the tiny DiT: only env and the kstages stage; kstages.json has the
    three-stage and the ten-stage stepwise mosaic per target, each over DDIM 50 at its mean sparsity,
    its stage shape groups equal to the stages grouped by their widths (read off the stage table),
    one tuned config per distinct attention shape, graph memory per stage (none captured on the
    CPU), per-image times with graphs on and off, and the ratios of the records."""
    import suite_kstages

    result, _ = run_part(tmp_path, "6", "kstages")
    assert result["steps"] == 50 and result["images_per_run"] * 2 == result["batch"]
    by = {r["config"]: r for r in result["records"]}
    assert [(r["config"], r["num_stages"], r["target_sparsity"]) for r in result["records"]] == suite_kstages.plan()
    for name, rec in by.items():
        stages = rec["stages"]
        assert len(stages) == rec["num_stages"] and sum(s["steps"] for s in stages) == 50, rec
        mean = sum(s["sparsity"] * s["steps"] for s in stages) / 50
        assert abs(mean - rec["target_sparsity"]) < 0.02, (name, mean)
        by_width: dict[tuple, list] = {}
        for s in stages:
            by_width.setdefault((s["heads"], s["mlp_width"]), []).append(s["name"])
        assert rec["stage_shape_groups"] == list(by_width.values()), rec["stage_shape_groups"]
        assert rec["distinct_stage_shapes"] == len(by_width)
        assert rec["distinct_attention_shapes"] == len({s["heads"] for s in stages})
        assert len(rec["tuned_configs"]) == rec["distinct_attention_shapes"]
        assert list(rec["graph_bytes"]) == [s["name"] for s in stages] and rec["graph_bytes_total"] == 0
        assert rec["graphs_on"]["graphs_captured"] == 0  # CPU: eager
        for mode in ("graphs_on", "graphs_off"):
            assert rec[mode]["ms_per_image"] == pytest.approx(rec[mode]["ms_per_sample_run"] / result["images_per_run"])
        assert rec["autotune_s"] >= 0 and rec["memory"]["mosaic_bytes"] > 0
    tens = [r for r in result["records"] if r["num_stages"] == 10]
    assert len(tens) == 2 and any(r["distinct_stage_shapes"] < 10 for r in tens), "the tiny DiT's stages share widths"
    for target in suite_kstages.TARGETS:
        ten, three = by[f"stepwise_10_{target}"], by[f"mosaic_3_{target}"]
        for mode in ("graphs_on", "graphs_off"):
            assert result["ratios"][f"stepwise_10_{target}/mosaic_3_{target}:{mode}"] == pytest.approx(
                ten[mode]["ms_per_image"] / three[mode]["ms_per_image"])
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--part", "7"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--part must be 1, 2, 3, 4, 5 or 6, got '7'" in bad.stderr
