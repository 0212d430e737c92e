"""train_metrics: GRIT's counters per step, as the GRIT paper logs them: inverses computed,
gradients preconditioned, capture coverage, and on a reprojection's step the ranks kept and the
share of the eigen-energy they keep. Rows written before this revision keep them empty.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 12:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

COLUMNS = (("inversions", sa.Integer()), ("preconditioned_tensors", sa.Integer()),
           ("capture_coverage", sa.Float()), ("rank_min", sa.Integer()), ("rank_median", sa.Integer()),
           ("rank_max", sa.Integer()), ("kept_energy_median", sa.Float()))


def upgrade() -> None:
    with op.batch_alter_table('train_metrics', schema=None) as batch_op:
        for name, kind in COLUMNS:
            batch_op.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('train_metrics', schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
