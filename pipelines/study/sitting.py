"""One sitting of the study (``pipelines/study/``, docs/study.md): the stage's context, the
study's ledger (what every sitting has done, committed to git) and the sitting's deadline.
:func:`open_sitting` is where a sitting starts; this module also keeps the ledger and the store in
step (a sitting's start puts the ledger's trials and journals into the store; every finished trial
goes into the ledger) and says how far the study is.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from core.errors import StoppedEarly
from core.files import atomic_write_text
from db.models import StudyTrial
from db.provenance import changed_paths, check_sitting_may_start, working_tree_changes
from db.study_ledger import LEDGER_DIR, Ledger, data_fingerprint, open_ledger
from db.tuning_journal import append_journal, journal_logs, journals_under
from evaluation.study import PHASES, Trial, planned_runs, remaining_note, study_progress, trial_from_record
from pipelines.paths import DATA_DIR
from pipelines.stage import StageContext
from pipelines.study.plan import declared_study_params, identity
from pipelines.study.trial import store_trial, stored_result
from trainers.config import probed_methods

LEDGER_PART = "ledger"            # the claim on restoring the committed ledger into the store


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
    params_file: Path | None = None      # the params the stage read, handed on to its study workers

    def over(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


def own_files() -> tuple[str, ...]:
    """What a sitting itself rewrites in the tree: the ledger's files and the pages whose
    progress blocks follow it (``show_progress``)."""
    from evaluation.study_report import PROGRESS_BLOCKS

    return (LEDGER_DIR.as_posix() + "/", *dict.fromkeys(block.page for block in PROGRESS_BLOCKS))


def sitting_revision(root: Path) -> str | None:
    """The commit a sitting's trials train on: HEAD, with ``-dirty`` only when a tracked file
    other than the sitting's own (:func:`own_files`) differs from it, so a sitting on a clean
    checkout records a clean revision however far its ledger has moved. Untracked files are left
    out as in ``pipelines.stage.git_revision``; what determines a result is each trial's
    provenance fingerprint (``db.provenance``). None where ``root`` is no git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    ledger, *pages = own_files()
    foreign = [path for path in changed_paths(status.stdout) if not path.startswith(ledger) and path not in pages]
    return head.stdout.strip() + ("-dirty" if foreign else "")


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


def open_sitting(ctx: StageContext, minutes: float | None, workers: int = 1, worker: bool = False,
                 stale_after: float = 120.0, params_file: Path | None = None) -> Sitting:
    """Where a sitting starts: the study's ledger opened (or begun) on the declared params and
    the prepared data, the deadline ``minutes`` from now, and a word if this host prepared other
    data than the study began on. ``worker``: this process is a study worker (host:pid)."""
    data = prepared_data(ctx.root)
    sitting = Sitting(ctx, open_ledger(ctx.root / LEDGER_DIR, declared_study_params(ctx.params, ctx.root), data),
                      None if minutes is None else time.time() + 60 * minutes,
                      worker=f"{os.uname().nodename}:{os.getpid()}" if worker else None, workers=workers,
                      stale_after=stale_after, params_file=params_file)
    # before any trial: a changed file that earlier trials needed would mix two codes in one study
    check_sitting_may_start(sitting.ledger.trials, working_tree_changes(ctx.root), sitting.ledger.key)
    check_same_data(sitting.ledger, data)
    return sitting


def as_trial(row: StudyTrial) -> Trial:
    return trial_from_record(stored_result(row))


def recorded_trials(ctx: StageContext) -> list[Trial]:
    with ctx.store.reader() as session:
        rows = session.scalars(select(StudyTrial).where(StudyTrial.run_id == ctx.run_id)
                               .order_by(StudyTrial.id)).all()     # recorded order: the pace is the latest trials'
        return [as_trial(r) for r in rows]


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
                           f"`make sitting MINUTES=N` (a sitting on a clean checkout) or "
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
    parts = study_progress(study.methods, study.steps, planned, trials,
                           probed_methods(study.methods, sitting.ctx.params.variants))
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
