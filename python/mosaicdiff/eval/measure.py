"""Image-set metrics with 95% bootstrap intervals, and paired differences between methods.

`measure(images, labels, reference, per_seed)` keeps what the statistics resample: one value per
image for every per-image metric (`PER_IMAGE`: class accuracy, PSNR and SSIM to dense, the speckle
rate) and a function of the image indices for every set-level one (`SET_LEVEL`: FID on the
classifier features, pixel-intensity W1 to the real digits). `Measured.summary`
gives each metric's value with its interval; `difference(a, b)` the paired difference ``a - b``
(both sampled from the same noise and labels, so resampling the same indices for both removes the
seed noise they share) and whether its interval excludes 0 (``separated``).

The images of several noise seeds are pooled: intervals are over images and seeds. The set-level
metrics get no interval of their own (resampling with replacement duplicates images, which shrinks
the feature covariance and biases FID upward, and skews W1); they are reported pooled (FID also
per seed), and their paired differences are what compare two methods. Why the speckle rate and W1
are there (they see the salt pixels and gray backgrounds FID misses): docs/results.md, "Which
metric sees what digits-FID misses".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mosaicdiff.eval import pixel_metrics, quality, stats

__all__ = ["PER_IMAGE", "SET_LEVEL", "Measured", "difference", "format_difference", "measure"]


def _correct(images, labels, reference):
    return quality.correct_classes(images, labels).double().numpy()


def _psnr(images, labels, reference):
    if reference is None:
        return None  # the reference itself (PSNR would be inf)
    return quality.psnr(images, reference).clamp(max=100.0).numpy()  # identical images count as 100 dB


def _ssim(images, labels, reference):
    return None if reference is None else pixel_metrics.ssim(images, reference).numpy()


def _speckle(images, labels, reference):
    return pixel_metrics.speckle_rate(images).numpy()


#: Per-image metrics: name -> ``f(images, labels, reference) -> (N,) array`` (None: not defined
#: without a reference). A metric's value is the mean over images.
PER_IMAGE: dict[str, Callable] = {"class_accuracy": _correct, "psnr_to_dense": _psnr, "ssim_to_dense": _ssim,
                                  "speckle_rate": _speckle}


def _fid_statistic(images, features):
    return lambda idx: _fid(features[idx])


def _w1_statistic(images, features):
    from mosaicdiff.zoo.data import load_digits_tensors

    return pixel_metrics.pixel_w1_statistic(images, load_digits_tensors()[0])


#: Set-level metrics: name -> ``f(images, features) -> statistic(indices) -> float``.
SET_LEVEL: dict[str, Callable] = {"fid": _fid_statistic, "pixel_w1": _w1_statistic}


@dataclass
class Measured:
    """What one method's images give the statistics; `per_seed` images per noise seed, in seed order."""

    features: np.ndarray  # (N, d) classifier features
    values: dict[str, np.ndarray | None]  # PER_IMAGE name -> (N,) values
    per_seed: int
    set_level: dict[str, Callable[[np.ndarray], float]]  # SET_LEVEL name -> statistic of indices

    def __len__(self) -> int:
        return len(self.features)

    def summary(self, resamples: int = stats.DEFAULT_RESAMPLES) -> dict:
        """The set-level metrics (pooled), ``fid_per_seed``, every per-image metric's mean, and
        ``intervals`` (per-image metric -> `stats.Interval`, 95%)."""
        n, k = len(self), self.per_seed
        out: dict = {name: f(np.arange(n)) for name, f in self.set_level.items()}
        out.update(fid_per_seed=[_fid(self.features[i:i + k]) for i in range(0, n, k)] if n > k else None,
                   images=n, intervals={})
        for name, v in self.values.items():
            out[name] = None if v is None else float(v.mean())
            if v is not None:
                out["intervals"][name] = stats.bootstrap(lambda i, v=v: v[i].mean(), n, resamples=resamples)
        return out


def _fid(features: np.ndarray) -> float:
    return quality.fid_of_features_to_real(features)


def measure(images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None, per_seed: int) -> Measured:
    """Features and per-image values of `images` (pooled over seeds; `per_seed` images each)."""
    if len(images) % per_seed:
        raise ValueError(f"measure: {len(images)} images are not whole seeds of {per_seed}")
    features = quality.classifier_features(images).double().numpy()
    return Measured(features=features, values={name: f(images, labels, reference) for name, f in PER_IMAGE.items()},
                    per_seed=per_seed, set_level={name: f(images, features) for name, f in SET_LEVEL.items()})


def difference(a: Measured, b: Measured, resamples: int = stats.DEFAULT_RESAMPLES) -> dict:
    """Paired ``a - b`` per metric (`stats.Interval`), and ``separated``: metric -> interval excludes 0.

    Raises:
        ValueError: if the two sets differ in size (they must come from the same noise and labels).
    """
    if len(a) != len(b):
        raise ValueError(f"difference: {len(a)} vs {len(b)} images; pair sets sampled from the same noise")
    n = len(a)
    out = {name: stats.paired_difference(f, b.set_level[name], n, resamples=resamples)
           for name, f in a.set_level.items()}
    for name, va in a.values.items():
        vb = b.values.get(name)
        if va is not None and vb is not None:
            out[name] = stats.paired_difference(lambda i, x=va: x[i].mean(), lambda i, y=vb: y[i].mean(), n,
                                                resamples=resamples)
    out["separated"] = {name: iv.excludes_zero for name, iv in out.items()}
    return out


def format_difference(d: dict) -> str:
    """One line of a `difference` result: each metric's ``a - b [low, high]`` and whether it is separated."""
    return "; ".join(f"{name} {iv['value']:+.3g} [{iv['low']:+.3g}, {iv['high']:+.3g}] "
                     + ("separated" if d["separated"][name] else "within noise")
                     for name, iv in d.items() if name != "separated")
