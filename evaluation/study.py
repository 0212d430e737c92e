"""The fair study's arithmetic after tuning: the trials, summaries and the pre-declared test
(docs/study.md). Tuning's own rules (spaces, edges, finalists, seeds) are in
``evaluation/tuning.py``.

The rules, after the optimizer-benchmarking literature (Schmidt et al. 2021; AlgoPerf's external
tuning): every method is tuned by the same sampler and pruner on the same number of
configurations of its declared space; the setting a method is compared at is chosen on
validation loss alone (its best finalists re-run over more seeds); the comparison trains each
method at its chosen setting over test seeds selection never saw, at every run length
(``study.steps``). The main test: per run length, GRIT method and LoRA control and distinct
endpoint, the paired difference over seeds (and over prompts where a figure is per prompt: the
two-level bootstrap), Holm-adjusted over the whole family.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from evaluation.metrics import distinct, get, study_endpoints, within_range
from evaluation.stats import Interval, mean_over_seeds, paired_over_seeds, two_level_bootstrap


def endpoints() -> list[str]:
    """The test endpoints: the registry's distinct ``study`` metrics (not the AQI-style index, a
    monotone function of 1/XB, which would count one finding twice)."""
    return [m.name for m in distinct(study_endpoints())]


@dataclass(frozen=True)
class Trial:
    """One training run of the study and what was measured on it."""

    phase: str                          # "tune", "finalist", "test" or "probe" (PHASES)
    method: str
    steps: int
    seed: int
    setting: dict[str, float]
    val_loss: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)     # (step, validation loss)
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    tokens_per_second: float | None = None
    trainable_parameters: int | None = None
    # per-prompt values of the per-prompt endpoints (sampled refusal rates, retention), test trials
    per_prompt: dict[str, list[float]] = field(default_factory=dict)
    stopped_at: int | None = None        # a tuning trial the pruner stopped at this step
    # the trial's wall time in its worker (training, evaluation, loading); compute is counted by it
    trial_seconds: float | None = None
    # the code, locks and data that trained it (db.provenance); None in ledgers older than it
    setup: str | None = None
    # a tuning's first configuration: its method's published defaults, enqueued and never pruned
    defaults: bool = False

    @property
    def pruned(self) -> bool:
        return self.stopped_at is not None

    @property
    def steps_trained(self) -> int:
        return self.stopped_at if self.pruned else self.steps

    @property
    def compute_seconds(self) -> float:
        """What the trial cost its worker: its wall time, or its training time where a trial
        recorded before wall times were kept has none."""
        return self.trial_seconds or self.train_seconds


FINDINGS = ("better", "worse", "equivalent", "inconclusive")


@dataclass(frozen=True)
class PairedTest:
    steps: int
    method: str
    control: str
    metric: str
    delta: Interval          # mean over seeds of method - control, with its interval
    p_value: float
    p_adjusted: float | None = None
    resamples: int | None = None   # the two-level bootstrap's draws; None for the paired t over seeds
    reference: float | None = None          # the control's mean: a relative smallest effect is a share of it
    equivalence: Interval | None = None     # the 90% interval of the difference, for the two one-sided tests

    @property
    def smallest_effect(self) -> float:
        """The metric's smallest effect of interest here (the registry's ``negligible``)."""
        return get(self.metric).negligible_below(self.reference)

    def finding(self) -> str:
        """One of :data:`FINDINGS`. better / worse: Holm p < 0.05 *and* a mean difference at least
        the smallest effect of interest d (a significant shift smaller than d is no finding);
        equivalent: the two one-sided tests at 0.05 reject both |difference| >= d, i.e. the 90%
        interval lies inside (-d, d); otherwise inconclusive."""
        d, mean = self.smallest_effect, self.delta.value
        if self.p_adjusted is not None and self.p_adjusted < 0.05 and mean != 0 and abs(mean) >= d:
            return "better" if get(self.metric).better(mean) else "worse"
        band = self.equivalence
        if d > 0 and band is not None and -d < band.low and band.high < d:
            return "equivalent"
        return "inconclusive"

    def better(self) -> bool | None:
        """True / False when the method is better / worse by :meth:`finding`; None otherwise."""
        return {"better": True, "worse": False}.get(self.finding())


def trial_from_record(record: dict) -> Trial:
    """A trial as the study ledger (``reports/study/ledger/trials.jsonl``) records it, and as the
    store holds it once read back (``pipelines.study.trial.stored_result``): one reading of both."""
    return Trial(record["phase"], record["method"], record["steps"], record["seed"], record["setting"],
                 record.get("val_loss"), [tuple(p) for p in record.get("curve", [])], record.get("metrics", {}),
                 record.get("train_seconds", 0.0), record.get("tokens_per_second"),
                 record.get("trainable_parameters"), per_prompt=record.get("per_prompt", {}),
                 stopped_at=record.get("stopped_at"), trial_seconds=record.get("trial_seconds"),
                 setup=(record.get("provenance") or {}).get("setup"), defaults=bool(record.get("defaults")))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def paired_test_record(test: PairedTest) -> dict:
    """A paired test as ``metrics/study.json`` records it; :func:`paired_test_from_record` reads it back."""
    delta, band = test.delta, test.equivalence
    return {"steps": test.steps, "method": test.method, "control": test.control, "metric": test.metric,
            "delta": {"mean": delta.value, "low": _finite(delta.low), "high": _finite(delta.high), "n": delta.n},
            "p": test.p_value, "p_holm": test.p_adjusted, "bootstrap_resamples": test.resamples,
            "reference": test.reference, "smallest_effect": test.smallest_effect,
            "equivalence_90": None if band is None else {"low": _finite(band.low), "high": _finite(band.high)},
            "finding": test.finding()}


def paired_test_from_record(record: dict) -> PairedTest:
    """A paired test as ``metrics/study.json`` records it (:func:`paired_test_record`)."""
    delta, band = record["delta"], record.get("equivalence_90")
    low, high = (float("nan") if v is None else v for v in (delta["low"], delta["high"]))
    equivalence = None if band is None else Interval(
        delta["mean"], *(float("nan") if band[k] is None else band[k] for k in ("low", "high")), delta["n"])
    return PairedTest(record["steps"], record["method"], record["control"], record["metric"],
                      Interval(delta["mean"], low, high, delta["n"]), record["p"], record["p_holm"],
                      record.get("bootstrap_resamples"), record.get("reference"), equivalence)


def by_seed(trials: Iterable[Trial], method: str, steps: int) -> dict[int, Trial]:
    return {t.seed: t for t in trials if t.phase == "test" and t.method == method and t.steps == steps}


def per_prompt_matrix(trials: dict[int, Trial], metric: str) -> np.ndarray | None:
    """[seeds, prompts] of a per-prompt endpoint (seeds in order), when every trial holds it."""
    rows = [trials[s].per_prompt.get(metric) for s in sorted(trials)]
    if not rows or any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    return np.asarray(rows, dtype=np.float64)


def summary(trials: Sequence[Trial], method: str, steps: int, metric: str, level: float = 0.95,
            resamples: int = 2000, seed: int = 0) -> Interval | None:
    """Mean and interval of one test figure: over seeds and prompts together (two-level bootstrap)
    for a per-prompt endpoint, a t interval over seeds otherwise; within the metric's range."""
    runs = by_seed(trials, method, steps)
    matrix = per_prompt_matrix(runs, metric)
    if matrix is not None and matrix.shape[0] >= 2 and matrix.shape[1] >= 2:
        interval, _ = two_level_bootstrap(matrix, resamples, level, seed)
        return within_range(metric, interval)
    values = [t.metrics[metric] for t in runs.values() if metric in t.metrics]
    return within_range(metric, mean_over_seeds(values, level)) if values else None


def paired_tests(trials: Sequence[Trial], pairs: Sequence[tuple[str, str]], run_lengths: Sequence[int],
                 level: float = 0.95, resamples: int = 2000, seed: int = 0) -> list[PairedTest]:
    """Per run length, pair (method, control) and distinct endpoint (not the AQI-style index, a
    function of 1/XB): the paired differences on the seeds both ran, their mean, interval and
    p-value (two-level bootstrap over seeds and prompts for a per-prompt endpoint, paired t over
    seeds otherwise), and Holm's adjustment over the whole family."""
    deltas: dict[tuple[int, str, str, str], list[float] | np.ndarray] = {}
    for steps in run_lengths:
        for method, control in pairs:
            ours, theirs = by_seed(trials, method, steps), by_seed(trials, control, steps)
            seeds = sorted(set(ours) & set(theirs))
            for metric in endpoints():
                mine = per_prompt_matrix({s: ours[s] for s in seeds}, metric)
                other = per_prompt_matrix({s: theirs[s] for s in seeds}, metric)
                if mine is not None and other is not None and mine.shape == other.shape and len(seeds) >= 2:
                    deltas[(steps, method, control, metric)] = mine - other
                    continue
                values = [ours[s].metrics[metric] - theirs[s].metrics[metric] for s in seeds
                          if metric in ours[s].metrics and metric in theirs[s].metrics]
                if len(values) >= 2:
                    deltas[(steps, method, control, metric)] = values
    tested = paired_over_seeds(deltas, level, resamples, seed)
    # The two one-sided tests at 1 - level read the (2 * level - 1) interval: 90% for 95%.
    bands = paired_over_seeds(deltas, 2 * level - 1, resamples, seed)
    return [PairedTest(*key, t.delta, t.p_value, t.p_adjusted, t.resamples,
                       control_mean(by_seed(trials, key[2], key[0]), key[3]), bands[key].delta)
            for key, t in tested.items()]


def control_mean(runs: dict[int, Trial], metric: str) -> float | None:
    """The control's mean of ``metric`` over its test seeds (and prompts): what a relative
    smallest effect of interest is a share of."""
    matrix = per_prompt_matrix(runs, metric)
    if matrix is not None:
        return float(matrix.mean())
    values = [t.metrics[metric] for t in runs.values() if metric in t.metrics]
    return float(np.mean(values)) if values else None


# A probe run (``pipelines.study.trial.probe_run``) trains nothing: it probes a chosen setting.
PHASES = ("tune", "finalist", "test", "probe")


def compute_by_method(trials: Sequence[Trial]) -> dict[str, dict[str, float]]:
    """Seconds spent per method and phase (tune, finalist, test) and in all, each trial counted
    by what it cost its worker (``Trial.compute_seconds``, the rule of the progress table too),
    and the part of the total that was training."""
    out: dict[str, dict[str, float]] = {}
    for t in trials:
        spent = out.setdefault(t.method, dict.fromkeys((*PHASES, "training"), 0.0))
        spent[t.phase] += t.compute_seconds
        spent["training"] += t.train_seconds
    return {m: {**spent, "total": sum(spent[p] for p in PHASES)} for m, spent in out.items()}


def planned_runs(configurations: int, finalists: int, finalist_seeds: int, seeds: int) -> dict[str, int]:
    """The runs one part of the study (a method at a run length) plans per phase: at least
    ``configurations`` tuning runs (a widened range tunes more), at most ``finalists`` x
    (``finalist_seeds`` + the tuning seed) finalist runs (a finalist the pruner let finish needs
    no re-run on the tuning seed), and exactly ``seeds`` test runs."""
    return {"tune": configurations, "finalist": finalists * (finalist_seeds + 1), "test": seeds}


@dataclass(frozen=True)
class PartProgress:
    """How far one part of a study has come: runs done per phase against the plan, and the
    hours its trials took (wall time, evaluation included)."""

    method: str
    steps: int
    done: dict[str, int]
    planned: dict[str, int]
    hours: float

    @property
    def state(self) -> str:
        # A part runs its phases in order, so the furthest phase with a run says where it is; a
        # probed part (GRIT or a peer) is done once its probe at the chosen setting is recorded too.
        if self.done["test"] >= self.planned["test"]:
            return "done" if self.done["probe"] >= self.planned.get("probe", 0) else "probing"
        if self.done["test"]:
            return "testing"
        if self.done["finalist"]:
            return "finalists"
        return "tuning" if self.done["tune"] else "not started"


def study_progress(methods: Sequence[str], run_lengths: Sequence[int], planned: dict[str, int],
                   trials: Iterable[Trial], probed: Collection[str] = ()) -> list[PartProgress]:
    """Per part, in plan order (run length, then method): runs done per phase and the hours they
    cost (``Trial.compute_seconds``); the parts of ``probed`` methods (GRIT and the peers: those
    with a preconditioner) plan one probe each."""
    done = {(m, s): dict.fromkeys(PHASES, 0) for s in run_lengths for m in methods}
    seconds = dict.fromkeys(done, 0.0)
    for t in trials:
        if (t.method, t.steps) in done:
            done[(t.method, t.steps)][t.phase] += 1
            seconds[(t.method, t.steps)] += t.compute_seconds
    return [PartProgress(m, s, done[(m, s)], {**planned, "probe": int(m in probed)}, seconds[(m, s)] / 3600)
            for (m, s) in done]


def _median(values: Sequence[float], default: float = 0.0) -> float:
    return float(np.median(values)) if len(values) else default


def remaining_hours(parts: Sequence[PartProgress], trials: Sequence[Trial], recent: int = 40) -> float | None:
    """The compute the plan still needs at the pace of the ledger's ``recent`` latest trials (None
    before any trial trained): each run left costs its phase's median seconds per training step
    times the steps its phase trains, plus its phase's median time outside training (a test run's
    measurement). Per phase, because a tuning step costs more than a test run's (the pruner's
    validation along the way: about 6.9 against 3.6 s a step at 192 steps on 2 cores), and the
    latest trials may all be of one phase. Recent, because the pace follows how the sittings run
    (workers, threads, what shared the machine), not the run length; a phase with no recent
    trial takes its pace from all of its trials. A tuning run trains the share of its steps that
    the pruner let tuning runs of that length train (of the longest length measured, for one not
    yet begun); a part expects as many finalist runs as the parts past that phase needed. A probe
    left costs the median wall time of the probes so far (none yet: nothing)."""
    trained = [t for t in trials if t.train_seconds > 0 and t.steps_trained > 0]
    if not trained:
        return None
    pace = trained[-recent:]

    def phase_median(phase: str, figure) -> float:
        latest = [figure(t) for t in pace if t.phase == phase]
        return _median(latest, _median([figure(t) for t in trained if t.phase == phase],
                                       _median([figure(t) for t in pace])))

    per_step = {phase: phase_median(phase, lambda t: t.train_seconds / t.steps_trained) for phase in PHASES}
    outside = {phase: phase_median(phase, lambda t: max(0.0, t.compute_seconds - t.train_seconds))
               for phase in PHASES}
    shares = {}
    for steps in sorted({t.steps for t in trained if t.phase == "tune"}):
        tuned = [t for t in trained if t.phase == "tune" and t.steps == steps]
        shares[steps] = sum(t.steps_trained for t in tuned) / (steps * len(tuned))
    past = [p.done["finalist"] for p in parts if p.state in ("testing", "probing", "done")]
    probe_seconds = _median([t.compute_seconds for t in trials if t.phase == "probe"])
    seconds = 0.0
    for part in (p for p in parts if p.state != "done"):       # a done part needs nothing more
        finalists = part.done["finalist"] if part.state in ("testing", "probing") else \
            min(round(float(np.mean(past))) if past else part.planned["finalist"], part.planned["finalist"])
        left = {"tune": max(0, part.planned["tune"] - part.done["tune"]),
                "finalist": max(0, finalists - part.done["finalist"]),
                "test": max(0, part.planned["test"] - part.done["test"])}
        tune_share = shares.get(part.steps, shares[max(shares)] if shares else 1.0)
        share = {"tune": tune_share, "finalist": 1.0, "test": 1.0}
        seconds += sum(n * (per_step[phase] * part.steps * share[phase] + outside[phase]) for phase, n in left.items())
        seconds += max(0, part.planned.get("probe", 0) - part.done["probe"]) * probe_seconds
    return seconds / 3600


def remaining_note(parts: Sequence[PartProgress], trials: Sequence[Trial]) -> str | None:
    """"about N h more at the pace of its trials so far" (:func:`remaining_hours`), or None when
    every part is done or no trial has trained yet: what the README and a sitting's lines say."""
    left = remaining_hours(parts, trials)
    if left is None or all(p.state == "done" for p in parts):
        return None
    return f"about {left:.0f} h more at the pace of its trials so far" if left >= 10 else \
        f"about {left:.2g} h more at the pace of its trials so far"


RULE = ("paired over seeds, and over prompts for per-prompt figures; better or worse: Holm-adjusted p < 0.05 and "
        "at least the metric's smallest effect of interest; equivalent: the 90% interval inside it")


def describe(tests: Sequence[PairedTest]) -> str:
    return "; ".join(f"{get(t.metric).label} ({t.method} vs {t.control}, {t.steps} steps, {t.delta.value:+.3g})"
                     for t in tests)
