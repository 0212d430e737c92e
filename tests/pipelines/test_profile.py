"""``python -m pipelines.profile`` writes params.yaml only once the composition passes the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.profile import main

SECRET = "s3cret-Profile-pw"


def test_a_password_in_the_composed_store_url_is_refused_and_written_nowhere(tmp_path: Path, capsys):
    output = tmp_path / "params.yaml"
    output.write_text("previous: true\n")
    status = main(["smoke", f"store.url=postgresql+psycopg://grit:{SECRET}@db.example/grit", "--output", str(output)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert SECRET not in err
    assert output.read_text() == "previous: true\n"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_a_valid_composition_replaces_the_file(tmp_path: Path, capsys):
    output = tmp_path / "params.yaml"
    output.write_text("previous: true\n")
    assert main(["smoke", "train.max_steps=3", "--output", str(output)]) == 0
    assert "max_steps: 3" in output.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
    assert "wrote" in capsys.readouterr().err


def test_an_unknown_profile_is_refused_by_the_parser(tmp_path: Path):
    with pytest.raises(SystemExit) as stopped:
        main(["no-such-profile", "--output", str(tmp_path / "params.yaml")])
    assert stopped.value.code == 2
