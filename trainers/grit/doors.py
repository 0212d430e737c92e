"""The two doors through which GRIT enters a training loop, and the one clipping rule.

- :class:`GritCallback`: any ``transformers.Trainer`` (the hybrid: GRIT inside Unsloth's loop).
- :class:`GritOptimizer`: an optimizer wrapper (pure GRIT).

Both run the same step (:meth:`Preconditioner.before_step`, whose order is written once in
``GritManager.before_step``) between backward and ``optimizer.step()``. Hugging Face's Trainer
calls, in order: backward, clip (``max_grad_norm``), ``on_pre_optimizer_step``,
``optimizer.step()``, ``on_optimizer_step``, zero_grad, ``on_step_end``. A callback at
``on_optimizer_step`` acts after the update and changes nothing (the original hybrid did that),
and the Trainer's clipping would bound the *raw* gradient; so GRIT acts before the step and
takes the clipping over: :func:`trainer_clipping_norm` is the one rule for that.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import TrainerCallback


@runtime_checkable
class Preconditioner(Protocol):
    """What the doors, the training recipe and the probe ask of GRIT: ``GritManager`` for a
    language model, ``VlmGritAdapter`` (one manager per modality) for a VLM."""

    total_steps: int | None
    optimizer: torch.optim.Optimizer | None
    last_report: dict[str, float]

    def before_step(self, max_grad_norm: float | None) -> dict[str, float]: ...
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None: ...
    def lora_parameters(self) -> list[torch.nn.Parameter]: ...
    def all_ready(self) -> bool: ...
    def diagnostics(self) -> dict[str, dict[str, Any]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def detach(self) -> None: ...
    def collect_captured(self) -> None: ...
    def settle(self) -> None: ...


def trainer_clipping_norm(max_grad_norm: float, grit_clips: bool) -> float:
    """The Trainer's own ``max_grad_norm`` when GRIT is attached: 0 (off), because GRIT clips
    the preconditioned gradient itself; the norm unchanged otherwise."""
    return 0.0 if grit_clips else max_grad_norm


def joint_gradient_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of all these gradients together (0 when there are none), left on the device: a
    report reads it when it logs, not the step (a host read would stall a GPU's launch queue)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def gradient_norm(parameters: list[torch.nn.Parameter]) -> float:
    """:func:`joint_gradient_norm` read on the host."""
    return float(joint_gradient_norm(parameters))


def clip_gradients(parameters: list[torch.nn.Parameter], max_grad_norm: float | None) -> torch.Tensor | None:
    """The trust region: bound the (preconditioned) gradients' joint norm; 0/None: no clipping.
    Returns the joint norm before clipping (on the device), or None when nothing was clipped."""
    with_grad = [p for p in parameters if p.grad is not None]
    if max_grad_norm and max_grad_norm > 0 and with_grad:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm)
    return None


class GritCallback(TrainerCallback):
    """GRIT in any ``transformers.Trainer``: at ``on_train_begin`` it takes the clipping norm
    over from the Trainer, at ``on_pre_optimizer_step`` it runs GRIT's step."""

    def __init__(self, manager: Preconditioner) -> None:
        self.manager = manager
        self.max_grad_norm: float | None = None
        self._trainer_norm: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._trainer_norm = args.max_grad_norm
        self.max_grad_norm = args.max_grad_norm
        args.max_grad_norm = trainer_clipping_norm(args.max_grad_norm, grit_clips=True)
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


class GritOptimizer(torch.optim.Optimizer):
    """The optimizer wrapper of pure GRIT: ``step()`` runs GRIT's step on the raw gradients,
    then the wrapped optimizer's step, then ``after_step``. It shares the wrapped optimizer's
    ``param_groups`` and ``state``, so LR schedulers and checkpoints see one optimizer. Give the
    *wrapper* the clipping norm and switch the Trainer's own clipping off
    (:func:`trainer_clipping_norm`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, manager: Preconditioner,
                 max_grad_norm: float | None = None) -> None:
        # Deliberately no super().__init__: param_groups and state are the wrapped optimizer's.
        self.inner = optimizer
        self.manager = manager
        self.max_grad_norm = max_grad_norm
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    @property
    def param_groups(self):
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.inner.param_groups = value

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        self.inner.state = value

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("GritOptimizer does not support closures: GRIT needs the gradients of one backward")
        self.manager.before_step(self.max_grad_norm)
        result = self.inner.step()
        self.manager.after_step(self.inner)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self.inner.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"GritOptimizer({self.inner!r})"
