"""The report shows where each method's published defaults landed in its own tuning (issue 60)."""

from evaluation.study import Trial, trial_from_record
from evaluation.study_report import defaults_rows, where_defaults_land

DEFAULTS = {"learning_rate": 2e-4, "damping": 1e-3}


def _tuning(losses: list[float | None], pruned: tuple[int, ...] = ()) -> list[Trial]:
    """A tuning whose first configuration is the defaults, the others drawn."""
    return [Trial("tune", "grit_paper", 96, 42, DEFAULTS if i == 0 else {"learning_rate": 1e-3 * (i + 1)}, loss,
                  stopped_at=59 if i in pruned else None, defaults=i == 0) for i, loss in enumerate(losses)]


def test_the_defaults_rank_among_the_configurations_trained_to_the_end():
    trials = _tuning([1.30, 1.25, 1.40, 1.10, 1.20], pruned=(2,))
    landed = where_defaults_land(trials, "grit_paper", 96, chosen={"learning_rate": 4e-3})
    assert (landed["val_loss"], landed["rank"], landed["of"], landed["best_val_loss"]) == (1.30, 4, 4, 1.10)
    assert landed["chosen"] is False and landed["setting"] == DEFAULTS


def test_chosen_defaults_are_said_so_and_a_part_without_defaults_has_no_row():
    trials = _tuning([1.0, 1.2])
    assert where_defaults_land(trials, "grit_paper", 96, chosen=dict(DEFAULTS))["chosen"] is True
    assert where_defaults_land(trials, "grit_paper", 192, chosen=None) is None
    rows = defaults_rows(trials, ["grit_paper", "peft_lora"], [96, 192], {("grit_paper", 96): dict(DEFAULTS)})
    assert rows == [["96", "grit_paper", "damping 0.001, learning_rate 0.0002", "1", "1 of 2", "1", "yes"]]


def test_failed_defaults_have_no_rank():
    landed = where_defaults_land(_tuning([float("nan"), 1.2]), "grit_paper", 96, chosen=None)
    assert landed["val_loss"] is None and landed["rank"] is None and landed["of"] == 1


def test_a_ledger_record_keeps_the_defaults_flag():
    record = {"phase": "tune", "method": "pure_grit", "steps": 96, "seed": 42, "setting": DEFAULTS,
              "val_loss": 1.0, "defaults": True}
    assert trial_from_record(record).defaults and not trial_from_record({**record, "defaults": False}).defaults


def test_the_probe_at_a_chosen_setting_is_reported_and_other_settings_are_not():
    from evaluation.study_report import probes_at_chosen

    chosen = {("grit_paper", 96): DEFAULTS}
    probes = [Trial("probe", "grit_paper", 96, 42, DEFAULTS, None,
                    metrics={"effective": 1.0, "update_cosine_median": 0.42, "scalar_twin_cosine_median": 0.40}),
              Trial("probe", "grit_paper", 96, 42, {"learning_rate": 1.0}, None, metrics={"effective": 0.0}),
              Trial("probe", "pure_grit", 192, 42, {"learning_rate": 1e-3}, None, metrics={"effective": 0.0})]
    assert probes_at_chosen(probes, chosen) == {"grit_paper@96": {
        "verdict": "effective", "update_cosine_median": 0.42, "scalar_twin_cosine_median": 0.40}}
