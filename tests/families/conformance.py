"""The checks every registered model family passes (diffusers' tester-mixin pattern).

A test class mixes in `FamilyConformance` and provides a ``family`` fixture (a
`mosaicdiff.core.family.Family`); every check runs through the family's ``testing`` module
(``tiny_dense``, ``tiny_calibration``, ``tiny_inputs``, ``call``) and the family's public classes
only, so a new family gets the whole suite by registering. Tolerances: fp32 on CPU, outputs O(1);
only summation orders differ (fused or batched GEMMs), so 5e-5 absolute.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close

import mosaicdiff
from mosaic_kernels import ops as kernel_ops
from mosaicdiff.api import prune_stages
from mosaicdiff.core import model_folder
from mosaicdiff.core import quantize as quantize_module
from mosaicdiff.core.quantize import quantized_modules

ATOL, RTOL = 5e-5, 1e-5
#: Three stages: late [0, 300), middle [300, 700), early [700, 1000); the middle pruned least.
BOUNDARIES, SPARSITIES = (300, 700), (0.5, 0.25, 0.5)
MEMORY_KEYS = {"shared_params", "shared_bytes", "producer_params", "producer_bytes", "stages", "mosaic_params",
               "mosaic_bytes", "dense_params", "dense_bytes", "dense_dtype", "dense_bytes_same_dtype", "ratio",
               "dense_params_dedup", "ratio_dedup", "graph_bytes"}


def three_stage_mosaic(family, dense, share_producers: bool):
    """A three-stage mosaic of `dense` (magnitude selection: no calibration pass, nested kept sets)."""
    stages = prune_stages(dense, None, 0.4, pruner="magnitude", boundaries=BOUNDARIES, stage_sparsities=SPARSITIES,
                          align=None, progress=False, share_producers=True)
    return family.mosaic_class.from_dense(dense, stages, share_producers=share_producers)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A quantized model's float8 weights as fp32 values, scales removed: the FP8 oracle (the
    unquantized ops on ``q.float() * scale``)."""
    ref = copy.deepcopy(model)
    for _, module in quantized_modules(ref):
        for name in type(module).fp8_weights:
            w = getattr(module, name, None)
            if w is not None and w.dtype == torch.float8_e4m3fn:
                scale = getattr(module, f"{name}_scale")
                setattr(module, name, nn.Parameter(w.float() * scale[:, None], requires_grad=False))
                delattr(module, f"{name}_scale")
    return ref


def stage_times(mosaic) -> list[int]:
    """One timestep inside each stage (its middle)."""
    return [(t0 + t1) // 2 for _, t0, t1, _ in mosaic.stage_ranges]


class FamilyConformance:
    """Mixin of the conformance checks; the test class provides the ``family`` fixture."""

    @pytest.fixture
    def kit(self, family):
        """The family's testing module, its tiny dense model and a batch of inputs."""
        testing = family.testing_module()
        dense = testing.tiny_dense()
        x, cond = testing.tiny_inputs(dense, 3)
        return testing, dense, x, cond

    @pytest.fixture
    def mosaic(self, family, kit):
        return three_stage_mosaic(family, kit[1], share_producers=True)

    def test_the_registry_finds_the_family(self, family, kit):
        assert mosaicdiff.families.family_for(kit[1]) is family

    def test_zero_sparsity_mosaic_equals_dense(self, family, kit):
        testing, dense, x, cond = kit
        mosaic = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
        assert isinstance(mosaic, family.mosaic_class) and mosaic.num_stages == 1
        for t in (0, 500, 999):
            tt = torch.full((x.shape[0],), t)
            assert_close(testing.call(mosaic, x, tt, cond), testing.call(dense, x, tt, cond), atol=ATOL, rtol=RTOL)

    def test_obs_pruning_on_the_tiny_calibration(self, family, kit):
        """The whole method: calibration passes (both CFG branches where the family has a null
        condition), OBS with compensation, the family's mosaic."""
        testing, dense, x, cond = kit
        mosaic = mosaicdiff.prune(dense, testing.tiny_calibration(dense), 0.3, boundaries=BOUNDARIES,
                                  samples_per_stage=4, align=None, progress=False)
        assert isinstance(mosaic, family.mosaic_class) and mosaic.num_stages == 3
        assert mosaic.meta["method"] == "mosaic" and mosaic.meta["pruner"] == "obs"
        for t in stage_times(mosaic):
            assert torch.isfinite(testing.call(mosaic, x, torch.full((3,), t), cond)).all()

    def test_stages_differ_and_the_middle_is_pruned_least(self, kit, mosaic):
        testing, dense, x, cond = kit
        assert [round(r[3], 2) for r in mosaic.stage_ranges] == [0.5, 0.25, 0.5]
        outs = [testing.call(mosaic, x, torch.full((3,), t), cond) for t in stage_times(mosaic)]
        dense_out = testing.call(dense, x, torch.full((3,), stage_times(mosaic)[0]), cond)
        assert (outs[0] - dense_out).abs().max() > 1e-3, "a pruned stage must differ from the dense model"

    def test_shared_producers_equal_copies(self, family, kit, mosaic):
        testing, dense, x, cond = kit
        copies = three_stage_mosaic(family, dense, share_producers=False)
        assert mosaic.producer_storage is not None and copies.producer_storage is None
        for t in stage_times(mosaic):
            tt = torch.full((3,), t)
            assert_close(testing.call(mosaic, x, tt, cond), testing.call(copies, x, tt, cond), atol=ATOL, rtol=RTOL)
        assert mosaic.memory_report()["mosaic_bytes"] < copies.memory_report()["mosaic_bytes"]

    def test_save_and_load_round_trip(self, family, kit, mosaic, tmp_path):
        testing, _, x, cond = kit
        mosaic.save_pretrained(tmp_path / "m")
        loaded = family.mosaic_class.from_pretrained(tmp_path / "m")
        assert type(loaded) is family.mosaic_class and loaded.stage_ranges == mosaic.stage_ranges
        for t in stage_times(mosaic):
            tt = torch.full((3,), t)
            assert_close(testing.call(loaded, x, tt, cond), testing.call(mosaic, x, tt, cond), atol=1e-6, rtol=1e-6)
        assert loaded.memory_report() == mosaic.memory_report()
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        assert config["format"] == family.mosaic_class.format_name and config["_class_name"] == type(mosaic).__name__
        half = family.mosaic_class.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}

    def test_an_interrupted_save_loads_the_new_weights(self, family, kit, mosaic, tmp_path, monkeypatch):
        """A crash between the config's rename (the commit) and the weights' rename: the loader pairs
        the new config with the new, staged weights, and the next save tidies up."""
        testing, dense, x, cond = kit
        target = tmp_path / "m"
        old = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
        old.save_pretrained(target)
        real_replace, dead = os.replace, []

        def crash_after_commit(src, dst):
            if dead:  # the process died at the commit: no later rename happens
                raise OSError(errno.EIO, "dead")
            real_replace(src, dst)
            if Path(dst) == target / "config.json":
                dead.append(True)
                raise KeyboardInterrupt

        monkeypatch.setattr(os, "replace", crash_after_commit)
        with pytest.raises(KeyboardInterrupt):
            mosaic.save_pretrained(target)
        monkeypatch.undo()
        loaded = family.mosaic_class.from_pretrained(target)
        assert loaded.stage_ranges == mosaic.stage_ranges
        tt = torch.full((3,), stage_times(mosaic)[0])
        assert_close(testing.call(loaded, x, tt, cond), testing.call(mosaic, x, tt, cond), atol=1e-6, rtol=1e-6)
        mosaic.save_pretrained(target)
        assert not [p for p in os.listdir(target) if p.startswith(model_folder.STAGING_PREFIX)]

    @pytest.mark.parametrize("crash_at", ["before the commit", "after the commit"])
    def test_an_interrupted_resave_never_mixes_config_and_weights(self, family, kit, mosaic, tmp_path, monkeypatch,
                                                                 crash_at):
        """A re-save whose tensors have the old shapes (another dense model, the same stage widths:
        the old weights would load under the new config without a shape error): killed before the
        config's rename the folder loads the old model, killed after it the new one."""
        testing, _, x, cond = kit
        target = tmp_path / "m"
        mosaic.save_pretrained(target)
        other = three_stage_mosaic(family, testing.tiny_dense(seed=1), share_producers=True)
        assert [tuple(v.shape) for v in other.state_dict().values()] == \
            [tuple(v.shape) for v in mosaic.state_dict().values()]
        real_replace, dead = os.replace, []

        def crash(src, dst):
            if dead:  # the process died: no later rename happens
                raise OSError(errno.EIO, "dead")
            if Path(dst) == target / "config.json":
                if crash_at == "after the commit":
                    real_replace(src, dst)
                dead.append(True)
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            other.save_pretrained(target)
        monkeypatch.undo()
        loaded = family.mosaic_class.from_pretrained(target)
        want = other if crash_at == "after the commit" else mosaic
        assert loaded.config.stages == want.config.stages
        tt = torch.full((3,), stage_times(mosaic)[0])
        assert_close(testing.call(loaded, x, tt, cond), testing.call(want, x, tt, cond), atol=1e-6, rtol=1e-6)

    def test_mismatched_weights_are_refused(self, family, mosaic, tmp_path):
        mosaic.save_pretrained(tmp_path / "m")
        weights = tmp_path / "m" / "model.safetensors"
        tensors = load_file(str(weights))
        key = next(k for k, v in tensors.items() if k.startswith("stage_blocks.") and v.dim() == 2)
        for bad, message in ((tensors[key].to(torch.float16), "has dtype torch.float16"),
                             (tensors[key].to(torch.int32), "has dtype torch.int32"),
                             (tensors[key][:, :-1].contiguous(), "has shape"),
                             (None, "lacks the tensor")):
            edited = {k: v for k, v in tensors.items() if k != key}
            if bad is not None:
                edited[key] = bad
            save_file(edited, str(weights))  # no save id: only the tensors are checked
            with pytest.raises(ValueError, match=rf"{family.mosaic_class.__name__}\.from_pretrained: .*{message}"):
                family.mosaic_class.from_pretrained(tmp_path / "m")
        save_file({**tensors, "stage_blocks.9.9.extra": torch.zeros(1)}, str(weights))
        with pytest.raises(ValueError, match="tensors the config does not describe"):
            family.mosaic_class.from_pretrained(tmp_path / "m")
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "format_version": "99.0"}))
        with pytest.raises(ValueError, match="format version 99.0"):
            family.mosaic_class.from_pretrained(tmp_path / "m")

    def test_stage_for(self, mosaic):
        for i, (_, t0, t1, _) in enumerate(mosaic.stage_ranges):
            assert mosaic.stage_for(t0) == mosaic.stage_for(t1 - 1) == mosaic.stage_for(torch.tensor([t0, t1 - 1])) == i
            assert mosaic.stage_for(torch.tensor(float(t0))) == i
        top = max(t1 for _, _, t1, _ in mosaic.stage_ranges)  # 1000; 1001 under flow matching (t = T at s = 1)
        with pytest.raises(ValueError, match="outside every stage"):
            mosaic.stage_for(top)
        with pytest.raises(ValueError, match="span stages"):
            mosaic.stage_for(torch.tensor([10, 990]))

    def test_memory_report_schema(self, mosaic):
        report = mosaic.memory_report()
        assert set(report) == MEMORY_KEYS
        assert list(report["stages"]) == mosaic.stage_names
        assert all(set(s) == {"params", "bytes", "sparsity"} for s in report["stages"].values())
        parts = report["shared_bytes"] + report["producer_bytes"] + sum(s["bytes"] for s in report["stages"].values())
        assert report["mosaic_bytes"] == parts and report["producer_params"] > 0
        assert report["dense_params"] > report["shared_params"] and report["dense_dtype"] == "float32"
        assert math.isclose(report["ratio"], report["mosaic_bytes"] / report["dense_bytes_same_dtype"])
        # the ratio compares like with like: a bf16 mosaic against the dense model at bf16
        half = copy.deepcopy(mosaic).to(torch.bfloat16).memory_report()
        assert half["mosaic_bytes"] * 2 == report["mosaic_bytes"] and half["dense_bytes"] == report["dense_bytes"]
        assert math.isclose(half["ratio"], report["ratio"]) and math.isclose(half["ratio_dedup"], report["ratio_dedup"])

    def test_a_mixed_stage_batch_equals_its_rows_one_by_one(self, kit, mosaic):
        testing, _, x, cond = kit
        t = torch.tensor(stage_times(mosaic)[::-1])  # one row per stage, in reverse order
        got = testing.call(mosaic, x, t, cond)
        rows = []
        for i in range(3):
            one = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else
                   {kk: vv[i:i + 1] for kk, vv in v.items()} if isinstance(v, dict) else v for k, v in cond.items()}
            rows.append(testing.call(mosaic, x[i:i + 1], t[i:i + 1], one))
        assert_close(got, torch.cat(rows), atol=ATOL, rtol=RTOL)

    @pytest.mark.parametrize("share", [True, False], ids=["shared-producers", "copies"])
    def test_quantize_fp8_runs_every_compact_gemm_in_float8(self, kit, family, share):
        """`mosaicdiff.quantize`: every GEMM weight of the compact blocks (and of the producer
        storage) becomes float8 with its row scales; each stage computes with the scales of its own
        rows (a wrong slice or a GEMM left on ``F.linear`` fails the oracle or raises)."""
        testing, dense, x, cond = kit
        mosaic = three_stage_mosaic(family, dense, share_producers=share)
        original, before = copy.deepcopy(mosaic), mosaic.memory_report()
        assert mosaicdiff.quantize(mosaic, "fp8") is mosaic
        compact = [mosaic.stage_blocks] + ([mosaic.producer_storage] if mosaic.producer_storage is not None else [])
        weights = {n: p for part in compact for n, p in part.named_parameters() if p.dim() == 2}
        assert weights and all(p.dtype == torch.float8_e4m3fn for p in weights.values()), \
            sorted(n for n, p in weights.items() if p.dtype != torch.float8_e4m3fn)
        after = mosaic.memory_report()

        def compact_bytes(report):
            return report["producer_bytes"] + sum(s["bytes"] for s in report["stages"].values())

        # fp32 -> 1 byte a weight, plus 4 per row scale; the skeleton is not quantized
        assert after["shared_bytes"] == before["shared_bytes"]
        assert compact_bytes(after) < 0.5 * compact_bytes(before), (compact_bytes(after), compact_bytes(before))
        oracle = dequantized_copy(mosaic)
        for t in stage_times(mosaic):
            tt = torch.full((x.shape[0],), t)
            with kernel_ops.record_dispatch() as calls:
                got = testing.call(mosaic, x, tt, cond)
            assert calls[("fp8_gemm", "torch")] > 0, dict(calls)
            assert_close(got, testing.call(oracle, x, tt, cond), atol=1e-4, rtol=1e-4)
            want = testing.call(original, x, tt, cond)
            rel = float((got - want).norm() / want.norm())
            assert 0 < rel < 0.05, f"t={t}: quantized vs original weights, relative error {rel:.4f}"

    def test_quantize_fp8_per_token_activations(self, kit, family):
        testing, dense, x, cond = kit
        mosaic = three_stage_mosaic(family, dense, share_producers=True)
        weight_only = dequantized_copy(mosaicdiff.quantize(copy.deepcopy(mosaic), "fp8"))
        mosaicdiff.quantize(mosaic, "fp8", activations="per_token")
        tt = torch.full((x.shape[0],), stage_times(mosaic)[1])
        want, got = testing.call(weight_only, x, tt, cond), testing.call(mosaic, x, tt, cond)
        rel = float((got - want).norm() / want.norm())
        assert 1e-6 < rel < 0.08, rel  # the activations were quantized too, by a few percent at most

    def test_quantized_engine_dense_model(self, kit):
        """The engine's dense model (one stage at sparsity 0) quantizes like a mosaic."""
        testing, dense, x, cond = kit
        engine = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
        tt = torch.full((x.shape[0],), 500)
        want = testing.call(dense, x, tt, cond)
        rel = float((testing.call(mosaicdiff.quantize(engine, "fp8"), x, tt, cond) - want).norm() / want.norm())
        assert 0 < rel < 0.05, rel

    def test_a_quantized_mosaic_saves_loads_and_casts_as_quantized(self, kit, family, mosaic, tmp_path):
        testing, _, x, cond = kit
        unquantized = copy.deepcopy(mosaic)
        mosaicdiff.quantize(mosaic, "fp8", activations="per_token")
        tt = torch.full((x.shape[0],), stage_times(mosaic)[0])
        want = testing.call(mosaic, x, tt, cond)
        mosaic.save_pretrained(tmp_path / "q")
        loaded = family.mosaic_class.from_pretrained(tmp_path / "q")
        keys = quantize_module.quantized_keys(mosaic)
        assert keys and quantize_module.quantized_keys(loaded) == keys
        assert {m.fp8_mode for _, m in quantized_modules(loaded) if hasattr(m, "fp8_mode")} == {"per_token"}
        assert_close(testing.call(loaded, x, tt, cond), want, atol=ATOL, rtol=RTOL)
        # a cast keeps the float8 weights and their fp32 scales (a plain cast would drop the scales' meaning)
        state = loaded.to(torch.bfloat16).state_dict()
        assert {state[k].dtype for k in keys} == {torch.float8_e4m3fn, torch.float32}
        assert all(v.dtype in (torch.bfloat16, torch.int64) for k, v in state.items() if k not in keys)
        x16, cond16 = x.bfloat16(), {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
                                     for k, v in cond.items()}
        want16 = testing.call(unquantized.to(torch.bfloat16), x16, tt, cond16).float()  # bf16 alone: 13% on tiny Flux
        got = testing.call(loaded, x16, tt, cond16).float()
        assert float((got - want16).norm() / want16.norm()) < 0.05
