"""study_claims: which study worker holds which part of a study (a method at a run length), so
several workers, on one machine or many sharing the store, split a study and take over the part
of a worker that stopped beating.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 18:40:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'study_claims',
        sa.Column('run_id', sa.String(length=64), nullable=False),
        sa.Column('cell', sa.String(length=128), nullable=False),
        sa.Column('worker', sa.String(length=255), nullable=False),
        sa.Column('claimed_at', sa.DateTime(), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
        sa.Column('done_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'cell'),
    )


def downgrade() -> None:
    op.drop_table('study_claims')
