"""Stage ``prepare_model``: manifest, run bookkeeping and artifacts in the results store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from core.files import sha256_file
from db.models import Artifact, Run, StageRun, Variant
from db.store import open_store
from pipelines.profile import compose_params

pytestmark = pytest.mark.slow     # runs the prepare_model stage on the embedded model


def _run_stage(cwd: Path, repo_root: Path, params: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.prepare_model", "--params", str(params)],
        cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )


def test_prepare_model_records_manifest_run_and_artifact_idempotently(tmp_path: Path, repo_root: Path):
    params = tmp_path / "params.yaml"
    compose_params("smoke", params)
    for _ in range(2):  # the second run must replace, not duplicate
        result = _run_stage(tmp_path, repo_root, params)
        assert result.returncode == 0, result.stderr[-3000:]

    manifest = json.loads((tmp_path / "artifacts" / "base_model.json").read_text())
    assert manifest["source"] == "tiny" and manifest["hf_dir"].startswith("$GRIT_CACHE_DIR/models/tiny-llama-")
    assert manifest["architecture"]["num_hidden_layers"] == 2

    store = open_store("sqlite:///outputs/centralized.db", tmp_path)
    with store.reader() as session:
        runs = session.scalars(select(Run)).all()
        stages = session.scalars(select(StageRun)).all()
        artifacts = session.scalars(select(Artifact)).all()
        variants = session.scalars(select(Variant)).all()
    assert len(runs) == 1 and runs[0].profile == "smoke" and runs[0].device.startswith(("cpu", "cuda"))
    assert [(s.stage, s.status) for s in stages] == [("prepare_model", "succeeded")]
    assert [(v.name, v.base_model) for v in variants] == [("base", manifest["name"])]
    assert len(artifacts) == 1
    assert artifacts[0].sha256 == sha256_file(tmp_path / "artifacts" / "base_model.json")


def test_failing_stage_is_recorded_as_failed_with_one_line(tmp_path: Path, repo_root: Path, monkeypatch):
    params = tmp_path / "params.yaml"
    compose_params("smoke", params, ["model.source=hf", f"+model.model_id={tmp_path / 'nowhere'}"])
    result = _run_stage(tmp_path, repo_root, params)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: model.model_id:")
    store = open_store("sqlite:///outputs/centralized.db", tmp_path)
    (stage,) = store.stages(store.runs()[0].id).values()
    assert stage.status == "failed" and "model.model_id" in stage.error
    assert store.runs()[0].status == "failed"
