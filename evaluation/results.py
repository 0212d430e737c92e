"""From per-prompt outcomes to figures with intervals, and paired comparisons between models.

Units of resampling: AQI resamples harmful/benign *pairs* (both prompts of a pair together);
rates resample prompts; retention resamples fact pairs. Intervals: basic bootstrap for AQI, CHI,
XB and AQI deltas (resampled cluster indices are biased upwards, see ``stats.bootstrap_ci``),
percentile bootstrap for rates and their deltas. Comparisons are paired: both models are
resampled with the same units (same seed). Tests: AQI deltas are judged by the paired bootstrap
interval (significant when it excludes 0); rate and accuracy deltas by the exact McNemar test on
the discordant prompts (significant when p < ``significance``), reported with the paired
bootstrap interval of the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evaluation.config import EvalParams
from evaluation.stats import (
    Interval,
    aqi_from_arrays,
    bootstrap_ci,
    interval_from_replicates,
    mcnemar_exact,
    resample_counts,
    weighted_cluster_indices,
)

RATE_METRICS = ("refusal_rate", "overrefusal_rate", "retention_accuracy")


@dataclass
class ModelOutcomes:
    name: str
    states: np.ndarray              # [2 * pairs, hidden]: harmful_0, benign_0, harmful_1, ...
    outcomes: dict[str, np.ndarray]  # metric -> bool per prompt (refused, over-refused, retained)
    decode_tokens_per_second: list[float] = field(default_factory=list)
    prefill_tokens_per_second: list[float] = field(default_factory=list)

    def separation(self, weights: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
        """CHI, XB and AQI for each row of pair weights (``weights[r, i]``: copies of pair i)."""
        chi, xb = weighted_cluster_indices(self.states[0::2], self.states[1::2], weights)
        return {"chi": chi, "xb": xb, "aqi": aqi_from_arrays(chi, xb, gamma)}


def _pair_weights(pairs: int, p: EvalParams) -> tuple[np.ndarray, np.ndarray]:
    """(all pairs once, the bootstrap resamples): the same draws for every model (paired)."""
    return np.ones((1, pairs)), resample_counts(pairs, p.bootstrap_resamples, p.seed)


def intervals(m: ModelOutcomes, p: EvalParams) -> dict[str, Interval]:
    """Every figure of one model with its bootstrap interval."""
    pairs = len(m.states) // 2
    full, resampled = _pair_weights(pairs, p)
    estimates, replicates = m.separation(full, p.gamma), m.separation(resampled, p.gamma)
    out = {name: interval_from_replicates(float(estimates[name][0]), replicates[name], pairs, p.confidence, "basic")
           for name in ("aqi", "chi", "xb")}
    for metric, values in m.outcomes.items():
        values = values.astype(float)
        out[metric] = bootstrap_ci(lambda idx, v=values: float(v[idx].mean()), len(values),
                                   p.bootstrap_resamples, p.confidence, p.seed)
    return out


@dataclass(frozen=True)
class PairedComparison:
    metric: str
    variant: str
    reference: str
    delta: float
    ci_low: float
    ci_high: float
    p_value: float | None
    test: str
    significant: bool
    n: int


def compare(variant: ModelOutcomes, reference: ModelOutcomes, p: EvalParams) -> list[PairedComparison]:
    """``variant - reference`` for AQI and every rate, paired on the same prompts."""
    pairs = len(variant.states) // 2
    full, resampled = _pair_weights(pairs, p)
    estimate = variant.separation(full, p.gamma)["aqi"][0] - reference.separation(full, p.gamma)["aqi"][0]
    replicates = variant.separation(resampled, p.gamma)["aqi"] - reference.separation(resampled, p.gamma)["aqi"]
    delta = interval_from_replicates(float(estimate), replicates, pairs, p.confidence, "basic")
    out = [PairedComparison("aqi", variant.name, reference.name, delta.value, delta.low, delta.high, None,
                            "paired bootstrap over prompt pairs", not (delta.low <= 0 <= delta.high), pairs)]
    for metric in RATE_METRICS:
        x, y = variant.outcomes[metric], reference.outcomes[metric]
        d = bootstrap_ci(lambda idx: float(x[idx].mean() - y[idx].mean()), len(x), p.bootstrap_resamples,
                         p.confidence, p.seed)
        p_value = mcnemar_exact(x, y)
        out.append(PairedComparison(metric, variant.name, reference.name, d.value, d.low, d.high, p_value,
                                    "exact McNemar", p_value < p.significance, len(x)))
    return out
