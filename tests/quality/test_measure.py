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
