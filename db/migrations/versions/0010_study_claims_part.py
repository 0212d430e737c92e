"""study_claims: the claimed unit's column is ``part`` (it was ``cell``), the one word the study
uses for a method at a run length (issue 59).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 00:30:00
"""
from __future__ import annotations

from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study_claims', schema=None) as batch_op:
        batch_op.alter_column('cell', new_column_name='part')


def downgrade() -> None:
    with op.batch_alter_table('study_claims', schema=None) as batch_op:
        batch_op.alter_column('part', new_column_name='cell')
