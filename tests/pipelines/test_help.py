"""Every ``python -m pipelines.<entry>`` lists in ``--help`` every flag it parses: a second parser
that reads the command line before the one that prints the help (issue 59: ``--sitting`` and
``--workers`` of the study) hides flags from the user."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def entry_points() -> list[str]:
    """Every module ``python -m`` runs: a module with a ``__main__`` block, or a package's ``__main__.py``."""
    entries = []
    for path in sorted(PIPELINES.rglob("*.py")):
        if "__pycache__" in path.parts or 'if __name__ == "__main__"' not in path.read_text():
            continue
        parts = path.relative_to(PIPELINES.parent).with_suffix("").parts
        entries.append(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return entries


def test_entry_points_are_found():
    assert {"pipelines.study", "pipelines.train", "pipelines.probe", "pipelines.gpu_check"} <= set(entry_points())


@pytest.mark.parametrize("entry", entry_points())
def test_help_lists_every_flag_parsed(entry, monkeypatch, capsys):
    parsers: list[argparse.ArgumentParser] = []
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def recording(self, args=None, namespace=None):
        parsers.append(self)
        return parse_known_args(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    package_main = PIPELINES.parent.joinpath(*entry.split("."), "__main__.py").is_file()
    module = importlib.import_module(f"{entry}.__main__" if package_main else entry)
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code in (0, None)
    shown = capsys.readouterr().out
    assert shown.startswith("usage:")
    flags = {flag for parser in parsers for action in parser._actions for flag in action.option_strings}
    assert "--help" in flags
    assert not sorted(flag for flag in flags if flag not in shown), f"{entry} --help hides flags"
