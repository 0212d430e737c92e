"""Intervals and paired comparisons from per-prompt outcomes."""

from __future__ import annotations

import numpy as np

from evaluation.config import EvalParams
from evaluation.results import ModelOutcomes, compare, intervals

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
    assert set(figures) == {"aqi", "chi", "xb", "refusal_rate", "overrefusal_rate", "retention_accuracy"}
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
