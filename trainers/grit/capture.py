"""How each LoRA module hands GRIT its rows u = A x and dL/du: GRIT's fused LoRA functions
(rows from their backward, through a tap) or PEFT's forward with a forward hook on ``lora_A``
and a tensor hook. Everything is only stashed here (no operation per module); the batched
engine (``batched.py``) turns a step's stash into statistics at once.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainers.grit.fused import FusedAttachment, Tap, attach_fused
from trainers.grit.host import DeferredCount
from trainers.grit.layer import ModuleState, Stash


def row_weights(mask: torch.Tensor | None, rows: Any, u: torch.Tensor, lead: tuple[int, ...]
                ) -> tuple[torch.Tensor | None, Any]:
    """(row weights, token rows) for a module's rows ``u`` in this forward, whose input had the
    leading shape ``lead`` (u is [*lead, r], or its rows [N, r] from a fused function): the
    forward's attention mask and its row count, or, without a mask or for packed/reshaped inputs
    whose rows do not line up with it, no weights and every row counted."""
    if mask is None or tuple(mask.shape) != tuple(lead):
        return None, u.numel() // u.shape[-1]
    return mask, rows


class Capture:
    """The hooks and taps GRIT puts on ``model`` for its ``modules``, the attention mask of the
    forward running, and what was stashed since the manager last took it (:meth:`take_stash`)."""

    def __init__(self, model: nn.Module, modules: Mapping[str, ModuleState]) -> None:
        self.model = model
        self.modules = modules
        self.capturing = True
        self.stash = Stash()
        self._row_mask: torch.Tensor | None = None
        self._row_count: int | None = None
        self._handles: list[Any] = []
        # How each module hands GRIT its rows: "fused" (GRIT's fused LoRA function, rows from its
        # backward) or "hooks" (PEFT's forward, a forward hook on lora_A and a tensor hook).
        self.paths = {key: "hooks" for key in modules}
        self.notes: list[str] = []
        self._fused: FusedAttachment | None = None

    def take_stash(self) -> Stash:
        """What was stashed since the last call; a new stash takes what follows."""
        stash, self.stash = self.stash, Stash()
        return stash

    def attach_fused(self, fused_lora_dtype: str) -> None:
        """Run the modules GRIT's fused LoRA functions can take through them (rows from their backward)."""
        layers = {key: (state.layer, state.adapter) for key, state in self.modules.items()}
        # A manager built without an engine (auto) takes PEFT's numerics, the forward its layers have.
        lora_dtype = "adapter" if fused_lora_dtype == "auto" else fused_lora_dtype
        self._fused = attach_fused(self.model, layers, self._tap, lora_dtype)
        for key, kind in self._fused.fused.items():
            self.paths[key] = f"fused-{kind}"
        if self._fused.unfused:
            first, reason = next(iter(self._fused.unfused.items()))
            self.notes.append(f"GRIT's fused LoRA functions cannot run on {len(self._fused.unfused)}/"
                              f"{len(self.modules)} modules (first: {first}: {reason}); those capture through "
                              "PEFT's forward and hooks, which keep more activations")

    def attach_hooks(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._remember_mask, with_kwargs=True))
        for key, state in self.modules.items():
            if self.paths[key] == "hooks":
                self._handles.append(state.lora_A.register_forward_hook(self._capture_hook(state)))

    def _detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def detach(self) -> None:
        """Remove everything GRIT put on the model: hooks and fused forwards."""
        self._detach_hooks()
        if self._fused is not None:
            self._fused.detach()
            self._fused = None

    def set_capturing(self, capturing: bool) -> None:
        """Hooks are attached only for steps that capture (``capture_every``): on the others no
        hook runs, not even to return, and the fused functions get no tap."""
        self.capturing = capturing
        if capturing and not self._handles:
            self.attach_hooks()
        elif not capturing:
            self._detach_hooks()

    def _tap(self, key: str) -> Tap | None:
        """The fused function's tap for module ``key`` in this forward: it stashes u and dL/du
        when backward reaches the module (None when this forward captures nothing)."""
        if not (self.capturing and torch.is_grad_enabled()):
            return None
        # this forward's mask bound now (backward may follow another forward), in one partial of
        # the plain function (a bound method would be a second object): a closure was six objects
        # the garbage collector tracks (its function, tuple and four cells) a module, 1,260 a
        # forward on SmolLM2, which set off a young collection every step
        return functools.partial(Capture._stash_rows, self, self.modules[key], self._row_mask, self._row_count)

    def _stash_rows(self, state: ModuleState, forward_mask: torch.Tensor | None, forward_rows: Any,
                    u: torch.Tensor, grad_u: torch.Tensor, lead: torch.Size) -> None:
        """A tap's body: stash one module's rows u and dL/du with its forward's row weights."""
        mask, rows = row_weights(forward_mask, forward_rows, u, lead)
        self.stash.add(state, u, mask, rows, grad_u)

    def _remember_mask(self, _module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._row_mask = mask.to(torch.float32)
            # once per forward, not once per layer, and read at the GRIT step, not now (host.py)
            self._row_count = DeferredCount(mask.sum())
        else:
            self._row_mask, self._row_count = None, None

    def _capture_hook(self, state: ModuleState):
        def hook(_module, _inputs, output: torch.Tensor) -> None:
            # Only a forward whose output will receive a gradient counts; with gradient
            # checkpointing the recomputed forward's tensors get none, so nothing is counted twice.
            if not (self.capturing and torch.is_grad_enabled() and output.requires_grad):
                return
            mask, rows = row_weights(self._row_mask, self._row_count, output, output.shape[:-1])
            # Only stashed here (no operation per module): u and, when backward reaches it, the
            # gradient at u; collect_captured turns all of them into statistics at once.
            output.register_hook(self.stash.add(state, output, mask, rows))

        return hook
