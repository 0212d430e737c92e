"""The ``eval`` params section."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from core.section import Section


class EvalParams(Section):
    """What the ``evaluate`` stage measures on the base model and every variant, and how.

    Prompt counts cap the held-out sets (the first N, harmful and benign alternating) so the
    default run fits a 2-core machine; every figure is stored with its n and interval."""


    # AQI: mean-pooled hidden states of the user turn, averaged over the last `aqi_layers` layers
    aqi_pairs: Annotated[int, Field(gt=1)] = 100           # harmful/benign prompt pairs
    aqi_layers: Annotated[int, Field(gt=0)] = 4
    gamma: Annotated[float, Field(ge=0, le=1)] = 0.5
    # refusals, from greedy generations through the serving backend
    refusal_prompts: Annotated[int, Field(gt=0)] = 50       # held-out harmful prompts
    overrefusal_prompts: Annotated[int, Field(gt=0)] = 50   # edgy but benign prompts
    max_new_tokens: Annotated[int, Field(gt=0)] = 32        # a refusal shows in the opening sentences
    # knowledge retention: true/false statement pairs, by mean token log-probability
    fact_pairs: Annotated[int, Field(gt=0)] = 300
    # statistics
    bootstrap_resamples: Annotated[int, Field(ge=100)] = 1000
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    significance: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    seed: int = 0
