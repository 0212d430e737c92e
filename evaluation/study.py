"""The fair study's arithmetic: search spaces, equal trials, selection on validation loss,
and the test comparison over seeds (docs/study.md).

The rules, after the optimizer-benchmarking literature (Schmidt et al. 2021; AlgoPerf's external
tuning): every method gets the same number of trials drawn from a declared search space; the
setting a method is compared at is the trial with the lowest validation loss, and nothing
measured on a test set takes part in that choice; the comparison then trains each method at its
chosen setting with several seeds and budgets, and the paired t-test over seeds (Holm-adjusted
over every metric, pair and budget) is the pre-declared main test.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from evaluation.metrics import get, study_endpoints, within_range
from evaluation.stats import Interval, mean_over_seeds, paired_over_seeds


def test_metrics() -> list[str]:
    """The test endpoints (the registry's ``study`` metrics, with their labels and directions)."""
    return [m.name for m in study_endpoints()]


@dataclass(frozen=True)
class Trial:
    """One training run of the study and what was measured on it."""

    phase: str                          # "tune" or "test"
    method: str
    budget: int
    seed: int
    setting: dict[str, float]
    val_loss: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)     # (step, validation loss)
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    tokens_per_second: float | None = None
    trainable_parameters: int | None = None


def setting_key(setting: dict[str, float]) -> str:
    """The canonical text of a setting (its identity in the store)."""
    return json.dumps(setting, sort_keys=True)


def search_space(grit: bool, learning_rate_range: tuple[float, float],
                 damping_range: tuple[float, float]) -> dict[str, tuple[float, float]]:
    """The declared space of one method: the learning rate for all, GRIT's damping too."""
    space = {"learning_rate": learning_rate_range}
    if grit:
        space["damping"] = damping_range
    return space


def draw_settings(space: dict[str, tuple[float, float]], trials: int, seed: int) -> list[dict[str, float]]:
    """``trials`` settings, log-uniform in each range. The learning rate (first in every space)
    takes the centres of ``trials`` equal slices of its log range, so every method tries the same
    learning rates, evenly spread. Any further hyperparameter (GRIT's damping) takes its values
    from its own scrambled Sobol sequence, seeded by ``seed`` and its position: spread evenly
    where random draws would clump, and not in lockstep with the learning rate."""
    import torch

    def log_uniform(low: float, high: float, u: float) -> float:
        return float(f"{math.exp(math.log(low) + u * (math.log(high) - math.log(low))):.3g}")

    columns = [[(i + 0.5) / trials for i in range(trials)]]
    columns += [torch.quasirandom.SobolEngine(1, scramble=True, seed=seed + position).draw(trials)[:, 0].tolist()
                for position in range(1, len(space))]
    return [{name: log_uniform(low, high, column[i]) for (name, (low, high)), column in
             zip(space.items(), columns, strict=True)} for i in range(trials)]


def at_the_edge(trials: Iterable[Trial], chosen: Trial) -> str | None:
    """"largest" / "smallest" when the chosen learning rate is the largest / smallest one tried:
    the best setting may then lie outside the declared range, which the report says."""
    rates = sorted(t.setting["learning_rate"] for t in trials)
    if len(rates) < 2:
        return None
    rate = chosen.setting["learning_rate"]
    return "largest" if rate == rates[-1] else "smallest" if rate == rates[0] else None


def choose_setting(trials: Iterable[Trial]) -> Trial:
    """The tuning trial with the lowest validation loss (earliest on a tie). Only the validation
    loss is read: test figures, if a trial carried any, cannot influence the choice."""
    scored = [t for t in trials if t.val_loss is not None and math.isfinite(t.val_loss)]
    if not scored:
        raise ValueError("no tuning trial has a finite validation loss; widen or lower the learning-rate range")
    return min(scored, key=lambda t: t.val_loss)


@dataclass(frozen=True)
class PairedTest:
    budget: int
    method: str
    control: str
    metric: str
    delta: Interval          # mean over seeds of method - control, with its t interval
    p_value: float
    p_adjusted: float | None = None

    def better(self) -> bool | None:
        """True / False when the method is significantly better / worse; None otherwise."""
        if self.p_adjusted is None or self.p_adjusted >= 0.05 or self.delta.value == 0:
            return None
        return get(self.metric).better(self.delta.value)


def by_seed(trials: Iterable[Trial], method: str, budget: int) -> dict[int, Trial]:
    return {t.seed: t for t in trials if t.phase == "test" and t.method == method and t.budget == budget}


def summary(trials: Sequence[Trial], method: str, budget: int, metric: str, level: float = 0.95) -> Interval | None:
    """Mean and t interval over seeds of one test figure."""
    values = [t.metrics[metric] for t in by_seed(trials, method, budget).values() if metric in t.metrics]
    return within_range(metric, mean_over_seeds(values, level)) if values else None



def paired_tests(trials: Sequence[Trial], pairs: Sequence[tuple[str, str]], budgets: Sequence[int],
                 level: float = 0.95) -> list[PairedTest]:
    """Per budget, pair (method, control) and metric: the per-seed differences, their mean and t
    interval, the paired t p-value, and Holm's adjustment over the whole family."""
    deltas: dict[tuple[int, str, str, str], list[float]] = {}
    for budget in budgets:
        for method, control in pairs:
            ours, theirs = by_seed(trials, method, budget), by_seed(trials, control, budget)
            seeds = sorted(set(ours) & set(theirs))
            for metric in test_metrics():
                values = [ours[s].metrics[metric] - theirs[s].metrics[metric] for s in seeds
                          if metric in ours[s].metrics and metric in theirs[s].metrics]
                if len(values) >= 2:
                    deltas[(budget, method, control, metric)] = values
    return [PairedTest(*key, t.delta, t.p_value, t.p_adjusted)
            for key, t in paired_over_seeds(deltas, level).items()]


def speed_ratio(trials: Sequence[Trial], method: str, control: str, budget: int) -> float | None:
    """Median over seeds of the method's training tokens/s over the control's (same seed and
    budget, trained one after the other in the same study)."""
    ours, theirs = by_seed(trials, method, budget), by_seed(trials, control, budget)
    ratios = [ours[s].tokens_per_second / theirs[s].tokens_per_second for s in set(ours) & set(theirs)
              if ours[s].tokens_per_second and theirs[s].tokens_per_second]
    return statistics.median(ratios) if ratios else None


def verdict(tests: Sequence[PairedTest], grit_methods: Sequence[str]) -> str:
    """The plain answer first (does GRIT beat LoRA here, by the pre-declared test?), then the
    count of significant differences out of all paired tests, then which ones they are."""
    mine = [t for t in tests if t.method in grit_methods]
    wins = [t for t in mine if t.better() is True]
    losses = [t for t in mine if t.better() is False]
    rule = "paired t over seeds, Holm-adjusted"
    if not wins and not losses:
        return (f"No: at each method's validation-tuned setting, no GRIT method differs significantly from "
                f"LoRA on any metric at any budget ({len(mine)} paired tests; {rule}).")
    out_of = f"of {len(mine)} paired tests ({rule})"
    if wins and not losses:
        return f"GRIT is better than LoRA in {len(wins)} {out_of} and worse in none. Better: {describe(wins)}."
    if losses and not wins:
        return f"No: GRIT is worse than LoRA in {len(losses)} {out_of} and better in none. Worse: {describe(losses)}."
    return (f"Mixed: GRIT is better than LoRA in {len(wins)} and worse in {len(losses)} {out_of}. "
            f"Better: {describe(wins)}; worse: {describe(losses)}.")


def describe(tests: Sequence[PairedTest]) -> str:
    return "; ".join(f"{get(t.metric).label} ({t.method} vs {t.control}, {t.budget} steps, {t.delta.value:+.3g})"
                     for t in tests)
