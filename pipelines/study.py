"""DVC stage ``study``: does GRIT beat LoRA when each is tuned? (docs/study.md)

Reads the ``study`` section and, for every run length of ``study.steps`` and every method,
trains through ``pipelines/study_worker.py`` (one process per method and job):

1. tuning: Optuna asks ``study.configurations`` configurations of the method's declared space
   (``evaluation/tuning.py``), the first its published defaults (trained to the end), each
   trained on ``train.seed`` and judged on the validation split only; the successive-halving
   pruner stops the weak ones early, at rungs where every method's mechanism has acted. A best
   setting at the edge of any tuned range widens that range within its hard limit and tunes
   again (``study.edge_extensions`` times at most);
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
import hashlib
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
from db.study_claims import (
    Heartbeat,
    claim_cell,
    finish_cell,
    held_cells,
    open_cells,
    release_cell,
    settle_cell,
)
from db.study_ledger import LEDGER_DIR, Ledger, data_fingerprint, open_ledger
from db.tuning_journal import append_journal, journal_logs, journals_under
from evaluation.config import HARD_LIMITS, seeds_for_testing, tuning_seeds
from evaluation.study import PHASES, Trial, planned_runs, remaining_note, study_progress, trial_from_record
from evaluation.tuning import (
    Dimension,
    Scored,
    choose_finalist,
    edges,
    finalists,
    search_space,
    setting_key,
    widen,
    widens,
)
from pipelines import study_worker
from pipelines.params import Params, require_text_model
from pipelines.paths import DATA_DIR
from pipelines.stage import (
    EXIT_STOPPED_EARLY,
    StageContext,
    git_revision,
    run_stage,
    stage_arguments,
    stage_params,
)
from pipelines.study_worker import configurations_finished, store_trial, stored_result
from trainers.config import variant_grit
from trainers.hardware import check_hardware

REPORT_DIR = Path("reports/study")
METRICS = Path("metrics/study.json")
LEDGER_CELL = "ledger"            # the claim on restoring the committed ledger into the store


@dataclass(frozen=True)
class Sitting:
    """One sitting of the study: the stage's context, the study's ledger (what every sitting has
    done, committed), and when to stop asking for new trials (``None``: when the study is done)."""

    ctx: StageContext
    ledger: Ledger
    deadline: float | None = None
    worker: str | None = None            # a study worker's name (host:pid); None: the study stage itself
    workers: int = 1                     # local study workers this sitting runs (said again in its end message)
    stale_after: float = 120.0           # a claim whose worker has not beaten for this long is free again

    def over(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


def prepared_data(root: Path) -> str | None:
    """The fingerprint of the prepared data (``artifacts/data``), or None before ``prepare_data``."""
    manifest = root / DATA_DIR / "manifest.json"
    return data_fingerprint(json.loads(manifest.read_text())["files"]) if manifest.is_file() else None


def check_same_data(ledger: Ledger, data: str | None) -> None:
    """Say it plainly when this host prepared other data than the study began on: the base
    model's greedy answers (the benign training targets) can differ between CPUs. Trials go on,
    each recorded with its data's fingerprint, and the pages count them per fingerprint."""
    if ledger.data and data and ledger.data != data:
        print(f"[study] warning: the data prepared here ({data}) differ from the data study {ledger.key} began on "
              f"({ledger.data}); every trial records its data, and the README and docs/study.md count the trials "
              "per data fingerprint", flush=True)


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


def published_defaults(params: Params, method: str, space: list[Dimension]) -> dict[str, float]:
    """The setting ``method`` is published with, in its tuned dimensions: LoRA's customary learning
    rate (``study.default_learning_rate``) and, for GRIT, the variant's own damping (the paper's
    1e-3), eigen-energy (tau 0.99) and reprojection warm-up (the cadence rule's share of the run);
    what is not tuned (two-sided reprojection, the minimum rank) the variant fixes."""
    variant = params.variants[method]
    grit = variant_grit(params.grit, variant) if variant.grit else None
    return {d.name: params.study.default_learning_rate if d.name == "learning_rate" else float(getattr(grit, d.name))
            for d in space}


def tuning_name(prefix: str, steps: int, extension: int) -> str:
    """The Optuna study of one method's tuning at one run length (and range extension); ``prefix``
    is the method's in the study's ledger (``Ledger.tuning``), which outlives a run id across
    sittings."""
    return f"{prefix}/{steps}" + (f"/extended-{extension}" if extension else "")


def as_trial(row: StudyTrial) -> Trial:
    return trial_from_record(stored_result(row))


def recorded_trials(ctx: StageContext) -> list[Trial]:
    with ctx.store.reader() as session:
        rows = session.scalars(select(StudyTrial).where(StudyTrial.run_id == ctx.run_id)
                               .order_by(StudyTrial.id)).all()     # recorded order: the pace is the latest trials'
        return [as_trial(r) for r in rows]


def identity(trial: dict | Trial) -> tuple:
    """What makes a trial the same trial: a planned spec (dict) or a recorded ``Trial``."""
    fields = trial if isinstance(trial, dict) else vars(trial)
    return fields["phase"], fields["method"], fields["steps"], fields["seed"], setting_key(fields["setting"])


def record(sitting: Sitting, result: dict) -> None:
    """One finished trial (the worker that trained it recorded it in the store) into the ledger,
    with Optuna's journals as they now stand. A study worker leaves the ledger to the step that
    writes the report (several processes rewriting one file would lose trials)."""
    if sitting.worker is None:
        sitting.ledger.add_trial(result)
        sitting.ledger.set_journals(journals_under(sitting.ctx.store, f"{sitting.ledger.key}/"))
        show_progress(sitting.ctx.root)


def sync_ledger(sitting: Sitting) -> None:
    """Add to the ledger the trials study workers recorded in the store, and the journals."""
    ledger = sitting.ledger
    known = {identity(r) for r in ledger.trials}
    with sitting.ctx.store.reader() as session:
        rows = session.scalars(select(StudyTrial).where(StudyTrial.run_id == sitting.ctx.run_id)
                               .order_by(StudyTrial.id)).all()
    added = [result for result in map(stored_result, rows) if identity(result) not in known]
    for result in added:
        ledger.add_trial(result)
    ledger.set_journals(journals_under(sitting.ctx.store, f"{ledger.key}/"))
    show_progress(sitting.ctx.root)
    if added:
        print(f"[study] {len(added)} trials recorded by study workers added to the ledger")


def restore(sitting: Sitting) -> None:
    """Put into the store what the ledger holds and the store lacks: the trials of earlier
    sittings (under this run) and the journals of their tunings."""
    ctx, ledger = sitting.ctx, sitting.ledger
    done = {identity(t) for t in recorded_trials(ctx)}
    missing = [r for r in ledger.trials if identity(r) not in done]
    for result in missing:
        store_trial(ctx.store, ctx.run_id, result)
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
                           f"every finished trial, and README.md and docs/study.md say how far the study is: "
                           f"commit them (`git add {LEDGER_DIR} README.md docs/study.md`), then run "
                           f"`{again_command(sitting.workers)}` (or `dvc repro study`) again, on any machine, to go on")


def again_command(workers: int) -> str:
    """The command that goes on with the study as this sitting ran it (its workers included)."""
    return "python -m pipelines.study" + (f" --workers {workers}" if workers > 1 else "") + " --sitting MINUTES"


def progress(sitting: Sitting) -> str:
    """How far the study is: parts done, tuning configurations, finalist and test runs, and the
    compute they took."""
    study = sitting.ctx.params.study
    planned = planned_runs(study.configurations, study.finalists, study.finalist_seeds, study.seeds)
    trials = recorded_trials(sitting.ctx)
    parts = study_progress(study.methods, study.steps, planned, trials)
    done = {phase: sum(p.done[phase] for p in parts) for phase in PHASES}
    left = remaining_note(parts, trials)
    return (f"{sum(p.state == 'done' for p in parts)} of {len(parts)} parts done; {done['tune']} tuning "
            f"configurations (of at least {len(parts) * planned['tune']}), {done['finalist']} finalist runs (of at "
            f"most {len(parts) * planned['finalist']}), {done['test']} of {len(parts) * planned['test']} test runs, "
            f"{sum(p.hours for p in parts):.2f} h of compute" + (f", {left}" if left else ""))


def show_progress(root: Path) -> None:
    """Rewrite the blocks that say how far the study is (README.md and docs/study.md) from the
    ledger as it now stands, so that a sitting's commit of the ledger carries pages that agree."""
    from core.doc_blocks import Sources
    from evaluation.study_report import PROGRESS_BLOCKS

    for block in PROGRESS_BLOCKS:
        page = root / block.page
        text = page.read_text() if page.is_file() else ""
        if block.begin in text:
            atomic_write_text(page, block.rendered_into(text, Sources(root)))


def run_job(sitting: Sitting, job: dict) -> None:
    """One worker process for ``job``; its trials are recorded as they land, so a kill loses at
    most the trial in progress. The worker starts no trial after the sitting's deadline."""
    import yaml

    ctx = sitting.ctx
    job = {**job, "deadline": sitting.deadline, "run_id": ctx.run_id, "revision": git_revision(ctx.root),
           "data": prepared_data(ctx.root)}
    with tempfile.TemporaryDirectory(prefix=f"study-{job['method']}-") as scratch:
        params_file, job_file, results_file = (Path(scratch) / n for n in ("params.yaml", "job.json", "results.jsonl"))
        params_file.write_text(yaml.safe_dump(ctx.params.model_dump(mode="json"), sort_keys=False))
        job_file.write_text(json.dumps(job))
        worker = subprocess.Popen([sys.executable, "-m", study_worker.__name__, "--params", str(params_file),
                                   "--job", str(job_file), "--results", str(results_file)], cwd=ctx.root,
                                  env={**os.environ, study_worker.STUDY_PARENT: str(os.getpid())})
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
    """Run the fixed trials of ``specs`` the store does not hold yet: the study stage itself in
    one worker process per method; a study worker run by run, each run claimed, so that a
    worker with no part of its own left takes runs of a part another worker holds."""
    done = {identity(t) for t in recorded_trials(sitting.ctx)}
    todo = [{**spec, "position": f"{n + 1}/{len(specs)}"} for n, spec in enumerate(specs) if identity(spec) not in done]
    if specs and len(todo) < len(specs):
        print(f"[study] {len(specs) - len(todo)} of {len(specs)} {specs[0]['phase']} runs already recorded")
    if sitting.worker is not None:
        run_claimed(sitting, todo)
        return
    for method in dict.fromkeys(spec["method"] for spec in todo):
        run_job(sitting, {"kind": "runs", "method": method, "runs": [s for s in todo if s["method"] == method]})


def run_claim(spec: dict) -> str:
    """The name of the claim on one fixed run (a finalist or test run) of a part."""
    setting = hashlib.sha256(setting_key(spec["setting"]).encode()).hexdigest()[:12]
    return f"{spec['method']}/{spec['steps']}/{spec['phase']}/{spec['seed']}/{setting}"


def tuned_claim(method: str, steps: int) -> str:
    """Done once the part's tuning is: from then on its runs are fixed, and any worker may take them."""
    return f"{method}/{steps}/tuned"


def run_claimed(sitting: Sitting, todo: list[dict]) -> None:
    """A study worker's share of ``todo``: it claims a run nobody holds, trains it, and goes on
    until every run of ``todo`` is recorded, whoever trained it (a selection or a report needs
    them all)."""
    ctx = sitting.ctx

    def recorded() -> set[tuple]:
        return {identity(t) for t in recorded_trials(ctx)}

    while runs := [spec for spec in todo if identity(spec) not in recorded()]:
        spec = next((s for s in runs if claim_cell(ctx.store, ctx.run_id, run_claim(s), sitting.worker,
                                                   sitting.stale_after)), None)
        if spec is None:                  # the rest is in training on other workers: wait for it
            wait_for_others(sitting)
            continue
        name = run_claim(spec)
        try:
            if identity(spec) not in recorded():     # not recorded by another worker between the look and the claim
                with Heartbeat(ctx.store, ctx.run_id, name, sitting.worker, every=sitting.stale_after / 4):
                    run_job(sitting, {"kind": "runs", "method": spec["method"], "runs": [spec]})
        finally:
            if identity(spec) not in recorded():
                release_cell(ctx.store, ctx.run_id, name, sitting.worker)    # the sitting ended first
            else:
                finish_cell(ctx.store, ctx.run_id, name, sitting.worker)


def wait_for_others(sitting: Sitting) -> None:
    """What is left is held by live workers: stop if the sitting is over, else wait a while
    (a quarter of the stale time at most) before looking again."""
    stop_if_over(sitting)
    time.sleep(min(10.0, sitting.stale_after / 4))


def tuned(ctx: StageContext, method: str, steps: int) -> list[Trial]:
    return [t for t in recorded_trials(ctx) if t.phase == "tune" and t.method == method and t.steps == steps]


def tune_method(sitting: Sitting, method: str, steps: int) -> tuple[list[str], list[Dimension]]:
    """Optuna tuning of ``method`` at ``steps``; a best setting at the edge of any tuned range
    widens that range (within its hard limit) and tunes again, ``study.edge_extensions`` times at
    most. Returns what the report must say about the ranges, and the space as last searched."""
    ctx = sitting.ctx
    params, study = ctx.params, ctx.params.study
    space, notes = method_space(params, method), []
    for extension in range(study.edge_extensions + 1):
        name = tuning_name(sitting.ledger.tuning(method), steps, extension)
        finished = configurations_finished(ctx.store, name)
        if finished >= study.configurations:         # a later sitting or the report step: no worker to start
            print(f"[study] {method} at {steps} steps: tuning {name} holds its {finished} configurations")
        else:
            run_job(sitting, {"kind": "tune", "method": method, "steps": steps, "seed": params.train.seed,
                              "tuning": name, "configurations": study.configurations,
                              "space": [asdict(d) for d in space], "extension": extension,
                              "defaults": published_defaults(params, method, space) if extension == 0 else None,
                              "carried": incumbent(tuned(ctx, method, steps)) if extension else None})
        if extension == study.edge_extensions:
            break
        best = finalists([scored(t) for t in tuned(ctx, method, steps)], 1)[0]
        wider, widened = widen(space, best, study.edge_margin, study.edge_factor)
        if not widened:
            break
        new = {d.name: d for d in wider}
        notes.append(f"{method} at {steps} steps: the best setting lay at an edge ("
                     + "; ".join(f"{d.name} {best[d.name]:.3g} at the {side} edge of {span(d)}" for d, side in widened)
                     + "); the study widened it (" + "; ".join(f"{d.name} to {span(new[d.name])}" for d, _ in widened)
                     + f") and tuned {study.configurations} more configurations")
        space = wider
    return notes, space


def span(dimension: Dimension) -> str:
    return f"[{dimension.low:.3g}, {dimension.high:.3g}]"


def remaining_edges(params: Params, method: str, steps: int, space: list[Dimension],
                    setting: dict[str, float]) -> list[str]:
    """The report's word on each tuned value of the chosen setting still at an edge of its range as
    last searched: at its hard limit, or after the last extension the study allows."""
    study = params.study
    return [f"{method} at {steps} steps: the chosen {d.name} {setting[d.name]:.3g} lies at the {side} edge of "
            f"{span(d)}, " + (f"its hard limit ({HARD_LIMITS[d.name][0 if side == 'low' else 1]:g}, "
                              "evaluation/tuning.py)" if not widens(d, side)
                              else f"after the {study.edge_extensions} extension(s) the study allows")
            for d, side in edges(space, setting, study.edge_margin)]


def incumbent(tuning: list[Trial]) -> dict[str, Any]:
    """The best tuning trial so far as a range extension's study starts from it
    (``pipelines.study_worker.carried_trial``)."""
    best = setting_key(finalists([scored(t) for t in tuning], 1)[0])
    trial = next(t for t in tuning if setting_key(t.setting) == best)
    return {"setting": trial.setting, "curve": trial.curve, "val_loss": trial.val_loss, "stopped_at": trial.stopped_at}


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
    check_hardware(params.model, params.train)


def study_cells(params: Params) -> list[tuple[str, int]]:
    """The study's independent parts, in plan order: each method at each run length is tuned,
    selected and tested on its own (only the report compares them)."""
    return [(method, steps) for steps in params.study.steps for method in params.study.methods]


def run_cell(sitting: Sitting, method: str, steps: int) -> tuple[list[str], dict[str, float]]:
    """Tune ``method`` at ``steps``, choose its setting on the selection seeds, run its test seeds;
    returns the range notes and the chosen setting. Whatever the store holds is not run again."""
    notes, space = tune_method(sitting, method, steps)
    if sitting.worker is not None:
        settle_cell(sitting.ctx.store, sitting.ctx.run_id, tuned_claim(method, steps), sitting.worker)
    setting = select_and_test(sitting, method, steps)
    return notes + remaining_edges(sitting.ctx.params, method, steps, space, setting), setting


def select_and_test(sitting: Sitting, method: str, steps: int) -> dict[str, float]:
    """The fixed runs of a tuned part: its finalists, its choice (returned), its test seeds."""
    params = sitting.ctx.params
    setting = choose_setting(sitting, method, steps)
    run_fixed(sitting, [{"phase": "test", "method": method, "steps": steps, "seed": seed, "setting": setting}
                        for seed in seeds_for_testing(params.study.test_seed, params.study.seeds)])
    return setting


def work_as_worker(sitting: Sitting) -> None:
    """A study worker: claim a part of the study nobody holds (or one whose worker stopped
    beating for ``sitting.stale_after`` seconds), run it, and go on until every part is done."""
    ctx = sitting.ctx
    # The committed ledger goes into the store once, by whichever worker comes first.
    while LEDGER_CELL in open_cells(ctx.store, ctx.run_id, [LEDGER_CELL]):
        if claim_cell(ctx.store, ctx.run_id, LEDGER_CELL, sitting.worker, sitting.stale_after):
            restore(sitting)
            finish_cell(ctx.store, ctx.run_id, LEDGER_CELL, sitting.worker)
        else:
            time.sleep(1.0)
    cells = {f"{method}/{steps}": (method, steps) for method, steps in study_cells(ctx.params)}
    helped: set[str] = set()
    while open_ := open_cells(ctx.store, ctx.run_id, list(cells)):
        took = False
        for name in open_:
            if not claim_cell(ctx.store, ctx.run_id, name, sitting.worker, sitting.stale_after):
                continue
            took = True
            print(f"[study] {sitting.worker} takes {name}", flush=True)
            try:
                with Heartbeat(ctx.store, ctx.run_id, name, sitting.worker, every=sitting.stale_after / 4):
                    run_cell(sitting, *cells[name])
            except StoppedEarly:
                release_cell(ctx.store, ctx.run_id, name, sitting.worker)   # the sitting ended, not the worker
                raise
            finish_cell(ctx.store, ctx.run_id, name, sitting.worker)
        if not took and not help_with(sitting, open_, cells, helped):
            wait_for_others(sitting)
    print(f"[study] {sitting.worker}: every part of the study is done; `python -m pipelines.study` "
          "(or `dvc repro study`) writes the report", flush=True)


def help_with(sitting: Sitting, open_: list[str], cells: dict[str, tuple[str, int]], helped: set[str]) -> bool:
    """A worker with no part of its own takes runs of a tuned part another worker holds (the
    finalist and test runs are claimed one by one); False when there is none to help with."""
    ctx = sitting.ctx
    tuned = [name for name in open_ if name not in helped
             and not open_cells(ctx.store, ctx.run_id, [tuned_claim(*cells[name])])]
    if not tuned:
        return False
    name = tuned[0]
    helped.add(name)                       # once: it returns when every run of the part is recorded
    print(f"[study] {sitting.worker} helps with the runs of {name}", flush=True)
    select_and_test(sitting, *cells[name])
    return True


def run_workers(sitting: Sitting, workers: int, stale_after: float) -> None:
    """``workers`` local study workers, each on its share of the CPUs (torch's and llama.cpp's
    threads; never more than an ``OMP_NUM_THREADS`` already set); returns when they end.
    A worker that died is not fatal while another finishes its part (the report step checks
    that every part is done)."""
    from core.threads import usable_cpus

    share = max(1, usable_cpus() // workers)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():          # a cap the user set still holds
        share = max(1, min(share, int(os.environ["OMP_NUM_THREADS"])))
    env = {**os.environ, "OMP_NUM_THREADS": str(share), "GRIT_LLAMA_THREADS": str(share)}
    argv = [sys.executable, "-m", "pipelines.study", "--worker", "--stale-after", str(stale_after)]
    if sitting.deadline is not None:
        argv += ["--sitting", str(max(0.001, (sitting.deadline - time.time()) / 60))]
    print(f"[study] {workers} study workers, {share} CPU(s) each", flush=True)
    started = [subprocess.Popen(argv, cwd=sitting.ctx.root, env=env) for _ in range(workers)]
    codes = [process.wait() for process in started]
    if any(code not in (0, EXIT_STOPPED_EARLY) for code in codes):
        print(f"[study] study workers ended with exit statuses {codes}", flush=True)


def study(ctx: StageContext, _checked, minutes: float | None = None, workers: int = 1,
          worker: bool = False, stale_after: float = 120.0) -> dict[str, Path]:
    """The whole study, or as much of it as fits in ``minutes`` (a sitting); every sitting
    begins where the ledger says the last one stopped. ``workers`` > 1 first runs that many
    local study workers; ``worker``: this process is one (it writes no report)."""
    from evaluation.study_report import write_report

    params = ctx.params
    if not params.study.methods:
        return keep_last_report(ctx)
    started = time.perf_counter()
    data = prepared_data(ctx.root)
    sitting = Sitting(ctx, open_ledger(ctx.root / LEDGER_DIR, declared_study_params(params, ctx.root), data),
                      None if minutes is None else time.time() + 60 * minutes,
                      worker=f"{os.uname().nodename}:{os.getpid()}" if worker else None, workers=workers,
                      stale_after=stale_after)
    check_same_data(sitting.ledger, data)
    if worker:
        work_as_worker(sitting)
        return {}
    busy = held_cells(ctx.store, ctx.run_id, stale_after)
    if busy:
        raise UserError(f"study workers still hold {', '.join(busy)} of run {ctx.run_id}; the report is written "
                        f"once they are done (or {stale_after:.0f} s after they stop beating)")
    restore(sitting)
    settle_cell(ctx.store, ctx.run_id, LEDGER_CELL)           # workers started now find it restored
    sync_ledger(sitting)
    print(f"[study] so far: {progress(sitting)}")
    if workers > 1:
        run_workers(sitting, workers, stale_after)
        sync_ledger(sitting)         # before a sitting's end: the ledger carries what the workers did
        stop_if_over(sitting)
    chosen: dict[tuple[str, int], dict[str, float]] = {}
    notes: list[str] = []
    for method, steps in study_cells(params):
        cell_notes, chosen[(method, steps)] = run_cell(sitting, method, steps)
        notes += cell_notes
    trials = recorded_trials(ctx)
    trials = [t for t in trials if t.phase != "test" or t.setting == chosen[(t.method, t.steps)]]
    return write_report(ctx.root / REPORT_DIR, ctx.root / METRICS, params, trials, chosen, notes,
                        stage_seconds=time.perf_counter() - started, run_id=ctx.run_id)


def study_flags(parser: argparse.ArgumentParser) -> None:
    """The study's own flags, beside ``--params`` (``docs/study.md``)."""
    parser.add_argument("--sitting", type=float, default=None, metavar="MINUTES",
                        help="start no trial after that many minutes, then stop (exit 3) with the ledger "
                             "up to date; without it the study runs to its end")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="N local study workers share the study")
    parser.add_argument("--worker", action="store_true",
                        help="this process is one study worker (start one per machine, all with the same store.url)")
    parser.add_argument("--stale-after", type=float, default=120.0, metavar="SECONDS",
                        help="a part whose worker has not beaten for that long is taken over (default: 120)")


def study_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The study's command line (:func:`study_flags`), its numbers checked."""
    args = stage_arguments("study", argv, study_flags)
    if args.sitting is not None and args.sitting <= 0:
        raise SystemExit("error: --sitting takes a positive number of minutes")
    if args.workers < 1 or (args.worker and args.workers > 1):
        raise SystemExit("error: --workers takes a positive number, and a --worker runs alone")
    if args.stale_after <= 0:
        raise SystemExit("error: --stale-after takes a positive number of seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = study_arguments(argv)
    work = functools.partial(study, minutes=args.sitting, workers=args.workers, worker=args.worker,
                             stale_after=args.stale_after)
    # A worker's run is recorded as a stage of its own: only the step that writes the report is `study`.
    return run_stage("study_worker" if args.worker else "study", work, preflight=preflight, args=args)


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
