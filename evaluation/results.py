"""From per-prompt outcomes to figures with intervals, and paired comparisons between models.

Units of resampling: the AQI-style index and the separation ratio resample harmful/benign
*pairs* (both prompts of a pair together); rates and per-prompt probabilities resample prompts;
retention resamples fact pairs.

Intervals: basic bootstrap for the cluster figures (AQI-style, CHI, XB, separation 1/XB) and
their deltas (resampled cluster indices are biased upwards, see ``stats.bootstrap_ci``); Wilson
for rates (a bootstrap gives 0 of 50 the empty interval [0, 0]); percentile bootstrap for mean
probabilities and for every paired difference. Comparisons are paired: both models are
resampled with the same units (same seed).

Which interval and which test a metric gets follows from its kind (``evaluation.metrics``).
Tests, each giving a p-value so the whole family can be adjusted (``adjust_family``): cluster
figures by the basic bootstrap's own p-value (the smallest level at which its interval excludes
0), rates by the exact McNemar test on the discordant prompts, mean probabilities by the
Wilcoxon signed-rank test on the per-prompt differences. A difference is significant when its
Holm-adjusted p-value (over every distinct finding and every pair of one seed; the AQI-style
index, a function of 1/XB, takes 1/XB's verdict) is below ``significance``; a bootstrap test
that could pass is drawn with enough resamples to resolve Holm's smallest threshold (``compare``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from evaluation.config import EvalParams
from evaluation.metrics import (
    Metric,
    compared_metrics,
    derived_keys,
    differences_over_seeds,
    distinct,
    figure_over_seeds,
    get,
)
from evaluation.stats import (
    Interval,
    aqi_from_arrays,
    bootstrap_ci,
    finite_or_none,
    holm_adjust_distinct,
    interval_from_replicates,
    mcnemar_exact,
    resample_counts,
    resolving_resamples,
    weighted_cluster_indices,
    wilson_interval,
)

CLUSTER_FIGURES = ("aqi", "chi", "xb", "separation")    # every cluster figure, from the pooled states
WEIGHT_ROWS = 4096      # resamples per block of the cluster indices (more than a run's usual 1,000: one block)


@dataclass
class ModelOutcomes:
    """What was measured on one model: the pooled states of the prompt pairs (cluster metrics)
    and, per registered per-prompt metric, one value per prompt (a bool for a rate, a
    probability for a probability)."""

    name: str
    states: np.ndarray              # [2 * pairs, hidden]: harmful_0, benign_0, harmful_1, ...
    values: dict[str, np.ndarray] = field(default_factory=dict)    # metric -> one value per prompt

    def separation(self, weights: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
        """CHI, XB, the separation ratio 1/XB and the AQI-style index for each row of pair
        weights (``weights[r, i]``: copies of pair i). In blocks of rows: a test drawn again
        with tens of thousands of resamples would otherwise hold [resamples, hidden] sums at once
        (over 1 GiB each at a hidden size of 4,096)."""
        blocks = [weighted_cluster_indices(self.states[0::2], self.states[1::2], weights[i:i + WEIGHT_ROWS])
                  for i in range(0, len(weights), WEIGHT_ROWS)]
        chi, xb = (np.concatenate(parts) for parts in zip(*blocks, strict=True))
        with np.errstate(divide="ignore"):
            ratio = np.where(xb > 0, 1.0 / xb, np.inf)
        return {"chi": chi, "xb": xb, "separation": ratio, "aqi": aqi_from_arrays(chi, xb, gamma)}


def _pair_weights(pairs: int, p: EvalParams, resamples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(all pairs once, the bootstrap resamples): the same draws for every model (paired). More
    ``resamples`` than ``p.bootstrap_resamples`` extend the same draws (same seed)."""
    return np.ones((1, pairs)), resample_counts(pairs, resamples or p.bootstrap_resamples, p.seed)


def intervals(m: ModelOutcomes, p: EvalParams) -> dict[str, Interval]:
    """Every figure of one model with its interval (module docstring)."""
    pairs = len(m.states) // 2
    full, resampled = _pair_weights(pairs, p)
    estimates, replicates = m.separation(full, p.gamma), m.separation(resampled, p.gamma)
    out = {name: interval_from_replicates(float(estimates[name][0]), replicates[name], pairs, p.confidence, "basic")
           for name in CLUSTER_FIGURES}
    for metric, values in m.values.items():
        if get(metric).kind == "rate":
            out[metric] = wilson_interval(int(np.sum(values)), len(values), p.confidence)
        else:
            out[metric] = bootstrap_ci(lambda idx, v=values: float(v[idx].mean()), len(values),
                                       p.bootstrap_resamples, p.confidence, p.seed)
    return out


def point_figures(m: ModelOutcomes, gamma: float) -> dict[str, float]:
    """Every figure of one model without an interval: cluster figures over every pair once, the
    mean of each per-prompt metric (the study's per-trial figures)."""
    clusters = m.separation(np.ones((1, len(m.states) // 2)), gamma) if len(m.states) else {}
    return ({name: float(values[0]) for name, values in clusters.items()}
            | {metric: float(np.mean(values)) for metric, values in m.values.items()})


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
    p_adjusted: float | None = None


def basic_bootstrap_p(estimate: float, replicates: np.ndarray, resamples: int) -> float:
    """Two-sided p-value of the basic bootstrap: its interval ``[2t - q_hi, 2t - q_lo]`` excludes
    0 exactly when 0 lies beyond the matching quantile of the replicates reflected about t, so p
    is twice the smaller tail of the replicates beyond 2t; (count + 1) / (R + 1) keeps it above 0."""
    values = np.asarray(replicates, np.float64)
    values = values[np.isfinite(values)]
    tail = min(int((values >= 2 * estimate).sum()), int((values <= 2 * estimate).sum()))
    return min(1.0, 2 * (tail + 1) / (len(values) + 1))


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired per-prompt differences; 1.0 when all are 0."""
    from scipy import stats

    differences = np.asarray(differences, np.float64)
    if not np.any(differences != 0):
        return 1.0
    return float(stats.wilcoxon(differences, zero_method="wilcox").pvalue)


PAIRED_TESTS = {"rate": mcnemar_exact, "probability": lambda a, b: wilcoxon_p(a - b)}


def per_prompt_metrics(variant: ModelOutcomes, reference: ModelOutcomes) -> list[Metric]:
    """The compared per-prompt metrics both models hold, each with a paired test of its kind."""
    return [m for m in compared_metrics() if m.kind in PAIRED_TESTS
            and m.name in variant.values and m.name in reference.values]


def tested_metrics(variant: ModelOutcomes, reference: ModelOutcomes) -> list[str]:
    """The distinct findings ``compare`` tests for this pair: every compared cluster figure and
    every per-prompt metric of :func:`per_prompt_metrics`, less those that are a function of
    another (the AQI-style index of 1/XB). The size of Holm's family is counted from it."""
    return [m.name for m in distinct([*compared_metrics("cluster"), *per_prompt_metrics(variant, reference)])]


def cluster_comparisons(variant: ModelOutcomes, reference: ModelOutcomes, p: EvalParams,
                        resamples: int) -> list[PairedComparison]:
    """``variant - reference`` on every compared cluster figure: basic bootstrap interval and
    p-value over ``resamples`` resamples of the prompt pairs, the same for both models."""
    pairs = len(variant.states) // 2
    full, resampled = _pair_weights(pairs, p, resamples)
    ours, theirs = variant.separation(full, p.gamma), reference.separation(full, p.gamma)
    ours_r, theirs_r = variant.separation(resampled, p.gamma), reference.separation(resampled, p.gamma)
    out = []
    for m in compared_metrics("cluster"):
        estimate, replicates = float(ours[m.name][0] - theirs[m.name][0]), ours_r[m.name] - theirs_r[m.name]
        delta = interval_from_replicates(estimate, replicates, pairs, p.confidence, "basic")
        p_value = basic_bootstrap_p(estimate, replicates, resamples)
        test = m.test if resamples == p.bootstrap_resamples else f"{m.test} ({resamples:,} resamples)"
        out.append(PairedComparison(m.name, variant.name, reference.name, delta.value, delta.low, delta.high, p_value,
                                    test, p_value < p.significance, pairs))
    return out


def compare(variant: ModelOutcomes, reference: ModelOutcomes, p: EvalParams, family: int = 1) -> list[PairedComparison]:
    """``variant - reference`` on every compared metric, paired on the same prompts; ``significant``
    here is the unadjusted verdict (``adjust_family`` replaces it). ``family``: how many tests
    Holm will adjust together with these. A cluster figure's bootstrap p-value cannot go below
    2 / (R + 1), and Holm multiplies the smallest by the family's size (1,000 resamples and 48
    tests: 0.002 can become 0.096), so one whose p-value is below ``p.significance`` is drawn again
    with enough resamples (``stats.resolving_resamples``; the same first draws, then more)."""
    out = cluster_comparisons(variant, reference, p, p.bootstrap_resamples)
    needed = resolving_resamples(family, p.significance)
    if needed > p.bootstrap_resamples and any(c.p_value < p.significance for c in out):
        redrawn = {c.metric: c for c in cluster_comparisons(variant, reference, p, needed)}
        out = [redrawn[c.metric] if c.p_value < p.significance else c for c in out]
    for m in per_prompt_metrics(variant, reference):
        metric, x, y = m.name, variant.values[m.name], reference.values[m.name]
        d = bootstrap_ci(lambda idx, x=x, y=y: float(x[idx].mean() - y[idx].mean()), len(x), p.bootstrap_resamples,
                         p.confidence, p.seed)
        p_value = PAIRED_TESTS[m.kind](x, y)
        out.append(PairedComparison(metric, variant.name, reference.name, d.value, d.low, d.high, p_value,
                                    m.test, p_value < p.significance, len(x)))
    return out


def adjust_family(comparisons: list[PairedComparison], significance: float) -> list[PairedComparison]:
    """Holm over the family (every distinct finding x every pair, of one seed): each comparison
    gets its adjusted p-value, and significance is judged on it. A figure that is a function of
    another (the AQI-style index of 1/XB) is one finding with it: outside the family, with its
    source's adjusted p-value and verdict."""
    index = {(c.variant, c.reference, c.metric): i for i, c in enumerate(comparisons)}
    follows = {index[key]: index[source] for key, source in derived_keys(index).items()}
    adjusted = holm_adjust_distinct(dict(enumerate(c.p_value for c in comparisons)), follows)
    return [dataclasses.replace(c, p_adjusted=adjusted[i], significant=adjusted[i] is not None
                                and adjusted[i] < significance) for i, c in enumerate(comparisons)]


def across_seeds(figures: dict[str, dict[str, Interval]], members: dict[str, list[str]],
                 comparisons: list[PairedComparison], n_seeds: int, level: float, significance: float) -> dict:
    """The figures and comparisons of seed replicates, aggregated over seeds: each figure's mean
    with its t interval (``members``: variant -> its replicates' model keys), and each paired
    difference (variant, reference, metric) tested over seeds with Holm over every such
    difference: :func:`figure_over_seeds` and :func:`differences_over_seeds`, as ``compare_all``."""
    def bounds(i: Interval) -> list[float | None]:
        return [finite_or_none(i.low), finite_or_none(i.high)]

    out: dict = {"n_seeds": n_seeds, "figures": {}, "comparisons": []}
    for variant, keys in members.items():
        out["figures"][variant] = {}
        for metric in figures[keys[0]]:
            i = figure_over_seeds(metric, [figures[k][metric].value for k in keys], level)
            out["figures"][variant][metric] = {"mean": i.value, "ci": bounds(i), "n_seeds": i.n}
    for (variant, reference, metric), t in differences_over_seeds(comparisons, level).items():
        out["comparisons"].append({"variant": variant, "reference": reference, "metric": metric, "delta": t.delta.value,
                                   "ci": bounds(t.delta), "p_value": finite_or_none(t.p_value),
                                   "p_adjusted": finite_or_none(t.p_adjusted),
                                   "significant": t.significant(significance),
                                   "test": "paired t over seeds", "n_seeds": t.delta.n})
    return out
