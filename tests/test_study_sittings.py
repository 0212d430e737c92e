"""A study over sittings: stopped when its time is up, carried to another machine by its ledger,
finished by ``dvc repro study``, and replayed from the ledger alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pipeline_copy import _sh, repo_copy
from sqlalchemy import func, select

from db.models import StudyTrial
from db.store import open_store

pytestmark = pytest.mark.slow     # the smoke study, in three sittings and a replay


def test_a_study_goes_on_over_sittings_from_its_committed_ledger(tmp_path_factory):
    """A sitting (``--sitting MINUTES``) stops after the trial in progress when its time is up
    (exit 3, nothing lost); the next sitting, in an empty store as on another machine, restores
    every trial and the Optuna tuning from the ledger and goes on; ``dvc repro study`` ends the
    study, and a store rebuilt from the ledger alone gives the same report without training."""
    repo, env = repo_copy(tmp_path_factory, ["smoke"])
    store_file, ledger = repo / "outputs/centralized.db", repo / "reports/study/ledger"
    _sh(["dvc", "repro", "prepare_data"], repo, env)

    def sitting(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipelines.study", *flags], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=900)

    def ledger_trials() -> list[dict]:
        return [json.loads(line) for line in (ledger / "trials.jsonl").read_text().splitlines()]

    first = sitting("--sitting", "0.001")
    assert first.returncode == 3 and "sitting's time is up" in first.stdout, first.stdout[-2000:] + first.stderr[-2000:]
    assert len(ledger_trials()) == 1 and ledger_trials()[0]["revision"]
    assert "`python -m pipelines.study --sitting MINUTES`" in first.stdout      # one process: no --workers
    assert "h more at the pace of its trials so far" in first.stdout     # what the rest will cost
    # the README to commit with the ledger says how far the study is, and on which data
    data = json.loads((ledger / "study.json").read_text())["data"]
    assert data and ledger_trials()[0]["data"] == data
    assert "1 trial in its ledger" in (repo / "README.md").read_text()
    assert f"Every trial trained on data `{data}`" in (repo / "README.md").read_text()
    key = json.loads((ledger / "study.json").read_text())["key"]
    tuning = f"{key}/peft_lora/4"
    assert [json.loads(line)["tuning"] for line in (ledger / "journal.jsonl").read_text().splitlines()][0] == tuning

    store_file.unlink()                                                  # another machine: an empty store
    second = sitting("--sitting", "0.001")
    assert second.returncode == 3 and "1 put into this store" in second.stdout, second.stdout[-2000:]
    assert len(ledger_trials()) == 2 and {t["tuning"] for t in ledger_trials()} == {tuning}
    assert "configuration 2/3" in second.stdout                          # the carried tuning went on
    assert ledger_trials()[0]["setting"] != ledger_trials()[1]["setting"]   # not the first one asked again

    store_file.unlink()
    _sh(["dvc", "repro", "study"], repo, env)
    done = json.loads((repo / "metrics/study.json").read_text())
    trials = ledger_trials()
    assert done["study"] == key                          # the metrics name the ledger's study they report
    # the GRIT method was probed at its chosen setting; each tuning trained its published defaults
    assert done["probes"]["grit_paper@4"]["verdict"] in ("effective", "inert")
    assert [t["setting"] for t in trials if t["phase"] == "probe"] == [done["chosen"]["grit_paper@4"]]
    assert set(done["defaults"]) == {"peft_lora@4", "grit_paper@4"}
    assert all(d["rank"] is not None for d in done["defaults"].values())
    readme = (repo / "README.md").read_text()
    assert f"{len(trials)} trials in its ledger" in readme and "every part is done" in readme
    assert "| done |" in (repo / "docs/study.md").read_text()
    assert len({(t["phase"], t["method"], t["steps"], t["seed"], json.dumps(t["setting"], sort_keys=True))
                for t in trials}) == len(trials)                         # each trial recorded once
    with open_store(f"sqlite:///{store_file}").reader() as session:
        assert session.scalar(select(func.count()).select_from(StudyTrial)) == len(trials)

    store_file.unlink()
    replay = _sh([sys.executable, "-m", "pipelines.study"], repo, env)
    assert f"{len(trials)} put into this store" in replay.stdout and "[study] tune" not in replay.stdout
    # every part's tuning is read as finished in the study process: no tuning worker is started
    parts = [part.split("@") for part in done["chosen"]]
    assert all(f"tuning {key}/{m}/{steps} holds" in replay.stdout for m, steps in parts), replay.stdout[-2000:]
    again = json.loads((repo / "metrics/study.json").read_text())
    assert again["chosen"] == done["chosen"] and again["verdict"] == done["verdict"]
