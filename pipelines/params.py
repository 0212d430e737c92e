"""Typed schema of ``params.yaml``: the sections of their owners (``trainers/config.py``,
``trainers/data/config.py``, ``trainers/grit/config.py``, ``trainers/grit_vlm/params.py``,
``trainers/probe/config.py``, ``export/config.py``, ``evaluation/config.py``, ``db/config.py``)
composed into one file.

Every stage validates the *whole* file at its entry (so a typo anywhere fails fast, before any
model is loaded) and then hands each component only its own typed section. Unknown keys, wrong
types and impossible values are rejected with one line that names the key. The schema stays light:
it imports the sections' types, never tables of data such as the GRIT-VLM presets (which preset
``vlm.preset`` names and whether its overrides fit is checked by the VLM stages,
``trainers.grit_vlm.presets.vlm_config``), so a stage's DVC deps are the code it really needs.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from core.errors import UserError
from core.section import Section, content_hash
from db.config import StoreParams, has_password
from evaluation.config import EvalParams, StudyParams, check_disjoint, seeds_for_testing, tuning_seeds
from export.config import ExportParams, ServeParams
from trainers.config import (
    Capabilities,
    LoraParams,
    ModelParams,
    TrainParams,
    VariantParams,
    default_variants,
    variant_capabilities,
    variant_grit,
    variant_lora,
)
from trainers.data.config import DataParams
from trainers.grit.config import GritParams
from trainers.grit_vlm.params import VlmParams
from trainers.probe.config import ProbeParams

DEFAULT_PARAMS_PATH = Path("params.yaml")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The base model's rows, its Ollama name (base_model) and its evaluation key are "base".
RESERVED_VARIANT_NAMES = frozenset({"base"})


def available_profiles() -> list[str]:
    """The profiles of ``conf/profile/``: the only values ``profile`` may take."""
    return sorted(p.stem for p in (CONF_DIR / "profile").glob("*.yaml"))


class ParamsError(UserError):
    """A user-fixable problem with the parameters; its message is one line."""


def _check_variant(name: str, variant: VariantParams, variants: dict[str, VariantParams], lora: LoraParams) -> None:
    """What a variant's own settings must agree with: the engines and GRIT its LoRA settings allow
    (``trainers.config.lora_capabilities``: DoRA trains on PEFT without GRIT); a GRIT
    variant names a declared control without GRIT, on its engine, with its LoRA settings (the probe
    replays both from one adapter on one engine; the evaluation pairs them), whenever the run
    declares a variant that could be one."""
    own, can = variant_lora(lora, variant), variant_capabilities(lora, variant)
    if variant.engine not in can.engines or (variant.grit and not can.grit):
        raise ValueError(f"variants.{name}: {can.why_not_trained}")
    if not variant.grit:
        return
    if variant.control is None:
        # Never picked for it: where a run declares a candidate (same engine, same LoRA settings),
        # the variant must name one (a run of GRIT variants alone has nothing to compare them with).
        plain = [other for other, v in variants.items()
                 if not v.grit and v.engine == variant.engine and variant_lora(lora, v) == own]
        if not plain:
            return
        raise ValueError(f"variants.{name}: a GRIT variant names its control, a declared variant without GRIT on "
                         f"the same engine (e.g. control: {plain[0]})")
    control = variants.get(variant.control)
    if control is None:
        raise ValueError(f"variants.{name}.control: {variant.control!r} is not a declared variant "
                         f"({', '.join(variants)})")
    if control.grit or control.engine != variant.engine:
        raise ValueError(f"variants.{name}.control: {variant.control} must train without GRIT on the "
                         f"{variant.engine} engine, as {name} does")
    if variant_lora(lora, control) != own:
        raise ValueError(f"variants.{name}.control: {variant.control} has other LoRA settings than {name} "
                         "(lora_overrides); the probe replays both from one adapter")


def _check_aliases(aliases: dict[str, str], variants: dict[str, VariantParams]) -> None:
    """An alias names a declared variant and no model the pipeline registers by its own name."""
    own = {f"{name}_model" for name in (*variants, *RESERVED_VARIANT_NAMES)}
    for alias, variant in aliases.items():
        if variant not in variants:
            raise ValueError(f"serve.aliases.{alias}: {variant!r} is not a declared variant ({', '.join(variants)}); "
                             "declare it or drop the alias (serve.aliases: {} registers none)")
        if alias in own:
            raise ValueError(f"serve.aliases.{alias}: the pipeline already registers a model of that name; "
                             "choose another alias")


def _check_comparisons(pairs: list[tuple[str, str]], variants: dict[str, VariantParams]) -> None:
    for variant, reference in pairs:
        for name in (variant, reference):
            if name not in variants:
                raise ValueError(f"eval.comparisons: {name!r} is not a declared variant ({', '.join(variants)})")
        if variant == reference:
            raise ValueError(f"eval.comparisons: {variant} is paired with itself")
        if variants[variant].control == reference:
            raise ValueError(f"eval.comparisons: {variant} vs {reference} is already compared (its control)")


def declared_comparisons(params: Params) -> list[tuple[str, str]]:
    """The extra pairs the evaluation compares: those written in params (each checked), or the
    defaults whose variants the params declare."""
    return [(v, r) for v, r in params.eval.comparisons if v in params.variants and r in params.variants]


def served_aliases(params: Params) -> dict[str, str]:
    """The aliases the serve stage registers: those written in params (each checked), or the
    defaults whose variants the params declare."""
    return {alias: variant for alias, variant in params.serve.aliases.items() if variant in params.variants}


class Params(Section):
    """The whole of ``params.yaml``; a section missing from the file takes its defaults."""

    @model_validator(mode="after")
    def _variant_names(self) -> Params:
        if not self.variants:
            raise ValueError("variants: declare at least one variant")
        bad = [name for name in self.variants if not re.fullmatch(r"[a-z][a-z0-9_]*", name)]
        if bad:
            raise ValueError(f"variants: names must be lowercase identifiers (got {bad[0]!r})")
        reserved = sorted(RESERVED_VARIANT_NAMES & set(self.variants))
        if reserved:
            raise ValueError(f"variants: {reserved[0]!r} is reserved for the base model (its store rows and its "
                             f"Ollama name {reserved[0]}_model); rename the variant")
        if self.profile not in available_profiles():
            raise ValueError(f"profile: unknown profile {self.profile!r}; "
                             f"choose from {', '.join(available_profiles())} "
                             "(conf/profile/)")
        if self.serve.weights == "merged" and not self.export.merged:
            raise ValueError("serve.weights is 'merged' but export.merged is false, so no merged GGUF is written; "
                             "set export.merged: true or serve.weights: adapter")
        for name, variant in self.variants.items():
            for section, settle in (("grit", lambda v: variant_grit(self.grit, v)),
                                    ("lora", lambda v: variant_lora(self.lora, v))):
                try:
                    settle(variant)
                except ValidationError as error:
                    first = error.errors()[0]
                    raise ValueError(f"variants.{name}.{section}_overrides: {_key_path(first['loc'])}: "
                                     f"{first['msg'].removeprefix('Value error, ')}") from None
            _check_variant(name, variant, self.variants, self.lora)
        if self.train.nproc_per_node > 1:
            # A truncated factor is a new Parameter, which DDP neither all-reduces nor keeps equal.
            for name, variant in self.variants.items():
                if variant.grit and variant_grit(self.grit, variant).truncate:
                    key = f"variants.{name}.grit_overrides.truncate" if "truncate" in variant.grit_overrides \
                        else "grit.truncate"
                    raise ValueError(f"{key} is true (variant {name}) but train.nproc_per_node is "
                                     f"{self.train.nproc_per_node}: DDP does not synchronise truncated LoRA factors; "
                                     f"set {key}: false or train.nproc_per_node: 1")
        if "aliases" in self.serve.model_fields_set:   # the defaults name variants a params file may not declare
            _check_aliases(self.serve.aliases, self.variants)
        if "comparisons" in self.eval.model_fields_set:
            _check_comparisons(self.eval.comparisons, self.variants)
        unknown = [m for m in self.study.methods if m not in self.variants]
        if unknown:
            raise ValueError(f"study.methods: {unknown[0]!r} is not a declared variant ({', '.join(self.variants)})")
        if self.study.methods:
            check_disjoint(tuning_seeds(self.train.seed, self.study.finalist_seeds),
                           seeds_for_testing(self.study.test_seed, self.study.seeds))
        if self.probe.steps > self.train.max_steps:
            raise ValueError(f"probe.steps ({self.probe.steps}) must not exceed "
                             f"train.max_steps ({self.train.max_steps})")
        return self

    profile: str = "default"
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    grit: GritParams = GritParams()
    variants: dict[str, VariantParams] = Field(default_factory=default_variants)
    probe: ProbeParams = ProbeParams()
    export: ExportParams = ExportParams()
    serve: ServeParams = ServeParams()
    eval: EvalParams = EvalParams()
    study: StudyParams = StudyParams()
    store: StoreParams = StoreParams()
    vlm: VlmParams = VlmParams()


def capabilities(params: Params, variant: str) -> Capabilities:
    """What a declared variant can do (``trainers.config.lora_capabilities`` of its LoRA settings):
    export@ and serve skip a variant that cannot be served, evaluate measures it in fp32 only."""
    return variant_capabilities(params.lora, params.variants[variant])


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
        # A value that holds a password (a store URL given in place of its section) is not echoed.
        if "input" in first and not isinstance(first["input"], dict) and not has_password(str(first["input"])):
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
    return content_hash(params)
