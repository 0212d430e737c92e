"""A store's password comes from the environment (PGPASSWORD, ~/.pgpass or $GRIT_STORE_URL) and is
never written: not in params, the store's run record, the run id, a log or error line, nor any
file a stage writes. A password written into params is refused before any work."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from sqlalchemy import URL, create_engine, select
from sqlalchemy.engine import make_url

from db.config import STORE_URL_VARIABLE, has_password, recorded_store, without_password
from db.models import Artifact, EvalMetric, Run, StageRun
from db.store import ResultsStore
from pipelines.params import ParamsError, load_params, parse_params
from pipelines.stage import run_id_for, run_stage

# Fixed, so that the two test workers collect the same parametrized test ids (pytest-xdist), and
# long enough never to occur by chance; '@' makes its URL-quoted form differ from the raw one.
PASSWORD = "pw-5c0f7e2a9b14d3e8-s3cr@t"


@pytest.fixture
def password_role(postgres_server) -> URL:
    """A login role that must give ``PASSWORD`` (scram over the Unix socket: pgserver's own
    users are trusted) and owns a new database; its URL carries no password."""
    name = f"grit_{uuid.uuid4().hex[:12]}"
    server_url = make_url(postgres_server.get_uri())
    postgres_server.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'; CREATE DATABASE {name} OWNER {name};")
    hba = Path(postgres_server.pgdata) / "pg_hba.conf"
    hba.write_text(f"local all {name} scram-sha-256\n" + hba.read_text())    # first match wins: this role only
    postgres_server.psql("SELECT pg_reload_conf();")
    return URL.create("postgresql+psycopg", username=name, database=name, query=dict(server_url.query))


@pytest.fixture(autouse=True)
def _keep_pytests_faulthandler(monkeypatch):
    """run_stage points faulthandler at sys.stderr, which capsys replaces by a file without a descriptor."""
    monkeypatch.setattr("pipelines.stage.faulthandler.enable", lambda: None)


def _with_password(url: URL) -> str:
    return url.set(password=PASSWORD).render_as_string(hide_password=False)


def _work(ctx, _checked) -> dict[str, Path]:
    """A stage that does what real ones do with their params and store: writes the params to a
    file (train@ does, for its DDP workers), logs and prints them, records a row and an artifact."""
    out = ctx.root / "outputs" / "params_copy.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(ctx.params.model_dump(mode="json")))
    logging.getLogger("grit.test").info("params: %s", ctx.params.model_dump_json())
    print(f"store: {ctx.params.store.url}")
    with ctx.store.transaction() as session:
        ctx.store.replace_rows(session, EvalMetric, ctx.run_id, [{"value": 0.5, "ci_low": 0.4, "ci_high": 0.6,
                               "n": 10}], variant="base", seed=0, metric="aqi")
    return {"params_copy": out}


def _leaks(text: str) -> bool:
    return PASSWORD in text or quote(PASSWORD, safe="") in text


@pytest.mark.parametrize("way", ["PGPASSWORD", STORE_URL_VARIABLE])
def test_a_password_from_the_environment_is_recorded_nowhere(
    way: str, password_role: URL, tmp_path: Path, monkeypatch, capsys, caplog,
):
    url = password_role.render_as_string(hide_password=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv(STORE_URL_VARIABLE, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))     # not the user's ~/.pgpass
    caplog.set_level(logging.DEBUG)

    # The server really asks this role for its password: without one the stage cannot start.
    (work / "params.yaml").write_text(yaml.safe_dump({"store": {"url": url}}))
    assert run_stage("evaluate", _work, argv=["--params", "params.yaml"]) == 2
    assert "password" in capsys.readouterr().err

    if way == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", PASSWORD)
    else:       # the whole URL in the environment; params keep the default SQLite store
        monkeypatch.setenv(STORE_URL_VARIABLE, _with_password(password_role))
        (work / "params.yaml").write_text(yaml.safe_dump({"store": {"url": "sqlite:///outputs/centralized.db"}}))
    assert run_stage("evaluate", _work, argv=["--params", "params.yaml"]) == 0
    printed = capsys.readouterr()

    # Recorded in the server's store (not a SQLite file) under the URL without its password,
    # with the run id that URL's params hash to.
    expected = run_id_for(parse_params({"store": {"url": url}}))
    assert not (work / "outputs" / "centralized.db").exists()
    engine = create_engine(_with_password(password_role))
    store = ResultsStore(engine)
    with store.reader() as session:
        run = session.scalars(select(Run)).one()
        assert run.id == expected and run.params_hash.startswith(expected)
        assert yaml.safe_load(run.params_json)["store"]["url"] == url
        assert session.scalars(select(StageRun.status)).all() == ["succeeded"]
        recorded = [run.id, run.params_hash, run.params_json, run.git_revision or "", run.host, run.device,
                    *(a.path for a in session.scalars(select(Artifact))),
                    *(s.error or "" for s in session.scalars(select(StageRun)))]
    engine.dispose()
    assert f"done for run {expected}" in printed.out
    assert not any(_leaks(text) for text in recorded)
    assert not _leaks(printed.out) and not _leaks(printed.err) and not _leaks(caplog.text)
    assert "params: " in caplog.text and f"store: {url}" in printed.out      # what was checked was there
    written = [p for p in work.rglob("*") if p.is_file()]
    assert work / "outputs" / "params_copy.yaml" in written
    assert not [p for p in written if _leaks(p.read_bytes().decode(errors="replace"))]


@pytest.mark.parametrize("inline", [
    f"postgresql+psycopg://grit:{quote(PASSWORD, safe='')}@db.lab.example:5432/grit_results",
    f"postgresql://grit@db.lab.example/grit_results?password={quote(PASSWORD, safe='')}&sslmode=require",
])
def test_a_password_written_in_params_is_refused_before_any_work(inline: str, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(STORE_URL_VARIABLE, raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"store": {"url": inline}}))
    worked = []
    assert run_stage("evaluate", lambda ctx, _: worked.append(ctx), argv=["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: params.yaml: store: url holds a password"), err
    assert "PGPASSWORD" in err and "~/.pgpass" in err and STORE_URL_VARIABLE in err
    assert not _leaks(err) and not worked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]     # no store, no output


def test_a_url_in_place_of_the_store_section_is_not_echoed():
    with pytest.raises(ParamsError) as error:
        parse_params({"store": f"postgresql://grit:{PASSWORD}@db/grit_results"})
    assert "store" in str(error.value) and not _leaks(str(error.value))


@pytest.mark.parametrize(("variable", "fragment"), [
    (f"postgresql+nodriver://grit:{PASSWORD}@db/grit_results", "is not a usable SQLAlchemy URL"),
    (f"grit:{PASSWORD}@db/grit_results", f"{STORE_URL_VARIABLE} must be a SQLAlchemy URL"),
    (f"postgresql://grit:{PASSWORD}@db:port/grit_results", f"{STORE_URL_VARIABLE} must be a SQLAlchemy URL"),
])
def test_an_unusable_url_in_the_environment_is_one_masked_line(
    variable: str, fragment: str, tmp_path: Path, monkeypatch, capsys,
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(STORE_URL_VARIABLE, variable)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert run_stage("evaluate", lambda ctx, _: None, argv=["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert not _leaks(err)


def test_compare_all_takes_the_environments_url_and_refuses_one_with_a_password_on_its_command_line(
    tmp_path: Path, monkeypatch, capsys,
):
    from evaluation.compare_all import default_store_url, main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(STORE_URL_VARIABLE, f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert default_store_url(tmp_path) == f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert main(["--list", "--store", f"postgresql://grit:{PASSWORD}@db/grit_results"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --store: the URL holds a password"), err
    assert not _leaks(err)


@pytest.mark.parametrize("url", [
    "sqlite:///outputs/centralized.db",
    "postgresql://postgres:@/grit?host=/tmp/pg%20socket",       # pgserver's: an empty password is none
    "postgresql+psycopg://grit@db.lab.example:5432/grit_results?sslmode=require",
])
def test_a_url_without_a_password_is_recorded_as_written(url: str):
    # Not even re-rendered: SQLAlchemy would re-quote the query, and the run id would change.
    assert not has_password(url) and without_password(url) == url and recorded_store(url).url == url


def test_the_committed_runs_id_does_not_change(repo_root: Path):
    committed = load_params(repo_root / "params.yaml")
    recorded = committed.model_copy(update={"store": recorded_store(committed.store.url)})
    assert recorded == committed and run_id_for(recorded) == run_id_for(committed)


def test_a_password_is_dropped_from_the_recorded_url_wherever_it_was_written():
    assert without_password(f"postgresql+psycopg://grit:{quote(PASSWORD, safe='')}@db:5432/grit_results") == \
        "postgresql+psycopg://grit@db:5432/grit_results"
    assert without_password(f"postgresql://grit@db/grit?password={PASSWORD}&sslmode=require") == \
        "postgresql://grit@db/grit?sslmode=require"
