"""Faults and bad input around the stages: an unusable results store is one line before any work,
experiments run by DVC away from the workspace still record into the repository's store (and two
queue workers into one PostgreSQL store), and a
params typo under ``dvc repro`` leaves every finished output in place.

A small DVC project drives the real ``prepare_model`` stage (the smoke profile's tiny model, so
each run takes seconds); the whole pipeline's version of the last check is in the smoke test."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.engine import make_url

from db.models import Run, StageRun
from db.store import open_store
from pipelines.profile import compose_params

pytestmark = pytest.mark.slow     # runs DVC pipelines and experiments

REPO = Path(__file__).resolve().parents[2]
MANIFEST = "artifacts/base_model.json"
DVC_YAML = {"stages": {"prepare_model": {
    "cmd": "python -m pipelines.prepare_model", "params": ["profile", "model"],
    "outs": [{MANIFEST: {"cache": False, "persist": True}}]}}}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _run(args: list[str], cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def _stage(workdir: Path, params: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--params", str(params)] if params else []
    return _run([sys.executable, "-m", "pipelines.prepare_model", *extra], workdir, check=False)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    return lines[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC project with one real stage and the smoke profile's params."""
    root = tmp_path / "project"
    root.mkdir()
    compose_params("smoke", root / "params.yaml")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / ".gitignore").write_text("/artifacts/\n/outputs/\n")
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run([*git, "add", "-A"], root)
    _run([*git, "commit", "-qm", "project"], root)
    return root


def _with_store(project: Path, url: str) -> Path:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["store"]["url"] = url
    path = project / "other-params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(("url", "fragment"), [
    ("sqllite:///outputs/centralized.db", "is not a usable SQLAlchemy URL"),
    ("sqlite:///not-a-folder.txt/centralized.db", "is not a writable directory"),
    ("sqlite:////proc/nowhere/centralized.db", "/proc is not a writable directory"),   # nothing can be made there
    ("sqlite://", "in-memory SQLite store cannot be shared"),
])
def test_an_unusable_store_url_is_one_line_before_any_work(project: Path, url: str, fragment: str):
    (project / "not-a-folder.txt").write_text("a file, not a folder\n")
    line = _one_error_line(_stage(project, _with_store(project, url)))
    assert fragment in line, line
    assert not (project / "artifacts").exists()


def test_a_postgresql_store_that_cannot_be_reached_or_written_is_one_line_before_any_work(
        project: Path, postgres_server, postgres_url: str):
    missing = make_url(postgres_url).set(database="no_such_database").render_as_string(hide_password=False)
    line = _one_error_line(_stage(project, _with_store(project, missing)))
    assert line.startswith("error: store.url: cannot write to postgresql+psycopg://"), line
    assert "no_such_database" in line, line
    # A role that may connect but not create tables (PostgreSQL 15+ gives PUBLIC no CREATE on public).
    role = f"reader_{make_url(postgres_url).database}"
    postgres_server.psql(f"CREATE ROLE {role} LOGIN;")
    read_only = make_url(postgres_url).set(username=role).render_as_string(hide_password=False)
    line = _one_error_line(_stage(project, _with_store(project, read_only)))
    assert "cannot write to" in line and "permission denied" in line, line
    assert not (project / "artifacts").exists()


def test_a_read_only_store_is_noticed_before_the_stage_rewrites_its_outputs(project: Path):
    assert _stage(project).returncode == 0
    before = _digest(project / MANIFEST)
    store = project / "outputs/centralized.db"
    url = f"sqlite:///file:{store}?mode=ro&uri=true"      # any way of opening the store read-only
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["model"]["tiny"]["seed"] = 7                       # a run that would rewrite the manifest
    raw["store"]["url"] = url
    params = project / "other-params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = _one_error_line(_stage(project, params))
    assert "cannot be written" in line and "readonly" in line, line
    assert _digest(project / MANIFEST) == before


def test_temporary_and_queued_experiments_record_into_the_repository_store(project: Path):
    _run(["dvc", "repro"], project)
    _run(["dvc", "exp", "run", "--temp", "-S", "model.tiny.seed=1"], project)
    _run(["dvc", "exp", "run", "--queue", "-S", "model.tiny.seed=2"], project)
    _run(["dvc", "queue", "start", "-j", "1"], project)
    try:
        status = _wait_for_queue(project)
        assert "Success" in status and "Failed" not in status, status
    finally:
        _run(["dvc", "queue", "stop", "--kill"], project, check=False)
    store = open_store("sqlite:///outputs/centralized.db", project)
    with store.reader() as session:
        runs = session.scalars(select(Run)).all()
        seeds = sorted(yaml.safe_load(r.params_json)["model"]["tiny"]["seed"] for r in runs)
        statuses = {r.status for r in runs}
    assert seeds == [0, 1, 2], seeds                       # workspace, --temp, --queue
    assert statuses == {"complete"}
    assert not list((project / ".dvc/tmp").rglob("centralized.db"))


def _wait_for_queue(project: Path) -> str:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = _run(["dvc", "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    raise AssertionError(f"the queue did not finish in 10 minutes:\n{status}")


def test_queued_experiments_on_two_workers_record_into_one_postgresql_store(project: Path, postgres_url: str):
    """The store a lab shares: two DVC queue workers at once, each migrating on first open and
    recording its run into the same PostgreSQL database."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["store"]["url"] = postgres_url
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qam", "shared store"],
         project)
    for seed in (1, 2, 3):
        _run(["dvc", "exp", "run", "--queue", "-S", f"model.tiny.seed={seed}"], project)
    _run(["dvc", "queue", "start", "-j", "2"], project)
    try:
        status = _wait_for_queue(project)
        assert status.count("Success") == 3 and "Failed" not in status, status
    finally:
        _run(["dvc", "queue", "stop", "--kill"], project, check=False)
    with open_store(postgres_url).reader() as session:
        runs = session.scalars(select(Run)).all()
        seeds = sorted(yaml.safe_load(r.params_json)["model"]["tiny"]["seed"] for r in runs)
        stages = session.scalars(select(StageRun.stage).where(StageRun.status == "succeeded")).all()
    assert seeds == [1, 2, 3] and {r.status for r in runs} == {"complete"}
    assert stages == ["prepare_model"] * 3
    assert not (project / "outputs").exists()                # nothing went to a SQLite file instead


def test_a_params_typo_under_dvc_repro_leaves_finished_outputs_in_place(project: Path):
    _run(["dvc", "repro"], project)
    before = _digest(project / MANIFEST)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["model"]["tiny"]["hidden_size"] = 10               # not a multiple of the heads: rejected
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    failed = _run(["dvc", "repro"], project, check=False)
    assert failed.returncode != 0
    assert "model.tiny: hidden_size must be a multiple of num_attention_heads" in failed.stderr + failed.stdout
    assert (project / MANIFEST).is_file() and _digest(project / MANIFEST) == before
    forced = _run(["dvc", "repro", "-f", "prepare_model"], project, check=False)
    assert forced.returncode != 0 and _digest(project / MANIFEST) == before


def test_every_output_of_the_pipeline_persists_until_its_stage_replaces_it(repo_root: Path):
    """DVC deletes a stage's outputs before running it unless they persist; the stages replace
    their outputs themselves once their work succeeded."""
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    loose = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for out in body.get(kind, []):
                path, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
                if not options.get("persist"):
                    loose.append(f"{name}: {path}")
    assert not loose, loose
