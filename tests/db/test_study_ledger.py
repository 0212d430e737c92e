"""The study's ledger carries a study from store to store: it resumes while the study's declared
params keep their values, begins again when one changes, and a tuning it carried resumes in an
empty store exactly where it stopped (trials, pruning state, intermediate values)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from db.store import open_store
from db.study_ledger import changed_values, open_ledger
from db.tuning_journal import StoreJournal, append_journal, journals_under

DECLARED = {"study": {"configurations": 16, "steps": [32, 96]}, "grit": {"damping": 0.001}}


def test_a_field_added_is_no_change_and_a_value_changed_is_named():
    assert changed_values(DECLARED, {**DECLARED, "grit": {"damping": 0.001, "new_field": True}}) == []
    assert changed_values(DECLARED, {**DECLARED, "grit": {"damping": 0.01}}) == ["grit.damping"]
    assert changed_values(DECLARED, {**DECLARED, "study": {"configurations": 16, "steps": [32]}}) == ["study.steps"]


def test_the_ledger_resumes_while_the_declared_params_hold_and_begins_again_when_one_changes(tmp_path: Path):
    folder = tmp_path / "ledger"
    first = open_ledger(folder, DECLARED, data="d1")
    assert first.trials == [] and "new study" in first.note and first.data == "d1"
    first.add_trial({"phase": "tune", "method": "peft_lora", "steps": 32, "seed": 42,
                     "setting": {"learning_rate": 1e-3}})
    first.set_journals({f"{first.key}/peft_lora/32": [{"op_code": 0}]})

    grown = {**DECLARED, "lora": {"r": 16}}                 # a section the stage declares later
    again = open_ledger(folder, {**grown, "grit": {"damping": 0.001, "added": 1}})
    assert again.key == first.key and again.trials == first.trials and again.journals == first.journals
    assert again.declared == DECLARED                        # the key stays the one the study began with
    assert again.data == "d1"                                # and the data it began on

    other = open_ledger(folder, {**DECLARED, "grit": {"damping": 0.1}})
    assert other.key != first.key and other.trials == [] and "grit.damping" in other.note
    assert (folder / "trials.jsonl").read_text() == ""
    assert json.loads((folder / "study.json").read_text())["key"] == other.key


VARIANTS = {"peft_lora": {"engine": "peft", "grit_overrides": {}},
            "grit_paper": {"engine": "peft", "grit_overrides": {"graft_norm": False}}}


def test_an_override_added_to_a_variant_is_a_change():
    old = {"variants": VARIANTS}
    new = {"variants": {**VARIANTS, "grit_paper": {"engine": "peft", "grit_overrides": {
        "graft_norm": False, "damping_mode": "absolute"}}}}
    assert changed_values(old, new) == ["variants.grit_paper.grit_overrides"]


def test_a_changed_variant_begins_that_method_again_and_keeps_the_others(tmp_path: Path):
    folder, declared = tmp_path / "ledger", {**DECLARED, "variants": VARIANTS}
    first = open_ledger(folder, declared, data="d1")
    for method in ("peft_lora", "grit_paper"):
        first.add_trial({"phase": "tune", "method": method, "steps": 32, "seed": 42,
                         "setting": {"learning_rate": 1e-3}})
    old_names = {m: f"{first.tuning(m)}/32" for m in ("peft_lora", "grit_paper")}
    first.set_journals({name: [{"op_code": 0}] for name in old_names.values()})

    absolute = {"engine": "peft", "grit_overrides": {"graft_norm": False, "damping_mode": "absolute"}}
    revised = open_ledger(folder, {**declared, "variants": {**VARIANTS, "grit_paper": absolute}})
    assert revised.key == first.key and revised.data == "d1"
    assert [t["method"] for t in revised.trials] == ["peft_lora"]
    assert set(revised.journals) == {old_names["peft_lora"]}
    assert revised.tuning("peft_lora") == first.tuning("peft_lora")
    assert revised.tuning("grit_paper") != first.tuning("grit_paper")     # no store resumes the old tuning
    assert "grit_paper begin again (1 trials dropped" in revised.note
    # a store that still holds the old variant's tuning does not bring it back into the ledger
    revised.set_journals({**revised.journals, old_names["grit_paper"]: [{"op_code": 0}],
                          f"{revised.tuning('grit_paper')}/32": [{"op_code": 1}]})
    assert set(revised.journals) == {old_names["peft_lora"], f"{revised.tuning('grit_paper')}/32"}

    later = open_ledger(folder, {**declared, "variants": {**VARIANTS, "grit_paper": absolute}})   # the next sitting
    assert later.note.startswith("the ledger holds 1 trials") and later.revisions == revised.revisions
    assert later.journals == revised.journals

    study_wide = {**declared, "variants": {**VARIANTS, "grit_paper": absolute}, "grit": {"damping": 0.1}}
    other = open_ledger(folder, study_wide)
    assert other.key != first.key and other.trials == [] and other.revisions == {}


def test_a_tuning_carried_by_the_ledger_resumes_in_an_empty_store(tmp_path: Path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ledger = open_ledger(tmp_path / "ledger", DECLARED)
    name = f"{ledger.key}/peft_lora/32"

    def objective(trial: optuna.Trial) -> float:
        rate = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        for step in (8, 24):
            trial.report(abs(rate - 1e-3) * step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return abs(rate - 1e-3)

    def tuning(store):
        return optuna.create_study(study_name=name, storage=optuna.storages.JournalStorage(StoreJournal(store, name)),
                                   sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2),
                                   pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=8, reduction_factor=3),
                                   direction="minimize", load_if_exists=True)

    first_store = open_store(f"sqlite:///{tmp_path / 'first.db'}")
    first = tuning(first_store)
    first.optimize(objective, n_trials=6)
    ledger.set_journals(journals_under(first_store, f"{ledger.key}/"))

    carried = open_ledger(tmp_path / "ledger", DECLARED)           # a later sitting, another machine
    second_store = open_store(f"sqlite:///{tmp_path / 'second.db'}")
    append_journal(second_store, name, carried.journals[name])
    resumed = tuning(second_store)
    assert [(t.params, t.state, t.value, t.intermediate_values, t.system_attrs) for t in resumed.trials] == [
        (t.params, t.state, t.value, t.intermediate_values, t.system_attrs) for t in first.trials]
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in resumed.trials)
    resumed.optimize(objective, n_trials=2)
    assert [t.number for t in resumed.trials] == list(range(8))
