"""One part of the study (``pipelines/study/``, docs/study.md): a method at a run length, tuned,
its setting chosen over the selection seeds, then tested on the test seeds. The trials run in a
process of their own (``pipelines.study.job``, one per method and job: importing Unsloth patches
libraries for the whole process); a study worker claims the fixed runs (finalists, tests) one by
one, so that idle workers share them. Whatever the store holds is not run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from db.study_claims import Heartbeat, claim_part, finish_part, release_part, settle_part
from evaluation.config import seeds_for_testing, tuning_seeds
from evaluation.study import Trial
from evaluation.tuning import Dimension, Scored, choose_finalist, finalists, setting_key, widen
from pipelines.stage import StageContext
from pipelines.study import job as trial_job
from pipelines.study.plan import (
    identity,
    incumbent,
    method_space,
    published_defaults,
    remaining_edges,
    scored,
    span,
    tuning_name,
)
from pipelines.study.sitting import Sitting, prepared_data, record, recorded_trials, sitting_revision, stop_if_over
from pipelines.study.tuning import configurations_finished
from trainers.config import preconditioner


def run_job(sitting: Sitting, job: dict) -> None:
    """One worker process for ``job``; its trials are recorded as they land, so a kill loses at
    most the trial in progress. The worker starts no trial that would end past the sitting's
    deadline at the length of its longest so far (``job.sitting_over``)."""
    import yaml

    ctx = sitting.ctx
    job = {**job, "deadline": sitting.deadline, "run_id": ctx.run_id, "revision": sitting_revision(ctx.root),
           "data": prepared_data(ctx.root)}
    with tempfile.TemporaryDirectory(prefix=f"study-{job['method']}-") as scratch:
        params_file, job_file, results_file = (Path(scratch) / n for n in ("params.yaml", "job.json", "results.jsonl"))
        params_file.write_text(yaml.safe_dump(ctx.params.model_dump(mode="json"), sort_keys=False))
        job_file.write_text(json.dumps(job))
        worker = subprocess.Popen([sys.executable, "-m", trial_job.__name__, "--params", str(params_file),
                                   "--job", str(job_file), "--results", str(results_file)], cwd=ctx.root,
                                  env={**os.environ, trial_job.STUDY_PARENT: str(os.getpid())})
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
        spec = next((s for s in runs if claim_part(ctx.store, ctx.run_id, run_claim(s), sitting.worker,
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
                release_part(ctx.store, ctx.run_id, name, sitting.worker)    # the sitting ended first
            else:
                finish_part(ctx.store, ctx.run_id, name, sitting.worker)


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


def run_part(sitting: Sitting, method: str, steps: int) -> tuple[list[str], dict[str, float]]:
    """Tune ``method`` at ``steps``, choose its setting on the selection seeds, run its test seeds;
    returns the range notes and the chosen setting. Whatever the store holds is not run again."""
    notes, space = tune_method(sitting, method, steps)
    if sitting.worker is not None:
        settle_part(sitting.ctx.store, sitting.ctx.run_id, tuned_claim(method, steps), sitting.worker)
    setting = select_and_test(sitting, method, steps)
    return notes + remaining_edges(sitting.ctx.params, method, steps, space, setting), setting


def select_and_test(sitting: Sitting, method: str, steps: int) -> dict[str, float]:
    """The fixed runs of a tuned part: its finalists, its choice (returned), its test seeds."""
    params = sitting.ctx.params
    setting = choose_setting(sitting, method, steps)
    run_fixed(sitting, [{"phase": "test", "method": method, "steps": steps, "seed": seed, "setting": setting}
                        for seed in seeds_for_testing(params.study.test_seed, params.study.seeds)])
    if preconditioner(params.variants[method]) is not None:       # GRIT or a peer: probed where tuning put it
        run_fixed(sitting, [{"phase": "probe", "method": method, "steps": steps, "seed": params.train.seed,
                             "setting": setting}])
    return setting
