"""One probe arm: K real training steps with instruments around the optimizer step.

HF's order within one optimizer step, and what the instruments read at each point::

    backward                      # GRIT's hooks capture rows
    (Trainer clips)
    on_pre_optimizer_step         # Lead (first callback): the raw gradients
      ... GRIT callback (hybrid)
    optimizer.step()
      GritOptimizer (pure GRIT)   # sync, invert, precondition, clip
      inner optimizer's step      # (PEFT's Riemannian optimizer preconditions inside it first)
      inner optimizer post-hook   # the gradients the optimizer *consumed*
    on_optimizer_step             # Tail (last callback): the gradients after the step
    zero_grad
    on_step_end                   # Lead: the adapter after the step, GRIT's report

An optimizer reads ``.grad`` and never writes it, so the gradients right after the innermost
optimizer's step are the ones its update consumed, including what a subclass did to them inside
``step()`` before updating (a pre-hook would run before that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from trainers.config import LoraOptimizerParams, TrainParams
from trainers.grit import math as gm
from trainers.grit.layer import GritError, lora_layers, module_key
from trainers.lora_optimizers import innermost_optimizer, lora_optimizer_kind
from trainers.probe.math import UpdateComparison, compare_vectors
from trainers.recipe import build_trainer

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]   # module -> (A [r, d_in], B [d_out, r])


def lora_modules(model) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter, float]]:
    """module name -> (A, B, scaling), named like GRIT's manager names them."""
    layers = lora_layers(model)
    several = len({adapter for _, _, adapter in layers}) > 1
    return {module_key(name, adapter, several):
            (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter]))
            for name, layer, adapter in layers}


def snapshot_factors(model) -> Factors:
    return {name: (A.detach().float().cpu().clone(), B.detach().float().cpu().clone())
            for name, (A, B, _) in lora_modules(model).items()}


def restore_factors(model, factors: Factors) -> None:
    """Put every adapter back to ``factors`` (the shared initial adapter of both arms)."""
    with torch.no_grad():
        for name, (A, B, _) in lora_modules(model).items():
            A.copy_(factors[name][0].to(A))
            B.copy_(factors[name][1].to(B))
            A.grad = B.grad = None


def module_gradients(model) -> dict[str, torch.Tensor]:
    """[grad_A, grad_B] flattened per module (a missing gradient counts as zero)."""
    gradients = {}
    for name, (A, B, _) in lora_modules(model).items():
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float()
                 for p in (A, B)]
        gradients[name] = torch.cat(parts)
    return gradients


@dataclass
class ArmTrace:
    """What one arm did, step by step (index 0 of ``factors`` is the initial adapter)."""

    scalings: dict[str, float]
    factors: list[Factors]
    lora_optimizer: str | None = None      # the kind of LoRA optimizer of PEFT's that stepped, if any
    losses: list[float] = field(default_factory=list)
    consumed_vs_raw: list[dict[str, UpdateComparison]] = field(default_factory=list)
    changed_after_step: list[float] = field(default_factory=list)   # max relative change per step
    grit_reports: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def steps(self) -> int:
        return len(self.factors) - 1


class _Lead(TrainerCallback):
    """First callback: raw gradients, then the adapter after each step; stops at ``steps``;
    empties the optimizer's moments before step ``fresh_after`` + 1, when given."""

    def __init__(self, trace: ArmTrace, model, manager, steps: int, fresh_after: int = 0) -> None:
        self.trace, self.model, self.manager, self.steps = trace, model, manager, steps
        self.fresh_after = fresh_after
        self.trainer = None
        self.raw: dict[str, torch.Tensor] = {}
        self.consumed: dict[str, torch.Tensor] = {}
        self._handle = None

    def on_train_begin(self, args, state, control, **kwargs):
        optimizer = innermost_optimizer(self.trainer.optimizer)
        self.trace.lora_optimizer = lora_optimizer_kind(optimizer)
        self._handle = optimizer.register_step_post_hook(self._on_consumed)

    def _on_consumed(self, _optimizer, _args, _kwargs) -> None:
        # a subclass's step may run its base class's hooked step too: the last reading counts
        self.consumed = module_gradients(self.model)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.fresh_after and state.global_step == self.fresh_after:
            innermost_optimizer(self.trainer.optimizer).state.clear()   # re-created at the next step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.raw = module_gradients(self.model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trace.consumed_vs_raw.append(
            {name: compare_vectors(self.consumed[name], self.raw[name]) for name in self.consumed})

    def on_step_end(self, args, state, control, **kwargs):
        self.trace.factors.append(snapshot_factors(self.model))
        if self.manager is not None:
            self.trace.grit_reports.append(dict(self.manager.last_report))
        if state.global_step >= self.steps:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.trace.losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()


class _Tail(TrainerCallback):
    """Last callback: did anything rewrite the gradients after the optimizer consumed them?"""

    def __init__(self, lead: _Lead) -> None:
        self.lead = lead

    def on_optimizer_step(self, args, state, control, **kwargs):
        after = module_gradients(self.lead.model)
        changes = [compare_vectors(after[name], consumed).relative_difference or 0.0
                   for name, consumed in self.lead.consumed.items()]
        self.lead.trace.changed_after_step.append(max(changes, default=0.0))


def run_arm(model, tokenizer, examples: list, train: TrainParams, steps: int, attachment, workdir: Path,
            bf16: bool = False, collator=None, lora_optimizer: LoraOptimizerParams | None = None,
            fresh_after: int = 0) -> ArmTrace:
    """Train ``steps`` optimizer steps of the real schedule (``train.max_steps`` long) with GRIT
    attached as ``attachment`` says (``recipe.GritAttachment``; empty for the control arm), or
    with a LoRA optimizer of PEFT's (``lora_optimizer``) in place of the Trainer's; the
    optimizer's moments start afresh after step ``fresh_after`` (``measure.probe_setup``).
    A ``GritError`` raised by GRIT ends the arm and is recorded, not raised: it is a finding."""
    trace = ArmTrace({name: s for name, (_, _, s) in lora_modules(model).items()}, [snapshot_factors(model)])
    lead = _Lead(trace, model, attachment.manager, steps, fresh_after)
    trainer = build_trainer(model, tokenizer, examples, train, workdir, attachment, [lead], bf16=bf16,
                            checkpoints=False, progress=False, collator=collator, lora_optimizer=lora_optimizer)
    trainer.add_callback(_Tail(lead))
    trainer.remove_callback(PrinterCallback)   # the stage prints one summary per arm instead
    lead.trainer = trainer
    try:
        trainer.train()
    except GritError as error:
        trace.error = f"GritError: {error}"
    finally:
        if attachment.manager is not None:
            attachment.manager.detach()
    return trace


def grit_state(manager) -> dict[str, Any]:
    """What the GRIT arm's manager holds after K steps, read from its modules directly (not from
    its own flags): rows captured, usable inverses per side and their shape."""
    if manager is None:
        return {"present": False}
    modules = {}
    manager.collect_captured()     # what the hooks stashed since the last GRIT step, if any
    manager.settle()               # which of the last inversions failed, read now
    for name, state in manager.modules.items():
        # pending rows count too: captured, just not yet folded in by a GRIT step
        entry: dict[str, Any] = {"rows_captured": int(state.u.count + state.u.pending_count),
                                 "capture_path": getattr(manager, "capture_paths", {}).get(name, "hooks")}
        for side in ("A", "B"):
            inverse = state.inverse[side]
            usable = inverse is not None and bool(torch.isfinite(inverse).all())
            entry[f"usable_{side}"] = usable
            entry[f"condition_{side}"] = gm.condition_number(inverse.float().cpu()) if usable else None
            entry[f"scalar_distance_{side}"] = gm.distance_from_scalar(inverse.float().cpu()) if usable else None
        modules[name] = entry
    return {"present": True, "steps_run": int(manager.step), "claimed_ready": bool(manager.all_ready()),
            "modules": modules}
