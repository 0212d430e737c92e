"""tuning_journal.tuning: each Optuna study keeps its own journal (the rows of its name), so one
tuning's log is self-contained: the study can write it to its committed ledger and replay it into
an empty store in a later sitting (db/study_ledger.py). Rows written before this revision keep no
name; no study reads them again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 07:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tuning_journal', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tuning', sa.String(length=255), nullable=True))
        batch_op.create_index('ix_tuning_journal_tuning', ['tuning'])


def downgrade() -> None:
    with op.batch_alter_table('tuning_journal', schema=None) as batch_op:
        batch_op.drop_index('ix_tuning_journal_tuning')
        batch_op.drop_column('tuning')
