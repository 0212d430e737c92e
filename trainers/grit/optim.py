"""GritOptimizer: the optimizer wrapper used by pure GRIT.

``step()`` runs the GRIT sequence (``GritManager.before_step``: sync, invert, precondition,
clip) on the raw gradients, then the wrapped optimizer's step, then ``after_step``. It shares
the wrapped optimizer's ``param_groups`` and ``state``, so LR schedulers and checkpoints see
one optimizer. Give the *wrapper* the clipping norm and switch the Trainer's own clipping off:
the Trainer clips before calling ``step()``, which would bound the raw gradient instead of the
natural gradient.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class GritOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizer: torch.optim.Optimizer, manager, max_grad_norm: float | None = None) -> None:
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
