"""``train_variant`` with GRIT's truncation on the tiny model: a run interrupted after a checkpoint
resumes (into a model rebuilt at full rank) to the adapter of an uninterrupted run, that adapter
reloads in PEFT, and the metadata counts the fewer trainable parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel
from safetensors.torch import load_file

from pipelines.params import parse_params
from trainers.base_model import load_causal_lm, resolve_base_model
from trainers.config import VariantParams
from trainers.recipe import train_variant

PURE_GRIT = VariantParams(engine="peft", grit=True)
STEPS, INTERRUPT_AT = 7, 4              # checkpoint at step 3, killed after step 4
# Reprojection every 2 steps with a budget falling 4 -> 1 over 7 steps: ranks 3, 2, 1 at steps 2, 4,
# 6 (never at 7, the last), so the checkpoint holds truncated factors and the resumed run truncates
# further, then trains a step at rank 1.
GRIT = {"min_samples": 8, "update_freq": 1, "reprojection": True, "reprojection_freq": 2, "truncate": True,
        "budget_schedule": "linear", "budget_start": 4, "budget_end": 1, "min_samples_g": 8}


class Interrupted(Exception):
    pass


class KillAfter:
    """A dvclive stand-in that stops training once step ``step`` is logged (after the checkpoint
    of step ``save_steps``, before the next one)."""

    def __init__(self, step: int) -> None:
        self.kill_at, self.step = step, 0

    def log_metric(self, name: str, value) -> None:
        pass

    def next_step(self) -> None:
        if self.step == self.kill_at:
            raise Interrupted


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    params = parse_params({
        "model": {"source": "tiny"}, "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": STEPS, "save_steps": 3, "per_device_batch_size": 2, "warmup_steps": 0,
                  "learning_rate": 1e-2},
        "grit": GRIT,
    })
    data_dir = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(16)]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return params, resolve_base_model(params.model), data_dir


def test_an_interrupted_truncating_run_resumes_to_the_uninterrupted_adapter(setting, tmp_path: Path):
    params, files, data_dir = setting
    straight = train_variant("pure_grit", PURE_GRIT, params, files, data_dir, tmp_path / "straight",
                             tmp_path / "straight-checkpoints")
    ranks = straight.metadata["effective_ranks"]
    assert min(ranks.values()) == 1, ranks

    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Interrupted):
        train_variant("pure_grit", PURE_GRIT, params, files, data_dir, tmp_path / "resumed", checkpoints,
                      live=KillAfter(INTERRUPT_AT))
    saved = load_file(checkpoints / "checkpoint-3" / "adapter_model.safetensors")
    assert {t.shape[0] for n, t in saved.items() if ".lora_A." in n} == {3}      # truncated at step 2
    resumed = train_variant("pure_grit", PURE_GRIT, params, files, data_dir, tmp_path / "resumed", checkpoints)
    assert resumed.metadata["resumed_from"] == "checkpoint-3"
    assert [row["loss"] for row in resumed.steps] == pytest.approx([row["loss"] for row in straight.steps], abs=1e-6)

    expected = load_file(tmp_path / "straight/adapter_model.safetensors")
    actual = load_file(tmp_path / "resumed/adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].shape == actual[name].shape, name
        assert (expected[name] - actual[name]).abs().max() <= 1e-6, name

    # The saved adapter is a valid PEFT adapter at its truncated ranks.
    reloaded = PeftModel.from_pretrained(load_causal_lm(files, params.model), str(tmp_path / "resumed"))
    assert {n: t.shape for n, t in reloaded.state_dict().items() if ".lora_" in n} == {
        n.replace(".weight", ".default.weight"): t.shape for n, t in actual.items()}

    # Fewer trainable parameters than the same LoRA untruncated: exactly those of the saved factors.
    assert resumed.metadata["trainable_parameters"] == sum(t.numel() for t in actual.values())
    full_rank = sum(t.numel() * 4 // min(t.shape) for t in actual.values())   # r = 4 < every d_in, d_out
    assert resumed.metadata["trainable_parameters"] < full_rank


def test_an_untruncated_run_counts_every_lora_parameter(setting, tmp_path: Path):
    params, files, data_dir = setting
    plain = params.model_copy(update={"train": params.train.model_copy(update={"max_steps": 1})})
    result = train_variant("peft_lora", VariantParams(engine="peft"), plain, files, data_dir, tmp_path / "a",
                           tmp_path / "c")
    adapter = load_file(tmp_path / "a/adapter_model.safetensors")
    assert {t.shape[0] for n, t in adapter.items() if ".lora_A." in n} == {4}
    assert result.metadata["trainable_parameters"] == sum(t.numel() for t in adapter.values())
