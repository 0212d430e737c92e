"""Study workers' claims on the parts of a study (``study_claims``).

A part (one method at one run length: its tuning, selection and test runs) is run by one worker
at a time. A worker claims a part nobody holds, beats while it runs it, and marks it done; a part
whose worker has not beaten for ``stale_after`` seconds (the worker was killed, or its machine
went away) is claimed by the next worker that looks, which resumes it from the store. Claims are
taken in a serialised transaction, so two workers never both win one part, on SQLite or on a
PostgreSQL store that several machines share. The same claims serve a part's fixed runs (its
finalist and test runs, one claim each), so that idle workers share them.
"""

from __future__ import annotations

import threading
from typing import Self

from sqlalchemy import delete, select, update

from db.models import StudyClaim
from db.store import ResultsStore, serialise, utcnow


def claim_part(store: ResultsStore, run_id: str, part: str, worker: str, stale_after: float) -> bool:
    """Whether ``worker`` now holds ``part`` (a part of the study or one of its runs): nobody held
    it, it held it already, or its holder stopped beating ``stale_after`` seconds ago. A done part
    is never claimed again."""
    now = utcnow()
    with store.transaction() as session:
        serialise(session, StudyClaim.__tablename__)
        held = session.get(StudyClaim, (run_id, part))
        if held is None:
            session.add(StudyClaim(run_id=run_id, part=part, worker=worker, claimed_at=now, heartbeat_at=now))
            return True
        if held.done_at is not None:
            return False
        if held.worker != worker and (now - held.heartbeat_at).total_seconds() <= stale_after:
            return False
        held.worker, held.claimed_at, held.heartbeat_at = worker, now, now
        return True


def beat(store: ResultsStore, run_id: str, part: str, worker: str) -> bool:
    """Say ``worker`` is alive on ``part``; False when another worker has taken it over."""
    with store.transaction() as session:
        moved = session.execute(update(StudyClaim).where(
            StudyClaim.run_id == run_id, StudyClaim.part == part, StudyClaim.worker == worker,
            StudyClaim.done_at.is_(None)).values(heartbeat_at=utcnow()))
        return moved.rowcount == 1


def finish_part(store: ResultsStore, run_id: str, part: str, worker: str) -> None:
    with store.transaction() as session:
        session.execute(update(StudyClaim).where(StudyClaim.run_id == run_id, StudyClaim.part == part)
                        .values(done_at=utcnow(), worker=worker))


def release_part(store: ResultsStore, run_id: str, part: str, worker: str) -> None:
    """Give ``part`` up, not done (a worker whose sitting ended): the next worker may take it at
    once instead of waiting for the claim to go stale."""
    with store.transaction() as session:
        session.execute(delete(StudyClaim).where(StudyClaim.run_id == run_id, StudyClaim.part == part,
                                                 StudyClaim.worker == worker, StudyClaim.done_at.is_(None)))


def settle_part(store: ResultsStore, run_id: str, part: str, worker: str = "study") -> None:
    """Mark ``part`` done whoever held it (the study stage did its work itself)."""
    claim_part(store, run_id, part, worker, stale_after=float("inf"))
    finish_part(store, run_id, part, worker)


def held_parts(store: ResultsStore, run_id: str, stale_after: float) -> list[str]:
    """The parts a live worker holds: claimed, not done, beaten within ``stale_after`` seconds."""
    now = utcnow()
    with store.reader() as session:
        claims = session.scalars(select(StudyClaim).where(StudyClaim.run_id == run_id,
                                                          StudyClaim.done_at.is_(None))).all()
    return sorted(c.part for c in claims if (now - c.heartbeat_at).total_seconds() <= stale_after)


def open_parts(store: ResultsStore, run_id: str, parts: list[str]) -> list[str]:
    """The parts of ``parts`` not done yet, in the order given."""
    with store.reader() as session:
        done = set(session.scalars(select(StudyClaim.part).where(
            StudyClaim.run_id == run_id, StudyClaim.done_at.is_not(None))))
    return [part for part in parts if part not in done]


class Heartbeat:
    """Beats for ``worker`` on ``part`` every ``every`` seconds in a background thread while the
    ``with`` block runs (the block trains; the thread only writes one row now and then)."""

    def __init__(self, store: ResultsStore, run_id: str, part: str, worker: str, every: float) -> None:
        self.args, self.every = (store, run_id, part, worker), every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {part}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if not beat(*self.args):
                return      # taken over: the other worker redoes what this one has not recorded

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
