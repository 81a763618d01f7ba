"""Divide: closed-form curves, stage boundaries, steps per stage, sparsity allocation, plots.

Expected values are computed independently here (plain Python loops over the formulas of
docs/method.md) or by hand, never by calling the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mosaicdiff.method import schedule

T = 1000


# ----------------------------------------------------------------- independent references


def _abar_loop(kind: str) -> list[float]:
    """alphas_cumprod by a direct loop (linear: DiT; scaled: SDXL)."""
    if kind == "linear":
        b0, b1 = 1e-4, 0.02
        betas = [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
    else:
        s0, s1 = math.sqrt(0.00085), math.sqrt(0.012)
        betas = [(s0 + (s1 - s0) * i / (T - 1)) ** 2 for i in range(T)]
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out


def _boundaries_loop(abar: list[float], M: float, r: float) -> tuple[int, int]:
    """Middle stage by the method's definition, written as plainly as possible."""
    mse = [(1 - math.sqrt(a)) ** 2 * r + (1 - a) for a in abar]
    grad = [mse[0]] + [mse[t] - mse[t - 1] for t in range(1, len(mse))]
    lo_v, hi_v = min(grad), max(grad)
    score = [(g - lo_v) / (hi_v - lo_v) for g in grad]
    peak = max(range(len(score)), key=lambda t: score[t])
    t_low = peak
    while t_low - 1 >= 0 and score[t_low - 1] >= M * score[peak]:
        t_low -= 1
    t_high = peak
    while t_high + 1 < len(score) and score[t_high + 1] >= M * score[peak]:
        t_high += 1
    return t_low, t_high + 1


# ----------------------------------------------------------------- curves


@pytest.mark.parametrize("kind", ["linear", "scaled"])
def test_alphas_cumprod_match_loop(kind):
    fn = schedule.linear_alphas_cumprod if kind == "linear" else schedule.scaled_linear_alphas_cumprod
    got = fn()
    ref = np.array(_abar_loop(kind))
    diff = np.abs(got - ref).max()
    assert diff < 1e-12, f"{kind}: max |diff| {diff:.3g}"


def test_expected_mse_and_grad_formula():
    abar = _abar_loop("linear")
    r = 0.37
    mse = schedule.expected_mse(abar, x0_sq_norm=r)
    grad = schedule.learning_grad(abar, x0_sq_norm=r)
    for t in (0, 1, 250, 999):
        ref = (1 - math.sqrt(abar[t])) ** 2 * r + (1 - abar[t])
        assert abs(mse[t] - ref) < 1e-14, f"mse[{t}] {mse[t]} vs {ref}"
        prev = 0.0 if t == 0 else (1 - math.sqrt(abar[t - 1])) ** 2 * r + (1 - abar[t - 1])
        assert abs(grad[t] - (ref - prev)) < 1e-14, f"grad[{t}] {grad[t]} vs {ref - prev}"
    assert (grad > 0).all(), "Grad(t) must be positive for a decreasing abar"


def test_expected_mse_matches_monte_carlo():
    """The closed form is the expected per-dim distance of x_t to x_0 under the forward process."""
    g = torch.Generator().manual_seed(0)
    d = 200_000
    r = 0.5
    x0 = torch.randn(d, generator=g, dtype=torch.float64) * math.sqrt(r)
    abar = schedule.linear_alphas_cumprod()
    ts = [980, 700, 400, 150, 20]
    traj = []
    for t in ts:
        eps = torch.randn(d, generator=g, dtype=torch.float64)
        traj.append(math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps)
    mse, _ = schedule.empirical_curve(traj, x0, ts)
    ref = schedule.expected_mse(abar, float(x0.pow(2).mean()))[ts]
    rel = np.abs(mse / ref - 1)
    assert rel.max() < 0.02, f"empirical {mse} vs closed form {ref} (rel {rel})"


def test_score_mixing_normalized_terms():
    abar = np.array(_abar_loop("linear"))
    weight = 0.7
    got = schedule.score(abar, log_snr_weight=weight)
    grad = np.diff([(1 - math.sqrt(a)) ** 2 + (1 - a) for a in abar], prepend=0.0)
    lsnr = np.log(abar / (1 - abar))
    ref = (grad - grad.min()) / (grad.max() - grad.min()) + weight * (lsnr - lsnr.min()) / (lsnr.max() - lsnr.min())
    diff = np.abs(got - ref).max()
    assert diff < 1e-9, f"max |diff| {diff:.3g}"
    assert np.abs(schedule.score(abar, log_snr_weight=0.0) - schedule.normalized_score(abar)).max() < 1e-15


# ----------------------------------------------------------------- boundaries


@pytest.mark.parametrize("kind, M, r, expected", [
    ("linear", 0.55, 1.0, (111, 576)),
    ("linear", 0.5, 1.0, (100, 598)),
    ("linear", 0.55, 0.5, (91, 505)),
    ("scaled", 0.55, 1.0, (198, 783)),
])
def test_stage_boundaries_match_loop(kind, M, r, expected):
    abar = _abar_loop(kind)
    ref = _boundaries_loop(abar, M, r)
    got = schedule.stage_boundaries(np.array(abar), speed_threshold=M, x0_sq_norm=r)
    assert got == ref, f"{kind} M={M} r={r}: got {got}, independent loop {ref}"
    assert got == expected, f"{kind} M={M} r={r}: got {got}, recorded {expected}"


def test_linear_schedule_slow_fast_slow_picture():
    """DiT's linear schedule: the fast middle stage sits in the lower-middle of t.

    The paper's summaries quote (200, 600]; the closed form with M = 0.55 and r = 1 gives
    [111, 576): same upper end, a lower start (reported in the issue note).
    """
    t_low, t_high = schedule.stage_boundaries(schedule.linear_alphas_cumprod(), speed_threshold=0.55)
    assert 50 < t_low < 250 and 500 < t_high <= 650, (t_low, t_high)
    grad = schedule.learning_grad(schedule.linear_alphas_cumprod())
    assert t_low <= int(np.argmax(grad)) < t_high


def test_stage_boundaries_torch_input_and_errors():
    abar = torch.from_numpy(schedule.linear_alphas_cumprod())
    assert schedule.stage_boundaries(abar) == (111, 576)
    with pytest.raises(ValueError, match=r"speed_threshold \(the paper's M\) must be in \(0, 1\], got 0.0"):
        schedule.stage_boundaries(abar, speed_threshold=0.0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        schedule.stage_boundaries(np.array([0.5, 1.5]))


def test_stages_from_boundaries():
    assert schedule.stages_from_boundaries(200, 600) == [
        ("early", 600, 1000), ("middle", 200, 600), ("late", 0, 200)]
    for bad in [(0, 600), (600, 600), (700, 600), (200, 1000)]:
        with pytest.raises(ValueError, match="0 < t_low < t_high < T"):
            schedule.stages_from_boundaries(*bad)


# ----------------------------------------------------------------- steps per stage


def _timesteps(cls_name: str, steps: int) -> torch.Tensor:
    import diffusers

    sched = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(steps)
    return sched.timesteps


# Hand-computed: DDIM/DDPM "leading" spacing visit 0, 1000/n, ..., DPM-Solver "linspace" visits
# round(i * 999 / n) for i = 1..n; a timestep equal to a boundary belongs to the stage above it.
@pytest.mark.parametrize("cls_name, steps, expected", [
    ("DDIMScheduler", 50, {"early": 20, "middle": 20, "late": 10}),   # 600..980 / 200..580 / 0..180
    ("DDIMScheduler", 20, {"early": 8, "middle": 8, "late": 4}),      # 600..950 / 200..550 / 0..150
    ("DDPMScheduler", 50, {"early": 20, "middle": 20, "late": 10}),
    ("DDPMScheduler", 20, {"early": 8, "middle": 8, "late": 4}),
    ("DPMSolverMultistepScheduler", 50, {"early": 20, "middle": 21, "late": 9}),  # 200 (=199.8) is middle
    ("DPMSolverMultistepScheduler", 20, {"early": 8, "middle": 9, "late": 3}),    # 599 is middle
])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers' DPM-Solver
def test_steps_per_stage_real_samplers(cls_name, steps, expected):
    ts = _timesteps(cls_name, steps)
    got = schedule.steps_per_stage(ts, schedule.stages_from_boundaries(200, 600))
    assert got == expected, f"{cls_name} {steps} steps: got {got}, expected {expected} (timesteps {ts.tolist()})"
    assert list(got) == ["early", "middle", "late"]


def test_boundary_timestep_goes_to_upper_stage():
    stages = schedule.stages_from_boundaries(200, 600)
    assert schedule.steps_per_stage([600, 200], stages) == {"early": 1, "middle": 1, "late": 0}
    assert schedule.steps_per_stage([599, 199], stages) == {"early": 0, "middle": 1, "late": 1}
    with pytest.raises(ValueError, match="fall in"):
        schedule.steps_per_stage([1000], stages)


# ----------------------------------------------------------------- allocation


def test_allocation_hand_example():
    # w = 1 - score = (0.8, 0.2, 0.7); sum n w = 27; c = 0.5 * 50 / 27
    got = schedule.allocate_sparsity(0.5, [0.2, 0.8, 0.3], [20, 20, 10])
    c = 25 / 27
    ref = [0.8 * c, 0.2 * c, 0.7 * c]
    assert np.abs(np.array(got) - ref).max() < 1e-12, f"{got} vs {ref}"


def test_allocation_clipping_redistributes():
    # c = 1 -> (1.0, 0.5, 1.0); early and late clip to 0.9; the middle takes 40 - 27 = 13 -> 0.65
    got = schedule.allocate_sparsity(0.8, [0.0, 0.5, 0.0], [20, 20, 10], s_max=0.9)
    assert np.abs(np.array(got) - [0.9, 0.65, 0.9]).max() < 1e-12, got


@pytest.mark.parametrize("target", [0.0, 0.1, 0.33, 0.5, 0.7, 0.85, 0.9])
@pytest.mark.parametrize("steps", [(20, 20, 10), (8, 9, 3), (0, 30, 20), (1, 1, 48)])
def test_allocation_hits_target_and_spares_middle(target, steps):
    abar = schedule.linear_alphas_cumprod()
    stages = schedule.stages_from_boundaries(*schedule.stage_boundaries(abar))
    scores = schedule.stage_mean_scores(stages, schedule.normalized_score(abar))
    assert scores[1] == max(scores), scores
    s = schedule.allocate_sparsity(target, scores, dict(zip(("early", "middle", "late"), steps)), s_max=0.9)
    mean = sum(n * v for n, v in zip(steps, s)) / sum(steps)
    assert abs(mean - target) < 1e-12, f"step-weighted mean {mean} != target {target} ({s})"
    assert all(0 <= v <= 0.9 + 1e-15 for v in s), s
    assert s[1] <= min(s[0], s[2]) + 1e-15, f"middle stage must get the least sparsity: {s}"
    if 0 < target < 0.9:
        assert s[1] < max(s[0], s[2]), s


def test_allocation_explicit_and_errors():
    assert schedule.allocate_sparsity(0.5, [0.1, 0.9, 0.2], [20, 20, 10], explicit=[0.6, 0.2, 0.4]) == [0.6, 0.2, 0.4]
    with pytest.raises(ValueError, match="explicit"):
        schedule.allocate_sparsity(0.5, [0.1, 0.9, 0.2], [20, 20, 10], explicit=[0.6, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        schedule.allocate_sparsity(0.5, [0.1, 0.9, 0.2], [20, 20, 10], explicit=[0.6, 1.0, 0.2])
    with pytest.raises(ValueError, match="target_mean"):
        schedule.allocate_sparsity(0.95, [0.1, 0.9, 0.2], [20, 20, 10], s_max=0.9)
    with pytest.raises(ValueError, match="target_mean"):
        schedule.allocate_sparsity(-0.1, [0.1, 0.9, 0.2], [20, 20, 10])
    with pytest.raises(ValueError, match="same non-zero length"):
        schedule.allocate_sparsity(0.5, [0.1, 0.9], [20, 20, 10])
    with pytest.raises(ValueError, match="positive total"):
        schedule.allocate_sparsity(0.5, [0.1, 0.9, 0.2], [0, 0, 0])
    with pytest.raises(ValueError, match="stage_scores"):
        schedule.allocate_sparsity(0.5, [0.1, 1.9, 0.2], [20, 20, 10])


# ----------------------------------------------------------------- empirical curve and plot


def test_empirical_curve_hand_values():
    x0 = torch.zeros(2, 3)
    traj = [x0 + 3, x0 + 2, x0 + 1]
    mse, rate = schedule.empirical_curve(traj, x0)
    assert mse.tolist() == [9.0, 4.0, 1.0]
    assert rate.tolist() == [5.0, 3.0, 1.0]  # last step: to the final sample (mse 0)
    _, rate_t = schedule.empirical_curve(traj, x0, timesteps=[20, 10, 0])
    assert np.allclose(rate_t, [0.5, 0.3, 1.0], rtol=0, atol=1e-15), rate_t  # dt = 10, 10, 1 (t = -1 at the end)
    with pytest.raises(ValueError, match="empty"):
        schedule.empirical_curve([], x0)
    with pytest.raises(ValueError, match="shape"):
        schedule.empirical_curve([torch.zeros(3, 2)], x0)
    with pytest.raises(ValueError, match="timesteps"):
        schedule.empirical_curve(traj, x0, timesteps=[20, 10])


def test_plot_stage_curves_writes_png(tmp_path):
    from mosaicdiff.eval.plots import plot_stage_curves

    abar = schedule.linear_alphas_cumprod()
    p1 = plot_stage_curves(tmp_path / "a.png", abar, (111, 576))
    p2 = plot_stage_curves(tmp_path / "sub" / "b.png", abar, (200, 600),
                           empirical=([980, 600, 300, 0], [1.5, 0.9, 0.4, 0.05]), title="t")
    for p in (p1, p2):
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n", f"{p} is not a PNG ({head!r})"
    with pytest.raises(ValueError, match="same length"):
        plot_stage_curves(tmp_path / "c.png", abar, (200, 600), empirical=([980, 600], [1.0]))


def test_curve_agreement_of_the_closed_form_with_itself_and_against_its_opposite():
    """QF3's Pearson figures: 1 for a measured curve proportional to the closed form (plus a
    constant), about -1 for one running the other way; the rates are compared as the same finite
    difference between steps, so an affine copy of the closed form gives exactly 1."""
    abar = schedule.linear_alphas_cumprod()
    ts = torch.arange(980, -1, -20)
    closed = schedule.expected_mse(abar, 0.4)[ts.numpy()]
    same = schedule.curve_agreement(abar, ts, 3.0 * closed + 0.1, x0_sq_norm=0.4)
    assert same["steps"] == len(ts)
    assert same["pearson_mse"] == pytest.approx(1.0, abs=1e-12) and same["pearson_rate"] == pytest.approx(1.0, abs=1e-9)
    opposite = schedule.curve_agreement(abar, ts, closed[::-1].copy(), x0_sq_norm=0.4)
    assert opposite["pearson_mse"] < -0.5
    # a measured MSE whose fall is concentrated in the first steps (high t), where the closed
    # form falls slowest: the speeds are anti-correlated
    bent = schedule.curve_agreement(abar, ts, np.linspace(1, 0, len(ts)) ** 4, x0_sq_norm=0.4)
    assert bent["pearson_rate"] < -0.5


def test_curve_agreement_divides_the_rates_by_unevenly_spaced_steps():
    """Rates are per unit of t. A measured MSE that is the closed form plus a linear trend in t has a
    per-t rate that is the closed form's plus a constant, so ``pearson_rate`` is exactly 1 on any
    spacing. Per step (without the division) the trend adds ``b * dt`` to each fall, which only
    uneven steps (sparse at high noise, dense below) turn into a disagreement."""
    abar = schedule.linear_alphas_cumprod()
    ts = torch.tensor([999, 700, 500, 400, 300, 250, 200, 150, 100, 50, 0])
    dt = -np.diff(ts.numpy())
    closed = schedule.expected_mse(abar, 0.4)[ts.numpy()]
    b = float((-np.diff(closed) / dt).max())  # a trend as steep as the closed form's fastest fall
    trended = closed + b * ts.numpy()
    assert np.all(np.diff(trended) < 0), "still an MSE that falls along the run"
    got = schedule.curve_agreement(abar, ts, trended, x0_sq_norm=0.4)
    assert got["pearson_rate"] == pytest.approx(1.0, abs=1e-9), got
    assert got["pearson_mse"] == pytest.approx(np.corrcoef(closed, trended)[0, 1], abs=1e-12)
    per_step = np.corrcoef(-np.diff(closed), -np.diff(trended))[0, 1]
    assert per_step < 0.5, f"the per-step falls must disagree here, or the test checks nothing ({per_step})"
    # on even steps the same trend is invisible either way (what the other test covers)
    even = torch.arange(990, -1, -90)
    closed_even = schedule.expected_mse(abar, 0.4)[even.numpy()]
    assert schedule.curve_agreement(abar, even, closed_even + b * even.numpy(), x0_sq_norm=0.4)["pearson_rate"] \
        == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("ts,mse,match", [
    (torch.tensor([900, 500]), [1.0, 0.5], ">= 3 steps"),
    (torch.tensor([900, 500, 100]), [1.0, 0.5], ">= 3 steps"),
    (torch.tensor([500, 900, 100]), [1.0, 0.5, 0.1], "strictly decreasing"),
])
def test_curve_agreement_refuses_bad_runs(ts, mse, match):
    with pytest.raises(ValueError, match=match):
        schedule.curve_agreement(schedule.linear_alphas_cumprod(), ts, mse)
