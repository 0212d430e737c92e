"""A study trial records what determines its result (``db.provenance``), the store keeps it, and
a sitting refuses to start on a working tree that changes a file earlier trials needed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.errors import exit_status
from db.provenance import ProvenanceError, needed_files, trial_provenance
from db.study_ledger import LEDGER_DIR, open_ledger
from pipelines.params import parse_params
from pipelines.study import job as trial_job
from pipelines.study.plan import declared_study_params
from pipelines.study.sitting import open_sitting
from pipelines.study.trial import TRIAL_ENTRY, provenance, stored_result

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_trial_records_the_project_files_a_trial_needs_whatever_its_process_imported():
    """Every trial records the import closure of the trial process's entry: the measurement
    modules a tuning trial pruned early never imports are in it, so a pruned trial and a measured
    one of the same code record one setup."""
    params = parse_params({})
    assert TRIAL_ENTRY == trial_job.__name__, "the fingerprint hashes the closure of the module trials run"
    record = provenance({"method": "peft_lora", "phase": "tune"}, {"data": "d1", "revision": "r"}, params, REPO_ROOT)
    mine = record["provenance"]
    assert {"pipelines/study/job.py", "pipelines/study/trial.py", "db/provenance.py", "pipelines/params.py",
            "evaluation/measure.py", "evaluation/refusals.py", "trainers/grit/fused.py"} <= set(mine["files"])
    assert mine["files"] == sorted(mine["files"]) and mine["data"] == "d1"
    assert not any(name.startswith((".venv", "tests/", "unsloth_compiled_cache")) for name in mine["files"])
    variant = params.variants["peft_lora"].model_dump(mode="json")
    assert mine == trial_provenance(needed_files([TRIAL_ENTRY], REPO_ROOT), REPO_ROOT, "d1", variant)
    probe = provenance({"method": "pure_grit", "phase": "probe"}, {"data": "d1"}, params, REPO_ROOT)["provenance"]
    assert probe["setup"] == mine["setup"], "every phase of one checkout records one setup"
    row = SimpleNamespace(phase="tune", method="peft_lora", steps=4, seed=0, setting="{}", val_loss=1.0,
                          curve_json="[]", train_seconds=1.0, tokens_per_second=None, trainable_parameters=None,
                          metrics_json=json.dumps({"figures": {}, "provenance": mine}))
    assert stored_result(row)["provenance"] == mine          # the store gives it back to the ledger


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


def test_a_sitting_refuses_a_working_tree_that_changes_a_file_earlier_trials_needed(tmp_path, capsys):
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / "recipe.py").write_text("ORDER = 'backward, capture, precondition'\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "code")
    params = parse_params({})
    ledger = open_ledger(tmp_path / LEDGER_DIR, declared_study_params(params, tmp_path))   # untracked: no change
    ledger.add_trial({"phase": "tune", "method": "peft_lora", "steps": 4, "seed": 0, "setting": {},
                      "provenance": trial_provenance(["trainers/recipe.py"], tmp_path, None, {})})
    ctx = SimpleNamespace(root=tmp_path, params=params)
    assert open_sitting(ctx, None).ledger.key == ledger.key                         # clean: it starts

    (tmp_path / "trainers" / "recipe.py").write_text("ORDER = 'backward, precondition, capture'\n")
    with pytest.raises(ProvenanceError, match=f"earlier trials of study {ledger.key} needed "
                                              r"\(trainers/recipe.py\)"):
        open_sitting(ctx, None)
    capsys.readouterr()
    assert exit_status(lambda: open_sitting(ctx, None)) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1              # one error: line


def test_a_sitting_records_a_clean_commit_however_far_its_own_files_have_moved(tmp_path):
    """The ledger and the pages whose progress blocks follow it are the sitting's own: changing
    them keeps the trials' revision clean; any other tracked change marks it dirty."""
    from pipelines.study.sitting import own_files, sitting_revision

    ledger, *pages = own_files()
    assert ledger == f"{LEDGER_DIR.as_posix()}/" and {"README.md", "docs/study.md"} <= set(pages)
    for name in (f"{ledger}trials.jsonl", *pages, "params.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("committed\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "code")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    for name in (f"{ledger}trials.jsonl", *pages):
        (tmp_path / name).write_text("a sitting moved it\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert sitting_revision(tmp_path) == head
    (tmp_path / "params.yaml").write_text("profile: study\n")           # the old procedure's composed params
    assert sitting_revision(tmp_path) == f"{head}-dirty"


def test_make_sitting_lets_through_exactly_the_sittings_own_files():
    """``make sitting`` refuses a tree with tracked changes before it prepares anything; the files
    it lets through are the ones whose changes leave the trials' revision clean."""
    import re

    from pipelines.study.sitting import own_files

    recipe = (REPO_ROOT / "Makefile").read_text().split("\nsitting:", 1)[1].split("\n\n", 1)[0]
    excluded = re.findall(r"':\(exclude\)([^']+)'", recipe)
    ledger, *pages = own_files()
    assert sorted(excluded) == sorted([ledger.rstrip("/"), *pages])


def test_study_workers_read_the_params_file_the_stage_read(tmp_path):
    """A sitting run with ``--params`` outside the tree hands that file to its workers (they
    would otherwise read params.yaml, another profile)."""
    from pipelines.study.worker import worker_command

    sitting = SimpleNamespace(params_file=tmp_path / "study-params.yaml", deadline=None)
    argv = worker_command(sitting, 120.0)
    assert argv[argv.index("--params") + 1] == str(tmp_path / "study-params.yaml") and "--sitting" not in argv
    assert "--params" not in worker_command(SimpleNamespace(params_file=None, deadline=None), 120.0)
