"""Measurements of one GRIT variant (or of a peer: a LoRA optimizer of PEFT's, ``preconditioner``)
-> checks -> ``effective`` or ``inert`` (pure functions).

Each check answers one way GRIT was silently inert in the original experiment
(docs/method.md) and carries the figures that decided it; a check that does not apply to a peer
(the Riemannian preconditioner captures nothing; LoRA+ inverts nothing and has no scalar twin)
is reported as not evaluated, never failed:

- ``not_attached``: GRIT configured but its step never ran (no callback, no optimizer door);
- ``capture_bypassed``: a targeted module captured no rows (fused kernels skip the LoRA forward);
- ``vacuous_readiness`` / ``not_ready``: modules without a usable inverse, counted from the
  inverses themselves, not from a readiness flag;
- ``after_optimizer_step``: gradients rewritten after ``optimizer.step()`` consumed them;
- ``scalar_preconditioner``: inverses that are multiples of I, which Adam cancels;
- ``gradients_not_preconditioned`` (for one part of a model, a VLM modality): the optimizer
  consumed that part's raw gradients;
- ``update_unchanged`` (decisive): the K-step update dW = s B A equals the control's;
- ``scalar_equivalent``: it equals the update of GRIT's scalar twin (every inverse replaced by its
  closest multiple of I, the rest of the step as it is): a step size, with clipping and Adam's
  normalisation, turned it, not the shape of the curvature;
- ``identical_trajectory``: the trained loss curve equals the same-engine control's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from trainers.grit.fused import capture_kinds
from trainers.probe.config import ProbeParams
from trainers.probe.math import CurveComparison, UpdateComparison, median

EFFECTIVE, INERT = "effective", "inert"
# What changes the step, as a check's detail names it (``trainers.config.preconditioner``)
NAMES = {"grit": "GRIT", "riemannian": "the Riemannian preconditioner", "loraplus": "LoRA+"}


@dataclass(frozen=True)
class ModuleMeasurement:
    name: str
    rows_captured: int | None
    usable_A: bool
    usable_B: bool
    scalar_distance: float | None          # the larger of the usable sides' distances from c*I
    condition: float | None                # the larger of the usable sides' condition numbers
    gradient: UpdateComparison | None      # consumed vs raw gradient in the GRIT arm (mean over steps)
    update: UpdateComparison | None        # K-step update, GRIT arm vs control arm
    step_update_cosines: list[float | None] = field(default_factory=list)
    scalar_update: UpdateComparison | None = None   # K-step update, GRIT arm vs its scalar twin
    # K-step update, the scalar twin vs the control arm: how far a step size alone turns plain
    # LoRA's update (under Adam, which normalises each coordinate, hardly at all)
    twin_update: UpdateComparison | None = None
    capture_path: str | None = None        # how the rows came: "fused-linear", "fused-swiglu" or "hooks"


@dataclass(frozen=True)
class ProbeMeasurements:
    variant: str
    door: str | None
    grit_present: bool                     # a GRIT manager exists on the model (a peer: its optimizer stepped)
    grit_steps_run: int                    # optimizer steps GRIT's own sequence ran
    claimed_ready: bool | None             # the manager's own readiness flag
    arm_steps: int                         # optimizer steps the GRIT arm completed
    steps: int                             # K
    error: str | None
    max_changed_after_step: float          # gradients rewritten after optimizer.step()
    modules: list[ModuleMeasurement]
    trajectory: CurveComparison | None = None
    trajectory_control: str | None = None
    preconditioner: str = "grit"           # grit | riemannian | loraplus (trainers.config.preconditioner)

    @property
    def method(self) -> str:
        return NAMES[self.preconditioner]


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None                    # None: could not be evaluated (reported, not failed)
    reason: str | None                     # the failure's code, when it failed
    detail: str


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def check_attached(m: ProbeMeasurements) -> Check:
    if m.preconditioner != "grit":
        return _check_optimizer_attached(m)
    if not m.grit_present:
        return Check("attached", False, "not_attached", "the variant is configured with GRIT but no GRIT "
                     "manager is on the model: no natural gradient at all")
    if m.grit_steps_run == 0 and m.arm_steps > 0:
        return Check("attached", False, "not_attached", f"GRIT's step never ran in {m.arm_steps} optimizer "
                     "steps: it is attached to no callback and no optimizer door")
    return Check("attached", True, None, f"GRIT's step ran {m.grit_steps_run} times in {m.arm_steps} steps "
                 f"({m.door or 'unknown door'})")


def _check_optimizer_attached(m: ProbeMeasurements) -> Check:
    """A peer is attached when the optimizer that stepped is PEFT's of its kind."""
    if not m.grit_present:
        return Check("attached", False, "not_attached", f"the variant is configured with {m.method} but the "
                     "optimizer that stepped is the Trainer's own: plain LoRA's step")
    return Check("attached", True, None, f"PEFT's {m.preconditioner} optimizer made all {m.arm_steps} steps")


def check_capture(m: ProbeMeasurements, p: ProbeParams) -> Check:
    if m.preconditioner != "grit":
        how = "preconditions from the factors A and B" if m.preconditioner == "riemannian" else "scales B's step"
        return Check("capture", None, None, f"{m.method} captures no activations: it {how}")
    if not m.grit_present:
        return Check("capture", None, None, "no GRIT manager, nothing captured")
    blind = [x.name for x in m.modules if (x.rows_captured or 0) < p.min_rows_per_module]
    if blind:
        return Check("capture", False, "capture_bypassed", f"{len(blind)}/{len(m.modules)} targeted modules "
                     f"captured fewer than {p.min_rows_per_module} token rows (first: {blind[0]}): their LoRA "
                     "forward was bypassed, as by fused kernels")
    rows = [x.rows_captured or 0 for x in m.modules]
    paths = capture_kinds(x.capture_path for x in m.modules)
    through = ", ".join(f"{count} through {path}" for path, count in paths.items())
    return Check("capture", True, None, f"all {len(m.modules)} modules captured rows (min {min(rows, default=0)}; "
                 f"{through})")


def check_readiness(m: ProbeMeasurements, p: ProbeParams) -> Check:
    if m.preconditioner == "loraplus":
        return Check("readiness", None, None, "LoRA+ inverts nothing: B's learning rate is a multiple of A's")
    if not m.grit_present:
        return Check("readiness", None, None, "no GRIT manager, no inverses")
    ready = sum(x.usable_A and x.usable_B for x in m.modules)
    total = len(m.modules)
    figures = f"{ready}/{total} modules have a usable inverse on both sides"
    if m.claimed_ready and ready < total:
        return Check("readiness", False, "vacuous_readiness", f"GRIT's readiness flag says ready but {figures}")
    if _fraction(ready, total) < p.min_ready_fraction:
        return Check("readiness", False, "not_ready", f"{figures} (need {p.min_ready_fraction:.0%})")
    return Check("readiness", True, None, figures)


def check_optimizer_window(m: ProbeMeasurements, p: ProbeParams) -> Check:
    if m.max_changed_after_step > p.post_step_tolerance:
        return Check("optimizer_window", False, "after_optimizer_step", "gradients were rewritten after "
                     f"optimizer.step() had consumed them (relative change up to {m.max_changed_after_step:.3g}): "
                     "preconditioning that late never reaches an update")
    return Check("optimizer_window", True, None, "no gradient changed after the optimizer consumed it")


def check_shape(m: ProbeMeasurements, p: ProbeParams) -> Check:
    ready = [x for x in m.modules if x.scalar_distance is not None]
    if not ready:
        return Check("preconditioner_shape", None, None, "no usable inverse to inspect")
    scalar = [x for x in ready if x.scalar_distance <= p.scalar_tolerance]
    distance = median([x.scalar_distance for x in ready])
    condition = median([x.condition for x in ready if x.condition is not None])
    figures = (f"{len(scalar)}/{len(ready)} ready modules are within {p.scalar_tolerance:g} of c*I "
               f"(median distance {distance:.3g}, median condition number {condition:.3g})")
    if _fraction(len(scalar), len(ready)) > p.max_scalar_fraction:
        return Check("preconditioner_shape", False, "scalar_preconditioner",
                     f"{figures}: a scalar preconditioner only rescales the gradient, which Adam cancels")
    return Check("preconditioner_shape", True, None, figures)


def _turned(comparisons: list[UpdateComparison | None], threshold: float) -> tuple[list[UpdateComparison], int]:
    """(the comparisons with a direction, how many of them turned by >= ``threshold``)."""
    compared = [c for c in comparisons if c is not None and c.direction_change is not None]
    return compared, sum(c.direction_change >= threshold for c in compared)


def check_update(m: ProbeMeasurements, p: ProbeParams) -> Check:
    if m.arm_steps < m.steps:
        stopped = f" ({m.error})" if m.error else ""
        return Check("update", False, "update_unchanged", f"the GRIT arm completed {m.arm_steps}/{m.steps} "
                     f"steps{stopped}: no update to compare")
    compared, changed = _turned([x.update for x in m.modules], p.min_update_change)
    cosine = median([c.cosine for c in compared])
    difference = median([c.relative_difference for c in compared])
    figures = (f"{changed}/{len(m.modules)} modules' {m.steps}-step update changed direction by >= "
               f"{p.min_update_change:g} (median cosine {_fmt(cosine)}, median relative difference {_fmt(difference)})")
    if _fraction(changed, len(m.modules)) < p.min_changed_fraction:
        return Check("update", False, "update_unchanged", f"{figures}: the optimizer made the same updates "
                     f"with and without {m.method}")
    return Check("update", True, None, figures)


def check_beyond_scalar(m: ProbeMeasurements, p: ProbeParams) -> Check:
    """Does GRIT's update point where no per-module step size could take it?"""
    if m.preconditioner == "loraplus":
        return Check("beyond_scalar", None, None, "LoRA+ is a step size per factor by design: no preconditioner "
                     "matrix to replace by a multiple of I, no scalar twin")
    compared, changed = _turned([x.scalar_update for x in m.modules], p.min_scalar_twin_change)
    if not compared:
        return Check("beyond_scalar", None, None, "the scalar twin did not run to the end: not compared")
    cosine = median([c.cosine for c in compared])
    figures = (f"{changed}/{len(m.modules)} modules' {m.steps}-step update turned by >= "
               f"{p.min_scalar_twin_change:g} from its scalar twin's (median cosine {_fmt(cosine)})")
    if _fraction(changed, len(m.modules)) < p.min_changed_fraction:
        return Check("beyond_scalar", False, "scalar_equivalent", f"{figures}: a step size per module, clipped "
                     "the same way, makes the same updates; the preconditioner's shape did not matter")
    return Check("beyond_scalar", True, None, figures)


def check_gradients_rewritten(m: ProbeMeasurements, p: ProbeParams) -> Check:
    """Did preconditioning turn *these* modules' gradients (consumed vs raw, in the GRIT arm)?

    Used for one part of a model (a VLM's modality): its K-step update also moves when only
    *other* parts are preconditioned, since their changed weights change its gradients, so the
    update check alone cannot tell whether this part was preconditioned."""
    # the same direction change as for updates: clipping rescales a gradient but does not turn it
    measured, turned = _turned([x.gradient for x in m.modules], p.min_update_change)
    if not measured:
        return Check("gradients", None, None, "no consumed gradient was measured")
    cosine = median([c.cosine for c in measured])
    figures = (f"{turned}/{len(m.modules)} modules' consumed gradient turned by >= {p.min_update_change:g} "
               f"from the raw gradient (median cosine {_fmt(cosine)})")
    if _fraction(turned, len(m.modules)) < p.min_changed_fraction:
        return Check("gradients", False, "gradients_not_preconditioned", f"{figures}: the optimizer consumed "
                     "these modules' raw gradients")
    return Check("gradients", True, None, figures)


def check_trajectory(m: ProbeMeasurements, p: ProbeParams) -> Check:
    if m.trajectory is None:
        return Check("trajectory", None, None, "no trained same-engine control to compare loss curves with")
    t = m.trajectory
    figures = (f"loss curve vs {m.trajectory_control} over {t.steps} steps: correlation {_fmt(t.correlation)}, "
               f"max |difference| {t.max_abs_difference:.3g}")
    if t.max_abs_difference <= p.trajectory_tolerance:
        return Check("trajectory", False, "identical_trajectory", f"{figures}: the trained runs are identical")
    return Check("trajectory", True, None, figures)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def decide(m: ProbeMeasurements, p: ProbeParams, part: bool = False) -> tuple[str, list[Check]]:
    """``effective`` only when no check failed; the checks are the reasons either way. ``part``:
    ``m`` holds the modules of one part of the model (a VLM modality), so the part's own
    gradients must have been rewritten too (``check_gradients_rewritten``)."""
    checks = [check_attached(m), check_capture(m, p), check_readiness(m, p), check_optimizer_window(m, p),
              check_shape(m, p), *([check_gradients_rewritten(m, p)] if part else []), check_update(m, p),
              check_beyond_scalar(m, p), check_trajectory(m, p)]
    return (INERT if any(c.passed is False for c in checks) else EFFECTIVE), checks


def reasons(checks: list[Check]) -> list[str]:
    return [c.reason for c in checks if c.passed is False and c.reason]


def as_json(m: ProbeMeasurements, verdict: str, checks: list[Check]) -> dict[str, Any]:
    return {"variant": m.variant, "verdict": verdict, "reasons": reasons(checks),
            "checks": [asdict(c) for c in checks], "measurements": asdict(m)}
