"""DVC stage ``study``: does GRIT beat LoRA when each is tuned? (docs/study.md)

Reads the ``study`` section and, for every run length of ``study.steps`` and every method,
trains through ``pipelines/study_worker.py`` (one process per method and job):

1. tuning: Optuna asks ``study.configurations`` configurations of the method's declared space
   (``evaluation/tuning.py``), each trained on ``train.seed`` and judged on the validation split
   only; the successive-halving pruner stops the weak ones early. A chosen learning rate at the
   edge of its range widens the range and tunes again (``study.edge_extensions`` times at most);
2. selection: the ``study.finalists`` best configurations re-run with ``study.finalist_seeds``
   more seeds; the method's setting is the finalist with the lowest mean validation loss;
3. test: every method at its chosen setting, ``study.seeds`` seeds from ``study.test_seed`` on
   (never a seed selection saw), measured on the test split and the held-out test sets; GRIT
   methods against their controls by the paired test over seeds (and prompts), Holm.

Every trial is a row of ``study_trials`` in the results store as soon as it finishes, and
Optuna's journal lives in the same store (``tuning_journal``): a killed study resumes where it
stopped. Writes ``reports/study/`` (report.md, plots, trials.csv) and ``metrics/study.json``. With
``study.methods`` empty (the default profile) the stage trains nothing and keeps the last
study's report.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.errors import StoppedEarly, UserError
from core.files import atomic_write_json, atomic_write_text
from db.models import StudyTrial
from db.study_ledger import Ledger, open_ledger
from db.tuning_journal import append_journal, journal_logs, journals_under
from evaluation.config import seeds_for_testing, tuning_seeds
from evaluation.study import Trial
from evaluation.tuning import (
    Dimension,
    Scored,
    at_edge,
    choose_finalist,
    extended,
    finalists,
    search_space,
    setting_key,
)
from pipelines import study_worker
from pipelines.params import Params, require_text_model
from pipelines.paths import DATA_DIR
from pipelines.stage import StageContext, git_revision, run_stage, stage_params
from trainers.base_model import check_optimizer_runtime
from trainers.config import variant_grit

REPORT_DIR = Path("reports/study")
LEDGER_DIR = REPORT_DIR / "ledger"
METRICS = Path("metrics/study.json")


@dataclass(frozen=True)
class Sitting:
    """One sitting of the study: the stage's context, the study's ledger (what every sitting has
    done, committed), and when to stop asking for new trials (``None``: when the study is done)."""

    ctx: StageContext
    ledger: Ledger
    deadline: float | None = None

    def over(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


def declared_study_params(params: Params, root: Path) -> dict[str, Any]:
    """The values of the params the study stage declares in ``dvc.yaml`` (what DVC re-runs it
    for); every param where there is no ``dvc.yaml`` to say."""
    dumped = params.model_dump(mode="json")
    keys = stage_params(root).get("study")
    if not keys:
        return dumped
    declared: dict[str, Any] = {}
    for key in keys:
        value, node = dumped, declared
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return declared


def method_space(params: Params, method: str) -> list[Dimension]:
    """The declared space of ``method`` (``evaluation.tuning.search_space``)."""
    variant, study = params.variants[method], params.study
    budget_cadence = variant.grit and variant_grit(params.grit, variant).cadence == "budget"
    return search_space(variant.grit, budget_cadence, study.learning_rate_range, study.damping_range,
                        study.reprojection_warmup_range, study.energy_range)


def tuning_name(key: str, method: str, steps: int, extension: int) -> str:
    """The Optuna study of one method's tuning at one run length (and range extension); ``key``
    is the study's (its ledger's), which outlives a run id across sittings."""
    return f"{key}/{method}/{steps}" + (f"/extended-{extension}" if extension else "")


def as_trial(row: StudyTrial) -> Trial:
    metrics = json.loads(row.metrics_json)
    return Trial(row.phase, row.method, row.steps, row.seed, json.loads(row.setting), row.val_loss,
                 [tuple(p) for p in json.loads(row.curve_json)], metrics.pop("figures", metrics),
                 row.train_seconds, row.tokens_per_second, row.trainable_parameters,
                 per_prompt=metrics.get("per_prompt", {}), stopped_at=metrics.get("stopped_at"))


def recorded_trials(ctx: StageContext) -> list[Trial]:
    with ctx.store.reader() as session:
        rows = session.scalars(select(StudyTrial).where(StudyTrial.run_id == ctx.run_id)).all()
        return [as_trial(r) for r in rows]


def identity(trial: dict | Trial) -> tuple:
    """What makes a trial the same trial: a planned spec (dict) or a recorded ``Trial``."""
    fields = trial if isinstance(trial, dict) else vars(trial)
    return fields["phase"], fields["method"], fields["steps"], fields["seed"], setting_key(fields["setting"])


def store_trial(ctx: StageContext, result: dict) -> None:
    """One finished trial into the store, in its own transaction (a later failure leaves it recorded)."""
    with ctx.store.transaction() as session:
        ctx.store.replace_rows(session, StudyTrial, ctx.run_id, [{
            "val_loss": result["val_loss"], "curve_json": json.dumps(result["curve"]),
            # What has no column rides with the figures: the trial's wall time, its per-prompt
            # values, where the pruner stopped it and which Optuna study asked for it.
            "metrics_json": json.dumps({"figures": {**result["metrics"], "trial_seconds": result.get("trial_seconds")},
                                        "per_prompt": result.get("per_prompt", {}),
                                        "stopped_at": result.get("stopped_at"), "tuning": result.get("tuning", "")}),
            "train_seconds": result["train_seconds"],
            "tokens_per_second": result["tokens_per_second"],
            "trainable_parameters": result["trainable_parameters"]}],
            phase=result["phase"], method=result["method"], steps=result["steps"], seed=result["seed"],
            setting=setting_key(result["setting"]))


def record(sitting: Sitting, result: dict) -> None:
    """One finished trial into the store and the ledger, with the code and host that trained it,
    and Optuna's journals as they now stand."""
    ctx = sitting.ctx
    store_trial(ctx, result)
    sitting.ledger.add_trial({**result, "revision": git_revision(ctx.root), "host": os.uname().nodename})
    sitting.ledger.set_journals(journals_under(ctx.store, f"{sitting.ledger.key}/"))


def restore(sitting: Sitting) -> None:
    """Put into the store what the ledger holds and the store lacks: the trials of earlier
    sittings (under this run) and the journals of their tunings."""
    ctx, ledger = sitting.ctx, sitting.ledger
    done = {identity(t) for t in recorded_trials(ctx)}
    missing = [r for r in ledger.trials if identity(r) not in done]
    for result in missing:
        store_trial(ctx, result)
    for name, logs in ledger.journals.items():
        mine = journal_logs(ctx.store, name)
        if logs[:len(mine)] == mine:
            append_journal(ctx.store, name, logs[len(mine):])
        else:
            print(f"[study] the store's journal of {name} is not the ledger's; the store's is kept")
    print(f"[study] {ledger.note}; {len(missing)} put into this store")


def stop_if_over(sitting: Sitting) -> None:
    if sitting.over():
        raise StoppedEarly(f"the sitting's time is up: {progress(sitting)}. The ledger ({LEDGER_DIR}/) holds "
                           f"every finished trial: commit it, then run `python -m pipelines.study --sitting "
                           f"MINUTES` (or `dvc repro study`) again, on any machine, to go on")


def progress(sitting: Sitting) -> str:
    """How far the study is: tuning configurations, finalist and test runs, by phase, and the
    compute they took."""
    study, trials = sitting.ctx.params.study, recorded_trials(sitting.ctx)
    cells = len(study.methods) * len(study.steps)
    planned = {"tune": cells * study.configurations,
               "finalist": cells * study.finalists * (study.finalist_seeds + 1), "test": cells * study.seeds}
    done = {phase: sum(t.phase == phase for t in trials) for phase in planned}
    hours = sum(t.metrics.get("trial_seconds") or t.train_seconds for t in trials) / 3600
    return (f"{done['tune']} tuning configurations (of at least {planned['tune']}), {done['finalist']} finalist "
            f"runs (of at most {planned['finalist']}), {done['test']} of {planned['test']} test runs done, "
            f"{hours:.2f} h of compute")


def run_job(sitting: Sitting, job: dict) -> None:
    """One worker process for ``job``; its trials are recorded as they land, so a kill loses at
    most the trial in progress. The worker starts no trial after the sitting's deadline."""
    import yaml

    ctx = sitting.ctx
    job = {**job, "deadline": sitting.deadline}
    with tempfile.TemporaryDirectory(prefix=f"study-{job['method']}-") as scratch:
        params_file, job_file, results_file = (Path(scratch) / n for n in ("params.yaml", "job.json", "results.jsonl"))
        params_file.write_text(yaml.safe_dump(ctx.params.model_dump(mode="json"), sort_keys=False))
        job_file.write_text(json.dumps(job))
        worker = subprocess.Popen([sys.executable, "-m", study_worker.__name__, "--params", str(params_file),
                                   "--job", str(job_file), "--results", str(results_file)], cwd=ctx.root)
        seen = 0
        while True:
            finished = worker.poll() is not None
            lines = results_file.read_text().splitlines() if results_file.is_file() else []
            for line in lines[seen:]:
                record(sitting, json.loads(line))
            seen = len(lines)
            if finished:
                break
            time.sleep(1.0)
        if worker.returncode != 0:
            raise RuntimeError(f"study {job['kind']} job of {job['method']} failed (exit {worker.returncode}); "
                               "see the log above")
    stop_if_over(sitting)


def run_fixed(sitting: Sitting, specs: list[dict]) -> None:
    """Run the fixed trials of ``specs`` the store does not hold yet, one worker per method."""
    done = {identity(t) for t in recorded_trials(sitting.ctx)}
    todo = [{**spec, "position": f"{n + 1}/{len(specs)}"} for n, spec in enumerate(specs) if identity(spec) not in done]
    if specs and len(todo) < len(specs):
        print(f"[study] {len(specs) - len(todo)} of {len(specs)} {specs[0]['phase']} runs already recorded")
    for method in dict.fromkeys(spec["method"] for spec in todo):
        run_job(sitting, {"kind": "runs", "method": method, "runs": [s for s in todo if s["method"] == method]})


def tuned(ctx: StageContext, method: str, steps: int) -> list[Trial]:
    return [t for t in recorded_trials(ctx) if t.phase == "tune" and t.method == method and t.steps == steps]


def tune_method(sitting: Sitting, method: str, steps: int) -> list[str]:
    """Optuna tuning of ``method`` at ``steps``, widening an edge learning-rate range; returns
    what the report must say about the ranges."""
    ctx = sitting.ctx
    params, study = ctx.params, ctx.params.study
    space, notes = method_space(params, method), []
    for extension in range(study.edge_extensions + 1):
        name = tuning_name(sitting.ledger.key, method, steps, extension)
        run_job(sitting, {"kind": "tune", "method": method, "steps": steps, "seed": params.train.seed,
                      "tuning": name, "configurations": study.configurations,
                      "space": [asdict(d) for d in space]})
        best = finalists([scored(t) for t in tuned(ctx, method, steps)], 1)[0]
        rate = next(d for d in space if d.name == "learning_rate")
        side = at_edge(rate, best["learning_rate"], study.edge_margin)
        if side is None:
            break
        if extension == study.edge_extensions:
            notes.append(f"{method} at {steps} steps: the chosen learning rate {best['learning_rate']:.3g} is still "
                         f"at the {side} edge of [{rate.low:.3g}, {rate.high:.3g}] after {extension} extension(s)")
            break
        space = [extended(d, side, study.edge_factor) if d.name == "learning_rate" else d for d in space]
        widened = next(d for d in space if d.name == "learning_rate")
        notes.append(f"{method} at {steps} steps: the best learning rate {best['learning_rate']:.3g} lay at the "
                     f"{side} edge of [{rate.low:.3g}, {rate.high:.3g}]; the study widened it to "
                     f"[{widened.low:.3g}, {widened.high:.3g}] and tuned {study.configurations} more configurations")
    return notes


def choose_setting(sitting: Sitting, method: str, steps: int) -> dict[str, float]:
    """The finalists of ``method`` at ``steps`` over the selection seeds; the best on mean
    validation loss."""
    ctx = sitting.ctx
    study, seed = ctx.params.study, ctx.params.train.seed
    tuning = tuned(ctx, method, steps)
    candidates = finalists([scored(t) for t in tuning], study.finalists)
    # A finalist pruned in tuning has no full run on the tuning seed yet: it gets one here.
    ended = {setting_key(t.setting) for t in tuning if not t.pruned}
    seeds = tuning_seeds(seed, study.finalist_seeds)
    run_fixed(sitting, [{"phase": "finalist", "method": method, "steps": steps, "seed": s, "setting": setting}
                        for setting in candidates for s in seeds if s != seed or setting_key(setting) not in ended])
    keys = {setting_key(c) for c in candidates}
    runs = [Scored(t.setting, t.seed, t.val_loss) for t in recorded_trials(ctx)
            if t.method == method and t.steps == steps and setting_key(t.setting) in keys
            and (t.phase == "finalist" or (t.phase == "tune" and not t.pruned and t.seed == seed))]
    setting, mean = choose_finalist(runs)
    print(f"[study] {method} at {steps} steps: chosen on mean validation loss {mean:.4f} over "
          f"{len(seeds)} seeds: {json.dumps(setting, sort_keys=True)}")
    return setting


def scored(trial: Trial) -> Scored:
    """A tuning trial as selection sees it: its last validation loss and the step it was at."""
    reached = trial.stopped_at if trial.pruned else trial.steps
    loss = trial.curve[-1][1] if trial.pruned and trial.curve else trial.val_loss
    return Scored(trial.setting, trial.seed, loss, reached)


def preflight(params: Params) -> None:
    if not params.study.methods:
        return
    require_text_model(params, "study")
    for split in ("validation.jsonl", "test.jsonl"):
        if not (DATA_DIR / split).is_file():
            raise UserError(f"{DATA_DIR / split} is missing; the study needs data.validation_fraction and "
                            "data.test_fraction above 0, then `dvc repro prepare_data`")
    if params.train.nproc_per_node > 1:
        raise UserError("study: trials train on one process; set train.nproc_per_node: 1 for the study")
    check_optimizer_runtime(params.train)


def study(ctx: StageContext, _checked, minutes: float | None = None) -> dict[str, Path]:
    """The whole study, or as much of it as fits in ``minutes`` (a sitting); every sitting
    begins where the ledger says the last one stopped."""
    from evaluation.study_report import write_report

    params = ctx.params
    if not params.study.methods:
        return keep_last_report(ctx)
    started = time.perf_counter()
    sitting = Sitting(ctx, open_ledger(ctx.root / LEDGER_DIR, declared_study_params(params, ctx.root)),
                      None if minutes is None else time.time() + 60 * minutes)
    restore(sitting)
    print(f"[study] so far: {progress(sitting)}")
    chosen: dict[tuple[str, int], dict[str, float]] = {}
    notes: list[str] = []
    for steps in params.study.steps:
        for method in params.study.methods:
            notes += tune_method(sitting, method, steps)
            chosen[(method, steps)] = choose_setting(sitting, method, steps)
    seeds = seeds_for_testing(params.study.test_seed, params.study.seeds)
    run_fixed(sitting, [{"phase": "test", "method": method, "steps": steps, "seed": seed,
                     "setting": chosen[(method, steps)]}
                    for steps in params.study.steps for seed in seeds for method in params.study.methods])
    trials = recorded_trials(ctx)
    trials = [t for t in trials if t.phase != "test" or t.setting == chosen[(t.method, t.steps)]]
    return write_report(ctx.root / REPORT_DIR, ctx.root / METRICS, params, trials, chosen, notes,
                        stage_seconds=time.perf_counter() - started, run_id=ctx.run_id)


def sitting_argument(argv: list[str] | None) -> tuple[float | None, list[str]]:
    """``--sitting MINUTES``: start no trial after that many minutes, then stop (exit 3) with the
    ledger up to date; without it the study runs to its end."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--sitting", type=float, default=None, metavar="MINUTES")
    known, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    if known.sitting is not None and known.sitting <= 0:
        raise SystemExit("error: --sitting takes a positive number of minutes")
    return known.sitting, rest


def main(argv: list[str] | None = None) -> int:
    minutes, rest = sitting_argument(argv)
    return run_stage("study", functools.partial(study, minutes=minutes), preflight=preflight, argv=rest)


def keep_last_report(ctx: StageContext) -> dict[str, Path]:
    """No study in this profile: the last study's report stays; a first run writes a note."""
    report = ctx.root / REPORT_DIR / "report.md"
    if not report.is_file():
        atomic_write_text(report, "# Study not run\n\nThis profile lists no `study.methods`. Run the study with\n"
                                  "`python -m pipelines.profile study && dvc repro study` (docs/study.md).\n")
    if not (ctx.root / METRICS).is_file():
        atomic_write_json(ctx.root / METRICS, {"status": "not run"})
    print(f"[study] study.methods is empty in profile {ctx.params.profile}: nothing trained; "
          f"{REPORT_DIR / 'report.md'} is the last study's report")
    return {}


if __name__ == "__main__":
    raise SystemExit(main())
