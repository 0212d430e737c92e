"""llama.cpp's threads follow the CPUs the process may use, and idle OpenMP threads do not spin
for long (``core/threads.py``; the speed side is ``benchmarks/llama_contention.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import UserError
from core.threads import SPIN_COUNT, THREADS_ENV, llama_threads

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def one_cpu():
    """This process restricted to one CPU (as ``taskset -c 0`` or a container's limit would)."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    yield
    os.sched_setaffinity(0, allowed)


def test_llama_cpp_runs_on_the_cpus_the_process_may_use(tiny_export, one_cpu, monkeypatch):
    from export.backend import LlamaCppModel

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert os.cpu_count() > 1, "this check needs a machine with more than one core"
    model = LlamaCppModel(tiny_export.base_gguf, tiny_export.chat, n_ctx=256)
    assert model.llm.n_threads == 1 and model.llm.n_threads_batch == 1
    model.close()


def test_the_thread_count_is_a_setting_checked_in_one_line(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")
    assert llama_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(UserError, match=f"{THREADS_ENV}={bad!r}: expected a whole number of threads"):
            llama_threads()


def _environment_after_import(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | extra
    code = "import pipelines, os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_stages_set_a_short_openmp_spin_unless_the_user_chose_one():
    assert _environment_after_import({}) == f"{SPIN_COUNT} None"
    assert _environment_after_import({"GOMP_SPINCOUNT": "5"}) == "5 None"
    assert _environment_after_import({"OMP_WAIT_POLICY": "active"}) == "None active"


def test_a_bad_thread_count_stops_a_stage_before_any_work(tmp_path: Path):
    from pipelines.profile import compose_params

    compose_params("smoke", tmp_path / "params.yaml")
    result = subprocess.run([sys.executable, "-m", "pipelines.prepare_data"], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), THREADS_ENV: "many"}, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: {THREADS_ENV}='many': expected a whole number of threads, "
                                                  "at least 1"]
    assert not (tmp_path / "outputs").exists()
