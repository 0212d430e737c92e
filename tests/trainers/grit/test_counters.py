"""GRIT's counters per step, as its paper logs them: inversions, preconditioned tensors, capture
coverage, and each reprojection with the ranks kept and the eigen-energy they keep, in the
training log (dvclive) and the results store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_lora import Rows, tiny_lora_model
from transformers import Trainer, TrainingArguments

from db.models import Run, TrainMetric
from db.store import open_store, utcnow
from trainers.grit import GritManager, GritParams
from trainers.grit import math as gm
from trainers.sft import GRIT_COUNTERS, StepLog


class Live:
    """Collects what StepLog hands dvclive (``log_metric`` / ``next_step``)."""

    def __init__(self):
        self.step, self.logged = 0, {}

    def log_metric(self, name, value):
        self.logged.setdefault(name, {})[self.step] = value

    def next_step(self):
        pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(min_samples=8, update_freq=2, reprojection=True, reprojection_freq=2,
                                            reprojection_k=2, truncate=False))
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("counters")), max_steps=5,
                             per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant",
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1)
    trainer_ref, live = [], Live()
    log = StepLog(trainer_ref, manager, live)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[manager.callback(), log])
    trainer_ref.append(trainer)
    manager.total_steps = 5
    trainer.train()
    return manager, log.rows, live


def test_every_step_logs_inversions_preconditioning_and_coverage(trained):
    manager, rows, _ = trained
    modules = len(manager.modules)
    assert [r["capture_coverage"] for r in rows] == [1.0] * 5
    assert [r["inversions"] for r in rows] == [2 * modules, 0, 2 * modules, 0, 2 * modules]   # update_freq 2
    assert sum(r["inversions"] for r in rows) == manager.inversions
    assert all(r["preconditioned_tensors"] == 2 * modules for r in rows)


def test_each_reprojection_logs_the_ranks_kept_and_their_energy(trained):
    manager, rows, live = trained
    reprojected = [r["step"] for r in rows if r["rank_median"] is not None]
    assert reprojected == [2, 4] == [e["step"] for e in manager.rank_events]   # never on the last step
    for row in rows:
        if row["step"] in reprojected:
            assert row["rank_min"] == row["rank_max"] == manager.modules[next(iter(manager.modules))].rank
            assert 0 < row["kept_energy_median"] <= 1
        else:
            assert row["rank_min"] is None and row["kept_energy_median"] is None
    assert set(live.logged["train/inversions"]) == {1, 2, 3, 4, 5}
    assert set(live.logged["train/kept_energy_median"]) == {2, 4}


def test_the_counters_are_columns_of_the_store(trained, tmp_path: Path):
    _, rows, _ = trained
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.start_run(Run(id="r", git_revision=None, params_hash="h", params_json="{}", profile="test", host="h",
                        device="cpu", started_at=utcnow()))
    with store.transaction() as session:
        store.replace_rows(session, TrainMetric, "r", rows, variant="pure_grit", seed=0)
    with store.reader() as session:
        stored = sorted(session.query(TrainMetric).all(), key=lambda m: m.step)
    assert [m.inversions for m in stored] == [r["inversions"] for r in rows]
    assert [m.kept_energy_median is not None for m in stored] == [False, True, False, True, False]
    assert set(GRIT_COUNTERS) <= set(TrainMetric.__table__.columns.keys())


def test_kept_energy_is_the_share_of_the_spectrum_the_top_k_keep():
    eigenvalues = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert float(gm.kept_energy(eigenvalues, 2)) == pytest.approx(0.7)
    assert float(gm.kept_energy(torch.zeros(3), 1)) == 1.0
