"""The GRIT callback in a real transformers.Trainer: acts before the step, clips the natural
gradient, and gives clipping back afterwards."""

from __future__ import annotations

import pytest
import torch
from tiny_lora import Rows, tiny_lora_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from trainers.grit import GritManager, GritParams


class NormAtStep(TrainerCallback):
    """Registered after GRIT's callback: sees the gradient that optimizer.step() will use."""

    def __init__(self, parameters):
        self.parameters, self.norms = parameters, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters]))))


def test_callback_preconditions_before_the_step_and_clips_the_natural_gradient(tmp_path):
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(min_samples=8, update_freq=1))
    recorder = NormAtStep(manager.lora_parameters())
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, max_grad_norm=1e-3, lr_scheduler_type="constant",
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[manager.callback(), recorder])
    trainer.train()
    assert manager.step == 3 and manager.all_ready()
    assert manager.last_report["preconditioned_tensors"] == 2 * len(manager.modules)
    assert manager.last_report["grad_norm_preconditioned"] > 1e-3
    assert all(abs(norm - 1e-3) < 1e-7 for norm in recorder.norms), recorder.norms
    assert args.max_grad_norm == 1e-3  # the Trainer's setting is restored after training


def test_max_grad_norm_0_means_no_clipping_for_grit_as_for_the_trainer(tmp_path):
    """``train.max_grad_norm: 0`` is accepted and means no clipping (HF's Trainer reads it so;
    the GRIT paper trains without): the natural gradient reaches the optimizer unclipped."""
    from trainers.config import TrainParams

    assert TrainParams(max_grad_norm=0).max_grad_norm == 0
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(min_samples=8, update_freq=1))
    recorder = NormAtStep(manager.lora_parameters())
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, max_grad_norm=0.0, lr_scheduler_type="constant",
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[manager.callback(), recorder]).train()
    assert recorder.norms[-1] == pytest.approx(manager.last_report["grad_norm_preconditioned"], rel=1e-5)
    assert args.max_grad_norm == 0.0 and all(n > 0 for n in recorder.norms)
