"""The probe of one GRIT variant, or of a peer (a LoRA optimizer of PEFT's: ``peers``), built
exactly as training builds it (``recipe.variant_model``).

Both arms start from the variant's initial adapter and train its first batches; the probe
measures the ``probe.steps`` after GRIT's natural-gradient warm-up (``measure.probe_start``: none
for a peer or a GRIT without one), and the result says where that window began (``start_step``)
and how far apart the arms' adapters were there (``start_difference``). The verdict covers the
whole adapter and, for a model with parts (a VLM's modalities), each part: the variant is
effective only when every part that should precondition does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainers.base_model import BaseModelFiles
from trainers.config import TrainingSections, VariantParams, variant_grit
from trainers.probe.arms import ArmTrace
from trainers.probe.config import ProbeParams
from trainers.probe.math import CurveComparison
from trainers.probe.measure import probe_setup, probe_start, start_difference
from trainers.probe.peers import peer_setup
from trainers.probe.verdict import EFFECTIVE, INERT, ProbeMeasurements, as_json, decide
from trainers.recipe import attach_grit, grit_door, variant_model
from trainers.variant_model import VariantModel


def probe_variant(name: str, params: TrainingSections, files: BaseModelFiles, data_dir: Path, workdir: Path,
                  trajectory: CurveComparison | None = None, trajectory_control: str | None = None) -> dict[str, Any]:
    """Control arm vs GRIT arm (or the peer's) for variant ``name``: its measurements and verdict as
    JSON, with both arms' losses and (for a model with parts) a verdict per part under ``modalities``."""
    variant, settings = params.variants[name], params.probe
    # The probe asks whether preconditioning changes the update. Reprojection (and truncation)
    # changes the adapter's shape, which the control arm cannot match step for step; training
    # exercises it, the probe's arm leaves it out.
    preconditioning = (variant_grit(params.grit, variant).model_copy(update={"reprojection": False})
                       if variant.lora_optimizer is None else None)
    start = probe_start(preconditioning, params.train, settings.steps)
    torch.manual_seed(params.train.seed)  # the same initial adapter as the trained variant
    built = variant_model(variant, params, files, data_dir, start + settings.steps)
    if preconditioning is None:
        measured, control, grit = peer_setup(name, built.model, built.tokenizer, built.examples, params.train,
                                             variant.lora_optimizer, settings, workdir,
                                             bf16=params.model.dtype == "bfloat16", collator=built.collator)
        return _verdict(measured, settings, variant, built, control, grit, start)

    def attach(model, config, door, total_steps):
        return attach_grit(model, config, door, total_steps, built.manager_factory)

    measured, control, grit = probe_setup(
        name, built.model, built.tokenizer, built.examples, params.train, preconditioning,
        grit_door(variant), settings,
        workdir, attach=attach, bf16=params.model.dtype == "bfloat16", trajectory=trajectory,
        trajectory_control=trajectory_control, collator=built.collator)
    return _verdict(measured, settings, variant, built, control, grit, start)


def _verdict(measured: ProbeMeasurements, settings: ProbeParams, variant: VariantParams, built: VariantModel,
             control: ArmTrace, grit: ArmTrace, start: int) -> dict[str, Any]:
    """The verdict as JSON, with both arms' losses (every step trained, ``start`` of them before
    the measured window) and, for a model with parts, one per part (GRIT's: a VLM's modalities are
    configured with GRIT per modality; a peer acts on the whole adapter)."""
    verdict, checks = decide(measured, settings)
    result = as_json(measured, verdict, checks)
    result.update(engine=variant.engine, engine_notes=built.engine_notes, control_losses=control.losses,
                  grit_losses=grit.losses, start_step=start, start_difference=start_difference(control, grit, start))
    if built.judge_parts is not None and variant.grit:
        parts = built.judge_parts(measured, settings)
        inert = [part for part, r in parts.items() if r["verdict"] != EFFECTIVE and r["precondition"]]
        if inert:
            result["verdict"] = INERT
            result["reasons"] = [*result["reasons"],
                                 *(f"{p}:{reason}" for p in inert for reason in parts[p]["reasons"])]
        result["modalities"] = parts
    return result
