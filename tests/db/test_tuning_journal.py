"""Optuna's journal in the results store: a study written through one storage object is read
back whole through another (as by a second worker process), and a resumed study continues."""

from __future__ import annotations

from pathlib import Path

import optuna

from db.store import open_store
from db.tuning_journal import StoreJournal


def storage(url: str) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(StoreJournal(open_store(url)))


def test_a_study_in_the_store_is_read_back_and_resumed_by_another_storage(tmp_path: Path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    first = optuna.create_study(study_name="run/peft_lora/32", storage=storage(url),
                                sampler=optuna.samplers.TPESampler(seed=0), direction="minimize")
    first.optimize(lambda t: (t.suggest_float("learning_rate", 1e-4, 1e-2, log=True) - 1e-3) ** 2, n_trials=5)
    pruned = first.ask()
    pruned.report(3.0, 2)
    first.tell(pruned, state=optuna.trial.TrialState.PRUNED)

    again = optuna.load_study(study_name="run/peft_lora/32", storage=storage(url))     # a fresh reader
    assert [t.params for t in again.trials] == [t.params for t in first.trials]
    assert again.best_value == first.best_value
    assert again.trials[-1].state == optuna.trial.TrialState.PRUNED and again.trials[-1].intermediate_values == {2: 3.0}
    again.optimize(lambda t: t.suggest_float("learning_rate", 1e-4, 1e-2, log=True), n_trials=2)
    assert len(optuna.load_study(study_name="run/peft_lora/32", storage=storage(url)).trials) == 8
    other = optuna.create_study(study_name="run/pure_grit/32", storage=storage(url))   # studies share the journal
    assert other.trials == [] and {s.study_name for s in optuna.get_all_study_summaries(storage(url))} == {
        "run/peft_lora/32", "run/pure_grit/32"}
