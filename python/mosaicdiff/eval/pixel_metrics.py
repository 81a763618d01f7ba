"""Image metrics that see pixel defects the classifier-feature FID misses: KID, speckle, pixel W1, SSIM.

Digits-FID (`mosaicdiff.eval.quality`) scores images through the digits classifier, which is built to
ignore what does not change the class, such as a few isolated bright pixels. The metrics here
complement it:

- `kid`: Kernel Inception Distance (Binkowski et al., 2018) on the same classifier features,
  the unbiased MMD^2 with the cubic polynomial kernel. Unlike FID it is unbiased at small N,
  but it still sees only the features.
- `speckle_rate`: per image, the fraction of pixels that differ from the median of their 3x3
  neighbourhood by more than `SPECKLE_THRESHOLD` (isolated "salt" or "pepper" pixels).
- `pixel_w1`: 1-D Wasserstein-1 distance between the pooled pixel intensities of a set and of
  the real digits.
- `ssim`: per-image structural similarity to a reference image (the dense model's sample from
  the same noise), with a 7x7 Gaussian window (sigma 1.5) because the images are only 16x16, on the
  displayed gray levels in [0, 1].

Images are `(N, 1, H, W)` tensors with values in [-1, 1]. The pixel metrics (speckle, W1, SSIM)
score the image as displayed: values are clamped to [-1, 1] first (the sampler does not clip
x0, and a pixel at 1.4 shows as white like one at 1.0). Functions that return per-image values
let `mosaicdiff.eval.stats.bootstrap` resample them; the set-level metrics (KID, W1) come with a
``*_statistic`` factory that maps an index array to the metric on those images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SPECKLE_THRESHOLD", "SSIM_WINDOW", "SSIM_SIGMA", "polynomial_kernel", "mmd2_unbiased", "kid",
           "kid_statistic", "median3x3", "speckle_rate", "pixel_w1", "pixel_w1_to_real", "pixel_w1_statistic",
           "gaussian_window", "ssim"]

#: Speckle threshold on ``|x - median3x3(x)|`` for images in [-1, 1] (3/8 of the data range).
#: Measured on the 1797 real digits (8x8 upsampled bilinearly to 16x16): the largest deviation
#: of any pixel from its 3x3 median is 0.703 (99.9th percentile 0.49), so at 0.75 every real digit
#: scores exactly 0, while a salt pixel on the background (-1 -> about +1) deviates by up to 2.
SPECKLE_THRESHOLD = 0.75
#: SSIM window side and Gaussian sigma. The usual 11x11 window fits a 16x16 image only 6x6 times;
#: 7x7 with the usual sigma 1.5 leaves a 10x10 map of local scores.
SSIM_WINDOW = 7
SSIM_SIGMA = 1.5


def _features(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name}: expected features (N >= 2, d), got shape {x.shape}")
    return x


def _pair(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _features(x, name), _features(y, name)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{name}: feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    return x, y


def _images(images, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"{name}: expected images (N, 1, H, W), got {tuple(images.shape)}")
    return images.detach().cpu().double().clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------- KID

def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x . y / d + coef0) ** degree`` for rows of `x` `(m, d)` and `y` `(n, d)`.

    Returns:
        `(m, n)` float64 kernel matrix.
    """
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x, y) -> float:
    """Unbiased estimate of MMD^2 between the distributions of the rows of `x` and `y`.

    ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)``
    with `polynomial_kernel`; can be slightly negative when the distributions are equal.

    Args:
        x: `(m, d)` features (array or tensor), m >= 2.
        y: `(n, d)` features, n >= 2.

    Raises:
        ValueError: if a set has fewer than 2 rows or the feature dims differ.
    """
    x, y = _pair(x, y, "mmd2_unbiased")
    m, n = len(x), len(y)
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2 * polynomial_kernel(x, y).mean())


def kid(features, reference, *, subset_size: int = 1000, num_subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """KID as in Binkowski et al.: `mmd2_unbiased` averaged over random subsets of both sets.

    Each subset pair draws ``min(subset_size, len(features), len(reference))`` rows of each set
    without replacement. The average over all subsets equals the full-set `mmd2_unbiased` (a
    U-statistic is the mean of its subset U-statistics), so the subsets only cut the cost and
    give a spread.

    Args:
        features: `(m, d)` features of the generated images.
        reference: `(n, d)` features of the real images.
        subset_size: rows per subset (capped at the smaller set).
        num_subsets: subset pairs drawn.
        seed: of the subset draws.

    Returns:
        (mean, standard deviation) of the per-subset estimates.

    Raises:
        ValueError: on feature sets that `mmd2_unbiased` rejects, or `subset_size` < 2 or
            `num_subsets` < 1.
    """
    x, y = _pair(features, reference, "kid")
    if subset_size < 2 or num_subsets < 1:
        raise ValueError(f"kid: need subset_size >= 2 and num_subsets >= 1, got {subset_size}, {num_subsets}")
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    draws = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
             for _ in range(num_subsets)]
    return float(np.mean(draws)), float(np.std(draws))


def kid_statistic(features, reference) -> Callable[[np.ndarray], float]:
    """The full-set KID of ``features[idx]`` against all of `reference`, as a function of `idx`.

    For `mosaicdiff.eval.stats.bootstrap`: kernel values are computed once. Pairs of a resample that
    are the same original image (a bootstrap draws with replacement) are left out of the
    within-set mean, so duplicates do not add ``k(x, x)`` terms and bias the estimate upward;
    on ``idx = arange(m)`` it equals ``mmd2_unbiased(features, reference)``.

    Raises:
        ValueError: on feature sets that `mmd2_unbiased` rejects.
    """
    x, y = _pair(features, reference, "kid_statistic")
    n = len(y)
    kxx = polynomial_kernel(x, x)
    kxy_mean = polynomial_kernel(x, y).mean(1)
    kyy = polynomial_kernel(y, y)
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))

    def statistic(idx: np.ndarray) -> float:
        idx = np.asarray(idx)
        distinct = idx[:, None] != idx[None, :]
        if not distinct.any():
            raise ValueError("kid_statistic: the resample holds a single distinct image")
        return float(kxx[np.ix_(idx, idx)][distinct].mean() + yy - 2 * kxy_mean[idx].mean())

    return statistic


# ----------------------------------------------------------------------------- speckle

def median3x3(images: torch.Tensor) -> torch.Tensor:
    """Median of every pixel's 3x3 neighbourhood (itself included; borders replicated).

    Args:
        images: `(N, 1, H, W)`, clamped to [-1, 1].

    Returns:
        `(N, 1, H, W)` float64.
    """
    x = _images(images, "median3x3")
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    windows = padded.unfold(2, 3, 1).unfold(3, 3, 1)  # (N, 1, H, W, 3, 3)
    return windows.reshape(*x.shape, 9).median(-1).values


def speckle_rate(images: torch.Tensor, threshold: float = SPECKLE_THRESHOLD) -> torch.Tensor:
    """Per image: the fraction of pixels farther than `threshold` from their 3x3 median.

    A single bright pixel on a blank background scores 1 / (H W): its median is the background,
    and every neighbour's window holds only one bright pixel out of nine. Real digits score 0 at
    the default threshold (see `SPECKLE_THRESHOLD`). What a 3x3 median removes counts: isolated
    pixels and blobs up to 2x2, lines one pixel wide and the square corners of sharp-edged
    strokes; strokes two or more pixels wide with smooth ends (like every real digit) do not.

    Args:
        images: `(N, 1, H, W)` in [-1, 1] (clamped to it first).
        threshold: absolute deviation that counts as speckle, > 0.

    Returns:
        `(N,)` float64 tensor in [0, 1].

    Raises:
        ValueError: if `threshold` <= 0 or the images are not `(N, 1, H, W)`.
    """
    if not threshold > 0:
        raise ValueError(f"speckle_rate: threshold must be > 0, got {threshold}")
    x = _images(images, "speckle_rate")
    return ((x - median3x3(x)).abs() > threshold).flatten(1).double().mean(1)


# ----------------------------------------------------------------------------- pixel W1

def _pixels(images, name: str) -> np.ndarray:
    """`(N, H*W)` float64 displayed pixel values."""
    x = _images(images, name)
    if len(x) == 0:
        raise ValueError(f"{name}: need at least 1 image")
    return x.flatten(1).numpy()


def _reference_histogram(reference) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pixel values of `reference` and their counts (the real digits take 257 values)."""
    return np.unique(_pixels(reference, "pixel_w1"), return_counts=True)


def pixel_w1(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Wasserstein-1 distance between the pooled pixel intensities of `images` and of `reference`.

    ``W1 = integral |F_a(v) - F_b(v)| dv`` over the two empirical distribution functions of all
    pixels of each set (`scipy.stats.wasserstein_distance`, exact). In units of pixel value
    (the data range is 2): 0.1 means the intensities must move by 0.1 on average to match.

    Args:
        images: `(N, 1, H, W)` in [-1, 1] (clamped), N >= 1.
        reference: `(M, 1, H', W')`, e.g. the real digits.

    Raises:
        ValueError: if a set is empty or not `(N, 1, H, W)`.
    """
    return pixel_w1_statistic(images, reference)(np.arange(len(images)))


@functools.lru_cache(maxsize=1)
def _real_histogram() -> tuple[np.ndarray, np.ndarray]:
    from mosaicdiff.zoo.data import load_digits_tensors

    return _reference_histogram(load_digits_tensors()[0])


def pixel_w1_to_real(images: torch.Tensor) -> float:
    """`pixel_w1` of `images` against all 1797 real digits (their histogram is cached).

    For scale (seed 0): 200 random real digits score 0.0022, the dense digits DiT 0.009 and
    magnitude pruning at sparsity 0.5 0.19 (docs/results.md).
    """
    from scipy.stats import wasserstein_distance

    values, counts = _real_histogram()
    return float(wasserstein_distance(_pixels(images, "pixel_w1_to_real").ravel(), values, v_weights=counts))


def pixel_w1_statistic(images: torch.Tensor, reference: torch.Tensor) -> Callable[[np.ndarray], float]:
    """`pixel_w1` of ``images[idx]`` against `reference`, as a function of `idx` (for bootstrap).

    Exact, and about 100x faster per call than `scipy.stats.wasserstein_distance` on the pooled
    pixels: the pixels of all images and the reference's distinct values are merged and sorted
    once; a resample only re-weights each pixel by its image's multiplicity in `idx`, so its
    distribution function on the merged grid is one cumulative sum, and
    ``W1 = sum_k |F_a(g_k) - F_ref(g_k)| (g_{k+1} - g_k)``.
    """
    pixels = _pixels(images, "pixel_w1")
    values, counts = _reference_histogram(reference)
    n, per_image = pixels.shape
    grid = np.concatenate([pixels.ravel(), values])
    owner = np.concatenate([np.repeat(np.arange(n), per_image), np.full(len(values), -1)])
    ref_weight = np.concatenate([np.zeros(pixels.size), counts / counts.sum()])
    order = np.argsort(grid, kind="stable")
    grid, owner, ref_cdf = grid[order], owner[order], np.cumsum(ref_weight[order])
    widths = np.diff(grid)
    is_pixel = owner >= 0

    def statistic(idx: np.ndarray) -> float:
        multiplicity = np.bincount(np.asarray(idx), minlength=n).astype(np.float64)
        weight = np.zeros(len(grid))
        weight[is_pixel] = multiplicity[owner[is_pixel]]
        cdf = np.cumsum(weight) / (multiplicity.sum() * per_image)
        return float(np.abs(cdf - ref_cdf)[:-1] @ widths)

    return statistic


# ----------------------------------------------------------------------------- SSIM

def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """`(size, size)` float64 Gaussian weights summing to 1 (outer product of 1-D Gaussians).

    Raises:
        ValueError: if `size` is not a positive odd integer or `sigma` <= 0.
    """
    if size < 1 or size % 2 == 0 or not sigma > 0:
        raise ValueError(f"gaussian_window: need an odd size >= 1 and sigma > 0, got {size}, {sigma}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, *, window_size: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image structural similarity (Wang et al., 2004) of `a` to `b`.

    SSIM is defined on non-negative intensities (its luminance term compares means by
    ``2 mu_a mu_b / (mu_a^2 + mu_b^2)``, which for signed values would score an image and its
    negative as similar), so the images are first mapped from [-1, 1] to their displayed gray
    levels ``(x + 1) / 2`` in [0, 1] (data range L = 1). Local means, variances and the covariance
    are Gaussian-weighted over every `window_size` window that fits inside the image ("valid", no
    padding); the local score
    ``(2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))`` with
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` is averaged over the windows. 1 for identical images;
    lower is less similar, negative for anti-correlated ones.

    Args:
        a, b: `(N, 1, H, W)` images of the same shape in [-1, 1] (clamped first).
        window_size: odd side of the Gaussian window, at most min(H, W).
        sigma: of the Gaussian window.

    Returns:
        `(N,)` float64 tensor.

    Raises:
        ValueError: if the shapes differ or the window is not odd or does not fit.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    x, y = (_images(a, "ssim") + 1) / 2, (_images(b, "ssim") + 1) / 2
    if window_size > min(x.shape[2:]):
        raise ValueError(f"ssim: window {window_size} does not fit images of {tuple(x.shape[2:])}")
    w = gaussian_window(window_size, sigma)[None, None]

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    local = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return local.flatten(1).mean(1)
