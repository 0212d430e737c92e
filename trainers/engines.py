"""The two training engines, built on the same base model and the same LoRA placement.

- ``peft``: transformers + PEFT; never imports Unsloth (pure GRIT and its control).
- ``unsloth``: Unsloth's ``FastLanguageModel`` (baseline and hybrid). Importing Unsloth patches
  transformers and TRL for the whole process, so a process builds one engine only.

On CUDA, Unsloth replaces the LoRA MLP/QKV/O forwards with fused kernels that read the LoRA
weights directly and never expose u = A x nor the gradient at the LoRA output. For a GRIT
variant this engine takes Unsloth's kernels off and records it; GRIT then puts its own fused
LoRA functions in their place (``trainers/grit/fused.py``: the activations Unsloth's kernels
save, GRIT's rows from their backward; ``grit.capture``), and its coverage check fails the run
loudly if any module still captures nothing. On CPU Unsloth uses the plain path already.

Unsloth also compiles each decoder layer with ``torch.compile`` on CUDA. A compiled layer keeps
the module hooks it was traced with: hooks registered later (GRIT attached after the probe's
control arm ran) are silently skipped, which the first H100 run of the GPU check showed (0 rows
captured on every module). A GRIT variant therefore runs the layers uncompiled, in both probe arms.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

from trainers.base_model import BaseModelFiles, load_causal_lm, load_tokenizer, torch_dtype
from trainers.config import TrainingSections, VariantParams
from trainers.grit.layer_selection import select_target_modules

# Unsloth's switch for its per-decoder-layer torch.compile on CUDA ("0" turns it off).
BLOCK_COMPILE = "UNSLOTH_BLOCK_COMPILE"


@dataclass
class EngineModel:
    model: object
    tokenizer: object
    target_modules: list[str]
    notes: list[str] = field(default_factory=list)


def target_regex(module_names: list[str]) -> str:
    """One PEFT regex (full match on module names) for exactly these modules.

    Module names are relative to the base model (``model.layers.0.self_attn.q_proj``)."""
    return "^(?:" + "|".join(re.escape(name) for name in module_names) + ")$"


def _selected_modules(model, params: TrainingSections) -> list[str]:
    return select_target_modules(model, params.lora.target_modules, params.lora.layers)


def build_peft(files: BaseModelFiles, params: TrainingSections) -> EngineModel:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_causal_lm(files, params.model)
    if params.model.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.train.gradient_checkpointing)
    targets = _selected_modules(model, params)
    lora = params.lora
    peft_model = get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", use_rslora=lora.use_rslora,
        use_dora=lora.use_dora, target_modules=target_regex(targets), task_type="CAUSAL_LM",
    ), autocast_adapter_dtype=lora.adapter_dtype == "float32")
    if params.train.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    return EngineModel(peft_model, load_tokenizer(files, params.model), targets)


def build_unsloth(files: BaseModelFiles, params: TrainingSections, variant: VariantParams) -> EngineModel:
    import torch
    import unsloth  # noqa: F401  (patches transformers/TRL: this process trains one variant)
    from unsloth import FastLanguageModel

    if variant.grit:
        # Read by Unsloth when it patches the model and at every layer call; one variant per process.
        os.environ[BLOCK_COMPILE] = "0"

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(files.hf_dir), max_seq_length=params.data.max_seq_length,
        dtype=torch_dtype(params.model.dtype), load_in_4bit=params.model.load_in_4bit,
        trust_remote_code=params.model.trust_remote_code,
    )
    targets = _selected_modules(model, params)
    lora = params.lora
    peft_model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=target_regex(targets), use_rslora=lora.use_rslora, random_state=params.train.seed,
        use_gradient_checkpointing="unsloth" if params.train.gradient_checkpointing else False,
    )
    notes = [f"unsloth on {'cuda' if torch.cuda.is_available() else 'cpu'}"]
    if lora.adapter_dtype == "model":
        # Unsloth keeps LoRA weights fp32 in a bf16/fp16 model, as PEFT's autocast does
        cast = cast_adapters(peft_model, torch_dtype(params.model.dtype))
        if cast:
            notes.append(f"{cast} LoRA tensors kept in the model's dtype (lora.adapter_dtype: model)")
    if variant.grit and torch.cuda.is_available():
        notes.append("Unsloth's per-layer torch.compile declined so GRIT's hooks run")
    if variant.grit:
        restored = restore_unfused_lora(peft_model)
        if restored:
            notes.append(f"took Unsloth's fused LoRA kernels off {restored} modules: GRIT's fused functions "
                         "take their place")
    return EngineModel(peft_model, load_tokenizer(files, params.model), targets, notes)


def cast_adapters(model, dtype) -> int:
    """Cast every LoRA weight to ``dtype`` (``lora.adapter_dtype: model`` on an engine that
    keeps them fp32); returns how many tensors changed dtype."""
    changed = 0
    for name, parameter in model.named_parameters():
        if "lora_" in name and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            changed += 1
    return changed


def restore_unfused_lora(model) -> int:
    """Put PEFT's LoRA forwards back where Unsloth installed fused kernels; returns how many.

    Only Unsloth's GPU model stack (``unsloth.models.llama``, imported by ``import unsloth`` on
    CUDA) installs fused kernels. On CPU Unsloth never imports it, and importing it here would
    re-patch TRL after the fact: Unsloth then fails to rebuild its SFT trainer and the hybrid
    would train through TRL's own class while its baseline trains through Unsloth's."""
    unsloth_llama = sys.modules.get("unsloth.models.llama")
    if unsloth_llama is None:
        return 0
    fused = getattr(unsloth_llama, "_fused_lora_modules", None)
    restore = getattr(unsloth_llama, "_decline_fused_lora_for_fsdp", None)
    if fused is None or restore is None or not fused(model):
        return 0
    return int(restore(model, reason="GRIT reads each LoRA layer's input and output gradient"))


def build_engine(files: BaseModelFiles, params: TrainingSections, variant: VariantParams) -> EngineModel:
    if variant.engine == "unsloth":
        return build_unsloth(files, params, variant)
    return build_peft(files, params)
