"""KID, speckle rate, pixel W1 and SSIM (`mosaicdiff.eval.pixel_metrics`): known answers, independent
formulations (explicit loops, scipy, sorted-sample W1) and bad-input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from mosaicdiff.eval import pixel_metrics as pm
from mosaicdiff.zoo.data import load_digits_tensors


def _blank(n: int = 1, size: int = 16, value: float = -1.0) -> torch.Tensor:
    return torch.full((n, 1, size, size), value, dtype=torch.float64)


def _random_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- KID

def _mmd2_loop(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 written out pair by pair, kernel from its formula."""
    d = x.shape[1]

    def k(a, b):
        return (sum(a[t] * b[t] for t in range(d)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_matches_pairwise_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(0.4, 1.2, size=(5, 3))
    assert pm.mmd2_unbiased(x, y) == pytest.approx(_mmd2_loop(x, y), rel=1e-12)
    assert pm.mmd2_unbiased(torch.tensor(x), torch.tensor(y)) == pytest.approx(_mmd2_loop(x, y), rel=1e-12)


def test_mmd2_known_answer():
    # d = 1, k(x, y) = (x y + 1)^3. x: k copies of +1 and k of -1, y: all 0.
    # Same-sign pairs have k = 8, opposite pairs 0: mean over i != j is 8 (k - 1) / (2k - 1);
    # k(y, y) = k(x, y) = 1, so MMD^2 = 8 (k - 1) / (2k - 1) + 1 - 2.
    for k in (2, 5, 50):
        x = np.array([[1.0]] * k + [[-1.0]] * k)
        want = 8 * (k - 1) / (2 * k - 1) - 1
        assert pm.mmd2_unbiased(x, np.zeros((7, 1))) == pytest.approx(want, rel=1e-12), k


def test_kid_same_distribution_near_zero_shift_positive():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=(600, 8)), rng.uniform(size=(600, 8))
    same, _ = pm.kid(a, b, subset_size=300, num_subsets=20)
    shifted, spread = pm.kid(a, b + 0.5, subset_size=300, num_subsets=20)
    # Same distribution: unbiased, |KID| of the order of its noise; shifted by 0.5 in every
    # dimension: the population MMD^2 is about 2.
    assert abs(same) < 0.02, same
    assert shifted > 1.0 and spread < 0.2 * shifted, (shifted, spread)


def test_kid_subsets_average_to_full_set_estimate():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 4)), rng.normal(0.3, 1.0, size=(60, 4))
    full = pm.mmd2_unbiased(a, b)
    mean, std = pm.kid(a, b, subset_size=20, num_subsets=3000, seed=0)
    assert mean == pytest.approx(full, abs=4 * std / math.sqrt(3000)), (mean, full, std)
    # subsets as large as the smaller set: all of `a` each time
    mean_all, _ = pm.kid(a, a, subset_size=1000, num_subsets=1)
    assert mean_all == pytest.approx(pm.mmd2_unbiased(a, a), rel=1e-12)


def test_kid_statistic_full_and_with_duplicates():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(9, 3))
    stat = pm.kid_statistic(a, b)
    assert stat(np.arange(7)) == pytest.approx(pm.mmd2_unbiased(a, b), rel=1e-12)
    idx = np.array([0, 0, 2, 5, 5, 5, 6])
    d = a.shape[1]
    xs = a[idx]
    pairs = [(i, j) for i in range(7) for j in range(7) if idx[i] != idx[j]]
    xx = np.mean([(xs[i] @ xs[j] / d + 1) ** 3 for i, j in pairs])
    yy = np.mean([(b[i] @ b[j] / d + 1) ** 3 for i in range(9) for j in range(9) if i != j])
    xy = np.mean([(x @ y / d + 1) ** 3 for x in xs for y in b])
    assert stat(idx) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    with pytest.raises(ValueError, match="single distinct image"):
        stat(np.array([3, 3, 3]))


def test_kid_bad_input():
    with pytest.raises(ValueError, match="feature dims differ"):
        pm.mmd2_unbiased(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        pm.kid(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="N >= 2"):
        pm.kid_statistic(np.zeros(5), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="subset_size >= 2"):
        pm.kid(np.zeros((4, 3)), np.zeros((4, 3)), subset_size=1)


# ----------------------------------------------------------------------------- speckle

def test_single_salt_pixel_is_one_in_256():
    for r, c in ((7, 9), (0, 0), (15, 3)):  # inside, a corner, an edge
        img = _blank()
        img[0, 0, r, c] = 1.0
        assert pm.speckle_rate(img).item() == 1 / 256, (r, c)
    pepper = _blank(value=1.0)
    pepper[0, 0, 4, 4] = -1.0
    assert pm.speckle_rate(pepper).item() == 1 / 256


def test_speckle_ignores_wide_strokes_and_small_deviations():
    img = _blank(2)
    # A 2-pixel-wide stroke across the image: every stroke pixel's window is 6/9 stroke. (The
    # square end of a stroke that stops inside would count: its corner windows are 4/9 stroke.)
    img[0, 0, :, 6:8] = 1.0
    img[1, 0, 5, 5] = -1.0 + 0.7  # a faint dot below the threshold
    assert pm.speckle_rate(img).tolist() == [0.0, 0.0]
    assert pm.speckle_rate(img, threshold=0.5).tolist() == [0.0, 1 / 256]


def test_speckle_counts_clamped_values():
    img = _blank()
    img[0, 0, 3, 3] = 5.0  # displays as white: the same speckle as +1
    img[0, 0, 10, 10] = -4.0  # below the background: displays as black, no speckle
    assert pm.speckle_rate(img).item() == 1 / 256


def test_median3x3_matches_scipy():
    x = _random_images(3, size=10)
    want = ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="nearest")
    np.testing.assert_allclose(pm.median3x3(x).numpy(), want, rtol=0, atol=1e-7)


def test_real_digits_have_no_speckle():
    """The threshold's justification (`SPECKLE_THRESHOLD`): every real digit scores 0, and 0.70
    (just below the largest deviation of a real pixel from its median) already flags some."""
    images, _ = load_digits_tensors()
    assert pm.speckle_rate(images).max().item() == 0.0
    assert pm.speckle_rate(images, threshold=0.70).max().item() > 0.0


def test_speckle_bad_input():
    with pytest.raises(ValueError, match="threshold must be > 0"):
        pm.speckle_rate(_blank(), threshold=0.0)
    with pytest.raises(ValueError, match=r"expected images \(N, 1, H, W\)"):
        pm.speckle_rate(torch.zeros(16, 16))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        pm.speckle_rate(np.zeros((1, 1, 16, 16)))


# ----------------------------------------------------------------------------- pixel W1

def test_w1_point_masses_and_two_valued():
    assert pm.pixel_w1(_blank(value=0.0), _blank(3, value=-1.0)) == pytest.approx(1.0, abs=1e-12)
    half = _blank()
    half[0, 0, :8] = 1.0  # half the pixels at +1: half the mass moves by 2
    assert pm.pixel_w1(half, _blank(value=-1.0)) == pytest.approx(1.0, abs=1e-12)
    # clamped: 1.5 displays as 1.0
    assert pm.pixel_w1(_blank(value=1.5), _blank(value=1.0)) == pytest.approx(0.0, abs=1e-12)


def test_w1_matches_sorted_samples():
    # With equally many pixels, W1 is the mean absolute difference of the sorted values.
    a, b = _random_images(4, seed=1) ** 3, _random_images(4, seed=2)
    want = np.abs(np.sort(a.flatten().numpy().astype(np.float64)) - np.sort(b.flatten().numpy())).mean()
    assert pm.pixel_w1(a, b) == pytest.approx(want, rel=1e-9)


def test_w1_statistic_resamples():
    a, ref = _random_images(5, seed=3), _random_images(7, seed=4) * 0.5
    stat = pm.pixel_w1_statistic(a, ref)
    idx = np.array([4, 4, 1, 0, 0])
    # the merged-grid statistic against scipy on the resampled pixels written out (duplicates included)
    from scipy.stats import wasserstein_distance

    want = wasserstein_distance(a[torch.from_numpy(idx)].clamp(-1, 1).flatten().double().numpy(),
                                ref.clamp(-1, 1).flatten().double().numpy())
    assert stat(idx) == pytest.approx(want, rel=1e-12)


def test_w1_to_real_uses_all_real_digits():
    real, _ = load_digits_tensors()
    x = _random_images(3, seed=8)
    assert pm.pixel_w1_to_real(x) == pytest.approx(pm.pixel_w1(x, real), rel=1e-12)
    assert pm.pixel_w1_to_real(real[:500]) < 0.01  # a subset of the reference: small


def test_w1_bad_input():
    with pytest.raises(ValueError, match="at least 1 image"):
        pm.pixel_w1(_blank(0), _blank())
    with pytest.raises(ValueError, match=r"expected images \(N, 1, H, W\)"):
        pm.pixel_w1(torch.zeros(2, 3, 16, 16), _blank())


# ----------------------------------------------------------------------------- SSIM

def test_ssim_identical_is_one():
    x = _random_images(4)
    np.testing.assert_allclose(pm.ssim(x, x.clone()).numpy(), 1.0, atol=1e-12)


def test_ssim_constant_images_closed_form():
    # Flat images: no variance or covariance, so only the luminance term of the gray levels
    # g = (x + 1) / 2 is left: (2 g_a g_b + C1) / (g_a^2 + g_b^2 + C1), C1 = 0.01^2.
    c1 = 0.01 ** 2
    cases = {(0.2, -0.5): (2 * 0.6 * 0.25 + c1) / (0.6 ** 2 + 0.25 ** 2 + c1),  # = 0.8275...
             (-1.0, 1.0): c1 / (1 + c1),  # black vs white
             (0.0, 0.0): 1.0}
    for (a, b), want in cases.items():
        got = pm.ssim(_blank(value=a), _blank(value=b)).item()
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (a, b)


def test_ssim_matches_explicit_windows():
    """9x9 images, 7x7 window: 3x3 window positions, each scored from its own weighted sums."""
    pair = _random_images(2, size=9, seed=5).double()
    a, b = (pair[0, 0].numpy() + 1) / 2, (pair[1, 0].numpy() + 1) / 2  # gray levels in [0, 1]
    g = np.array([[math.exp(-((i - 3) ** 2 + (j - 3) ** 2) / (2 * 1.5 ** 2)) for j in range(7)] for i in range(7)])
    g /= g.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    scores = []
    for r in range(3):
        for c in range(3):
            pa, pb = a[r:r + 7, c:c + 7], b[r:r + 7, c:c + 7]
            ma, mb = (g * pa).sum(), (g * pb).sum()
            va, vb = (g * (pa - ma) ** 2).sum(), (g * (pb - mb) ** 2).sum()
            cov = (g * (pa - ma) * (pb - mb)).sum()
            scores.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    got = pm.ssim(pair[:1], pair[1:]).item()
    assert got == pytest.approx(np.mean(scores), rel=1e-10)


def test_ssim_falls_with_noise():
    x = _random_images(1, seed=6)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    values = [pm.ssim(x, x + s * noise).item() for s in (0.01, 0.1, 0.5)]
    assert values[0] > values[1] > values[2], values
    # an image and its negative are anti-correlated: SSIM of the gray levels is negative
    # (on the signed values the two negative terms would multiply to a positive score)
    assert pm.ssim(x, -x).item() < 0


def test_ssim_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        pm.ssim(_blank(2), _blank(3))
    with pytest.raises(ValueError, match="does not fit"):
        pm.ssim(_blank(size=5), _blank(size=5))
    with pytest.raises(ValueError, match="odd size"):
        pm.ssim(_blank(), _blank(), window_size=6)
