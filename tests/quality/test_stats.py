"""stats: bootstrap intervals cover what they claim to (checked against the normal theory)."""

from __future__ import annotations

import numpy as np
import pytest

from mosaicdiff.eval.stats import bootstrap, paired_difference


def test_interval_of_a_mean_matches_the_normal_interval():
    x = np.random.default_rng(0).normal(3.0, 2.0, 400)
    ci = bootstrap(lambda idx: x[idx].mean(), len(x), resamples=2000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert ci["value"] == pytest.approx(x.mean())
    assert ci["high"] - ci["low"] == pytest.approx(2 * half, rel=0.15)
    assert ci["low"] < x.mean() < ci["high"]


def test_coverage_is_near_the_level():
    """Over 200 independent data sets, the 90% interval of the mean holds the true mean ~90% of the time."""
    rng = np.random.default_rng(1)
    hits = 0
    for k in range(200):
        x = rng.exponential(1.0, 60)
        ci = bootstrap(lambda idx: x[idx].mean(), len(x), level=0.9, resamples=300, seed=k)
        hits += ci["low"] <= 1.0 <= ci["high"]
    assert 0.8 <= hits / 200 <= 0.97, hits


def test_pairing_removes_shared_noise():
    """Two methods that differ by a constant 0.1 plus a big shared per-sample term: the paired
    interval separates them, the unpaired ones overlap."""
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 5, 300)
    a, b = shared + 0.1 + rng.normal(0, 0.05, 300), shared + rng.normal(0, 0.05, 300)
    diff = paired_difference(lambda i: a[i].mean(), lambda i: b[i].mean(), 300)
    assert diff.excludes_zero and diff["value"] == pytest.approx(0.1, abs=0.02)
    ca, cb = bootstrap(lambda i: a[i].mean(), 300), bootstrap(lambda i: b[i].mean(), 300)
    assert ca["low"] < cb["high"] and cb["low"] < ca["high"]
    same = paired_difference(lambda i: b[i].mean(), lambda i: b[i].mean(), 300)
    assert not same.excludes_zero


@pytest.mark.parametrize("kw, match", [({"n": 1}, "at least 2"), ({"n": 5, "level": 1.0}, "level"),
                                       ({"n": 5, "resamples": 3}, "resamples")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        bootstrap(lambda idx: 0.0, **kw)
