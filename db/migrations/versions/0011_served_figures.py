"""served_figures: each model's greedy replies through a second serving backend (Ollama), per
served form: the served metrics, their agreement with llama.cpp's replies and the backend's own
speed (issue 64).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 04:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('served_figures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('variant', sa.String(length=64), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('backend', sa.String(length=32), nullable=False),
    sa.Column('form', sa.String(length=16), nullable=False),
    sa.Column('metric', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('ci_low', sa.Float(), nullable=True),
    sa.Column('ci_high', sa.Float(), nullable=True),
    sa.Column('n', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'variant', 'seed', 'backend', 'form', 'metric')
    )
    with op.batch_alter_table('served_figures', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_served_figures_run_id'), ['run_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('served_figures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_served_figures_run_id'))
    op.drop_table('served_figures')
