"""GRIT-VLM configuration: one typed section per modality of a vision-language model.

A VLM has three parts with different curvature (GRIT-VLM guides, seeds 000/001/003):

- ``vision``: the image encoder (a ViT: ``...encoder.layers.N.self_attn.q_proj``);
- ``language``: the text decoder (``...layers.N.self_attn.q_proj``, ``mlp.*``);
- ``connector``: what maps image features into the decoder's space (Idefics3's
  ``connector.modality_projection.proj``, LLaVA's ``multi_modal_projector``, Qwen2-VL's merger).

Each modality says which linear layers get LoRA (glob patterns + a layer-selection strategy),
the adapter's shape (rank, alpha, dropout) and how GRIT treats them (Fisher approximation,
natural gradient on/off, reprojection and its projection-budget schedule, any other
:class:`~trainers.grit.config.GritConfig` field). Unset fields fall back to the model-wide
values, so ``modality_grit_config`` and ``modality_lora_shape`` are the only merge rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from core.section import Section
from trainers.grit.config import GritConfig
from trainers.grit.layer_selection import LayerSelection

Modality = Literal["vision", "language", "connector"]
MODALITIES: tuple[Modality, ...] = ("vision", "language", "connector")
FisherApproximation = Literal["rank_kfac", "diagonal", "block_diagonal"]
TinyArchitecture = Literal["idefics3", "qwen2_vl", "llava"]


class TinyVisionParams(Section):
    """Shape of a tiny random VLM's vision side (its decoder takes ``model.tiny``'s shape)."""

    architecture: TinyArchitecture = "idefics3"
    num_hidden_layers: Annotated[int, Field(gt=0)] = 3
    hidden_size: Annotated[int, Field(gt=0)] = 32
    num_attention_heads: Annotated[int, Field(gt=0)] = 2
    image_size: Annotated[int, Field(gt=0)] = 32
    patch_size: Annotated[int, Field(gt=0)] = 8


class ProjectionBudget(Section):
    """How many rank-space directions reprojection keeps (k), and how k moves during training:
    ``constant`` (k), ``linear``/``cosine`` (start -> end over the run), ``adaptive`` (the
    smallest k holding ``energy`` of the eigen-energy)."""

    schedule: Literal["constant", "linear", "cosine", "adaptive"] = "constant"
    k: Annotated[int, Field(gt=0)] = 8
    start: Annotated[int, Field(gt=0)] | None = None
    end: Annotated[int, Field(gt=0)] | None = None
    energy: Annotated[float, Field(gt=0, le=1)] = 0.99

    @model_validator(mode="after")
    def _schedule_needs(self) -> ProjectionBudget:
        if self.schedule in ("linear", "cosine") and (self.start is None or self.end is None):
            raise ValueError(f"projection budget schedule '{self.schedule}' needs start and end")
        return self


class ModalityConfig(Section):
    """Which layers of one modality get LoRA, their shape, and GRIT's treatment of them."""

    patterns: Annotated[list[str], Field(min_length=1)]
    layers: LayerSelection = LayerSelection()
    rank: Annotated[int, Field(gt=0)] | None = None
    alpha: Annotated[float, Field(gt=0)] | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    fisher: FisherApproximation | None = None
    natural_gradient: bool = True
    reprojection: bool | None = None
    budget: ProjectionBudget | None = None
    # Any other GritConfig field for this modality only (damping, min_samples, update_freq, ...).
    grit: dict[str, Any] = {}

    @model_validator(mode="after")
    def _grit_overrides_are_known(self) -> ModalityConfig:
        unknown = sorted(set(self.grit) - set(GritConfig.model_fields))
        if unknown:
            raise ValueError(f"grit overrides {unknown} are not GritConfig fields")
        named_twice = sorted(set(self.grit) & {"fisher", "precondition", "reprojection"})
        if named_twice:
            raise ValueError(f"set {named_twice} with the modality's own fields, not under grit")
        return self


class VlmGritConfig(Section):
    """GRIT-VLM for one architecture: per-modality sections plus model-wide defaults."""

    architecture: str                       # the transformers model_type it was written for
    description: str = ""
    vision: ModalityConfig | None = None
    language: ModalityConfig | None = None
    connector: ModalityConfig | None = None
    rank: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    max_layers_per_modality: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _some_modality(self) -> VlmGritConfig:
        if not self.modalities():
            raise ValueError("a GRIT-VLM configuration needs at least one of vision, language, connector")
        return self

    def modalities(self) -> dict[Modality, ModalityConfig]:
        """The configured modalities, in the fixed order vision, language, connector."""
        return {name: getattr(self, name) for name in MODALITIES if getattr(self, name) is not None}


def modality_selection(config: VlmGritConfig, modality: ModalityConfig) -> LayerSelection:
    """The modality's strategy, capped by ``max_layers_per_modality`` when it sets no cap itself."""
    if modality.layers.max_layers is None and config.max_layers_per_modality is not None:
        return modality.layers.model_copy(update={"max_layers": config.max_layers_per_modality})
    return modality.layers


def modality_lora_shape(config: VlmGritConfig, modality: ModalityConfig) -> tuple[int, float, float]:
    """(rank, alpha, dropout) of one modality's adapters: its own values, else the model-wide."""
    return (modality.rank or config.rank, modality.alpha or config.alpha,
            config.dropout if modality.dropout is None else modality.dropout)


def modality_grit_config(base: GritConfig, modality: ModalityConfig) -> GritConfig:
    """The GritConfig one modality's manager runs with: ``base`` (params ``grit``) overridden by
    the modality's Fisher approximation, natural-gradient switch, reprojection and budget, then
    its free-form ``grit`` overrides. Validated again, so an impossible mix fails here."""
    update: dict[str, Any] = {"precondition": modality.natural_gradient}
    if modality.fisher is not None:
        update["fisher"] = modality.fisher
    if modality.reprojection is not None:
        update["reprojection"] = modality.reprojection
    if modality.budget is not None:
        budget = modality.budget
        update.update(budget_schedule=budget.schedule, reprojection_k=budget.k, budget_start=budget.start,
                      budget_end=budget.end, energy_threshold=budget.energy)
    update.update(modality.grit)
    return GritConfig.model_validate({**base.model_dump(), **update})
