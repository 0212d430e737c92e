"""The paper's warm-ups: no natural gradient, no reprojection and no rank adaptation before their
step (each counted in optimizer steps completed, ``GritManager.step``)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny_lora import batches, tiny_lora_model

from trainers.grit import GritManager, GritParams


def gradients_after_before_step(manager: GritManager, model, batch) -> tuple[list, list]:
    """The LoRA gradients of one backward, raw and after ``before_step`` (no clipping)."""
    model(**batch).loss.backward()
    raw = [p.grad.clone() for p in manager.lora_parameters()]
    manager.before_step(max_grad_norm=None)
    changed = [p.grad.clone() for p in manager.lora_parameters()]
    model.zero_grad()
    return raw, changed


def test_no_natural_gradient_before_ng_warmup_steps_but_the_factors_fill_and_invert():
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(min_samples=1, update_freq=1, ng_warmup_steps=2))
    batch = batches(1)[0]
    for step in range(3):
        manager.step = step
        raw, stepped = gradients_after_before_step(manager, model, batch)
        assert manager.all_ready(), "statistics are captured and inverted during the warm-up"
        unchanged = all(torch.equal(r, s) for r, s in zip(raw, stepped, strict=True))
        assert unchanged == (step < 2), step
        assert manager.last_report["preconditioned_tensors"] == (0 if step < 2 else 2 * len(manager.modules))


def test_clipping_still_bounds_the_gradient_during_the_ng_warmup():
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(min_samples=1, ng_warmup_steps=5))
    model(**batches(1)[0]).loss.backward()
    manager.before_step(max_grad_norm=1e-4)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in manager.lora_parameters()]))
    assert float(norm) == pytest.approx(1e-4, rel=1e-4)


def test_no_reprojection_before_reprojection_warmup_steps(monkeypatch):
    manager = GritManager(tiny_lora_model(), GritParams(reprojection=True, reprojection_freq=2,
                                                        reprojection_warmup_steps=5))
    reprojected_at = []
    monkeypatch.setattr(manager, "reproject", lambda k=None: reprojected_at.append(manager.step))
    for _ in range(8):
        manager.after_step()
    assert reprojected_at == [6, 8]


def test_reprojection_keeps_the_full_rank_before_rank_adaptation_starts():
    model = tiny_lora_model(random_B=True)
    config = GritParams(min_samples=1, reprojection=True, reprojection_k=2, truncate=True,
                        rank_adaptation_start_step=3)
    manager = GritManager(model, config)
    model(**batches(1)[0]).loss.backward()
    manager.sync_factors()
    before = [p.detach().clone() for p in manager.lora_parameters()]
    manager.step = 2
    assert set(manager.reproject().values()) == {4}
    for old, new in zip(before, manager.lora_parameters(), strict=True):
        assert torch.allclose(old, new, atol=1e-5)      # k = r: a rotation that changes nothing
    manager.step = 3
    assert set(manager.reproject().values()) == {2}     # from then on the budget and truncation


@pytest.mark.parametrize("field", ["ng_warmup_steps", "reprojection_warmup_steps", "rank_adaptation_start_step"])
def test_warmups_default_to_off_and_reject_negative_steps(field):
    assert getattr(GritParams(), field) == 0
    with pytest.raises(ValidationError, match=field):
        GritParams(**{field: -1})
