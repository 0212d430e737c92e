"""Train one variant: its model and ordered data -> (GRIT) -> the fair Trainer -> adapter + metadata.

Every variant, language model or vision-language model, runs this same recipe; only what
:func:`variant_model` builds (engine, data, GRIT manager) and the GRIT door (callback for
Unsloth, optimizer wrapper for PEFT) differ. A killed run resumes from the last checkpoint in
``checkpoint_dir`` (adapter, optimizer, scheduler, RNG, GRIT state and the batch digests so far)
when that checkpoint was made with the same parameters.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from core.section import content_hash
from trainers.base_model import BaseModelFiles
from trainers.config import (
    LoraOptimizerParams,
    TrainingSections,
    TrainParams,
    VariantParams,
    variant_grit,
    with_variant_lora,
)
from trainers.grit.config import GritParams
from trainers.grit.distributed import world_size
from trainers.grit.doors import trainer_clipping_norm
from trainers.grit.fused import capture_kinds
from trainers.grit.manager import GritManager
from trainers.grit_vlm.variant import vision_language_model
from trainers.lora_optimizers import lora_optimizer_kind
from trainers.sft import (
    PaddingCollator,
    StepLog,
    ValidationLoss,
    fair_trainer_class,
    order_hash,
    trainer_lineage,
    unsloth_state,
)
from trainers.variant_model import VariantModel, language_model

GRIT_STATE = "grit_state.pt"
RESUME_KEY = "resume.json"


@dataclass
class TrainResult:
    variant: str
    engine: str
    adapter_dir: Path
    metadata: dict[str, Any]
    steps: list[dict[str, Any]]


def variant_model(variant: VariantParams, params: TrainingSections, files: BaseModelFiles, data_dir: Path,
                  steps: int | None = None) -> VariantModel:
    """What the variant trains (``steps``: only the first steps' examples, for the probe)."""
    build = vision_language_model if params.model.kind == "vlm" else language_model
    return build(variant, with_variant_lora(params, variant), files, data_dir, steps)


def _latest_checkpoint(checkpoint_dir: Path, key: str) -> Path | None:
    marker = checkpoint_dir / RESUME_KEY
    if not marker.is_file() or json.loads(marker.read_text()).get("key") != key:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # another configuration's checkpoints
        return None
    # GRIT_STATE is written last and atomically (on_save runs after the Trainer's own files), so
    # a checkpoint without it was interrupted while saving and is skipped.
    complete = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / GRIT_STATE).is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


class SaveExtraState(TrainerCallback):
    """GRIT state, the batch digests and the step log so far go into every checkpoint folder; two
    checkpoints are kept, so a kill while the newest is being written leaves the previous one
    complete."""

    def __init__(self, trainer_ref: list, manager, step_log: StepLog) -> None:
        self.trainer_ref, self.manager, self.step_log = trainer_ref, manager, step_log

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{GRIT_STATE}.partial"
        torch.save({"grit": self.manager.state_dict() if self.manager else None,
                    "batch_digests": list(self.trainer_ref[0].batch_digests),
                    "step_rows": list(self.step_log.rows)}, partial)
        os.replace(partial, folder / GRIT_STATE)  # the checkpoint counts as complete only now


@dataclass
class GritAttachment:
    """How GRIT enters one Trainer: its manager, Trainer callbacks, and the optimizer door."""

    manager: Any = None
    callbacks: list[Any] = field(default_factory=list)
    optimizer_door: Any = None          # a manager whose ``wrap_optimizer`` takes the optimizer


def grit_door(variant: VariantParams) -> str | None:
    """The hybrid enters Unsloth's loop as a callback; pure GRIT owns the optimizer."""
    if not variant.grit:
        return None
    return "callback" if variant.engine == "unsloth" else "optimizer"


def capture_summary(manager) -> dict[str, int] | None:
    """How many modules hand GRIT their rows through each path ("fused", "hooks")."""
    paths = getattr(manager, "capture_paths", None)
    return capture_kinds(paths.values()) if paths else None


def attach_grit(model, config: GritParams, door: str | None, total_steps: int, manager_factory=None) -> GritAttachment:
    """The one way training wires GRIT onto a PEFT model (the probe measures this same wiring).
    ``manager_factory(model, config, total_steps)`` builds something with GritManager's
    interface (a VLM's per-modality adapter); a GritManager by default."""
    if door is None:
        return GritAttachment()
    manager = (manager_factory or GritManager)(model, config, total_steps=total_steps)
    for note in getattr(manager, "notes", []):
        print(f"[grit] {note}", file=sys.stderr)     # e.g. a layer the fused functions cannot take
    if door == "callback":
        return GritAttachment(manager, [manager.callback()])
    return GritAttachment(manager, optimizer_door=manager)


def build_trainer(
    model, tokenizer, examples: list[dict], train: TrainParams, output_dir: Path, grit: GritAttachment,
    callbacks: list[Any], bf16: bool = False, max_steps: int | None = None, checkpoints: bool = True,
    progress: bool = True, collator=None, lora_optimizer: LoraOptimizerParams | None = None,
):
    """TRL's SFTTrainer (as patched by Unsloth when the engine imported it) in the fair form:
    sequential batches, one loss, GRIT's door or a LoRA optimizer of PEFT's (``lora_optimizer``,
    from ``train.optim``'s class). ``callbacks`` run before GRIT's own.

    ``collator``: examples that are not pre-tokenized text (a VLM's image-text pairs) are kept
    as they are and batched by it, in a plain ``transformers.Trainer`` (TRL's SFT preparation
    is for text)."""
    from datasets import Dataset
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    door = grit.optimizer_door
    config = SFTConfig(
        output_dir=str(output_dir), max_steps=max_steps or train.max_steps,
        per_device_train_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler, warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
        # Pure GRIT: the optimizer wrapper clips after preconditioning; the Trainer must not clip first.
        max_grad_norm=trainer_clipping_norm(train.max_grad_norm, grit_clips=door is not None),
        optim=train.optim, seed=train.seed,
        data_seed=train.seed, logging_steps=1, save_strategy="steps" if checkpoints else "no",
        save_steps=train.save_steps, save_total_limit=2, report_to=[], remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, use_cpu=not torch.cuda.is_available(),
        bf16=bf16, fp16=False, dataloader_num_workers=0, disable_tqdm=not progress, gradient_checkpointing=False,
    )
    if collator is None:
        base, dataset, collator = SFTTrainer, Dataset.from_list(examples), PaddingCollator(tokenizer.pad_token_id)
    else:
        base, dataset = Trainer, examples
    return fair_trainer_class(base)(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        data_collator=collator, callbacks=[*callbacks, *grit.callbacks],
        grit_optimizer_door=door, grit_max_grad_norm=train.max_grad_norm, lora_optimizer=lora_optimizer,
    )


def _fair_trainer(built: VariantModel, params: TrainingSections, variant: VariantParams, grit: GritAttachment,
                  checkpoint_dir: Path, live, on_validation) -> tuple[Any, StepLog]:
    """The Trainer and its step log. The log and the checkpoint callback read the Trainer through
    ``trainer_ref``, filled once it exists (they are its callbacks, so they are built first)."""
    train = params.train
    trainer_ref: list = []
    validation = (ValidationLoss(built.validation, built.tokenizer.pad_token_id, train.eval_steps,
                                 train.per_device_batch_size, at=train.eval_at) if built.validation else None)
    step_log = StepLog(trainer_ref, grit.manager, live, validation, on_validation)
    callbacks = [step_log, SaveExtraState(trainer_ref, grit.manager, step_log)] if built.resumable else [step_log]
    trainer = build_trainer(built.model, built.tokenizer, built.examples, train, checkpoint_dir, grit, callbacks,
                            bf16=params.model.dtype == "bfloat16", checkpoints=built.resumable,
                            collator=built.collator, lora_optimizer=variant.lora_optimizer)
    trainer_ref.append(trainer)
    return trainer, step_log


def _resume_point(name: str, params: TrainingSections, checkpoint_dir: Path) -> Path | None:
    """The checkpoint this run resumes from (None: a fresh start), after marking ``checkpoint_dir``
    with this run's key so that a later run with other parameters discards its checkpoints."""
    key = content_hash(params) + ":" + name
    resume_from = _latest_checkpoint(checkpoint_dir, key)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / RESUME_KEY).write_text(json.dumps({"key": key}))
    return resume_from


def _restore_extra_state(checkpoint: Path, trainer, step_log: StepLog, manager) -> None:
    """What the Trainer's own checkpoint lacks: the batch digests, the step log and GRIT's state."""
    extra = torch.load(checkpoint / GRIT_STATE, weights_only=False)
    trainer.batch_digests = list(extra["batch_digests"])
    step_log.replay(extra.get("step_rows", []))   # the log restarts complete, not at the checkpoint
    if manager is not None:
        # Before trainer.train: modules truncated before the checkpoint are shrunk to their saved
        # rank here, so the Trainer's load_adapter and the optimizer it builds find those shapes.
        manager.load_state_dict(extra["grit"])


def training_metadata(name: str, variant: VariantParams, built: VariantModel, trainer, step_log: StepLog,
                      manager, output, seconds: float, resume_from: Path | None) -> dict[str, Any]:
    """``grit_metadata.json``: what trained (engine, door, modules), on which batches, how the loss
    went, how fast and in how much memory, and GRIT's own account; read after training and saving,
    so the peak memory figures include the save."""
    losses = [row["loss"] for row in step_log.rows]
    return {
        "variant": name, "engine": variant.engine, "grit": variant.grit,
        "grit_door": grit_door(variant), "lora_optimizer": lora_optimizer_kind(trainer.optimizer),
        "trainer_class": trainer_lineage(trainer), "unsloth_state": unsloth_state(),
        "engine_notes": built.engine_notes, "target_modules": built.target_modules, **built.metadata,
        "batch_order_hash": order_hash(trainer.batch_digests), "batches_trained": len(trainer.batch_digests),
        "train_seconds": seconds, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_val_loss": next((r["val_loss"] for r in reversed(step_log.rows) if r.get("val_loss") is not None),
                               None),
        "train_loss": output.training_loss, "steps": trainer.state.global_step,
        "tokens_per_second": step_log.mean_tokens_per_second(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "grit_all_ready": manager.all_ready() if manager else None,
        "grit_capture": capture_summary(manager), "grit_notes": list(getattr(manager, "notes", [])),
        "trainable_parameters": sum(p.numel() for n, p in trainer.model.named_parameters()
                                    if p.requires_grad and "lora_" in n),   # fewer once GRIT truncated
        **(built.report(trainer.model, manager) if built.report else {}),
        "resumed_from": resume_from.name if resume_from else None, "world_size": world_size(),
        "stopped_at": step_log.stopped_at,
    }


def train_variant(
    name: str, variant: VariantParams, params: TrainingSections, files: BaseModelFiles, data_dir: Path,
    adapter_dir: Path, checkpoint_dir: Path, live=None, on_trained=None, on_validation=None,
) -> TrainResult:
    """``on_trained(model, manager)`` runs on every rank right after training, before saving; what
    it returns (a dict) is added to the metadata. ``on_validation(step, val_loss)`` sees every
    validation loss as it is measured; returning True stops training there (``stopped_at``)."""
    torch.manual_seed(params.train.seed)
    built = variant_model(variant, params, files, data_dir)
    grit = attach_grit(built.model, variant_grit(params.grit, variant), grit_door(variant), params.train.max_steps,
                       built.manager_factory)
    manager = grit.manager
    trainer, step_log = _fair_trainer(built, params, variant, grit, checkpoint_dir, live, on_validation)
    resume_from = _resume_point(name, params, checkpoint_dir) if built.resumable else None
    if resume_from is not None:
        _restore_extra_state(resume_from, trainer, step_log, manager)
        print(f"[train] {name}: resuming from {resume_from.name}")

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()   # this replicate's peak, not the process's so far
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    extra = (on_trained(trainer.model, manager) or {}) if on_trained is not None else {}
    main_process = trainer.is_world_process_zero()

    if main_process:
        adapter_dir.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(adapter_dir)
    metadata = {**training_metadata(name, variant, built, trainer, step_log, manager, output, seconds, resume_from),
                **extra}
    if main_process:
        (adapter_dir / "grit_metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if manager is not None:
        manager.detach()
    return TrainResult(name, variant.engine, adapter_dir, metadata, step_log.rows)
