"""``train.optim``: the Trainer builds the chosen optimizer and GRIT wraps whichever it is;
bitsandbytes' 8-bit AdamW is refused on CPU in one line before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.params import parse_params
from trainers.base_model import resolve_base_model
from trainers.engines import build_peft
from trainers.hardware import check_hardware
from trainers.probe.arms import innermost_optimizer
from trainers.recipe import attach_grit, build_trainer
from trainers.sft import ordered_examples

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("optim", "expected"), [("sgd", torch.optim.SGD), ("adamw_torch", torch.optim.AdamW)])
def test_grit_wraps_the_optimizer_train_optim_chooses(optim, expected, tmp_path: Path):
    params = parse_params({"model": {"source": "tiny"}, "lora": {"r": 4, "alpha": 8},
                           "train": {"max_steps": 2, "per_device_batch_size": 2, "warmup_steps": 0, "optim": optim},
                           "probe": {"steps": 2}})
    torch.manual_seed(0)
    engine = build_peft(resolve_base_model(params.model), params)
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(8)]
    examples = ordered_examples(rows, engine.tokenizer, 4, 0)
    attachment = attach_grit(engine.model, params.grit.model_copy(update={"min_samples": 4, "update_freq": 1}),
                             "optimizer", params.train.max_steps)
    trainer = build_trainer(engine.model, engine.tokenizer, examples, params.train, tmp_path, attachment, [],
                            checkpoints=False, progress=False)
    trainer.train()
    assert hasattr(trainer.optimizer, "manager") or hasattr(trainer.optimizer.optimizer, "manager")
    assert type(innermost_optimizer(trainer.optimizer)) is expected
    assert attachment.manager.step == 2


def test_8bit_adamw_is_refused_on_cpu_in_one_line(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: adamw_8bit can run here")
    train = parse_params({"train": {"optim": "adamw_8bit"}}).train
    with pytest.raises(Exception, match="train.optim: adamw_8bit needs a CUDA GPU"):
        check_hardware(None, train)
    from pipelines.profile import compose_params

    compose_params("smoke", tmp_path / "params.yaml")
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["train"]["optim"] = "adamw_8bit"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "pipelines.train", "--variant", "grit_paper"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.optim: adamw_8bit"), result.stderr
