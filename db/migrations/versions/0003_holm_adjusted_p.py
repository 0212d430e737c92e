"""comparisons.p_adjusted: the Holm-adjusted p-value over the run's family of comparisons

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 00:20:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.add_column(sa.Column('p_adjusted', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.drop_column('p_adjusted')
