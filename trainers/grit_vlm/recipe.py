"""Train one variant of a vision-language model on image-text pairs, and probe GRIT per modality.

The same recipe as the language-model variants (``trainers/recipe.py``), with a VLM in place
of the causal LM: base model -> LoRA per modality (``build_vlm_peft``) -> image-text pairs in
the one seeded order -> (GRIT: a per-modality ``VlmGritAdapter`` through the variant's door) ->
the fair Trainer -> adapter + metadata. Every variant adapts the same modules with the same
shapes; only GRIT's presence and door differ. The ``unsloth`` engine has no CPU path for
vision models, so on CPU a VLM variant trains with transformers + PEFT and says so in its notes.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipelines.params import Params, TrainParams, VariantParams
from trainers.base_model import BaseModelFiles, torch_dtype
from trainers.grit.config import GritConfig
from trainers.grit.manager import base_module_name
from trainers.grit_vlm.adapter import VlmGritAdapter, build_vlm_peft
from trainers.grit_vlm.config import Modality, VlmGritConfig
from trainers.grit_vlm.data import read_pairs
from trainers.grit_vlm.models import ImageTextExample, encoding_for, load_vlm
from trainers.probe.config import ProbeParams
from trainers.probe.verdict import ProbeMeasurements, as_json, decide
from trainers.recipe import TrainResult, attach_grit, build_trainer, examples_needed, grit_door, world_size
from trainers.sft import StepLog, order_hash, training_order


class ImageTextCollator:
    """Trainer collator: a list of :class:`ImageTextExample` -> model inputs with labels."""

    def __init__(self, encoding) -> None:
        self.encoding = encoding

    def __call__(self, examples: list[ImageTextExample]) -> dict[str, torch.Tensor]:
        return self.encoding(examples)


def vlm_manager_factory(config: VlmGritConfig, selected: dict[Modality, list[str]]):
    """``attach_grit``'s factory for a VLM: one GRIT manager per modality."""
    def factory(model, grit: GritConfig, total_steps: int | None = None) -> VlmGritAdapter:
        return VlmGritAdapter(model, config, selected, grit, total_steps)
    return factory


def ordered_pairs(pairs: list[ImageTextExample], train: TrainParams, steps: int | None = None) -> list[ImageTextExample]:
    """The pairs in the one seeded order shared by every variant (``sft.training_order``)."""
    return [pairs[i] for i in training_order(len(pairs), examples_needed(train, steps) * world_size(), train.seed)]


def vlm_peft_model(files: BaseModelFiles, params: Params):
    """(PEFT model, encoding, modality -> modules) for the configured VLM and GRIT-VLM config."""
    model = load_vlm(files.hf_dir, torch_dtype(params.model.dtype), params.model.trust_remote_code)
    encoding = encoding_for(files.hf_dir, model, params.model.trust_remote_code)
    peft_model, selected = build_vlm_peft(model, params.vlm.config())
    return peft_model, encoding, selected


def train_vlm_variant(
    name: str, variant: VariantParams, params: Params, files: BaseModelFiles, data_dir: Path, adapter_dir: Path,
    checkpoint_dir: Path, live=None,
) -> TrainResult:
    torch.manual_seed(params.train.seed)
    model, encoding, selected = vlm_peft_model(files, params)
    train = params.train
    examples = ordered_pairs(read_pairs(data_dir / "train_pairs.jsonl"), train)
    door = grit_door(variant)
    notes = [] if variant.engine == "peft" else [
        "unsloth's vision path needs CUDA; trained with transformers + PEFT (GRIT's door is unchanged)"]
    grit = attach_grit(model, params.grit, door, train.max_steps, vlm_manager_factory(params.vlm.config(), selected))
    manager = grit.manager
    trainer_ref: list = []
    step_log = StepLog(trainer_ref, manager, live)
    trainer = build_trainer(model, encoding.tokenizer, examples, train, checkpoint_dir, grit, [step_log],
                            bf16=params.model.dtype == "bfloat16", checkpoints=False,
                            collator=ImageTextCollator(encoding))
    trainer_ref.append(trainer)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    adapter_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(adapter_dir)
    losses = [row["loss"] for row in step_log.rows]
    metadata: dict[str, Any] = {
        "variant": name, "engine": variant.engine, "grit": variant.grit, "grit_door": door, "engine_notes": notes,
        "model_kind": "vlm", "vlm_config": params.vlm.config().model_dump(mode="json"),
        "target_modules": [m for modules in selected.values() for m in modules],
        "modality_modules": selected,
        "batch_order_hash": order_hash(trainer.batch_digests), "batches_trained": len(trainer.batch_digests),
        "train_seconds": seconds, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "train_loss": output.training_loss,
        "steps": trainer.state.global_step,
        "tokens_per_second": step_log.mean_tokens_per_second(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "grit_all_ready": manager.all_ready() if manager else None,
        "grit_modality_stats": manager.modality_stats() if manager else None,
        "grit_modality_history": manager.history if manager else None,
        "world_size": world_size(),
    }
    (adapter_dir / "grit_metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    if manager is not None:
        manager.detach()
    return TrainResult(name, variant.engine, adapter_dir, metadata, step_log.rows)


def modality_verdicts(measured: ProbeMeasurements, selected: dict[Modality, list[str]], config: VlmGritConfig,
                      settings: ProbeParams) -> dict[Modality, dict[str, Any]]:
    """The probe's verdict per modality: the same checks on each modality's modules alone (a
    GRIT that acts on the decoder but not on the vision tower is inert *there*). A modality
    configured with ``natural_gradient: false`` is reported but expected to be inert."""
    verdicts = {}
    for modality, modules in selected.items():
        own = set(modules)
        subset = replace(measured, modules=[m for m in measured.modules if base_module_name(m.name) in own])
        verdict, checks = decide(subset, settings, part=True)
        verdicts[modality] = {**as_json(subset, verdict, checks),
                              "natural_gradient": config.modalities()[modality].natural_gradient}
    return verdicts


def probe_vlm(name: str, variant: VariantParams, params: Params, files: BaseModelFiles, data_dir: Path,
              workdir: Path, trajectory=None, trajectory_control: str | None = None):
    """Control arm vs GRIT arm for the first K steps of one VLM GRIT variant (the same initial
    adapter and batches as its training). Returns (measurements of every module, verdict per
    modality, control trace, GRIT trace)."""
    from trainers.probe.measure import probe_setup

    torch.manual_seed(params.train.seed)
    model, encoding, selected = vlm_peft_model(files, params)
    examples = ordered_pairs(read_pairs(data_dir / "train_pairs.jsonl"), params.train, params.probe.steps)
    factory = vlm_manager_factory(params.vlm.config(), selected)

    def attach(model, config, door, total_steps):
        return attach_grit(model, config, door, total_steps, factory)

    measured, control, grit = probe_setup(
        name, model, encoding.tokenizer, examples, params.train, params.grit, grit_door(variant), params.probe,
        workdir, attach=attach, bf16=params.model.dtype == "bfloat16", trajectory=trajectory,
        trajectory_control=trajectory_control, collator=ImageTextCollator(encoding))
    return measured, modality_verdicts(measured, selected, params.vlm.config(), params.probe), control, grit
