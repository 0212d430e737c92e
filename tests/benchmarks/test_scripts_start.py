"""Every benchmark script starts: it imports what it names and answers ``--help`` without measuring
anything. A benchmark is run by hand, rarely, so a name it imports that the project renamed or
dropped would otherwise surface only when someone needs its figures (``portable_vs_native.py``
imported a prompt list that ``serving_speed.py`` no longer had)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))
# the scripts; the other files are helpers the scripts import (embedded_lora.py)
SCRIPTS = [path for path in BENCHMARKS if 'if __name__ == "__main__":' in path.read_text()]


def test_the_benchmarks_are_found_and_their_helpers_import():
    assert len(SCRIPTS) >= 10 and all(path.name != "__init__.py" for path in SCRIPTS)
    for helper in sorted(set(BENCHMARKS) - set(SCRIPTS)):
        result = subprocess.run([sys.executable, "-c", f"import benchmarks.{helper.stem}"], capture_output=True,
                                text=True, timeout=120, cwd=helper.parent.parent)
        assert result.returncode == 0, (helper.name, result.stderr[-2000:])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_a_benchmark_answers_help_without_measuring(script: Path):
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                            cwd=script.parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ") and script.name in result.stdout.splitlines()[0]
