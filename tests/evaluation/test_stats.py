"""CHI, XB and AQI on synthetic clusters of known separation; bootstrap coverage; McNemar."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.stats import (
    aqi,
    aqi_from_arrays,
    bootstrap_ci,
    calinski_harabasz,
    mcnemar_exact,
    mean_over_seeds,
    paired_t_over_seeds,
    resample_counts,
    weighted_cluster_indices,
    xie_beni,
)


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
        interval = bootstrap_ci(lambda idx, sample=sample: float(sample[idx].mean()), len(sample), resamples=400,
                                seed=trial, method=method)
        hits += interval.low <= 3.0 <= interval.high
    assert 0.89 <= hits / trials <= 0.99, hits / trials


def test_mcnemar_exact():
    a = np.array([True] * 10 + [False] * 10)
    assert mcnemar_exact(a, a) == 1.0
    b = np.array([False] * 10 + [False] * 10)          # 10 discordant, all one way
    assert mcnemar_exact(a, b) == pytest.approx(2 / 2 ** 10)
    c = np.array([False] * 5 + [True] * 5 + [True] * 5 + [False] * 5)   # 5 vs 5: no evidence
    assert mcnemar_exact(a, c) == 1.0


def test_weighted_indices_equal_the_direct_ones_on_repeated_rows():
    """The vectorised bootstrap path (pair multiplicities) must reproduce CHI, XB and AQI
    computed on the explicitly resampled rows, including a large constant offset that would
    cancel badly without centring."""
    rng = np.random.default_rng(3)
    harmful = rng.normal(size=(30, 16)) + 0.7 + 1e4
    benign = rng.normal(size=(30, 16)) + 1e4
    counts = resample_counts(30, 5, seed=1)
    chi, xb = weighted_cluster_indices(harmful, benign, counts)
    draws = np.random.default_rng(1)
    for r in range(5):
        idx = draws.integers(0, 30, 30)
        assert np.array_equal(np.bincount(idx, minlength=30), counts[r])
        X = np.concatenate([harmful[idx], benign[idx]])
        labels = np.r_[np.ones(30), np.zeros(30)]
        assert chi[r] == pytest.approx(calinski_harabasz(X, labels), rel=1e-9)
        assert xb[r] == pytest.approx(xie_beni(X, labels), rel=1e-9)
        assert aqi_from_arrays(chi, xb)[r] == pytest.approx(aqi(X, labels), rel=1e-12)
    same_chi, same_xb = weighted_cluster_indices(harmful, harmful, np.ones((1, 30)))
    assert same_chi[0] == pytest.approx(0.0, abs=1e-9) and math.isinf(same_xb[0])
    assert aqi_from_arrays(same_chi, same_xb)[0] == pytest.approx(0.0, abs=1e-9)


def test_mean_over_seeds_t_interval_and_paired_t():
    interval = mean_over_seeds([1.0, 2.0, 3.0], level=0.95)
    # mean 2, sd 1, t_{0.975, 2} = 4.303: half width 4.303 / sqrt(3)
    assert interval.value == pytest.approx(2.0) and interval.n == 3
    assert interval.high - interval.value == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_over_seeds([0.5]).low)
    assert paired_t_over_seeds([0.1, 0.12, 0.09, 0.11]) < 0.001
    assert paired_t_over_seeds([0.1, -0.1, 0.05, -0.05]) > 0.5
    assert paired_t_over_seeds([0.0, 0.0]) == 1.0 and math.isnan(paired_t_over_seeds([0.2]))


def test_equal_nonzero_seed_deltas_give_the_exact_sign_test_not_zero():
    from evaluation.stats import paired_t_over_seeds, sign_test

    assert paired_t_over_seeds([0.1, 0.1, 0.1]) == pytest.approx(2 / 2 ** 3)
    assert paired_t_over_seeds([-0.2] * 5) == pytest.approx(2 / 2 ** 5)
    assert paired_t_over_seeds([0.0, 0.0]) == 1.0
    assert sign_test([1, 1, -1, 0]) == 1.0      # 2 of 3 positive: nowhere near significant
    assert sign_test([1] * 10) == pytest.approx(2 / 1024)


def test_wilson_interval_of_an_empty_rate_is_not_empty():
    from evaluation.stats import wilson_interval

    zero = wilson_interval(0, 50)
    assert zero.value == 0 and zero.low == 0 and zero.high == pytest.approx(0.0713, abs=5e-4)
    full = wilson_interval(50, 50)
    assert full.high == 1 and full.low == pytest.approx(1 - 0.0713, abs=5e-4)
    half = wilson_interval(25, 50)
    assert half.low == pytest.approx(0.3664, abs=5e-4) and half.high == pytest.approx(0.6336, abs=5e-4)


def test_holm_adjusts_the_family_step_down_and_skips_missing_p_values():
    from evaluation.stats import holm_adjust

    adjusted = holm_adjust([0.01, None, 0.04, 0.03, 0.5])
    # m = 4: 0.01*4, then max(0.04, 0.03*3), then max(0.09, 0.04*2), then 0.5*1
    assert adjusted[1] is None and adjusted[0] == pytest.approx(0.04) and adjusted[3] == pytest.approx(0.09)
    assert adjusted[2] == pytest.approx(0.09) and adjusted[4] == pytest.approx(0.5)
    assert holm_adjust([0.9, 0.8]) == [1.0, 1.0]      # 0.8 * 2 capped at 1, then kept monotone


def test_a_figure_that_is_a_function_of_another_is_one_finding_outside_holms_family():
    """The AQI-style index is a monotone function of 1/XB: counted as a second test it would
    multiply every other first-rank p-value by one more for nothing new. It takes its source's
    adjusted p-value; without its source it is an ordinary member."""
    from evaluation.stats import holm_adjust, holm_adjust_distinct

    p = {"separation": 0.01, "aqi": 0.012, "refusal": 0.02}
    adjusted = holm_adjust_distinct(p, {"aqi": "separation"})
    assert adjusted["separation"] == pytest.approx(0.02) and adjusted["refusal"] == pytest.approx(0.02)   # family of 2
    assert adjusted["aqi"] == adjusted["separation"]
    assert holm_adjust(list(p.values()))[0] == pytest.approx(0.03)       # counted twice: a family of 3
    alone = holm_adjust_distinct({"aqi": 0.012, "refusal": 0.02}, {"aqi": "separation"})
    assert alone["aqi"] == pytest.approx(0.024)


def test_over_seeds_a_follower_takes_its_sources_verdict_and_does_not_enlarge_the_family():
    from evaluation.stats import paired_over_seeds

    family = {("v", "r", "separation"): [0.10, 0.11, 0.09, 0.10, 0.12],
              ("v", "r", "aqi"): [0.01, 0.012, 0.009, 0.01, 0.011],
              ("v", "r", "rate"): [0.01, -0.02, 0.0, 0.015, -0.01]}
    tested = paired_over_seeds(family, follows={("v", "r", "aqi"): ("v", "r", "separation")})
    sep, rate = tested[("v", "r", "separation")], tested[("v", "r", "rate")]
    assert tested[("v", "r", "aqi")].p_adjusted == sep.p_adjusted
    assert sep.p_adjusted == pytest.approx(min(1.0, 2 * sep.p_value))     # the distinct family is 2, not 3
    assert rate.p_adjusted == pytest.approx(max(sep.p_adjusted, rate.p_value))
    orphan = paired_over_seeds({k: v for k, v in family.items() if k[2] != "separation"},
                               follows={("v", "r", "aqi"): ("v", "r", "separation")})
    aqi = orphan[("v", "r", "aqi")]                  # its source absent: an ordinary member of a family of 2
    assert aqi.p_adjusted == pytest.approx(min(1.0, 2 * aqi.p_value))


def test_the_two_level_bootstrap_counts_seeds_and_prompts_and_covers_about_95_percent():
    from evaluation.stats import two_level_bootstrap

    rng = np.random.default_rng(1)
    covered, trials = 0, 100
    for _ in range(trials):
        # true mean 0.1; seed effects and prompt effects both vary
        seeds, prompts = rng.normal(0, 0.05, (6, 1)), rng.normal(0, 0.2, (1, 30))
        d = 0.1 + seeds + prompts + rng.normal(0, 0.05, (6, 30))
        interval, _ = two_level_bootstrap(d, resamples=400, seed=int(rng.integers(1 << 30)))
        covered += interval.low <= 0.1 <= interval.high
    assert 0.85 <= covered / trials <= 1.0
    zero = rng.normal(0, 1, (5, 40)) - 0.0
    _, p_null = two_level_bootstrap(zero - zero.mean(), resamples=400)
    _, p_shift = two_level_bootstrap(zero - zero.mean() + 2.0, resamples=400)
    assert p_null > 0.5 and p_shift < 0.01
    with pytest.raises(ValueError, match="2 seeds x 2 prompts"):
        two_level_bootstrap(np.zeros((1, 10)))


def test_one_holm_family_mixes_seed_level_and_per_prompt_differences():
    from evaluation.stats import paired_over_seeds

    rng = np.random.default_rng(2)
    family = {"loss": [0.10, 0.11, 0.09, 0.10, 0.12], "rate": rng.normal(0.2, 0.05, (5, 20)),
              "flat": [0.01, -0.02, 0.0, 0.015, -0.01]}
    tested = paired_over_seeds(family, resamples=400)
    assert tested["rate"].delta.n == 5 and tested["rate"].p_value < 0.01
    raw = sorted((t.p_value, k) for k, t in tested.items())
    assert tested[raw[0][1]].p_adjusted == pytest.approx(min(1.0, 3 * raw[0][0]))    # the whole family of 3


def test_a_per_prompt_difference_every_resample_puts_above_zero_can_pass_holm_in_a_large_family():
    """With 2,000 resamples a bootstrap p-value is at least 2/2001, and Holm over 60 rows makes it
    0.06: a per-prompt difference no resample doubts could never be significant. It is drawn again
    with enough resamples; a test that cannot pass Holm keeps its first draws."""
    from evaluation.stats import paired_over_seeds, resolving_resamples, two_level_bootstrap

    rng = np.random.default_rng(3)
    clear = 0.3 + rng.normal(0, 0.05, (10, 100))            # every resample's mean is far above 0
    null = rng.normal(0, 1, (10, 100))
    null -= null.mean()
    family = {"clear": clear, "null": null, **{f"seed-level {i}": list(rng.normal(0, 1, 10)) for i in range(58)}}
    _, p_first = two_level_bootstrap(clear, 2000)
    assert 60 * p_first > 0.05                               # what Holm made of it with the first draws alone

    tested = paired_over_seeds(family, resamples=2000)
    needed = resolving_resamples(60, 0.05)
    assert needed == 23_999 and 2 / (needed + 1) * 60 == pytest.approx(0.005)
    assert tested["clear"].resamples == needed and tested["clear"].significant()
    assert tested["clear"].p_value == pytest.approx(2 / (needed + 1))
    assert tested["null"].resamples == 2000
    assert (tested["null"].delta, tested["null"].p_value) == two_level_bootstrap(null, 2000)
    assert tested["seed-level 0"].resamples is None
