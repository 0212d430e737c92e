"""Intervals and paired comparisons from per-prompt outcomes."""

from __future__ import annotations

import dataclasses

import numpy as np

from evaluation.config import EvalParams
from evaluation.results import (
    ModelOutcomes,
    adjust_family,
    basic_bootstrap_p,
    cluster_comparisons,
    compare,
    intervals,
)

P = EvalParams(bootstrap_resamples=300)


def outcomes(name: str, separation: float, refusals: np.ndarray, seed: int = 0) -> ModelOutcomes:
    rng = np.random.default_rng(seed)
    pairs = 40
    states = rng.normal(size=(2 * pairs, 16))
    states[0::2, 0] += separation                       # harmful rows (even) shifted
    flags = {"refusal_rate": refusals, "overrefusal_rate": np.zeros(30, bool), "retention_accuracy": np.ones(30, bool)}
    return ModelOutcomes(name, states, flags)


def test_intervals_bracket_their_values():
    m = outcomes("base", 2.0, np.array([True] * 10 + [False] * 20))
    figures = intervals(m, P)
    assert set(figures) == {"aqi", "chi", "xb", "separation", "refusal_rate", "overrefusal_rate", "retention_accuracy"}
    assert figures["separation"].value == 1 / figures["xb"].value
    for i in figures.values():
        assert i.low <= i.value <= i.high
    assert figures["refusal_rate"].value == 10 / 30 and figures["aqi"].n == 40


def test_a_real_difference_is_significant_and_no_difference_is_not():
    base = outcomes("base", 0.5, np.array([False] * 30))
    tuned = outcomes("tuned", 4.0, np.array([True] * 25 + [False] * 5))
    rows = {c.metric: c for c in compare(tuned, base, P)}
    assert rows["aqi"].delta > 0 and rows["aqi"].significant and rows["aqi"].test.startswith("paired bootstrap")
    assert rows["refusal_rate"].delta == 25 / 30 and rows["refusal_rate"].significant
    assert rows["refusal_rate"].test == "exact McNemar" and rows["refusal_rate"].p_value < 1e-6
    assert not rows["retention_accuracy"].significant and rows["retention_accuracy"].delta == 0
    same = {c.metric: c for c in compare(base, base, P)}
    assert not any(c.significant for c in same.values())


def test_a_rate_of_zero_has_a_wilson_interval_not_an_empty_one():
    figures = intervals(outcomes("base", 1.0, np.zeros(50, bool)), P)
    assert figures["refusal_rate"].value == 0 and figures["refusal_rate"].high > 0.07


def test_per_prompt_probabilities_are_compared_by_a_signed_rank_test():
    rng = np.random.default_rng(3)
    base, tuned = outcomes("base", 1.0, np.zeros(30, bool)), outcomes("tuned", 1.0, np.zeros(30, bool))
    base.values["sampled_refusal_rate"] = rng.uniform(0.1, 0.3, 60)
    tuned.values["sampled_refusal_rate"] = base.values["sampled_refusal_rate"] + rng.uniform(0.05, 0.2, 60)
    assert intervals(tuned, P)["sampled_refusal_rate"].n == 60
    row = {c.metric: c for c in compare(tuned, base, P)}["sampled_refusal_rate"]
    assert row.test == "Wilcoxon signed-rank" and row.p_value < 1e-6 and row.ci_low > 0
    same = {c.metric: c for c in compare(base, base, P)}["sampled_refusal_rate"]
    assert same.p_value == 1.0 and same.delta == 0


def test_the_basic_bootstrap_p_value_agrees_with_its_interval_and_is_never_zero():
    replicates = np.random.default_rng(0).normal(1.0, 0.2, 999)       # far from 0: every replicate beyond
    assert basic_bootstrap_p(1.0, replicates, 999) == 2 / 1000
    centred = np.random.default_rng(0).normal(0.0, 1.0, 999)
    assert basic_bootstrap_p(0.0, centred, 999) > 0.5


def test_holm_judges_the_whole_family_so_a_lone_borderline_test_is_no_longer_significant():
    base = outcomes("base", 0.5, np.array([False] * 30))
    tuned = outcomes("tuned", 4.0, np.array([True] * 25 + [False] * 5))
    raw = compare(tuned, base, P)
    family = adjust_family(raw, 0.05)
    for before, after in zip(raw, family, strict=True):
        assert after.p_value == before.p_value
        assert after.p_adjusted >= after.p_value and after.significant == (after.p_adjusted < 0.05)
    borderline = [dataclasses.replace(raw[0], p_value=0.04), *[dataclasses.replace(raw[0], p_value=0.5)] * 3]
    assert not any(c.significant for c in adjust_family(borderline, 0.05))


def test_the_aqi_style_index_takes_the_verdict_of_1_xb_and_is_not_counted_in_holms_family():
    """The AQI-style index is a monotone function of 1/XB (docs/metrics.md): one finding. Holm's
    family counts 1/XB alone, and the index shows its own interval and raw p-value beside 1/XB's
    adjusted p-value and verdict."""
    from evaluation.results import tested_metrics
    from evaluation.stats import holm_adjust

    base = outcomes("base", 0.5, np.array([False] * 30))
    tuned = outcomes("tuned", 4.0, np.array([True] * 25 + [False] * 5))
    raw = compare(tuned, base, P)
    assert {c.metric for c in raw} >= {"aqi", "separation"}
    assert "aqi" not in tested_metrics(tuned, base) and "separation" in tested_metrics(tuned, base)
    judged = {c.metric: c for c in adjust_family(raw, 0.05)}
    assert judged["aqi"].p_adjusted == judged["separation"].p_adjusted
    assert judged["aqi"].significant == judged["separation"].significant
    assert judged["aqi"].p_value == next(c.p_value for c in raw if c.metric == "aqi")
    distinct = sorted(c.p_value for c in raw if c.metric != "aqi")
    assert min(c.p_adjusted for c in judged.values()) == min(1.0, len(distinct) * distinct[0])
    other_pair = [dataclasses.replace(c, variant="other") for c in raw if c.metric != "separation"]
    alone = adjust_family(other_pair, 0.05)       # without 1/XB in its pair the index is tested itself
    assert [c.p_adjusted for c in alone] == holm_adjust([c.p_value for c in other_pair])


def test_a_cluster_difference_no_resample_doubts_survives_holm_in_a_large_family():
    """With R resamples the bootstrap's p-value is at least 2 / (R + 1), and Holm multiplies the
    smallest by the family's size: in the default run's 48 tests, 1,000 resamples made every
    fine-tuned model's 1/XB gain over the base 'not significant' whatever its size. Such a test
    is drawn again with enough resamples; one that cannot pass Holm keeps its first draws."""
    base = outcomes("base", 0.5, np.array([False] * 30))
    tuned = outcomes("tuned", 4.0, np.array([True] * 25 + [False] * 5))
    first = {c.metric: c for c in cluster_comparisons(tuned, base, P, P.bootstrap_resamples)}
    assert first["separation"].p_value == 2 / 301 and 48 * first["separation"].p_value > 0.05     # Holm: n.s.

    rows = compare(tuned, base, P, family=48)
    separation = next(c for c in rows if c.metric == "separation")
    assert separation.p_value == 2 / 19_200
    assert separation.test == "paired bootstrap over prompt pairs (19,199 resamples)"
    assert separation.ci_low > 0 and separation.delta == first["separation"].delta
    others = [dataclasses.replace(rows[-1], metric=f"other {i}", p_value=0.5) for i in range(48 - len(rows))]
    judged = {c.metric: c for c in adjust_family(rows + others, 0.05)}
    assert judged["separation"].significant and judged["separation"].p_adjusted <= 48 * 2 / 19_200

    same = {c.metric: c for c in compare(base, base, P, family=48)}
    assert same["separation"].p_value == 1.0 and same["separation"].test == "paired bootstrap over prompt pairs"


def test_cluster_figures_over_many_resamples_are_computed_in_blocks_with_the_same_values():
    from evaluation.results import WEIGHT_ROWS
    from evaluation.stats import resample_counts, weighted_cluster_indices

    m = outcomes("tuned", 2.0, np.zeros(30, bool))
    weights = resample_counts(40, WEIGHT_ROWS + 5, 0)
    blocked = m.separation(weights, 0.5)
    whole_chi, whole_xb = weighted_cluster_indices(m.states[0::2], m.states[1::2], weights)
    assert blocked["chi"].shape == (WEIGHT_ROWS + 5,)
    np.testing.assert_allclose(blocked["chi"], whole_chi, rtol=1e-12)
    np.testing.assert_allclose(blocked["xb"], whole_xb, rtol=1e-12)
