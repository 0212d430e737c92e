"""Alembic environment: runs migrations on the engine handed over by ``db.store``.

Used programmatically (``db.store.upgrade_schema``) and from the command line
(``alembic -c db/alembic.ini upgrade head``, with ``GRIT_STORE_URL`` or the ini's URL).
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import text

from db.models import Base

config = context.config
target_metadata = Base.metadata
# Any fixed number: the advisory lock a PostgreSQL store's schema upgrade holds.
MIGRATION_LOCK = 0x67726974


def _engine():
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    from db.config import STORE_URL_VARIABLE
    from db.store import create_store_engine

    url = os.environ.get(STORE_URL_VARIABLE) or config.get_main_option("sqlalchemy.url")
    return create_store_engine(url)


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
            # Alembic assumes SQLite cannot run DDL in a transaction and so commits each migration
            # on its own, reading the current revision outside any lock: two processes opening a
            # fresh store at once both saw revision 1 and both ran 2 ("table already exists").
            # SQLite's DDL is transactional, and db.store begins every transaction with BEGIN
            # IMMEDIATE, so one transaction for the whole upgrade makes concurrent openers queue
            # and the later ones find the schema already at head.
            transactional_ddl=True,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # PostgreSQL's DDL is transactional too, but two openers do not queue by
                # themselves: a lock held until this transaction ends makes them.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline SQL generation is not supported; run against a database")
run_migrations_online()
