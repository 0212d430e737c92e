"""GRIT-VLM on tiny random Idefics3 and Qwen2-VL models: per-modality LoRA shapes, capture and
preconditioning per modality (the probe's verdict, modality by modality), and training on
synthetic image-text pairs that lowers the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_vlm import tiny_vlm, tiny_vlm_files, vlm_params

from core.errors import UserError
from trainers.config import VariantParams
from trainers.grit.config import GritParams
from trainers.grit.layer import base_module_name, lora_layers
from trainers.grit_vlm.adapter import VlmGritAdapter, build_vlm_peft
from trainers.grit_vlm.config import modality_grit_config
from trainers.grit_vlm.data import synthetic_pairs, write_pairs
from trainers.grit_vlm.models import encoding_for
from trainers.grit_vlm.presets import preset, vlm_config
from trainers.probe.variant import probe_variant
from trainers.recipe import train_variant

PURE_GRIT = VariantParams(engine="peft", grit=True, control="peft_lora")


@pytest.fixture
def pairs_dir(tmp_path: Path) -> Path:
    write_pairs(synthetic_pairs(24, seed=0), tmp_path / "train_pairs.jsonl")
    return tmp_path


def test_each_modality_gets_its_own_rank_alpha_dropout_and_grit_settings():
    config = preset("smolvlm_fast").model_copy(update={"dropout": 0.05})
    model, selected = build_vlm_peft(tiny_vlm("idefics3"), config)
    shapes = {}
    for name, layer, adapter in lora_layers(model):
        modality = next(m for m, modules in selected.items() if base_module_name(name) in modules)
        dropout = layer.lora_dropout[adapter]
        shapes.setdefault(modality, set()).add(
            (layer.r[adapter], layer.lora_alpha[adapter], getattr(dropout, "p", 0.0)))
    assert shapes == {"vision": {(8, 16, 0.05)}, "language": {(16, 32, 0.05)}, "connector": {(16, 32, 0.05)}}
    adapter = VlmGritAdapter(model, config, selected, GritParams(min_samples=64))
    assert adapter.managers["connector"].config.fisher == "diagonal"
    assert adapter.managers["connector"].config.min_samples == 16       # the preset's connector override
    assert adapter.managers["vision"].config.fisher == "rank_kfac"
    assert adapter.managers["language"].config.min_samples == 64
    assert {m: len(a.modules) for m, a in adapter.managers.items()} == {"vision": 12, "language": 16, "connector": 1}
    adapter.detach()


def test_a_modality_speaks_the_grit_sections_names_and_is_validated_as_it():
    modality = preset("smolvlm_256m").vision
    merged = modality_grit_config(GritParams(damping=0.01), modality)
    assert (merged.budget_schedule, merged.budget_start, merged.budget_end) == ("linear", 4, 8)
    assert merged.damping == 0.01                     # the run's grit section, under the modality's fields
    assert modality_grit_config(GritParams(), preset("smolvlm_fast").connector).fisher == "diagonal"
    with pytest.raises(ValueError, match="'dampign' is not a field of the grit section"):
        modality.model_validate({**modality.model_dump(), "grit": {"dampign": 1.0}})
    with pytest.raises(ValueError, match="greater than 0"):        # a bad value fails when read, too
        modality.model_validate({**modality.model_dump(), "grit": {"damping": -1.0}})


@pytest.mark.parametrize("architecture", ["idefics3", "qwen2_vl"])
def test_capture_and_preconditioning_act_in_every_modality(architecture):
    params = vlm_params(architecture)
    config = vlm_config(params)
    files = tiny_vlm_files(architecture)
    model, selected = build_vlm_peft(tiny_vlm(architecture), config)
    encoding = encoding_for(files.hf_dir, model)
    # ungrafted natural gradient, so the norm shows that preconditioning acted
    adapter = VlmGritAdapter(model, config, selected, params.grit.model_copy(update={"graft_norm": False}))
    optimizer = adapter.wrap_optimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3), 1.0)
    pairs = synthetic_pairs(8, seed=1)
    for step in range(3):
        model(**encoding(pairs[4 * (step % 2): 4 * (step % 2) + 4])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    report, stats = adapter.last_report, adapter.modality_stats()
    for modality in selected:
        assert report[f"{modality}/rows_captured"] > 0
        assert report[f"{modality}/preconditioned_tensors"] == 2 * len(selected[modality])   # A and B, every module
        assert report[f"{modality}/grad_norm_preconditioned"] != pytest.approx(report[f"{modality}/grad_norm_raw"])
        assert stats[modality]["inverses_ready"] == stats[modality]["inverses_total"]
    assert report["preconditioned_tensors"] == sum(report[f"{m}/preconditioned_tensors"] for m in selected)
    adapter.detach()


@pytest.mark.parametrize("architecture", ["idefics3", "qwen2_vl"])
def test_probe_verdict_is_effective_in_every_modality(architecture, pairs_dir, tmp_path):
    params = vlm_params(architecture)
    assert params.variants["pure_grit"] == PURE_GRIT
    result = probe_variant("pure_grit", params, tiny_vlm_files(architecture), pairs_dir, tmp_path / "probe")
    modalities = result["modalities"]
    assert set(modalities) == {"vision", "language", "connector"}
    for modality, verdict in modalities.items():
        assert verdict["verdict"] == "effective", (modality, verdict["reasons"])
        assert verdict["measurements"]["modules"], modality
    assert result["verdict"] == "effective"
    assert len(result["control_losses"]) == len(result["grit_losses"]) == params.probe.steps


def test_a_modality_without_preconditioning_is_inert_there_and_only_there(pairs_dir, tmp_path):
    custom = preset("smolvlm_fast").model_dump()
    custom["vision"]["grit"] = {"precondition": False}
    params = vlm_params("idefics3", preset=None, vlm={"preset": None, "custom": custom})
    result = probe_variant("pure_grit", params, tiny_vlm_files("idefics3"), pairs_dir, tmp_path / "probe")
    modalities = result["modalities"]
    # a modality configured without natural gradient does not make the whole variant inert
    assert result["verdict"] == "effective"
    assert modalities["vision"]["verdict"] == "inert" and modalities["vision"]["precondition"] is False
    # its update still moves (the other modalities' preconditioned weights change its gradients),
    # but the optimizer consumed its raw gradients
    assert modalities["vision"]["reasons"] == ["gradients_not_preconditioned"]
    assert modalities["language"]["verdict"] == modalities["connector"]["verdict"] == "effective"


@pytest.mark.parametrize("architecture", ["idefics3", "qwen2_vl"])
def test_a_few_training_steps_on_image_text_pairs_reduce_the_loss(architecture, pairs_dir, tmp_path):
    params = vlm_params(architecture, train={"max_steps": 8, "learning_rate": 1e-2, "lr_scheduler": "constant"})
    result = train_variant("pure_grit", PURE_GRIT, params, tiny_vlm_files(architecture), pairs_dir,
                           tmp_path / "adapter", tmp_path / "checkpoints")
    losses = [row["loss"] for row in result.steps]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.15, losses   # measured: -0.27 (idefics3)
    meta = result.metadata
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert meta["grit_all_ready"] is True and meta["batches_trained"] == 8
    assert set(meta["grit_modality_stats"]) == {"vision", "language", "connector"}
    assert all(row["vision/preconditioned_tensors"] > 0 for row in meta["grit_modality_history"][1:])


def test_a_presets_declared_budgets_act_through_reprojection(tmp_path):
    """smolvlm_256m declares vision budgets 4 -> 8 and language 8 -> 16: they act only when
    reprojection runs, so the preset turns it on, on a cadence set by the run's length."""
    from tiny_lora import Rows, tiny_lora_model
    from transformers import Trainer, TrainingArguments

    from trainers.grit import GritManager

    config = modality_grit_config(GritParams(min_samples=8, update_freq=1), preset("smolvlm_256m").vision)
    assert config.reprojection and config.cadence == "budget"
    model = tiny_lora_model(r=8, random_B=True)
    manager = GritManager(model, config, total_steps=8)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[manager.callback()]).train()
    events = manager.rank_events
    assert len(events) >= config.reprojections and all(e["step"] < 8 for e in events)
    budgets = [e["budget_max"] for e in events]
    assert budgets == sorted(budgets) and 4 <= budgets[0] and budgets[-1] <= 8 and budgets[0] < 8


def test_a_presets_layers_and_budgets_can_be_overridden_field_by_field():
    from trainers.grit_vlm.params import VlmParams

    params = vlm_params("idefics3", vlm={"preset": "smolvlm_256m", "overrides": {
        "vision": {"layers": {"strategy": "last_n", "n_layers": 2}, "grit": {"budget_end": 6}},
        "language": {"patterns": ["model.text_model.layers.*.self_attn.q_proj"]}}})
    config, chosen = vlm_config(params), preset("smolvlm_256m")
    assert (config.vision.layers.strategy, config.vision.layers.n_layers) == ("last_n", 2)
    assert config.vision.grit == {**chosen.vision.grit, "budget_end": 6}           # the rest of the preset stays
    assert config.language.patterns == ["model.text_model.layers.*.self_attn.q_proj"]
    assert config.language.grit == chosen.language.grit and config.connector == chosen.connector
    with pytest.raises(UserError, match=r"vlm\.overrides\.vision: grit: 'budget_ends' is not a field"):
        vlm_config(vlm_params("idefics3", vlm={"preset": "smolvlm_256m",
                                               "overrides": {"vision": {"grit": {"budget_ends": 6}}}}))
    with pytest.raises(ValueError, match="overrides change a preset"):
        VlmParams(preset=None, custom=chosen, overrides={"r": 8})


def _joint(**grit):
    """smolvlm_fast with one joint projection budget, reprojecting twice over an 8-step run."""
    return vlm_params("idefics3", vlm={"preset": "smolvlm_fast", "overrides": {"joint_budget": {"factor": 1.2}}},
                      train={"max_steps": 8, "learning_rate": 1e-2, "lr_scheduler": "constant"},
                      grit={"cadence": "budget", "reprojections": 2, "reprojection_warmup_fraction": 0.25,
                            "min_samples": 8, "update_freq": 1, **grit})


def test_a_joint_projection_budget_is_shared_by_every_modality(pairs_dir, tmp_path):
    """One k for vision, language and connector: round(1.2 x the median vision rank by energy),
    at every joint reprojection; no modality reprojects on its own schedule."""
    from trainers.grit.math import joint_budget

    params = _joint()
    assert vlm_config(params).joint_budget.factor == 1.2
    adapters = []
    train_variant("pure_grit", PURE_GRIT, params, tiny_vlm_files("idefics3"), pairs_dir, tmp_path / "adapter",
                  tmp_path / "checkpoints", on_trained=lambda model, manager: adapters.append(manager) or {})
    adapter = adapters[0]
    events = adapter.joint_events
    assert len(events) >= 2 and all(e["step"] < 8 for e in events)
    for event in events:
        assert event["k"] == joint_budget([event["vision_rank_median"]], 1.2, 1)
        for name, manager in adapter.managers.items():
            own = [e for e in manager.rank_events if e["step"] == event["step"]]
            assert len(own) == 1, (name, manager.rank_events)          # reprojected with the others
            ranks = [s.rank for s in manager.modules.values()]
            assert own[0]["budget_max"] == min(event["k"], max(ranks)), name
    assert all(len(m.rank_events) == len(events) for m in adapter.managers.values())   # nothing of their own


def test_with_a_joint_budget_the_probe_still_judges_every_modality(pairs_dir, tmp_path):
    params = _joint()
    result = probe_variant("pure_grit", params, tiny_vlm_files("idefics3"), pairs_dir, tmp_path / "probe")
    assert {m: v["verdict"] for m, v in result["modalities"].items()} == {
        "vision": "effective", "language": "effective", "connector": "effective"}


def test_a_joint_budget_needs_a_vision_modality():
    custom = preset("smolvlm_fast").model_dump()
    custom.update(vision=None, joint_budget={"factor": 1.2})
    from pipelines.params import ParamsError

    with pytest.raises(ParamsError, match="vlm.custom: joint_budget is set from the vision rank, but the "
                                          "configuration has no vision modality"):
        vlm_params("idefics3", vlm={"preset": None, "custom": custom})
