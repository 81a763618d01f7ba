"""`mosaicdiff.eval.measure`: intervals per metric and paired differences between methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaicdiff.eval import measure
from mosaicdiff.zoo.data import load_digits_tensors


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_tensors()
    return images[:120], labels[:120]


def test_summary_has_the_metrics_and_intervals_around_them(digits):
    images, labels = digits
    noisy = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    m = measure.measure(noisy, labels, images, per_seed=60).summary(resamples=200)
    assert m["images"] == 120 and len(m["fid_per_seed"]) == 2
    for name in ("class_accuracy", "psnr_to_dense"):
        iv = m["intervals"][name]
        assert iv["low"] <= m[name] <= iv["high"] and iv["low"] < iv["high"], (name, iv)
    # the PSNR of noise of std 0.3 on a data range of 2: 10 log10(4 / 0.09) ~ 16.5 dB before clamping
    assert 15 < m["psnr_to_dense"] < 20
    dense = measure.measure(images, labels, None, per_seed=120).summary(resamples=200)
    assert dense["psnr_to_dense"] is None and "psnr_to_dense" not in dense["intervals"]
    assert dense["fid_per_seed"] is None  # one seed: the pooled value is the only one


def test_difference_separates_a_real_gap_and_not_noise(digits):
    images, labels = digits
    g = torch.Generator().manual_seed(1)
    slightly = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    badly = (images + 0.4 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    also_slightly = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    a, b, c = (measure.measure(x, labels, images, per_seed=120) for x in (slightly, badly, also_slightly))
    d = measure.difference(a, b, resamples=200)
    assert d["psnr_to_dense"]["value"] > 5 and d["separated"]["psnr_to_dense"]
    same = measure.difference(a, c, resamples=200)
    assert not same["separated"]["psnr_to_dense"], same["psnr_to_dense"]
    line = measure.format_difference(d)
    assert "psnr_to_dense +" in line and "separated" in line and "fid" in line


def test_difference_refuses_unpaired_sets(digits):
    images, labels = digits
    a = measure.measure(images, labels, None, per_seed=120)
    b = measure.measure(images[:60], labels[:60], None, per_seed=60)
    with pytest.raises(ValueError, match="same noise"):
        measure.difference(a, b)
    with pytest.raises(ValueError, match="whole seeds"):
        measure.measure(images[:50], labels[:50], None, per_seed=40)
    assert np.isclose(measure.difference(a, a, resamples=20)["class_accuracy"]["value"], 0.0)


def test_fid_per_seed_scores_each_seeds_own_images(digits):
    from mosaicdiff.eval import quality

    images, labels = digits
    g = torch.Generator().manual_seed(2)
    # seed 0 near-clean, seed 1 heavily noised: their FIDs are far apart
    seeds = [(images[:60] + 0.05 * torch.randn(images[:60].shape, generator=g)).clamp(-1, 1),
             (images[60:] + 0.5 * torch.randn(images[60:].shape, generator=g)).clamp(-1, 1)]
    m = measure.measure(torch.cat(seeds), labels, images, per_seed=60).summary(resamples=20)
    own = [quality.fid_of_features_to_real(quality.classifier_features(x).double().numpy()) for x in seeds]
    assert own[1] > own[0] + 20, own
    assert m["fid_per_seed"] == pytest.approx(own, rel=1e-9, abs=1e-9), (m["fid_per_seed"], own)


def test_set_level_differences_of_clearly_different_sets(digits):
    images, labels = digits
    g = torch.Generator().manual_seed(3)
    slightly = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    badly = (images + 0.4 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    a, b = (measure.measure(x, labels, images, per_seed=120) for x in (slightly, badly))
    sa, sb = a.summary(resamples=20), b.summary(resamples=20)
    d = measure.difference(a, b, resamples=200)
    for name in ("fid", "pixel_w1"):  # the paired difference is a - b on the full sets, not a - a
        assert d[name]["value"] == pytest.approx(sa[name] - sb[name], rel=1e-9, abs=1e-12), (name, d[name])
        assert d[name]["value"] < 0 and d[name]["high"] < 0 and d["separated"][name], (name, d[name])
    assert d["fid"]["value"] < -20 and d["pixel_w1"]["value"] < -0.01, (d["fid"], d["pixel_w1"])
    back = measure.difference(b, a, resamples=20)
    assert back["fid"]["value"] == pytest.approx(-d["fid"]["value"], rel=1e-9)
