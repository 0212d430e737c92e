"""The seed plan's results table as a view: ``evaluation_results`` has one row per evaluated
model (the base and every variant and seed of a run) with the plan's columns (model_name,
aqi_accuracy, delta_aqi, inference_speed, delta_speed, timestamp) and the refusal and retention
figures beside them, read from ``eval_metrics``, ``speed_metrics`` and ``stage_runs``. A view, not a
table: nothing is written twice, and the plan's queries run unchanged on the store.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 11:30:00
"""
from __future__ import annotations

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# Plain SQL that SQLite and PostgreSQL both read. delta_aqi and delta_speed are differences to the
# base model of the same run (the plan's definitions); speed_ratio is the paired side-by-side ratio
# the pipeline itself judges speed by. Speeds come from the llama.cpp side-by-side measurement only.
EVALUATION_RESULTS = """
CREATE VIEW evaluation_results AS
WITH figures AS (
    SELECT run_id, variant, seed,
           MAX(CASE WHEN metric = 'aqi' THEN value END) AS aqi,
           MAX(CASE WHEN metric = 'sampled_refusal_rate' THEN value END) AS refusal_rate,
           MAX(CASE WHEN metric = 'sampled_overrefusal_rate' THEN value END) AS overrefusal_rate,
           MAX(CASE WHEN metric = 'retention_accuracy' THEN value END) AS retention_accuracy
    FROM eval_metrics GROUP BY run_id, variant, seed
), speeds AS (
    SELECT run_id, variant, seed,
           MAX(CASE WHEN metric = 'decode_tokens_per_second' THEN value END) AS decode,
           MAX(CASE WHEN metric = 'delta_speed_decode' THEN value END) AS ratio
    FROM speed_metrics WHERE backend = 'llama.cpp side by side' GROUP BY run_id, variant, seed
), base AS (
    SELECT f.run_id, MAX(f.aqi) AS aqi, MAX(s.decode) AS decode
    FROM figures f LEFT JOIN speeds s ON s.run_id = f.run_id AND s.variant = f.variant AND s.seed = f.seed
    WHERE f.variant = 'base' GROUP BY f.run_id
)
SELECT f.variant AS model_name, f.run_id AS run_id, f.seed AS seed,
       f.aqi AS aqi_accuracy, f.aqi - b.aqi AS delta_aqi,
       s.decode AS inference_speed, s.decode - b.decode AS delta_speed, s.ratio AS speed_ratio,
       f.refusal_rate AS refusal_rate, f.overrefusal_rate AS overrefusal_rate,
       f.retention_accuracy AS retention_accuracy,
       COALESCE(e.finished_at, r.finished_at, r.started_at) AS "timestamp"
FROM figures f
JOIN runs r ON r.id = f.run_id
LEFT JOIN speeds s ON s.run_id = f.run_id AND s.variant = f.variant AND s.seed = f.seed
LEFT JOIN base b ON b.run_id = f.run_id
LEFT JOIN stage_runs e ON e.run_id = f.run_id AND e.stage = 'evaluate'
WHERE f.aqi IS NOT NULL
"""


def upgrade() -> None:
    op.execute(EVALUATION_RESULTS)


def downgrade() -> None:
    op.execute("DROP VIEW evaluation_results")
