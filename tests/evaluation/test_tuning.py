"""The tuning rules: joint declared spaces, edge extension, finalists chosen on validation loss
over seeds, and seeds that selection and testing never share."""

from __future__ import annotations

import math

import pytest

from evaluation.config import check_disjoint, seeds_for_testing, tuning_seeds
from evaluation.tuning import (
    HARD_LIMITS,
    Dimension,
    Scored,
    at_edge,
    choose_finalist,
    edges,
    extended,
    finalists,
    rungs,
    search_space,
    widen,
    widens,
)

RANGES = dict(learning_rate=(1e-4, 1e-2), damping=(1e-4, 1e-1), reprojection_warmup=(0.1, 0.5), energy=(0.9, 0.999))


def test_every_method_searches_the_learning_rate_and_grit_its_own_knobs_jointly():
    lora = search_space(False, False, **RANGES)
    grit = search_space(True, False, **RANGES)
    paper = search_space(True, True, **RANGES)
    assert [d.name for d in lora] == ["learning_rate"] and lora[0].target == "train"
    assert [d.name for d in grit] == ["learning_rate", "damping"]
    assert [d.name for d in paper] == ["learning_rate", "damping", "reprojection_warmup_fraction", "energy_threshold"]
    assert lora[0] == grit[0] == paper[0]                        # the same learning-rate range for all
    assert not paper[2].log and paper[1].log
    with pytest.raises(ValueError, match="empty"):
        Dimension("learning_rate", 1e-2, 1e-4)


def test_a_best_learning_rate_at_the_edge_widens_the_range_on_that_side():
    rate = search_space(False, False, **RANGES)[0]
    assert at_edge(rate, 9e-3, 0.1) == "high" and at_edge(rate, 1.1e-4, 0.1) == "low"
    assert at_edge(rate, 1e-3, 0.1) is None                      # the middle of the log range
    wider = extended(rate, "high", 10)
    assert (wider.low, wider.high) == (1e-4, pytest.approx(1e-1))
    assert at_edge(wider, 9e-3, 0.1) is None                     # interior once widened
    assert extended(rate, "low", 10).low == pytest.approx(1e-5)


def scored(lr: float, seed: int, loss: float | None) -> Scored:
    return Scored({"learning_rate": lr}, seed, loss)


def test_the_chosen_setting_is_the_validation_choice_even_when_a_test_metric_would_pick_another():
    """Selection reads validation loss only: a test figure (here a refusal rate that would favour
    1e-4) plays no part, and the finalists' mean over seeds decides, not one lucky seed."""
    tuning = [scored(1e-4, 42, 2.0), scored(5e-4, 42, 1.40), scored(1e-3, 42, 1.45), scored(2e-3, 42, 1.6)]
    test_refusal_rate = {1e-4: 0.99, 5e-4: 0.40, 1e-3: 0.60, 2e-3: 0.5}
    best_on_test = max(test_refusal_rate, key=test_refusal_rate.get)
    candidates = finalists(tuning, 3)
    assert [c["learning_rate"] for c in candidates] == [5e-4, 1e-3, 2e-3]
    # 5e-4 won on seed 42, but its other seeds are worse: the mean picks 1e-3
    runs = [*tuning[1:], scored(5e-4, 43, 1.9), scored(5e-4, 44, 1.8), scored(1e-3, 43, 1.5), scored(1e-3, 44, 1.45),
            scored(2e-3, 43, 1.7), scored(2e-3, 44, math.nan)]
    setting, mean = choose_finalist(runs)
    assert setting == {"learning_rate": 1e-3} and mean == pytest.approx((1.45 + 1.5 + 1.45) / 3)
    assert setting["learning_rate"] != best_on_test


def test_finalists_are_ranked_as_successive_halving_ranks_them():
    """The furthest rung first, then the loss there: a run pruned at step 8 with a low early loss
    lost to the runs that went on; runs pruned at the last rung fill the finalists when only one
    trained to the end (16 configurations, reduction factor 3)."""
    tuned = [Scored({"learning_rate": 1e-3}, 42, 0.55, 32), Scored({"learning_rate": 2e-3}, 42, 0.69, 24),
             Scored({"learning_rate": 5e-4}, 42, 0.59, 24), Scored({"learning_rate": 9e-3}, 42, 0.30, 8)]
    assert finalists(tuned, 3) == [{"learning_rate": 1e-3}, {"learning_rate": 5e-4}, {"learning_rate": 2e-3}]


def test_diverged_configurations_are_never_finalists_and_all_diverged_is_an_error():
    assert finalists([scored(2e-3, 42, math.nan), scored(1e-4, 42, 3.0), scored(1e-4, 42, 3.0)], 3) == [
        {"learning_rate": 1e-4}]                                   # a repeated setting counts once
    with pytest.raises(ValueError, match="no tuning run has a finite validation loss"):
        finalists([scored(2e-3, 42, math.nan), scored(1e-3, 42, math.inf)], 3)
    with pytest.raises(ValueError, match="every finalist diverged"):
        choose_finalist([scored(2e-3, 42, 1.0), scored(2e-3, 43, math.nan)])


def test_a_tuning_seed_among_the_test_seeds_fails():
    check_disjoint(tuning_seeds(42, 2), seeds_for_testing(1000, 10))
    assert tuning_seeds(42, 2) == [42, 43, 44] and seeds_for_testing(1000, 3) == [1000, 1001, 1002]
    with pytest.raises(ValueError, match=r"test seeds \[42, 43\] are also tuning seeds"):
        check_disjoint(tuning_seeds(42, 2), seeds_for_testing(38, 6))


def test_params_refuse_a_study_whose_test_seeds_meet_its_tuning_seeds(write_params):
    from pipelines.params import ParamsError, load_params

    path = write_params({"study": {"methods": ["peft_lora"], "test_seed": 40, "seeds": 5}})
    with pytest.raises(ParamsError, match="are also tuning seeds"):
        load_params(path)
    load_params(write_params({"study": {"methods": [], "test_seed": 40, "seeds": 5}}))   # no study: nothing to check


def test_measuring_only_at_the_rungs_prunes_exactly_as_measuring_every_few_steps():
    """The study's trials measure validation loss at the pruner's rungs and at the end only; the
    successive-halving pruner decides the same as with a measurement every 8 steps."""
    import optuna

    assert rungs(8, 3, 32) == [8, 24] and rungs(8, 3, 96) == rungs(8, 3, 192) == [8, 24, 72] and rungs(8, 3, 8) == []
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def tuned(steps_measured: list[int]) -> list[tuple]:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3),
                                    pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=8, reduction_factor=3))

        def objective(trial: optuna.Trial) -> float:
            rate = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
            loss = 0.0
            for step in steps_measured:
                loss = abs(math.log(rate / 1e-3)) + 10 / step + 0.01 * math.sin(step * rate * 1e3)
                trial.report(loss, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return loss

        study.optimize(objective, n_trials=16)
        return [(t.params, t.state, max(t.intermediate_values)) for t in study.trials]

    every_eight, at_rungs = tuned(list(range(8, 97, 8))), tuned([*rungs(8, 3, 96), 96])
    assert [(p, s) for p, s, _ in every_eight] == [(p, s) for p, s, _ in at_rungs]
    assert {s for _, s, _ in at_rungs} == {optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE}
    stopped = [(e, r) for (_, s, e), (_, _, r) in zip(every_eight, at_rungs, strict=True)
               if s == optuna.trial.TrialState.PRUNED]
    assert stopped and all(e == r for e, r in stopped)           # stopped at the same rung


def test_a_chosen_value_at_the_edge_of_any_range_is_found():
    space = search_space(True, False, learning_rate=RANGES["learning_rate"], damping=RANGES["damping"],
                         reprojection_warmup=RANGES["reprojection_warmup"], energy=RANGES["energy"])
    found = edges(space, {"learning_rate": 1.1e-4, "damping": 0.098}, margin=0.1)
    assert [(d.name, side) for d, side in found] == [("learning_rate", "low"), ("damping", "high")]
    assert edges(space, {"learning_rate": 1e-3, "damping": 3e-3}, margin=0.1) == []


def test_every_dimension_at_its_edge_widens_within_its_hard_limit():
    """Not only the learning rate: the damping at its top edge (pure_grit's in the committed
    study), the reprojection warm-up at its bottom (two paper variants'), the eigen-energy at its
    top; each stops at its hard limit, and an edge there stays (the report names it)."""
    paper = search_space(True, True, **RANGES)
    best = {"learning_rate": 1e-3, "damping": 0.098, "reprojection_warmup_fraction": 0.11, "energy_threshold": 0.998}
    wider, widened = widen(paper, best, margin=0.1, factor=10.0)
    assert [(d.name, side) for d, side in widened] == [("damping", "high"), ("reprojection_warmup_fraction", "low"),
                                                       ("energy_threshold", "high")]
    by_name = {d.name: d for d in wider}
    assert (by_name["learning_rate"].low, by_name["learning_rate"].high) == RANGES["learning_rate"]   # interior: kept
    assert (by_name["damping"].low, by_name["damping"].high) == (1e-4, HARD_LIMITS["damping"][1])   # 0.1 x 10
    assert (by_name["reprojection_warmup_fraction"].low, by_name["reprojection_warmup_fraction"].high) == (0.0, 0.5)
    assert (by_name["energy_threshold"].low, by_name["energy_threshold"].high) == (0.9, 1.0)
    assert all(not widens(by_name[name], side) for name, side in (
        ("damping", "high"), ("reprojection_warmup_fraction", "low"), ("energy_threshold", "high")))
    # at its hard limits nothing widens again, and the edge stays for the report to name
    again, more = widen(wider, {**best, "damping": 0.95, "reprojection_warmup_fraction": 0.01}, margin=0.1, factor=10)
    assert again == wider and more == []
    assert {d.name for d, _ in edges(again, {**best, "damping": 0.95, "reprojection_warmup_fraction": 0.01}, 0.1)} >= {
        "damping", "reprojection_warmup_fraction"}
    # a linear range widens by its own width; a log one by the factor
    low_energy, _ = widen(paper, {**best, "damping": 3e-3, "reprojection_warmup_fraction": 0.3,
                                  "energy_threshold": 0.905}, 0.1, 10.0)
    assert {d.name: (d.low, d.high) for d in low_energy}["energy_threshold"] == (pytest.approx(0.801), 0.999)


def test_the_declared_ranges_must_lie_within_the_hard_limits():
    from evaluation.config import StudyParams

    with pytest.raises(ValueError, match="beyond the hard limits"):
        StudyParams(damping_range=(1e-4, 10.0))
    with pytest.raises(ValueError, match="beyond the hard limits"):
        StudyParams(reprojection_warmup_range=(0.1, 0.7))
