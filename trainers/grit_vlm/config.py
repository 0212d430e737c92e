"""GRIT-VLM configuration: one typed section per modality of a vision-language model.

A VLM has three parts with different curvature (GRIT-VLM guides, seeds 000/001/003):

- ``vision``: the image encoder (a ViT: ``...encoder.layers.N.self_attn.q_proj``);
- ``language``: the text decoder (``...layers.N.self_attn.q_proj``, ``mlp.*``);
- ``connector``: what maps image features into the decoder's space (Idefics3's
  ``connector.modality_projection.proj``, LLaVA's ``multi_modal_projector``, Qwen2-VL's merger).

Each modality says which linear layers get LoRA (glob patterns + a layer-selection strategy),
the adapter's shape (``r``, ``alpha``, ``dropout``: the ``lora`` section's names) and how GRIT
treats them (``grit``: fields of the ``grit`` section by their own names, e.g. ``fisher``,
``precondition``, ``reprojection_k``, ``budget_schedule``). Unset fields fall back to the
model-wide values, so ``modality_grit_config`` and ``modality_lora_shape`` are the only merge
rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, model_validator

from core.section import Section
from trainers.grit.config import GritParams
from trainers.grit.layer_selection import LayerSelection

Modality = Literal["vision", "language", "connector"]
MODALITIES: tuple[Modality, ...] = ("vision", "language", "connector")
TinyArchitecture = Literal["idefics3", "qwen2_vl", "llava"]


class TinyVisionParams(Section):
    """Shape of a tiny random VLM's vision side (its decoder takes ``model.tiny``'s shape)."""

    architecture: TinyArchitecture = "idefics3"
    num_hidden_layers: Annotated[int, Field(gt=0)] = 3
    hidden_size: Annotated[int, Field(gt=0)] = 32
    num_attention_heads: Annotated[int, Field(gt=0)] = 2
    image_size: Annotated[int, Field(gt=0)] = 32
    patch_size: Annotated[int, Field(gt=0)] = 8


class ModalityParams(Section):
    """Which layers of one modality get LoRA, their shape (the ``lora`` section's names) and
    GRIT's treatment of them (``grit``: any field of the ``grit`` section, by its own name)."""

    patterns: Annotated[list[str], Field(min_length=1)]
    layers: LayerSelection = LayerSelection()
    r: Annotated[int, Field(gt=0)] | None = None
    alpha: Annotated[float, Field(gt=0)] | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    # GritParams fields for this modality only: fisher, precondition, reprojection,
    # reprojection_k, budget_schedule, damping, min_samples, ...
    grit: dict[str, Any] = {}

    @model_validator(mode="after")
    def _grit_fields_are_known(self) -> ModalityParams:
        unknown = sorted(set(self.grit) - set(GritParams.model_fields))
        if unknown:
            raise ValueError(f"grit: {unknown[0]!r} is not a field of the grit section")
        for name, value in self.grit.items():     # values checked here, not at the first step
            field = GritParams.model_fields[name]
            annotation = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
            TypeAdapter(annotation).validate_python(value)
        return self


class JointBudgetParams(Section):
    """One projection budget for every modality, coordinated from the vision side (the GRIT-VLM
    guide's multimodal projector: k ~ 1.2 x the rank of the vision components). At each
    reprojection of the run's ``grit`` cadence, the vision rank is estimated (per vision module,
    the fewest top eigenvalues of Sigma_u that hold ``energy_threshold`` of its energy; the median
    over modules), and every module of every modality is reprojected onto its top
    k = round(factor x vision rank) directions (at most its own rank)."""

    factor: Annotated[float, Field(gt=0)] = 1.2
    energy_threshold: Annotated[float, Field(gt=0, le=1)] = 0.99
    min_k: Annotated[int, Field(gt=0)] = 1


class VlmGritParams(Section):
    """GRIT-VLM for one architecture: per-modality sections plus model-wide defaults."""

    architecture: str                       # the transformers model_type it was written for
    description: str = ""
    vision: ModalityParams | None = None
    language: ModalityParams | None = None
    connector: ModalityParams | None = None
    r: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    max_layers_per_modality: Annotated[int, Field(gt=0)] | None = None
    # null: each modality reprojects on its own schedule (independent managers); set: one joint
    # budget for all, from the vision rank (JointBudgetParams)
    joint_budget: JointBudgetParams | None = None

    @model_validator(mode="after")
    def _some_modality(self) -> VlmGritParams:
        if not self.modalities():
            raise ValueError("a GRIT-VLM configuration needs at least one of vision, language, connector")
        if self.joint_budget is not None and self.vision is None:
            raise ValueError("joint_budget is set from the vision rank, but the configuration has no vision modality")
        return self

    def modalities(self) -> dict[Modality, ModalityParams]:
        """The configured modalities, in the fixed order vision, language, connector."""
        return {name: getattr(self, name) for name in MODALITIES if getattr(self, name) is not None}


def modality_selection(config: VlmGritParams, modality: ModalityParams) -> LayerSelection:
    """The modality's strategy, capped by ``max_layers_per_modality`` when it sets no cap itself."""
    if modality.layers.max_layers is None and config.max_layers_per_modality is not None:
        return modality.layers.model_copy(update={"max_layers": config.max_layers_per_modality})
    return modality.layers


def modality_lora_shape(config: VlmGritParams, modality: ModalityParams) -> tuple[int, float, float]:
    """(r, alpha, dropout) of one modality's adapters: its own values, else the model-wide."""
    return (modality.r or config.r, modality.alpha or config.alpha,
            config.dropout if modality.dropout is None else modality.dropout)


def modality_grit_config(base: GritParams, modality: ModalityParams) -> GritParams:
    """The GritParams one modality's manager runs with: ``base`` (params ``grit``) with the
    modality's own ``grit`` fields. Validated again, so an impossible mix fails here."""
    return GritParams.model_validate({**base.model_dump(), **modality.grit})
