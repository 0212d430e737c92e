"""Optuna's journal, kept in the results store (``tuning_journal``), so the study's tuning lives
in the one database every stage writes, and several processes (or machines sharing the store)
can run trials of one Optuna study: Optuna's ``JournalStorage`` replays the log, and every
append is one transaction, which the database serialises.

    storage = optuna.storages.JournalStorage(StoreJournal(store, "key/peft_lora/32"))

Each Optuna study has a journal of its own (the rows of its name). Optuna numbers studies by
their order in a journal, so a shared journal could not take one study's log from elsewhere;
a journal of one study replays alone, which lets the study carry a tuning to a later sitting
through its committed ledger (``db/study_ledger.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from optuna.storages.journal import BaseJournalBackend
from sqlalchemy import select

from db.models import TuningJournal
from db.store import ResultsStore, serialise


def journal_logs(store: ResultsStore, tuning: str) -> list[dict[str, Any]]:
    """The journal of the Optuna study ``tuning``, in the order appended (log number n is the
    n-th row in ``id`` order: numbering by position, so a gap in ids cannot shift it)."""
    with store.reader() as session:
        rows = session.scalars(select(TuningJournal.log_json).where(TuningJournal.tuning == tuning)
                               .order_by(TuningJournal.id)).all()
    return [json.loads(row) for row in rows]


def journals_under(store: ResultsStore, prefix: str) -> dict[str, list[dict[str, Any]]]:
    """Every journal whose study name starts with ``prefix``, by name."""
    with store.reader() as session:
        rows = session.execute(select(TuningJournal.tuning, TuningJournal.log_json)
                               .where(TuningJournal.tuning.startswith(prefix, autoescape=True))
                               .order_by(TuningJournal.id)).all()
    logs: dict[str, list[dict[str, Any]]] = {}
    for tuning, log in rows:
        logs.setdefault(tuning, []).append(json.loads(log))
    return logs


def append_journal(store: ResultsStore, tuning: str, logs: list[dict[str, Any]]) -> None:
    with store.transaction() as session:
        serialise(session, TuningJournal.__tablename__)
        session.add_all([TuningJournal(tuning=tuning, log_json=json.dumps(log)) for log in logs])


class StoreJournal(BaseJournalBackend):
    """Optuna's journal backend on the rows of ``tuning_journal`` named ``tuning``."""

    def __init__(self, store: ResultsStore, tuning: str) -> None:
        self.store, self.tuning = store, tuning

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        with self.store.reader() as session:
            rows = session.scalars(select(TuningJournal.log_json).where(TuningJournal.tuning == self.tuning)
                                   .order_by(TuningJournal.id).offset(log_number_from)).all()
        return iter([json.loads(row) for row in rows])

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        append_journal(self.store, self.tuning, logs)
