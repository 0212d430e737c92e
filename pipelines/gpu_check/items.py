"""The GPU check's work, one item per process (importing Unsloth patches libraries globally):

    python -m pipelines.gpu_check.items ITEM --workdir DIR --out FILE [--device cuda|cpu]

ITEM is ``hybrid``, ``truncation``, ``qlora``, ``bf16``, ``overhead-time:<engine>:<shape>``,
``overhead-memory:<engine>:<arm>:<shape>`` or ``overhead-profile:<engine>:<shape>`` (engine
``unsloth`` or ``peft``, arm ``lora`` or ``grit``, shape ``smollm2``, ``llama-1b`` or ``llama-8b-layers``):
the kinds of :data:`REGISTRY`, each with the item of the check it serves (the overhead items'
timing and memory loops are ``profiling/``'s, shared with ``benchmarks/grit_overhead.py``).
Everything runs on a random Llama built from a config with a small word-level tokenizer, so
nothing is downloaded and no model package is needed. Each worker writes its figures as JSON;
``report.py`` judges them. ``--device cpu`` rehearses the plumbing where no GPU is (the test
suite does); its figures say nothing about CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import TrainerCallback

from pipelines.gpu_check.sizing import DEFAULT_SIZING, OVERHEAD_SHAPES, Sizing
from profiling.memory import peak_memory
from profiling.operations import counting_operations
from profiling.phases import PHASE_RANGE, STEP_PHASES, kernel_differences, phase_profile
from profiling.timing import ARMS, interleaved_step_times
from trainers.base_model import BaseModelFiles
from trainers.config import LoraParams, ModelParams, TrainParams, VariantParams, variant_grit
from trainers.data.config import DataParams
from trainers.engines import BLOCK_COMPILE
from trainers.grit.config import GritParams
from trainers.grit.fused import capture_kinds
from trainers.grit_vlm.params import VlmParams
from trainers.probe.config import ProbeParams

# What engines.py relies on inside Unsloth to find and switch off its fused LoRA kernels.
UNSLOTH_INTERNALS = ("_fused_lora_modules", "_decline_fused_lora_for_fsdp", "apply_lora_qkv", "apply_lora_o",
                     "_FUSED_LORA_MLPS")
SPECIALS = ["<|pad|>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The check's tiny model (every dimension a multiple of 64, as NF4 blocks need); the overhead
# item's shapes are in sizing.py (random weights: time does not depend on them).
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
WORDS = 500
OVERHEAD_WARMUP = 2     # untimed steps per arm (allocator, kernels, first inversion)


# ------------------------------------------------------------------------------ model and data

def word_tokenizer():
    """A word-level tokenizer (``w0`` .. ``w499``, the chat roles and ChatML's specials) with a
    ChatML chat template: everything the training recipe asks of a tokenizer, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = [*SPECIALS, "system", "user", "assistant", *(f"w{i}" for i in range(WORDS))]
    core = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocabulary)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def random_llama(folder: Path, shape: dict[str, int], seed: int = 0) -> BaseModelFiles:
    """A random Llama of ``shape`` with the word tokenizer, saved as a plain HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return BaseModelFiles("hf", folder.name, folder, None, None)
    tokenizer = word_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, **{"max_position_embeddings": 1024, **shape})
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return BaseModelFiles("hf", folder.name, folder, None, None)


def check_params(files: BaseModelFiles, dtype: str, load_in_4bit: bool = False, steps: int = 4) -> SimpleNamespace:
    """The sections training reads (``trainers.config.TrainingSections``), for a short run."""
    return SimpleNamespace(
        model=ModelParams(source="hf", model_id=str(files.hf_dir), dtype=dtype, load_in_4bit=load_in_4bit),
        data=DataParams(max_seq_length=128), lora=LoraParams(r=8, alpha=16),
        train=TrainParams(max_steps=steps, per_device_batch_size=4, warmup_steps=0, learning_rate=1e-3, seed=0),
        grit=GritParams(min_samples=16, update_freq=1), probe=ProbeParams(steps=3), vlm=VlmParams(), variants={})


def training_examples(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """``n`` tokenized chat examples of random words, in the recipe's shared order."""
    from trainers.sft import ordered_examples

    rng = random.Random(seed)
    rows = [{"prompt": " ".join(f"w{rng.randrange(WORDS)}" for _ in range(rng.randint(8, 24))),
             "response": " ".join(f"w{rng.randrange(WORDS)}" for _ in range(rng.randint(8, 24)))} for _ in range(64)]
    return ordered_examples(rows, tokenizer, n, seed)


def random_batch(size: int, length: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS) + 3, len(SPECIALS) + 3 + WORDS, (size, length), generator=generator)
    return {k: v.to(device)
            for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}.items()}


# --------------------------------------------------------------------------------- the probe

class StepOneRows(TrainerCallback):
    """Token rows GRIT holds per module at the end of optimizer step 1 (coverage on step 1)."""

    def __init__(self, manager) -> None:
        self.manager, self.rows = manager, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.rows = {name: s.u.count + s.u.pending_count for name, s in self.manager.modules.items()}


def probe_figures(name: str, model, tokenizer, params, door: str, workdir: Path,
                  grit: GritParams | None = None) -> dict[str, Any]:
    """The probe of the training recipe on ``model`` (control arm vs GRIT arm through ``door``),
    with ``grit`` (``params.grit`` by default)."""
    from trainers.probe.math import median
    from trainers.probe.measure import probe_setup
    from trainers.probe.verdict import decide, reasons
    from trainers.recipe import attach_grit

    recorders: list[StepOneRows] = []

    def attach(model, config, door, total_steps):
        attachment = attach_grit(model, config, door, total_steps)
        recorders.append(StepOneRows(attachment.manager))
        attachment.callbacks.append(recorders[-1])
        return attachment

    examples = training_examples(tokenizer, params.probe.steps * params.train.per_device_batch_size)
    measured, _, grit_arm = probe_setup(name, model, tokenizer, examples, params.train, grit or params.grit, door,
                                        params.probe, workdir, attach=attach, bf16=params.model.dtype == "bfloat16")
    verdict, checks = decide(measured, params.probe)
    rows = recorders[0].rows or {}
    return {
        "verdict": verdict, "reasons": reasons(checks), "checks": {c.name: c.detail for c in checks},
        "modules": len(measured.modules), "modules_covered_step1": sum(r > 0 for r in rows.values()),
        "min_rows_step1": min(rows.values(), default=0), "arm_error": grit_arm.error,
        "modules_ready": sum(m.usable_A and m.usable_B for m in measured.modules),
        "update_cosine_median": median([m.update.cosine for m in measured.modules if m.update]),
        "capture_paths": capture_kinds(m.capture_path for m in measured.modules),
    }


# ---------------------------------------------------------------------------------- the items

def fused_kernel_counts(model, unsloth_llama) -> dict[str, int]:
    """How many attention QKV / O projections and MLPs run Unsloth's fused LoRA kernels."""
    counts = {"qkv": 0, "o": 0, "mlp": 0}
    for module in unsloth_llama._fused_lora_modules(model):
        qkv = getattr(module, "apply_qkv", None) is unsloth_llama.apply_lora_qkv
        o = getattr(module, "apply_o", None) is unsloth_llama.apply_lora_o
        counts["qkv"] += qkv
        counts["o"] += o
        counts["mlp"] += not (qkv or o)
    return counts | {"total": sum(counts.values())}


def check_hybrid(workdir: Path, device: str) -> dict[str, Any]:
    """Unsloth's FastLanguageModel (fused kernels on CUDA) with GRIT through the Trainer callback."""
    import unsloth  # noqa: F401  (patches transformers/TRL: this process checks the hybrid only)
    from unsloth.models import llama as unsloth_llama

    from trainers.engines import build_unsloth

    missing = [name for name in UNSLOTH_INTERNALS if not hasattr(unsloth_llama, name)]
    files = random_llama(workdir / "tiny", TINY)
    # Unsloth declines its fused kernels for an fp32 base; bf16 is what they run in on a GPU.
    params = check_params(files, "bfloat16" if device == "cuda" else "float32")
    baseline = build_unsloth(files, params, VariantParams(engine="unsloth", grit=False))
    kernels = fused_kernel_counts(baseline.model, unsloth_llama) if not missing else {}
    del baseline
    torch.manual_seed(params.train.seed)
    variant = VariantParams(engine="unsloth", grit=True)
    hybrid = build_unsloth(files, params, variant)
    figures = probe_figures("hybrid_grit", hybrid.model, hybrid.tokenizer, params, "callback", workdir / "probe",
                            variant_grit(params.grit, variant))
    notes = [f"baseline LoRA: Unsloth fused {kernels.get('qkv', 0)} QKV, {kernels.get('o', 0)} O and "
             f"{kernels.get('mlp', 0)} MLP LoRA kernels", *hybrid.notes]
    return figures | {"device": device, "missing_internals": missing, "fused_kernels": kernels, "notes": notes,
                      "block_compile": os.environ.get(BLOCK_COMPILE)}


def check_qlora(workdir: Path, device: str) -> dict[str, Any]:
    """NF4 base through bitsandbytes, LoRA + GRIT (optimizer door), adapter saved and reloaded."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from trainers.base_model import load_causal_lm
    from trainers.engines import build_peft
    from trainers.probe.arms import snapshot_factors

    files = random_llama(workdir / "tiny", TINY)
    params = check_params(files, "bfloat16", load_in_4bit=True)
    torch.manual_seed(params.train.seed)
    engine = build_peft(files, params)
    nf4 = sum(type(m).__name__ == "Linear4bit" for m in engine.model.modules())
    figures = probe_figures("qlora_grit", engine.model, engine.tokenizer, params, "optimizer", workdir / "probe")
    engine.model.save_pretrained(workdir / "adapter")
    batch = random_batch(2, 32, seed=5, device="cuda")
    # is_trainable: the factors are compared through the probe's view, which lists trainable adapters only
    reloaded = PeftModel.from_pretrained(prepare_model_for_kbit_training(load_causal_lm(files, params.model),
                                                                         use_gradient_checkpointing=False),
                                         str(workdir / "adapter"), is_trainable=True)
    with torch.no_grad():
        trained_logits = engine.model.eval()(**batch).logits.float()
        reloaded_logits = reloaded.eval()(**batch).logits.float()
    trained, again = snapshot_factors(engine.model), snapshot_factors(reloaded)
    equal = trained.keys() == again.keys() and all(
        torch.equal(x, y) for n in trained for x, y in zip(trained[n], again[n], strict=True))
    return figures | {"device": device, "nf4_layers": nf4, "reload_weights_equal": bool(equal),
                      "reload_max_logit_difference": float((trained_logits - reloaded_logits).abs().max())}


def check_bf16(workdir: Path, device: str) -> dict[str, Any]:
    """A bf16 model's GRIT step (statistics and inverses fp32) against the same step recomputed
    in fp32 from the same (bf16-rounded) weights on the same batch."""
    from trainers.engines import build_peft
    from trainers.grit.manager import GritManager
    from trainers.probe.arms import module_gradients

    files = random_llama(workdir / "tiny", TINY)
    torch.manual_seed(0)
    low = build_peft(files, check_params(files, "bfloat16")).model.to(device)
    with torch.no_grad():      # a non-zero B, so both sides have statistics to invert
        for name, parameter in low.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    high = build_peft(files, check_params(files, "float32")).model.to(device)
    high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    batch = random_batch(4, 64, seed=3, device=device)
    gradients, dtypes = {}, set()
    for label, model in (("bf16", low), ("fp32", high)):
        manager = GritManager(model, GritParams(min_samples=1, update_freq=1, graft_norm=False))
        model.train()
        model(**batch).loss.backward()
        manager.before_step(None)
        gradients[label] = module_gradients(model)
        dtypes |= {str(t.dtype) for s in manager.modules.values()
                   for t in (s.u.total, s.v.total, *(i for i in s.inverse.values() if i is not None))}
        manager.detach()
    cosines, differences = [], []
    for name, reference in gradients["fp32"].items():
        ours = gradients["bf16"][name]
        cosines.append(float(torch.nn.functional.cosine_similarity(ours, reference, dim=0)))
        differences.append(float((ours - reference).norm() / reference.norm()))
    return {"device": device, "modules": len(cosines), "statistics_dtypes": sorted(dtypes),
            "all_finite": all(bool(torch.isfinite(g).all()) for g in gradients["bf16"].values()),
            "min_cosine": min(cosines), "median_cosine": statistics.median(cosines),
            "max_relative_difference": max(differences), "median_relative_difference": statistics.median(differences)}


# The paper's rank adaptation made to truncate early and often: reprojection every 3 steps, k by
# eigen-energy (tau 0.9, down to rank 1), factors really shrunk.
TRUNCATING = {"min_samples": 16, "update_freq": 1, "reprojection": True, "reprojection_freq": 3, "truncate": True,
              "budget_schedule": "adaptive", "energy_threshold": 0.9, "min_rank": 1}


class RanksPerStep(TrainerCallback):
    """The GRIT manager's effective ranks after each optimizer step."""

    def __init__(self, manager) -> None:
        self.manager, self.ranks = manager, []

    def on_step_end(self, args, state, control, **kwargs):
        self.ranks.append(dict(self.manager.effective_ranks()))


def check_truncation(workdir: Path, device: str) -> dict[str, Any]:
    """The hybrid with real truncation: GRIT shrinks LoRA factors inside Unsloth's training loop
    (callback door), training goes on at the smaller ranks, and the saved adapter reloads onto a
    plain transformers base with the same shapes and logits."""
    import unsloth  # noqa: F401  (patches transformers/TRL: this process checks the hybrid only)
    from peft import PeftModel

    from trainers.base_model import load_causal_lm
    from trainers.engines import build_unsloth
    from trainers.recipe import attach_grit, build_trainer

    files = random_llama(workdir / "tiny", TINY)
    params = check_params(files, "bfloat16" if device == "cuda" else "float32", steps=7)
    torch.manual_seed(params.train.seed)
    hybrid = build_unsloth(files, params, VariantParams(engine="unsloth", grit=True))
    grit = variant_grit(GritParams(**TRUNCATING), VariantParams(engine="unsloth", grit=True))  # fused, Unsloth's dtype
    attachment = attach_grit(hybrid.model, grit, "callback", params.train.max_steps)
    ranks = RanksPerStep(attachment.manager)
    examples = training_examples(hybrid.tokenizer, params.train.max_steps * params.train.per_device_batch_size)
    trainer = build_trainer(hybrid.model, hybrid.tokenizer, examples, params.train, workdir / "run", attachment,
                            [ranks], bf16=params.model.dtype == "bfloat16", checkpoints=False, progress=False)
    trainer.train()
    attachment.manager.detach()
    built = params.lora.r
    truncated_at = next((step + 1 for step, r in enumerate(ranks.ranks) if min(r.values()) < built), None)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    hybrid.model.save_pretrained(workdir / "adapter")
    reloaded = PeftModel.from_pretrained(load_causal_lm(files, params.model).to(device), str(workdir / "adapter"))
    final = ranks.ranks[-1]
    shapes_equal = all(
        reloaded.get_submodule(name).lora_A[state.adapter].weight.shape == state.lora_A.weight.shape
        for name, state in attachment.manager.modules.items())
    # no labels: with labels Unsloth computes a fused loss on CUDA and returns no logits
    batch = {k: v for k, v in random_batch(2, 32, seed=5, device=device).items() if k != "labels"}
    with torch.no_grad():
        trained_logits = hybrid.model.eval()(**batch).logits.float()
        reloaded_logits = reloaded.eval()(**batch).logits.float()
    return {"device": device, "block_compile": os.environ.get(BLOCK_COMPILE), "built_rank": built,
            "modules": len(final), "modules_truncated": sum(r < built for r in final.values()),
            "min_rank": min(final.values()), "max_rank": max(final.values()), "truncated_at_step": truncated_at,
            "steps": len(ranks.ranks), "losses": losses,
            "steps_after_truncation": len(ranks.ranks) - truncated_at if truncated_at else 0,
            "losses_finite": bool(losses) and all(math.isfinite(loss) for loss in losses),
            "reload_shapes_equal": bool(shapes_equal),
            "reload_max_logit_difference": float((trained_logits - reloaded_logits).abs().max()),
            "notes": list(hybrid.notes)}


# ------------------------------------------------------------------------------- the overhead

def overhead_model(workdir: Path, engine: str, grit: bool, device: str, shape: str = "smollm2",
                   sizing: Sizing = DEFAULT_SIZING, syncs: list[int] | None = None,
                   phase: Callable[[str], Any] | None = None):
    """(model, optimizer step function) of one arm on a model of ``shape`` (``OVERHEAD_SHAPES``),
    for batches of ``sizing.length`` tokens, with ``sizing``'s ``lora.adapter_dtype`` (``float32``,
    or ``model``: bf16 adapters on a bf16 model) and, for the GRIT arm, its ``grit.capture``
    (auto: the engine's own path). ``syncs``: the host synchronisations of each GRIT step
    (``before_step`` and ``after_step``) are appended to it. ``phase(name)``: a context manager
    around each phase of the step (``STEP_PHASES``), for a profile. ``sizing.lora_functions``
    "fused": the LoRA arm runs GRIT's fused functions without GRIT (on PEFT's engine; Unsloth's
    LoRA arm is its own fused kernels, :meth:`Sizing.for_engine`)."""
    model, lora, manager = _overhead_arm(workdir, engine, grit, device, shape, sizing)
    return model, _arm_step(model, lora, manager, device, syncs, phase or (lambda _name: nullcontext()))


def _overhead_arm(workdir: Path, engine: str, grit: bool, device: str, shape: str, sizing: Sizing):
    """(model in training mode, its trainable LoRA parameters, its GritManager or None): the arm
    :func:`overhead_model` times."""
    from trainers.engines import build_peft, build_unsloth
    from trainers.grit.fused import attach_without_grit
    from trainers.grit.manager import GritManager

    if refusal := sizing.refusal(device):          # before the random model is built
        raise ValueError(refusal)
    files = random_llama(workdir / f"{shape}-shape", OVERHEAD_SHAPES[shape])
    nf4 = sizing.base == "nf4"
    params = check_params(files, "bfloat16" if device == "cuda" else "float32", load_in_4bit=nf4)
    params.lora = LoraParams(r=16, alpha=32, adapter_dtype=sizing.adapter_dtype)
    # Unsloth sizes its rotary cache by max_seq_length: longer batches index past it (a CUDA assert).
    params.data = DataParams(max_seq_length=max(params.data.max_seq_length, sizing.length))
    torch.manual_seed(0)
    if engine == "unsloth":
        from unsloth import FastLanguageModel

        model = build_unsloth(files, params, VariantParams(engine="unsloth", grit=grit)).model
        FastLanguageModel.for_training(model)
    else:
        model = build_peft(files, params).model
        model = model if nf4 else model.to(device)          # bitsandbytes placed the NF4 base already
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    # auto: the variant's own capture path, GRIT's fused functions on Unsloth (the hybrid), hooks
    # on PEFT; fused on PEFT runs the fused functions with PEFT's numerics (fused_lora_dtype)
    config = variant_grit(GritParams(capture=sizing.grit_capture), VariantParams(engine=engine, grit=True))
    manager = GritManager(model, config) if grit else None
    if not grit and sizing.for_engine(engine).lora_functions == "fused":
        attach_without_grit(model, config.fused_lora_dtype)
    return model, lora, manager


def _arm_step(model, lora: list, manager, device: str, syncs: list[int] | None,
              mark: Callable[[str], Any]) -> Callable[[Any], None]:
    """One optimizer step of the arm, each phase inside ``mark(phase)``; GRIT's host
    synchronisations appended to ``syncs``."""
    from trainers.grit.doors import clip_gradients

    optimizer = torch.optim.AdamW(lora, lr=1e-4)

    def step(batch) -> None:
        with mark("forward"):
            loss = model(**batch).loss
        with mark("backward"):
            loss.backward()
        with mark("grit_before"):
            if manager is not None:
                with host_syncs(device, syncs):
                    manager.before_step(1.0)        # sync, invert when due, precondition, clip
            else:
                clip_gradients(lora, 1.0)
        with mark("optimizer"):
            optimizer.step()
        with mark("grit_after"):
            if manager is not None:
                with host_syncs(device, syncs):
                    manager.after_step(optimizer)
        with mark("zero_grad"):
            optimizer.zero_grad(set_to_none=True)

    return step


# What torch's sync debug mode says at each synchronising call (c10/cuda). Its first switch in a
# process also warns, once, that the mode "does not yet detect all synchronizing operations":
# matched on "synchroniz", that notice was counted as the one host synchronisation in 10 GRIT
# steps that the H100 and H200 reports show (GRIT's steps raise none in the mode "error").
SYNC_WARNING = "called a synchronizing CUDA operation"


def is_host_sync_warning(message: str) -> bool:
    """Whether a warning caught in torch's sync debug mode "warn" reports a synchronisation."""
    return SYNC_WARNING in message


@contextmanager
def host_syncs(device: str, counts: list[int] | None):
    """Count the host synchronisations inside the block into ``counts`` (nothing when None): on
    CUDA, each one torch's sync debug mode warns about; on CPU, the host reads the dispatcher
    sees (``profiling.operations.operation_counts``: a rehearsal of the same count)."""
    if counts is None:
        yield
        return
    if device == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum(is_host_sync_warning(str(w.message)) for w in caught))
        return
    with counting_operations() as counted:
        yield
    counts.append(counted.host_reads + counted.host_copies)


def lora_step_flops(shape: dict[str, int], vocab: int, batch: int, length: int, r: int) -> float:
    """About the floating-point operations of one LoRA training step on a Llama of ``shape``: the
    projections' and LM head's forward and input-gradient matmuls (2 + 2 per weight and token; a
    frozen base has no weight gradient, and the first block's input needs none), the LoRA
    factors' (2 + 4), and attention's scores and values (4 per position pair and width forward,
    8 backward; causal masking not discounted). Within a few percent of torch's
    ``FlopCounterMode`` on a small Llama (``tests/pipelines/test_gpu_check.py``)."""
    d, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    projections = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]   # (in, out)
    frozen = layers * sum(i * o for i, o in projections) + vocab * d
    reads_embeddings = d * (d + 2 * kv + 2 * inter)       # block 0's q, k, v, gate, up: no input gradient
    adapters = layers * sum(r * (i + o) for i, o in projections)
    tokens = batch * length
    attention = 12 * layers * batch * length * length * d
    return 4 * frozen * tokens - 2 * reads_embeddings * tokens + 6 * adapters * tokens + attention


# Dense bf16 peak of the GPUs the check has met, FLOP/s (vendor figures, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def unsloth_compile_per_arm(arm: str) -> None:
    """Unsloth's per-layer compile is a process-wide switch, read at every layer call: on for the
    LoRA arm (its fast path), off for the GRIT arm (GRIT must see each LoRA layer)."""
    os.environ[BLOCK_COMPILE] = "0" if arm == "grit" else "1"


def sized_batches(sizing: Sizing, count: int, device: str, first: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """``count`` random batches of ``sizing``'s size, seeds ``first``, ``first + 1``, ...: the
    same batches for every arm and pass that asks for them."""
    return (random_batch(sizing.batch, sizing.length, seed=first + k, device=device) for k in range(count))


def overhead_time(workdir: Path, device: str, engine: str, shape: str, sizing: Sizing) -> dict[str, Any]:
    """Both arms in one process, steps interleaved (LoRA, GRIT, LoRA, ...) on the same batches,
    so the machine's noise hits both alike; the ratio of median step times (``profiling/timing.py``), and
    what plain LoRA itself makes of the device: tokens/s and its share of the FLOP bound. On
    Unsloth the GRIT arm runs without Unsloth's per-layer compile, so LoRA is also timed without
    it (the same model, compiled and uncompiled steps interleaved): the ratio splits into leaving
    the compile (``compile_off_ratio``) and GRIT over uncompiled LoRA."""
    sizing = sizing.for_shape(shape).for_engine(engine)
    (model, lora), (_, grit) = [overhead_model(workdir, engine, arm == "grit", device, shape, sizing) for arm in ARMS]
    steps = sizing.steps + OVERHEAD_WARMUP
    timed = interleaved_step_times(lora, grit, sized_batches(sizing, steps, device), OVERHEAD_WARMUP, device,
                                   prepare=unsloth_compile_per_arm if engine == "unsloth" else None)
    tokens = sizing.batch * sizing.length
    flops = lora_step_flops(OVERHEAD_SHAPES[shape], model.config.vocab_size, sizing.batch, sizing.length,
                            LoraParams(r=16).r)
    peak = peak_flops(device)
    figures = {"shape": shape, **sizing.figures(),
               "lora_step_ms": 1000 * timed.lora_s,
               "grit_step_ms": 1000 * timed.grit_s, "step_time_ratio": timed.ratio,
               "mean_step_time_ratio": timed.mean_ratio,
               "lora_tokens_per_s": tokens / timed.lora_s, "lora_tflops": flops / timed.lora_s / 1e12,
               "lora_flop_fraction": flops / timed.lora_s / peak if peak else None,
               "garbage_collections": {arm: tally.figures(timed.steps) for arm, tally in timed.collections.items()}}
    if engine == "unsloth":
        # LoRA in both places: unsloth_compile_per_arm turns the compile off for the second
        split = interleaved_step_times(lora, lora, sized_batches(sizing, steps, device), OVERHEAD_WARMUP, device,
                                       prepare=unsloth_compile_per_arm)
        figures |= {"lora_uncompiled_step_ms": 1000 * split.grit_s, "compile_off_ratio": split.ratio,
                    "grit_over_uncompiled_lora": timed.grit_s / split.grit_s}
    return figures


def overhead_memory(workdir: Path, device: str, engine: str, arm: str, shape: str, sizing: Sizing) -> dict[str, Any]:
    """One arm alone in a fresh process: the peak CUDA memory of its whole training (weights,
    activations, optimizer and GRIT state); on CPU the process's peak RSS (``profiling/memory.py``). The
    GRIT arm also counts the host synchronisations of its GRIT steps (``host_syncs``)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    sizing = sizing.for_shape(shape).for_engine(engine)
    syncs: list[int] = []
    _, step = overhead_model(workdir, engine, arm == "grit", device, shape, sizing, syncs)
    memory = peak_memory(step, sized_batches(sizing, sizing.steps, device), device)
    figures: dict[str, Any] = {"peak_mib": memory.peak_mib}
    if arm == "grit":
        figures |= {"grit_host_syncs": sum(syncs), "grit_steps_watched": len(syncs) // 2}
    return figures


def overhead_profile(workdir: Path, device: str, engine: str, shape: str, sizing: Sizing) -> dict[str, Any]:
    """Where GRIT's extra step time goes: each arm profiled over ``steps`` steps after the warm-up
    (``profiling.phases.phase_profile``), the host's milliseconds per phase of the step, the device's
    kernel milliseconds and kernel launches per step, each phase's span on the device, the
    kernels that take longest, and GRIT's minus LoRA's for each (the kernels whose time differs
    most). Over 10 steps one of GRIT's steps inverts its factors (``update_freq`` 10), so the
    per-step figures carry a tenth of an inversion, as a run does; each phase's slowest step
    (``host_ms_slowest``) shows that step apart, and its operator calls per step (``host_ops``)
    count what the host pays for in it, free of timing noise."""
    from torch.profiler import record_function

    sizing = sizing.for_shape(shape).for_engine(engine)
    arms = {arm: overhead_model(workdir, engine, arm == "grit", device, shape, sizing,
                                phase=lambda name: record_function(PHASE_RANGE + name))[1] for arm in ARMS}
    profiles = {}
    for arm, step in arms.items():
        if engine == "unsloth":
            unsloth_compile_per_arm(arm)
        for batch in sized_batches(sizing, OVERHEAD_WARMUP, device):
            step(batch)
        profiles[arm] = phase_profile(step, sized_batches(sizing, sizing.steps, device, first=OVERHEAD_WARMUP),
                                      device)
    lora, grit = profiles["lora"], profiles["grit"]
    figures: dict[str, Any] = {"shape": shape, **sizing.figures()}
    for arm, profiled in profiles.items():
        kernels = sorted((profiled.kernel_ms or {}).items(), key=lambda kv: -kv[1])
        top = None if profiled.kernel_ms is None else dict(kernels[:8])
        figures[arm] = {"host_ms": profiled.host_ms, "host_ms_total": profiled.host_ms_total,
                        "host_ms_slowest": profiled.host_ms_slowest, "host_ops": profiled.host_ops,
                        "garbage_collections": profiled.collections.figures(profiled.steps),
                        "device_ms": profiled.device_ms, "kernel_launches": profiled.kernel_launches,
                        "device_span_ms": profiled.device_span_ms, "top_kernels_ms": top}
    on_device = lora.device_ms is not None
    figures["grit_minus_lora"] = {
        "host_ms": {name: grit.host_ms[name] - lora.host_ms[name] for name in lora.host_ms},
        "host_ms_total": grit.host_ms_total - lora.host_ms_total,
        "host_ops": {name: grit.host_ops[name] - lora.host_ops[name] for name in STEP_PHASES},
        "device_ms": grit.device_ms - lora.device_ms if on_device else None,
        "kernel_launches": grit.kernel_launches - lora.kernel_launches if on_device else None,
        "device_span_ms": {name: grit.device_span_ms[name] - lora.device_span_ms[name] for name in STEP_PHASES}
        if on_device else None,
        "kernels_ms": kernel_differences(lora.kernel_ms, grit.kernel_ms) if on_device else None}
    return figures


# ------------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Item:
    """One kind of item a worker process runs: ``run(workdir, device, *arguments, **sizes)``.

    ``part_of`` is the item of the check (``report.CHECKS``) it serves; ``arguments`` names what
    follows the kind in the item's name, ``:``-separated (``overhead-memory:peft:grit``);
    ``sized``: it takes the command line's :class:`Sizing` last."""

    run: Callable[..., dict[str, Any]]
    part_of: str
    arguments: tuple[str, ...] = ()
    sized: bool = False

    def __call__(self, kind: str, rest: str, workdir: Path, device: str,
                 sizing: Sizing = DEFAULT_SIZING) -> dict[str, Any]:
        values = rest.split(":") if rest else []
        if len(values) != len(self.arguments):
            spelled = "".join(f":<{name}>" for name in self.arguments)
            raise ValueError(f"item {kind!r} is named {kind}{spelled}")
        return self.run(workdir, device, *values, *([sizing] if self.sized else []))


REGISTRY: dict[str, Item] = {
    "hybrid": Item(check_hybrid, "hybrid"),
    "truncation": Item(check_truncation, "truncation"),
    "qlora": Item(check_qlora, "qlora"),
    "bf16": Item(check_bf16, "bf16"),
    "overhead-time": Item(overhead_time, "overhead", ("engine", "shape"), sized=True),
    "overhead-memory": Item(overhead_memory, "overhead", ("engine", "arm", "shape"), sized=True),
    "overhead-profile": Item(overhead_profile, "profile", ("engine", "shape"), sized=True),
}


def checked_items() -> tuple[str, ...]:
    """The items of the check the registry serves, in its order (the orchestrator's ``ITEMS``)."""
    return tuple(dict.fromkeys(item.part_of for item in REGISTRY.values()))


# ------------------------------------------------------------------------------------ entry

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.gpu_check.items")
    parser.add_argument("item")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    Sizing.add_arguments(parser)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    kind, _, rest = args.item.partition(":")
    item = REGISTRY.get(kind)
    if item is None:
        raise SystemExit(f"unknown item {args.item!r}")
    try:
        result = item(kind, rest, args.workdir, args.device, Sizing.from_args(args))
    except Exception as error:  # noqa: BLE001 - the orchestrator reports it as the item's failure
        traceback.print_exc()
        args.out.write_text(json.dumps({"error": f"{type(error).__name__}: {error}".splitlines()[0]}))
        return 1
    args.out.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
