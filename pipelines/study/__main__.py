"""``python -m pipelines.study``: the study stage (the package's docstring, docs/study.md). With
``--workers N`` it first runs N local study workers, with ``--worker`` this process is one; the
stage itself then runs whatever is left, in plan order, and writes the report.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

from core.errors import UserError
from core.files import atomic_write_json, atomic_write_text
from db.study_claims import held_parts, settle_part
from pipelines.params import Params, require_text_model
from pipelines.paths import DATA_DIR
from pipelines.stage import StageContext, run_stage, stage_arguments
from pipelines.study.part import run_part
from pipelines.study.plan import study_parts
from pipelines.study.sitting import (
    LEDGER_PART,
    open_sitting,
    progress,
    recorded_trials,
    restore,
    stop_if_over,
    sync_ledger,
)
from pipelines.study.worker import run_workers, work_as_worker
from trainers.hardware import check_hardware

REPORT_DIR = Path("reports/study")
METRICS = Path("metrics/study.json")


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


def study(ctx: StageContext, _checked, minutes: float | None = None, workers: int = 1,
          worker: bool = False, stale_after: float = 120.0, params_file: Path | None = None) -> dict[str, Path]:
    """The whole study, or as much of it as fits in ``minutes`` (a sitting); every sitting
    begins where the ledger says the last one stopped. ``workers`` > 1 first runs that many
    local study workers; ``worker``: this process is one (it writes no report)."""
    from evaluation.study_report import write_report

    params = ctx.params
    if not params.study.methods:
        return keep_last_report(ctx)
    started = time.perf_counter()
    sitting = open_sitting(ctx, minutes, workers, worker, stale_after, params_file)
    if worker:
        work_as_worker(sitting)
        return {}
    busy = held_parts(ctx.store, ctx.run_id, stale_after)
    if busy:
        raise UserError(f"study workers still hold {', '.join(busy)} of run {ctx.run_id}; the report is written "
                        f"once they are done (or {stale_after:.0f} s after they stop beating)")
    restore(sitting)
    settle_part(ctx.store, ctx.run_id, LEDGER_PART)           # workers started now find it restored
    sync_ledger(sitting)
    print(f"[study] so far: {progress(sitting)}")
    if workers > 1:
        run_workers(sitting, workers, stale_after)
        sync_ledger(sitting)         # before a sitting's end: the ledger carries what the workers did
        stop_if_over(sitting)
    chosen: dict[tuple[str, int], dict[str, float]] = {}
    notes: list[str] = []
    for method, steps in study_parts(params):
        part_notes, chosen[(method, steps)] = run_part(sitting, method, steps)
        notes += part_notes
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
                             stale_after=args.stale_after, params_file=args.params.resolve())
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
