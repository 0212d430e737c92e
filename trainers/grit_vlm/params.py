"""The ``vlm`` params section: which GRIT-VLM configuration (a preset or a custom one) and which
image-text pairs a ``model.kind: vlm`` run uses.

Every stage validates this section's shape; the preset it names is resolved (and its overrides
applied) by ``trainers.grit_vlm.presets.vlm_config`` in the VLM stages only, so a text stage's
code, and its DVC deps, never include the preset tables."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from core.section import Section
from trainers.grit_vlm.config import VlmGritParams


class VlmDataParams(Section):
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


class VlmParams(Section):
    """GRIT-VLM for ``model.kind: vlm``: a predefined configuration (``preset``, see
    ``trainers/grit_vlm/presets.py``) with the fields ``overrides`` changes, or a whole
    ``custom`` one, and the image-text pairs."""

    preset: str | None = "smolvlm_fast"
    # fields of the preset to change, nested as in a custom configuration, e.g.
    # {vision: {layers: {strategy: last_n, n_layers: 2}, grit: {budget_end: 16}}}; the rest stays
    overrides: dict[str, Any] = {}
    custom: VlmGritParams | None = None
    data: VlmDataParams = VlmDataParams()

    @model_validator(mode="after")
    def _one_config(self) -> VlmParams:
        if (self.preset is None) == (self.custom is None):
            raise ValueError("set exactly one of preset and custom")
        if self.overrides and self.custom is not None:
            raise ValueError("overrides change a preset; with custom, write the change into custom")
        return self
