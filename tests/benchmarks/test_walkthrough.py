"""The newcomer's walk-through (benchmarks/walkthrough.py): it runs the commands the committed pages
print, refuses before any work when a page lost one, and records what each step ended with."""

import importlib.util
import sys
from pathlib import Path

import pytest

from pipelines.ollama import DEFAULT_PORT

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("walkthrough", REPO_ROOT / "benchmarks" / "walkthrough.py")
walkthrough = importlib.util.module_from_spec(SPEC)
sys.modules["walkthrough"] = walkthrough                 # its dataclass looks its module up
SPEC.loader.exec_module(walkthrough)


def test_the_commands_are_the_ones_the_committed_pages_print():
    query = walkthrough.store_query((REPO_ROOT / "docs/store.md").read_text())
    assert query.startswith("sqlite3 -header -column outputs/centralized.db") and "FROM eval_metrics" in query
    assert query.endswith('seed;"')                     # the whole multi-line block, closing quote included
    chat = walkthrough.ollama_run_line((REPO_ROOT / "docs/serving.md").read_text())
    assert chat.startswith(f"OLLAMA_HOST=127.0.0.1:{DEFAULT_PORT} .venv/bin/ollama run pure_grit_model ")


def test_a_page_without_its_command_is_one_error_line_before_anything_is_cloned(tmp_path, monkeypatch, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/store.md").write_text("```python\nimport sqlite3\n```\n")
    (tmp_path / "docs/serving.md").write_text("```bash\nmake ollama\n```\n")
    monkeypatch.setattr(walkthrough, "ROOT", tmp_path)
    assert walkthrough.main(["--keep", str(tmp_path / "walk")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: docs/store.md holds no")
    assert not (tmp_path / "walk").exists()


def test_pytests_last_summary_line_gives_the_counts():
    output = ("tests/a.py ....F\n= 1 failed, 4 passed in 2.0s =\nnoise\n"
              "== 3 failed, 785 passed, 2 skipped, 1 error in 331.0s ==")
    assert walkthrough.pytest_counts(output) == {"failed": 3, "passed": 785, "skipped": 2, "error": 1}
    assert walkthrough.pytest_counts("no tests ran") == {}


def test_the_newcomers_shell_has_no_active_venv_an_empty_pip_config_and_the_new_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIRTUAL_ENV", str(REPO_ROOT / ".venv"))
    monkeypatch.setenv("PIP_FIND_LINKS", "/somewhere")
    monkeypatch.setenv("PATH", f"{REPO_ROOT / '.venv' / 'bin'}:/usr/bin")
    env = walkthrough.newcomer_env(tmp_path / "cache")
    assert "VIRTUAL_ENV" not in env and "PIP_FIND_LINKS" not in env
    assert env["PATH"] == "/usr/bin" and env["PIP_CONFIG_FILE"] == "/dev/null"
    assert env["GRIT_CACHE_DIR"] == str(tmp_path / "cache")


def test_a_failed_step_is_recorded_with_its_exit_status_and_last_lines(tmp_path):
    (tmp_path / "logs").mkdir()
    step = walkthrough.run_step("query", "seq 1 20; echo gone >&2; exit 3", tmp_path, {"PATH": "/usr/bin:/bin"},
                                tmp_path / "logs")
    assert step.exit == 3 and step.seconds >= 0
    assert step.tail.splitlines() == [*map(str, range(10, 21)), "gone"]
    assert (tmp_path / "logs/query.log").read_text().splitlines()[0] == "1"


@pytest.mark.parametrize("page", ["docs/store.md", "docs/serving.md"])
def test_the_benchmark_readme_names_the_walkthrough(page):
    # the walk-through reads these two pages; the benchmarks' README says so
    readme = (REPO_ROOT / "benchmarks/README.md").read_text()
    assert "`walkthrough.py`" in readme and page in readme.split("`walkthrough.py`", 1)[1]
