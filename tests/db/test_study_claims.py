"""Study workers' claims: one holder per part, a silent holder's part taken over, a done part
never claimed again; under concurrent claimers exactly one wins, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta

from sqlalchemy import update

from db.models import Run, StudyClaim
from db.store import open_store, utcnow
from db.study_claims import beat, claim_part, finish_part, held_parts, open_parts, release_part, settle_part


def _store(url: str):
    store = open_store(url)
    store.start_run(Run(id="r", git_revision=None, params_hash="h", params_json="{}", profile="test",
                        host="host", device="cpu", started_at=utcnow()))
    return store


def _silence(store, part: str, seconds: float) -> None:
    """As if the holder of ``part`` last beat ``seconds`` ago."""
    with store.transaction() as session:
        session.execute(update(StudyClaim).where(StudyClaim.part == part)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_a_part_has_one_holder_until_it_goes_silent_and_is_never_claimed_once_done(store_url: str):
    store = _store(store_url)
    assert claim_part(store, "r", "peft_lora/32", "a", stale_after=60)
    assert claim_part(store, "r", "peft_lora/32", "a", stale_after=60)        # its own, again
    assert not claim_part(store, "r", "peft_lora/32", "b", stale_after=60)
    assert held_parts(store, "r", stale_after=60) == ["peft_lora/32"]
    _silence(store, "peft_lora/32", 61)
    assert held_parts(store, "r", stale_after=60) == []
    assert claim_part(store, "r", "peft_lora/32", "b", stale_after=60)         # taken over
    assert not beat(store, "r", "peft_lora/32", "a")                           # the old holder learns it
    assert beat(store, "r", "peft_lora/32", "b")
    finish_part(store, "r", "peft_lora/32", "b")
    _silence(store, "peft_lora/32", 3600)
    assert not claim_part(store, "r", "peft_lora/32", "c", stale_after=60)
    assert open_parts(store, "r", ["peft_lora/32", "pure_grit/32"]) == ["pure_grit/32"]
    settle_part(store, "r", "pure_grit/32")
    assert open_parts(store, "r", ["peft_lora/32", "pure_grit/32"]) == []


def test_a_part_given_up_is_free_at_once_and_only_its_holder_gives_it_up(store_url: str):
    store = _store(store_url)
    assert claim_part(store, "r", "peft_lora/32", "a", stale_after=60)
    release_part(store, "r", "peft_lora/32", "b")                              # not b's to give up
    assert held_parts(store, "r", stale_after=60) == ["peft_lora/32"]
    release_part(store, "r", "peft_lora/32", "a")                              # a's sitting ended
    assert held_parts(store, "r", stale_after=60) == [] and open_parts(store, "r", ["peft_lora/32"]) == ["peft_lora/32"]
    assert claim_part(store, "r", "peft_lora/32", "b", stale_after=60)
    finish_part(store, "r", "peft_lora/32", "b")
    release_part(store, "r", "peft_lora/32", "b")                              # a done part stays done
    assert open_parts(store, "r", ["peft_lora/32"]) == []


def _claim(url: str, worker: int, barrier, wins) -> None:
    store = open_store(url)
    barrier.wait()
    for part in range(20):
        if claim_part(store, "r", f"part{part}", f"w{worker}", stale_after=600):
            wins.append((part, worker))


def test_concurrent_claimers_win_each_part_once(store_url: str):
    _store(store_url)
    context = mp.get_context("spawn")
    barrier, wins = context.Barrier(4), context.Manager().list()
    workers = [context.Process(target=_claim, args=(store_url, i, barrier, wins)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * 4
    assert sorted(part for part, _ in wins) == list(range(20))
