"""A vision-language model as a training variant: what the one recipe needs to train and probe it.

Compared with a language model only the parts of :class:`VariantModel` differ: the VLM with a
LoRA shape per modality (``build_vlm_peft``), image-text pairs in the shared seeded order and
their collator, one GRIT manager per modality (``VlmGritAdapter``) and a probe verdict per
modality. The ``unsloth`` engine has no CPU path for vision models, so a VLM variant trains with
transformers + PEFT and says so in its notes (GRIT's door is unchanged).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from trainers.base_model import BaseModelFiles, torch_dtype
from trainers.config import TrainingSections, TrainParams, VariantParams, variant_grit
from trainers.grit.config import GritParams
from trainers.grit.distributed import world_size
from trainers.grit.layer import base_module_name
from trainers.grit_vlm.adapter import VlmGritAdapter, build_vlm_peft
from trainers.grit_vlm.config import Modality, VlmGritParams, modality_grit_config
from trainers.grit_vlm.data import ImageTextExample, read_pairs
from trainers.grit_vlm.models import encoding_for, load_vlm
from trainers.grit_vlm.presets import vlm_config
from trainers.probe.config import ProbeParams
from trainers.probe.verdict import ProbeMeasurements, as_json, decide
from trainers.sft import training_order
from trainers.variant_model import VariantModel, examples_needed

UNSLOTH_ON_VLM_NOTE = "unsloth's vision path needs CUDA; trained with transformers + PEFT (GRIT's door is unchanged)"


class ImageTextCollator:
    """Trainer collator: a list of :class:`ImageTextExample` -> model inputs with labels."""

    def __init__(self, encoding) -> None:
        self.encoding = encoding

    def __call__(self, examples: list[ImageTextExample]) -> dict[str, torch.Tensor]:
        return self.encoding(examples)


def vlm_manager_factory(config: VlmGritParams, selected: dict[Modality, list[str]]):
    """``attach_grit``'s factory for a VLM: one GRIT manager per modality."""
    def factory(model, grit: GritParams, total_steps: int | None = None) -> VlmGritAdapter:
        return VlmGritAdapter(model, config, selected, grit, total_steps)
    return factory


def ordered_pairs(pairs: list[ImageTextExample], train: TrainParams,
                  steps: int | None = None) -> list[ImageTextExample]:
    """The pairs in the one seeded order shared by every variant (``sft.training_order``)."""
    return [pairs[i] for i in training_order(len(pairs), examples_needed(train, steps) * world_size(), train.seed)]


def vision_language_model(variant: VariantParams, params: TrainingSections, files: BaseModelFiles, data_dir: Path,
                          steps: int | None = None) -> VariantModel:
    config = vlm_config(params)
    model = load_vlm(files.hf_dir, torch_dtype(params.model.dtype), params.model.trust_remote_code)
    encoding = encoding_for(files.hf_dir, model, params.model.trust_remote_code)
    peft_model, selected = build_vlm_peft(model, config)
    grit = variant_grit(params.grit, variant)
    preconditioned = {name: modality_grit_config(grit, modality).precondition
                      for name, modality in config.modalities().items()}
    return VariantModel(
        peft_model, encoding.tokenizer, ordered_pairs(read_pairs(data_dir / "train_pairs.jsonl"), params.train, steps),
        engine_notes=[] if variant.engine == "peft" else [UNSLOTH_ON_VLM_NOTE],
        target_modules=[m for modules in selected.values() for m in modules],
        collator=ImageTextCollator(encoding), manager_factory=vlm_manager_factory(config, selected),
        resumable=False,   # VlmGritAdapter has no checkpointed state yet
        metadata={"model_kind": "vlm", "vlm_config": config.model_dump(mode="json"), "modality_modules": selected},
        report=_modality_report,
        judge_parts=lambda measured, settings: modality_verdicts(measured, selected, preconditioned, settings),
    )


def _modality_report(model, manager) -> dict[str, Any]:
    return {"grit_modality_stats": manager.modality_stats() if manager else None,
            "grit_modality_history": manager.history if manager else None}


def modality_verdicts(measured: ProbeMeasurements, selected: dict[Modality, list[str]],
                      preconditioned: dict[Modality, bool], settings: ProbeParams) -> dict[Modality, dict[str, Any]]:
    """The probe's verdict per modality: the same checks on each modality's modules alone (a
    GRIT that acts on the decoder but not on the vision tower is inert *there*). A modality
    configured with ``grit: {precondition: false}`` is reported but expected to be inert."""
    verdicts = {}
    for modality, modules in selected.items():
        own = set(modules)
        subset = replace(measured, modules=[m for m in measured.modules if base_module_name(m.name) in own])
        verdict, checks = decide(subset, settings, part=True)
        verdicts[modality] = {**as_json(subset, verdict, checks),
                              "precondition": preconditioned[modality]}
    return verdicts
