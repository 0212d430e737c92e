"""Truncated adapters outside the training loop: PEFT reloads them with the same function, a
checkpoint saved after truncation loads into a model rebuilt at full rank, and data-parallel
training refuses truncation."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tiny_lora import batches, tiny_base_model, tiny_lora_model

from trainers.grit import GritError, GritManager, GritParams
from trainers.grit.layer import rank_pattern_key

TRUNCATING = GritParams(min_samples=8, reprojection=True, truncate=True, budget_schedule="adaptive",
                        energy_threshold=0.9, min_rank=1)


def truncated_model(rslora: bool = False):
    """A tiny LoRA model trained 2 GRIT steps, then reprojected so that some modules shrink."""
    model = tiny_lora_model(random_B=True, rslora=rslora)
    manager = GritManager(model, TRUNCATING)
    optimizer = manager.wrap_optimizer(torch.optim.AdamW(manager.lora_parameters(), lr=1e-2), max_grad_norm=1.0)
    for batch in batches(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ranks = manager.reproject()
    assert 4 in ranks.values() and min(ranks.values()) < 4, ranks   # some shrink, some keep r
    return model, manager


@pytest.mark.parametrize("rslora", [False, True])
def test_a_truncated_adapter_reloads_with_peft_and_computes_the_same(tmp_path, rslora):
    model, manager = truncated_model(rslora)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_base_model(), tmp_path)
    for name, layer, adapter in ((s.name, s.layer, s.adapter) for s in manager.modules.values()):
        twin = reloaded.get_submodule(name)
        assert twin.lora_A[adapter].weight.shape == layer.lora_A[adapter].weight.shape, name
        assert twin.scaling[adapter] == pytest.approx(layer.scaling[adapter], rel=1e-6), name
    batch = batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_rank_pattern_keys_select_exactly_one_module():
    targeted = ["model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj"]
    assert rank_pattern_key("model.layers.1.mlp.up_proj", targeted) == r"model\.layers\.1\.mlp\.up_proj"
    with pytest.raises(GritError, match="no PEFT rank_pattern key can select it alone"):
        rank_pattern_key("layers.0.q_proj", ["layers.0.q_proj", "encoder.layers.0.q_proj"])


def test_a_state_saved_after_truncation_shrinks_a_model_rebuilt_at_full_rank():
    model, manager = truncated_model()
    saved_state = manager.state_dict()
    saved_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    rebuilt = tiny_lora_model(random_B=True)
    resumed = GritManager(rebuilt, TRUNCATING)
    resumed.load_state_dict(saved_state)
    assert resumed.effective_ranks() == manager.effective_ranks()
    assert rebuilt.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    rebuilt.load_state_dict(saved_weights, strict=False)     # what the Trainer's load_adapter does
    batch = batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
    # The optimizer must be built on the shrunk factors: loading after it was built is refused.
    late = GritManager(tiny_lora_model(), TRUNCATING)
    late.wrap_optimizer(torch.optim.AdamW(late.lora_parameters()))
    with pytest.raises(GritError, match="load the GRIT state before building the optimizer"):
        late.load_state_dict(saved_state)


def test_truncation_is_refused_when_the_launcher_announces_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(GritError, match=r"grit.truncate cannot train data-parallel \(2 processes\)"):
        GritManager(tiny_lora_model(), GritParams(reprojection=True, truncate=True))
    GritManager(tiny_lora_model(), GritParams(reprojection=True))   # without truncation: fine
