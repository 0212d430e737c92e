"""One rule for settings that need hardware (``trainers/hardware.py``): which settings a machine
without CUDA cannot honour, each refused in one line that says what to set instead."""

from __future__ import annotations

import pytest

from trainers.config import ModelParams, TrainParams
from trainers.hardware import CUDA_ONLY, HardwareError, check_hardware, unmet_needs

PLAIN = ModelParams(source="tiny"), TrainParams()


def test_plain_settings_need_nothing():
    assert unmet_needs(*PLAIN, cuda=False) == []


@pytest.mark.parametrize("need", CUDA_ONLY, ids=lambda need: f"{need.section}.{need.field}")
def test_each_cuda_only_setting_is_refused_without_cuda_only(need):
    model, train = PLAIN
    sections = {"model": model, "train": train}
    sections[need.section] = sections[need.section].model_copy(update={need.field: need.value})
    (refusal,) = unmet_needs(sections["model"], sections["train"], cuda=False)
    assert refusal.startswith(f"{need.section}.{need.field}: ") and "needs a CUDA GPU" in refusal
    assert "\n" not in refusal
    assert unmet_needs(sections["model"], sections["train"], cuda=True) == []


def test_every_unmet_setting_is_named_in_one_line(monkeypatch):
    model = ModelParams(source="tiny", load_in_4bit=True, dtype="float16")
    train = TrainParams(optim="adamw_8bit")
    assert [r.split(":")[0] for r in unmet_needs(model, train, cuda=False)] == [
        "model.load_in_4bit", "model.dtype", "train.optim"]
    assert unmet_needs(model, None, cuda=False)[-1].startswith("model.dtype")      # train not checked
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(HardwareError) as refused:
        check_hardware(model, train)
    assert "\n" not in str(refused.value) and str(refused.value).count("needs a CUDA GPU") == 3
