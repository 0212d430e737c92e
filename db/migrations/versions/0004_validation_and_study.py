"""train_metrics.val_loss (validation loss during training) and study_trials (the fair study)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 04:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('train_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('val_loss', sa.Float(), nullable=True))
    op.create_table(
        'study_trials',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.String(length=64), nullable=False),
        sa.Column('phase', sa.String(length=16), nullable=False),
        sa.Column('method', sa.String(length=64), nullable=False),
        sa.Column('budget', sa.Integer(), nullable=False),
        sa.Column('seed', sa.Integer(), nullable=False),
        sa.Column('setting', sa.String(length=255), nullable=False),
        sa.Column('val_loss', sa.Float(), nullable=True),
        sa.Column('curve_json', sa.Text(), nullable=False),
        sa.Column('metrics_json', sa.Text(), nullable=False),
        sa.Column('train_seconds', sa.Float(), nullable=False),
        sa.Column('tokens_per_second', sa.Float(), nullable=True),
        sa.Column('trainable_parameters', sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('run_id', 'phase', 'method', 'budget', 'seed', 'setting'),
    )
    with op.batch_alter_table('study_trials', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_trials_run_id'), ['run_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('study_trials', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_trials_run_id'))
    op.drop_table('study_trials')
    with op.batch_alter_table('train_metrics', schema=None) as batch_op:
        batch_op.drop_column('val_loss')
