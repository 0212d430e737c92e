"""The verdict from measurements: every check's failure is named, thresholds come from params."""

from __future__ import annotations

from dataclasses import replace

import pytest

from trainers.probe.config import ProbeParams
from trainers.probe.math import CurveComparison, UpdateComparison
from trainers.probe.verdict import EFFECTIVE, INERT, ModuleMeasurement, ProbeMeasurements, decide, reasons

P = ProbeParams(steps=4)


def module(name: str = "layers.0.self_attn.q_proj", **changes) -> ModuleMeasurement:
    base = ModuleMeasurement(name=name, rows_captured=100, usable_A=True, usable_B=True, scalar_distance=0.5,
                             condition=8.0, gradient=UpdateComparison(0.8, 1.0, 0.6),
                             update=UpdateComparison(0.8, 1.0, 0.6), step_update_cosines=[0.8] * 4,
                             scalar_update=UpdateComparison(0.8, 1.0, 0.6))
    return replace(base, **changes)


def measured(modules=None, **changes) -> ProbeMeasurements:
    base = ProbeMeasurements(variant="pure_grit", door="optimizer", grit_present=True, grit_steps_run=4,
                             claimed_ready=True, arm_steps=4, steps=4, error=None, max_changed_after_step=0.0,
                             modules=modules or [module(f"layers.{i}.mlp.up_proj") for i in range(4)],
                             trajectory=CurveComparison(4, 0.9, 0.05), trajectory_control="peft_lora")
    return replace(base, **changes)


def test_a_working_set_up_is_effective_with_its_reasons():
    verdict, checks = decide(measured(), P)
    assert verdict == EFFECTIVE and reasons(checks) == []
    assert {c.name for c in checks} == {"attached", "capture", "readiness", "optimizer_window",
                                        "preconditioner_shape", "update", "beyond_scalar", "trajectory"}


@pytest.mark.parametrize(("changes", "reason"), [
    ({"grit_present": False}, "not_attached"),
    ({"grit_steps_run": 0}, "not_attached"),
    ({"modules": [module(rows_captured=0)]}, "capture_bypassed"),
    ({"modules": [module(usable_A=False)], "claimed_ready": True}, "vacuous_readiness"),
    ({"modules": [module(usable_A=False)], "claimed_ready": False}, "not_ready"),
    ({"max_changed_after_step": 0.7}, "after_optimizer_step"),
    ({"modules": [module(scalar_distance=1e-4)]}, "scalar_preconditioner"),
    ({"modules": [module(update=UpdateComparison(1.0, 1.0, 0.0))]}, "update_unchanged"),
    ({"modules": [module(update=UpdateComparison(1.0, 0.2, 0.8))]}, "update_unchanged"),   # only rescaled
    ({"arm_steps": 1, "error": "GritError: boom"}, "update_unchanged"),
    # turned from the control, but as far from its scalar twin as a step size would leave it
    ({"modules": [module(scalar_update=UpdateComparison(0.99, 1.0, 0.14))]}, "scalar_equivalent"),
    ({"trajectory": CurveComparison(4, 1.0, 0.0)}, "identical_trajectory"),
])
def test_each_failure_is_inert_with_its_reason(changes, reason):
    verdict, checks = decide(measured(**changes), P)
    assert verdict == INERT and reason in reasons(checks)


def test_thresholds_are_params():
    half_changed = [module(f"layers.{i}.mlp.up_proj") for i in range(2)] + \
        [module(f"layers.{i}.mlp.down_proj", update=UpdateComparison(1.0, 1.0, 0.0)) for i in range(2)]
    assert decide(measured(modules=half_changed), P)[0] == INERT
    assert decide(measured(modules=half_changed), P.model_copy(update={"min_changed_fraction": 0.5}))[0] == EFFECTIVE


def test_missing_trajectory_is_reported_not_failed():
    verdict, checks = decide(measured(trajectory=None, trajectory_control=None), P)
    assert verdict == EFFECTIVE
    assert next(c for c in checks if c.name == "trajectory").passed is None


def test_a_scalar_twin_that_did_not_run_is_reported_not_failed():
    verdict, checks = decide(measured(modules=[module(scalar_update=None)]), P)
    assert verdict == EFFECTIVE
    assert next(c for c in checks if c.name == "beyond_scalar").passed is None


@pytest.mark.parametrize(("preconditioner", "not_evaluated"), [
    ("riemannian", {"capture", "trajectory"}),
    ("loraplus", {"capture", "readiness", "preconditioner_shape", "beyond_scalar", "trajectory"})])
def test_a_peer_s_checks_that_do_not_apply_are_reported_not_failed(preconditioner, not_evaluated):
    """GRIT's peers capture nothing; LoRA+ inverts nothing and has no scalar twin (a step size per factor)."""
    plain = [module(f"layers.{i}.mlp.up_proj", rows_captured=None,
                    **({} if preconditioner == "riemannian" else
                       {"usable_A": False, "usable_B": False, "scalar_distance": None, "condition": None,
                        "scalar_update": None})) for i in range(4)]
    peer = measured(modules=plain, preconditioner=preconditioner, claimed_ready=None, trajectory=None,
                    trajectory_control=None)
    verdict, checks = decide(peer, P)
    assert verdict == EFFECTIVE, reasons(checks)
    assert {c.name for c in checks if c.passed is None} == not_evaluated
    assert decide(replace(peer, grit_present=False), P)[0] == INERT          # the Trainer's own optimizer stepped
    unchanged = [replace(m, update=UpdateComparison(1.0, 16.0, 15.0)) for m in plain]   # only rescaled
    assert "update_unchanged" in reasons(decide(replace(peer, modules=unchanged), P)[1])
