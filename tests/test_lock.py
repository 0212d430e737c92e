"""The environment is the lock: what `make setup` installed equals requirements/*.txt exactly, and
the check that proves it (scripts/check_lock.py) reports every kind of difference."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_lock", REPO_ROOT / "scripts/check_lock.py")
check_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_lock)


def test_the_installed_environment_equals_the_lock():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/check_lock.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().startswith("[setup] the environment equals the lock")


def test_every_kind_of_difference_is_one_line():
    want = {"torch": "2.13.0", "triton": "3.7.1", "peft": "0.21.2"}
    have = {"torch": "2.13.0", "triton": "3.9.0", "nvidia-cublas": "13.1.1.3", check_lock.PROJECT: "0.1.0"}
    assert check_lock.differences(want, have) == [
        "not locked  nvidia-cublas==13.1.1.3", "missing     peft==0.21.2", "other       triton==3.9.0 (locked 3.7.1)"]
    assert check_lock.differences(want, want) == []


def test_pins_are_read_with_normalised_names_and_loose_lines_refused():
    assert check_lock.pins_in("# header\nUnsloth_Zoo==2026.10.9  # why\n\ncuda-toolkit[cudart]==13.0.3.0\n") == {
        "unsloth-zoo": "2026.10.9", "cuda-toolkit": "13.0.3.0"}
    with pytest.raises(ValueError, match="not an exact pin"):
        check_lock.pins_in("torch>=2.13\n")


def test_the_lock_pins_torch_with_the_cuda_libraries_pypi_brings():
    """PyPI's torch is the CUDA build on Linux: its triton and nvidia-* requirements are pinned, so
    a fresh host's environment is the locked one (a lone triton pin once made the set-up fail)."""
    pins = check_lock.locked()
    assert pins["torch"] == "2.13.0" and "triton" in pins
    assert sum(name.startswith("nvidia-") for name in pins) >= 10
