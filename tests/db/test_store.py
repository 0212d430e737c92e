"""Results store: schema via Alembic, idempotent replacement, concurrent writers, killed writers."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import event, func, inspect, select

from db.models import EvalMetric, Run, TrainMetric
from db.store import MIGRATIONS_DIR, create_store_engine, open_store, upgrade_schema, utcnow

WRITERS, ROWS_PER_WRITER = 8, 100
HEAD = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()      # the newest revision


def _run(run_id: str) -> Run:
    return Run(id=run_id, git_revision=None, params_hash="h", params_json="{}", profile="test",
               host="host", device="cpu", started_at=utcnow())


def test_schema_is_created_by_alembic_and_migration_is_idempotent(store_url: str, tmp_path: Path):
    store = open_store(store_url)
    open_store(store_url)  # a second open is a no-op migration
    tables = set(inspect(store.engine).get_table_names())
    assert {"runs", "stage_runs", "variants", "train_metrics", "probe_results", "eval_metrics",
            "speed_metrics", "artifacts", "alembic_version"} <= tables
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    if store.engine.dialect.name == "sqlite":       # the SQLite-only settings, on SQLite only
        with sqlite3.connect(tmp_path / "store.db") as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_replace_rows_is_idempotent_and_scoped(store_url: str):
    store = open_store(store_url)
    store.start_run(_run("r1"))
    rows = [{"metric": "aqi", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 150}]
    for _ in range(3):
        with store.transaction() as session:
            store.replace_rows(session, EvalMetric, "r1", rows, variant="pure_grit", seed=0)
    with store.transaction() as session:
        store.replace_rows(session, EvalMetric, "r1", rows, variant="base", seed=0)
    with store.reader() as session:
        variants = session.scalars(select(EvalMetric.variant).order_by(EvalMetric.variant)).all()
    assert variants == ["base", "pure_grit"]


def _writer(url: str, worker: int, barrier) -> None:
    store = open_store(url)
    barrier.wait()
    for step in range(ROWS_PER_WRITER):
        with store.transaction() as session:
            session.add(TrainMetric(run_id="shared", variant=f"w{worker}", seed=0, step=step, loss=1.0))


def test_eight_concurrent_writers_lose_no_row(store_url: str):
    url = store_url
    open_store(url).start_run(_run("shared"))
    context = mp.get_context("spawn")
    barrier = context.Barrier(WRITERS)
    workers = [context.Process(target=_writer, args=(url, i, barrier)) for i in range(WRITERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * WRITERS, "a writer failed (database is locked?)"
    store = open_store(url)
    with store.reader() as session:
        total = session.scalar(select(func.count()).select_from(TrainMetric))
        per_worker = dict(session.execute(
            select(TrainMetric.variant, func.count()).group_by(TrainMetric.variant)).all())
    assert total == WRITERS * ROWS_PER_WRITER
    assert per_worker == {f"w{i}": ROWS_PER_WRITER for i in range(WRITERS)}


def test_concurrent_first_open_migrates_once(store_url: str):
    url = store_url
    context = mp.get_context("spawn")
    openers = [context.Process(target=open_store, args=(url,)) for _ in range(4)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join(timeout=120)
    assert [o.exitcode for o in openers] == [0] * 4
    with open_store(url, migrate=False).engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [HEAD]


def test_upgrade_from_empty_is_one_locked_transaction(tmp_path: Path):
    # Per-migration commits let a second opener read the revision between two migrations and
    # re-run the later one; the whole upgrade must commit once, after taking the write lock.
    engine = create_store_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    statements: list[str] = []
    commits: list[int] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_: statements.append(statement.strip().split("\n")[0]))
    event.listen(engine, "commit", lambda _c: commits.append(len(statements)))
    upgrade_schema(engine)
    first_begin = statements.index("BEGIN IMMEDIATE")
    assert statements.count("BEGIN IMMEDIATE") == 1 and len(commits) == 1
    assert not any("alembic_version" in s for s in statements[:first_begin])
    assert inspect(engine).has_table("comparisons")


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from db.models import Run, TrainMetric
    from db.store import MIGRATIONS_DIR, create_store_engine, open_store, upgrade_schema, utcnow
    store = open_store(sys.argv[1])
    with store.transaction() as session:
        session.add(Run(id="partial", git_revision=None, params_hash="h", params_json="{}",
                        profile="t", host="h", device="cpu", started_at=utcnow()))
        session.flush()
        session.add_all([TrainMetric(run_id="partial", variant="v", seed=0, step=i, loss=1.0)
                         for i in range(1000)])
        session.flush()
        print("IN-TRANSACTION", flush=True)
        time.sleep(120)
""")


def test_killed_writer_leaves_no_partial_run(store_url: str, tmp_path: Path, repo_root: Path):
    url = store_url
    store = open_store(url)
    store.start_run(_run("kept"))
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, url], cwd=repo_root, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    assert writer.stdout.readline().strip() == "IN-TRANSACTION"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    time.sleep(0.2)
    reopened = open_store(url)
    with reopened.reader() as session:
        run_ids = session.scalars(select(Run.id)).all()
        metrics = session.scalar(select(func.count()).select_from(TrainMetric))
    assert run_ids == ["kept"] and metrics == 0
    if reopened.engine.dialect.name == "sqlite":
        with sqlite3.connect(tmp_path / "store.db") as raw:
            assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    reopened.start_run(_run("after-kill"))  # the lock was released: writing works again


def test_migrations_match_the_orm_models(store_url: str):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from db.models import Base

    store = open_store(store_url)
    with store.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models changed without an Alembic revision: {diff}"


def test_a_store_from_before_holm_upgrades_in_place_and_keeps_its_rows(tmp_path: Path):
    """A results store at revision 0002 (no p_adjusted) is migrated on open, rows intact."""
    import sqlite3

    url = store_at_revision(tmp_path, "0002")
    with sqlite3.connect(tmp_path / "old.db") as raw:
        raw.execute("INSERT INTO comparisons (run_id, metric, variant, reference, seed, delta, p_value, test, "
                    "significant, n) VALUES ('r', 'refusal_rate', 'v', 'base', 0, 0.1, 0.01, 'exact McNemar', 1, 50)")
    open_store(url)
    with sqlite3.connect(tmp_path / "old.db") as raw:
        row = raw.execute("SELECT delta, p_value, p_adjusted FROM comparisons").fetchone()
        assert row == (0.1, 0.01, None)
        assert raw.execute("SELECT version_num FROM alembic_version").fetchone()[0] == HEAD


def test_a_store_from_before_the_steps_rename_keeps_its_study_trials(tmp_path: Path):
    """study_trials.budget (revision 0004) becomes steps on open, every row and the uniqueness kept."""
    import sqlite3

    url = store_at_revision(tmp_path, "0004")
    with sqlite3.connect(tmp_path / "old.db") as raw:
        raw.execute("INSERT INTO study_trials (run_id, phase, method, budget, seed, setting, val_loss, curve_json, "
                    "metrics_json, train_seconds) VALUES ('r', 'tune', 'peft_lora', 32, 42, '{}', 0.7, '[]', '{}', 9)")
    open_store(url)
    with sqlite3.connect(tmp_path / "old.db") as raw:
        assert raw.execute("SELECT method, steps, seed, val_loss FROM study_trials").fetchall() == [
            ("peft_lora", 32, 42, 0.7)]
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute("INSERT INTO study_trials (run_id, phase, method, steps, seed, setting, curve_json, "
                        "metrics_json, train_seconds) VALUES ('r', 'tune', 'peft_lora', 32, 42, '{}', '[]', '{}', 9)")


def store_at_revision(tmp_path: Path, revision: str) -> str:
    """A results store ``old.db`` migrated up to ``revision`` only, holding one complete run ``r``."""
    import sqlite3

    from alembic import command

    from db.store import alembic_config, create_store_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(create_store_engine(url)), revision)
    with sqlite3.connect(tmp_path / "old.db") as raw:
        raw.execute("INSERT INTO runs (id, params_hash, params_json, profile, host, device, started_at, status) "
                    "VALUES ('r', 'h', '{}', 'default', 'host', 'cpu', '2026-11-22 00:00:00', 'complete')")
    return url


def test_the_plans_results_table_is_a_view_over_the_recorded_figures(store_url: str):
    """The seed plan's ``evaluation_results`` query runs on the store (revision 0007): each model's
    AQI-style index and decode speed, and their differences to the base model of the same run."""
    from sqlalchemy import text

    from db.models import SpeedMetric

    store = open_store(store_url)
    store.start_run(_run("r1"))
    figures = {"base": (0.50, 100.0, 1.0), "pure_grit": (0.56, 90.0, 0.9), "baseline_lora": (0.47, 101.0, 1.01)}
    with store.transaction() as session:
        for variant, (aqi, decode, ratio) in figures.items():
            store.replace_rows(session, EvalMetric, "r1", [
                {"metric": "aqi", "value": aqi, "ci_low": None, "ci_high": None, "n": 100},
                {"metric": "sampled_refusal_rate", "value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": 100}],
                variant=variant, seed=42)
            store.replace_rows(session, SpeedMetric, "r1", [
                {"backend": "llama.cpp side by side", "metric": "decode_tokens_per_second", "value": decode, "n": 5},
                {"backend": "llama.cpp side by side", "metric": "delta_speed_decode", "value": ratio, "n": 5},
                {"backend": "train", "metric": "decode_tokens_per_second", "value": 1.0, "n": None}],
                variant=variant, seed=42)
    store.record_stage("r1", "evaluate", "succeeded", utcnow())
    with store.engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT model_name, aqi_accuracy, delta_aqi, inference_speed, delta_speed, speed_ratio, refusal_rate, "
            "timestamp FROM evaluation_results ORDER BY model_name")).all()
    assert [r.model_name for r in rows] == ["base", "baseline_lora", "pure_grit"]
    by_name = {r.model_name: r for r in rows}
    assert by_name["base"].delta_aqi == 0.0 and by_name["base"].delta_speed == 0.0
    assert by_name["pure_grit"].delta_aqi == pytest.approx(0.06) and by_name["pure_grit"].delta_speed == -10.0
    assert by_name["baseline_lora"].inference_speed == 101.0 and by_name["baseline_lora"].speed_ratio == 1.01
    assert all(r.refusal_rate == 0.8 and r.timestamp is not None for r in rows)


def test_the_postgresql_server_lives_outside_pytests_private_temp_root(postgres_server):
    """Another pytest process makes /tmp/pytest-of-<user> private (0700); the server, running as
    its own user, must not keep its data below it (tests/conftest.py::postgres_server)."""
    assert "pytest-of-" not in str(postgres_server.pgdata)
