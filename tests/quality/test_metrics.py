"""FID, PSNR and class accuracy: exact values on known inputs, and sanity on the real digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from mosaicdiff.eval import quality
from mosaicdiff.zoo.data import load_digits_tensors, train_test_split


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root (pytorch-fid style)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def test_frechet_distance_known_value():
    # 1-D: N(0, 1) vs N(1, 4): d^2 = (0-1)^2 + 1 + 4 - 2*sqrt(1*4) = 2.
    d = quality.frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1))
    assert d == pytest.approx(2.0, abs=1e-12), f"got {d}"
    # Commuting diagonal covariances: sum (sqrt(a_i) - sqrt(b_i))^2 + ||dmu||^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([0.5, 1.0, -1.0])
    want = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = quality.frechet_distance(mu_a, np.diag(a), mu_b, np.diag(b))
    assert got == pytest.approx(want, rel=1e-12), f"got {got}, want {want}"


def test_fid_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 0.3
    got, want = quality.fid(a, b), _scipy_fid(a, b)
    assert got == pytest.approx(want, rel=1e-8), f"eigen-decomposition FID {got} vs scipy sqrtm {want}"
    assert quality.fid(a, a) == pytest.approx(0.0, abs=1e-8), f"FID(a, a) = {quality.fid(a, a)}"


def test_fid_of_features_to_real_is_the_scipy_value():
    """The cached-square-root FID to the real digits against the textbook formula (scipy sqrtm)."""
    real = quality.real_features().double().numpy()
    rng = np.random.default_rng(3)
    sample = real[rng.choice(len(real), 150, replace=False)] + rng.normal(scale=0.5, size=(150, real.shape[1]))
    assert quality.fid_of_features_to_real(sample) == pytest.approx(_scipy_fid(sample, real), rel=1e-6)


def test_fid_rejects_bad_input():
    with pytest.raises(ValueError, match="feature dims differ"):
        quality.fid(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        quality.fid(np.zeros((1, 3)), np.zeros((4, 3)))


def test_fid_real_halves_small_noise_large():
    """Measured with the shipped classifier (64-d features): disjoint random halves of the 1797
    real digits (898/899 images) score 13.5-22.9 over seeds 0..2; Gaussian noise (898 images)
    scores about 1200; one digit class alone about 2300. Thresholds: halves < 40, noise > 500."""
    images, labels = load_digits_tensors()
    feats = quality.real_features()
    assert feats.shape == (1797, 64), f"features shape {tuple(feats.shape)}"
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    halves = quality.fid(feats[perm[:898]], feats[perm[898:]])
    noise = torch.randn((898, 1, 16, 16), generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    fid_noise = quality.fid_to_real(noise)
    fid_one_class = quality.fid_to_real(images[labels == 3])
    print(f"FID halves {halves:.2f}, noise {fid_noise:.1f}, one class {fid_one_class:.1f}")
    assert halves < 40, f"FID between real halves {halves:.2f} >= 40"
    assert fid_noise > 500, f"FID of noise {fid_noise:.1f} <= 500"
    assert fid_one_class > 500, f"FID of a single class {fid_one_class:.1f} <= 500 (mode collapse undetected)"


def test_class_accuracy_on_held_out_digits():
    """The classifier never saw the 180 test digits; measured 179/180 = 0.994 correct."""
    images, labels = load_digits_tensors()
    _, test_idx = train_test_split(len(images))
    acc = quality.class_accuracy(images[test_idx], labels[test_idx])
    wrong = quality.class_accuracy(images[test_idx], (labels[test_idx] + 1) % 10)
    assert acc > 0.97, f"held-out class accuracy {acc:.3f} <= 0.97"
    assert wrong < 0.05, f"accuracy against shifted labels {wrong:.3f} should be near 0"
    with pytest.raises(ValueError, match="labels"):
        quality.class_accuracy(images[:4], labels[:3])


def test_psnr_values():
    a = torch.zeros(3, 1, 4, 4)
    b = a.clone()
    b[1] += 0.25  # MSE 1/16 (exact in float32) -> 10 log10(4 * 16) = 18.0618 dB
    b[2] += 2.0  # MSE 4 (full data range) -> 0 dB
    p = quality.psnr(a, b)
    assert p.shape == (3,), f"psnr shape {tuple(p.shape)}"
    assert math.isinf(p[0].item()) and p[0] > 0, f"identical images: {p[0].item()}"
    want = torch.tensor([10 * math.log10(64.0), 0.0], dtype=torch.float64)
    torch.testing.assert_close(p[1:], want, atol=1e-9, rtol=0, msg=lambda m: f"PSNR of known errors: {m}")
    with pytest.raises(ValueError, match="shapes differ"):
        quality.psnr(a, b[:2])
