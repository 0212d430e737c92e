"""The study's workers (``pipelines/study/``, docs/study.md): a study worker claims a part of the
study nobody holds (or one whose worker stopped beating), runs it, and goes on until every part is
done; a worker with no part of its own left takes the fixed runs of a tuned part another worker
holds. :func:`run_workers` starts local workers, each on its share of the CPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from core.errors import StoppedEarly
from db.study_claims import Heartbeat, claim_part, finish_part, open_parts, release_part
from pipelines.stage import EXIT_STOPPED_EARLY
from pipelines.study.part import run_part, select_and_test, tuned_claim, wait_for_others
from pipelines.study.plan import study_parts
from pipelines.study.sitting import LEDGER_PART, Sitting, restore


def work_as_worker(sitting: Sitting) -> None:
    """A study worker: claim a part of the study nobody holds (or one whose worker stopped
    beating for ``sitting.stale_after`` seconds), run it, and go on until every part is done."""
    ctx = sitting.ctx
    # The committed ledger goes into the store once, by whichever worker comes first.
    while LEDGER_PART in open_parts(ctx.store, ctx.run_id, [LEDGER_PART]):
        if claim_part(ctx.store, ctx.run_id, LEDGER_PART, sitting.worker, sitting.stale_after):
            restore(sitting)
            finish_part(ctx.store, ctx.run_id, LEDGER_PART, sitting.worker)
        else:
            time.sleep(1.0)
    parts = {f"{method}/{steps}": (method, steps) for method, steps in study_parts(ctx.params)}
    helped: set[str] = set()
    while open_ := open_parts(ctx.store, ctx.run_id, list(parts)):
        took = False
        for name in open_:
            if not claim_part(ctx.store, ctx.run_id, name, sitting.worker, sitting.stale_after):
                continue
            took = True
            print(f"[study] {sitting.worker} takes {name}", flush=True)
            try:
                with Heartbeat(ctx.store, ctx.run_id, name, sitting.worker, every=sitting.stale_after / 4):
                    run_part(sitting, *parts[name])
            except StoppedEarly:
                release_part(ctx.store, ctx.run_id, name, sitting.worker)   # the sitting ended, not the worker
                raise
            finish_part(ctx.store, ctx.run_id, name, sitting.worker)
        if not took and not help_with(sitting, open_, parts, helped):
            wait_for_others(sitting)
    print(f"[study] {sitting.worker}: every part of the study is done; `python -m pipelines.study` "
          "(or `dvc repro study`) writes the report", flush=True)


def help_with(sitting: Sitting, open_: list[str], parts: dict[str, tuple[str, int]], helped: set[str]) -> bool:
    """A worker with no part of its own takes runs of a tuned part another worker holds (the
    finalist and test runs are claimed one by one); False when there is none to help with."""
    ctx = sitting.ctx
    tuned = [name for name in open_ if name not in helped
             and not open_parts(ctx.store, ctx.run_id, [tuned_claim(*parts[name])])]
    if not tuned:
        return False
    name = tuned[0]
    helped.add(name)                       # once: it returns when every run of the part is recorded
    print(f"[study] {sitting.worker} helps with the runs of {name}", flush=True)
    select_and_test(sitting, *parts[name])
    return True


def worker_command(sitting: Sitting, stale_after: float) -> list[str]:
    """The command line of one local study worker: the params the stage read (a ``--params``
    file outside the tree included) and the minutes left of the sitting."""
    argv = [sys.executable, "-m", "pipelines.study", "--worker", "--stale-after", str(stale_after)]
    if sitting.params_file is not None:
        argv += ["--params", str(sitting.params_file)]
    if sitting.deadline is not None:
        argv += ["--sitting", str(max(0.001, (sitting.deadline - time.time()) / 60))]
    return argv


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
    argv = worker_command(sitting, stale_after)
    print(f"[study] {workers} study workers, {share} CPU(s) each", flush=True)
    started = [subprocess.Popen(argv, cwd=sitting.ctx.root, env=env) for _ in range(workers)]
    codes = [process.wait() for process in started]
    if any(code not in (0, EXIT_STOPPED_EARLY) for code in codes):
        print(f"[study] study workers ended with exit statuses {codes}", flush=True)
