"""``scripts/gpu_session.sh``, the GPU check in one call: it parses, and on a machine without a
CUDA GPU it installs and runs nothing and says so in one line (exit 3)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_session.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0


def test_without_a_gpu_it_exits_3_in_one_line(tmp_path: Path):
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert result.returncode == 3
    assert result.stdout == "" and result.stderr.strip().splitlines() == [
        "gpu_session: no CUDA GPU on this machine (nvidia-smi lists none); run it on a GPU machine"]
    assert not list(tmp_path.iterdir())          # nothing copied: nothing ran
