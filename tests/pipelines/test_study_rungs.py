"""The study's pruner judges a configuration only where every method's mechanism has acted: its
rungs come from the run length and GRIT's cadence rule, the same for every method."""

from __future__ import annotations

import math

import optuna

from evaluation.tuning import HARD_LIMITS
from pipelines.params import Params
from pipelines.study.plan import study_rungs
from pipelines.study.trial import trial_params
from pipelines.study.tuning import study_pruner
from trainers.config import variant_grit
from trainers.grit.cadence import for_budget, reprojection_steps


def warmups(params: Params, steps: int) -> list[float]:
    """Reprojection warm-ups a trial may be given: across the declared range and its hard limits."""
    low, high = HARD_LIMITS["reprojection_warmup_fraction"]
    declared = params.study.reprojection_warmup_range
    return sorted({low, high, *declared, *(k / steps for k in range(round(high * steps) + 1))})


def test_no_grit_trial_of_the_study_profile_is_judged_before_its_natural_gradient_and_reprojection(study_profile):
    params = study_profile
    grit_methods = [m for m in params.study.methods if params.variants[m].grit]
    assert grit_methods and "peft_lora" in params.study.methods
    share = params.study.natural_gradient_share
    for steps in sorted({*params.study.steps, 16, 64, 400}):
        rungs = study_rungs(params, steps)
        for method in grit_methods:
            run = trial_params(params, method, steps, 42, {"learning_rate": 1e-3, "damping": 1e-3})
            assert run.train.eval_at == rungs                                  # measured at the rungs only
            trained = variant_grit(run.grit, run.variants[method])
            for warmup in warmups(params, steps):
                grit = for_budget(trained.model_copy(update={"reprojection_warmup_fraction": warmup}), steps)
                # the step whose update the natural gradient first shapes (1-based)
                natural_gradient = grit.ng_warmup_steps + 1
                assert rungs[0] >= natural_gradient - 1 + math.ceil(share * steps), (steps, method, warmup)
                reprojections = reprojection_steps(grit, steps)
                if reprojections:
                    assert rungs[0] > reprojections[0], (steps, method, warmup)   # some training after it
    # the paper variants' natural gradient starts at step 10 of 96 and 19 of 192: the old first rung (8) judged before
    assert study_rungs(params, 96)[0] > 10 + 96 // 4 and study_rungs(params, 192)[0] > 19 + 192 // 4


def test_the_pruner_never_stops_a_trial_before_the_first_rung(study_profile):
    """Reports at every step, the first trial good and every later one far worse: nothing is
    pruned before the first rung at any of the study's run lengths, and the same rungs hold for
    LoRA (they are the study's, not the method's)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for steps in study_profile.study.steps:
        first = study_rungs(study_profile, steps)[0]
        study = optuna.create_study(pruner=study_pruner(study_profile, steps))
        stopped = []
        for number in range(6):
            trial = study.ask()
            for step in range(1, steps + 1):
                trial.report(1.0 if number == 0 else 10.0 + number, step)
                if step < steps and trial.should_prune():
                    stopped.append(step)
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, 1.0 if number == 0 else 10.0 + number)
        assert stopped and min(stopped) == first, (steps, stopped)
        lora = trial_params(study_profile, "peft_lora", steps, 42, {"learning_rate": 1e-3})
        assert lora.train.eval_at == study_rungs(study_profile, steps)


def test_without_grit_methods_the_first_rung_is_the_floor():
    params = Params()
    params = params.model_copy(update={"study": params.study.model_copy(update={"methods": ["peft_lora"]})})
    assert study_rungs(params, 96) == [8, 24, 72]
    assert study_rungs(params.model_copy(update={"study": params.study.model_copy(update={"min_steps": 100})}),
                       96) == []


def test_the_rung_follows_the_run_length(study_profile):
    rung = {steps: study_rungs(study_profile, steps)[0] for steps in (32, 96, 192)}
    assert rung[32] < rung[96] < rung[192] and all(rung[s] < s for s in rung)
