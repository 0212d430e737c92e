"""ORM models of the results store (SQLAlchemy 2.0 typed declarative).

A *run* is one parameter set of the pipeline (its id derives from the validated params), so
re-running a stage for the same params replaces that stage's rows instead of adding new ones.
Every row below a run is deleted with it (ON DELETE CASCADE), so a run is replaced as a whole.
Schema changes go through Alembic (``db/migrations``); never edit a table without a revision.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_STATUSES = ("running", "complete", "failed")


class Base(DeclarativeBase):
    pass


def _run_fk() -> Mapped[str]:
    return mapped_column(String(64), ForeignKey("runs.id", ondelete="CASCADE"), index=True)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    git_revision: Mapped[str | None] = mapped_column(String(64))
    params_hash: Mapped[str] = mapped_column(String(64))
    params_json: Mapped[str] = mapped_column(Text)
    profile: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(16), default="running")


class StageRun(Base):
    """One execution of one DVC stage within a run (the latest one wins)."""

    __tablename__ = "stage_runs"

    run_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    duration_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class Variant(Base):
    """A trained model of a run (``baseline_lora``, ``pure_grit``, ...) or the base model."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("run_id", "name", "seed"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = _run_fk()
    name: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    engine: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(512))
    adapter_path: Mapped[str | None] = mapped_column(String(1024))
    details_json: Mapped[str | None] = mapped_column(Text)


class TrainMetric(Base):
    """Per-optimizer-step training log of one variant and seed."""

    __tablename__ = "train_metrics"
    __table_args__ = (UniqueConstraint("run_id", "variant", "seed", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = _run_fk()
    variant: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    grad_norm_raw: Mapped[float | None] = mapped_column(Float)
    grad_norm_preconditioned: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    rows_captured: Mapped[int | None] = mapped_column(Integer)
    # GRIT's counters (revision 0008): inverses computed this step, gradients preconditioned,
    # share of modules that captured rows; on a reprojection's step the ranks kept (min, median,
    # max over modules) and the median share of Sigma_u's eigen-energy they keep
    inversions: Mapped[int | None] = mapped_column(Integer)
    preconditioned_tensors: Mapped[int | None] = mapped_column(Integer)
    capture_coverage: Mapped[float | None] = mapped_column(Float)
    rank_min: Mapped[int | None] = mapped_column(Integer)
    rank_median: Mapped[int | None] = mapped_column(Integer)
    rank_max: Mapped[int | None] = mapped_column(Integer)
    kept_energy_median: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)       # on the steps it was measured


class ProbeResult(Base):
    """One gradient-divergence probe measurement (per module, or ``*`` for a verdict)."""

    __tablename__ = "probe_results"
    __table_args__ = (UniqueConstraint("run_id", "variant", "module", "metric", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = _run_fk()
    variant: Mapped[str] = mapped_column(String(64))
    module: Mapped[str] = mapped_column(String(255))
    metric: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer, default=0)
    value: Mapped[float | None] = mapped_column(Float)
    text: Mapped[str | None] = mapped_column(Text)


class EvalMetric(Base):
    """An evaluation figure with its confidence interval and sample size."""

    __tablename__ = "eval_metrics"
    __table_args__ = (UniqueConstraint("run_id", "variant", "seed", "metric"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = _run_fk()
    variant: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    n: Mapped[int | None] = mapped_column(Integer)


class Comparison(Base):
    """A paired difference between two models on the same prompts (variant vs base, or a GRIT
    variant vs its same-engine control), with its interval and the test that judged it.
    ``p_value`` is the test's own; ``p_adjusted`` is Holm's over every comparison of the run and
    seed, and ``significant`` is judged on it (older rows: unadjusted, ``p_adjusted`` NULL)."""

    __tablename__ = "comparisons"
    __table_args__ = (UniqueConstraint("run_id", "metric", "variant", "reference", "seed"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = _run_fk()
    metric: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(64))
    reference: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    delta: Mapped[float] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    p_adjusted: Mapped[float | None] = mapped_column(Float)
    test: Mapped[str] = mapped_column(String(64))
    significant: Mapped[bool] = mapped_column(Boolean)
    n: Mapped[int] = mapped_column(Integer)


class SpeedMetric(Base):
    """Throughput measured by a backend's own timers (new tokens only for decode)."""

    __tablename__ = "speed_metrics"
    __table_args__ = (UniqueConstraint("run_id", "variant", "seed", "backend", "metric"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = _run_fk()
    variant: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    backend: Mapped[str] = mapped_column(String(32))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    n: Mapped[int | None] = mapped_column(Integer)


class ServedFigure(Base):
    """A figure of one model's greedy replies through a second serving backend (Ollama), in one
    served form (``base``, ``adapter``: the base GGUF with the LoRA GGUF applied at run time,
    ``merged``): the served metrics with their intervals, the replies' agreement with llama.cpp's
    and the speed from the backend's own counters (``evaluation.ollama_backend``). The
    evaluation's own served figures (llama.cpp) are ``eval_metrics`` rows."""

    __tablename__ = "served_figures"
    __table_args__ = (UniqueConstraint("run_id", "variant", "seed", "backend", "form", "metric"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = _run_fk()
    variant: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    backend: Mapped[str] = mapped_column(String(32))
    form: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    n: Mapped[int | None] = mapped_column(Integer)


class StudyTrial(Base):
    """One training run of the study (``pipelines/study/``): a tuning trial (``phase`` tune: a
    setting drawn from the method's search space, judged on validation loss) or a test run
    (``phase`` test: the method's chosen setting at one seed and run length, with test figures)."""

    __tablename__ = "study_trials"
    __table_args__ = (UniqueConstraint("run_id", "phase", "method", "steps", "seed", "setting"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = _run_fk()
    phase: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(64))
    steps: Mapped[int] = mapped_column(Integer)                   # the run's length in optimizer steps
    seed: Mapped[int] = mapped_column(Integer)
    setting: Mapped[str] = mapped_column(String(255))            # canonical JSON of the hyperparameters
    val_loss: Mapped[float | None] = mapped_column(Float)        # after the last step
    curve_json: Mapped[str] = mapped_column(Text)                # [[step, val_loss], ...]
    metrics_json: Mapped[str] = mapped_column(Text)              # validation or test figures
    train_seconds: Mapped[float] = mapped_column(Float)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    trainable_parameters: Mapped[int | None] = mapped_column(BigInteger)


class TuningJournal(Base):
    """Optuna's journal of the study's tuning (``db/tuning_journal.py``): one row per log entry,
    in the order appended, and one journal per Optuna study (``tuning``, its name), so a tuning's
    log replays alone. The rows are Optuna's own: a run's deletion does not touch them (their
    names carry the study's key, not a run)."""

    __tablename__ = "tuning_journal"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tuning: Mapped[str | None] = mapped_column(String(255), index=True)
    log_json: Mapped[str] = mapped_column(Text)


class StudyClaim(Base):
    """Which study worker holds which part of a run's study (``db/study_claims.py``): one row per
    part (a method at a run length), its worker, when the worker last beat, and when it was done."""

    __tablename__ = "study_claims"

    run_id: Mapped[str] = mapped_column(String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    part: Mapped[str] = mapped_column(String(128), primary_key=True)
    worker: Mapped[str] = mapped_column(String(255))
    claimed_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    done_at: Mapped[datetime | None] = mapped_column(DateTime)


class Artifact(Base):
    """A file a stage produced, with its content hash for provenance."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("run_id", "stage", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = _run_fk()
    stage: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
