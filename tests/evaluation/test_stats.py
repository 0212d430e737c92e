"""CHI, XB and AQI on synthetic clusters of known separation; bootstrap coverage; McNemar."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.stats import aqi, bootstrap_ci, calinski_harabasz, mcnemar_exact, xie_beni


def clusters(separation: float, n: int = 200, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    direction = np.zeros(d)
    direction[0] = separation
    X = np.vstack([rng.normal(size=(n, d)), rng.normal(size=(n, d)) + direction])
    return X, np.array([0] * n + [1] * n)


def test_well_separated_beats_overlapping_on_every_index():
    far, near = clusters(8.0), clusters(0.5)
    assert calinski_harabasz(*far) > calinski_harabasz(*near)
    assert xie_beni(*far) < xie_beni(*near)
    assert aqi(*far) > aqi(*near) > 0


def test_identical_clusters_give_the_minimum():
    X, labels = clusters(0.0)
    same = np.vstack([X[:200], X[:200]])
    assert calinski_harabasz(same, labels) == pytest.approx(0.0, abs=1e-12) and math.isinf(xie_beni(same, labels))
    assert aqi(same, labels) == pytest.approx(0.0, abs=1e-12)


def test_indices_match_their_definitions_and_are_scale_invariant():
    X, labels = clusters(2.0, n=50, d=4)
    c0, c1, c = X[labels == 0].mean(0), X[labels == 1].mean(0), X.mean(0)
    within = ((X[labels == 0] - c0) ** 2).sum() + ((X[labels == 1] - c1) ** 2).sum()
    between = 50 * ((c0 - c) ** 2).sum() + 50 * ((c1 - c) ** 2).sum()
    assert calinski_harabasz(X, labels) == pytest.approx(between / (within / 98))
    assert xie_beni(X, labels) == pytest.approx(within / (100 * ((c0 - c1) ** 2).sum()))
    assert aqi(1000 * X, labels) == pytest.approx(aqi(X, labels))
    with pytest.raises(ValueError, match="two non-empty clusters"):
        aqi(X, np.zeros(100))


@pytest.mark.parametrize("method", ["percentile", "basic"])
def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time(method):
    rng = np.random.default_rng(1)
    hits, trials = 0, 200
    for trial in range(trials):
        sample = rng.normal(loc=3.0, scale=2.0, size=60)
        interval = bootstrap_ci(lambda idx: float(sample[idx].mean()), len(sample), resamples=400, seed=trial,
                                method=method)
        hits += interval.low <= 3.0 <= interval.high
    assert 0.89 <= hits / trials <= 0.99, hits / trials


def test_mcnemar_exact():
    a = np.array([True] * 10 + [False] * 10)
    assert mcnemar_exact(a, a) == 1.0
    b = np.array([False] * 10 + [False] * 10)          # 10 discordant, all one way
    assert mcnemar_exact(a, b) == pytest.approx(2 / 2 ** 10)
    c = np.array([False] * 5 + [True] * 5 + [True] * 5 + [False] * 5)   # 5 vs 5: no evidence
    assert mcnemar_exact(a, c) == 1.0
