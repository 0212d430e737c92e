"""Run bookkeeping: a run is complete when every stage of dvc.yaml succeeded for its params,
counting stages that DVC skipped because their own params did not change."""

from __future__ import annotations

import json
from pathlib import Path

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
