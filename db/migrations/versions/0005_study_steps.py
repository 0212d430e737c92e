"""study_trials.budget -> steps (a trial's run length, named as params name it: study.steps), and
tuning_journal (Optuna's journal of the study's tuning, kept in the results store)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 01:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study_trials', schema=None) as batch_op:
        batch_op.alter_column('budget', new_column_name='steps')
    op.create_table(
        'tuning_journal',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('log_json', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('tuning_journal')
    with op.batch_alter_table('study_trials', schema=None) as batch_op:
        batch_op.alter_column('steps', new_column_name='budget')
