"""GRIT's cadence for a run of known length: reprojection and rank adaptation act at least
``reprojections`` times in any budget, and never on a step with no training after it."""

from __future__ import annotations

import pytest
import torch
from tiny_lora import batches, tiny_lora_model

from trainers.grit import GritError, GritManager, GritParams
from trainers.grit.cadence import for_budget, reprojection_due, reprojection_steps

PAPER = GritParams(reprojection=True, cadence="budget", truncate=True, budget_schedule="adaptive")


@pytest.mark.parametrize("total", [4, 8, 16, 32, 33, 96, 97, 288, 1000])
def test_a_budget_cadence_reprojects_at_least_three_times_with_training_after_the_last(total):
    scaled = for_budget(PAPER, total)
    steps = reprojection_steps(scaled, total)
    assert len(steps) >= PAPER.reprojections, (total, steps)
    assert steps[0] >= scaled.reprojection_warmup_steps == scaled.rank_adaptation_start_step
    assert steps[-1] < total                                  # training follows the last one
    assert scaled.ng_warmup_steps == round(0.1 * total)
    assert scaled.update_freq <= max(1, scaled.reprojection_freq // 2)   # inverted between reprojections


def test_a_steps_cadence_is_taken_as_written_but_never_reprojects_on_the_last_step():
    written = GritParams(reprojection=True, reprojection_freq=16)
    assert for_budget(written, 32) is written
    assert reprojection_steps(written, 32) == [16]                 # 32 is a multiple, and the last step
    assert reprojection_due(32, written, None)                      # an open-ended run still reprojects
    assert not reprojection_due(16, written.model_copy(update={"reprojection_warmup_steps": 17}), 32)


def test_the_manager_truncates_only_with_steps_left_to_train():
    """Reprojection every 2 steps in a 4-step run with truncation: at step 2, not at step 4."""
    model = tiny_lora_model(random_B=True)
    config = GritParams(min_samples=8, update_freq=1, reprojection=True, reprojection_freq=2, truncate=True,
                        budget_schedule="constant", reprojection_k=2)
    manager = GritManager(model, config, total_steps=4)
    optimizer = manager.wrap_optimizer(torch.optim.AdamW(manager.lora_parameters(), lr=1e-2), max_grad_norm=1.0)
    calls = []
    original = manager.reproject
    manager.reproject = lambda *a, **k: calls.append(manager.step) or original(*a, **k)
    for batch in batches(4):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert calls == [2] and set(manager.effective_ranks().values()) == {2}


def test_a_budget_cadence_follows_the_run_length_the_trainer_announces():
    model = tiny_lora_model(random_B=True)
    with pytest.raises(GritError, match="needs the run's length"):
        GritManager(model, PAPER)
    manager = GritManager(model, PAPER, total_steps=32)
    assert manager.config.reprojection_warmup_steps == 8
    manager.total_steps = 96                                  # as GritCallback does at on_train_begin
    assert manager.config.reprojection_warmup_steps == 24 and manager.requested is PAPER
