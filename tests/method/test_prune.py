"""prune(): stage planning, per-stage calibration and pruning on a tiny DiT, errors, end to end."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mosaicdiff.method.pruning as prune_mod
from mosaicdiff.method import compact, schedule
from mosaicdiff.method.calibrate import Calibration
from mosaicdiff.families.dit import adapter as dit
from mosaicdiff.core.schedulers import sampler_timesteps
from mosaicdiff.method.pruning import plan_stages
from mosaicdiff.api import prune, prune_stages


def tiny_dit(heads: int = 4, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def tiny_calibration(n: int = 12, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randn(n, 4, 8, 8, generator=g), torch.arange(n) % 10, null_class=10)


@pytest.fixture
def record_stage_inputs(monkeypatch):
    """Records the (t_start, t_end) of every calibration draw."""
    calls = []
    real = prune_mod.stage_inputs

    def spy(calibration, t_start, t_end, n_samples, **kw):
        calls.append((t_start, t_end, n_samples))
        return real(calibration, t_start, t_end, n_samples, **kw)

    monkeypatch.setattr(prune_mod, "stage_inputs", spy)
    return calls


# ----------------------------------------------------------------- planning


def test_plan_mosaic_ddim50():
    stages, info = plan_stages(0.4, method="mosaic", boundaries=(200, 600))
    assert [s[:3] for s in stages] == [("early", 600, 1000), ("middle", 200, 600), ("late", 0, 200)]
    assert info["steps_per_stage"] == {"early": 20, "middle": 20, "late": 10}
    sp = [s[3] for s in stages]
    mean = (20 * sp[0] + 20 * sp[1] + 10 * sp[2]) / 50
    assert abs(mean - 0.4) < 1e-12 and abs(info["mean_sparsity"] - 0.4) < 1e-12, (sp, mean)
    assert sp[1] < min(sp[0], sp[2]), sp
    stages, info = plan_stages(0.4, method="mosaic")
    assert info["boundaries"] == [111, 576], "closed-form default for the linear schedule, r = 1"


def test_plan_default_cap_is_target_plus_excess():
    for target in (0.3, 0.5):
        stages, info = plan_stages(target, method="mosaic", boundaries=(200, 600))
        sp = [s[3] for s in stages]
        cap = min(0.9, target + 0.1)
        assert max(sp) <= cap + 1e-12 and abs(info["mean_sparsity"] - target) < 1e-12, (target, sp)
        assert sp[1] < target < cap, sp  # still an allocation: middle below the mean
    uncapped, _ = plan_stages(0.5, method="mosaic", boundaries=(200, 600), s_max=0.9)
    assert max(s[3] for s in uncapped) > 0.6, "an explicit s_max replaces the default cap"


def test_plan_single_stage_and_explicit():
    stages, info = plan_stages(0.3, method="uniform")
    assert stages == [("all", 0, 1000, 0.3)] and info["boundaries"] is None
    stages, _ = plan_stages(0.3, method="mosaic", boundaries=(200, 600), stage_sparsities=[0.5, 0.1, 0.4])
    assert [s[3] for s in stages] == [0.5, 0.1, 0.4]
    stages, _ = plan_stages(0.3, method="mosaic", boundaries=(200, 600),
                            stage_sparsities={"late": 0.4, "early": 0.5, "middle": 0.1})
    assert [s[3] for s in stages] == [0.5, 0.1, 0.4]
    with pytest.raises(ValueError, match="explicit"):
        plan_stages(0.3, method="mosaic", boundaries=(200, 600), stage_sparsities=[0.5, 0.1])
    with pytest.raises(ValueError, match="name the stages"):
        plan_stages(0.3, method="mosaic", boundaries=(200, 600), stage_sparsities={"early": 0.5})
    with pytest.raises(ValueError, match="one stage"):
        plan_stages(0.3, method="uniform", stage_sparsities=[0.5, 0.1, 0.4])
    with pytest.raises(ValueError, match="method"):
        plan_stages(0.3, method="layer")
    with pytest.raises(ValueError, match="t_low < t_high"):
        plan_stages(0.3, method="mosaic", boundaries=(600, 200))


# ----------------------------------------------------------------- pruning the tiny DiT


@pytest.mark.parametrize("share", [True, False], ids=["shared", "independent"])
def test_prune_stages_mosaic_widths_and_calibration_ranges(record_stage_inputs, share):
    model, calib = tiny_dit(), tiny_calibration()
    stages = prune_stages(model, calib, 0.4, boundaries=(200, 600), samples_per_stage=6, align=16, progress=False,
                          share_producers=share)
    planned, _ = plan_stages(0.4, method="mosaic", boundaries=(200, 600), x0_sq_norm=calib.x0_sq_norm)
    assert [(s.name, s.t_start, s.t_end) for s in stages] == [p[:3] for p in planned]  # sampling order
    # shared producers: the least pruned (middle) stage is calibrated and pruned first
    first = [(200, 600, 6), (600, 1000, 6)] if share else [(600, 1000, 6), (200, 600, 6)]
    assert record_stage_inputs == [*first, (0, 200, 6)]
    for spec, (_, _, _, sp) in zip(stages, planned):
        assert spec.sparsity == sp
        heads = 4 - compact.heads_to_remove(4, sp)
        width = compact.align_width(round(128 * (1 - sp)), 16, 128)
        assert len(spec.blocks) == 2
        for b in spec.blocks:
            assert b.num_heads == heads and b.mlp_width == width, (spec.name, sp, b.num_heads, b.mlp_width)
            assert b.mlp_width % 16 == 0
            assert b.qkv_weight.shape == (3 * heads * 8, 32) and b.fc2_weight.shape == (32, width)


def test_prune_stages_uniform_calibrates_whole_range(record_stage_inputs):
    stages = prune_stages(tiny_dit(), tiny_calibration(), 0.5, method="uniform", samples_per_stage=4,
                          align=None, progress=False)
    assert record_stage_inputs == [(0, 1000, 4)]
    assert [(s.name, s.t_start, s.t_end, s.sparsity) for s in stages] == [("all", 0, 1000, 0.5)]
    assert stages[0].blocks[0].num_heads == 2 and stages[0].blocks[0].mlp_width == 64


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_prune_stages_baselines_need_no_data(method, record_stage_inputs):
    model = tiny_dit()
    stages = prune_stages(model, None, 0.5, method=method, align=None, progress=False)
    assert record_stage_inputs == []
    assert len(stages) == 1 and stages[0].blocks[1].num_heads == 2
    block = model.transformer_blocks[1]
    b = stages[0].blocks[1]
    cols = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in b.kept_heads.tolist()])
    assert torch.equal(b.proj_weight, block.attn1.to_out[0].weight[:, cols]), "baselines must not compensate"


def test_prune_stages_three_stage_magnitude_override():
    stages = prune_stages(tiny_dit(), None, 0.4, method="mosaic", pruner="magnitude", align=None, progress=False)
    assert [s.name for s in stages] == ["early", "middle", "late"]


def test_zero_sparsity_is_dense(record_stage_inputs):
    model = tiny_dit()
    stages = prune_stages(model, tiny_calibration(), 0.0, boundaries=(200, 600), progress=False)
    assert record_stage_inputs == [], "nothing to prune: no calibration pass"
    for spec in stages:
        for blk, b in zip(model.transformer_blocks, spec.blocks):
            ref = dit.dense_block_weights(blk, 4)
            for k, v in ref.tensors().items():
                assert torch.equal(getattr(b, k), v), (spec.name, k)


# ----------------------------------------------------------------- errors


def test_prune_errors(monkeypatch):
    model, calib = tiny_dit(), tiny_calibration()
    for bad in (1.0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="target_sparsity"):
            prune_stages(model, calib, bad, progress=False)
    with pytest.raises(ValueError, match="got Linear"):
        prune_stages(torch.nn.Linear(3, 3), calib, 0.5, progress=False)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['M', 'lam'\]; the options are "):
        prune_stages(model, calib, 0.5, M=0.5, lam=0.1)  # renamed speed_threshold / log_snr_weight
    with pytest.raises(TypeError, match="unexpected keyword argument 'M'"):
        prune(model, calib, 0.5, M=0.5)
    with pytest.raises(ValueError, match="needs calibration"):
        prune_stages(model, None, 0.5, progress=False)
    with pytest.raises(TypeError, match="Calibration"):
        prune_stages(model, (calib.x0, calib.labels), 0.5, progress=False)
    with pytest.raises(ValueError, match="empty"):
        Calibration(torch.randn(0, 4, 8, 8), torch.zeros(0, dtype=torch.long))
    meta = Calibration(torch.empty(4, 4, 8, 8, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        prune_stages(model, meta, 0.5, progress=False)
    with pytest.raises(ValueError, match="stage 'early'.*at least one head"):
        prune_stages(tiny_dit(heads=2), calib, 0.3, boundaries=(200, 600), stage_sparsities=[0.8, 0.1, 0.1],
                     progress=False)
    with pytest.raises(ValueError, match="samples_per_stage"):
        prune_stages(model, calib, 0.3, samples_per_stage=0, progress=False)
    with pytest.raises(ValueError, match="pruner"):
        prune_stages(model, calib, 0.3, pruner="taylor", progress=False)


# ----------------------------------------------------------------- end to end


def _rel_err(model, ref_model, x, t, y):
    with torch.no_grad():
        a = ref_model(x, timestep=t, class_labels=y).sample
        b = model(x, timestep=t, class_labels=y).sample
    return float((a - b).norm() / a.norm())


def test_prune_end_to_end_mosaic():
    pytest.importorskip("mosaicdiff.families.dit.model")
    dense, calib = tiny_dit(), tiny_calibration(16)
    mosaic = prune(dense, calib, 0.4, samples_per_stage=16, align=None, progress=False)
    # default boundaries: closed form with r = ||x0||^2 / d of the calibration data
    t_low, t_high = schedule.stage_boundaries(schedule.linear_alphas_cumprod(), x0_sq_norm=calib.x0_sq_norm)
    assert 100 < t_low < 125 and 560 < t_high < 590, (t_low, t_high)
    assert [(s.name, s.t_start, s.t_end) for s in mosaic.stages] == [
        ("early", t_high, 1000), ("middle", t_low, t_high), ("late", 0, t_low)]
    meta = mosaic.meta
    for key in ("method", "boundaries", "target_sparsity", "stage_sparsities", "steps_per_stage", "stage_widths"):
        assert key in meta, key
    assert meta["method"] == "mosaic" and meta["target_sparsity"] == 0.4 and meta["boundaries"] == [t_low, t_high]
    steps = schedule.steps_per_stage(sampler_timesteps(50), schedule.stages_from_boundaries(t_low, t_high))
    assert meta["steps_per_stage"] == steps
    assert [s.sparsity for s in mosaic.stages] == meta["stage_sparsities"]

    # At sparsity 0 the mosaic computes the dense model.
    zero = prune(dense, calib, 0.0, boundaries=(200, 600), progress=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, 8, 8, generator=g)
    y = torch.tensor([1, 2, 3, 10])
    for tv in (900, 400, 50):
        t = torch.full((4,), tv)
        with torch.no_grad():
            ref = dense(x, timestep=t, class_labels=y).sample
            out = zero(x, timestep=t, class_labels=y).sample
        assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"t={tv}: zero-sparsity mosaic vs dense\n{m}")

    # OBS compensation keeps the pruned model closer to the dense one than dropping weights.
    magnitude = prune(dense, None, 0.4, method="magnitude", align=None, progress=False)
    for tv in (900, 400, 50):
        t = torch.full((4,), tv)
        x_t = torch.randn(4, 4, 8, 8, generator=g)
        e_mosaic, e_mag = _rel_err(mosaic, dense, x_t, t, y), _rel_err(magnitude, dense, x_t, t, y)
        assert e_mosaic < e_mag, f"t={tv}: mosaic rel err {e_mosaic:.4f} >= magnitude {e_mag:.4f}"


# ----------------------------------------------------------------- the statistics each block is pruned with


def _direct_hessians(model, x_t, t, condition, batch_size):
    """Each block's proj / fc2 input Hessians from forward hooks (not the code under test)."""
    labels = condition["class_labels"]
    caught = [{"proj": [], "fc2": []} for _ in model.transformer_blocks]
    handles = []
    for entry, block in zip(caught, model.transformer_blocks):
        for name, lin in (("proj", block.attn1.to_out[0]), ("fc2", block.ff.net[2])):
            handles.append(lin.register_forward_hook(
                lambda mod, args, out, xs=entry[name]: xs.append(args[0].reshape(-1, args[0].shape[-1]).double())))
    with torch.no_grad():
        for s in range(0, x_t.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            model(x_t[sl], timestep=t[sl], class_labels=labels[sl])
    for h in handles:
        h.remove()
    return [{k: torch.cat(v).T @ torch.cat(v) / torch.cat(v).shape[0] for k, v in e.items()} for e in caught]


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
def test_each_block_is_pruned_with_its_own_stage_statistics(cfg):
    """Block i of stage s is exactly `prune_block` on block i's Hessians of stage s's draws.

    Sharp against another block's or another stage's Hessians and against ignoring `cfg` (with
    CFG the null-class half enters the statistics): each changes the kept heads/channels or the
    weights by far more than the tolerance (checked below on the reference itself).
    """
    model, calib = tiny_dit(), tiny_calibration(8)
    kw = dict(samples_per_stage=6, batch_size=4, align=None, seed=3, progress=False, share_producers=False)
    stages = prune_stages(model, calib, 0.5, boundaries=(200, 600), cfg=cfg, **kw)

    def draws(flip_cfg=False):  # the stages' inputs, drawn as prune draws them: one generator per stage
        out = [prune_mod.stage_inputs(calib, s.t_start, s.t_end, 6, cfg=cfg != flip_cfg,
                                      generator=prune_mod.stage_generator(3, k))
               for k, s in enumerate(stages)]
        return [_direct_hessians(model, *d, batch_size=4) for d in out], out

    hessians, inputs = draws()
    other_cfg, _ = draws(flip_cfg=True)
    assert all(bool((cond["class_labels"] == calib.null_class).any()) == cfg for _, _, cond in inputs)

    def pruned(i, h, sp):
        return dit.prune_block(dit.block_linears(model.transformer_blocks[i]), h, 4, sp, sp, align=None)

    def distance(a, b):
        if not (torch.equal(a.kept_heads, b.kept_heads) and torch.equal(a.kept_channels, b.kept_channels)):
            return float("inf")
        return max(float((getattr(a, k) - getattr(b, k)).abs().max()) for k in ("proj_weight", "fc2_weight"))

    for s, spec in enumerate(stages):
        for i, got in enumerate(spec.blocks):
            want = pruned(i, hessians[s][i], spec.sparsity)
            assert distance(got, want) < 1e-5, f"stage {spec.name} block {i}: not its own Hessians"
            if s == i == 0:  # the reference tells the mutants apart: another block, stage or cfg
                assert distance(pruned(i, hessians[s][1], spec.sparsity), want) > 1e-3
                assert distance(pruned(i, hessians[1][i], spec.sparsity), want) > 1e-3
                assert distance(pruned(i, other_cfg[s][i], spec.sparsity), want) > 1e-3


def test_shared_producers_prune_the_least_pruned_stage_first_and_nest_the_others():
    """share_producers=True: the middle stage is the free OBS choice on its own Hessians; early and
    late are OBS on their own Hessians restricted to the middle stage's units (a real constraint:
    their free choice differs)."""
    model, calib = tiny_dit(), tiny_calibration(8)
    kw = dict(samples_per_stage=6, batch_size=4, align=None, seed=3, progress=False)
    stages = prune_stages(model, calib, 0.5, boundaries=(200, 600), **kw)
    assert [s.name for s in stages] == ["early", "middle", "late"]
    assert stages[1].sparsity < min(stages[0].sparsity, stages[2].sparsity)
    hessians = [_direct_hessians(model, *prune_mod.stage_inputs(calib, s.t_start, s.t_end, 6, cfg=True,
                                                               generator=prune_mod.stage_generator(3, k)),
                                 batch_size=4) for k, s in enumerate(stages)]
    constrained = False
    for i in range(2):
        linears = dit.block_linears(model.transformer_blocks[i])
        middle = stages[1].blocks[i]
        free_middle = dit.prune_block(linears, hessians[1][i], 4, stages[1].sparsity, stages[1].sparsity, align=None)
        assert torch.equal(middle.kept_heads, free_middle.kept_heads)
        assert torch.equal(middle.kept_channels, free_middle.kept_channels)
        within = {"proj": middle.kept_heads, "fc2": middle.kept_channels}
        for s in (0, 2):
            got, sp = stages[s].blocks[i], stages[s].sparsity
            assert set(got.kept_heads.tolist()) <= set(middle.kept_heads.tolist())
            assert set(got.kept_channels.tolist()) <= set(middle.kept_channels.tolist())
            want = dit.prune_block(linears, hessians[s][i], 4, sp, sp, align=None, keep_within=within)
            assert torch.equal(got.kept_heads, want.kept_heads) and torch.equal(got.kept_channels, want.kept_channels)
            assert_close(got.fc2_weight, want.fc2_weight, atol=1e-5, rtol=1e-5)
            assert_close(got.proj_weight, want.proj_weight, atol=1e-5, rtol=1e-5)
            free = dit.prune_block(linears, hessians[s][i], 4, sp, sp, align=None)
            constrained |= not set(free.kept_channels.tolist()) <= set(middle.kept_channels.tolist())
    assert constrained, "the test never exercises the constraint (every free choice already nests)"


@pytest.mark.parametrize("pruner", ["magnitude", "random"])
def test_every_pruner_nests_the_stages_for_shared_producers(pruner):
    """The uncompensated pruners honour the constraint too. Random's free choice would not nest;
    magnitude ranks the units the same way in every stage, so its free choice nests by itself and
    the constraint changes nothing."""
    model = tiny_dit()
    kw = dict(method="mosaic", pruner=pruner, boundaries=(200, 600), align=None, progress=False, seed=1)
    nested = prune_stages(model, None, 0.5, **kw)
    free = prune_stages(model, None, 0.5, share_producers=False, **kw)
    crossing = False
    for i in range(2):
        middle = nested[1].blocks[i]
        for s in (0, 2):
            assert set(nested[s].blocks[i].kept_heads.tolist()) <= set(middle.kept_heads.tolist())
            assert set(nested[s].blocks[i].kept_channels.tolist()) <= set(middle.kept_channels.tolist())
            crossing |= not set(free[s].blocks[i].kept_channels.tolist()) <= set(free[1].blocks[i].kept_channels.tolist())
    if pruner == "random":
        assert crossing, "the free choice already nests: the test would not see a missing constraint"
    else:
        assert not crossing
        for a, b in zip(nested, free):
            assert all(torch.equal(x.kept_channels, y.kept_channels) for x, y in zip(a.blocks, b.blocks))
