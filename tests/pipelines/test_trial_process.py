"""A study's trial process ends with the study process that reads its results: killed, the
study worker leaves no orphan training on and telling Optuna of trials nobody records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

MIDDLE = textwrap.dedent("""
    import os, subprocess, sys, time
    # as the study process starts a trial process: naming itself, so that a kill during the
    # child's imports is seen too
    child = subprocess.Popen([sys.executable, "-c",
        "from pipelines.study.job import end_with_parent; import time; end_with_parent(0.1); time.sleep(120)"],
        env={**os.environ, "GRIT_STUDY_PARENT": str(os.getpid())})
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:        # a zombie has ended; only its parent has not reaped it
        return stat.read().split()[2] != "Z"


def test_the_trial_process_ends_when_its_study_process_is_killed(repo_root):
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], cwd=repo_root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(repo_root)})
    child = int(middle.stdout.readline())
    time.sleep(1.0)
    assert _alive(child)
    middle.send_signal(signal.SIGKILL)
    middle.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the trial process outlived the study process"


def test_a_finished_run_names_itself_and_prints_the_loss_its_phase_is_judged_on():
    """Two workers' lines interleave in a sitting's log, and a test run is judged on its held-out
    test loss, not on the validation loss the log used to print for every run."""
    from pipelines.study.trial import run_summary

    record = {"method": "grit_paper", "steps": 96, "seed": 1008, "phase": "test", "val_loss": 0.3342,
              "metrics": {"test_loss": 0.3371, "val_loss": 0.3342}, "trial_seconds": 1713.1}
    line = run_summary(record)
    assert "grit_paper, 96 steps, seed 1008" in line
    assert "test loss 0.3371" in line and "validation loss 0.3342" in line
    finalist = run_summary({**record, "phase": "finalist", "metrics": {"val_loss": 0.3342}})
    assert "finalist" in finalist and "test loss" not in finalist and "validation loss 0.3342" in finalist
