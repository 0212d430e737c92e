"""Optuna's journal in the results store: a study written through one storage object is read
back whole through another (as by a second worker process), a resumed study continues, and each
study keeps a journal of its own; on SQLite and on PostgreSQL, where several writers append at once
and a reader must never see a later log before an earlier one."""

from __future__ import annotations

import multiprocessing as mp

import optuna

from db.store import open_store
from db.tuning_journal import StoreJournal, append_journal, journal_logs, journals_under


def storage(url: str, name: str) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(StoreJournal(open_store(url), name))


def test_a_study_in_the_store_is_read_back_and_resumed_by_another_storage(store_url: str):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name = store_url, "key/peft_lora/32"
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


def test_each_study_has_a_journal_of_its_own(store_url: str):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = store_url
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


APPENDERS, APPENDS, LOGS_PER_APPEND = 4, 25, 20


def _append(url: str, worker: int, barrier) -> None:
    store = open_store(url)
    barrier.wait()
    for append in range(APPENDS):
        logs = [{"worker": worker, "append": append, "log": i} for i in range(LOGS_PER_APPEND)]
        append_journal(store, "shared", logs)


def _watch(url: str, barrier, snapshots) -> None:
    journal = StoreJournal(open_store(url), "shared")
    barrier.wait()
    total = APPENDERS * APPENDS * LOGS_PER_APPEND
    while True:
        seen = [(log["worker"], log["append"], log["log"]) for log in journal.read_logs(0)]
        snapshots.append(seen)
        if len(seen) == total:
            return


def test_concurrent_appends_are_read_in_one_order_that_only_grows(store_url: str):
    """Optuna reads a journal by position (log n is the n-th row): a reader that saw a later
    append before an earlier one committed would skip the earlier one for good. Every snapshot a
    reader takes while four writers append must be a prefix of the final journal."""
    open_store(store_url)
    context = mp.get_context("spawn")
    barrier, snapshots = context.Barrier(APPENDERS + 1), context.Manager().list()
    workers = [context.Process(target=_append, args=(store_url, i, barrier)) for i in range(APPENDERS)]
    workers.append(context.Process(target=_watch, args=(store_url, barrier, snapshots)))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * (APPENDERS + 1)
    final = [(log["worker"], log["append"], log["log"]) for log in journal_logs(open_store(store_url), "shared")]
    assert len(final) == len(set(final)) == APPENDERS * APPENDS * LOGS_PER_APPEND
    assert len(snapshots) > 1
    assert all(final[:len(seen)] == seen for seen in snapshots), "a reader saw a later log before an earlier one"
