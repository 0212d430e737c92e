"""``train.nproc_per_node: 2``: the train stage launches torchrun (gloo on CPU), both ranks train
pure GRIT on their shards, and the replicas end with identical LoRA weights and GRIT factors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from variant_subset import keep_only

from db.models import TrainMetric
from db.store import open_store
from pipelines.profile import compose_params

pytestmark = pytest.mark.slow     # trains under torchrun

REPO = Path(__file__).resolve().parents[2]


def run(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=workdir, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_data_parallel_training_keeps_every_rank_in_step(tmp_path: Path):
    compose_params("smoke", tmp_path / "params.yaml")
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    # Only pure GRIT: the smoke profile's grit_paper truncates, which data parallelism refuses.
    keep_only(raw, {"pure_grit": {"engine": "peft", "grit": True}})
    raw["train"]["nproc_per_node"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in (["pipelines.prepare_data"], ["pipelines.train", "--variant", "pure_grit"]):
        result = run(tmp_path, *stage)
        # the ranks' own log (torchrun's, on stderr) in full: a failure once under the suite's load
        # left only its last line in a 3,000-character tail
        assert result.returncode == 0, (stage, result.stdout[-3000:], result.stderr[-20000:])

    metadata = json.loads((tmp_path / "artifacts/adapters/pure_grit/grit_metadata.json").read_text())
    assert metadata["world_size"] == 2 and metadata["grit_all_ready"]
    digests = metadata["rank_state_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "ranks diverged: GRIT factors or LoRA weights differ"
    assert (tmp_path / "artifacts/adapters/pure_grit/adapter_model.safetensors").is_file()
    store = open_store("sqlite:///outputs/centralized.db", tmp_path)
    with store.reader() as session:
        steps = session.scalars(select(TrainMetric.step).where(TrainMetric.variant == "pure_grit")
                                .order_by(TrainMetric.step)).all()
    assert steps == list(range(1, raw["train"]["max_steps"] + 1))
    assert (tmp_path / "metrics/train/pure_grit.json").is_file()
