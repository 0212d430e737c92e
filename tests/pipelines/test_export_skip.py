"""A variant whose LoRA settings cannot be served (DoRA) is skipped by ``export@<variant>`` in one
line, without llama.cpp or a trained adapter, and the stage succeeds, so ``dvc repro`` goes on
(the whole path, serve included, runs in tests/pipelines/test_export_serve.py and the smoke run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from variant_subset import keep_only

from db.store import open_store
from pipelines.profile import compose_params


def test_export_skips_a_dora_variant_in_one_line_and_succeeds(tmp_path: Path, repo_root: Path):
    params = tmp_path / "params.yaml"
    compose_params("smoke", params)
    raw = keep_only(yaml.safe_load(params.read_text()),
                    {"peft_dora": {"engine": "peft", "lora_overrides": {"use_dora": True}}})
    raw["store"]["url"] = "sqlite:///outputs/centralized.db"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))

    result = subprocess.run([sys.executable, "-m", "pipelines.export", "--variant", "peft_dora"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if "skipped" in line]
    assert line == ("[export@peft_dora] skipped: DoRA adapters cannot be served: llama.cpp's LoRA converter takes "
                    "lora_A/lora_B tensors only, not DoRA's magnitude vectors")
    folder = tmp_path / "artifacts/export/peft_dora"
    assert [p.name for p in folder.iterdir()] == ["skipped.json"]        # the output dvc.yaml declares
    assert json.loads((folder / "skipped.json").read_text())["variant"] == "peft_dora"
    store = open_store("sqlite:///outputs/centralized.db", tmp_path)
    (run,) = store.runs()
    assert store.stages(run.id)["export@peft_dora"].status == "succeeded"
