"""DVC stage ``study``: does GRIT beat LoRA when each is tuned? (docs/study.md)

Reads the ``study`` section (methods, search space, trials, seeds, budgets) and trains, through
``pipelines/study_worker.py`` (one process per method and phase):

1. tuning: ``study.trials`` settings per method drawn from its declared search space, at the
   first budget and ``train.seed``; each judged on the validation split only;
2. selection: each method's setting = its trial with the lowest validation loss;
3. test: every method at its chosen setting, ``study.seeds`` seeds x every budget, measured on the
   held-out test sets; GRIT methods against every LoRA method by the paired t over seeds, Holm.

Every trial is a row of ``study_trials`` in the results store as soon as it finishes; a killed
study resumes at the first trial the store does not hold. Writes ``reports/study/`` (report.md,
plots, trials.csv) and ``metrics/study.json``. With ``study.methods`` empty (the default
profile) the stage trains nothing and keeps the last study's report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from core.errors import UserError
from core.files import atomic_write_json, atomic_write_text
from db.models import StudyTrial
from evaluation.study import Trial, choose_setting, draw_settings, search_space, setting_key
from pipelines import study_worker
from pipelines.params import Params, require_text_model
from pipelines.paths import DATA_DIR
from pipelines.stage import StageContext, run_stage

REPORT_DIR = Path("reports/study")
METRICS = Path("metrics/study.json")


def tuning_plan(params: Params) -> list[dict]:
    """Every method's tuning trials: the same number, each from its own declared space."""
    study = params.study
    plan = []
    for method in study.methods:
        space = search_space(params.variants[method].grit, study.learning_rate_range, study.damping_range)
        plan += [{"phase": "tune", "method": method, "budget": study.budgets[0], "seed": params.train.seed,
                  "setting": setting} for setting in draw_settings(space, study.trials, study.seed)]
    return plan


def test_plan(params: Params, chosen: dict[str, dict[str, float]]) -> list[dict]:
    """Every method at its chosen setting, for every seed and budget (seeds follow train.seed)."""
    study = params.study
    return [{"phase": "test", "method": method, "budget": budget, "seed": params.train.seed + k,
             "setting": chosen[method]}
            for budget in study.budgets for k in range(study.seeds) for method in study.methods]


def as_trial(row: StudyTrial) -> Trial:
    return Trial(row.phase, row.method, row.budget, row.seed, json.loads(row.setting), row.val_loss,
                 [tuple(p) for p in json.loads(row.curve_json)], json.loads(row.metrics_json), row.train_seconds,
                 row.tokens_per_second, row.trainable_parameters)


def recorded_trials(ctx: StageContext) -> list[Trial]:
    with ctx.store.reader() as session:
        rows = session.scalars(select(StudyTrial).where(StudyTrial.run_id == ctx.run_id)).all()
        return [as_trial(r) for r in rows]


def identity(trial: dict | Trial) -> tuple:
    """What makes a trial the same trial: a planned spec (dict) or a recorded ``Trial``."""
    fields = trial if isinstance(trial, dict) else vars(trial)
    return fields["phase"], fields["method"], fields["budget"], fields["seed"], setting_key(fields["setting"])


def record(ctx: StageContext, result: dict) -> None:
    """One finished trial, in its own transaction (a later failure leaves it recorded)."""
    with ctx.store.transaction() as session:
        ctx.store.replace_rows(session, StudyTrial, ctx.run_id, [{
            "val_loss": result["val_loss"], "curve_json": json.dumps(result["curve"]),
            # The trial's wall time (training plus measuring) rides with its metrics: no new column.
            "metrics_json": json.dumps({**result["metrics"], "trial_seconds": result.get("trial_seconds")}),
            "train_seconds": result["train_seconds"],
            "tokens_per_second": result["tokens_per_second"],
            "trainable_parameters": result["trainable_parameters"]}],
            phase=result["phase"], method=result["method"], budget=result["budget"], seed=result["seed"],
            setting=setting_key(result["setting"]))


def run_trials(ctx: StageContext, plan: list[dict]) -> int:
    """Run the trials of ``plan`` the store does not hold yet, one worker process per method;
    returns how many it ran."""
    import yaml

    done = {identity(t) for t in recorded_trials(ctx)}
    todo = [{**spec, "position": f"{n + 1}/{len(plan)}"}            # for the progress lines
            for n, spec in enumerate(plan) if identity(spec) not in done]
    if len(todo) < len(plan):
        print(f"[study] {len(plan) - len(todo)} of {len(plan)} {plan[0]['phase']} trials already recorded")
    for method in dict.fromkeys(spec["method"] for spec in todo):
        specs = [spec for spec in todo if spec["method"] == method]
        with tempfile.TemporaryDirectory(prefix=f"study-{method}-") as scratch:
            params_file, trials_file, results_file = (Path(scratch) / n for n in ("params.yaml", "trials.json",
                                                                                    "results.jsonl"))
            params_file.write_text(yaml.safe_dump(ctx.params.model_dump(mode="json"), sort_keys=False))
            trials_file.write_text(json.dumps(specs))
            worker = subprocess.Popen([sys.executable, "-m", study_worker.__name__, "--params", str(params_file),
                                       "--trials", str(trials_file), "--results", str(results_file)], cwd=ctx.root)
            # Record each trial as it lands, so a kill loses at most the trial in progress.
            seen = 0
            while True:
                finished = worker.poll() is not None
                lines = results_file.read_text().splitlines() if results_file.is_file() else []
                for line in lines[seen:]:
                    record(ctx, json.loads(line))
                seen = len(lines)
                if finished:
                    break
                time.sleep(1.0)
            if worker.returncode != 0:
                raise RuntimeError(f"study trials of {method} failed (exit {worker.returncode}); see the log above")
    return len(todo)


def preflight(params: Params) -> None:
    if not params.study.methods:
        return
    require_text_model(params, "study")
    if not (DATA_DIR / "validation.jsonl").is_file():
        raise UserError(f"{DATA_DIR / 'validation.jsonl'} is missing; run `dvc repro prepare_data` first")
    if params.train.nproc_per_node > 1:
        raise UserError("study: trials train on one process; set train.nproc_per_node: 1 for the study")


def study(ctx: StageContext, _checked) -> dict[str, Path]:
    from evaluation.study_report import write_report

    params = ctx.params
    if not params.study.methods:
        return keep_last_report(ctx)
    started = time.perf_counter()
    ran = run_trials(ctx, tuning_plan(params))
    tuned = recorded_trials(ctx)
    chosen = {m: choose_setting(t for t in tuned if t.phase == "tune" and t.method == m).setting
              for m in params.study.methods}
    for method, setting in chosen.items():
        print(f"[study] {method}: chosen on validation loss: {json.dumps(setting, sort_keys=True)}")
    ran += run_trials(ctx, test_plan(params, chosen))
    trials = [t for t in recorded_trials(ctx) if t.phase == "tune" or t.setting == chosen[t.method]]
    return write_report(ctx.root / REPORT_DIR, ctx.root / METRICS, params, trials, chosen,
                        stage_seconds=time.perf_counter() - started, run_id=ctx.run_id, trials_run=ran)


def main(argv: list[str] | None = None) -> int:
    return run_stage("study", study, preflight=preflight, argv=argv)


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
