"""The first stage of ``dvc repro`` refuses a setting this machine cannot honour (issue 59): before,
``train.optim: adamw_8bit`` on a CPU machine passed prepare_model and prepare_data and was refused
only when train started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.prepare_model import main
from pipelines.profile import compose_params


@pytest.fixture(autouse=True)
def _keep_pytests_faulthandler(monkeypatch):
    """run_stage points faulthandler at sys.stderr, which capsys replaces by a file without a descriptor."""
    monkeypatch.setattr("pipelines.stage.faulthandler.enable", lambda: None)


def test_prepare_model_refuses_adamw_8bit_without_cuda(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)       # CI has no GPU; a GPU machine too
    compose_params("smoke", tmp_path / "params.yaml")
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["train"]["optim"] = "adamw_8bit"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["--params", "params.yaml"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.optim: adamw_8bit needs a CUDA GPU"), lines
    assert not (tmp_path / "artifacts" / "base_model.json").exists()       # refused before any work
