"""compare_all's one-line errors (the full table is checked in tests/test_pipeline_smoke.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from db.models import Run
from db.store import open_store, utcnow

REPO = Path(__file__).resolve().parents[2]


def compare_all(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evaluation.compare_all", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_missing_store_is_a_one_line_error(tmp_path: Path):
    result = compare_all(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no results store at outputs/centralized.db; run `make run` first"]


def test_a_store_without_a_complete_run_is_a_one_line_error(tmp_path: Path):
    store = open_store("sqlite:///outputs/centralized.db", tmp_path)
    store.start_run(Run(id="r1", git_revision=None, params_hash="h", params_json="{}", profile="smoke", host="h",
                        device="cpu", started_at=utcnow()))
    result = compare_all(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: the results store holds no complete run; finish `make run` (dvc repro) first"]
    result = compare_all(tmp_path, "--run", "nope")
    assert result.returncode == 2 and result.stderr.startswith("error: no run 'nope' in the store; runs: r1")
