"""The report shows where each method's published defaults landed in its own tuning, and which ranges
were widened (issue 60)."""

import json
from pathlib import Path

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


def _draw(tuning: str, name: str, low: float, high: float) -> dict:
    distribution = json.dumps({"name": "FloatDistribution", "attributes": {"step": None, "low": low, "high": high,
                                                                           "log": True}})
    return {"tuning": tuning, "log": {"op_code": 5, "param_name": name, "distribution": distribution}}


def test_the_report_names_each_widened_range_from_optunas_journal():
    from evaluation.study_report import searched_ranges, widened_lines

    carried = {"tuning": "k/grit_paper/96/extended-1", "log": {"op_code": 4, "distributions": {
        "damping": _draw("", "damping", 1e-4, 1.0)["log"]["distribution"]}}}
    journal = [_draw("k/grit_paper/96", "damping", 1e-4, 0.1), _draw("k/grit_paper/96", "learning_rate", 1e-4, 1e-2),
               carried, _draw("k/grit_paper/96/extended-1", "learning_rate", 1e-4, 1e-2),
               _draw("k/grit_paper/96/extended-2", "damping", 1e-4, 1.0),
               _draw("k/grit_paper/96/extended-2", "learning_rate", 1e-5, 1e-2),
               _draw("k/peft_lora/96", "learning_rate", 1e-4, 1e-2)]
    ranges = searched_ranges(journal)
    assert ranges["k/grit_paper/96/extended-1"] == {"damping": (1e-4, 1.0), "learning_rate": (1e-4, 1e-2)}
    assert widened_lines(ranges) == ["grit_paper/96, extension 1: damping [0.0001, 0.1] to [0.0001, 1]",
                                     "grit_paper/96, extension 2: learning_rate [0.0001, 0.01] to [1e-05, 0.01]"]


def test_the_committed_ledgers_extensions_are_the_ones_its_tuning_table_counts():
    """Every part the ledger tuned with more than one tuning has a widened line, and no other."""
    from db.study_ledger import jsonl_records
    from evaluation.study_report import searched_ranges, widened_lines

    root = Path(__file__).resolve().parents[2] / "reports" / "study" / "ledger"
    lines = widened_lines(searched_ranges(jsonl_records((root / "journal.jsonl").read_text())))
    extended = sorted({r["tuning"].split("/", 1)[1] for r in jsonl_records((root / "trials.jsonl").read_text())
                       if r["phase"] == "tune" and "/extended-" in r["tuning"]})
    assert [line.split(":", 1)[0] for line in lines] == [
        f"{name.split('/extended-')[0]}, extension {name.split('/extended-')[1]}" for name in extended]
    assert all(" to [" in line for line in lines)       # each widened something
