"""The seams of trainers/grit: both managers satisfy the doors' Preconditioner protocol, the one
clipping rule holds in both doors, the batched damping equals the per-matrix one, and a
module's own operations act on that module alone."""

from __future__ import annotations

import pytest
import torch
from tiny_lora import batches, tiny_lora_model
from tiny_vlm import tiny_vlm, vlm_params

from trainers.grit import math as gm
from trainers.grit.config import GritParams
from trainers.grit.doors import GritCallback, Preconditioner, trainer_clipping_norm
from trainers.grit.manager import GritManager
from trainers.grit_vlm.adapter import VlmGritAdapter, build_vlm_peft
from trainers.grit_vlm.presets import vlm_config


def test_both_managers_are_preconditioners():
    manager = GritManager(tiny_lora_model(), GritParams())
    assert isinstance(manager, Preconditioner)
    params = vlm_params("idefics3")
    model, selected = build_vlm_peft(tiny_vlm("idefics3"), vlm_config(params))
    adapter = VlmGritAdapter(model, vlm_config(params), selected, params.grit)
    assert isinstance(adapter, Preconditioner)
    assert not isinstance(object(), Preconditioner)
    manager.detach()
    adapter.detach()


def test_the_trainer_clips_only_without_grit_and_the_callback_restores_its_norm():
    assert trainer_clipping_norm(1.0, grit_clips=True) == 0.0
    assert trainer_clipping_norm(1.0, grit_clips=False) == 1.0

    class Args:
        max_grad_norm = 0.7

    class State:
        max_steps = 3

    manager = GritManager(tiny_lora_model(), GritParams())
    callback, args = GritCallback(manager), Args()
    callback.on_train_begin(args, State(), None)
    assert args.max_grad_norm == 0.0 and callback.max_grad_norm == 0.7 and manager.total_steps == 3
    callback.on_train_end(args, State(), None)
    assert args.max_grad_norm == 0.7
    manager.detach()


def test_batched_damping_is_the_per_matrix_damping():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    sigmas = x.transpose(-1, -2) @ x                                   # [5, 3, 3], PSD
    for mode in ("relative", "absolute"):
        batched = gm.effective_damping(sigmas, 1e-3, mode)
        single = torch.stack([gm.effective_damping(s, 1e-3, mode) for s in sigmas])
        assert batched.shape == (5,) and torch.equal(batched, single)
    assert float(gm.effective_damping(torch.eye(3), 0.1, "relative")) == pytest.approx(0.1, rel=1e-6)


def test_a_module_preconditions_only_its_own_gradients():
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(min_samples=1, graft_norm=False))
    model(**batches(1)[0]).loss.backward()
    manager.sync_factors()
    manager.refresh_inverses(force=True)
    first, second = list(manager.modules.values())[:2]
    before = {s.name: (s.lora_A.weight.grad.clone(), s.lora_B.weight.grad.clone()) for s in (first, second)}
    with torch.no_grad():
        assert first.precondition(manager.config) == 2
    grad_A, grad_B = before[first.name]
    torch.testing.assert_close(first.lora_B.weight.grad, gm.precondition_B(grad_B, first.inverse["B"]))
    torch.testing.assert_close(first.lora_A.weight.grad, gm.precondition_A(grad_A, first.inverse["A"]))
    assert torch.equal(second.lora_A.weight.grad, before[second.name][0])    # untouched
    manager.detach()
