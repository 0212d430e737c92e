"""The trials of one study job, in a process of their own (``pipelines/study/part.py`` starts it):

    python -m pipelines.study.job --params P --job J --results R

``J`` is one job of one method:

- ``tune``: Optuna tuning at one run length (``tuning.py``): ask configurations of the method's
  declared space until the Optuna study holds ``configurations`` finished ones. Each trains on
  ``train.seed``, reports its validation loss whenever it is measured, and stops when the
  successive-halving pruner says so.
- ``runs``: fixed trials (finalists, tests): each a (phase, steps, seed, setting).

Each finished trial is recorded in the results store by this process *before* Optuna is told of
it (a kill in between leaves a trial Optuna re-asks and that replaces its row: every trial is
recorded once), then appended to ``R`` as one JSON line for the study process's ledger. One
process per method: importing Unsloth patches libraries for the whole process.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from core.quiet import silence_known_import_noise
from evaluation.tuning import Dimension
from pipelines.params import Params, load_params
from pipelines.study.trial import provenance, run_summary, run_trial, store_trial, trial_store
from pipelines.study.tuning import DEFAULTS, finished_configurations, optuna_study, reseed


def sitting_over(job: dict[str, Any], lengths: list[float], now: float | None = None) -> bool:
    """Start no new trial that would end past the sitting's deadline at the length of this job's
    longest trial so far (``lengths``, seconds): a 192-step trial is 20-25 minutes on 2 cores,
    and a sitting that let one start a minute before its end ran that much past it. The study
    process then stops the sitting. A job trains at least one trial, so every sitting moves the
    study on, however short."""
    if not lengths or job.get("deadline") is None:
        return False
    return (time.time() if now is None else now) + max(lengths) > job["deadline"]


def tuning_line(job: dict[str, Any], finished: int, setting: dict[str, float]) -> str:
    """The log line of the configuration a tuning job trains next: which of its ``configurations``
    and, in an extension (a tuning run again over a widened range), which extension, since each
    extension counts its configurations from 1 again."""
    extension = f", extension {job['extension']} (widened ranges)" if job.get("extension") else ""
    return (f"[study] tune {job['method']} at {job['steps']} steps{extension}, configuration {finished + 1}/"
            f"{job['configurations']}: {json.dumps(setting, sort_keys=True)}")


def tune(params: Params, job: dict[str, Any], root: Path, results: Path) -> None:
    """Ask, train, tell until the Optuna study holds ``configurations`` finished trials (or the
    sitting is over)."""
    import optuna

    tuned = optuna_study(params, root, job)
    store = trial_store(params, root)
    space = [Dimension(**d) for d in job["space"]]
    lengths: list[float] = []          # this job's trials' wall times, seconds
    while (finished := finished_configurations(tuned)) < job["configurations"] and not sitting_over(job, lengths):
        reseed(tuned, params, job)
        trial = tuned.ask()
        setting = {d.name: float(f"{trial.suggest_float(d.name, d.low, d.high, log=d.log):.4g}") for d in space}
        spec = {"phase": "tune", "method": job["method"], "steps": job["steps"], "seed": job["seed"],
                "setting": setting, "tuning": job["tuning"], "defaults": bool(trial.user_attrs.get(DEFAULTS))}
        print(tuning_line(job, finished, setting), flush=True)

        def report(step: int, val_loss: float, trial=trial) -> bool:
            trial.report(val_loss, step)
            return step < job["steps"] and trial.should_prune()       # a run at its end is done

        with tempfile.TemporaryDirectory(prefix="study-trial-") as scratch:
            record = provenance(run_trial(params, spec, root, Path(scratch), on_validation=report), job, params, root)
        store_trial(store, job["run_id"], record)          # before Optuna hears of it
        lengths.append(record["trial_seconds"])
        loss = record["val_loss"]
        if record["stopped_at"] is not None:
            tuned.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif loss is None or not math.isfinite(loss):
            tuned.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            tuned.tell(trial, loss)
        append(results, record)
        state = f"pruned at step {record['stopped_at']}" if record["stopped_at"] is not None else "trained to the end"
        print(f"[study]   validation loss {loss if loss is None else f'{loss:.4f}'}, {state}, "
              f"{record['trial_seconds']:.0f} s", flush=True)


def runs(params: Params, job: dict[str, Any], root: Path, results: Path) -> None:
    store = trial_store(params, root)
    lengths: list[float] = []
    for spec in job["runs"]:
        if sitting_over(job, lengths):
            return
        print(f"[study] {spec['phase']} {spec.get('position', '?')}: {spec['method']}, {spec['steps']} steps, "
              f"seed {spec['seed']}, {json.dumps(spec['setting'], sort_keys=True)}", flush=True)
        with tempfile.TemporaryDirectory(prefix="study-trial-") as scratch:
            record = provenance(run_trial(params, spec, root, Path(scratch)), job, params, root)
        store_trial(store, job["run_id"], record)
        lengths.append(record["trial_seconds"])
        append(results, record)
        print(run_summary(record), flush=True)


def append(results: Path, record: dict[str, Any]) -> None:
    with results.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


# the environment variable by which the study process gives a trial process its own pid
STUDY_PARENT = "GRIT_STUDY_PARENT"


def end_with_parent(every: float = 1.0) -> None:
    """End this process when the study process that reads its results ends (killed, say): an
    orphan would go on training and telling Optuna of trials nobody records. The study process
    names itself (``STUDY_PARENT``): a parent read here, after this module's imports, may already
    be whoever adopted the orphan."""
    import os
    import threading

    parent = int(os.environ.get(STUDY_PARENT, os.getppid()))

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="end with parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    end_with_parent()
    silence_known_import_noise()
    parser = argparse.ArgumentParser(prog="python -m pipelines.study.job")
    for flag in ("--params", "--job", "--results"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    params = load_params(Path(args.params))
    job = json.loads(Path(args.job).read_text())
    (tune if job["kind"] == "tune" else runs)(params, job, Path.cwd(), Path(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
