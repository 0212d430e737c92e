"""GritCallback: GRIT injected into any ``transformers.Trainer`` (the hybrid Unsloth+GRIT run).

HF's order is backward -> clip (``max_grad_norm``) -> ``on_pre_optimizer_step`` ->
``optimizer.step()`` -> ``on_optimizer_step``. GRIT must act *before* the step (the original
hybrid acted at ``on_optimizer_step``, after it, and changed nothing), and clipping must bound
the preconditioned gradient, so at ``on_train_begin`` the callback takes the clipping norm over
from the Trainer (sets ``args.max_grad_norm = 0``) and clips itself after preconditioning.
"""

from __future__ import annotations

from transformers import TrainerCallback


class GritCallback(TrainerCallback):
    def __init__(self, manager) -> None:
        self.manager = manager
        self.max_grad_norm: float | None = None
        self._trainer_norm: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._trainer_norm = args.max_grad_norm
        self.max_grad_norm = args.max_grad_norm
        args.max_grad_norm = 0.0
        if state.max_steps:
            self.manager.total_steps = state.max_steps
        if kwargs.get("optimizer") is not None:
            self.manager.optimizer = kwargs["optimizer"]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.manager.before_step(self.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.manager.after_step(kwargs.get("optimizer"))

    def on_train_end(self, args, state, control, **kwargs):
        if self._trainer_norm is not None:
            args.max_grad_norm = self._trainer_norm
