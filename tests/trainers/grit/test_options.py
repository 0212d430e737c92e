"""GRIT options: accumulation, checkpointing, capture frequency, EMA, Fisher approximations,
factor sides, budgets and regularisers."""

from __future__ import annotations

import pytest
import torch
from tiny_lora import batches, tiny_lora_model

from trainers.grit import GritManager, GritParams
from trainers.grit import math as gm

MODULE = "base_model.model.model.layers.1.mlp.down_proj"


def captured(model, manager, micro_batches):
    for batch in micro_batches:
        model(**batch).loss.backward()
    manager.sync_factors()
    return manager.covariances(MODULE)


def test_gradient_accumulation_counts_every_micro_batch():
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams())
    micro = batches(2)
    sigma_u, sigma_v, rows = captured(model, manager, micro)
    assert rows == sum(int(b["attention_mask"].sum()) for b in micro)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_captures_each_row_once(reentrant):
    reference_model = tiny_lora_model(random_B=True)
    reference = captured(reference_model, GritManager(reference_model, GritParams()), batches(1))
    model = tiny_lora_model(random_B=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    checkpointed = captured(model, GritManager(model, GritParams()), batches(1))
    assert checkpointed[2] == reference[2]
    assert torch.allclose(checkpointed[0], reference[0], atol=1e-6)
    assert torch.allclose(checkpointed[1], reference[1], rtol=1e-4, atol=1e-12)


def test_capture_every_skips_steps():
    model = tiny_lora_model()
    manager = GritManager(model, GritParams(capture_every=2))
    optimizer = manager.wrap_optimizer(torch.optim.SGD(manager.lora_parameters(), lr=0.0))
    counts = []
    for batch in batches(4):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        counts.append(manager.modules[MODULE].u.count)
    assert counts[0] == counts[1] > 0 and counts[2] == counts[3] > counts[1]  # steps 1 and 3 not captured


def test_ema_statistics_follow_the_latest_batches():
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(statistics="ema", ema_decay=0.5))
    first, _, _ = captured(model, manager, batches(1, seed=1))
    second_batch = batches(1, seed=2)
    model(**second_batch[0]).loss.backward()
    manager.collect_captured()          # the hooks only stash; sync_factors would fold too
    pending = manager.modules[MODULE].u.pending / manager.modules[MODULE].u.pending_count
    manager.sync_factors()
    assert torch.allclose(manager.covariances(MODULE)[0], 0.5 * first + 0.5 * pending, atol=1e-6)


@pytest.mark.parametrize("fisher", ["diagonal", "block_diagonal"])
def test_fisher_approximations_have_their_structure(fisher):
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(fisher=fisher, block_size=2, min_samples=1))
    captured(model, manager, batches(1))
    manager.refresh_inverses(force=True)
    inverse = manager.modules[MODULE].inverse["B"]
    mask = torch.eye(4, dtype=torch.bool) if fisher == "diagonal" else torch.block_diag(
        torch.ones(2, 2), torch.ones(2, 2)).bool()
    assert torch.all(inverse[~mask] == 0) and torch.all(torch.diagonal(inverse) > 0)


def test_reference_sides_give_a_scalar_B_preconditioner_at_init_and_defaults_do_not():
    """The paper code (swapped sides, absolute damping) with B = 0 at init: Sigma_v = 0, so
    (Sigma_v + lI)^-1 = I/l, a scalar that Adam cancels (docs/method.md, failure 5). Our defaults use
    Sigma_u for B, with damping relative to its scale, and give a non-scalar preconditioner."""
    def B_preconditioner(sides, damping_mode):
        model = tiny_lora_model()
        manager = GritManager(model, GritParams(factor_sides=sides, damping_mode=damping_mode, min_samples=1))
        captured(model, manager, batches(1))
        manager.refresh_inverses(force=True)
        return manager.modules[MODULE].inverse["B"]

    assert gm.distance_from_scalar(B_preconditioner("reference", "absolute")) < 1e-6
    assert gm.distance_from_scalar(B_preconditioner("kfac", "relative")) > 0.05


def test_budget_schedules_pick_k():
    model = tiny_lora_model()
    state = next(iter(GritManager(model, GritParams()).modules.values()))
    eigenvalues = torch.tensor([8.0, 1.0, 0.5, 0.5])
    linear = GritManager(model, GritParams(budget_schedule="linear", budget_start=1, budget_end=4), total_steps=10)
    linear.step = 5
    assert linear.budget(state, eigenvalues) == 2  # round(1 + 3 * 0.5)
    adaptive = GritManager(model, GritParams(budget_schedule="adaptive", energy_threshold=0.8, min_rank=1))
    assert adaptive.budget(state, eigenvalues) == 1  # 8 / 10 of the energy
    assert GritManager(model, GritParams(reprojection_k=3)).budget(state, eigenvalues) == 3


def test_regulariser_gradients_equal_autograd_and_ramp_up():
    model = tiny_lora_model(random_B=True)
    config = GritParams(lambda_curvature=0.3, regularizer_warmup_steps=4, min_samples=1)
    manager = GritManager(model, config)
    captured(model, manager, batches(1))
    state = manager.modules[MODULE]
    sigma_u, sigma_v, _ = manager.covariances(MODULE)
    A = state.lora_A.weight.detach().clone().requires_grad_()
    B = state.lora_B.weight.detach().clone().requires_grad_()
    penalty = 0.3 * (torch.trace(A.T @ sigma_u @ A) + torch.trace(B @ sigma_v @ B.T))
    penalty.backward()
    before_A, before_B = state.lora_A.weight.grad.clone(), state.lora_B.weight.grad.clone()
    manager.step = 2  # half-way through the warm-up
    manager.add_regularizer_gradients()
    assert torch.allclose(state.lora_A.weight.grad - before_A, 0.5 * A.grad, atol=1e-6)
    assert torch.allclose(state.lora_B.weight.grad - before_B, 0.5 * B.grad, atol=1e-9)
