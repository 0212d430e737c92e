"""The ``eval`` params section."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

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
    # 50 of the 150 shipped: with 100 each the default run took over 30 minutes on 2 cores; the
    # study, whose result is the headline, measures 100 of each over 5 seeds
    refusal_prompts: Annotated[int, Field(gt=0)] = 50       # held-out harmful prompts (150 shipped)
    overrefusal_prompts: Annotated[int, Field(gt=0)] = 50   # edgy but benign prompts (150 shipped)
    max_new_tokens: Annotated[int, Field(gt=0)] = 32        # a refusal shows in the opening sentences
    # The refusal figures: the judge on `refusal_samples` sampled replies per prompt from the fp32
    # model (evaluation.sampling: each reply's randomness is its prompt's, so float noise barely
    # moves them), beside the judged greedy replies of the served model. 4 keeps the default run
    # near its time budget (about 35 s per set and model on 2 cores); the study samples 8.
    refusal_samples: Annotated[int, Field(gt=0, le=64)] = 4
    sampling_temperature: Annotated[float, Field(gt=0, le=2)] = 0.7
    # served speed: every model decodes the same prompts for the same number of tokens, interleaved
    speed_prompts: Annotated[int, Field(gt=0, le=8)] = 4
    speed_new_tokens: Annotated[int, Field(gt=0)] = 32
    speed_rounds: Annotated[int, Field(gt=0)] = 5           # the order rotates each round
    # knowledge retention: true/false statement pairs, by mean token log-probability
    fact_pairs: Annotated[int, Field(gt=0)] = 300
    # success criteria (compare_all): served speed side by side with the base, and knowledge kept
    min_speed_ratio: Annotated[float, Field(gt=0)] = 0.9
    min_retention: Annotated[float, Field(ge=0, le=1)] = 0.70
    # statistics
    bootstrap_resamples: Annotated[int, Field(ge=100)] = 1000
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    significance: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    seed: int = 0


class StudyParams(Section):
    """The fair study (``pipelines/study.py``): each method tuned on validation loss with the
    same number of trials from a declared search space, then compared on the test sets at its
    chosen setting over several seeds and budgets. ``methods`` empty: the study is not run in
    this profile (the stage keeps the last study's report)."""

    methods: list[str] = []                  # variant names, e.g. peft_lora, pure_grit, grit_paper
    # Search space: the learning rate for every method (log-spaced, the same values for all),
    # the damping for GRIT ones (log-uniform, quasi-random).
    learning_rate_range: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (1e-4, 1e-2)
    damping_range: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (1e-4, 1e-1)
    trials: Annotated[int, Field(gt=0, le=64)] = 4          # per method: the same for every method
    seeds: Annotated[int, Field(gt=1, le=20)] = 5           # test replicates at each chosen setting
    budgets: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)] = [32, 96]  # optimizer steps
    # the held-out test sets are capped like the eval section's, but measured in fp32 only
    refusal_prompts: Annotated[int, Field(gt=0)] = 100
    overrefusal_prompts: Annotated[int, Field(gt=0)] = 100
    fact_pairs: Annotated[int, Field(gt=0)] = 300
    aqi_pairs: Annotated[int, Field(gt=1)] = 100
    seed: int = 0                                            # of the quasi-random damping draws

    @model_validator(mode="after")
    def _ranges(self) -> StudyParams:
        for name in ("learning_rate_range", "damping_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: the lower bound {low} exceeds the upper bound {high}")
        if sorted(set(self.budgets)) != list(self.budgets):
            raise ValueError("budgets: list distinct step counts in increasing order (the first one is tuned)")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: a method is listed twice")
        return self
