"""Shared fixtures: the repository root and a params file builder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "tests"):  # the code, and test helpers such as tiny_lora
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def write_params(tmp_path: Path):
    """Write a params mapping as YAML in a temp dir and return its path."""

    def write(payload: object, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(payload) if not isinstance(payload, str) else payload)
        return path

    return write


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (pgserver's binaries, installed by the test requirements) in a
    temporary folder for the whole session (one per test worker), reached through its Unix socket.

    The folder is not under pytest's basetemp: running as root, pgserver runs the server as its
    own user and opens every parent folder to it, and any other pytest process that starts (a
    `make smoke` beside `make test`) makes /tmp/pytest-of-<user> private again, which locks the
    server out of its data mid-run (PANIC: could not open pg_control: Permission denied)."""
    import shutil
    import tempfile
    import warnings

    folder = Path(tempfile.mkdtemp(prefix="grit-postgres-"))
    with warnings.catch_warnings():
        # platformdirs notes that XDG_RUNTIME_DIR is unset (as on CI machines); pgserver only
        # keeps a lock file there.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver

        server = pgserver.get_server(folder / "postgres", cleanup_mode="stop")
    yield server
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a new, empty database on the session's server (one per test)."""
    import uuid

    from sqlalchemy.engine import make_url

    name = f"grit_{uuid.uuid4().hex[:12]}"
    postgres_server.psql(f"CREATE DATABASE {name};")
    url = make_url(postgres_server.get_uri()).set(drivername="postgresql+psycopg", database=name)
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path) -> str:
    """A fresh results store on each backend the project supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


# The suite runs on two workers (Makefile: `pytest -n 2 --dist loadfile`), each test file wholly on
# one worker so that its module fixtures are built once. The longest files go first, so that the
# two workers start on them at once and the short files fill in behind; in collection order the
# longest would start last and set the suite's wall time alone.
LONGEST_FIRST = (
    "tests/test_pipeline_smoke.py",
    "tests/pipelines/test_study_workers.py",
    "tests/test_study_sittings.py",
    "tests/test_vlm_smoke.py",
    "tests/pipelines/test_faults.py",
    "tests/pipelines/test_export_serve.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    position = {id(item): n for n, item in enumerate(items)}

    def key(item):
        path = item.path.relative_to(REPO_ROOT).as_posix()
        return rank.get(path, len(rank)), position[id(item)]

    items.sort(key=key)


@pytest.fixture(scope="module")
def study_profile(tmp_path_factory):
    """The params of the ``study`` profile, composed as ``make sitting`` composes them."""
    from pipelines.params import load_params
    from pipelines.profile import compose_params

    path = tmp_path_factory.mktemp("study") / "params.yaml"
    compose_params("study", path)
    return load_params(path)
