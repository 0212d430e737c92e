"""Study workers: two workers share the smoke study through a PostgreSQL store, one is killed in
the middle of a trial; the other takes over its part, every planned trial is recorded once, and the report equals a
one-worker run's (same chosen settings, same test figures); so does ``--workers 2``."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from pipeline_copy import _sh, repo_copy
from sqlalchemy import select

from db.models import StudyClaim, StudyTrial
from db.store import open_store
from pipelines.study.part import run_claim
from pipelines.study.trial import stored_result

pytestmark = pytest.mark.slow     # runs the smoke study four times

# One thread everywhere: a trial is then the same bits whichever worker trains it.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "GRIT_LLAMA_THREADS": "1"}
COMPARED = ("chosen", "summary", "tests", "verdict")


def _study(repo: Path, env: dict[str, str], *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipelines.study", *flags], cwd=repo, env={**env, **ONE_THREAD},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _url(repo: Path) -> str:
    return yaml.safe_load((repo / "params.yaml").read_text())["store"]["url"]


def _trials(repo: Path) -> list[tuple]:
    with open_store(_url(repo), repo).reader() as session:
        return [(t.phase, t.method, t.steps, t.seed, t.setting, t.val_loss)
                for t in session.scalars(select(StudyTrial))]


def _prepared_copy(tmp_path_factory, prepared: Path, env: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """Another copy of a repository whose data are prepared, without preparing them again (the
    same seed prepares byte-identical data: tests/pipelines/test_prepare_data.py)."""
    copy = tmp_path_factory.mktemp("pipeline") / "repo"
    shutil.copytree(prepared, copy, symlinks=True)
    return copy, {**env, "PYTHONPATH": str(copy)}


def _use_store(repo: Path, url: str) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["store"]["url"] = url
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_two_workers_one_killed_mid_trial_give_the_one_worker_report(tmp_path_factory, postgres_url: str):
    """The two workers share a PostgreSQL store, as workers on two machines would."""
    # The smallest plan that still has two parts, a tuning to kill mid-trial, finalists and tests:
    # the study runs four times here.
    alone, env = repo_copy(tmp_path_factory, ["smoke", "study.configurations=2", "study.finalists=1"])
    _sh(["dvc", "repro", "prepare_data"], alone, env)
    # copied now, before the one-worker study below writes its trials into this repository
    (shared, shared_env), (pair, pair_env) = (_prepared_copy(tmp_path_factory, alone, env) for _ in range(2))
    one = _study(alone, env)
    out = one.communicate(timeout=1800)[0]
    assert one.returncode == 0, out[-3000:]
    expected = json.loads((alone / "metrics/study.json").read_text())

    env = shared_env
    _use_store(shared, postgres_url)
    doomed = _study(shared, env, "--worker", "--stale-after", "8")
    for line in doomed.stdout:                       # the first worker claims the first part ...
        if "configuration 1/" in line:
            break
    survivor = _study(shared, env, "--worker", "--stale-after", "8")
    time.sleep(5)                                    # ... and is killed in the middle of its first trial
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=60)
    out = survivor.communicate(timeout=1800)[0]
    assert survivor.returncode == 0, out[-3000:]
    assert out.count("takes peft_lora/4") == 1 and out.count("takes grit_paper/4") == 1, out[-3000:]
    assert "every part of the study is done" in out

    report = _study(shared, env)                     # the report step: everything is recorded
    out = report.communicate(timeout=1800)[0]
    assert report.returncode == 0, out[-3000:]
    assert "[study] tune" not in out and "trials recorded by study workers added to the ledger" in out
    got = json.loads((shared / "metrics/study.json").read_text())
    assert {k: got[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}

    # The same plan through --workers 2 (two local workers started by the study itself), first in
    # a sitting that ends at once: the ledger holds what the workers did before the sitting ended.
    env = pair_env
    short = _study(pair, env, "--workers", "2", "--sitting", "0.001")
    out = short.communicate(timeout=1800)[0]
    assert short.returncode == 3 and "sitting's time is up" in out, out[-3000:]
    assert "`python -m pipelines.study --workers 2 --sitting MINUTES`" in out     # goes on as it ran
    carried = (pair / "reports/study/ledger/trials.jsonl").read_text().splitlines()
    assert len(carried) >= 1 and f"{len(carried)} trial" in (pair / "README.md").read_text()
    both = _study(pair, env, "--workers", "2")
    out = both.communicate(timeout=1800)[0]
    assert both.returncode == 0, out[-3000:]
    assert "2 study workers, 1 CPU(s) each" in out and out.count(" takes ") == 2, out[-3000:]
    paired = json.loads((pair / "metrics/study.json").read_text())
    assert {k: paired[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}
    assert sorted(_trials(pair)) == sorted(_trials(alone))

    trials, planned = _trials(shared), _trials(alone)
    identities = Counter(t[:5] for t in trials)
    assert max(identities.values()) == 1 and set(identities) == {t[:5] for t in planned}
    assert sorted(trials) == sorted(planned)         # the same trials, the same losses
    ledger = [json.loads(line) for line in (shared / "reports/study/ledger/trials.jsonl").read_text().splitlines()]
    assert len(ledger) == len(trials)
    with open_store(postgres_url).reader() as session:
        claims = {c.part: c for c in session.scalars(select(StudyClaim))}
        fixed = [t for t in session.scalars(select(StudyTrial)) if t.phase != "tune"]
    parts = {"ledger", "peft_lora/4", "grit_paper/4", "peft_lora/4/tuned", "grit_paper/4/tuned"}
    runs = {run_claim(stored_result(t)) for t in fixed}
    assert set(claims) == parts | runs and all(c.done_at for c in claims.values())   # one claim per fixed run


def test_a_worker_with_no_part_left_takes_runs_of_the_part_another_holds(tmp_path_factory):
    """One part (one method at one run length) and two workers: the second worker trains some of
    the part's test runs (the store takes each run once: a run trained twice would fail its job)."""
    repo, env = repo_copy(tmp_path_factory, ["smoke", "study.methods=[grit_paper]"])
    _sh(["dvc", "repro", "prepare_data"], repo, env)
    both = _study(repo, env, "--workers", "2", "--stale-after", "8")
    out = both.communicate(timeout=1800)[0]
    assert both.returncode == 0, out[-3000:]
    assert out.count(" takes grit_paper/4") == 1 and out.count(" helps with the runs of grit_paper/4") == 1, out[-3000:]
    with open_store(_url(repo), repo).reader() as session:
        fixed = [t for t in session.scalars(select(StudyTrial)) if t.phase != "tune"]
        claims = {c.part: c.worker for c in session.scalars(select(StudyClaim))}
    tests = [t for t in fixed if t.phase == "test"]
    assert len(tests) == 2 and len({claims[run_claim(stored_result(t))] for t in tests}) == 2
