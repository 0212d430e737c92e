"""What one variant trains: its model, its examples in the shared order, and GRIT's wiring.

Training (``recipe.train_variant``) and the probe (``probe.variant.probe_variant``) build the
same :class:`VariantModel`, so the probe measures exactly what training runs. A language model
and a vision-language model differ only here (engine and model, data and collator, one GRIT
manager or one per modality); the recipe and the probe are the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.jsonl import read_jsonl
from trainers.base_model import BaseModelFiles
from trainers.config import TrainingSections, TrainParams, VariantParams
from trainers.engines import build_engine
from trainers.grit.distributed import world_size
from trainers.grit.layer import lora_layers
from trainers.sft import ordered_examples, tokenized_examples


@dataclass
class VariantModel:
    """``collator`` None: pre-tokenized text for TRL's SFTTrainer. ``manager_factory`` None: one
    GritManager. ``metadata`` holds facts of this kind of model for the training metadata;
    ``report(model, manager)`` the facts known only after training; ``judge_parts(measured,
    settings)`` the probe's verdict per part of the model (a VLM's modalities)."""

    model: Any
    tokenizer: Any
    examples: list
    engine_notes: list[str]
    target_modules: list[str]
    collator: Any = None
    manager_factory: Callable | None = None
    resumable: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)
    report: Callable[[Any, Any], dict[str, Any]] | None = None
    judge_parts: Callable | None = None
    validation: list = field(default_factory=list)   # tokenized held-out examples (validation loss)


def examples_needed(train: TrainParams, steps: int | None = None) -> int:
    """Examples for ``steps`` optimizer steps (all of training by default) on one rank."""
    return (steps or train.max_steps) * train.per_device_batch_size * train.gradient_accumulation_steps


def language_model(variant: VariantParams, params: TrainingSections, files: BaseModelFiles, data_dir: Path,
                   steps: int | None = None) -> VariantModel:
    """The variant's engine (Unsloth or PEFT) and its chat examples in the shared order."""
    engine = build_engine(files, params, variant)
    # Under data parallelism every optimizer step consumes a batch per rank, from the same order.
    examples = ordered_examples(read_jsonl(data_dir / "train.jsonl"), engine.tokenizer,
                                examples_needed(params.train, steps) * world_size(), params.train.seed)
    return VariantModel(engine.model, engine.tokenizer, examples, engine.notes, engine.target_modules,
                        metadata={"lora": params.lora.model_dump(mode="json")}, report=_lora_report,
                        validation=validation_examples(data_dir, engine.tokenizer))


def validation_examples(data_dir: Path, tokenizer) -> list[dict]:
    """The held-out split, tokenized like the training examples (in file order)."""
    path = data_dir / "validation.jsonl"
    if not path.is_file():
        return []
    return tokenized_examples(read_jsonl(path), tokenizer)


def _lora_report(model, manager) -> dict[str, Any]:
    layers = lora_layers(model, dora=manager is None)     # a DoRA variant trains without GRIT
    return {
        "effective_ranks": {module: int(layer.r[adapter]) for module, layer, adapter in layers},  # after truncation
        "scalings": {module: float(layer.scaling[adapter]) for module, layer, adapter in layers},
        "grit_diagnostics": manager.diagnostics() if manager else None,
    }
