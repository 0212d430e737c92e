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
from evaluation.stats import Interval, aqi, bootstrap_ci, calinski_harabasz, mcnemar_exact, xie_beni

RATE_METRICS = ("refusal_rate", "overrefusal_rate", "retention_accuracy")


@dataclass
class ModelOutcomes:
    name: str
    states: np.ndarray              # [2 * pairs, hidden]: harmful_0, benign_0, harmful_1, ...
    outcomes: dict[str, np.ndarray]  # metric -> bool per prompt (refused, over-refused, retained)
    decode_tokens_per_second: list[float] = field(default_factory=list)
    prefill_tokens_per_second: list[float] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.tile([1, 0], len(self.states) // 2)    # 1 = harmful

    def rows(self, pairs: np.ndarray) -> np.ndarray:
        return np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)


def _aqi_on(m: ModelOutcomes, gamma: float):
    return lambda pairs: aqi(m.states[m.rows(pairs)], m.labels[m.rows(pairs)], gamma)


def intervals(m: ModelOutcomes, p: EvalParams) -> dict[str, Interval]:
    """Every figure of one model with its bootstrap interval."""
    pairs = len(m.states) // 2
    out = {"aqi": bootstrap_ci(_aqi_on(m, p.gamma), pairs, p.bootstrap_resamples, p.confidence, p.seed, "basic")}
    for name, index in (("chi", calinski_harabasz), ("xb", xie_beni)):
        out[name] = bootstrap_ci(lambda idx, f=index: f(m.states[m.rows(idx)], m.labels[m.rows(idx)]), pairs,
                                 p.bootstrap_resamples, p.confidence, p.seed, "basic")
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
    a, b = _aqi_on(variant, p.gamma), _aqi_on(reference, p.gamma)
    delta = bootstrap_ci(lambda idx: a(idx) - b(idx), pairs, p.bootstrap_resamples, p.confidence, p.seed, "basic")
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
