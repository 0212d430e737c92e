"""The results store: one SQLAlchemy engine, Alembic-managed schema, transactional writes.

Guarantees the pipeline relies on:

- *Transactional*: every write goes through :meth:`ResultsStore.transaction`; a writer killed
  mid-transaction leaves nothing behind (SQLite rolls the journal back on next open).
- *Idempotent*: :meth:`ResultsStore.replace_rows` deletes a run's rows for a scope and inserts
  the new ones in the same transaction, so re-running a stage never duplicates.
- *Concurrent writers*: SQLite runs in WAL mode with a busy timeout, and write transactions
  start with ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of failing with
  "database is locked" when a reader upgrades to a writer. PostgreSQL (``postgresql+psycopg://``,
  the store several machines share) needs none of that; the few writes whose order matters
  (Optuna's journal, the schema upgrade) take a lock of their own (:func:`serialise`).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Engine, create_engine, delete, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.errors import UserError
from core.files import sha256_file
from db.config import scrubbed, shown
from db.models import Artifact, Base, Run, StageRun

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000


class StoreError(UserError):
    """A user-fixable problem with the results store; its message is one line."""


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from the sqlite3 module so our BEGIN IMMEDIATE is the only one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    _enter_wal(cursor)
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _enter_wal(cursor: Any) -> None:
    """Switch the file to WAL (it stays so); retried, because SQLite answers a switch that races
    another opener's switch with "database is locked" at once, without waiting the busy timeout
    (seen when several processes open a new store together)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _is_uri(parsed) -> bool:
    """``sqlite:///file:x.db?mode=ro&uri=true``: SQLite's URI form, with its options."""
    return parsed.query.get("uri") in ("true", "1")


def sqlite_file(url: str, root: Path | None = None) -> Path:
    """The file a SQLite URL names, a relative path taken relative to ``root`` (default: cwd);
    a URI-style database names the file after ``file:``. An in-memory store is an error."""
    parsed = make_url(url)
    if parsed.database in (None, "", ":memory:"):
        raise StoreError(f"store url {shown(url)!r}: an in-memory SQLite store cannot be shared; give a file")
    name = parsed.database
    if _is_uri(parsed) and name.startswith("file:"):
        name = name.removeprefix("file:")
    path = Path(name)
    return path if path.is_absolute() else (root or Path.cwd()) / path


def _first_line(error: BaseException, url: str) -> str:
    """The first line of ``error``'s message, any password of ``url`` in it replaced by ``***``."""
    return scrubbed((str(error).strip().splitlines() or [type(error).__name__])[0], url)


def _can_make_folder_in(folder: Path) -> bool:
    """Whether a folder can really be made in ``folder`` (tried, then removed): permission bits
    do not say it for root, nor for a folder such as /proc, where nothing can be made."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".store-check-", dir=folder))
    except OSError:
        return False
    return True


def check_store_writable(url: str, root: Path | None = None) -> None:
    """Raise :class:`StoreError` (one line) when results could not be recorded at ``url``: a
    malformed URL or unknown dialect, a directory that cannot hold the file, a store that opens
    read-only. Creates nothing, so a stage can call it before any work."""
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except Exception as error:  # noqa: BLE001 - ArgumentError, NoSuchModuleError, ImportError
        raise StoreError(f"store.url {shown(url)!r} is not a usable SQLAlchemy URL ({_first_line(error, url)}); "
                         "for example sqlite:///outputs/centralized.db") from None
    if parsed.get_backend_name() != "sqlite":
        _check_server_writable(url)
        return
    path = sqlite_file(url, root)
    if not path.exists():
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK) or not _can_make_folder_in(folder):
            raise StoreError(f"cannot create the results store {path}: {folder} is not a writable directory; "
                             "fix store.url or the folder's permissions")
        return
    if not path.is_file():
        raise StoreError(f"the results store {path} is not a file; fix store.url")
    problem = _write_problem(create_store_engine(url, root), url)
    if problem:
        raise StoreError(f"the results store {path} cannot be written ({problem}); fix its permissions or store.url")


def _check_server_writable(url: str) -> None:
    """A database server's store: reachable, and a table can be made (then rolled back)."""
    problem = _write_problem(create_store_engine(url), url)
    if problem:
        raise StoreError(f"store.url: cannot write to {shown(server_url(url).render_as_string(hide_password=False))} "
                         f"({problem})")


def _write_problem(engine: Engine, url: str) -> str | None:
    """Why nothing can be written through ``engine`` (one line), or None: a table is made, then
    rolled back (BEGIN IMMEDIATE succeeds on a read-only SQLite file; only a real write tells)."""
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("CREATE TABLE _grit_write_probe (x INTEGER)")
            connection.rollback()
    except Exception as error:  # noqa: BLE001 - any driver's connection or permission error
        return _first_line(error, url)
    finally:
        engine.dispose()
    return None


def server_url(url: str) -> URL:
    """``url`` with the driver the project installs: plain ``postgresql://`` means psycopg 3 here
    (SQLAlchemy would look for psycopg2, which is not installed)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg") if parsed.drivername == "postgresql" else parsed


def create_store_engine(url: str, root: Path | None = None) -> Engine:
    """Engine for ``url``; a relative SQLite path is taken relative to ``root`` (default: cwd)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(server_url(url), pool_pre_ping=True)
    path = sqlite_file(url, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        parsed.set(database=f"file:{path}" if _is_uri(parsed) else str(path)),
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin_immediate)
    return engine


def serialise(session: Session, table: str) -> None:
    """Make this transaction's writes to ``table`` wait for every other writer's, so rows commit
    in the order their ids were given (Optuna's journal is read by position). SQLite's BEGIN
    IMMEDIATE already serialises every writer; PostgreSQL takes a table lock that readers pass."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"))


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (a no-op when already there)."""
    command.upgrade(alembic_config(engine), "head")


class ResultsStore:
    """Typed access to the results store; open it with :func:`open_store`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One atomic unit of work: commits on success, rolls back on any exception."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def reader(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    def start_run(self, run: Run) -> None:
        """Create the run, or refresh its provenance if it exists (rows of other stages stay)."""
        with self.transaction() as session:
            existing = session.get(Run, run.id)
            if existing is None:
                session.add(run)
                return
            for field in ("git_revision", "params_hash", "params_json", "profile", "host", "device"):
                setattr(existing, field, getattr(run, field))
            existing.status = "running"
            existing.finished_at = None

    def replace_rows(
        self, session: Session, model: type[Base], run_id: str, rows: Iterable[Mapping[str, Any]],
        **scope: Any,
    ) -> int:
        """Delete ``model`` rows of ``run_id`` matching ``scope``, then insert ``rows``.

        Call inside :meth:`transaction` so the delete and the insert commit together.
        """
        condition = [model.run_id == run_id] + [getattr(model, k) == v for k, v in scope.items()]
        session.execute(delete(model).where(*condition))
        objects = [model(run_id=run_id, **scope, **row) for row in rows]
        session.add_all(objects)
        session.flush()
        return len(objects)

    def record_stage(
        self, run_id: str, stage: str, status: str, started_at: datetime,
        error: str | None = None,
    ) -> None:
        finished = utcnow()
        with self.transaction() as session:
            session.merge(StageRun(
                run_id=run_id, stage=stage, status=status, started_at=started_at,
                finished_at=finished, duration_s=(finished - started_at).total_seconds(),
                error=error,
            ))

    def record_artifacts(self, run_id: str, stage: str, files: Mapping[str, Path]) -> None:
        """Record (replace) the files a stage produced with their sha256 and size."""
        rows = [
            {"name": name, "path": str(path), "sha256": sha256_file(path),
             "size_bytes": path.stat().st_size}
            for name, path in files.items()
        ]
        with self.transaction() as session:
            self.replace_rows(session, Artifact, run_id, rows, stage=stage)

    def runs(self) -> list[Run]:
        with self.reader() as session:
            return list(session.scalars(select(Run).order_by(Run.started_at)))

    def stages(self, run_id: str) -> dict[str, StageRun]:
        with self.reader() as session:
            rows = session.scalars(select(StageRun).where(StageRun.run_id == run_id))
            return {row.stage: row for row in rows}


def open_store(url: str, root: Path | None = None, migrate: bool = True) -> ResultsStore:
    """Open (creating and migrating if needed) the store at ``url``."""
    engine = create_store_engine(url, root)
    if migrate:
        try:
            upgrade_schema(engine)
        except Exception as error:  # noqa: BLE001 - reported as one line at the edge
            raise StoreError(
                f"results store {shown(url)!r} could not be opened or migrated: {_first_line(error, url)}"
            ) from error
    return ResultsStore(engine)


def default_host() -> str:
    return os.uname().nodename
