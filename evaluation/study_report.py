"""The study's report: ``reports/study/report.md``, its plots and ``metrics/study.json``.

What a reviewer asks of an optimizer comparison, in order: the search space, sampler, pruner and
configurations per method, how each range was widened, the finalists and each method's chosen
setting, every test figure at every run length (mean and 95% interval over seeds and prompts),
the pre-declared paired tests with Holm-adjusted p-values, the sensitivity and run-length plots,
the trainable parameters at the end, and the compute spent per method.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.doc_blocks import DocBlock, Sources
from core.files import atomic_write_json, atomic_write_text
from db.provenance import check_one_setup
from db.study_ledger import JOURNAL_FILE, LEDGER_DIR, STUDY_FILE, TRIALS_FILE, jsonl_records
from evaluation.metrics import REGISTRY, VALIDATION_DECLINE, get
from evaluation.stats import Interval
from evaluation.study import (
    FINDINGS,
    RULE,
    PairedTest,
    Trial,
    compute_by_method,
    describe,
    endpoints,
    paired_test_from_record,
    paired_test_record,
    paired_tests,
    planned_runs,
    remaining_note,
    study_progress,
    summary,
    trial_from_record,
)
from evaluation.tuning import setting_key


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


# How a headline names a peer: by the preconditioner its LoRA optimizer applies (trainers/config.py).
PEER_NAMES = {"riemannian": "Riemannian-preconditioned LoRA", "loraplus": "LoRA+"}


def control_names(params, controls: Sequence[str]) -> dict[str, str]:
    """The study's controls as its headline names them, plain LoRA first (the question the study
    answers is GRIT against LoRA; a peer answers a second one): "LoRA", or the peer's
    preconditioner with its method name. Two plain controls are told apart by their names."""
    plain = [c for c in controls if params.variants[c].lora_optimizer is None]
    names = {c: "LoRA" if len(plain) == 1 else f"LoRA (`{c}`)" for c in plain}
    for c in controls:
        if c not in names:
            kind = params.variants[c].lora_optimizer.kind
            names[c] = f"{PEER_NAMES.get(kind, kind)} (`{c}`)"
    return names


def _tally(tests: Sequence[PairedTest]) -> dict[str, int]:
    return {kind: sum(t.finding() == kind for t in tests) for kind in FINDINGS}


def study_headline(tests: Sequence[PairedTest], grit_methods: Sequence[str], names: dict[str, str]) -> str:
    """One sentence: does GRIT beat LoRA, by the pre-declared rule, counting each of the four kinds
    of finding; then, for each peer in ``names`` (control -> name, plain LoRA first), the same
    counts against it. Counts against different controls are never added up: "better than LoRA
    in 4" must not hold a win over a peer."""
    def counts(control: str) -> tuple[dict[str, int], int]:
        mine = [t for t in tests if t.method in grit_methods and t.control == control]
        return _tally(mine), len(mine)

    (first, name), *peers = names.items()
    found, n = counts(first)
    wins, losses = found["better"], found["worse"]
    rest = f"equivalent in {found['equivalent']} and inconclusive in {found['inconclusive']}"
    if not wins and not losses:
        lead = (f"No: at each method's validation-tuned setting, GRIT is neither better nor worse than {name} in "
                f"any of {n} paired tests; {rest}")
    elif wins and losses:
        lead = f"Mixed: GRIT is better than {name} in {wins} and worse in {losses} of {n} paired tests; {rest}"
    elif wins:
        lead = f"GRIT is better than {name} in {wins} and worse in none of {n} paired tests; {rest}"
    else:
        lead = f"No: GRIT is worse than {name} in {losses} and better in none of {n} paired tests; {rest}"
    for control, peer in peers:
        found, n = counts(control)
        lead += (f"; against {peer}: better in {found['better'] or 'none'} and worse in {found['worse'] or 'none'} "
                 f"of {n}, equivalent in {found['equivalent']} and inconclusive in {found['inconclusive']}")
    return f"{lead} ({RULE})."


def study_verdict(tests: Sequence[PairedTest], grit_methods: Sequence[str], names: dict[str, str]) -> str:
    """The headline, then every finding that counts, each naming its control."""
    mine = [t for t in tests if t.method in grit_methods and t.control in names]
    wins = [t for t in mine if t.finding() == "better"]
    losses = [t for t in mine if t.finding() == "worse"]
    parts = [study_headline(tests, grit_methods, names)]
    if wins:
        parts.append(f"Better: {describe(wins)}{';' if losses else '.'}")
    if losses:
        parts.append(f"{'worse' if wins else 'Worse'}: {describe(losses)}.")
    return " ".join(parts)


def _setting(setting: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(setting.items()))


def tuning_rows(trials: Sequence[Trial], methods: Sequence[str], run_lengths: Sequence[int]) -> list[list[str]]:
    """Per method and run length: configurations trained to the end, pruned, and the best
    validation loss among those trained to the end."""
    rows = []
    for steps in run_lengths:
        for method in methods:
            tuned = [t for t in trials if t.phase == "tune" and t.method == method and t.steps == steps]
            ended = [t.val_loss for t in tuned if not t.pruned and t.val_loss is not None and math.isfinite(t.val_loss)]
            rows.append([str(steps), method, str(len(tuned)), str(sum(t.pruned for t in tuned)),
                         _number(min(ended) if ended else None)])
    return rows


def where_defaults_land(trials: Sequence[Trial], method: str, steps: int,
                        chosen: dict[str, float] | None) -> dict[str, Any] | None:
    """The published defaults of one part against its tuning: their validation loss, their rank
    among the configurations trained to the end (1 is best) and whether selection chose them;
    None before the defaults have run."""
    tuned = [t for t in trials if t.phase == "tune" and t.method == method and t.steps == steps]
    defaults = next((t for t in tuned if t.defaults), None)
    if defaults is None:
        return None
    ended = sorted(t.val_loss for t in tuned if not t.pruned and t.val_loss is not None and math.isfinite(t.val_loss))
    loss = defaults.val_loss if defaults.val_loss is not None and math.isfinite(defaults.val_loss) else None
    return {"setting": defaults.setting, "val_loss": loss, "rank": None if loss is None else ended.index(loss) + 1,
            "of": len(ended), "best_val_loss": ended[0] if ended else None, "chosen": chosen == defaults.setting}


def defaults_rows(trials: Sequence[Trial], methods: Sequence[str], run_lengths: Sequence[int],
                  chosen: dict[tuple[str, int], dict[str, float]]) -> list[list[str]]:
    rows = []
    for steps in run_lengths:
        for method in methods:
            landed = where_defaults_land(trials, method, steps, chosen.get((method, steps)))
            if landed is not None:
                rank = "failed" if landed["rank"] is None else f"{landed['rank']} of {landed['of']}"
                rows.append([str(steps), method, _setting(landed["setting"]), _number(landed["val_loss"]), rank,
                             _number(landed["best_val_loss"]), "yes" if landed["chosen"] else "no"])
    return rows


def probes_at_chosen(trials: Sequence[Trial], chosen: dict[tuple[str, int], dict[str, float]]) -> dict[str, dict]:
    """Per part with a probe run at its chosen setting: the verdict and the median cosines of the
    update against the control arm's and against the scalar twin's (``pipelines.study.trial``)."""
    out = {}
    for t in trials:
        if t.phase == "probe" and chosen.get((t.method, t.steps)) == t.setting:
            out[f"{t.method}@{t.steps}"] = {"verdict": "effective" if t.metrics.get("effective") else "inert",
                                            **{k: v for k, v in t.metrics.items() if k != "effective"}}
    return out


def _probe_section(trials: Sequence[Trial], chosen: dict[tuple[str, int], dict[str, float]]) -> str:
    probes = probes_at_chosen(trials, chosen)
    rows = [[part.replace("@", " at "), p["verdict"], _number(p.get("update_cosine_median")),
             _number(p.get("scalar_twin_cosine_median"))] for part, p in sorted(probes.items())]
    return ("## Does the preconditioner still act at the chosen settings? (the probe at each chosen setting)\n\n"
            "Cosine of the update with the preconditioner against the same step without it (1: unchanged "
            "direction) and against its scalar twin (the plain step rescaled to the same norm), medians over "
            "modules, over the probe's steps after the method's natural-gradient warm-up (docs/method.md, "
            "the probe).\n\n"
            + (_table(["part", "verdict", "update cosine vs control", "update cosine vs scalar twin"], rows)
               if rows else "No chosen setting has been probed yet."))


def rungs_line(trials: Sequence[Trial]) -> str:
    """The pruner's rungs per run length as the tuning trials measured them (every step of a
    tuning curve before its end is a rung: a trial measures its validation loss there only)."""
    lengths = sorted({t.steps for t in trials if t.phase == "tune"})
    found = {b: sorted({step for t in trials if t.phase == "tune" and t.steps == b for step, _ in t.curve if step < b})
             for b in lengths}
    return "; ".join(f"at step {', '.join(map(str, found[b])) or 'none'} of {b}" for b in lengths) or "none yet"


def finalists(trials: Sequence[Trial], method: str, steps: int, train_seed: int) -> list[tuple[dict, list[Trial]]]:
    """Each finalist setting of a part with its selection runs in seed order: the finalist runs and
    the tuning run that trained it to the end on the tuning seed (its first selection seed)."""
    keys = {setting_key(t.setting) for t in trials if t.phase == "finalist" and t.method == method
            and t.steps == steps}
    found = []
    for key in sorted(keys):
        runs = sorted((t for t in trials if t.method == method and t.steps == steps
                       and setting_key(t.setting) == key
                       and (t.phase == "finalist" or (t.phase == "tune" and t.seed == train_seed
                                                      and not t.pruned))), key=lambda t: t.seed)
        found.append((runs[0].setting, runs))
    return found


def _mean_loss(runs: Sequence[Trial]) -> float | None:
    losses = [t.val_loss for t in runs]
    return sum(losses) / len(losses) if losses and all(v is not None for v in losses) else None


def finalist_rows(trials: Sequence[Trial], chosen: dict[tuple[str, int], dict[str, float]],
                  train_seed: int) -> list[list[str]]:
    """Every finalist: its validation loss on each selection seed and the mean; the chosen marked."""
    rows = []
    for (method, steps), picked in chosen.items():
        for setting, runs in finalists(trials, method, steps, train_seed):
            mark = " **chosen**" if setting_key(setting) == setting_key(picked) else ""
            rows.append([str(steps), method, _setting(setting), ", ".join(_number(t.val_loss) for t in runs),
                         _number(_mean_loss(runs)) + mark])
    return rows


def test_rows(trials: Sequence[Trial], methods: Sequence[str], steps: int) -> list[list[str]]:
    return [[get(m).label, *(_interval(summary(trials, method, steps, m)) for method in methods)]
            for m in endpoints()]


def test_table_rows(tests: Sequence[PairedTest]) -> list[list[str]]:
    def test(t: PairedTest) -> str:
        return "paired t" if t.resamples is None else f"bootstrap, {t.resamples:,} resamples"

    def band(t: PairedTest) -> str:
        return "-" if t.equivalence is None else f"[{t.equivalence.low:.3g}, {t.equivalence.high:.3g}]"

    return [[str(t.steps), f"{t.method} vs {t.control}", get(t.metric).label, _interval(t.delta), test(t),
             f"{t.p_value:.3g}", _number(t.p_adjusted, 3), f"±{t.smallest_effect:.3g}", band(t), t.finding()]
            for t in tests]


def parameter_rows(trials: Sequence[Trial], methods: Sequence[str], run_lengths: Sequence[int]) -> list[list[str]]:
    rows = []
    for method in methods:
        cells = []
        for steps in run_lengths:
            counts = [t.trainable_parameters for t in trials if t.phase == "test" and t.method == method
                      and t.steps == steps and t.trainable_parameters]
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


def plot_sensitivity(trials: Sequence[Trial], methods: Sequence[str], run_lengths: Sequence[int],
                     chosen: dict[tuple[str, int], dict[str, float]], train_seed: int,
                     learning_rates: tuple[float, float], path: Path) -> Path:
    """Validation loss against the learning rate, one panel per run length: every tuning
    configuration trained to the end (hollow), each finalist's mean over the selection seeds
    (filled), the chosen one starred. The axis spans the declared learning-rate range (or more,
    where the study widened it), so a choice at an edge shows as one."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(run_lengths), figsize=(5 * len(run_lengths) + 1.6, 3.8), squeeze=False)
    for axis, steps in zip(axes[0], run_lengths, strict=True):
        shown = list(learning_rates)
        for method in methods:
            ended = [t for t in trials if t.phase == "tune" and t.method == method and t.steps == steps
                     and not t.pruned and t.val_loss is not None]
            points = axis.plot([t.setting["learning_rate"] for t in ended], [t.val_loss for t in ended], "o",
                               markerfacecolor="none", alpha=0.8, label=method)
            color = points[0].get_color()
            finals = [(setting, _mean_loss(runs)) for setting, runs in finalists(trials, method, steps, train_seed)]
            finals = [(setting, loss) for setting, loss in finals if loss is not None]
            axis.plot([s["learning_rate"] for s, _ in finals], [loss for _, loss in finals], "D", color=color,
                      markersize=5)
            best = [(s, loss) for s, loss in finals if setting_key(s) == setting_key(chosen.get((method, steps), {}))]
            axis.plot([s["learning_rate"] for s, _ in best], [loss for _, loss in best], "*", markersize=15,
                      color=color, markeredgecolor="black", zorder=3)
            shown += [t.setting["learning_rate"] for t in ended] + [s["learning_rate"] for s, _ in finals]
        axis.set_xscale("log")
        axis.set_xlim(min(shown) / 1.3, max(shown) * 1.3)
        for edge in learning_rates:
            axis.axvline(edge, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("learning rate (dotted: the declared range)")
        axis.set_title(f"validation loss after {steps} steps", fontsize=10)
    # beside the last panel, where it hides no point
    axes[0][-1].legend(fontsize=8, title="o tuning run\n\u25c6 finalist mean\n\u2605 chosen", title_fontsize=8,
                       loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(plt, figure, path)


def plot_curves_by_steps(trials: Sequence[Trial], methods: Sequence[str], run_lengths: Sequence[int],
                         path: Path) -> Path:
    """Validation loss over the optimizer steps of each run length, mean over seeds, per method."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(run_lengths), figsize=(5 * len(run_lengths), 3.6), squeeze=False)
    for axis, steps in zip(axes[0], run_lengths, strict=True):
        for method in methods:
            curves = [dict(t.curve) for t in trials if t.phase == "test" and t.method == method and t.steps == steps]
            points = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            axis.plot(points, [sum(c[s] for c in curves) / len(curves) for s in points], "o-", markersize=3,
                      label=method)
        axis.set_title(f"validation loss, runs of {steps} steps (mean over seeds)", fontsize=10)
        axis.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=8)
    return _save(plt, figure, path)


def _metric_panels(plt, metrics: Sequence[str]):
    """A grid of 3 panels a row, one per metric (at least one panel); the unused ones removed."""
    columns = 3
    rows = max(1, -(-len(metrics) // columns))
    figure, grid = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.4 * rows), squeeze=False)
    axes = grid.ravel()
    for unused in axes[len(metrics):]:
        unused.remove()
    return figure, axes


def _by_run_length(axis, metric: str, run_lengths: Sequence[int]) -> None:
    """A panel's x-axis in run lengths (log, each length a tick) and its metric's title."""
    axis.set_xscale("log")
    axis.minorticks_off()
    axis.set_xticks(list(run_lengths), [str(b) for b in run_lengths])
    axis.set_title(textwrap.fill(get(metric).label, 46), fontsize=9)
    axis.set_xlabel("optimizer steps")


def _error_bars(intervals: Sequence[Interval]) -> list[list[float]]:
    """matplotlib's [below, above] distances of each interval from its value (0 where unbounded)."""
    return [[i.value - i.low if math.isfinite(i.low) else 0 for i in intervals],
            [i.high - i.value if math.isfinite(i.high) else 0 for i in intervals]]


def plot_test_by_steps(trials: Sequence[Trial], methods: Sequence[str], run_lengths: Sequence[int], path: Path) -> Path:
    """Each test figure against the run length in steps, mean and 95% interval over seeds, per method."""
    plt = _pyplot()
    figure, axes = _metric_panels(plt, endpoints())
    for axis, metric in zip(axes, endpoints(), strict=False):
        for offset, method in enumerate(methods):
            points = [(b, summary(trials, method, b, metric)) for b in run_lengths]
            points = [(b, i) for b, i in points if i is not None]
            axis.errorbar([b * (1 + 0.03 * offset) for b, _ in points], [i.value for _, i in points],
                          yerr=_error_bars([i for _, i in points]), fmt="o-", capsize=3, label=method)
        _by_run_length(axis, metric, run_lengths)
    axes[0].legend(fontsize=7)
    return _save(plt, figure, path)


def plot_differences(tests: Sequence[PairedTest], run_lengths: Sequence[int], path: Path) -> Path:
    """The verdict as a picture: per endpoint, each method's paired difference from each of its
    controls (mean and 95% interval; a marker per control) against the run length; filled where
    the finding counts (better or worse), with the side of zero that is better shaded."""
    plt = _pyplot()
    metrics = [m for m in endpoints() if any(t.metric == m for t in tests)]
    methods = list(dict.fromkeys(t.method for t in tests))
    # A method's differences from each control: one colour per method, one marker and line style
    # per control, side by side at a run length.
    controls = list(dict.fromkeys(t.control for t in tests))
    styles = dict(zip(controls, itertools.cycle((("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."))), strict=False))
    series = [(method, control) for method in methods for control in controls]
    colors = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    figure, axes = _metric_panels(plt, metrics)
    for axis, metric in zip(axes, metrics, strict=False):
        for offset, (method, control) in enumerate(series):
            mine = sorted((t for t in tests if t.metric == metric and t.method == method and t.control == control),
                          key=lambda t: t.steps)
            if not mine:
                continue
            marker, style = styles[control]
            x = [t.steps * (1 + 0.02 * offset) for t in mine]
            y = [t.delta.value for t in mine]
            axis.errorbar(x, y, yerr=_error_bars([t.delta for t in mine]), fmt=style, color=colors[method], capsize=3)
            axis.scatter(x, y, s=30, zorder=3, marker=marker, edgecolors=colors[method],
                         facecolors=[colors[method] if t.better() is not None else "white" for t in mine])
        axis.axhline(0, color="black", linewidth=0.8)
        low, high = axis.get_ylim()
        axis.axhspan(0, high if get(metric).better(1.0) else low, color="tab:green", alpha=0.07, linewidth=0)
        axis.set_ylim(low, high)
        _by_run_length(axis, metric, run_lengths)
        axis.set_ylabel("method minus control", fontsize=8)
    if metrics:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[m], label=m) for m in methods]
        if len(controls) > 1:
            handles += [Line2D([], [], color="black", marker=styles[c][0], linestyle=styles[c][1],
                               markerfacecolor="white", label=f"vs {c}") for c in controls]
        legend = dict(handles=handles, title="filled: better or worse (counts)\nshaded: the better side")
        if len(metrics) % 3:      # a free cell in the grid (_metric_panels): the legend there, off the points
            figure.legend(**legend, loc="center", bbox_to_anchor=((len(metrics) % 3 + 0.5) / 3, 0.25), fontsize=8,
                          title_fontsize=8)
        else:
            axes[0].legend(**legend, fontsize=7, title_fontsize=7)
    return _save(plt, figure, path)


def space_line(params) -> str:
    study = params.study
    return (f"learning rate log-uniform in [{study.learning_rate_range[0]:g}, {study.learning_rate_range[1]:g}] "
            f"(every method); damping log-uniform in [{study.damping_range[0]:g}, {study.damping_range[1]:g}] "
            "(GRIT methods); for GRIT with the budget cadence also the reprojection warm-up fraction in "
            f"[{study.reprojection_warmup_range[0]:g}, {study.reprojection_warmup_range[1]:g}] and the "
            f"eigen-energy threshold in [{study.energy_range[0]:g}, {study.energy_range[1]:g}]")


def _study_plots(folder: Path, params, trials: Sequence[Trial], chosen: dict[tuple[str, int], dict[str, float]],
                 tests: Sequence[PairedTest]) -> dict[str, Path]:
    """The four pictures the report embeds, by name (the names are the report's image links)."""
    study, methods, run_lengths = params.study, params.study.methods, params.study.steps
    return {"sensitivity": plot_sensitivity(trials, methods, run_lengths, chosen, params.train.seed,
                                            tuple(study.learning_rate_range), folder / "sensitivity.png"),
            "curves_by_steps": plot_curves_by_steps(trials, methods, run_lengths, folder / "curves_by_steps.png"),
            "test_by_steps": plot_test_by_steps(trials, methods, run_lengths, folder / "test_by_steps.png"),
            "differences_by_steps": plot_differences(tests, run_lengths, folder / "differences_by_steps.png")}


def compared_setup(trials: Sequence[Trial]) -> str | None:
    """The one setup (code, locks, data: ``db.provenance``) of the test runs the report compares;
    raises ``ProvenanceError`` naming two parts and both setups when the parts mix setups."""
    parts: dict[str, list[str | None]] = {}
    for t in trials:
        if t.phase == "test":
            parts.setdefault(f"{t.method} at {t.steps} steps", []).append(t.setup)
    return check_one_setup(parts)


def probed_setup(trials: Sequence[Trial]) -> str | None:
    """The one setup of the probe runs the report shows; raises ``ProvenanceError`` when two
    probes ran on different probe code (a fix to the probe re-runs every probe the ledger holds:
    docs/study.md, Corrections)."""
    parts: dict[str, list[str | None]] = {}
    for t in trials:
        if t.phase == "probe":
            parts.setdefault(f"the probe of {t.method} at {t.steps} steps", []).append(t.setup)
    return check_one_setup(parts)


def provenance_line(trials: Sequence[Trial]) -> str:
    """What trained the trials: the setup fingerprint(s) per phase (docs/study.md, Provenance)."""
    by_phase: dict[str, dict[str, int]] = {}
    for t in trials:
        counts = by_phase.setdefault(t.phase, {})
        counts[t.setup or "not recorded"] = counts.get(t.setup or "not recorded", 0) + 1
    phases = "; ".join(f"{phase}: " + ", ".join(f"`{k}` ({v} trials)" for k, v in sorted(counts.items()))
                       for phase, counts in by_phase.items())
    return f"**Provenance** (setup fingerprints: the code each trial loaded, the lock files and the data): {phases}."


def _opening_section(params, run_id: str, sentence: str) -> str:
    """The title, what was run, and the verdict in bold: a reader who stops here has the answer."""
    study, run_lengths = params.study, params.study.steps
    seeds = f"test seeds {study.test_seed}-{study.test_seed + study.seeds - 1}"
    return (f"# The fair study: does GRIT beat LoRA when each is tuned?\n\nRun `{run_id}`, profile `{params.profile}`, "
            f"methods {', '.join(study.methods)}; {study.configurations} configurations per method and run length, "
            f"{study.finalists} finalists over {1 + study.finalist_seeds} seeds, {study.seeds} {seeds}; runs of "
            f"{', '.join(str(b) for b in run_lengths)} optimizer steps.\n\n**{sentence}**")


# Optuna's journal operations that carry a parameter's distribution: a trial created with its
# parameters (an enqueued or carried configuration) and a parameter set on a trial (a draw).
_CREATE_TRIAL, _SET_TRIAL_PARAM = 4, 5


def searched_ranges(journal: Sequence[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Each tuning's range per parameter, as Optuna's journal (the ledger's ``journal.jsonl``)
    recorded the distributions its configurations were drawn from."""
    ranges: dict[str, dict[str, tuple[float, float]]] = {}

    def note(tuning: str, name: str, distribution: str) -> None:
        bounds = json.loads(distribution).get("attributes", {})
        if "low" not in bounds or "high" not in bounds:        # a categorical parameter has no range
            return
        low, high = ranges.setdefault(tuning, {}).get(name, (bounds["low"], bounds["high"]))
        ranges[tuning][name] = (min(low, bounds["low"]), max(high, bounds["high"]))

    for entry in journal:
        log = entry["log"]
        if log.get("op_code") == _SET_TRIAL_PARAM:
            note(entry["tuning"], log["param_name"], log["distribution"])
        elif log.get("op_code") == _CREATE_TRIAL:
            for name, distribution in (log.get("distributions") or {}).items():
                note(entry["tuning"], name, distribution)
    return ranges


def widened_lines(ranges: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """One line per range extension (a tuning named ``.../extended-K``): each range it widened
    against the tuning before it, from and to."""
    lines = []
    for tuning, space in sorted(ranges.items()):
        base, extended, k = tuning.rpartition("/extended-")
        if not extended or not k.isdigit():
            continue
        before = ranges.get(base if k == "1" else f"{base}/extended-{int(k) - 1}", {})
        changed = [f"{name} [{before[name][0]:g}, {before[name][1]:g}] to [{low:g}, {high:g}]"
                   for name, (low, high) in sorted(space.items()) if name in before and before[name] != (low, high)]
        part = base.split("/", 1)[1] if "/" in base else base        # the study's key left out
        lines.append(f"{part}, extension {k}: " + (", ".join(changed) or "no range changed"))
    return lines


def _tuning_section(params, trials: Sequence[Trial], notes: Sequence[str], widened: Sequence[str]) -> str:
    """The search space, sampler and pruner, the configurations per part, and every widened range."""
    study = params.study
    return ("## Tuning (validation split only, seed " + str(params.train.seed) + ")\n\n"
            f"Space: {space_line(params)}. Each tuning's first configuration is its method's published defaults, "
            f"trained to the end. Optuna's {study.sampler.upper()} sampler (seeded by {study.seed}, the method, the "
            "run length and the range extension"
            + (f", {study.startup} quasi-random configurations first" if study.sampler == "tpe" else "")
            + f") searches each method's space jointly; a successive-halving pruner (rungs {rungs_line(trials)}, "
            f"reduction factor {study.reduction_factor}) stops configurations whose validation loss falls "
            "behind, the same for every method.\n\n"
            + _table(["steps", "method", "configurations", "pruned", "best validation loss"],
                     tuning_rows(trials, study.methods, study.steps))
            + ("\n\n**Widened** (a chosen value at an edge of a range tunes the part again, "
               f"{study.configurations} more configurations, in a wider range; from Optuna's journal in the "
               "ledger):\n\n"
               + "\n".join(f"- {line}" for line in widened) if widened else "")
            + "".join(f"\n\n**Range:** {note}." for note in notes))


def _defaults_section(params, trials: Sequence[Trial], chosen: dict[tuple[str, int], dict[str, float]]) -> str:
    """Where each method's published defaults landed in its own tuning (trained to the end there)."""
    rows = defaults_rows(trials, params.study.methods, params.study.steps, chosen)
    return ("## Where the published defaults land (validation loss; rank among the configurations trained to "
            "the end, 1 is best)\n\n"
            + (_table(["steps", "method", "defaults", "validation loss", "rank", "best validation loss", "chosen"],
                      rows) if rows else "No tuning of this study has trained its defaults yet (ledgers before "
               "the defaults were enqueued do not mark them)."))


def _selection_section(params, trials: Sequence[Trial], chosen: dict[tuple[str, int], dict[str, float]]) -> str:
    return ("## Selection (mean validation loss of the finalists over the selection seeds)\n\n"
            + _table(["steps", "method", "setting", "validation loss per seed", "mean"],
                     finalist_rows(trials, chosen, params.train.seed)))


def _test_figure_sections(params, trials: Sequence[Trial]) -> list[str]:
    """One table of test figures per run length: the methods side by side at the same length."""
    study = params.study
    return [f"## Test figures at {b} steps (mean [95% interval] over {study.seeds} seeds; per-prompt figures "
            "over seeds and prompts)\n\n" + _table(["metric", *study.methods], test_rows(trials, study.methods, b))
            for b in study.steps]


def _paired_tests_section(params, tests: Sequence[PairedTest]) -> str:
    """The pre-declared tests with the rule that turns each row into a finding, stated before the table."""
    study = params.study
    return ("## Paired tests (pre-declared: over seeds, and over prompts for per-prompt figures; Holm over every "
            "row)\n\n"
            "A row is *better* or *worse* when its Holm-adjusted p is below 0.05 and its mean difference is at least "
            "the metric's smallest effect of interest (the registry's, `evaluation/metrics.py`: 1% of the control's "
            "test loss, 5% of its 1/XB, 0.05 on a rate), *equivalent* when its 90% interval lies inside that effect "
            "either way (the two one-sided tests at 0.05), and *inconclusive* otherwise.\n\n"
            + _table(["steps", "pair", "metric", "mean delta [95% CI]", "test", "raw p", "Holm p", "smallest effect",
                      "90% interval", "finding"], test_table_rows(tests))
            + "\n\n![paired differences from the control by run length](differences_by_steps.png)"
            + f"\n\nA per-prompt test draws {study.bootstrap_resamples:,} bootstrap resamples, and more where its "
            "p-value falls below 0.05: enough that the smallest p-value they can give lies ten times below "
            "Holm's smallest threshold (0.05 over the number of rows).")


def _compute_section(compute: dict[str, dict[str, float]], stage_seconds: float) -> str:
    """Hours spent per method and phase; says why training speed is not compared from these runs."""
    return ("## Compute (hours per run in its worker: training, evaluation and loading; summed over runs)\n\n"
            + _table(["method", "tuning", "finalists", "test", "probe", "total", "of which training"],
                     [[m, *(f"{c[k] / 3600:.2f}" for k in ("tune", "finalist", "test", "probe", "total", "training"))]
                      for m, c in compute.items()])
            + f"\n\nThis invocation of the stage took {stage_seconds / 3600:.2f} h. Training speed is not compared "
            "here: runs of different methods trained at different times on a shared machine; the side-by-side "
            "measurement is `benchmarks/grit_overhead.py`.")


def write_trials_csv(path: Path, trials: Sequence[Trial]) -> Path:
    """Every trial as one row, in a stable order (phase, method, steps, seed), for a reader's own analysis."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["phase", "method", "steps", "seed", "setting", "val_loss", "stopped_at", "train_seconds",
                         "tokens_per_second", "trainable_parameters", *endpoints(), VALIDATION_DECLINE.name])
        for t in sorted(trials, key=lambda t: (t.phase, t.method, t.steps, t.seed)):
            writer.writerow([t.phase, t.method, t.steps, t.seed, json.dumps(t.setting, sort_keys=True), t.val_loss,
                             t.stopped_at, t.train_seconds, t.tokens_per_second, t.trainable_parameters,
                             *(t.metrics.get(m) for m in [*endpoints(), VALIDATION_DECLINE.name])])
    return path


def write_report(folder: Path, metrics_path: Path, params, trials: Sequence[Trial],
                 chosen: dict[tuple[str, int], dict[str, float]], notes: Sequence[str], stage_seconds: float,
                 run_id: str) -> dict[str, Path]:
    """Write report.md, the plots, trials.csv and the metrics file; returns them by name."""
    study, methods, run_lengths = params.study, params.study.methods, params.study.steps
    compared_setup(trials)                    # refuses before anything is written
    probed_setup(trials)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = comparison_pairs(params)
    tests = paired_tests(trials, pairs, run_lengths, resamples=study.bootstrap_resamples, seed=study.seed)
    grit_methods = [m for m in methods if params.variants[m].grit]
    names = control_names(params, list(dict.fromkeys(c for _, c in pairs)))
    nothing = "No GRIT-vs-LoRA pair in study.methods: nothing compared."
    sentence = study_verdict(tests, grit_methods, names) if pairs else nothing
    compute = compute_by_method(trials)
    plots = _study_plots(folder, params, trials, chosen, tests)
    # the order a reviewer asks in (module docstring): what was searched, chosen, measured, tested, spent
    sections = [
        _opening_section(params, run_id, sentence),
        provenance_line(trials),
        _tuning_section(params, trials, notes, widened_lines(searched_ranges(jsonl_records(
            Sources(folder).text(f"{LEDGER_DIR.name}/{JOURNAL_FILE}"))))),    # the ledger: in the report's folder
        _defaults_section(params, trials, chosen),
        _selection_section(params, trials, chosen),
        _probe_section(trials, chosen),
        "![sensitivity: validation loss against the learning rate; circles: tuning runs, diamonds: finalists' "
        "means, stars: chosen](sensitivity.png)",
        *_test_figure_sections(params, trials),
        "![test figures by run length](test_by_steps.png)\n\n![validation loss over steps](curves_by_steps.png)",
        _paired_tests_section(params, tests),
        "## Trainable parameters at the end (mean over seeds)\n\n"
        + _table(["method", *(f"{b} steps" for b in run_lengths)], parameter_rows(trials, methods, run_lengths)),
        _compute_section(compute, stage_seconds),
    ]
    report = folder / "report.md"
    atomic_write_text(report, "\n\n".join(sections) + "\n")
    table = write_trials_csv(folder / "trials.csv", trials)
    atomic_write_json(metrics_path, {**study_metrics(params, trials, chosen, tests, sentence, compute, stage_seconds),
                                     "headline": study_headline(tests, grit_methods, names) if pairs else nothing,
                                     "profile": params.profile, "run_id": run_id, "range_notes": list(notes),
                                     "study": ledger_key(Sources(folder))})
    return {"report": report, "trials": table, **plots, "metrics": metrics_path}


def study_metrics(params, trials, chosen, tests, sentence, compute, stage_seconds) -> dict[str, Any]:
    def plain(i):
        return None if i is None else {"mean": i.value, "low": i.low if math.isfinite(i.low) else None,
                                       "high": i.high if math.isfinite(i.high) else None, "n": i.n}

    study = params.study
    return {
        "status": "complete", "verdict": sentence, "methods": list(study.methods),
        "chosen": {f"{m}@{steps}": setting for (m, steps), setting in chosen.items()},
        "probes": probes_at_chosen(trials, chosen),
        "defaults": {f"{m}@{b}": landed for m in study.methods for b in study.steps
                     if (landed := where_defaults_land(trials, m, b, chosen.get((m, b)))) is not None},
        "configurations": study.configurations, "finalists": study.finalists,
        "selection_seeds": 1 + study.finalist_seeds, "seeds": study.seeds, "steps": study.steps,
        "summary": {f"{m}@{b}": {metric: plain(summary(trials, m, b, metric, resamples=study.bootstrap_resamples,
                                                        seed=study.seed)) for metric in endpoints()}
                    for m in study.methods for b in study.steps},
        "tests": [paired_test_record(t) for t in tests],
        "compute_hours": {m: {k: v / 3600 for k, v in c.items()} for m, c in compute.items()},
        "compute_total_hours": sum(c["total"] for c in compute.values()) / 3600,
        "training_hours": sum(c["training"] for c in compute.values()) / 3600, "stage_hours": stage_seconds / 3600,
    }


SITTINGS_DOC = "docs/study.md#sittings-one-study-over-several-machines-and-days"


def _ledger_parts(header: dict, records: Sequence[dict]):
    from trainers.config import VariantParams, probed_methods

    plan = header["declared"]["study"]
    planned = planned_runs(plan["configurations"], plan["finalists"], plan["finalist_seeds"], plan["seeds"])
    # the variants as the ledger's header declared them: which parts end with a probe
    variants = {m: VariantParams.model_validate(v) for m, v in header["declared"].get("variants", {}).items()}
    probed = probed_methods(plan["methods"], variants)
    return planned, study_progress(plan["methods"], plan["steps"], planned, map(trial_from_record, records), probed)


def ledger_key(sources: Sources) -> str | None:
    """The key of the study whose ledger lies in ``sources`` (``ledger/study.json`` under the
    report's folder), which the metrics file records so that a page can tell whose report it is."""
    header = sources.text(f"{LEDGER_DIR.name}/{STUDY_FILE}")
    return json.loads(header)["key"] if header else None


def ledger_progress(header: dict | None, records: Sequence[dict], parts_link: str = SITTINGS_DOC,
                    reported: dict | None = None) -> str:
    """The README's word on the study the ledger holds (``reports/study/ledger/``), so that the
    page says a study is under way, and how far, while its sittings go on; ``reported``, the
    metrics file, says whether the headline above is already this study's report."""
    if header is None:
        return "No study of the current design has begun in this repository (its ledger is empty)."
    _, parts = _ledger_parts(header, records)
    finished = sum(p.state == "done" for p in parts)
    trials = f"{len(records)} trial" + ("" if len(records) == 1 else "s")
    if finished == len(parts) and (reported or {}).get("study") == header["key"]:
        then = (f"every part is done, and its report (run `{reported.get('run_id')}`) is the headline "
                "above.")
    elif finished == len(parts):
        then = "every part is done: `dvc repro study` (profile `study`) trains nothing more and writes the report."
    else:
        then = "the headline above stays the earlier study's until every part is done and the report is written."
    return (f"**Study `{header['key']}` of the current design** (profile `study`), produced over sittings: "
            f"{trials} in its ledger, {sum(p.hours for p in parts):.1f} h of compute"
            f"{_left_note(parts, records)}, "
            f"[{finished} of {len(parts)} parts done]({parts_link}); {then}{_revised_note(header)}"
            f"{_finished_note(finished, len(parts), parts_link)}{_data_note(records)}")


def _left_note(parts, records: Sequence[dict]) -> str:
    """How much compute the plan still needs at the ledger's pace (evaluation.study.remaining_note)."""
    note = remaining_note(parts, [trial_from_record(r) for r in records])
    return f" ({note})" if note else ""


def _finished_note(finished: int, parts: int, parts_link: str) -> str:
    """Where the finished parts' figures are while the study goes on (not the headline: no
    paired test has been run on them)."""
    if not finished or finished == parts:
        return ""
    return (f" The finished parts' test figures so far are in [docs/study.md]({parts_link}): descriptive, "
            "with no paired test until the report.")


def _revised_note(header: dict) -> str:
    """Which methods began again when their variant changed after the study began (the ledger
    dropped their earlier trials; ``db.study_ledger``)."""
    methods = sorted(header.get("revisions", {}))
    if not methods:
        return ""
    names = ", ".join(f"`{m}`" for m in methods)
    return (f" {names} began again under a changed variant (docs/study.md says why); the ledger keeps only "
            f"{'its' if len(methods) == 1 else 'their'} trials since.")


def _data_note(records: Sequence[dict]) -> str:
    """Which prepared data the trials trained on: one fingerprint, or how many trials on each
    (the base model's greedy answers, the benign training targets, can differ between CPUs)."""
    counts: dict[str, int] = {}
    for r in records:
        name = r.get("data") or "not recorded"
        counts[name] = counts.get(name, 0) + 1
    if not counts or list(counts) == ["not recorded"]:
        return ""
    if len(counts) == 1:
        return f" Every trial trained on data `{next(iter(counts))}`."
    return " Trials per prepared data: " + ", ".join(f"`{k}` {v}" for k, v in sorted(counts.items())) + "."


def ledger_parts_table(header: dict | None, records: Sequence[dict]) -> str:
    """docs/study.md's table of the ledger's study: per part, where it is and its runs per phase."""
    if header is None:
        return "No study has begun: the ledger is empty."
    planned, parts = _ledger_parts(header, records)
    return _table(["part", "state", f"tuning configurations (at least {planned['tune']})",
                   f"finalist runs (at most {planned['finalist']})", f"test runs (of {planned['test']})",
                   "hours (trials' wall time)"],
                  [[f"{p.method}, {p.steps} steps", p.state, p.done["tune"], p.done["finalist"], p.done["test"],
                    f"{p.hours:.2f}"] for p in parts])


def ledger_finished_parts(header: dict | None, records: Sequence[dict]) -> str:
    """docs/study.md's figures of the parts whose test runs are all done, each at its chosen
    setting: mean [95% interval] over its test seeds (and prompts, for a per-prompt endpoint), as
    the report will give them. Descriptive: the paired tests come with the report, over the whole
    family at once."""
    if header is None:
        return "No study has begun: the ledger is empty."
    finished = [p for p in _ledger_parts(header, records)[1] if p.state == "done"]
    if not finished:
        return "No part has finished its test runs yet."
    tests = [trial_from_record(r) for r in records if r["phase"] == "test"]
    names = endpoints()
    rows = []
    for part in finished:
        mine = [t for t in tests if t.method == part.method and t.steps == part.steps]
        # A part's test runs all use its chosen setting; a record at another setting (a part
        # chosen again after more tuning) is not one of them.
        runs = [t for t in mine if t.setting == mine[-1].setting]
        rows.append([f"{part.method}, {part.steps} steps", len(runs)]
                    + [_interval(summary(runs, part.method, part.steps, name)) for name in names])
    return _table(["part", "test seeds"] + [get(name).label for name in names], rows)


# The figures a study probe run keeps, in the probe table's order, with their headings:
# pipelines.study.trial's PROBE_FIGURES (a floor above this module; tests/evaluation/
# test_study_provenance.py ties them). A column no probe of the ledger recorded is left out (the
# twin against the control came after study f6fd98fb4b02).
PROBE_COLUMNS = {"update_cosine_median": "update cosine vs control", "scalar_twin_cosine_median": "vs scalar twin",
                 "update_relative_difference_median": "relative difference",
                 "twin_control_cosine_median": "twin vs control"}


def ledger_probes(header: dict | None, records: Sequence[dict]) -> str:
    """docs/study.md's table of the probes the ledger holds, one per part at its chosen setting
    (``probe`` runs: after the part's test runs), with the probe code's setup fingerprint."""
    if header is None:
        return "No study has begun: the ledger is empty."
    probes = [trial_from_record(r) for r in records if r["phase"] == "probe"]
    if not probes:
        return "No chosen setting has been probed yet."
    probed_setup(probes)                      # one probe code, or no table
    shown = [name for name in PROBE_COLUMNS if any(t.metrics.get(name) is not None for t in probes)]
    return _table(["part", "chosen setting", "verdict", *(PROBE_COLUMNS[name] for name in shown), "probe setup"],
                  [[f"{t.method}, {t.steps} steps", _setting(t.setting),
                    "effective" if t.metrics.get("effective") else "inert",
                    *(_number(t.metrics.get(name), 3) for name in shown), f"`{t.setup}`"] for t in probes])


def readme_block(study: dict) -> str:
    """The README's headline from ``metrics/study.json``: the verdict in one sentence, where each
    GRIT method differs significantly from LoRA (metric by run length), the main figures at the
    longest run length, and where the full report is (chosen settings, every trial and test)."""
    if study.get("status") != "complete":
        return ("The fair study (each method tuned on validation loss, 5 seeds, two run lengths; "
                "[docs/study.md](docs/study.md)) has not been completed in this repository yet, so the "
                "headline below is the default run's: one learning rate, one seed, one run length.")

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
    # The figures at the longest run length only: the table above has every run length's
    # differences, and the report every run length's figures.
    steps = max(study["steps"])
    others = [str(s) for s in study["steps"] if s != steps]
    figures = (f"At {steps} steps (mean [95% interval] over {study['seeds']} seeds"
               + (f"; at {' and '.join(others)} steps in the report" if others else "") + "):\n\n"
               + _table(["metric", *methods],
                        [[get(metric).label, *(cell(metric, study["summary"][f"{m}@{steps}"].get(metric))
                                               for m in methods)] for metric in shown]))
    # Name the run and profile: a rehearsal profile (smoke) writes the same files, and a reader
    # must be able to tell its numbers from the study's.
    source = f"Study run `{study['run_id']}`, profile `{study['profile']}`. " if "run_id" in study else ""
    # A study recorded before the headline was kept apart has only the long verdict.
    return "\n\n".join([f"**{study.get('headline', study['verdict'])}**",
                         *significance_block([paired_test_from_record(t) for t in study.get("tests", [])],
                                             shown, study["steps"]),
                         figures,
                         f"{source}Each method's chosen setting, every trial, test and plot: "
                         "[reports/study/report.md](reports/study/report.md)."])


def significance_block(tests: Sequence[PairedTest], metrics: Sequence[str], run_lengths: Sequence[int]) -> list[str]:
    """Where a method differs significantly from its control, metric by run length, with the
    direction and the mean difference: the findings of the verdict laid out so a reader can see
    the pattern (one metric at every run length, or one method everywhere), then the same as a
    picture (:func:`plot_differences`). Empty without tests."""
    if not tests:
        return []
    controls = sorted({t.control for t in tests})
    against = (lambda t: f" vs {t.control}") if len(controls) > 1 else (lambda t: "")

    def cell(metric: str, steps: int) -> str:
        found = {True: [], False: []}
        for t in tests:
            if t.metric == metric and t.steps == steps and t.better() is not None:
                found[t.better()].append(f"{t.method}{against(t)} {t.delta.value:+.3g}")
        words = [f"{'better' if way else 'worse'}: {', '.join(found[way])}" for way in (True, False) if found[way]]
        return "; ".join(words) or "none"

    intro = (f"Differences from {', '.join(f'`{c}`' for c in controls)} that count, each method at its "
             f"validation-tuned setting for the run length (method minus control; Holm p < 0.05 over all "
             f"{len(tests)} paired tests and at least the metric's smallest effect of interest; \"none\": no "
             "method differs by that much):")
    return [intro, _table(["metric", *(f"{steps} steps" for steps in run_lengths)],
                          [[get(metric).label, *(cell(metric, steps) for steps in run_lengths)]
                           for metric in metrics if any(t.metric == metric for t in tests)]),
            "![each method's paired difference from its control by run length; filled: significant]"
            "(reports/study/differences_by_steps.png)"]


def _ledger(sources: Sources) -> tuple[dict | None, list[dict]]:
    header = sources.text(f"{LEDGER_DIR}/{STUDY_FILE}")
    return json.loads(header) if header else None, jsonl_records(sources.text(f"{LEDGER_DIR}/{TRIALS_FILE}"))


def reported_study(sources: Sources) -> dict:
    """The committed study metrics (``metrics/study.json``), empty when there are none."""
    text = sources.text("metrics/study.json")
    return json.loads(text) if text else {}


# Here rather than with the other page blocks (evaluation/doc_figures.py): the study stage
# rewrites them after each trial, and must not depend on what renders the default run's pages.
PROGRESS_BLOCKS = (
    DocBlock("study_progress", "README.md", lambda s: ledger_progress(*_ledger(s), reported=reported_study(s))),
    DocBlock("study_parts", "docs/study.md", lambda s: ledger_parts_table(*_ledger(s))),
    DocBlock("study_finished", "docs/study.md", lambda s: ledger_finished_parts(*_ledger(s))),
    DocBlock("study_probes", "docs/study.md", lambda s: ledger_probes(*_ledger(s))),
)
