"""The VLM smoke profile through the stages that take a vision-language model (its own pipeline run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pipeline_copy import _sh, repo_copy

from pipelines.params import load_params

pytestmark = pytest.mark.slow     # a DVC pipeline of the vlm_smoke profile


def test_vlm_smoke_trains_every_variant_and_probes_each_modality(tmp_path_factory):
    """model.kind: vlm (a tiny Idefics3, GRIT-VLM preset smolvlm_fast, synthetic image-text pairs)
    through prepare_model, prepare_data, train@* and the per-modality probe; the text-only stages
    refuse it in one line."""
    repo, env = repo_copy(tmp_path_factory, ["vlm_smoke"])
    _sh(["dvc", "repro", "probe"], repo, env)
    params = load_params(repo / "params.yaml")
    assert params.model.kind == "vlm"
    metrics = {v: json.loads((repo / "metrics/train" / f"{v}.json").read_text()) for v in params.variants}
    assert len({m["batch_order_hash"] for m in metrics.values()}) == 1          # the same image-text batches
    for name in params.variants:
        meta = json.loads((repo / "artifacts/adapters" / name / "grit_metadata.json").read_text())
        assert meta["model_kind"] == "vlm" and meta["steps"] == params.train.max_steps
        assert meta["final_loss"] < meta["first_loss"]
        assert set(meta["modality_modules"]) == {"vision", "language", "connector"}
    probes = json.loads((repo / "metrics/probes.json").read_text())["variants"]
    assert set(probes) == {"hybrid_grit", "pure_grit", "riemannian_lora", "loraplus"}   # GRIT's and its peers'
    for name, summary in probes.items():
        assert summary["verdict"] == "effective", (name, summary["checks"])
        if summary["preconditioner"] != "grit":      # a peer acts on the whole adapter, not per modality
            assert "modalities" not in summary
            continue
        assert {m: s["verdict"] for m, s in summary["modalities"].items()} == {
            "vision": "effective", "language": "effective", "connector": "effective"}
    refused = subprocess.run([sys.executable, "-m", "pipelines.export", "--variant", "pure_grit"], cwd=repo, env=env,
                             capture_output=True, text=True)
    assert refused.returncode != 0
    assert "model.kind is 'vlm'" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
