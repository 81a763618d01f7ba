"""Divide under flow matching (SD3, Flux): the rectified-flow noise process, its closed-form
learning-speed score, the boundaries and steps under a static or dynamic shift, the calibration
inputs and the measured-curve check.

The oracles are independent of the code under test: Monte Carlo of the forward process, the
shift maps written out by hand from diffusers' formulas (``shift * s / (1 + (shift - 1) s)``,
``exp(mu) / (exp(mu) + 1/u - 1)``, FluxPipeline's ``calculate_shift``), numeric derivatives of
those maps, and plain loops for the stage boundaries.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mosaicdiff.core import schedulers
from mosaicdiff.core.schedulers import noise_process
from mosaicdiff.method import schedule
from mosaicdiff.method.calibrate import (
    Calibration,
    resolve_alphas_cumprod,
    stage_inputs,
)
from mosaicdiff.method.stage_plan import plan_stages

T = 1000


def flow(shift: float = 1.0, **config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift, **config)


def flux_scheduler():
    """FLUX.1's scheduler config (dynamic shifting, base 0.5 at 256 tokens, max 1.15 at 4096)."""
    return flow(3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096)


def shift_by_hand(u, k):
    """diffusers' static shift, ``k u / (1 + (k - 1) u)`` (= the dynamic one with ``k = exp(mu)``)."""
    u = np.asarray(u, dtype=np.float64)
    return k * u / (1 + (k - 1) * u)


def calculate_shift_by_hand(seq_len, base_len=256, max_len=4096, base_shift=0.5, max_shift=1.15):
    """FluxPipeline's calculate_shift, written out."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


def boundaries_by_runs(grad, M: float, top: int) -> tuple[int, int]:
    """The middle stage by the method's definition: the run of above-threshold timesteps (split
    where they are not contiguous) that holds the peak; ``top`` when it reaches the last one."""
    g = np.asarray(grad, dtype=np.float64)
    score = (g - g.min()) / (g.max() - g.min())
    above = np.flatnonzero(score >= M * score.max())
    runs = np.split(above, np.flatnonzero(np.diff(above) > 1) + 1)
    run = next(r for r in runs if int(np.argmax(score)) in r)
    return int(run[0]), (top if run[-1] == g.size - 1 else int(run[-1]) + 1)


# ----------------------------------------------------------------- the process


def test_flow_alphas_cumprod_is_the_variance_preserving_map_by_monte_carlo():
    """x_t / sqrt((1-s)^2 + s^2) = sqrt(abar) x0 + sqrt(1 - abar) eps: regress on x0, measure the rest."""
    g = torch.Generator().manual_seed(0)
    abar = resolve_alphas_cumprod(flow(3.0)).numpy()
    assert abar.shape == (T,) and abar[0] == 1.0
    assert torch.equal(schedulers.scheduler_alphas_cumprod(flux_scheduler()), torch.from_numpy(abar)), \
        "the VP equivalent does not depend on the shift (no mu needed)"
    n = 400_000
    x0 = torch.randn(n, generator=g, dtype=torch.float64) * 0.7 + 0.3
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    for t in (100, 500, 900):
        s = t / T
        y = ((1 - s) * x0 + s * eps) / math.sqrt((1 - s) ** 2 + s ** 2)
        xc = x0 - x0.mean()
        coef = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
        rest = float((y - coef * x0).var())
        assert coef == pytest.approx(math.sqrt(abar[t]), abs=3e-3), t
        assert rest == pytest.approx(1 - abar[t], abs=5e-3), t


def test_flow_expected_mse_matches_monte_carlo_and_is_not_the_ddpm_formula():
    """E||x_t - x0||^2 / d = (1 + r) s^2 for x_t = (1 - s) x0 + s eps, on non-Gaussian data."""
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(20_000, 16, generator=g, dtype=torch.float64) > 0.7).double() * 1.6 - 0.5  # two-point pixels
    r = float((x0 ** 2).mean())
    process = noise_process(flow(3.0))
    mse = schedule.expected_mse(process, r)
    vp = schedule.expected_mse(process.alphas_cumprod, r)  # the DDPM formula at the VP-equivalent abar
    for t in (50, 300, 700, 999):
        s = t / T
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        mc = float((((1 - s) * x0 + s * eps - x0) ** 2).mean())
        assert mse[t] == pytest.approx(mc, rel=2e-2), (t, mse[t], mc)
    assert abs(vp[500] - mse[500]) > 0.1 * mse[500], "the VP map alone would give another curve"
    assert mse[0] == 0 and np.all(np.diff(mse) > 0)


@pytest.mark.parametrize("k", [1.0, 3.0, 5.0])
def test_learning_grad_is_the_change_per_sampler_step(k):
    """Grad(t) = dE/du / T with s = shift(u): a numeric derivative of E(shift(u)) by hand."""
    r = 0.6
    process = noise_process(flow(k))
    grad = schedule.learning_grad(process, r)
    for t in (20, 150, 500, 850, 990):
        s = (t - 0.5) / T
        u = s / (k - (k - 1) * s)  # the inverse of the hand-written shift
        h = 1e-6
        dE_du = ((1 + r) * shift_by_hand(u + h, k) ** 2 - (1 + r) * shift_by_hand(u - h, k) ** 2) / (2 * h)
        assert grad[t] == pytest.approx(dE_du / T, rel=2e-3), (k, t)


def test_step_weight_and_sampler_axis_follow_diffusers_shift_maps():
    t = np.arange(1, T, dtype=np.float64)
    s_mid = (t - 0.5) / T
    cases = [(flow(3.0), 3.0), (noise_process(flux_scheduler(), mu=1.15), math.exp(1.15)),
             (noise_process(flow(use_dynamic_shifting=True, time_shift_type="linear"), mu=2.5), 2.5)]
    for sched, k in cases:
        process = noise_process(sched)
        weight = (k - (k - 1) * s_mid) ** 2 / k  # ds/du of s = k u / (1 + (k - 1) u), at s
        np.testing.assert_allclose(process.step_weight()[1:], weight, rtol=2e-3)  # grid slopes near s = 0
        np.testing.assert_allclose(process.sampler_axis(t), T * (t / T) / (k - (k - 1) * t / T), rtol=1e-4, atol=1e-3)


def test_flow_shift_mu_is_flux_calculate_shift():
    for seq_len in (256, 1024, 4096, 6400):
        assert schedulers.flow_shift_mu(flux_scheduler(), seq_len) == pytest.approx(calculate_shift_by_hand(seq_len),
                                                                                    abs=1e-12)
    assert noise_process(flux_scheduler(), image_seq_len=4096).mu == pytest.approx(1.15, abs=1e-12)


# ----------------------------------------------------------------- the sampler's timesteps


def test_sampler_timesteps_are_the_pipelines():
    """SD3Pipeline calls set_timesteps(n); FluxPipeline passes sigmas linspace(1, 1/n, n) and mu."""
    sd3 = flow(3.0)
    ts = schedulers.sampler_timesteps(28, sd3)
    sigma_min = shift_by_hand(1 / T, 3.0)  # the scheduler's sigma_min after __init__'s shift
    expect = T * shift_by_hand(np.linspace(1.0, sigma_min, 28), 3.0)
    assert ts.dtype == torch.float32 and ts[0] == pytest.approx(1000.0, abs=1e-3)
    np.testing.assert_allclose(ts.numpy(), expect, rtol=1e-5, atol=1e-3)
    assert len(sd3.timesteps) == T, "the caller's scheduler must stay untouched"

    seq_len = 4096
    mu = calculate_shift_by_hand(seq_len)
    u = np.linspace(1.0, 1 / 28, 28)
    expect = T * math.exp(mu) / (math.exp(mu) + 1 / u - 1)
    got = schedulers.sampler_timesteps(28, flux_scheduler(), image_seq_len=seq_len, sampler_sigmas="flux")
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-5, atol=1e-3)
    same = schedulers.sampler_timesteps(28, noise_process(flux_scheduler(), mu=mu, sampler_sigmas="flux"))
    np.testing.assert_allclose(same.numpy(), expect, rtol=1e-5, atol=1e-3)
    unshifted = schedulers.sampler_timesteps(30, flow(1.0))
    assert unshifted[:2].tolist() == pytest.approx([1000.0, 1000 - 999 / 29], abs=1e-3)


# ----------------------------------------------------------------- boundaries and stages


def test_boundaries_match_a_plain_loop_and_the_analytic_peak():
    """Grad(s) ∝ s (k - (k - 1) s)^2: peak at s* = k / (3 (k - 1)); no slow top stage unless
    27 (k - 1) / (4 k^3) < M."""
    for k in (1.0, 2.0, 3.0, 4.0, 8.0):
        process = noise_process(flow(k))
        grad = [((t / T) ** 2 - ((t - 1) / T) ** 2) * (k - (k - 1) * (t - 0.5) / T) ** 2 / k if t else 0.0
                for t in range(T)]
        got = schedule.stage_boundaries(process, speed_threshold=0.55, x0_sq_norm=0.7)
        want = boundaries_by_runs(grad, 0.55, T + 1)
        assert abs(got[0] - want[0]) <= 1 and abs(got[1] - want[1]) <= 1, (k, got, want)
        peak = int(np.argmax(schedule.learning_grad(process)))
        if k > 1.5:
            assert abs(peak - T * k / (3 * (k - 1))) <= 5, (k, peak)  # a flat peak, float32 sigmas
        assert (got[1] == T + 1) == (k <= 1.5 or 27 * (k - 1) / (4 * k ** 3) >= 0.55), (k, got)


def test_a_larger_shift_moves_the_boundaries_down():
    """The sampler lingers at high noise under a larger shift: that end becomes slow and the
    fast middle moves to lower t."""
    b = {k: schedule.stage_boundaries(noise_process(flow(k))) for k in (1.0, 3.0, 6.0)}
    assert b[1.0] == (550, T + 1), "unshifted: the learning speed grows up to s = 1 (no slow early stage)"
    assert b[3.0][0] < b[1.0][0] and b[3.0][1] < T
    assert b[6.0][0] < b[3.0][0] and b[6.0][1] < b[3.0][1], b
    assert b[3.0] == (152, 968)


def test_dynamic_shift_boundaries_and_steps_depend_on_the_image_size():
    plans = {}
    for seq_len in (4096, 6400):
        process = noise_process(flux_scheduler(), image_seq_len=seq_len, sampler_sigmas="flux")
        stages, info = plan_stages(0.3, alphas_cumprod=process, timesteps=process.sampler_timesteps(28))
        assert stages[0][2] == T + 1 and stages[-1][1] == 0, "stages tile [0, T + 1)"
        assert sum(info["steps_per_stage"].values()) == 28 and info["num_train_timesteps"] == T + 1
        plans[seq_len] = info
    assert plans[6400]["boundaries"][1] < plans[4096]["boundaries"][1]
    assert plans[6400]["steps_per_stage"] != plans[4096]["steps_per_stage"]
    small = noise_process(flux_scheduler(), image_seq_len=1024, sampler_sigmas="flux")
    with pytest.raises(ValueError, match=r"no slow high-noise stage.*boundaries=\(t_low, t_high\)") as err:
        plan_stages(0.3, alphas_cumprod=small)
    assert "\n" not in str(err.value)
    stages, info = plan_stages(0.3, alphas_cumprod=small, boundaries=(200, 900))  # explicit ones work
    ts = small.sampler_timesteps(50)  # the default for a flow process: its own 50 steps, from t = 1000.0
    assert ts[0] == 1000.0 and stages[0][1:3] == (900, T + 1)
    assert info["steps_per_stage"]["early"] == int((ts >= 900).sum()) and sum(info["steps_per_stage"].values()) == 50


def test_ddpm_through_the_process_is_unchanged():
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    abar = schedule.linear_alphas_cumprod()
    assert schedule.stage_boundaries(noise_process(abar)) == schedule.stage_boundaries(abar) == (111, 576)
    np.testing.assert_allclose(schedule.learning_grad(noise_process(ddim)), schedule.learning_grad(
        ddim.alphas_cumprod.double().numpy()), rtol=0, atol=1e-15)
    assert noise_process(ddim).timestep_end == T and noise_process(ddim).step_weight().tolist() == [1.0] * T


# ----------------------------------------------------------------- calibration inputs


def test_flow_stage_inputs_follow_the_forward_process():
    """x_t = (1 - t/T) x0 + (t/T) eps with float t uniform on the stage: residual noise ~ N(0, 1)."""
    from scipy import stats

    n_rows = 10
    x0 = torch.arange(n_rows, dtype=torch.float32).view(-1, 1, 1, 1).expand(n_rows, 4, 8, 8) / 5 - 1
    calib = Calibration(x0.contiguous(), torch.arange(n_rows), null_class=10)
    process = noise_process(flow(3.0))
    x_t, t, cond = stage_inputs(calib, 968, T + 1, 300, cfg=True, generator=torch.Generator().manual_seed(3),
                                alphas_cumprod=process)
    assert x_t.shape == (600, 4, 8, 8) and t.dtype == torch.float32 and torch.equal(t[:300], t[300:])
    assert float(t.min()) >= 968 and float(t.max()) <= T
    assert stats.kstest(((t[:300].double() - 968) / (T - 968)).numpy(), "uniform").pvalue > 1e-3
    labels = cond["class_labels"][:300]
    s = (t[:300].double() / T).view(-1, 1, 1, 1)
    rows = x0[labels].double()
    eps = (x_t[:300].double() - (1 - s) * rows) / s
    assert abs(float(eps.mean())) < 0.02 and float(eps.std()) == pytest.approx(1.0, abs=0.02)
    # the flow scheduler itself is accepted, low stage: t spread over [0, 152)
    x_t, t, _ = stage_inputs(calib, 0, 152, 200, cfg=False, generator=torch.Generator().manual_seed(4),
                             alphas_cumprod=flow(3.0))
    assert float(t.min()) >= 0 and float(t.max()) < 152 and len(set(t.tolist())) == 200
    with pytest.raises(ValueError, match="t_end"):
        stage_inputs(calib, 0, T + 2, 4, alphas_cumprod=process)


def test_prune_with_a_flow_scheduler_calibrates_on_the_flow_process(monkeypatch):
    """prune(scheduler=flow): boundaries from the flow score, float t per stage, stages tile [0, T + 1)."""
    from diffusers import DiTTransformer2DModel
    from mosaicdiff.api import prune
    from mosaicdiff.method import pruning

    seen, real = [], pruning.stage_inputs

    def spy(calibration, t_start, t_end, n, **kw):
        out = real(calibration, t_start, t_end, n, **kw)
        seen.append((t_start, t_end, out[1]))
        return out

    monkeypatch.setattr(pruning, "stage_inputs", spy)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    calib = Calibration(torch.randn(12, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 10,
                        null_class=10)
    mosaic = prune(model, calib, target_sparsity=0.3, scheduler=flow(3.0), samples_per_stage=4, num_inference_steps=10,
                   progress=False)
    assert mosaic.meta["boundaries"] == [152, 968] and mosaic.meta["num_train_timesteps"] == T + 1
    assert mosaic.meta["noise_process"]["kind"] == "rectified_flow" and mosaic.meta["noise_process"]["shift"] == 3.0
    assert sorted((a, b) for a, b, _ in seen) == [(0, 152), (152, 968), (968, T + 1)]
    for a, b, t in seen:
        assert t.dtype == torch.float32 and float(t.min()) >= a and float(t.max()) <= min(b, T)
    assert sum(mosaic.meta["steps_per_stage"].values()) == 10


# ----------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("make, match", [
    (lambda: noise_process(flux_scheduler()), r"^mu: .*use_dynamic_shifting=True.*image_seq_len"),
    (lambda: schedulers.sampler_timesteps(28, flux_scheduler()), r"^mu: "),
    (lambda: noise_process(flux_scheduler(), mu=1.0, image_seq_len=4096), r"mu or image_seq_len"),
    (lambda: noise_process(flux_scheduler(), image_seq_len=0), r"^image_seq_len must be"),
    (lambda: noise_process(flux_scheduler(), mu=float("nan")), r"^mu must be a finite number"),
    (lambda: noise_process(flow(3.0), sampler_sigmas="karras"), r"^sampler_sigmas must be one of"),
    (lambda: noise_process(flow(invert_sigmas=True)), r"^scheduler: .*invert_sigmas"),
    (lambda: noise_process(__import__("diffusers").FlowMatchHeunDiscreteScheduler()), r"^scheduler: FlowMatchHeun"),
    (lambda: noise_process(__import__("diffusers").DPMSolverMultistepScheduler(use_flow_sigmas=True,
                                                                             prediction_type="flow_prediction")),
     r"^scheduler: DPMSolverMultistepScheduler"),
    (lambda: noise_process(__import__("diffusers").DDIMScheduler(), mu=1.0), r"apply to flow-matching"),
    (lambda: noise_process(noise_process(flow()), mu=1.0), r"NoiseProcess already"),
    (lambda: schedule.curve_agreement(flow(), [1000.0, 1001.0 - 2, 500.0, 1200.0], [1, 1, 1, 1]), r"decreasing"),
    (lambda: schedule.curve_agreement(flow(), [1200.0, 800.0, 500.0], [1, 1, 1]), r"lie in \[0, 1000\]"),
])
def test_bad_flow_inputs_are_one_line_value_errors(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_unknown_scheduler_kind_names_the_argument():
    class Config(dict):
        pass

    class NotDiffusion:
        config = Config()

    with pytest.raises(ValueError, match=r"^scheduler: NotDiffusion has no alphas_cumprod"):
        noise_process(NotDiffusion())
    with pytest.raises(TypeError, match="alphas_cumprod"):
        noise_process(object())


# ----------------------------------------------------------------- measured curve (QF3)


def _gaussian_mixture_run(shift: float, steps: int, sampler_sigmas: str = "scheduler"):
    """Euler run of the exact velocity E[eps - x0 | x_s] of a Gaussian mixture (a model with a
    known optimum): returns the process, the steps' timesteps, the measured MSE and r."""
    g = torch.Generator().manual_seed(0)
    d, K, sig0, n = 64, 4, 0.3, 512
    mus = torch.randn(K, d, generator=g, dtype=torch.float64) * 0.7

    def velocity(x, s):
        var = (1 - s) ** 2 * sig0 ** 2 + s ** 2
        diff = x[:, None, :] - (1 - s) * mus[None]
        w = torch.softmax(-(diff ** 2).sum(-1) / (2 * var), dim=1)[..., None]
        return (w * (s / var * diff - mus[None] - (1 - s) * sig0 ** 2 / var * diff)).sum(1)

    process = noise_process(flow(shift), sampler_sigmas=sampler_sigmas)
    ts = process.sampler_timesteps(steps)
    sigmas = torch.cat([ts.double() / T, torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    xs = []
    for i in range(steps):
        xs.append(x.clone())
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, float(sigmas[i]))  # Euler, as the scheduler's step
    mse, _ = schedule.empirical_curve(xs, x, ts)
    return process, ts, mse, float((mus ** 2).mean() + sig0 ** 2)


@pytest.mark.parametrize("shift, sampler_sigmas", [(1.0, "scheduler"), (3.0, "scheduler"), (3.0, "flux")])
def test_curve_agreement_on_an_exact_flow_model(shift, sampler_sigmas):
    process, ts, mse, r = _gaussian_mixture_run(shift, 28, sampler_sigmas)
    got = schedule.curve_agreement(process, ts, mse, r)
    assert got["steps"] == 28 and got["pearson_mse"] > 0.995 and got["pearson_rate"] > 0.95, got
    # the DDPM closed form at the VP-equivalent abar (the map without the velocity's weight) agrees worse
    s = ts.double().numpy() / T
    c = np.sqrt((1 - s) ** 2 + s ** 2)
    vp = (1 - (1 - s) / c) ** 2 * r + (s / c) ** 2
    axis = process.sampler_axis(ts)
    rate = lambda m: (m[:-1] - m[1:]) / (axis[:-1] - axis[1:])
    assert np.corrcoef(rate(vp), rate(mse))[0, 1] < got["pearson_rate"] - 0.02


def test_curve_agreement_divides_flow_rates_by_the_sampler_axis():
    """A measured curve equal to the closed form plus b * (T u) has a rate equal to the closed
    form's minus b per unit of the sampler's axis: pearson_rate is exactly 1 on a shifted grid."""
    process = noise_process(flux_scheduler(), image_seq_len=4096, sampler_sigmas="flux")
    ts = process.sampler_timesteps(20)
    s = ts.double().numpy() / T
    closed = (1 + 0.4) * s ** 2
    u = s / (math.exp(1.15) - (math.exp(1.15) - 1) * s)  # the inverse shift, by hand
    got = schedule.curve_agreement(process, ts, closed + 0.3 * T * u, x0_sq_norm=0.4)
    assert got["pearson_rate"] == pytest.approx(1.0, abs=1e-6), got
    assert schedule.curve_agreement(process, ts, closed, x0_sq_norm=0.4)["pearson_mse"] == pytest.approx(1.0, abs=1e-12)


def test_curve_agreement_on_the_digits_mmdit():
    """The embedded rectified-flow MMDiT: closed form vs its Euler run (28 steps, no shift)."""
    from mosaicdiff import zoo

    if not (zoo.DIGITS_MMDIT_DIR / "diffusion_pytorch_model.safetensors").exists():
        pytest.skip("the digits MMDiT weights are not shipped in this checkout")
    from mosaicdiff.zoo.data import load_digits_tensors
    from mosaicdiff.zoo.train_mmdit import predict

    model = zoo.load_digits_mmdit()
    x0, labels = load_digits_tensors()
    n = 100
    cond = zoo.load_digits_mmdit_conditioning(labels[:n])
    process = noise_process(zoo.digits_mmdit_scheduler())
    ts = process.sampler_timesteps(28)
    sigmas = torch.cat([ts / T, torch.zeros(1)])
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    xs = []
    with torch.no_grad():
        for i in range(len(ts)):
            xs.append(x.clone())
            x = x + (sigmas[i + 1] - sigmas[i]) * predict(model, x, sigmas[i].reshape(1), cond)
    mse, _ = schedule.empirical_curve(xs, x.clamp(-1, 1), ts)
    got = schedule.curve_agreement(process, ts, mse, float((x0.double() ** 2).mean()))
    assert got["pearson_mse"] >= 0.95 and got["pearson_rate"] >= 0.95, got
