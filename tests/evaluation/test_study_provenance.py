"""The study report says which setups (code, locks, data) trained its trials and refuses to
compare test runs of different setups."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from db.provenance import ProvenanceError, trial_provenance
from evaluation.study import trial_from_record
from evaluation.study_report import (
    PROBE_COLUMNS,
    compared_setup,
    ledger_probes,
    probed_setup,
    provenance_line,
    write_report,
)
from pipelines.study.trial import PROBE_FIGURES


def _record(phase: str, method: str, seed: int, setup: str | None) -> dict:
    record = {"phase": phase, "method": method, "steps": 200, "seed": seed, "setting": {"learning_rate": 1e-4},
              "val_loss": 1.0}
    return record if setup is None else {**record, "provenance": {"setup": setup, "fingerprint": setup + "x"}}


def test_a_trial_reads_its_setup_from_the_ledger_record(tmp_path):
    (tmp_path / "recipe.py").write_text("X = 1\n")
    provenance = trial_provenance(["recipe.py"], tmp_path, "data", {"grit": True})
    trial = trial_from_record({**_record("test", "pure_grit", 1, None), "provenance": provenance})
    assert trial.setup == provenance["setup"]
    assert trial_from_record(_record("test", "pure_grit", 1, None)).setup is None      # older ledgers


def test_the_report_refuses_to_compare_test_runs_of_two_setups_and_names_both(tmp_path):
    trials = [trial_from_record(r) for r in (
        _record("tune", "pure_grit", 0, "aaaaaaaaaaaa"),        # tuning of other code: reported, not compared
        _record("test", "pure_grit", 1, "bbbbbbbbbbbb"), _record("test", "peft_lora", 1, "bbbbbbbbbbbb"),
        _record("test", "peft_lora", 2, None))]
    assert compared_setup(trials) == "bbbbbbbbbbbb"
    line = provenance_line(trials)
    assert "tune: `aaaaaaaaaaaa` (1 trials)" in line and "`bbbbbbbbbbbb` (2 trials)" in line and "not recorded" in line

    mixed = [*trials, trial_from_record(_record("test", "peft_lora", 3, "cccccccccccc"))]
    with pytest.raises(ProvenanceError, match="bbbbbbbbbbbb.*cccccccccccc"):
        compared_setup(mixed)
    params = SimpleNamespace(study=SimpleNamespace(methods=["pure_grit", "peft_lora"], steps=[200]))
    with pytest.raises(ProvenanceError, match="pure_grit at 200 steps was trained with setup bbbbbbbbbbbb"):
        write_report(tmp_path / "report", tmp_path / "study.json", params, mixed, {}, [], 0.0, "run")
    assert not (tmp_path / "report").exists()


def test_the_report_refuses_probes_of_two_probe_codes(tmp_path):
    """Probe runs load probe code no tuning or test run loads: a fix to it re-runs every probe,
    and a ledger holding probes of both codes is refused before anything is written."""
    tests = [trial_from_record(_record("test", m, 1, "bbbbbbbbbbbb")) for m in ("pure_grit", "peft_lora")]
    probes = [trial_from_record(_record("probe", m, 0, "dddddddddddd")) for m in ("pure_grit", "grit_paper")]
    assert probed_setup([*tests, *probes]) == "dddddddddddd"
    mixed = [*tests, *probes, trial_from_record(_record("probe", "riemannian_lora", 0, "eeeeeeeeeeee"))]
    with pytest.raises(ProvenanceError, match="the probe of pure_grit at 200 steps .*dddddddddddd.*eeeeeeeeeeee"):
        probed_setup(mixed)
    params = SimpleNamespace(study=SimpleNamespace(methods=["pure_grit", "peft_lora"], steps=[200]))
    with pytest.raises(ProvenanceError, match="eeeeeeeeeeee"):
        write_report(tmp_path / "report", tmp_path / "study.json", params, mixed, {}, [], 0.0, "run")
    assert not (tmp_path / "report").exists()


def test_the_study_page_lists_the_ledger_s_probes_of_one_probe_code():
    def probe(method: str, setup: str, effective: float, cosine: float) -> dict:
        return {**_record("probe", method, 0, setup), "metrics": {
            "effective": effective, "update_cosine_median": cosine, "scalar_twin_cosine_median": cosine + 0.001,
            "update_relative_difference_median": 0.25}}

    header = {"key": "k"}
    records = [_record("test", "pure_grit", 1, "bbbbbbbbbbbb"), probe("pure_grit", "dddddddddddd", 1.0, 0.638),
               probe("grit_paper", "dddddddddddd", 0.0, 0.984)]
    table = ledger_probes(header, records)
    row = "| pure_grit, 200 steps | learning_rate 0.0001 | effective | 0.638 | 0.639 | 0.25 | `dddddddddddd` |"
    assert row in table
    assert "| grit_paper, 200 steps | learning_rate 0.0001 | inert | 0.984 | 0.985 | 0.25 |" in table
    assert ledger_probes(header, records[:1]) == "No chosen setting has been probed yet."
    assert tuple(PROBE_COLUMNS) == PROBE_FIGURES           # the table shows what a probe run keeps
    assert "twin vs control" not in table, "a column no probe recorded is left out"
    later = [*records[:2], {**records[1], "metrics": {**records[1]["metrics"], "twin_control_cosine_median": 0.9991}}]
    assert "| twin vs control |" in ledger_probes(header, later) and "| 0.999 |" in ledger_probes(header, later)
    with pytest.raises(ProvenanceError, match="dddddddddddd.*eeeeeeeeeeee"):
        ledger_probes(header, [*records, probe("riemannian_lora", "eeeeeeeeeeee", 0.0, 0.98)])
