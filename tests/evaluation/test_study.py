"""The study's rules: declared spaces, equal trials, selection on validation loss only, the
paired t over seeds with Holm, and a plain verdict."""

from __future__ import annotations

import math

import pytest

from evaluation.study import Trial, at_the_edge, choose_setting, draw_settings, paired_tests, search_space, verdict


def test_every_method_gets_the_same_number_of_trials_and_the_same_learning_rates():
    lora = draw_settings(search_space(False, (1e-4, 1e-2), (1e-4, 1e-1)), 4, seed=0)
    grit = draw_settings(search_space(True, (1e-4, 1e-2), (1e-4, 1e-1)), 4, seed=0)
    assert len(lora) == len(grit) == 4
    assert [s["learning_rate"] for s in lora] == [s["learning_rate"] for s in grit]
    assert all(set(s) == {"learning_rate"} for s in lora) and all(set(s) == {"learning_rate", "damping"} for s in grit)
    # log-spaced: the centres of four equal slices of [1e-4, 1e-2] in log space
    assert [s["learning_rate"] for s in lora] == pytest.approx([1.78e-4, 5.62e-4, 1.78e-3, 5.62e-3], rel=1e-2)
    dampings = sorted(s["damping"] for s in grit)
    assert all(1e-4 <= d <= 1e-1 for d in dampings) and dampings[-1] / dampings[0] > 10      # spread, not clumped
    assert draw_settings(search_space(True, (1e-4, 1e-2), (1e-4, 1e-1)), 4, seed=0) == grit   # reproducible
    assert draw_settings(search_space(True, (1e-4, 1e-2), (1e-4, 1e-1)), 4, seed=1) != grit


def trial(lr: float, val_loss: float, decline: float, method: str = "m", phase: str = "tune", seed: int = 0,
          budget: int = 8, **metrics: float) -> Trial:
    return Trial(phase, method, budget, seed, {"learning_rate": lr}, val_loss,
                 metrics={"val_loss": val_loss, "sampled_refusal_rate": decline, **metrics})


def test_the_setting_is_chosen_on_validation_loss_even_when_a_test_metric_would_pick_another():
    trials = [trial(1e-4, 2.0, decline=0.99), trial(5e-4, 1.5, decline=0.40), trial(1e-3, 1.7, decline=0.95)]
    best_on_test = max(trials, key=lambda t: t.metrics["sampled_refusal_rate"])
    chosen = choose_setting(trials)
    assert chosen.setting == {"learning_rate": 5e-4}
    assert chosen is not best_on_test


def test_a_choice_at_the_edge_of_the_range_is_flagged():
    trials = [trial(1e-4, 2.0, 0.5), trial(1e-3, 1.5, 0.5), trial(1e-2, 1.2, 0.5)]
    assert at_the_edge(trials, choose_setting(trials)) == "largest"
    assert at_the_edge(trials[:2] + [trial(1e-2, 1.9, 0.5)], trials[1]) is None


def test_diverged_trials_are_never_chosen_and_all_diverged_is_an_error():
    assert choose_setting([trial(2e-3, math.nan, 0.5), trial(1e-4, 3.0, 0.5)]).setting == {"learning_rate": 1e-4}
    with pytest.raises(ValueError, match="no tuning trial has a finite validation loss"):
        choose_setting([trial(2e-3, math.nan, 0.5), trial(1e-3, math.inf, 0.5)])


def test_the_paired_t_over_seeds_is_holm_adjusted_over_every_metric_pair_and_budget():
    trials = []
    for seed in range(5):
        trials.append(trial(1e-4, 2.0 + 0.01 * seed, 0.5, "lora", "test", seed))
        # GRIT: validation loss lower by 0.1 +- noise at every seed, decline probability the same
        trials.append(trial(1e-4, 1.9 + 0.01 * seed + 0.002 * (-1) ** seed, 0.5, "grit", "test", seed))
    tests = paired_tests(trials, [("grit", "lora")], [8])
    loss = next(t for t in tests if t.metric == "val_loss")
    assert loss.delta.value == pytest.approx(-0.1, abs=0.01) and loss.p_value < 1e-4
    assert loss.p_adjusted == pytest.approx(min(1.0, loss.p_value * len(tests)))    # the smallest p of the family
    assert loss.better() is True                                                      # lower loss is better
    decline = next(t for t in tests if t.metric == "sampled_refusal_rate")
    assert decline.better() is None
    sentence = verdict(tests, ["grit"])
    assert sentence.startswith(f"GRIT is better than LoRA in 1 of {len(tests)} paired tests")
    assert f"Better: validation loss (grit vs lora, 8 steps, {loss.delta.value:+.3g})." in sentence


def test_the_verdict_says_no_plainly_when_nothing_differs():
    trials = [trial(1e-4, 2.0 + 0.01 * s, 0.5, m, "test", s) for s in range(5) for m in ("lora", "grit")]
    assert verdict(paired_tests(trials, [("grit", "lora")], [8]), ["grit"]).startswith("No: ")


def test_the_readme_headline_leads_with_the_verdict_and_keeps_the_declared_method_order():
    from evaluation.study_report import readme_block

    figure = {"mean": 1.0, "low": 0.9, "high": 1.1, "n": 5}
    study = {"status": "complete", "verdict": "No: nothing differs.", "methods": ["peft_lora", "grit_paper"],
             "chosen": {"grit_paper": {"learning_rate": 5e-4, "damping": 1e-3}, "peft_lora": {"learning_rate": 4e-4}},
             "seeds": 5, "budgets": [32, 96],
             "summary": {f"{m}@{b}": {"val_loss": figure, "aqi": figure, "decline_probability": figure}
                         for m in ("peft_lora", "grit_paper") for b in (32, 96)}}
    block = readme_block(study)
    assert block.startswith("**No: nothing differs.**")
    assert block.index("| peft_lora | learning_rate") < block.index("| grit_paper | damping")
    assert "| metric | peft_lora | grit_paper |" in block and "At 96 steps" in block
    from evaluation.metrics import get

    # the endpoints the study recorded, under today's labels; not the AQI-style index (a function of 1/XB)
    assert "1 [0.9, 1.1]" in block and f"| {get('decline_probability').label} | 1 [0.9, 1] |" in block
    assert get("aqi").label not in block
    assert "has not been completed" in readme_block({"status": "not run"})


def test_a_recorded_trial_is_recognised_as_its_planned_spec_so_a_resumed_study_skips_it():
    from pipelines.study import identity

    spec = {"phase": "test", "method": "pure_grit", "budget": 32, "seed": 43,
            "setting": {"learning_rate": 0.00178, "damping": 0.00572}, "position": "5/30"}
    recorded = Trial("test", "pure_grit", 32, 43, {"damping": 0.00572, "learning_rate": 0.00178}, 0.73)
    assert identity(recorded) == identity(spec)
    assert identity(recorded) != identity({**spec, "seed": 44})
    assert identity(recorded) != identity({**spec, "setting": {"learning_rate": 0.00178, "damping": 0.001}})


def test_the_compute_line_says_what_each_time_covers_when_some_trials_predate_the_wall_time_record():
    from evaluation.study_report import compute_line

    timed = [Trial("test", "m", 8, s, {"learning_rate": 1e-4}, 1.0, metrics={"trial_seconds": 1800.0},
                   train_seconds=900.0) for s in range(2)]
    untimed = Trial("test", "m", 8, 2, {"learning_rate": 1e-4}, 1.0, train_seconds=1800.0)
    line = compute_line([*timed, untimed], 3600.0, 720.0, trials_run=2)
    assert "3 training runs: 1.00 h of training" in line
    assert "the 2 trials whose wall time is recorded took 1.00 h (the other 1 predate" in line
    assert "took 0.20 h, running 2 of the 3 trials" in line
    assert "with measuring, the trials took 1.00 h" in compute_line(timed, 1800.0, 60.0, None)
