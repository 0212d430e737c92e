"""Run bookkeeping: a run is complete when every stage of dvc.yaml succeeded for its params,
counting stages that DVC skipped because their own params did not change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from db.models import Run
from db.store import open_store, utcnow
from pipelines.params import parse_params
from pipelines.stage import _refresh_run_status, stage_params

DVC_YAML = """
stages:
  train:
    foreach: ${variants}
    do:
      cmd: python -m pipelines.train --variant ${key}
      params:
        - train
        - variants.${key}
  evaluate:
    cmd: python -m pipelines.evaluate
    params:
      - eval
"""


def _run(store, run_id: str, params) -> None:
    store.start_run(Run(id=run_id, git_revision=None, params_hash=run_id, params_json=params.model_dump_json(),
                        profile="smoke", host="h", device="cpu", started_at=utcnow()))


def test_stages_dvc_skipped_count_towards_a_complete_run(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    variants = {"pure_grit": {"engine": "peft", "grit": True}}
    first = parse_params({"variants": variants})
    assert stage_params(tmp_path, first) == {"train@pure_grit": ["train", "variants.pure_grit"], "evaluate": ["eval"]}
    store = open_store("sqlite:///store.db", tmp_path)
    _run(store, "a", first)
    for stage in ("train@pure_grit", "evaluate"):
        store.record_stage("a", stage, "succeeded", utcnow())
    _refresh_run_status(store, "a", tmp_path, first)
    assert {r.id: r.status for r in store.runs()} == {"a": "complete"}

    # Only eval changed: DVC re-runs evaluate alone, and the new run is complete.
    second = parse_params({"variants": variants, "eval": {"gamma": 0.7}})
    _run(store, "b", second)
    store.record_stage("b", "evaluate", "succeeded", utcnow())
    _refresh_run_status(store, "b", tmp_path, second)
    # A train change cannot borrow the old training stage: that run stays running.
    third = parse_params({"variants": variants, "train": {"max_steps": 7}, "probe": {"steps": 2}})
    _run(store, "c", third)
    store.record_stage("c", "evaluate", "succeeded", utcnow())
    _refresh_run_status(store, "c", tmp_path, third)
    assert {r.id: r.status for r in store.runs()} == {"a": "complete", "b": "complete", "c": "running"}
    assert json.loads(store.runs()[1].params_json)["eval"]["gamma"] == 0.7


# Two stages of a real DVC pipeline: "evaluate" records figures in the store and writes a
# DVC-cached output (absent from a fresh clone), "study" writes a committed output (present).
_EVALUATE = """
from db.models import EvalMetric
from pipelines.stage import run_stage

def work(ctx, _):
    with ctx.store.transaction() as session:
        for model in ("base", *ctx.params.variants):
            ctx.store.replace_rows(session, EvalMetric, ctx.run_id, [{"value": 0.5, "ci_low": 0.4, "ci_high": 0.6,
                                   "n": 10}], variant=model, seed=ctx.params.train.seed, metric="aqi")
    (ctx.root / "evaluated.txt").write_text("figures\\n")
    return {}

raise SystemExit(run_stage("evaluate", work))
"""
_STUDY = """
from pipelines.stage import run_stage

def work(ctx, _):
    (ctx.root / "study.txt").write_text("the committed report\\n")
    return {}

raise SystemExit(run_stage("study", work))
"""
_PIPELINE = """
stages:
  evaluate:
    cmd: python evaluate_stage.py
    deps: [evaluate_stage.py]
    params: [eval]
    outs: [evaluated.txt]
  study:
    cmd: python study_stage.py
    deps: [study_stage.py]
    params: [study]
    outs:
      - study.txt:
          cache: false
"""


@pytest.mark.slow
def test_a_fresh_clone_whose_committed_stage_dvc_skips_completes_its_run(tmp_path: Path, repo_root: Path):
    """A newcomer's first ``dvc repro`` on a fresh clone (empty store): DVC skips the stage whose
    committed outputs match dvc.lock, and the run must still be complete for compare_all."""
    import os
    import shutil
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(repo_root), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid"}

    def sh(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done

    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(repo_root / "params.yaml", origin / "params.yaml")
    (origin / "evaluate_stage.py").write_text(_EVALUATE)
    (origin / "study_stage.py").write_text(_STUDY)
    (origin / "dvc.yaml").write_text(_PIPELINE)
    (origin / ".gitignore").write_text("outputs/\n")
    sh("git", "init", "-q", cwd=origin)
    sh("dvc", "init", "-q", cwd=origin)
    sh("dvc", "repro", cwd=origin)
    sh("git", "add", "-A", cwd=origin)
    sh("git", "commit", "-qm", "a pipeline with a committed study", cwd=origin)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert not (clone / "outputs").exists() and not (clone / "evaluated.txt").exists()
    repro = sh("dvc", "repro", cwd=clone).stdout
    assert "[evaluate] done" in repro and "[study] done" not in repro       # DVC skipped the study

    store = open_store("sqlite:///outputs/centralized.db", clone)
    assert [r.status for r in store.runs()] == ["complete"]
    assert set(store.stages(store.runs()[0].id)) == {"evaluate"}
    shown = sh(sys.executable, "-m", "evaluation.compare_all", cwd=clone).stdout
    assert f"# Comparison of run {store.runs()[0].id}" in shown
