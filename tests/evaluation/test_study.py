"""The study's test arithmetic: summaries and the pre-declared paired tests over seeds (and over
prompts for per-prompt figures) with Holm over distinct endpoints, a plain verdict, the README
headline, and the bookkeeping that lets a killed study resume."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.stats import Interval
from evaluation.study import (
    PairedTest,
    Trial,
    compute_by_method,
    endpoints,
    paired_test_from_record,
    paired_test_record,
    paired_tests,
    planned_runs,
    remaining_hours,
    study_progress,
    summary,
)
from evaluation.study_report import study_headline, study_verdict

LORA = {"lora": "LoRA"}       # the one control these tests compare against, as the report names it


def trial(lr: float, test_loss: float, refusal: float, method: str = "m", phase: str = "test", seed: int = 0,
          steps: int = 8, per_prompt: dict | None = None, **metrics: float) -> Trial:
    return Trial(phase, method, steps, seed, {"learning_rate": lr}, test_loss,
                 metrics={"test_loss": test_loss, "sampled_refusal_rate": refusal, **metrics},
                 per_prompt=per_prompt or {})


def test_the_family_is_the_distinct_endpoints_without_the_selection_criterion():
    family = endpoints()
    assert "test_loss" in family and "separation" in family and "sampled_refusal_rate" in family
    assert "aqi" not in family                      # a monotone function of 1/XB: one finding, not two
    assert "val_loss" not in family                 # selection read it
    assert "decline_probability" not in family      # a diagnostic, not a rate


def test_the_paired_tests_are_holm_adjusted_over_every_endpoint_pair_and_run_length():
    trials = []
    for seed in range(5):
        trials.append(trial(1e-4, 2.0 + 0.01 * seed, 0.5, "lora", seed=seed))
        # GRIT: test loss lower by 0.1 +- noise at every seed, refusals the same
        trials.append(trial(1e-4, 1.9 + 0.01 * seed + 0.002 * (-1) ** seed, 0.5, "grit", seed=seed))
    tests = paired_tests(trials, [("grit", "lora")], [8])
    loss = next(t for t in tests if t.metric == "test_loss")
    assert loss.delta.value == pytest.approx(-0.1, abs=0.01) and loss.p_value < 1e-4
    assert loss.p_adjusted == pytest.approx(min(1.0, loss.p_value * len(tests)))    # the smallest p of the family
    assert loss.better() is True                                                      # lower loss is better
    refusal = next(t for t in tests if t.metric == "sampled_refusal_rate")
    assert refusal.better() is None
    sentence = study_verdict(tests, ["grit"], LORA)
    assert sentence.startswith(f"GRIT is better than LoRA in 1 and worse in none of {len(tests)} paired tests")
    assert f"Better: {loss_label()} (grit vs lora, 8 steps, {loss.delta.value:+.3g})." in sentence


def loss_label() -> str:
    from evaluation.metrics import get

    return get("test_loss").label


def test_per_prompt_figures_count_the_prompts_variance_too():
    """The same per-seed means, but the prompts disagree: the two-level interval is wider than a t
    over seed means, and a shift carried by a few prompts is not called significant."""
    rng = np.random.default_rng(0)
    prompts = 40
    trials = []
    for seed in range(6):
        base = rng.uniform(0, 1, prompts)
        shifted = base.copy()
        shifted[:4] += 0.5 + rng.normal(0, 0.01, 4)           # 4 of 40 prompts move, by a lot
        shifted = np.clip(shifted, 0, 1)
        trials += [trial(1e-4, 1.0, base.mean(), "lora", seed=seed, per_prompt={"sampled_refusal_rate": list(base)}),
                   trial(1e-4, 1.0, shifted.mean(), "grit", seed=seed,
                         per_prompt={"sampled_refusal_rate": list(shifted)})]
    both = paired_tests(trials, [("grit", "lora")], [8])
    per_prompt = next(t for t in both if t.metric == "sampled_refusal_rate")
    flat = [Trial(t.phase, t.method, t.steps, t.seed, t.setting, t.val_loss, metrics=t.metrics) for t in trials]
    over_seeds = next(t for t in paired_tests(flat, [("grit", "lora")], [8]) if t.metric == "sampled_refusal_rate")
    assert per_prompt.delta.value == pytest.approx(over_seeds.delta.value, abs=1e-9)
    assert (per_prompt.delta.high - per_prompt.delta.low) > 2 * (over_seeds.delta.high - over_seeds.delta.low)
    assert over_seeds.p_value < 0.01 < per_prompt.p_value
    assert per_prompt.resamples is not None and over_seeds.resamples is None      # each names its test
    interval = summary(trials, "grit", 8, "sampled_refusal_rate")
    assert 0 <= interval.low <= interval.value <= interval.high <= 1          # within the metric's range


def _loss_test(delta: float, low: float, high: float, band: tuple[float, float], p_holm: float) -> PairedTest:
    """A test-loss comparison against a control whose loss is 0.32 (smallest effect 1%: 0.0032)."""
    return PairedTest(96, "grit", "lora", "test_loss", Interval(delta, low, high, 10), p_holm / 60, p_holm,
                      reference=0.32, equivalence=Interval(delta, *band, 10))


def test_four_findings_significance_and_size_together():
    """better/worse needs Holm significance and the smallest effect of interest; equivalent needs
    the 90% interval inside that effect (two one-sided tests); the rest is inconclusive."""
    assert _loss_test(-0.004, -0.0055, -0.0025, (-0.0051, -0.0029), 0.001).finding() == "better"   # 1.25% lower
    assert _loss_test(+0.010, 0.008, 0.012, (0.0085, 0.0115), 0.001).finding() == "worse"
    # significant, but a 0.6% shift: below the smallest effect, and its interval reaches past it
    small = _loss_test(+0.002, 0.0009, 0.0036, (0.0012, 0.0034), 0.001)
    assert small.finding() == "inconclusive" and small.better() is None
    # significant and small with an interval inside +-0.0032: equivalent, not "worse"
    assert _loss_test(+0.0015, 0.0008, 0.0022, (0.0009, 0.0021), 0.001).finding() == "equivalent"
    # not significant, interval inside the band: equivalent; reaching past it: inconclusive
    assert _loss_test(0.0002, -0.0025, 0.0029, (-0.002, 0.0024), 0.9).finding() == "equivalent"
    assert _loss_test(0.0002, -0.006, 0.0064, (-0.005, 0.0054), 0.9).finding() == "inconclusive"


def test_the_headline_counts_the_four_kinds_and_a_record_keeps_each_finding():
    tests = [_loss_test(-0.004, -0.0055, -0.0025, (-0.0051, -0.0029), 0.001),
             _loss_test(+0.002, 0.0009, 0.0036, (0.0012, 0.0034), 0.001),
             _loss_test(0.0002, -0.0025, 0.0029, (-0.002, 0.0024), 0.9)]
    assert study_headline(tests, ["grit"], LORA).startswith(
        "GRIT is better than LoRA in 1 and worse in none of 3 paired tests; equivalent in 1 and inconclusive in 1")
    for test in tests:
        record = paired_test_record(test)
        assert record["finding"] == test.finding() and record["smallest_effect"] == pytest.approx(0.0032)
        assert paired_test_from_record(record).finding() == test.finding()


def test_paired_tests_carry_the_controls_mean_and_a_narrower_equivalence_interval():
    trials = [trial(1e-4, 2.0 + 0.01 * s, 0.5, m, seed=s) for s in range(5) for m in ("lora", "grit")]
    loss = next(t for t in paired_tests(trials, [("grit", "lora")], [8]) if t.metric == "test_loss")
    assert loss.reference == pytest.approx(2.02)
    assert loss.delta.low <= loss.equivalence.low <= loss.equivalence.high <= loss.delta.high
    assert loss.finding() == "equivalent"                       # identical losses: inside +-1% of 2.02


def test_the_verdict_says_no_plainly_when_nothing_differs():
    trials = [trial(1e-4, 2.0 + 0.01 * s, 0.5, m, seed=s) for s in range(5) for m in ("lora", "grit")]
    assert study_verdict(paired_tests(trials, [("grit", "lora")], [8]), ["grit"], LORA).startswith("No: ")


def test_compute_is_counted_per_method_and_phase():
    # Each run costs its wall time (training, evaluation, loading); one recorded before wall times
    # were kept costs its training time. The training part is counted beside it.
    runs = [Trial("tune", "a", 8, 0, {}, 1.0, train_seconds=10, trial_seconds=14),
            Trial("finalist", "a", 8, 1, {}, 1.0, train_seconds=5, trial_seconds=6),
            Trial("test", "a", 8, 1000, {}, 1.0, train_seconds=7), Trial("tune", "b", 8, 0, {}, 1.0, train_seconds=3),
            Trial("probe", "a", 8, 0, {}, None, trial_seconds=4)]        # a probe trains nothing
    assert compute_by_method(runs) == {
        "a": {"tune": 14, "finalist": 6, "test": 7, "probe": 4, "total": 31, "training": 22},
        "b": {"tune": 3, "finalist": 0, "test": 0, "probe": 0, "total": 3, "training": 3}}


def test_progress_counts_each_part_by_phase_and_says_where_it_is():
    planned = planned_runs(configurations=3, finalists=2, finalist_seeds=1, seeds=2)
    assert planned == {"tune": 3, "finalist": 4, "test": 2}
    runs = ([("a", 8, "tune", 60.0)] * 3 + [("a", 8, "finalist", 60.0)] * 3 + [("a", 8, "test", 60.0)] * 2
            + [("b", 8, "tune", 36.0), ("b", 8, "finalist", 36.0), ("a", 16, "tune", 3600.0), ("a", 16, "test", 0.0)]
            + [("gone", 8, "tune", 1.0)])                       # a method the plan no longer holds
    # each costs its wall time; a trial recorded before wall times were kept costs its training time
    trials = [Trial(phase, method, steps, 0, {}, 1.0, train_seconds=1.0, trial_seconds=spent or None)
              for method, steps, phase, spent in runs]
    parts = study_progress(["a", "b"], [8, 16], planned, trials)
    assert [(p.method, p.steps, p.state) for p in parts] == [
        ("a", 8, "done"), ("b", 8, "finalists"), ("a", 16, "testing"), ("b", 16, "not started")]
    assert parts[0].done == {"tune": 3, "finalist": 3, "test": 2, "probe": 0}
    assert parts[0].hours == pytest.approx(8 / 60)
    assert parts[1].hours == pytest.approx(72 / 3600) and parts[2].hours == pytest.approx(3601 / 3600)


def test_a_probed_part_is_done_only_once_its_probe_is_recorded_and_the_probe_left_is_priced():
    """GRIT's and the peers' parts end with a probe at the chosen setting: with every test run done
    and no probe such a part is "probing", not "done", and the compute left counts one probe at
    the median wall time of the probes so far; a part of plain LoRA is done with its tests."""
    planned = planned_runs(configurations=1, finalists=1, finalist_seeds=0, seeds=1)

    def run(phase, method, seconds=10.0):
        return Trial(phase, method, 8, 0, {}, 1.0, train_seconds=seconds, trial_seconds=seconds)

    tested = [run(phase, method) for method in ("lora", "grit", "peer") for phase in ("tune", "finalist", "test")]
    probes = [run("probe", "peer", 300.0), run("probe", "peer", 500.0)]      # median 400 s
    parts = study_progress(["lora", "grit", "peer"], [8], planned, tested + probes, probed=["grit", "peer"])
    assert [(p.method, p.state, p.planned["probe"]) for p in parts] == [
        ("lora", "done", 0), ("grit", "probing", 1), ("peer", "done", 1)]
    assert remaining_hours(parts, tested + probes) * 3600 == pytest.approx(400.0)
    finished = study_progress(["lora", "grit"], [8], planned, tested + [run("probe", "grit")], probed=["grit"])
    assert {p.state for p in finished} == {"done"} and remaining_hours(finished, tested) == 0


def test_the_compute_left_is_the_runs_left_at_the_pace_of_the_latest_trials():
    planned = planned_runs(configurations=4, finalists=1, finalist_seeds=1, seeds=2)     # 4 tune, 2 fin, 2 test

    def run(phase, method, steps, per_step, outside, stopped_at=None):
        trained = stopped_at or steps
        return Trial(phase, method, steps, 0, {}, 1.0, train_seconds=per_step * trained,
                     trial_seconds=per_step * trained + outside, stopped_at=stopped_at)

    old = [run("finalist", "gone", 8, 100.0, 0.0)] * 5     # a slower pace, before the latest trials
    # part (a, 8): tuning runs trained half their steps on average; 2 finalist runs; 2 tests
    done_a = [run("tune", "a", 8, 2.0, 1.0), run("tune", "a", 8, 2.0, 1.0, stopped_at=2),
              run("tune", "a", 8, 2.0, 1.0, stopped_at=2), run("tune", "a", 8, 2.0, 1.0, stopped_at=4),
              run("finalist", "a", 8, 2.0, 10.0), run("finalist", "a", 8, 2.0, 10.0),
              run("test", "a", 8, 2.0, 100.0), run("test", "a", 8, 2.0, 100.0)]
    trials = old + done_a + [run("tune", "b", 8, 2.0, 1.0, stopped_at=4)]
    parts = study_progress(["a", "b"], [8, 16], planned, trials)
    left = remaining_hours(parts, trials, recent=len(done_a) + 1)
    # (b, 8): 3 tuning runs at half of 8 steps, 2 finalist runs, 2 tests; (a, 16) and (b, 16): 4
    # tuning runs at the share measured at 8 steps, 2 finalists, 2 tests each, 2 s per step
    b8 = 3 * (2 * 8 * 0.5 + 1) + 2 * (2 * 8 + 10) + 2 * (2 * 8 + 100)
    at16 = 4 * (2 * 16 * 0.5 + 1) + 2 * (2 * 16 + 10) + 2 * (2 * 16 + 100)
    assert left * 3600 == pytest.approx(b8 + 2 * at16)
    assert remaining_hours(parts, []) is None
    finished = study_progress(["a"], [8], planned, done_a)
    assert remaining_hours(finished, done_a) == 0


def test_the_compute_left_prices_each_phase_at_its_own_pace_when_the_latest_trials_are_of_one_phase():
    """Tuning steps cost more than test steps (the pruner's validation along the way). When the
    latest trials are all test runs, the tuning runs left are priced at tuning's own pace."""
    planned = planned_runs(configurations=4, finalists=1, finalist_seeds=1, seeds=2)

    def run(phase, method, per_step):
        return Trial(phase, method, 8, 0, {}, 1.0, train_seconds=per_step * 8, trial_seconds=per_step * 8)

    done_a = [run("tune", "a", 6.0)] * 4 + [run("finalist", "a", 4.0)] * 2 + [run("test", "a", 2.0)] * 2
    parts = study_progress(["a", "b"], [8], planned, done_a)
    left = remaining_hours(parts, done_a, recent=2)                  # the latest two: test runs only
    assert left * 3600 == pytest.approx(4 * 6.0 * 8 + 2 * 4.0 * 8 + 2 * 2.0 * 8)     # part (b, 8), each at its pace


def test_the_pages_say_how_far_the_ledgers_study_is():
    from evaluation.study_report import ledger_parts_table, ledger_progress

    header = {"key": "k1", "declared": {"study": {"configurations": 2, "finalists": 1, "finalist_seeds": 1,
                                                  "seeds": 1, "methods": ["a", "b"], "steps": [8]}}}
    record = {"method": "a", "steps": 8, "seed": 0, "setting": {}, "train_seconds": 1.0, "trial_seconds": 1800.0}
    half = [record | {"phase": "tune"}, record | {"phase": "test"}]
    line = ledger_progress(header, half)
    # left: part b's 2 tuning runs and 1 test run at the tuning and test runs' 0.5 h each
    assert "Study `k1`" in line and "2 trials in its ledger, 1.0 h of compute (about 1.5 h more at the pace of " \
        "its trials so far), [1 of 2 parts done]" in line
    assert "stays the earlier study's" in line
    table = ledger_parts_table(header, half)
    assert "| a, 8 steps | done | 1 | 0 | 1 | 1.00 |" in table
    assert "| b, 8 steps | not started | 0 | 0 | 0 | 0.00 |" in table
    done = [record | {"phase": "test"}, record | {"phase": "test", "method": "b"}]
    whole = ledger_progress(header, done)
    assert "[2 of 2 parts done]" in whole and "every part is done" in whole and "writes the report" in whole
    # once the report is this ledger's, the line says so; another study's report does not count
    reported = ledger_progress(header, done, reported={"study": "k1", "run_id": "r9"})
    assert "its report (run `r9`) is the headline above" in reported and "writes the report" not in reported
    assert "writes the report" in ledger_progress(header, done, reported={"study": "k0", "run_id": "r8"})
    assert "has begun" in ledger_progress(None, []) and "has begun" in ledger_parts_table(None, [])
    assert "data" not in line                                      # trials recorded before the data was
    assert "Every trial trained on data `d1`" in ledger_progress(header, [r | {"data": "d1"} for r in half])
    mixed = ledger_progress(header, [half[0] | {"data": "d1"}, half[1] | {"data": "d2"}])
    assert "Trials per prepared data: `d1` 1, `d2` 1." in mixed
    assert "began again" not in line
    revised = ledger_progress(header | {"revisions": {"b": "abcd1234"}}, half)
    assert "`b` began again under a changed variant" in revised and "its trials since" in revised
    # a GRIT method's part is done once its probe is recorded too (the declared variants say which)
    variants = {"a": {"engine": "peft", "grit": False}, "b": {"engine": "peft", "grit": True}}
    probed = header | {"declared": header["declared"] | {"variants": variants}}
    assert "[1 of 2 parts done]" in ledger_progress(probed, done)
    assert "| b, 8 steps | probing | 0 | 0 | 1 |" in ledger_parts_table(probed, done)
    assert "[2 of 2 parts done]" in ledger_progress(probed, done + [record | {"phase": "probe", "method": "b"}])


def test_the_readme_headline_leads_with_the_verdict_and_keeps_the_declared_method_order():
    from evaluation.metrics import get
    from evaluation.study_report import readme_block

    figure = {"mean": 1.0, "low": 0.9, "high": 1.1, "n": 5}
    study = {"status": "complete", "verdict": "No: nothing differs.", "methods": ["peft_lora", "grit_paper"],
             "chosen": {}, "seeds": 5, "steps": [32, 96],
             "summary": {f"{m}@{b}": {"val_loss": figure, "aqi": figure, "decline_probability": figure}
                         for m in ("peft_lora", "grit_paper") for b in (32, 96)}}
    block = readme_block(study)
    assert block.startswith("**No: nothing differs.**")        # a study recorded before the headline was kept
    assert "| metric | peft_lora | grit_paper |" in block
    # the figures at the longest run length; the others are the report's
    assert "At 96 steps (mean [95% interval] over 5 seeds; at 32 steps in the report)" in block
    assert "At 32 steps (" not in block
    # the endpoints the study recorded, under today's labels; not the AQI-style index (a function of 1/XB)
    assert "1 [0.9, 1.1]" in block and f"| {get('decline_probability').label} | 1 [0.9, 1] |" in block
    assert get("aqi").label not in block
    assert "Significant differences" not in block                # no tests recorded: no table of them
    assert "has not been completed" in readme_block({"status": "not run"})


def test_the_readme_lays_the_significant_differences_out_by_metric_and_run_length():
    """Every significant paired test appears in its metric's row and run length's column, with its
    direction; a metric with none at a run length says so."""
    from evaluation.study import paired_test_from_record, paired_test_record
    from evaluation.study_report import readme_block

    trials = []
    for seed in range(5):
        for steps, shift in ((8, -0.1), (16, 0.0)):        # GRIT's test loss lower at 8 steps only
            trials += [trial(1e-4, 2.0 + 0.01 * seed, 0.5, "lora", seed=seed, steps=steps),
                       trial(1e-4, 2.0 + shift + 0.01 * seed + 0.002 * (-1) ** seed, 0.5, "grit", seed=seed,
                             steps=steps)]
    tests = paired_tests(trials, [("grit", "lora")], [8, 16])
    records = [paired_test_record(t) for t in tests]
    assert [paired_test_from_record(r) for r in records] == tests            # the record reads back whole
    summary_figures = {name: {"mean": 1.0, "low": 0.9, "high": 1.1, "n": 5} for name in {t.metric for t in tests}}
    study = {"status": "complete", "verdict": "long", "headline": "GRIT is better.", "methods": ["lora", "grit"],
             "chosen": {}, "seeds": 5, "steps": [8, 16], "tests": records,
             "summary": {f"{m}@{b}": summary_figures for m in ("lora", "grit") for b in (8, 16)}}
    block = readme_block(study)
    assert block.startswith("**GRIT is better.**")
    loss = next(t for t in tests if t.metric == "test_loss" and t.steps == 8)
    assert f"| {loss_label()} | better: grit {loss.delta.value:+.3g} | none |" in block
    assert f"Holm p < 0.05 over all {len(tests)} paired tests" in block


def test_the_finished_parts_figures_are_shown_at_their_chosen_setting_within_each_metrics_range():
    from evaluation.study_report import ledger_finished_parts, ledger_progress

    header = {"key": "k1", "declared": {"study": {"configurations": 1, "finalists": 1, "finalist_seeds": 1,
                                                  "seeds": 2, "methods": ["a", "b"], "steps": [8]}}}

    def test_run(method: str, seed: int, lr: float, loss: float, refusal: float) -> dict:
        return {"phase": "test", "method": method, "steps": 8, "seed": seed, "setting": {"learning_rate": lr},
                "train_seconds": 1.0, "metrics": {"test_loss": loss, "sampled_refusal_rate": refusal}}

    # a: a stale test run at an earlier setting, then its two test seeds at the chosen one; b: one of two
    records = [test_run("a", 0, 0.5, 9.0, 0.0), test_run("a", 0, 0.1, 1.0, 0.9), test_run("a", 1, 0.1, 3.0, 1.0),
               test_run("b", 0, 0.2, 2.0, 0.5)]
    table = ledger_finished_parts(header, records)
    # mean 2 with a t interval over 2 seeds of +-12.71, whose low end a loss cannot reach; the
    # refusal rate's interval stops at 1
    assert "| a, 8 steps | 2 | 2 [0, 14.71] |" in table and "| 0.95 [0.3147, 1] |" in table
    assert "b, 8 steps" not in table                     # (the stale run's loss 9 would make a's mean 4.333)
    assert "has finished" in ledger_finished_parts(header, records[3:])
    assert "has begun" in ledger_finished_parts(None, [])
    assert "finished parts' test figures" in ledger_progress(header, records)
    assert "finished parts' test figures" not in ledger_progress(header, records[3:])
    assert "finished parts' test figures" not in ledger_progress(header, records + [test_run("b", 1, 0.2, 2.0, 0.5)])


def test_a_recorded_trial_is_recognised_as_its_planned_spec_so_a_resumed_study_skips_it():
    from pipelines.study.plan import identity

    spec = {"phase": "test", "method": "pure_grit", "steps": 32, "seed": 1003,
            "setting": {"learning_rate": 0.00178, "damping": 0.00572}, "position": "5/30"}
    recorded = Trial("test", "pure_grit", 32, 1003, {"damping": 0.00572, "learning_rate": 0.00178}, 0.73)
    assert identity(recorded) == identity(spec)
    assert identity(recorded) != identity({**spec, "seed": 1004})
    assert identity(recorded) != identity({**spec, "setting": {"learning_rate": 0.00178, "damping": 0.001}})


def test_a_trial_reads_the_same_from_the_store_as_from_the_ledger_and_costs_its_wall_time(tmp_path):
    """The study's progress counts trials read from the store, the pages count the ledger's: one
    reading of a trial, so the two cannot disagree on what a trial cost."""
    from sqlalchemy import select

    from db.models import Run, StudyTrial
    from db.store import open_store, utcnow
    from evaluation.study import trial_from_record
    from pipelines.study.sitting import as_trial
    from pipelines.study.trial import store_trial

    result = {"phase": "test", "method": "pure_grit", "steps": 32, "seed": 1003, "tuning": "s/pure_grit/32",
              "setting": {"damping": 0.01398, "learning_rate": 0.001252}, "val_loss": 0.62,
              "curve": [[8, 1.17], [32, 0.62]], "stopped_at": None,
              "metrics": {"test_loss": 0.56, "sampled_refusal_rate": 0.9},
              "per_prompt": {"sampled_refusal_rate": [1.0, 0.8]}, "train_seconds": 170.0,
              "tokens_per_second": 121.0, "trainable_parameters": 4884480, "trial_seconds": 420.0,
              "revision": "abc", "host": "vm", "data": "1f64fdc62acf"}
    store = open_store("sqlite:///outputs/centralized.db", tmp_path)
    store.start_run(Run(id="r1", git_revision=None, params_hash="h", params_json="{}", profile="study", host="h",
                        device="cpu", started_at=utcnow()))
    store_trial(store, "r1", result)
    with store.reader() as session:
        from_store = as_trial(session.scalars(select(StudyTrial)).one())
    assert from_store == trial_from_record(result)
    assert from_store.metrics == result["metrics"]               # the wall time is not a figure
    assert from_store.compute_seconds == 420.0                   # training, evaluation and loading
    assert trial_from_record({**result, "trial_seconds": None}).compute_seconds == 170.0


def test_the_report_states_the_rungs_each_run_length_measured():
    """The report's pruner sentence gives the rungs the tuning trials were measured at (every
    step of a tuning curve before its end), per run length."""
    from evaluation.study import Trial
    from evaluation.study_report import rungs_line

    trials = [Trial("tune", "peft_lora", 32, 42, {"learning_rate": 1e-3}, 1.0, [(18, 1.2), (32, 1.0)]),
              Trial("tune", "pure_grit", 32, 42, {"learning_rate": 2e-3}, None, [(18, 1.4)], stopped_at=18),
              Trial("tune", "peft_lora", 96, 42, {"learning_rate": 1e-3}, 1.0, [(59, 1.1), (96, 0.9)]),
              Trial("test", "peft_lora", 96, 1000, {"learning_rate": 1e-3}, 1.0, [(59, 1.1), (96, 0.9), (7, 2.0)])]
    assert rungs_line(trials) == "at step 18 of 32; at step 59 of 96"
    assert rungs_line([]) == "none yet"
