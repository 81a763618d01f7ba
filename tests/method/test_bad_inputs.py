"""Bad inputs of the pruning API: each one a clear error naming the problem, before any long work.

Every case here was a poor answer before (a raw traceback, an internal name, or silently used
data); the expected fragments are the messages users now see.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mosaicdiff.method.pruning as prune_mod
from mosaicdiff.method.calibrate import Calibration
from mosaicdiff.families.dit import adapter as dit
from mosaicdiff.method.pruning import plan_stages
from mosaicdiff.api import prune, prune_stages

FAST = dict(samples_per_stage=2, align=None, progress=False)


def tiny_dit(heads: int = 4, in_channels: int = 4, sample_size: int = 8):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=8, in_channels=in_channels,
                                 num_layers=1, sample_size=sample_size, patch_size=2,
                                 num_embeds_ada_norm=10).eval()


def calib(n: int = 4, shape=(4, 8, 8), labels=None, null_class: int = 10) -> Calibration:
    x0 = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    return Calibration(x0, torch.arange(n) % 10 if labels is None else labels, null_class=null_class)


@pytest.fixture
def no_long_work(monkeypatch):
    """Fails the test if calibration or pruning starts: the error must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("long work started before the bad input was reported")

    monkeypatch.setattr(prune_mod, "stage_inputs", boom)
    monkeypatch.setattr(prune_mod, "collect_hessians", boom)
    monkeypatch.setattr(prune_mod.compact, "prune_groups", boom)


# ----------------------------------------------------------------- calibration data vs the model


@pytest.mark.parametrize("model_kw, shape, fragment", [
    # was: RuntimeError "Given groups=1, weight of size [32, 1, 2, 2] ... expected ... 1 channels"
    (dict(in_channels=1), (3, 8, 8), r"samples are \(C, H, W\) = \(3, 8, 8\) but the model expects \(1, 8, 8\)"),
    # was: used silently (positions interpolated), pruned on the wrong statistics
    (dict(in_channels=1, sample_size=16), (1, 20, 20),
     r"= \(1, 20, 20\) but the model expects \(1, 16, 16\) \(config in_channels=1, sample_size=16\)"),
])
def test_calibration_shape_must_fit_the_model(model_kw, shape, fragment, no_long_work):
    with pytest.raises(ValueError, match=fragment):
        prune_stages(tiny_dit(**model_kw), calib(shape=shape), 0.3, boundaries=(200, 600), **FAST)


@pytest.mark.parametrize("labels, fragment", [
    (torch.tensor([0, 1, 2, 12]), r"class ids in \[0, 10\) or the null class 10 \(null_class\), got 12 at index 3"),
    (torch.tensor([0, -1, 2, 3]), r"got -1 at index 1"),
])
def test_calibration_labels_out_of_range(labels, fragment):
    # was: accepted here, then IndexError "index out of range in self" deep in the embedding
    with pytest.raises(ValueError, match=fragment):
        calib(labels=labels)


def test_calibration_null_class_must_be_the_models(no_long_work):
    # was: IndexError "index out of range in self" (default null class 1000 for a 10-class model)
    with pytest.raises(ValueError, match=r"Calibration.null_class=1000 but the model's null class "
                                         r"\(config.num_embeds_ada_norm\) is 10; pass .*null_class=10"):
        prune_stages(tiny_dit(), calib(null_class=1000), 0.3, boundaries=(200, 600), **FAST)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_calibration_non_finite_latents(value):
    # was: "stage boundaries must satisfy 0 < t_low ..." (NaN r) or a NaN x0_sq_norm in the config
    x0 = torch.randn(4, 4, 8, 8)
    x0[2, 1, 3, 3] = value
    with pytest.raises(ValueError, match=r"calibration latents contain NaN/inf at index \[2\] \(1 of 4 samples\)"):
        Calibration(x0, torch.arange(4), null_class=10)


@pytest.mark.parametrize("method", ["magnitude", "mosaic"])
def test_latents_replaced_after_construction_are_checked_at_prune(method, no_long_work):
    c = calib()
    c.x0 = c.x0.clone()
    c.x0[1, 0, 0, 0] = float("nan")  # a dataclass field: may change after __post_init__
    with pytest.raises(ValueError, match=r"NaN/inf at index \[1\]"):
        prune(tiny_dit(), c, 0.3, method=method, **FAST)


def test_calibration_batch_mismatch():
    with pytest.raises(ValueError, match=r"labels must be \(4,\): one class id per sample of x0 \(4 samples\), "
                                         r"got shape \(3,\)"):
        Calibration(torch.randn(4, 4, 8, 8), torch.arange(3), null_class=10)


def test_calibration_repr_is_short():
    assert repr(calib()) == "Calibration(x0=(4, 4, 8, 8) torch.float32 on cpu, labels=(4,), null_class=10)"


# ----------------------------------------------------------------- sparsity and its cap, in public names


def test_target_above_default_cap_speaks_public_names(no_long_work):
    # was: "target_mean must be in [0, s_max=0.9], got 0.95"
    with pytest.raises(ValueError, match=r"target_sparsity=0.95 is above s_max=0.9 \(the default cap "
                                         r"min\(0.9, target_sparsity \+ 0.1\)\).*use target_sparsity <= 0.9, "
                                         r"pass s_max") as exc:
        prune_stages(tiny_dit(), calib(), 0.95, boundaries=(200, 600), **FAST)
    assert "target_mean" not in str(exc.value)


def test_target_above_passed_cap():
    with pytest.raises(ValueError, match=r"target_sparsity=0.5 is above s_max=0.4 \(passed\)"):
        plan_stages(0.5, boundaries=(200, 600), s_max=0.4)


@pytest.mark.parametrize("s_max", [1.2, 0, 1.0, True, "0.9"])
def test_s_max_out_of_range(s_max):
    with pytest.raises(ValueError, match=r"s_max must be a number in \(0, 1\), got "):
        plan_stages(0.5, boundaries=(200, 600), s_max=s_max)


def test_s_max_is_a_working_parameter():
    stages, _ = plan_stages(0.85, boundaries=(200, 600), s_max=0.86)
    assert max(s[3] for s in stages) <= 0.86 + 1e-12 and min(s[3] for s in stages) < 0.85


def test_single_stage_sparsity_that_removes_every_head(no_long_work):
    # was: "... head_sparsity=0.95 removes 4 of 4 heads ...; lower s_max" (s_max plays no part here)
    with pytest.raises(ValueError, match=r"^target_sparsity=0.95 removes 4 of 4 attention heads per block; "
                                         r"at least one head must be kept: use target_sparsity < 0.8750$"):
        prune_stages(tiny_dit(), calib(), 0.95, method="uniform", **FAST)


def test_allocated_stage_that_removes_every_head_names_s_max(no_long_work):
    with pytest.raises(ValueError, match=r"stage 'early' with sparsity 0.950 removes 4 of 4 attention heads.*"
                                         r"pass s_max < 0.8750"):
        prune_stages(tiny_dit(), calib(), 0.85, boundaries=(200, 600), s_max=0.95, **FAST)


# ----------------------------------------------------------------- align


@pytest.mark.parametrize("align", [10000, 128])
def test_align_not_below_mlp_width_is_refused(align, no_long_work):
    # was: accepted, every stage kept the full MLP (128 channels) without a word
    with pytest.raises(ValueError, match=rf"align={align} is not smaller than the MLP width 128: .*"
                                         r"the MLP would not be pruned"):
        prune_stages(tiny_dit(), calib(), 0.5, boundaries=(200, 600), samples_per_stage=2, align=align,
                     progress=False)


def test_align_not_below_mlp_width_in_prune_block():
    lin = {n: torch.nn.Linear(16, 16) for n in ("q", "k", "v", "proj")}
    lin.update(fc1=torch.nn.Linear(16, 64), fc2=torch.nn.Linear(64, 16))
    with pytest.raises(ValueError, match=r"align=64 is not smaller than the MLP width 64"):
        dit.prune_block(lin, None, 2, 0.5, 0.5, method="magnitude", align=64)
    assert dit.prune_block(lin, None, 2, 0.5, 0.0, method="magnitude", align=64).mlp_width == 64


@pytest.mark.parametrize("align", [0, -16, True, 2.5, "64"])
def test_align_must_be_a_positive_integer(align, no_long_work):
    # was: True silently meant "no alignment"; 0 answered with the internal name `multiple`
    with pytest.raises(ValueError, match=r"align must be a positive integer or None, got "):
        prune_stages(tiny_dit(), calib(), 0.5, boundaries=(200, 600), samples_per_stage=2, align=align,
                     progress=False)


def test_align_accepts_numpy_integers():
    stages = prune_stages(tiny_dit(), None, 0.5, method="magnitude", align=np.int64(16), progress=False)
    assert stages[0].blocks[0].mlp_width % 16 == 0 and stages[0].blocks[0].mlp_width < 128


# ----------------------------------------------------------------- boundaries


@pytest.mark.parametrize("bounds, fragment", [
    ((200.9, 600.9), r"t_low must be an integer timestep, got 200.9 \(float\)"),
    ((200.0, 600.0), r"t_low must be an integer timestep, got 200.0 \(float\)"),  # was: accepted
    ((200, np.float64(600)), r"t_high must be an integer timestep, got np.float64\(600.0\) \(float64\)"),
    ((True, 600), r"t_low must be an integer timestep, got True \(bool\)"),  # was: t_low = 1
    (200, r"boundaries must be a pair of integer timesteps \(t_low, t_high\), got 200"),  # was: TypeError len()
    ("200,600", r"boundaries must be a pair of integer timesteps"),
])
def test_boundaries_must_be_integer_pairs(bounds, fragment):
    with pytest.raises(ValueError, match=fragment):
        plan_stages(0.3, boundaries=bounds)


def test_boundaries_accept_numpy_and_tensor_integers():
    for bounds in ((np.int64(200), np.int32(600)), (torch.tensor(200), torch.tensor(600))):
        stages, info = plan_stages(0.3, boundaries=bounds)
        assert [s[:3] for s in stages] == [("early", 600, 1000), ("middle", 200, 600), ("late", 0, 200)]
        assert info["boundaries"] == [200, 600] and all(type(b) is int for b in info["boundaries"])
