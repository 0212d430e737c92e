"""The ``eval`` params section."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, model_validator

from core.section import Section

# The widest each tuned range may become, whatever the study declares or widens it to (why, each):
HARD_LIMITS: dict[str, tuple[float, float]] = {
    # below 1e-6 a LoRA run of a few hundred steps barely moves; above 0.1 AdamW diverges on any model
    "learning_rate": (1e-6, 0.1),
    # the paper code clamps its damping to [1e-6, 1e-2]; above 1 (relative: lambda at the factor's
    # mean eigenvalue) the preconditioner is close to a scalar, which AdamW cancels: no longer GRIT
    "damping": (1e-6, 1.0),
    # reprojection from the first step (0) to half the run: later leaves too few steps for its
    # reprojections and the training after them, and the pruner's first rung waits for it
    "reprojection_warmup_fraction": (0.0, 0.5),
    # tau: below 0.5 rank adaptation keeps a rank or two; 1 keeps every rank (no adaptation)
    "energy_threshold": (0.5, 1.0),
}

# the study's declared ranges and the tuned dimension each bounds
RANGE_DIMENSIONS = {"learning_rate_range": "learning_rate", "damping_range": "damping",
                    "reprojection_warmup_range": "reprojection_warmup_fraction", "energy_range": "energy_threshold"}


class EvalParams(Section):
    """What the ``evaluate`` stage measures on the base model and every variant, and how.

    Prompt counts cap the held-out sets (the first N, harmful and benign alternating) so the
    default run fits a 2-core machine; every figure is stored with its n and interval."""


    # AQI: mean-pooled hidden states of the user turn, averaged over the last `aqi_layers` layers
    aqi_pairs: Annotated[int, Field(gt=1)] = 100           # harmful/benign prompt pairs
    aqi_layers: Annotated[int, Field(gt=0)] = 4
    gamma: Annotated[float, Field(ge=0, le=1)] = 0.5
    # refusals: greedy generations of the served files through llama.cpp, judged comply / decline /
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
    # the second serving backend (evaluation.ollama_backend): every served model through a private
    # Ollama server in these forms, its greedy replies judged, paired with llama.cpp's and timed by
    # Ollama's own counters; [] measures through llama.cpp alone
    ollama_forms: list[Literal["adapter", "merged"]] = ["adapter", "merged"]
    # knowledge retention: true/false statement pairs, by mean token log-probability
    fact_pairs: Annotated[int, Field(gt=0)] = 300
    # success criteria (compare_all): served speed side by side with the base, and knowledge kept
    min_speed_ratio: Annotated[float, Field(gt=0)] = 0.9
    min_retention: Annotated[float, Field(ge=0, le=1)] = 0.70
    # declared comparisons beside every variant vs the base and every GRIT variant vs its
    # same-engine control: [variant, reference] pairs, in Holm's family like the rest. The seed
    # plan's key one: pure GRIT (PEFT) against the Unsloth baseline, which measures GRIT and the
    # engine together (on CPU the two engines run the same plain PyTorch steps).
    comparisons: list[tuple[str, str]] = [("pure_grit", "baseline_lora")]
    # statistics
    bootstrap_resamples: Annotated[int, Field(ge=100)] = 1000
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    significance: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    seed: int = 0


class StudyParams(Section):
    """The fair study (``pipelines/study/``, docs/study.md): each method tuned on validation
    loss by Optuna with the same number of configurations and the same pruner at every run length,
    its finalists re-run with more seeds, then compared on the test sets at its chosen setting over
    test seeds that selection never saw. ``methods`` empty: the study is not run in this profile
    (the stage keeps the last study's report)."""

    methods: list[str] = []                  # variant names, e.g. peft_lora, pure_grit, grit_paper
    steps: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)] = [32, 96]  # run lengths, each tuned
    # Tuning: Optuna's sampler over each method's declared space (evaluation/tuning.py), and a
    # successive-halving pruner on the validation-loss curve (measured at its rungs and at the end).
    configurations: Annotated[int, Field(gt=0, le=256)] = 16   # per method and run length
    sampler: Literal["tpe", "qmc"] = "tpe"
    startup: Annotated[int, Field(ge=0)] = 6               # TPE's quasi-random start before it models
    # The pruner's first rung is derived from the run length and every method's cadence
    # (evaluation.tuning.first_rung): no configuration is judged before its natural gradient has
    # shaped natural_gradient_share of the run and, reprojecting, trained after its first
    # reprojection; never before min_steps. Then rung x reduction_factor, ... below the run length.
    min_steps: Annotated[int, Field(gt=0)] = 8
    natural_gradient_share: Annotated[float, Field(gt=0, lt=1)] = 0.25
    reduction_factor: Annotated[int, Field(ge=2)] = 3      # one in this many goes on at each rung
    learning_rate_range: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (1e-4, 1e-2)
    # Each tuning's first configuration is its method's published defaults, trained to the end:
    # this learning rate (LoRA's customary one: QLoRA's and Unsloth's 2e-4) for every method, and a
    # GRIT method's own damping, eigen-energy and reprojection warm-up (pipelines.study.plan.published_defaults).
    default_learning_rate: Annotated[float, Field(gt=0)] = 2e-4
    damping_range: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (1e-4, 1e-1)
    # GRIT with the budget cadence (the paper variant) also tunes its reprojection and rank settings
    reprojection_warmup_range: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.1, 0.5)
    energy_range: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (0.9, 0.999)
    # A chosen learning rate in the outer edge_margin of its (log) range: the study widens the range
    # by edge_factor on that side and tunes again, at most edge_extensions times; the report says so.
    edge_margin: Annotated[float, Field(gt=0, lt=0.5)] = 0.1
    edge_factor: Annotated[float, Field(gt=1)] = 10.0
    edge_extensions: Annotated[int, Field(ge=0, le=3)] = 1
    # Selection: the best `finalists` configurations re-run with `finalist_seeds` more seeds
    # (train.seed + 1, ...), chosen on their mean validation loss.
    finalists: Annotated[int, Field(gt=0)] = 3
    finalist_seeds: Annotated[int, Field(ge=0)] = 2
    # Test: `seeds` seeds from test_seed on, disjoint from every seed selection saw.
    seeds: Annotated[int, Field(gt=1, le=100)] = 10
    test_seed: int = 1000
    # the held-out test sets are capped like the eval section's, but measured in fp32 only
    refusal_prompts: Annotated[int, Field(gt=0)] = 100
    overrefusal_prompts: Annotated[int, Field(gt=0)] = 100
    fact_pairs: Annotated[int, Field(gt=0)] = 300
    aqi_pairs: Annotated[int, Field(gt=1)] = 100
    bootstrap_resamples: Annotated[int, Field(ge=100)] = 2000   # the two-level bootstrap over seeds and prompts
    seed: int = 0                                            # of the sampler and the bootstrap

    @model_validator(mode="after")
    def _ranges(self) -> StudyParams:
        for name in ("learning_rate_range", "damping_range", "reprojection_warmup_range", "energy_range"):
            low, high = getattr(self, name)
            if low >= high:
                raise ValueError(f"{name}: the lower bound {low} is not below the upper bound {high}")
        for name, dimension in RANGE_DIMENSIONS.items():
            (low, high), (floor, ceiling) = getattr(self, name), HARD_LIMITS[dimension]
            if low < floor or high > ceiling:
                raise ValueError(f"{name}: [{low}, {high}] reaches beyond the hard limits [{floor}, {ceiling}] "
                                 "of evaluation/tuning.py (docs/study.md says why each)")
        if sorted(set(self.steps)) != list(self.steps):
            raise ValueError("steps: list distinct run lengths in increasing order")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: a method is listed twice")
        return self


def tuning_seeds(train_seed: int, finalist_seeds: int) -> list[int]:
    """The seeds selection sees: the tuning seed, then one more per finalist replicate."""
    return [train_seed + k for k in range(finalist_seeds + 1)]


def seeds_for_testing(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


def check_disjoint(tuning: Sequence[int], testing: Sequence[int]) -> None:
    """A test seed that selection also saw would let selection read the test (the tuning run
    itself, bit for bit, was one of the old study's test runs)."""
    shared = sorted(set(tuning) & set(testing))
    if shared:
        raise ValueError(f"study: test seeds {shared} are also tuning seeds (train.seed and the finalists' "
                         f"{list(tuning)}); move study.test_seed")
