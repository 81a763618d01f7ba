"""method="stepwise": equal-step stages, the probe, the exponential allocation and the nested K-stage prune."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch.testing import assert_close

from mosaicdiff.api import prune
from mosaicdiff.core.schedulers import sampler_timesteps
from mosaicdiff.families.dit import adapter as dit
from mosaicdiff.method import step_allocation
from mosaicdiff.method.calibrate import stage_inputs
from mosaicdiff.method.stage_plan import plan_stages
from tests.method.test_prune import tiny_calibration, tiny_dit


# ----------------------------------------------------------------- stages


def test_equal_step_stages_ddim50_has_five_steps_each_and_tiles_the_range():
    ts = sampler_timesteps(50)
    stages = step_allocation.equal_step_stages(ts, 10, 1000)
    assert [s[0] for s in stages] == [f"s{k}" for k in range(10)]
    assert stages[0][2] == 1000 and stages[-1][1] == 0
    assert all(a[1] == b[2] for a, b in zip(stages, stages[1:])), "contiguous"
    counts = [sum(1 for t in ts.tolist() if t0 <= t < t1) for _, t0, t1 in stages]
    assert counts == [5] * 10
    # uneven: 50 steps in 3 stages -> 17, 17, 16
    counts = [sum(1 for t in ts.tolist() if t0 <= t < t1) for _, t0, t1 in step_allocation.equal_step_stages(ts, 3, 1000)]
    assert counts == [17, 17, 16]


@pytest.mark.parametrize("k", [0, 51, 2.0, True])
def test_equal_step_stages_refuses_bad_counts(k):
    with pytest.raises(ValueError, match="num_stages must be an integer in \\[1, 50\\]"):
        step_allocation.equal_step_stages(sampler_timesteps(50), k, 1000)


# ----------------------------------------------------------------- allocation


def _brute_force(c, n, target, rate, s_max):
    """The constrained optimum by SLSQP (an independent solver of the same problem)."""
    c, n = np.asarray(c, float), np.asarray(n, float)
    w = n * c / (n * c * np.exp(rate * target)).sum()  # objective 1 at the start: SLSQP is scale-sensitive
    res = minimize(lambda s: float((w * np.exp(rate * s)).sum()), np.full(c.size, target),
                   jac=lambda s: w * rate * np.exp(rate * s), bounds=[(0, s_max)] * c.size,
                   constraints=[{"type": "eq", "fun": lambda s: float((n * s).sum() / n.sum() - target)}],
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_the_constrained_optimum(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 12))
    c = np.exp(rng.normal(0, 1.5, k))
    n = rng.integers(1, 8, k)
    target, rate = float(rng.uniform(0.2, 0.5)), float(rng.uniform(3, 12))
    s = np.array(step_allocation.allocate_exponential(c, n, target, rate=rate, s_max=0.8))
    assert abs((n * s).sum() / n.sum() - target) < 1e-9, "exact step-weighted mean"
    assert s.min() >= 0 and s.max() <= 0.8
    assert_close(torch.tensor(s), torch.tensor(_brute_force(c, n, target, rate, 0.8)), atol=2e-4, rtol=0)


def test_allocation_gives_a_ten_times_more_sensitive_stage_ln10_over_a_less():
    s = step_allocation.allocate_exponential([1.0, 10.0], [5, 5], 0.3, rate=7.0, s_max=0.8)
    assert s[0] - s[1] == pytest.approx(np.log(10) / 7.0, abs=1e-9)
    assert step_allocation.allocate_exponential([3.0, 3.0, 3.0], [1, 2, 3], 0.4) == pytest.approx([0.4] * 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(errors=[1.0, 0.0], steps=[1, 1], target=0.3), "finite and positive"),
    (dict(errors=[1.0], steps=[1, 1], target=0.3), "equal-length"),
    (dict(errors=[1.0, 2.0], steps=[1, 1], target=0.9), "target <= s_max"),
    (dict(errors=[1.0, 2.0], steps=[1, 1], target=0.3, rate=0.0), "rate must be a positive"),
])
def test_allocation_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        step_allocation.allocate_exponential(**kwargs)


def test_plan_stepwise_needs_sensitivities_or_sparsities():
    with pytest.raises(ValueError, match="one probed sensitivity per stage"):
        plan_stages(0.3, method="stepwise", num_stages=5)
    stages, info = plan_stages(0.3, method="stepwise", num_stages=5, sensitivities=[1, 1, 1, 1, 100])
    sp = [s[3] for s in stages]
    assert sp[-1] < min(sp[:-1]) and info["mean_sparsity"] == pytest.approx(0.3, abs=1e-9)
    stages, _ = plan_stages(0.3, method="stepwise", num_stages=2, stage_sparsities=[0.1, 0.5])
    assert [s[3] for s in stages] == [0.1, 0.5]
    with pytest.raises(ValueError, match="needs 2 stage sparsities"):
        plan_stages(0.3, method="stepwise", num_stages=2, stage_sparsities=[0.1])


# ----------------------------------------------------------------- probe


def test_probe_equals_the_magnitude_pruned_model_and_restores_the_weights():
    dense, calib = tiny_dit(), tiny_calibration()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    stages = [("hi", 500, 1000), ("lo", 0, 500)]
    got = step_allocation.probe_errors(dense, dit.DIT, calib, stages, 0.5, process=None, samples=6,
                                       align=None, seed=3)
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by the probe"
    # oracle: the one-stage magnitude mosaic (compact blocks, heads and channels really removed)
    pruned = prune(dense, None, 0.5, method="magnitude", align=None, progress=False)
    for k, (_, t0, t1) in enumerate(stages):
        x, t, cond = stage_inputs(calib, t0, t1, 6, cfg=False,
                                  generator=torch.Generator().manual_seed(3 * 7919 + 104729 + k))
        with torch.no_grad():
            ref = dense(x, timestep=t, class_labels=cond["class_labels"]).sample[:, :4]
            out = pruned(x, timestep=t, class_labels=cond["class_labels"]).sample[:, :4]
        want = float(((out - ref) ** 2).mean())
        assert got[k] == pytest.approx(want, rel=1e-4), (k, got[k], want)
    assert got[0] > 0


# ----------------------------------------------------------------- prune


def test_stepwise_prune_nests_every_stage_and_hits_the_target(monkeypatch):
    dense, calib = tiny_dit(heads=4), tiny_calibration(16)
    # a probe that says the last stages are the most sensitive
    monkeypatch.setattr(step_allocation, "probe_errors",
                        lambda model, adapter, calibration, stages, sparsity, **kw: np.geomspace(1, 1000, len(stages)))
    mosaic = prune(dense, calib, 0.4, method="stepwise", num_stages=5, num_inference_steps=10, samples_per_stage=8,
                   align=None, progress=False)
    meta = mosaic.meta
    assert mosaic.num_stages == 5 and meta["method"] == "stepwise" and meta["num_stages"] == 5
    sp = [r[3] for r in mosaic.stage_ranges]
    assert sp == sorted(sp, reverse=True), f"more sensitive stages get less sparsity: {sp}"
    assert meta["mean_sparsity"] == pytest.approx(0.4, abs=1e-9)
    assert meta["steps_per_stage"] == {f"s{k}": 2 for k in range(5)}
    # nested: every stage's kept heads and channels lie within those of each less pruned stage
    for less, more in zip(mosaic.stage_blocks[::-1], mosaic.stage_blocks[::-1][1:]):
        for a, b in zip(less, more):
            assert set(b.kept_heads.tolist()) <= set(a.kept_heads.tolist())
            assert set(b.kept_channels.tolist()) <= set(a.kept_channels.tolist())
    heads = [meta["stage_widths"][f"s{k}"]["heads"] for k in range(5)]
    assert heads == sorted(heads) and heads[0] < heads[-1], heads
    assert mosaic.config.get("shared_producers") is not None, "producers stored once"


def test_stepwise_needs_calibration():
    with pytest.raises(ValueError, match="probes the model on calibration data"):
        prune(tiny_dit(), None, 0.3, method="stepwise", progress=False)


@pytest.mark.parametrize("name", ["dit", "unet", "pixart", "sd3", "flux"])
def test_probe_on_every_family_is_zero_at_sparsity_zero_and_restores_the_weights(name):
    from mosaicdiff import families

    family = next(f for f in families.FAMILIES if f.name == name)
    testing = family.testing_module()
    dense = testing.tiny_dense()
    calib = testing.tiny_calibration(dense) if hasattr(testing, "tiny_calibration") else tiny_calibration()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    process = family.adapter.noise_process(dense, family.adapter.default_scheduler(), calib)
    stages = step_allocation.equal_step_stages(process.sampler_timesteps(4), 2, process.timestep_end)
    kw = dict(process=process, samples=3, align=None)
    zero = step_allocation.probe_errors(dense, family.adapter, calib, stages, 0.0, **kw)
    half = step_allocation.probe_errors(dense, family.adapter, calib, stages, 0.5, **kw)
    assert np.all(zero < 1e-20) and np.all(half > 1e-12), (zero, half)
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by the probe"


def test_nested_stages_select_on_the_summed_hessians_of_every_later_stage_and_compensate_on_their_own(monkeypatch):
    """The chain's selection: stage k's kept set is OBS-chosen on the unit-trace sum of the Hessians
    of k and every more pruned stage, then compensated on stage k's own Hessian (oracle: the
    Hessians recomputed here from the same calibration draws)."""
    import mosaicdiff.method.pruning as pruning
    from mosaicdiff.method.calibrate import collect_hessians

    dense, calib = tiny_dit(heads=4), tiny_calibration(16)
    sparsities = [0.5, 0.25, 0.75, 0.05]  # sampling order s0..s3; the chain runs s3, s1, s0, s2
    calls = []
    real = pruning.compact.prune_groups

    def spy(groups, hessians, sp, **kw):
        out = real(groups, hessians, sp, **kw)
        calls.append((sp, {k: v.clone() for k, v in hessians.items()}, kw.get("keep_within"),
                      {g: p.kept.clone() for g, p in out.items()}))
        return out

    monkeypatch.setattr(pruning.compact, "prune_groups", spy)
    prune(dense, calib, 0.4, method="stepwise", num_stages=4, stage_sparsities=sparsities, num_inference_steps=8,
          samples_per_stage=6, align=None, progress=False)
    stages = step_allocation.equal_step_stages(sampler_timesteps(8), 4, 1000)
    own = {}
    for k, (_, t0, t1) in enumerate(stages):
        x, t, cond = stage_inputs(calib, t0, t1, 6, cfg=True, generator=pruning.stage_generator(0, k))
        own[k] = collect_hessians(dense, x, t, cond, progress=False, adapter=dit.DIT)[0]  # block 0

    def unit(h):
        return h / h.diagonal().mean()

    chain = [3, 1, 0, 2]
    # per stage, two calls per block (select, compensate), blocks in order: block 0's come first
    per_stage = len(calls) // len(chain)
    for rank, k in enumerate(chain):
        select, compensate = calls[rank * per_stage], calls[rank * per_stage + 1]
        for key in own[k]:
            want = sum(unit(own[j][key]) for j in chain[rank:])
            assert_close(select[1][key], want, rtol=1e-4, atol=1e-5)  # the running sum is subtracted from
            assert_close(compensate[1][key], own[k][key], rtol=1e-4, atol=1e-6)  # batches sum in another order
        assert {g: set(v.tolist()) for g, v in compensate[2].items()} == \
            {g: set(v.tolist()) for g, v in select[3].items()}, "compensated on exactly the selected units"


def test_stepwise_mosaic_saves_and_loads(tmp_path, monkeypatch):
    from mosaicdiff.families.dit.model import MosaicDiT

    monkeypatch.setattr(step_allocation, "probe_errors",
                        lambda model, adapter, calibration, stages, sparsity, **kw: np.geomspace(1, 50, len(stages)))
    dense, calib = tiny_dit(heads=4), tiny_calibration(8)
    mosaic = prune(dense, calib, 0.3, method="stepwise", num_stages=4, num_inference_steps=8, samples_per_stage=4,
                   align=None, progress=False)
    mosaic.save_pretrained(tmp_path / "m")
    loaded = MosaicDiT.from_pretrained(tmp_path / "m")
    assert loaded.stage_ranges == mosaic.stage_ranges and loaded.meta["method"] == "stepwise"
    x = torch.randn(2, 4, 8, 8)
    for t in (900, 10):
        with torch.no_grad():
            assert_close(loaded(x, timestep=t, class_labels=torch.tensor([1, 2])).sample,
                         mosaic(x, timestep=t, class_labels=torch.tensor([1, 2])).sample)
