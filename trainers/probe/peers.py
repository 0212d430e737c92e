"""The probe of GRIT's peers: a LoRA optimizer of PEFT's against plain LoRA's step.

The control arm trains the variant's first K steps with the Trainer's own optimizer (plain LoRA),
the peer arm with the variant's LoRA optimizer, both from the same adapter on the same batches;
the verdict is GRIT's (``verdict.decide``), with the checks that do not apply left unevaluated.

The Riemannian optimizer's scalar twin is the peer arm with each r x r preconditioner replaced,
each time PEFT computes it, by the multiple of I closest to it (``measure.scalar_inverse``): a
per-module, per-side step size, which Adam all but cancels. Its shape figures (condition
number, distance from c*I) are those of the preconditioners of the arm's last step, computed
from the factors that step started from, as PEFT computes them. LoRA+ has no preconditioner
matrix (its ratio is a step size per factor by design), so no twin and no shape figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainers.config import LoraOptimizerParams, RiemannianParams, TrainParams
from trainers.grit import math as gm
from trainers.probe.arms import ArmTrace, restore_factors, run_arm, snapshot_factors
from trainers.probe.config import ProbeParams
from trainers.probe.measure import measurements, scalar_inverse
from trainers.probe.verdict import ProbeMeasurements
from trainers.recipe import GritAttachment


def riemannian_inverses(A: torch.Tensor, B: torch.Tensor, reg: float) -> dict[str, torch.Tensor]:
    """The r x r matrices PEFT's Riemannian optimizer multiplies one module's gradients by:
    ``A``: (B^T B + reg I)^-1, left of g_A [r, d_in]; ``B``: (A A^T + reg I)^-1, right of g_B [d_out, r]."""
    from peft.optimizers.riemannian import _RiemannianPreconditioner  # after Unsloth (trainers/engines.py)

    inverse = _RiemannianPreconditioner._damped_inverse
    return {"A": inverse(B.T @ B, reg), "B": inverse(A @ A.T, reg)}


@contextmanager
def scalar_riemannian() -> Iterator[None]:
    """Within: every preconditioner PEFT's Riemannian optimizer computes is its closest c*I."""
    from peft.optimizers.riemannian import _RiemannianPreconditioner

    original = _RiemannianPreconditioner._damped_inverse

    def closest_scalar(matrix: torch.Tensor, reg: float) -> torch.Tensor:
        return scalar_inverse(original(matrix, reg))

    _RiemannianPreconditioner._damped_inverse = staticmethod(closest_scalar)
    try:
        yield
    finally:
        _RiemannianPreconditioner._damped_inverse = staticmethod(original)


def peer_state(trace: ArmTrace, config: LoraOptimizerParams) -> dict[str, Any]:
    """What ``arms.grit_state`` says of a GRIT arm, for a peer's: whether its optimizer stepped,
    and (Riemannian) the usable inverses per module and side with their shape."""
    present = trace.lora_optimizer == config.kind
    state: dict[str, Any] = {"present": present, "steps_run": trace.steps if present else 0, "claimed_ready": None,
                             "modules": {}}
    if not isinstance(config, RiemannianParams) or trace.steps == 0:
        return state
    for name, (A, B) in trace.factors[-2].items():       # the factors the last step started from
        entry: dict[str, Any] = {"rows_captured": None, "capture_path": None}
        for side, inverse in riemannian_inverses(A, B, config.reg).items():
            usable = bool(torch.isfinite(inverse).all())
            entry[f"usable_{side}"] = usable
            entry[f"condition_{side}"] = gm.condition_number(inverse) if usable else None
            entry[f"scalar_distance_{side}"] = gm.distance_from_scalar(inverse) if usable else None
        state["modules"][name] = entry
    return state


def peer_setup(variant: str, model, tokenizer, examples: list[dict], train: TrainParams,
               config: LoraOptimizerParams, settings: ProbeParams, workdir: Path, bf16: bool = False,
               collator=None) -> tuple[ProbeMeasurements, ArmTrace, ArmTrace]:
    """The control arm (the Trainer's optimizer), the Riemannian scalar twin and the peer arm, each
    from the same adapter (the model keeps the peer arm's); returns the measurements and the
    control's and peer's traces."""
    initial = snapshot_factors(model)

    def arm(folder: str, lora_optimizer: LoraOptimizerParams | None) -> ArmTrace:
        restore_factors(model, initial)
        return run_arm(model, tokenizer, examples, train, settings.steps, GritAttachment(), workdir / folder, bf16,
                       collator, lora_optimizer=lora_optimizer)

    control = arm("control", None)
    twin = None
    if isinstance(config, RiemannianParams):
        with scalar_riemannian():
            twin = arm("scalar_twin", config)
    peer = arm("peer", config)
    measured = measurements(variant, "optimizer", control, peer, peer_state(peer, config), settings.steps,
                            twin=twin, preconditioner=config.kind)
    return measured, control, peer
