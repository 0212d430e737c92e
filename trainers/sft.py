"""What every variant's training shares: the ordered data, the fair trainer and the step log.

Fairness is enforced here, not hoped for: the training examples are put in one seeded order
(whole shuffled epochs, cut to exactly ``max_steps * batch * accumulation``) and read
sequentially, so every variant sees the same batches; ``FairSFTTrainer`` hashes the token ids
of every batch it actually trains on (``batch_order_hash``), and the stage compares those hashes
across variants.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from trainers.data.formatting import TokenizedExample, pad_batch, tokenize_chat
from trainers.lora_optimizers import build_lora_optimizer


def training_order(n_examples: int, n_needed: int, seed: int) -> list[int]:
    """Indices of ``n_needed`` examples: consecutive epochs, each a fresh seeded shuffle."""
    if n_examples == 0:
        raise ValueError("no training examples")
    order: list[int] = []
    epoch = 0
    while len(order) < n_needed:
        indices = list(range(n_examples))
        random.Random(f"{seed}:epoch:{epoch}").shuffle(indices)
        order += indices
        epoch += 1
    return order[:n_needed]


def ordered_examples(rows: Sequence[dict], tokenizer, n_needed: int, seed: int) -> list[dict]:
    """Tokenized examples (input_ids, labels) in the one training order shared by all variants."""
    tokenized = tokenized_examples(rows, tokenizer)
    return [tokenized[i] for i in training_order(len(tokenized), n_needed, seed)]


def tokenized_examples(rows: Sequence[dict], tokenizer) -> list[dict]:
    """Chat examples as the trainer reads them (input_ids, labels), in the order given."""
    return [{"input_ids": t.input_ids, "labels": t.labels}
            for t in (tokenize_chat(tokenizer, row["prompt"], row["response"]) for row in rows)]


class PaddingCollator:
    """Dynamic padding of pre-tokenized examples (see ``trainers/data/formatting.py``)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_batch([TokenizedExample(list(f["input_ids"]), list(f["labels"])) for f in features], self.pad_id)


def batch_digest(inputs: dict[str, torch.Tensor]) -> str:
    """sha256 of the batch's token ids (and its pixels, for image-text batches)."""
    digest = hashlib.sha256(inputs["input_ids"].detach().cpu().to(torch.int64).numpy().tobytes())
    if isinstance(inputs.get("pixel_values"), torch.Tensor):
        digest.update(inputs["pixel_values"].detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def order_hash(digests: Sequence[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def trainer_lineage(trainer) -> str:
    """The class a trainer trains through, below this project's fair subclass: TRL's SFTTrainer,
    Unsloth's CPU or compiled rewrite of it, or transformers' Trainer. Two variants compared as a
    pair must train through the same one."""
    base = type(trainer).__mro__[1] if type(trainer).__name__ == "FairSFTTrainer" else type(trainer)
    return f"{base.__module__}.{base.__qualname__}"


def unsloth_state() -> dict[str, bool]:
    """What Unsloth has patched in this process: anything at all, and its GPU model stack."""
    return {"patched": os.environ.get("UNSLOTH_PATCHED") == "1", "gpu_stack": "unsloth.models.llama" in sys.modules}


def fair_trainer_class(base: type) -> type:
    """A subclass of ``base`` (TRL's SFTTrainer, as patched or not by Unsloth) that reads the
    data in order, records what it trains on, and can hand the optimizer to GRIT or build a LoRA
    optimizer of PEFT's (``lora_optimizer``) from the optimizer class ``train.optim`` chose."""

    class FairSFTTrainer(base):
        def __init__(self, *args, grit_optimizer_door=None, grit_max_grad_norm: float | None = None,
                     lora_optimizer=None, **kwargs):
            self.batch_digests: list[str] = []
            self.step_tokens = 0
            self._grit_manager = grit_optimizer_door
            self._grit_max_grad_norm = grit_max_grad_norm
            self._lora_optimizer = lora_optimizer
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, *args, **kwargs):
            # The data is already in the shared seeded order; no trainer may reshuffle it.
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):
            self.batch_digests.append(batch_digest(inputs))
            self.step_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # The model's own causal-LM loss (mean over response tokens) for every variant. TRL's
            # default routes the loss through a fused Triton LM head that needs a GPU, and one
            # loss definition for all engines is what a fair comparison needs anyway.
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def create_optimizer(self, *args, **kwargs):
            if self._lora_optimizer is not None and self.optimizer is None:
                optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
                self.optimizer = build_lora_optimizer(self.model, self._lora_optimizer, optimizer_cls,
                                                      optimizer_kwargs, self.args.weight_decay)
            optimizer = super().create_optimizer(*args, **kwargs)   # keeps an optimizer already built
            if self._grit_manager is not None and not hasattr(self.optimizer, "manager"):
                # Pure GRIT: the wrapper clips after preconditioning; the Trainer must not clip first.
                self.optimizer = self._grit_manager.wrap_optimizer(optimizer, self._grit_max_grad_norm)
            return self.optimizer

    return FairSFTTrainer


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token cross-entropies, number of scored tokens) over the response tokens
    (labels != -100): the same loss the models train on, summed so batches can be pooled."""
    shifted_logits, shifted_labels = logits[:, :-1, :].float(), labels[:, 1:]
    scored = shifted_labels != -100
    if not bool(scored.any()):
        return 0.0, 0
    total = torch.nn.functional.cross_entropy(shifted_logits[scored], shifted_labels[scored], reduction="sum")
    return float(total), int(scored.sum())


class ValidationLoss:
    """The mean response-token loss on the held-out validation split, measured every ``every``
    optimizer steps (at the steps of ``at`` instead, when given) and after the last one, without
    gradients (GRIT captures nothing then)."""

    def __init__(self, examples: Sequence[dict], pad_id: int, every: int, batch_size: int,
                 at: Sequence[int] = ()) -> None:
        if not examples:
            raise ValueError("no validation examples: the validation split is empty")
        collate = PaddingCollator(pad_id)
        self.batches = [collate(list(examples[i: i + batch_size])) for i in range(0, len(examples), batch_size)]
        self.every, self.at = every, frozenset(at)

    def due(self, step: int, max_steps: int) -> bool:
        return step == max_steps or (step in self.at if self.at else step % self.every == 0)

    def measure(self, model) -> float:
        device = next(p for p in model.parameters()).device
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.batches:
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                batch_total, batch_count = summed_token_loss(logits, batch["labels"].to(device))
                total, count = total + batch_total, count + batch_count
        model.train(was_training)
        return total / count if count else float("nan")


# GRIT's counters per step (None without GRIT); the rank figures only on a reprojection's step.
GRIT_COUNTERS = {"inversions": int, "preconditioned_tensors": int, "capture_coverage": float,
                 "rank_min": int, "rank_median": int, "rank_max": int, "kept_energy_median": float}


def grit_counters(report: dict[str, float]) -> dict[str, float | int | None]:
    return {key: (kind(report[key]) if key in report else None) for key, kind in GRIT_COUNTERS.items()}


class StepLog(TrainerCallback):
    """Per optimizer step: loss, gradient norms, learning rate, tokens/s, rows captured, GRIT's
    counters (inversions, preconditioned tensors, capture coverage; ranks kept and their share of
    the eigen-energy on a reprojection's step), and the validation loss on the steps it is
    measured (``None`` on the others)."""

    def __init__(self, trainer_ref: list, manager=None, live=None, validation: ValidationLoss | None = None,
                 on_validation=None) -> None:
        self.trainer_ref, self.manager, self.live = trainer_ref, manager, live
        self.validation = validation
        # on_validation(step, val_loss) -> True stops training there (the study's pruner)
        self.on_validation = on_validation
        self.stopped_at: int | None = None
        self.rows: list[dict[str, float | int | None]] = []
        self._started = time.perf_counter()
        self._pending: dict[str, float | int | None] = {}

    def replay(self, rows: list[dict[str, float | int | None]]) -> None:
        """Start from the rows of a checkpoint (a resumed run logs every step exactly once)."""
        self.rows = []
        for row in rows:
            self._record(dict(row))

    def _record(self, row: dict[str, float | int | None]) -> None:
        self.rows.append(row)
        if self.live is not None:
            self.live.step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.live.log_metric(f"train/{key}", value)
            self.live.next_step()

    def mean_tokens_per_second(self) -> float | None:
        """Training throughput over the logged steps (None when no step measured it)."""
        measured = [r["tokens_per_second"] for r in self.rows if r["tokens_per_second"] is not None]
        return sum(measured) / len(measured) if measured else None

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()
        self.trainer_ref[0].step_tokens = 0

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._started
        trainer = self.trainer_ref[0]
        scheduler = kwargs.get("lr_scheduler")
        report = self.manager.last_report if self.manager is not None else {}
        self._pending = {
            "step": state.global_step,
            "learning_rate": float(scheduler.get_last_lr()[0]) if scheduler is not None else None,
            "tokens_per_second": trainer.step_tokens / elapsed if elapsed > 0 else None,
            "grad_norm_raw": report.get("grad_norm_raw"),
            "grad_norm_preconditioned": report.get("grad_norm_preconditioned"),
            "rows_captured": int(report["rows_captured"]) if "rows_captured" in report else None,
            **grit_counters(report),
            "val_loss": None,
        }
        if self.validation is not None and self.validation.due(state.global_step, state.max_steps):
            self._pending["val_loss"] = self.validation.measure(kwargs["model"])
            if self.on_validation is not None and self.on_validation(state.global_step, self._pending["val_loss"]):
                self.stopped_at = state.global_step
                control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs:
            return
        row = {**self._pending, "loss": float(logs["loss"])}
        if row["grad_norm_raw"] is None and logs.get("grad_norm") is not None:
            row["grad_norm_raw"] = float(logs["grad_norm"])
        self._pending = {}
        self._record(row)
