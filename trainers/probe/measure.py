"""The arms of one GRIT set-up, and their measurements.

``probe_setup`` is what the ``probe`` stage runs per GRIT variant and what the failure-mode
tests run on broken set-ups: the control arm (GRIT off), the GRIT arm (``attach``: by default
the training recipe's own ``attach_grit``) and its scalar twin start from the same initial
adapter on one model and train the same steps; the measured K steps are the first K after GRIT's
natural-gradient warm-up (``probe_start``), so that the probe judges GRIT after its mechanism has
acted. Before the warm-up ends GRIT's step is the plain clipped gradient: the arms train alike
through it (``start_difference`` says how alike), and a probe of the first K steps of a variant
whose warm-up is longer than K would compare two identical arms and call any GRIT inert.
At the window's start every arm's optimizer moments are emptied: they hold the same plain
gradients of the warm-up, and Adam's first moment would carry them into the window's update
(0.9^k of it after k steps), shrinking every arm's difference by a factor the verdict's
thresholds were not set for (on the tiny test model the median turn of the update fell from about
0.5 to 0.2). Emptied, the window measures what the preconditioner does to the step from the run's
adapter and GRIT's statistics at that point, as a probe from the first step does.

The scalar twin is the GRIT arm with every inverse replaced, each time it is computed, by the
multiple of I closest to it (c = tr(P)/r, per module, side and refresh), everything else equal:
the same statistics, grafting, clipping and optimizer. It makes the updates a per-module step
size would make. A GRIT update that points where the control's does not, but where its scalar
twin's does too, was turned by a step size (with clipping and Adam's normalisation), not by the
shape of the curvature: the probe calls that inert.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from trainers.config import TrainParams
from trainers.grit.cadence import for_budget
from trainers.grit.config import GritParams
from trainers.probe.arms import ArmTrace, grit_state, restore_factors, run_arm, snapshot_factors
from trainers.probe.config import ProbeParams
from trainers.probe.math import CurveComparison, UpdateComparison, compare_updates, lora_update, median
from trainers.probe.verdict import ModuleMeasurement, ProbeMeasurements
from trainers.recipe import GritAttachment, attach_grit


def probe_start(grit_config: GritParams | None, train: TrainParams, steps: int) -> int:
    """The optimizer steps both arms train before the probe's ``steps`` measured ones: GRIT's
    natural-gradient warm-up in a run of ``train.max_steps`` (its cadence rule applied), so that
    every measured step is preconditioned; never so late that the window would pass the run's end
    (a warm-up longer than the run leaves the last steps, where GRIT never preconditioned)."""
    if grit_config is None or not grit_config.precondition:
        return 0
    warmup = for_budget(grit_config, train.max_steps).ng_warmup_steps if train.max_steps >= 2 else 0
    return max(0, min(warmup, train.max_steps - steps))


def start_difference(control: ArmTrace, grit: ArmTrace, start: int) -> float | None:
    """The largest relative difference between the two arms' adapters at step ``start``, over
    modules and factors (0.0: the window starts from one adapter; None: an arm stopped before)."""
    if start == 0:
        return 0.0
    if min(control.steps, grit.steps) < start:
        return None
    differences = [float((g - c).norm() / c.norm()) if c.norm() > 0 else float(g.norm() > 0)
                   for name, pair in control.factors[start].items()
                   for c, g in zip(pair, grit.factors[start][name], strict=True)]
    return max(differences, default=0.0)


def update_between(trace: ArmTrace, module: str, start: int, end: int):
    A0, B0 = trace.factors[start][module]
    A1, B1 = trace.factors[end][module]
    return lora_update(A0, B0, A1, B1, trace.scalings[module])


def _mean_gradient_change(trace: ArmTrace, module: str, start: int = 0) -> UpdateComparison | None:
    rows = [step[module] for step in trace.consumed_vs_raw[start:] if module in step]
    if not rows:
        return None
    return UpdateComparison(median([r.cosine for r in rows]), median([r.norm_ratio for r in rows]),
                            median([r.relative_difference for r in rows]))


def scalar_inverse(inverse: torch.Tensor) -> torch.Tensor:
    """The multiple of I closest to ``inverse`` in Frobenius norm: tr(P)/r * I."""
    eye = torch.eye(inverse.shape[-1], dtype=inverse.dtype, device=inverse.device)
    return torch.diagonal(inverse, dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye


def replace_inverses(manager, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """From now on, every inverse ``manager`` computes is replaced by ``transform(inverse)``
    (a GRIT-VLM adapter: in each modality's manager)."""
    for one in getattr(manager, "managers", {}).values() or [manager]:
        refresh = one.refresh_inverses

        def refresh_then_transform(force: bool = False, one=one, refresh=refresh) -> None:
            refresh(force)
            for state in one.modules.values():
                for side, inverse in state.inverse.items():
                    if inverse is not None:
                        state.inverse[side] = transform(inverse)

        one.refresh_inverses = refresh_then_transform


def make_scalar_twin(manager) -> None:
    """Replace every inverse ``manager`` computes by its closest multiple of I, from now on."""
    replace_inverses(manager, scalar_inverse)


def measurements(variant: str, door: str | None, control: ArmTrace, grit: ArmTrace, state: dict, steps: int,
                 trajectory: CurveComparison | None = None, trajectory_control: str | None = None,
                 twin: ArmTrace | None = None, preconditioner: str = "grit", start: int = 0) -> ProbeMeasurements:
    """Per-module figures of one probe over the ``steps`` steps after step ``start``
    (``probe_start``); ``state`` from ``arms.grit_state``, or for a peer ``peers.peer_state``;
    ``twin``: the scalar twin's trace, when it ran; ``grit``: the arm of whatever changes the
    step, ``preconditioner``. Step counts are the window's: steps before ``start`` are not the
    probe's."""
    modules = []
    end = start + steps
    compared_steps = min(control.steps, grit.steps)
    twin_done = twin is not None and twin.steps >= end and grit.steps >= end
    for name in control.scalings:
        info = state.get("modules", {}).get(name, {})
        distances = [info.get(f"scalar_distance_{s}") for s in ("A", "B") if info.get(f"usable_{s}")]
        conditions = [info.get(f"condition_{s}") for s in ("A", "B") if info.get(f"usable_{s}")]
        update = compare_updates(update_between(grit, name, start, end), update_between(control, name, start, end)) \
            if compared_steps >= end else None
        per_step = [compare_updates(update_between(grit, name, k - 1, k),
                                    update_between(control, name, k - 1, k)).cosine
                    for k in range(start + 1, compared_steps + 1)]
        modules.append(ModuleMeasurement(
            name=name, rows_captured=info.get("rows_captured"), usable_A=bool(info.get("usable_A")),
            usable_B=bool(info.get("usable_B")), scalar_distance=max(distances) if distances else None,
            condition=max(conditions) if conditions else None, gradient=_mean_gradient_change(grit, name, start),
            update=update, step_update_cosines=per_step,
            scalar_update=compare_updates(update_between(grit, name, start, end),
                                          update_between(twin, name, start, end)) if twin_done else None,
            twin_update=compare_updates(update_between(twin, name, start, end),
                                        update_between(control, name, start, end))
            if twin_done and control.steps >= end else None,
            capture_path=info.get("capture_path"),
        ))
    return ProbeMeasurements(
        variant=variant, door=door, grit_present=state.get("present", False),
        grit_steps_run=max(0, state.get("steps_run", 0) - start), claimed_ready=state.get("claimed_ready"),
        arm_steps=max(0, grit.steps - start), steps=steps, error=grit.error,
        max_changed_after_step=max(grit.changed_after_step[start:], default=0.0), modules=modules,
        trajectory=trajectory, trajectory_control=trajectory_control, preconditioner=preconditioner,
    )


def probe_setup(
    variant: str, model, tokenizer, examples: list[dict], train: TrainParams, grit_config: GritParams,
    door: str | None, settings: ProbeParams, workdir: Path, attach: Callable | None = None, bf16: bool = False,
    trajectory: CurveComparison | None = None, trajectory_control: str | None = None, collator=None,
) -> tuple[ProbeMeasurements, ArmTrace, ArmTrace]:
    """Run the control arm, the scalar twin of the GRIT arm and the GRIT arm, each from the same
    adapter for ``probe_start`` + ``settings.steps`` steps (``examples`` must hold that many
    batches; the model keeps the GRIT arm's adapter afterwards); returns the measurements of the
    last ``settings.steps`` and the control's and GRIT arm's traces (all steps).
    ``attach(model, grit_config, door, total_steps) -> GritAttachment``;
    ``collator`` batches examples that are not pre-tokenized text (``recipe.build_trainer``)."""
    attach = attach or attach_grit
    start = probe_start(grit_config, train, settings.steps)
    length = start + settings.steps
    initial = snapshot_factors(model)
    control = run_arm(model, tokenizer, examples, train, length, GritAttachment(), workdir / "control", bf16,
                      collator, fresh_after=start)
    restore_factors(model, initial)
    twin_attachment = attach(model, grit_config, door, train.max_steps)
    twin = None
    if twin_attachment.manager is not None:
        make_scalar_twin(twin_attachment.manager)
        twin = run_arm(model, tokenizer, examples, train, length, twin_attachment, workdir / "scalar_twin",
                       bf16, collator, fresh_after=start)
    restore_factors(model, initial)
    attachment = attach(model, grit_config, door, train.max_steps)
    grit = run_arm(model, tokenizer, examples, train, length, attachment, workdir / "grit", bf16, collator,
                   fresh_after=start)
    state = grit_state(attachment.manager)
    return (measurements(variant, door, control, grit, state, settings.steps, trajectory, trajectory_control,
                         twin, start=start), control, grit)
