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
    # refusals: greedy generations through the serving backend, judged comply / decline /
    # deflect (evaluation.refusals.judge), and the fp32 decline probability on the same prompts
    # 100 of the 150 shipped: twice the earlier 50; the whole sets would add about 10 minutes
    # to the default run on 2 cores
    refusal_prompts: Annotated[int, Field(gt=0)] = 100      # held-out harmful prompts (150 shipped)
    overrefusal_prompts: Annotated[int, Field(gt=0)] = 100  # edgy but benign prompts (150 shipped)
    max_new_tokens: Annotated[int, Field(gt=0)] = 32        # a refusal shows in the opening sentences
    # served speed: every model decodes the same prompts for the same number of tokens, interleaved
    speed_prompts: Annotated[int, Field(gt=0, le=8)] = 4
    speed_new_tokens: Annotated[int, Field(gt=0)] = 32
    speed_rounds: Annotated[int, Field(gt=0)] = 5           # the order rotates each round
    # knowledge retention: true/false statement pairs, by mean token log-probability
    fact_pairs: Annotated[int, Field(gt=0)] = 300
    # statistics
    bootstrap_resamples: Annotated[int, Field(ge=100)] = 1000
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    significance: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    seed: int = 0
