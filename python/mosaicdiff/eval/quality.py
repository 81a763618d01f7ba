"""Image-quality metrics for the embedded digits model: FID, class accuracy, PSNR.

FID here ("digits-FID") is the Frechet distance between Gaussians fitted to the penultimate
features (64-d) of the embedded digits classifier (`mosaicdiff.zoo.classifier`), the role
Inception-v3 plays for ImageNet FID. Numbers are therefore only comparable with other
digits-FID numbers, never with published ImageNet FIDs, and only at equal sample counts: the
estimate is biased upward for small samples (with N samples and d = 64 features the bias is
roughly proportional to d / N).

All images are `(N, 1, 16, 16)` tensors in [-1, 1].
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Data range of images in [-1, 1], the peak value used by `psnr`.
DATA_RANGE = 2.0


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of `features` `(N, d)`, N >= 2.

    Raises:
        ValueError: if `features` is not 2-D or has fewer than 2 rows.
    """
    f = _as_float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"gaussian_stats: expected features (N >= 2, d), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    ``d^2 = ||mu_a - mu_b||^2 + Tr(cov_a) + Tr(cov_b) - 2 Tr((cov_a cov_b)^(1/2))``.

    The trace of the matrix square root is computed without `scipy.linalg.sqrtm`:
    ``(cov_a cov_b)^(1/2)`` has the same eigenvalues as the symmetric PSD matrix
    ``S = cov_a^(1/2) cov_b cov_a^(1/2)``, so ``Tr((cov_a cov_b)^(1/2)) = sum_i sqrt(eig_i(S))``,
    with both square roots from symmetric eigen-decompositions in float64 (negative round-off
    eigenvalues clipped to 0). This is exact for PSD inputs and never returns complex values.

    Returns:
        The distance as a Python float (>= 0 up to round-off).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mu_a.shape * 2:
        raise ValueError(f"frechet_distance: shape mismatch mu {mu_a.shape} vs {mu_b.shape}, "
                         f"cov {cov_a.shape} vs {cov_b.shape}")
    sa = _psd_sqrt(cov_a)
    s = sa @ cov_b @ sa
    w = np.linalg.eigvalsh((s + s.T) / 2)
    tr_sqrt = np.sqrt(np.clip(w, 0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def fid(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets.

    Args:
        features_a: `(N_a, d)` features (tensor or array), N_a >= 2.
        features_b: `(N_b, d)` features.

    Returns:
        ``||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` with unbiased covariances, in float64.
        Biased upward for small N; compare only values computed with the same sample counts.

    Raises:
        ValueError: if the feature dimensions differ or a set has fewer than 2 rows.
    """
    mu_a, cov_a = gaussian_stats(features_a)
    mu_b, cov_b = gaussian_stats(features_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"fid: feature dims differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance(mu_a, cov_a, mu_b, cov_b)


@functools.lru_cache(maxsize=1)
def _default_classifier():
    from mosaicdiff.zoo import load_digits_classifier

    return load_digits_classifier("cpu")


def _check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"{name}: expected images (N, 1, H, W), got {tuple(images.shape)}")
    return images.detach().float().cpu()


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier=None, batch_size: int = 512) -> torch.Tensor:
    """Penultimate digits-classifier features of `images` `(N, 1, 16, 16)` in [-1, 1].

    Args:
        images: the images (any device; moved to CPU).
        classifier: a `DigitsClassifier`; default the shipped one.
        batch_size: images per forward pass.

    Returns:
        `(N, 64)` float32 features on CPU.
    """
    x = _check_images(images, "classifier_features")
    clf = classifier if classifier is not None else _default_classifier()
    return torch.cat([clf.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@functools.lru_cache(maxsize=1)
def _real_stats() -> tuple[np.ndarray, np.ndarray]:
    from mosaicdiff.zoo.data import load_digits_tensors

    images, _ = load_digits_tensors()
    return gaussian_stats(classifier_features(images))


def real_features() -> torch.Tensor:
    """Classifier features of all 1797 real digits `(1797, 64)`."""
    from mosaicdiff.zoo.data import load_digits_tensors

    return classifier_features(load_digits_tensors()[0])


@functools.lru_cache(maxsize=1)
def _real_sqrt() -> np.ndarray:
    return _psd_sqrt(_real_stats()[1])


def fid_of_features_to_real(features) -> float:
    """FID of classifier `features` `(N >= 2, 64)` against all 1797 real digits.

    The same value as `frechet_distance` with the real digits' statistics, with the square root of
    their covariance computed once (the bootstrap evaluates thousands of resampled sets).
    """
    mu, cov = gaussian_stats(features)
    mu_r, cov_r = _real_stats()
    sr = _real_sqrt()
    s = sr @ cov @ sr
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((s + s.T) / 2), 0, None)).sum()
    diff = mu - mu_r
    return float(diff @ diff + np.trace(cov) + np.trace(cov_r) - 2 * tr_sqrt)


def fid_to_real(images: torch.Tensor) -> float:
    """FID of `images` against all 1797 real digits (shipped classifier's features).

    The scale (the small-sample floor at each N, noise, a single class) is measured in
    docs/results.md ("Demo settings and the digits-FID scale"). Compare methods at equal N only.
    """
    f = classifier_features(images)
    if len(f) < 2:
        raise ValueError(f"fid_to_real: need at least 2 images, got {len(f)}")
    mu_r, cov_r = _real_stats()
    mu, cov = gaussian_stats(f)
    return frechet_distance(mu, cov, mu_r, cov_r)


@torch.no_grad()
def correct_classes(images: torch.Tensor, labels, classifier=None) -> torch.Tensor:
    """Per image: whether the shipped digits classifier assigns it to its label (the requested class).

    Returns:
        `(N,)` bool tensor on CPU.

    Raises:
        ValueError: if the number of labels differs from the number of images.
    """
    x = _check_images(images, "class_accuracy")
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)
    if len(labels) != len(x):
        raise ValueError(f"class_accuracy: {len(x)} images but {len(labels)} labels")
    clf = classifier if classifier is not None else _default_classifier()
    pred = torch.cat([clf(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)]) if len(x) else labels
    return pred == labels


def class_accuracy(images: torch.Tensor, labels, classifier=None) -> float:
    """Fraction of `images` the shipped digits classifier assigns to `labels` (see `correct_classes`)."""
    correct = correct_classes(images, labels, classifier)
    return float(correct.float().mean()) if len(correct) else float("nan")


def real_stats() -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the classifier features of all 1797 real digits (cached)."""
    return _real_stats()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``.

    Args:
        a, b: images of the same shape `(N, ...)` (default data range 2, i.e. values in [-1, 1]).
        data_range: peak-to-peak range of the pixel values.

    Returns:
        `(N,)` float64 tensor; `inf` where the images are identical.

    Raises:
        ValueError: if the shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a.detach().double() - b.detach().double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


__all__ = ["fid", "frechet_distance", "gaussian_stats", "classifier_features", "real_features",
           "fid_to_real", "fid_of_features_to_real", "class_accuracy", "correct_classes", "real_stats", "psnr", "DATA_RANGE"]
