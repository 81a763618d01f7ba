"""Calibration: data validation, stage noising statistics, and Hessian accumulation hooks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.method import calibrate, schedule
from mosaicdiff.families import adapter_for
from mosaicdiff.families.dit.adapter import DIT
from mosaicdiff.method.calibrate import Calibration, collect_hessians, stage_inputs
from mosaicdiff.families.dit import adapter as dit


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def test_calibration_validation():
    c = Calibration(torch.randn(3, 4, 8, 8), [1, 2, 3], null_class=10)
    assert c.labels.dtype == torch.int64 and len(c) == 3
    with pytest.raises(ValueError, match="empty"):
        Calibration(torch.randn(0, 4, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Calibration(torch.randn(3, 64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        Calibration(torch.randn(3, 4, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="null_class"):
        Calibration(torch.randn(3, 4, 8, 8), torch.zeros(3, dtype=torch.long), null_class=-1)
    with pytest.raises(TypeError, match="floating"):
        Calibration(torch.zeros(3, 4, 8, 8, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_x0_sq_norm():
    x0 = torch.full((2, 1, 4, 4), 0.5)
    assert abs(Calibration(x0, [0, 1]).x0_sq_norm - 0.25) < 1e-12


def test_stage_inputs_shapes_cfg_and_t_range():
    calib = Calibration(torch.randn(5, 4, 8, 8), torch.arange(5), null_class=10)
    g = torch.Generator().manual_seed(0)
    x_t, t, cond = stage_inputs(calib, 200, 600, 12, cfg=True, generator=g)
    assert set(cond) == {"class_labels"}, "a Calibration's conditions are the DiT's class_labels"
    labels = cond["class_labels"]
    assert x_t.shape == (24, 4, 8, 8) and t.shape == (24,) and labels.shape == (24,)
    assert ((t >= 200) & (t < 600)).all(), t
    assert torch.equal(t[:12], t[12:]) and torch.equal(x_t[:12], x_t[12:])
    assert (labels[12:] == 10).all() and (labels[:12] < 5).all()
    counts = torch.bincount(labels[:12], minlength=5)
    assert counts.min() >= 2 and counts.max() <= 3, f"cycling through the data should balance it: {counts}"
    x2, t2, l2 = stage_inputs(calib, 200, 600, 12, cfg=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x2, x_t[:12]) and torch.equal(t2, t[:12]), "seeded draws must be reproducible"
    with pytest.raises(ValueError, match="t_start"):
        stage_inputs(calib, 600, 600, 4)
    with pytest.raises(ValueError, match="t_start"):
        stage_inputs(calib, 0, 1001, 4)
    with pytest.raises(ValueError, match="n_samples"):
        stage_inputs(calib, 0, 10, 0)


@pytest.mark.parametrize("schedule_kind", ["linear", "scaled_linear"])
def test_stage_inputs_follow_the_forward_process(schedule_kind):
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: check mean and variance over many pixels at one t."""
    from diffusers import DDIMScheduler

    c = 0.8
    x0 = torch.full((1, 4, 64, 64), c)
    calib = Calibration(x0, [0])
    t0 = 437
    if schedule_kind == "linear":
        source, abar = None, schedule.linear_alphas_cumprod()[t0]
    else:
        source = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear")
        abar = schedule.scaled_linear_alphas_cumprod()[t0]
    x_t, t, _ = stage_inputs(calib, t0, t0 + 1, 4, cfg=False, generator=torch.Generator().manual_seed(1),
                             alphas_cumprod=source)
    assert (t == t0).all()
    d = x_t.numel()
    mean, var = float(x_t.double().mean()), float(x_t.double().var())
    sd = math.sqrt(1 - abar)
    assert abs(mean - math.sqrt(abar) * c) < 5 * sd / math.sqrt(d), (mean, math.sqrt(abar) * c)
    assert abs(var / (1 - abar) - 1) < 0.05, (var, 1 - abar)


def _captured_inputs(model, x, t, labels, batch_size):
    """Inputs of every block's proj and fc2, caught by forward (post-)hooks, concatenated.

    Same batching as the code under test, so the float32 activations are bit-identical.
    """
    caught, handles = [], []
    for block in model.transformer_blocks:
        lin = dit.block_linears(block)
        entry = {"proj": [], "fc2": []}
        for name in ("proj", "fc2"):
            def hook(mod, args, out, name=name, entry=entry):
                entry[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
            handles.append(lin[name].register_forward_hook(hook))
        caught.append(entry)
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            model(x[s:s + batch_size], timestep=t[s:s + batch_size], class_labels=labels[s:s + batch_size])
    for h in handles:
        h.remove()
    return [{k: torch.cat(v) for k, v in e.items()} for e in caught]


def test_collect_hessians_matches_direct_computation(monkeypatch):
    model = tiny_dit()
    calib = Calibration(torch.randn(6, 4, 8, 8), torch.arange(6) % 10, null_class=10)
    x_t, t, cond = stage_inputs(calib, 0, 1000, 5, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(calibrate, "_CHUNK_ELEMENTS", 1000)  # exercise the chunked accumulation
    model.train()
    hs = collect_hessians(model, x_t, t, cond, batch_size=3, progress=False, adapter=DIT)
    assert model.training, "training mode must be restored"
    model.eval()
    ref = _captured_inputs(model, x_t, t, cond["class_labels"], batch_size=3)
    assert len(hs) == 2
    for i, (got, exp) in enumerate(zip(hs, ref)):
        for name in ("proj", "fc2"):
            X = exp[name]
            H_ref = X.T @ X / X.shape[0]
            H = got[name]
            assert H.dtype == torch.float64 and H.shape == H_ref.shape
            assert_close(H, H_ref, atol=1e-9, rtol=1e-9,
                         msg=lambda m: f"block {i} {name}: Hessian vs direct X^T X / n\n{m}")
    for block in model.transformer_blocks:
        lin = dit.block_linears(block)
        assert not lin["proj"]._forward_pre_hooks and not lin["fc2"]._forward_pre_hooks, "hooks must be removed"


def test_collect_hessians_errors():
    model = tiny_dit()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="expected x_t"):
        collect_hessians(model, x, torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), adapter=DIT)
    with pytest.raises(ValueError, match="batch_size"):
        collect_hessians(model, x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), batch_size=0,
                         adapter=DIT)
    with pytest.raises(ValueError, match=r"^mosaicdiff.prune: no model adapter for this model; supported: diffusers "
                                         r"DiTTransformer2DModel, diffusers UNet2DConditionModel \(SD 1.x/2.x, SDXL\), "
                                         r"diffusers PixArtTransformer2DModel \(PixArt-alpha, PixArt-Sigma\), "
                                         r"diffusers SD3Transformer2DModel \(SD3, SD3.5\), "
                                         r"diffusers FluxTransformer2DModel \(FLUX.1\); got Linear"):
        adapter_for(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="DiT"):  # the adapter refuses a model not of its family
        collect_hessians(torch.nn.Linear(2, 2), x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                         adapter=DIT)
