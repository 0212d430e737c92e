"""Optuna's journal, kept in the results store (``tuning_journal``), so the study's tuning lives
in the one database every stage writes, and several processes (or machines sharing the store)
can run trials of one Optuna study: Optuna's ``JournalStorage`` replays the log, and every
append is one transaction, which the database serialises.

    storage = optuna.storages.JournalStorage(StoreJournal(store))
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from optuna.storages.journal import BaseJournalBackend
from sqlalchemy import select

from db.models import TuningJournal
from db.store import ResultsStore


class StoreJournal(BaseJournalBackend):
    """Optuna's journal backend on the ``tuning_journal`` table: log number n is the n-th row in
    insertion order (``id`` order; numbering by position, so a gap in ids cannot shift it)."""

    def __init__(self, store: ResultsStore) -> None:
        self.store = store

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        with self.store.reader() as session:
            rows = session.scalars(select(TuningJournal.log_json).order_by(TuningJournal.id)
                                   .offset(log_number_from)).all()
        return iter([json.loads(row) for row in rows])

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self.store.transaction() as session:
            session.add_all([TuningJournal(log_json=json.dumps(log)) for log in logs])
