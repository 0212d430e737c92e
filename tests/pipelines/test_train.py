"""Stage ``train@<variant>``: a killed run resumes to the uninterrupted result; unfair batches fail."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlalchemy import select

from db.models import Run, TrainMetric, Variant
from db.store import open_store, utcnow
from pipelines.params import load_params
from pipelines.profile import compose_params
from pipelines.stage import run_id_for

pytestmark = pytest.mark.slow     # runs the train stage

REPO = Path(__file__).resolve().parents[2]


def stage(workdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A smoke workdir with data prepared and a longer budget with frequent checkpoints."""
    workdir = tmp_path_factory.mktemp("train") / "prepared"
    workdir.mkdir()
    compose_params("smoke", workdir / "params.yaml", ["train.max_steps=40", "train.save_steps=5"])
    process = stage(workdir, "pipelines.prepare_data")
    assert process.wait(timeout=600) == 0, process.stdout.read()[-3000:]
    return workdir


def copy_of(prepared: Path, target: Path) -> Path:
    shutil.copytree(prepared, target)
    return target


def adapter(workdir: Path, variant: str) -> dict:
    return load_file(workdir / "artifacts/adapters" / variant / "adapter_model.safetensors")


def test_killed_training_resumes_to_the_uninterrupted_adapter(prepared: Path, tmp_path: Path):
    straight = copy_of(prepared, tmp_path / "straight")
    process = stage(straight, "pipelines.train", "--variant", "pure_grit")
    assert process.wait(timeout=900) == 0, process.stdout.read()[-3000:]

    killed = copy_of(prepared, tmp_path / "killed")
    process = stage(killed, "pipelines.train", "--variant", "pure_grit")
    checkpoints = killed / "outputs/checkpoints/pure_grit"
    deadline = time.time() + 600
    while not list(checkpoints.glob("checkpoint-*/grit_state.pt")) and time.time() < deadline:
        assert process.poll() is None, "training ended before a checkpoint could be interrupted"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (killed / "artifacts/adapters/pure_grit/adapter_model.safetensors").exists()

    resumed = stage(killed, "pipelines.train", "--variant", "pure_grit")
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming from checkpoint-" in output
    metadata = json.loads((killed / "artifacts/adapters/pure_grit/grit_metadata.json").read_text())
    reference = json.loads((straight / "artifacts/adapters/pure_grit/grit_metadata.json").read_text())
    assert metadata["resumed_from"] and metadata["batch_order_hash"] == reference["batch_order_hash"]
    expected, actual = adapter(straight, "pure_grit"), adapter(killed, "pure_grit")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert (expected[name] - actual[name]).abs().max() <= 1e-6, name
    assert not checkpoints.exists(), "checkpoints are removed once the variant is trained"

    # The step log of the resumed run is whole: every step once, the same losses as uninterrupted.
    def losses(workdir: Path) -> list[tuple[int, float]]:
        rows = (workdir / "dvclive/train/pure_grit/plots/metrics/train/loss.tsv").read_text().split("\n")[1:]
        return [(int(r.split("\t")[0]), float(r.split("\t")[1])) for r in rows if r]

    assert [step for step, _ in losses(killed)] == list(range(1, 41))
    assert [x for _, x in losses(killed)] == pytest.approx([x for _, x in losses(straight)], abs=1e-5)

    # Validation loss: every train.eval_steps steps (2 in the smoke profile) and at the end, in
    # dvclive, the metadata and the store; a resumed run records the same curve.
    def validation(workdir: Path) -> list[tuple[int, float]]:
        return losses_of(workdir / "dvclive/train/pure_grit/plots/metrics/train/val_loss.tsv")

    assert [step for step, _ in validation(straight)] == list(range(2, 41, 2))
    assert [x for _, x in validation(killed)] == pytest.approx([x for _, x in validation(straight)], abs=1e-5)
    assert reference["final_val_loss"] == pytest.approx(validation(straight)[-1][1])
    store = open_store(f"sqlite:///{straight / 'outputs/centralized.db'}")
    with store.reader() as session:
        stored = {m.step: m.val_loss for m in session.scalars(select(TrainMetric)).all()}
    assert sorted(step for step, value in stored.items() if value is not None) == list(range(2, 41, 2))


def losses_of(tsv: Path) -> list[tuple[int, float]]:
    rows = tsv.read_text().split("\n")[1:]
    return [(int(r.split("\t")[0]), float(r.split("\t")[1])) for r in rows if r]


def record_variant(workdir: Path, name: str, engine: str, details: dict) -> None:
    """A variant of the workdir's run as the store would hold it had it trained first."""
    params = load_params(workdir / "params.yaml")
    store = open_store(params.store.url, workdir)
    run_id = run_id_for(params)
    store.start_run(Run(id=run_id, git_revision=None, params_hash="h", params_json="{}", profile="smoke",
                        host="h", device="cpu", started_at=utcnow()))
    with store.transaction() as session:
        session.add(Variant(run_id=run_id, name=name, seed=params.train.seed, engine=engine, base_model="tiny",
                            details_json=json.dumps(details)))


def test_a_variant_trained_on_other_batches_fails_the_run(prepared: Path, tmp_path: Path):
    workdir = copy_of(prepared, tmp_path / "unfair")
    record_variant(workdir, "peft_lora", "peft", {"batch_order_hash": "0" * 64})
    process = stage(workdir, "pipelines.train", "--variant", "pure_grit")
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 2
    assert output.strip().splitlines()[-1].startswith("error: unfair comparison: pure_grit trained on other batches")


def test_unknown_variant_is_a_one_line_error(prepared: Path):
    process = stage(prepared, "pipelines.train", "--variant", "nope")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 2 and "variants: no variant named 'nope'" in output.strip().splitlines()[-1]


def trainer_classes(workdir: Path) -> dict[str, str]:
    params = load_params(workdir / "params.yaml")
    with open_store(params.store.url, workdir).reader() as session:
        rows = session.scalars(select(Variant).where(Variant.run_id == run_id_for(params))).all()
        return {row.name: json.loads(row.details_json)["trainer_class"] for row in rows}


@pytest.mark.parametrize("order", [("hybrid_grit", "baseline_lora"), ("baseline_lora", "hybrid_grit")])
def test_the_unsloth_pair_trains_through_one_trainer_class_in_either_order(prepared: Path, tmp_path: Path, order):
    """Each stage in a fresh process, as DVC runs them: the hybrid used to import Unsloth's GPU
    model stack on CPU, which re-patched TRL and left it on TRL's own trainer."""
    workdir = copy_of(prepared, tmp_path / "-".join(order))
    for variant in order:
        process = stage(workdir, "pipelines.train", "--variant", variant)
        output = process.communicate(timeout=900)[0]
        assert process.returncode == 0, output[-3000:]
        assert "Could not build the patched" not in output
    classes = trainer_classes(workdir)
    assert classes["hybrid_grit"] == classes["baseline_lora"] != "trl.trainer.sft_trainer.SFTTrainer", classes


def test_a_pair_trained_through_other_trainer_classes_fails_the_run(prepared: Path, tmp_path: Path):
    workdir = copy_of(prepared, tmp_path / "other-class")
    record_variant(workdir, "baseline_lora", "unsloth", {"trainer_class": "trl.Other"})
    process = stage(workdir, "pipelines.train", "--variant", "hybrid_grit")
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 2
    assert output.strip().splitlines()[-1].startswith("error: unfair comparison: hybrid_grit trained through ")
    assert output.strip().endswith("its pair baseline_lora through trl.Other")
