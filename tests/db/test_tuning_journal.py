"""Optuna's journal in the results store: a study written through one storage object is read
back whole through another (as by a second worker process), a resumed study continues, and each
study keeps a journal of its own."""

from __future__ import annotations

from pathlib import Path

import optuna

from db.store import open_store
from db.tuning_journal import StoreJournal, journal_logs, journals_under


def storage(url: str, name: str) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(StoreJournal(open_store(url), name))


def test_a_study_in_the_store_is_read_back_and_resumed_by_another_storage(tmp_path: Path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name = f"sqlite:///{tmp_path / 'store.db'}", "key/peft_lora/32"
    first = optuna.create_study(study_name=name, storage=storage(url, name),
                                sampler=optuna.samplers.TPESampler(seed=0), direction="minimize")
    first.optimize(lambda t: (t.suggest_float("learning_rate", 1e-4, 1e-2, log=True) - 1e-3) ** 2, n_trials=5)
    pruned = first.ask()
    pruned.report(3.0, 2)
    first.tell(pruned, state=optuna.trial.TrialState.PRUNED)

    again = optuna.load_study(study_name=name, storage=storage(url, name))     # a fresh reader
    assert [t.params for t in again.trials] == [t.params for t in first.trials]
    assert again.best_value == first.best_value
    assert again.trials[-1].state == optuna.trial.TrialState.PRUNED and again.trials[-1].intermediate_values == {2: 3.0}
    again.optimize(lambda t: t.suggest_float("learning_rate", 1e-4, 1e-2, log=True), n_trials=2)
    assert len(optuna.load_study(study_name=name, storage=storage(url, name)).trials) == 8


def test_each_study_has_a_journal_of_its_own(tmp_path: Path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    for name in ("key/peft_lora/32", "key/pure_grit/32", "other/peft_lora/32"):
        optuna.create_study(study_name=name, storage=storage(url, name)).optimize(
            lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    store = open_store(url)
    # Each journal holds one study, so it replays alone (numbered study 0, wherever it goes).
    for name in ("key/peft_lora/32", "key/pure_grit/32"):
        assert [s.study_name for s in optuna.get_all_study_summaries(storage(url, name))] == [name]
    assert set(journals_under(store, "key/")) == {"key/peft_lora/32", "key/pure_grit/32"}
    assert journals_under(store, "key/")["key/pure_grit/32"] == journal_logs(store, "key/pure_grit/32")
    assert journals_under(store, "key_") == {}           # a prefix is a prefix, not a LIKE pattern
