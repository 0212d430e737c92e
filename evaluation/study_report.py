"""The study's report: ``reports/study/report.md``, its plots and ``metrics/study.json``.

What a reviewer asks of an optimizer comparison, in order: the search space and trials per
method, each method's chosen setting, every test figure at every budget (mean and 95% interval
over seeds), the pre-declared paired tests with Holm-adjusted p-values, the sensitivity and
budget plots, the trainable parameters at the end, the speed and the compute spent.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.files import atomic_write_json, atomic_write_text
from evaluation.metrics import REGISTRY, VALIDATION_DECLINE, get
from evaluation.study import (
    PairedTest,
    Trial,
    at_the_edge,
    paired_tests,
    speed_ratio,
    summary,
    test_metrics,
    verdict,
)


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _interval(i) -> str:
    if i is None:
        return "n/a"
    if not math.isfinite(i.low):
        return _number(i.value)
    return f"{_number(i.value)} [{_number(i.low)}, {_number(i.high)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def comparison_pairs(params) -> list[tuple[str, str]]:
    """Every GRIT method of the study against every LoRA method of it."""
    methods = params.study.methods
    grit = [m for m in methods if params.variants[m].grit]
    return [(g, c) for g in grit for c in methods if not params.variants[c].grit]


def tuning_rows(trials: Sequence[Trial], chosen: dict[str, dict[str, float]]) -> list[list[str]]:
    rows = []
    for t in sorted((t for t in trials if t.phase == "tune"), key=lambda t: (t.method, t.setting["learning_rate"])):
        mark = " **chosen**" if t.setting == chosen.get(t.method) else ""
        rows.append([t.method, ", ".join(f"{k} {v:.3g}" for k, v in sorted(t.setting.items())),
                     _number(t.val_loss) + mark, _number(t.metrics.get(VALIDATION_DECLINE.name), 3)])
    return rows


def test_rows(trials: Sequence[Trial], methods: Sequence[str], budget: int) -> list[list[str]]:
    return [[get(m).label, *(_interval(summary(trials, method, budget, m)) for method in methods)]
            for m in test_metrics()]


def test_table_rows(tests: Sequence[PairedTest]) -> list[list[str]]:
    def judged(t: PairedTest) -> str:
        better = t.better()
        return "n.s." if better is None else ("GRIT better" if better else "GRIT worse")

    return [[str(t.budget), f"{t.method} vs {t.control}", get(t.metric).label, _interval(t.delta),
             f"{t.p_value:.3g}", _number(t.p_adjusted, 3), judged(t)] for t in tests]


def parameter_rows(trials: Sequence[Trial], methods: Sequence[str], budgets: Sequence[int]) -> list[list[str]]:
    rows = []
    for method in methods:
        cells = []
        for budget in budgets:
            counts = [t.trainable_parameters for t in trials if t.phase == "test" and t.method == method
                      and t.budget == budget and t.trainable_parameters]
            cells.append(f"{sum(counts) / len(counts):,.0f}" if counts else "n/a")
        rows.append([method, *cells])
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_sensitivity(trials: Sequence[Trial], methods: Sequence[str], chosen: dict[str, dict[str, float]],
                     path: Path) -> Path:
    """Validation loss and the validation P(decline) against the learning rate, per method; a
    star marks each method's chosen trial."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method in methods:
        tuned = sorted((t for t in trials if t.phase == "tune" and t.method == method),
                       key=lambda t: t.setting["learning_rate"])
        rates = [t.setting["learning_rate"] for t in tuned]
        axes[0].plot(rates, [t.val_loss for t in tuned], "o-", label=method)
        axes[1].plot(rates, [t.metrics.get(VALIDATION_DECLINE.name, math.nan) for t in tuned], "o-",
                     label=method)
        best = [t for t in tuned if t.setting == chosen.get(method)]
        for axis, value in ((axes[0], lambda t: t.val_loss),
                            (axes[1], lambda t: t.metrics.get(VALIDATION_DECLINE.name, math.nan))):
            axis.plot([t.setting["learning_rate"] for t in best], [value(t) for t in best], "*", color="black",
                      markersize=12, zorder=3)
    rates = sorted({t.setting["learning_rate"] for t in trials if t.phase == "tune"})
    for axis, label in zip(axes, ("validation loss (tuning objective)", VALIDATION_DECLINE.label),
                           strict=True):
        axis.set_xscale("log")
        axis.minorticks_off()
        axis.set_xticks(rates, [f"{r:.2g}" for r in rates])
        axis.ticklabel_format(axis="y", useOffset=False)
        axis.set_xlabel("learning rate (the trials)")
        axis.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    return _save(plt, figure, path)


def plot_budget_curves(trials: Sequence[Trial], methods: Sequence[str], budgets: Sequence[int], path: Path) -> Path:
    """Validation loss over steps at each budget, mean over seeds, per method."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.6), squeeze=False)
    for axis, budget in zip(axes[0], budgets, strict=True):
        for method in methods:
            curves = [dict(t.curve) for t in trials if t.phase == "test" and t.method == method and t.budget == budget]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            axis.plot(steps, [sum(c[s] for c in curves) / len(curves) for s in steps], "o-", markersize=3,
                      label=method)
        axis.set_title(f"validation loss, {budget}-step budget (mean over seeds)", fontsize=10)
        axis.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=8)
    return _save(plt, figure, path)


def plot_test_by_budget(trials: Sequence[Trial], methods: Sequence[str], budgets: Sequence[int], path: Path) -> Path:
    """Each test figure against the budget, mean and 95% interval over seeds, per method."""
    plt = _pyplot()
    columns = 3
    rows = -(-len(test_metrics()) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    axes = grid.ravel()
    for axis, metric in zip(axes, test_metrics(), strict=False):
        for offset, method in enumerate(methods):
            points = [(b, summary(trials, method, b, metric)) for b in budgets]
            points = [(b, i) for b, i in points if i is not None]
            errors = [[i.value - i.low if math.isfinite(i.low) else 0 for _, i in points],
                      [i.high - i.value if math.isfinite(i.high) else 0 for _, i in points]]
            axis.errorbar([b * (1 + 0.03 * offset) for b, _ in points], [i.value for _, i in points], yerr=errors,
                          fmt="o-", capsize=3, label=method)
        axis.set_xscale("log")
        axis.minorticks_off()
        axis.set_xticks(list(budgets), [str(b) for b in budgets])
        axis.set_title(get(metric).label, fontsize=9)
        axis.set_xlabel("budget (steps)")
    axes[0].legend(fontsize=7)
    return _save(plt, figure, path)


def edge_warnings(trials: Sequence[Trial], methods: Sequence[str], chosen: dict[str, dict[str, float]]) -> list[str]:
    """One sentence per method whose chosen learning rate is the largest or smallest tried."""
    warnings = []
    for method in methods:
        tuned = [t for t in trials if t.phase == "tune" and t.method == method]
        best = next((t for t in tuned if t.setting == chosen.get(method)), None)
        edge = at_the_edge(tuned, best) if best is not None else None
        if edge:
            warnings.append(f"{method}'s chosen learning rate is the {edge} one tried, so its best setting may lie "
                            "outside the declared range")
    return warnings


def write_report(folder: Path, metrics_path: Path, params, trials: Sequence[Trial], chosen: dict[str, dict[str, float]],
                 stage_seconds: float, run_id: str, trials_run: int | None = None) -> dict[str, Path]:
    """Write report.md, the plots, trials.csv and the metrics file; returns them by name."""
    study, methods, budgets = params.study, params.study.methods, params.study.budgets
    folder.mkdir(parents=True, exist_ok=True)
    pairs = comparison_pairs(params)
    tests = paired_tests(trials, pairs, budgets)
    grit_methods = [m for m in methods if params.variants[m].grit]
    sentence = verdict(tests, grit_methods) if pairs else "No GRIT-vs-LoRA pair in study.methods: nothing compared."
    compute = sum(t.train_seconds for t in trials)
    plots = {"sensitivity": plot_sensitivity(trials, methods, chosen, folder / "sensitivity.png"),
             "budget_curves": plot_budget_curves(trials, methods, budgets, folder / "budget_curves.png"),
             "test_by_budget": plot_test_by_budget(trials, methods, budgets, folder / "test_by_budget.png")}
    space = ", ".join(f"{name} log-uniform in [{low:g}, {high:g}]" for name, (low, high) in
                      (("learning rate (every method)", study.learning_rate_range),
                       ("damping (GRIT methods)", study.damping_range)))
    speed = [[str(b), f"{m} vs {c}", _number(speed_ratio(trials, m, c, b), 3)] for b in budgets for m, c in pairs]
    edges = edge_warnings(trials, methods, chosen)
    sections = [
        f"# The fair study: does GRIT beat LoRA when each is tuned?\n\nRun `{run_id}`, profile `{params.profile}`, "
        f"methods {', '.join(methods)}; {study.trials} tuning trials per method, {study.seeds} seeds, "
        f"budgets {', '.join(str(b) for b in budgets)} optimizer steps.\n\n**{sentence}**",
        f"## Search space and tuning (budget {budgets[0]}, seed {params.train.seed}, validation split only)\n\n"
        f"Space: {space}; {study.trials} trials per method: the learning rates at the centres of equal slices "
        "of the log range (the same for every method), the damping from a scrambled Sobol sequence "
        f"(seed {study.seed}). "
        "A method's setting is its trial with the lowest validation loss.\n\n"
        + _table(["method", "setting", "validation loss", "P(decline), validation"], tuning_rows(trials, chosen))
        + "".join(f"\n\n**Note:** {warning}." for warning in edges),
        "![sensitivity: validation loss and P(decline) against the learning rate; stars: chosen](sensitivity.png)",
        *(f"## Test figures at {b} steps (mean [95% t interval] over {study.seeds} seeds)\n\n"
          + _table(["metric", *methods], test_rows(trials, methods, b)) for b in budgets),
        "![test figures by budget](test_by_budget.png)\n\n![validation loss over steps](budget_curves.png)",
        "## Paired tests (pre-declared: paired t over seeds, Holm over every row)\n\n"
        + _table(["budget", "pair", "metric", "mean delta [95% CI]", "raw p", "Holm p", "verdict"],
                 test_table_rows(tests)),
        "## Trainable parameters at the end (mean over seeds)\n\n"
        + _table(["method", *(f"{b} steps" for b in budgets)], parameter_rows(trials, methods, budgets)),
        "## Training speed (median over seeds of tokens/s relative to the control, trained one after the other)\n\n"
        + _table(["budget", "pair", "tokens/s ratio"], speed),
        "## Compute\n\n" + compute_line(trials, compute, stage_seconds, trials_run),
    ]
    report = folder / "report.md"
    atomic_write_text(report, "\n\n".join(sections) + "\n")
    table = folder / "trials.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["phase", "method", "budget", "seed", "setting", "val_loss", "train_seconds",
                         "tokens_per_second", "trainable_parameters", *test_metrics(), VALIDATION_DECLINE.name])
        for t in sorted(trials, key=lambda t: (t.phase, t.method, t.budget, t.seed)):
            writer.writerow([t.phase, t.method, t.budget, t.seed, json.dumps(t.setting, sort_keys=True), t.val_loss,
                             t.train_seconds, t.tokens_per_second, t.trainable_parameters,
                             *(t.metrics.get(m) for m in [*test_metrics(), VALIDATION_DECLINE.name])])
    atomic_write_json(metrics_path, {**study_metrics(params, trials, chosen, tests, sentence, compute, stage_seconds),
                                     "profile": params.profile, "run_id": run_id,
                                     "range_warnings": edges})
    return {"report": report, "trials": table, **plots, "metrics": metrics_path}


def compute_line(trials: Sequence[Trial], training: float, stage_seconds: float, trials_run: int | None) -> str:
    """Training time, trial wall time (training plus measuring) and this invocation's time, each
    saying what it covers: a resumed study's invocation runs only the trials the store lacked."""
    walls = [t.metrics["trial_seconds"] for t in trials if t.metrics.get("trial_seconds") is not None]
    if len(walls) == len(trials):
        wall = f"with measuring, the trials took {sum(walls) / 3600:.2f} h"
    elif walls:
        wall = (f"with measuring, the {len(walls)} trials whose wall time is recorded took {sum(walls) / 3600:.2f} h "
                f"(the other {len(trials) - len(walls)} predate that record)")
    else:
        wall = "the trials' wall time with measuring was not recorded (they predate that record)"
    ran = "" if trials_run is None else f", running {trials_run} of the {len(trials)} trials"
    return (f"{len(trials)} training runs: {training / 3600:.2f} h of training, summed over trials; {wall}. "
            f"This invocation of the stage took {stage_seconds / 3600:.2f} h{ran}.")


def study_metrics(params, trials, chosen, tests, sentence, compute, stage_seconds) -> dict[str, Any]:
    def plain(i):
        return None if i is None else {"mean": i.value, "low": i.low if math.isfinite(i.low) else None,
                                       "high": i.high if math.isfinite(i.high) else None, "n": i.n}

    return {
        "status": "complete", "verdict": sentence, "methods": list(params.study.methods), "chosen": chosen,
        "trials_per_method": params.study.trials, "seeds": params.study.seeds, "budgets": params.study.budgets,
        "summary": {f"{m}@{b}": {metric: plain(summary(trials, m, b, metric)) for metric in test_metrics()}
                    for m in params.study.methods for b in params.study.budgets},
        "tests": [{"budget": t.budget, "method": t.method, "control": t.control, "metric": t.metric,
                   "delta": plain(t.delta), "p": t.p_value, "p_holm": t.p_adjusted} for t in tests],
        "training_hours": compute / 3600, "stage_hours": stage_seconds / 3600,
    }


def readme_block(study: dict) -> str:
    """The README's headline from ``metrics/study.json``: the verdict, each method's chosen
    setting, the main figures at every budget, and where the full report is."""
    if study.get("status") != "complete":
        return ("The fair study (each method tuned on validation loss, 5 seeds, two budgets; "
                "[docs/study.md](docs/study.md)) has not been completed in this repository yet, so the "
                "headline below is the default run's: one learning rate, one seed, one budget.")

    def cell(metric: str, figure: dict | None) -> str:
        if figure is None:
            return "n/a"
        if figure["low"] is None:
            return _number(figure["mean"])
        # within the metric's range: a study recorded before intervals were clipped may hold 1.01
        low, high = get(metric).clip(figure["low"]), get(metric).clip(figure["high"])
        return f"{_number(figure['mean'])} [{_number(low)}, {_number(high)}]"

    methods = study["methods"]
    # The endpoints this study measured (the registry may have moved on since), distinct ones only.
    measured = next(iter(study["summary"].values()))
    shown = [name for name in REGISTRY if name in measured and get(name).derived_from is None]
    chosen = _table(["method", "chosen setting (lowest validation loss)"],
                    [[m, ", ".join(f"{k} {v:.3g}" for k, v in sorted(study["chosen"][m].items()))] for m in methods])
    budgets = [
        f"At {budget} steps (mean [95% interval] over {study['seeds']} seeds):\n\n"
        + _table(["metric", *methods],
                 [[get(metric).label, *(cell(metric, study["summary"][f"{m}@{budget}"].get(metric)) for m in methods)]
                  for metric in shown])
        for budget in study["budgets"]]
    # Name the run and profile: a rehearsal profile (smoke) writes the same files, and a reader
    # must be able to tell its numbers from the study's.
    source = f"Study run `{study['run_id']}`, profile `{study['profile']}`. " if "run_id" in study else ""
    return "\n\n".join([f"**{study['verdict']}**", chosen, *budgets,
                        f"{source}Every trial, test and plot: [reports/study/report.md](reports/study/report.md)."])
