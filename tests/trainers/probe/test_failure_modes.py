"""Each way GRIT was silently inert in the original experiment (docs/method.md), built
for real on a tiny Llama and trained through the same Trainer wiring as the pipeline: the probe
must call it ``inert`` with the matching reason, and call the correct set-up ``effective``."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from pipelines.params import parse_params
from trainers.base_model import resolve_base_model
from trainers.engines import build_peft
from trainers.grit import GritManager
from trainers.probe.measure import probe_setup, replace_inverses
from trainers.probe.verdict import EFFECTIVE, INERT, decide, reasons
from trainers.recipe import GritAttachment, attach_grit
from trainers.sft import ordered_examples

PARAMS = parse_params({"model": {"source": "tiny"}, "lora": {"r": 4, "alpha": 8},
                       "train": {"max_steps": 6, "per_device_batch_size": 2, "warmup_steps": 0},
                       "probe": {"steps": 4}})
SETTINGS = PARAMS.probe


@pytest.fixture(scope="module")
def base_files():
    return resolve_base_model(PARAMS.model)


def probe(base_files, tmp_path: Path, attach=None, grit=PARAMS.grit, door="optimizer"):
    torch.manual_seed(0)
    engine = build_peft(base_files, PARAMS)
    rows = [{"prompt": f"Question {i}: how long do I bake loaf number {i}?",
             "response": f"Bake loaf {i} for {20 + i} minutes, then let it cool."} for i in range(16)]
    examples = ordered_examples(rows, engine.tokenizer, SETTINGS.steps * PARAMS.train.per_device_batch_size, 0)
    measured, control, arm = probe_setup("pure_grit", engine.model, engine.tokenizer, examples, PARAMS.train, grit,
                                         door, SETTINGS, tmp_path, attach=attach)
    verdict, checks = decide(measured, SETTINGS)
    return verdict, reasons(checks), measured, control, arm


@pytest.mark.parametrize("door", ["optimizer", "callback"])
def test_correct_grit_is_effective(base_files, tmp_path, door):
    verdict, why, measured, control, arm = probe(base_files, tmp_path, door=door)
    assert verdict == EFFECTIVE, why
    assert control.losses[0] == arm.losses[0]              # same adapter, same first batch
    assert all(x.update.cosine < 0.999 for x in measured.modules)
    assert all(x.usable_A and x.usable_B for x in measured.modules)


def _fused_forward(self, x, *args, **kwargs):
    """What Unsloth's fused kernels do: read the LoRA weights, never call the lora_A module."""
    result = self.base_layer(x, *args, **kwargs)
    for adapter in self.active_adapters:
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        result = result + self.scaling[adapter] * F.linear(F.linear(x.to(A.dtype), A), B)
    return result


def test_capture_bypassed_by_fused_kernels_is_inert(base_files, tmp_path):
    def attach_fused(model, config, door, total_steps):
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                module.forward = types.MethodType(_fused_forward, module)
        return attach_grit(model, config, door, total_steps)

    verdict, why, measured, _, arm = probe(base_files, tmp_path, attach=attach_fused)
    assert verdict == INERT and "capture_bypassed" in why
    assert all(x.rows_captured == 0 for x in measured.modules)
    assert arm.error and "captured 0 token rows" in arm.error


class LateGritCallback(TrainerCallback):
    """The original hybrid's callback: GRIT at on_optimizer_step, after optimizer.step()."""

    def __init__(self, manager) -> None:
        self.manager = manager

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.manager.before_step(args.max_grad_norm)
        self.manager.after_step()


def test_preconditioning_after_the_optimizer_step_is_inert(base_files, tmp_path):
    def attach_late(model, config, door, total_steps):
        manager = GritManager(model, config, total_steps=total_steps)
        return GritAttachment(manager, [LateGritCallback(manager)])

    verdict, why, measured, _, _ = probe(base_files, tmp_path, attach=attach_late)
    assert verdict == INERT and "after_optimizer_step" in why and "update_unchanged" in why
    assert measured.grit_steps_run == SETTINGS.steps      # GRIT did run, and preconditioned...
    assert all(x.usable_B for x in measured.modules)      # ...with real inverses, too late
    assert all(x.update.relative_difference == 0 for x in measured.modules)


class FlagOnlyManager(GritManager):
    """The original's readiness: a flag that turns true whether or not any inverse exists."""

    def refresh_inverses(self, force: bool = False) -> None:
        self.factors_are_ready = True

    def all_ready(self) -> bool:
        return getattr(self, "factors_are_ready", False)


def test_readiness_flag_without_inverses_is_inert(base_files, tmp_path):
    def attach_flag(model, config, door, total_steps):
        manager = FlagOnlyManager(model, config, total_steps=total_steps)
        return GritAttachment(manager, optimizer_door=manager)

    verdict, why, measured, _, _ = probe(base_files, tmp_path, attach=attach_flag)
    assert verdict == INERT and "vacuous_readiness" in why and "update_unchanged" in why
    assert measured.claimed_ready is True
    assert not any(x.usable_A or x.usable_B for x in measured.modules)


def test_grit_configured_but_never_attached_is_inert(base_files, tmp_path):
    def attach_nothing(model, config, door, total_steps):
        return GritAttachment(GritManager(model, config, total_steps=total_steps))  # no callback, no door

    verdict, why, measured, _, _ = probe(base_files, tmp_path, attach=attach_nothing)
    assert verdict == INERT and "not_attached" in why
    assert measured.grit_steps_run == 0
    assert all(x.rows_captured > 0 for x in measured.modules)   # hooks alone capture, nothing more


def test_no_grit_at_all_is_inert(base_files, tmp_path):
    verdict, why, *_ = probe(base_files, tmp_path, attach=lambda *args: GritAttachment())
    assert verdict == INERT and "not_attached" in why


def test_scalar_preconditioner_under_adamw_is_inert(base_files, tmp_path):
    # Absolute damping far above the factors' eigenvalues: (Sigma + lambda I)^-1 ~ I / lambda,
    # the near-scalar inverse of the original (B = 0 made Sigma ~ 0). Adam cancels the scale.
    scalar = PARAMS.grit.model_copy(update={"damping_mode": "absolute", "damping": 100.0, "graft_norm": False})
    verdict, why, measured, _, _ = probe(base_files, tmp_path, grit=scalar)
    assert verdict == INERT and "scalar_preconditioner" in why and "update_unchanged" in why
    assert all(x.gradient.norm_ratio < 0.1 for x in measured.modules if x.gradient)   # gradients did shrink
    assert all(x.update.cosine > 0.99 for x in measured.modules)                      # updates did not turn


def _near_scalar(attach_inverse):
    """GRIT attached as the recipe attaches it, but every inverse replaced by ``attach_inverse``."""
    def attach(model, config, door, total_steps):
        attachment = attach_grit(model, config, door, total_steps)
        replace_inverses(attachment.manager, attach_inverse)
        return attachment
    return attach


@pytest.mark.parametrize("distance", [0.02, 0.04])
def test_a_near_scalar_preconditioner_is_inert(base_files, tmp_path, distance):
    """1000 (I + E), 0.02 or 0.04 from a scalar (past the shape check's 0.01), no grafting,
    clipping after it. At 0.04 every module's update turns by more than min_update_change from
    the control's (Adam amplifies the small non-scalar part, and clipping rescales each step), so
    the update check alone called it effective; its scalar twin turns it almost the same way."""
    from trainers.grit import math as gm

    generator = torch.Generator().manual_seed(0)

    def near_scalar(inverse: torch.Tensor) -> torch.Tensor:
        r = inverse.shape[-1]
        eye = torch.eye(r, dtype=torch.float64)
        noise = torch.randn(r, r, generator=generator, dtype=torch.float64)
        noise = 0.5 * (noise + noise.T) - eye * torch.diagonal(noise).mean()       # traceless: c stays 1000
        perturbation = noise * distance * float(torch.linalg.matrix_norm(eye) / torch.linalg.matrix_norm(noise))
        return (1000.0 * (eye + perturbation)).to(inverse)

    grit = PARAMS.grit.model_copy(update={"graft_norm": False})
    verdict, why, measured, _, _ = probe(base_files, tmp_path, attach=_near_scalar(near_scalar), grit=grit)
    distances = [x.scalar_distance for x in measured.modules if x.scalar_distance is not None]
    assert distances and all(SETTINGS.scalar_tolerance < d < 2 * distance for d in distances)
    assert verdict == INERT and "scalar_equivalent" in why, why
    if distance == 0.04:
        assert why == ["scalar_equivalent"]           # the update check alone would say effective
    assert gm.distance_from_scalar(near_scalar(torch.eye(4))) == pytest.approx(distance, rel=0.05)


def test_real_grit_points_where_no_step_size_could(base_files, tmp_path):
    verdict, why, measured, _, _ = probe(base_files, tmp_path)
    assert verdict == EFFECTIVE, why
    assert all(x.scalar_update.direction_change >= SETTINGS.min_scalar_twin_change for x in measured.modules)
