"""Stage ``probe``: an inert GRIT variant fails the stage (verdict still recorded) unless
``probe.allow_inert``; the trained loss curves enter as the trajectory check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from test_quiet import NOISE
from variant_subset import keep_only

from db.models import ProbeResult, StageRun
from db.store import open_store
from pipelines.params import load_params
from pipelines.probe import common_steps, read_loss_curve
from pipelines.profile import compose_params

pytestmark = pytest.mark.slow     # runs the probe stage

REPO = Path(__file__).resolve().parents[2]


def run(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=workdir, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Smoke data, and only pure GRIT with its control (one probe worker per run)."""
    workdir = tmp_path_factory.mktemp("probe")
    compose_params("smoke", workdir / "params.yaml", ["grit.precondition=false"])
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    keep_only(raw, {"pure_grit": {"engine": "peft", "grit": True, "control": "peft_lora"},
                    "peft_lora": {"engine": "peft", "grit": False}})
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run(workdir, "pipelines.prepare_data")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def set_params(workdir: Path, section: str, **values) -> None:
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw[section].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_inert_grit_fails_the_stage_and_is_recorded_and_allow_inert_goes_on(workdir: Path):
    # GRIT attached and capturing, but precondition: false: the updates cannot change.
    curve = workdir / "dvclive/train/{v}/plots/metrics/train/loss.tsv"
    for variant, losses in (("pure_grit", [2.0, 1.5, 1.2, 1.0]), ("peft_lora", [2.0, 1.5, 1.2, 1.0])):
        path = Path(str(curve).format(v=variant))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("step\tloss\n" + "".join(f"{i}\t{x}\n" for i, x in enumerate(losses, start=1)))

    result = run(workdir, "pipelines.probe")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: GRIT is inert in pure_grit") and "update_unchanged" in last
    assert "identical_trajectory" in last

    metrics = json.loads((workdir / "metrics/probes.json").read_text())["variants"]["pure_grit"]
    assert metrics["verdict"] == "inert" and metrics["loss_max_abs_difference"] == 0
    assert metrics["update_cosine_median"] == pytest.approx(1.0, abs=1e-6)
    assert (workdir / "plots/probe_update_divergence.png").stat().st_size > 10_000

    store = open_store(load_params(workdir / "params.yaml").store.url, workdir)
    with store.reader() as session:
        verdict = session.scalars(select(ProbeResult).where(ProbeResult.variant == "pure_grit",
                                                            ProbeResult.metric == "verdict")).one()
        assert verdict.value == 0.0 and "update_unchanged" in verdict.text
        per_module = session.scalars(select(ProbeResult).where(ProbeResult.metric == "update_cosine")).all()
        assert len(per_module) == 2 * 7 * 1   # 2 blocks x 7 projections, one GRIT variant
        stage = session.scalars(select(StageRun).where(StageRun.stage == "probe")).one()
        assert stage.status == "failed"

    set_params(workdir, "probe", allow_inert=True)
    result = run(workdir, "pipelines.probe")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pure_grit: INERT" in result.stdout
    # The probe's worker processes print none of the known-harmless import noise either.
    noise = [line for line in (result.stdout + result.stderr).splitlines()
             if any(known in line for known in NOISE)]
    assert noise == [], noise


def test_declared_controls_and_loss_curves(tmp_path: Path):
    params = load_params(REPO / "params.yaml")
    assert params.variants["hybrid_grit"].control == "baseline_lora"
    assert params.variants["pure_grit"].control == "peft_lora"
    assert read_loss_curve(tmp_path, "pure_grit") is None
    path = tmp_path / "dvclive/train/pure_grit/plots/metrics/train/loss.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("step\tloss\n2\t1.5\n1\t2.0\n3\t1.2\n")
    curve = read_loss_curve(tmp_path, "pure_grit")
    assert curve == {1: 2.0, 2: 1.5, 3: 1.2}
    assert common_steps(curve, {3: 1.0, 2: 1.4, 9: 0.1}) == ([1.5, 1.2], [1.4, 1.0])


def test_probe_steps_beyond_the_training_budget_is_a_one_line_error(workdir: Path, tmp_path: Path):
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["probe"]["steps"] = raw["train"]["max_steps"] + 1
    params.write_text(yaml.safe_dump(raw))
    result = run(workdir, "pipelines.probe", "--params", str(params))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {params}: probe.steps ({raw['probe']['steps']}) must not exceed train.max_steps "
        f"({raw['train']['max_steps']})"]


def test_only_an_inert_grit_variant_stops_the_run_and_an_inert_peer_is_reported(capsys):
    from pipelines.probe import stopping_verdicts

    params = load_params(REPO / "params.yaml")
    summaries = {"pure_grit": {"verdict": "inert", "reasons": ["update_unchanged"]},
                 "riemannian_lora": {"verdict": "inert", "reasons": ["scalar_equivalent"]},
                 "loraplus": {"verdict": "effective", "reasons": []}}
    assert stopping_verdicts(params, summaries) == ["pure_grit"]
    said = capsys.readouterr().out
    assert "riemannian_lora: its optimizer's step is inert" in said and "scalar_equivalent" in said
    assert "pure_grit" not in said and "loraplus" not in said
    assert stopping_verdicts(params, {**summaries, "pure_grit": {"verdict": "effective", "reasons": []}}) == []
