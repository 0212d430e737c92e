"""llama.cpp's threads follow the CPUs the process may use: half of them to decode (one token
at a time is bound by memory and barriers, and a spare core keeps a shared machine from
stalling it), all of them for prompts (``core/threads.py``; ``benchmarks/llama_contention.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import UserError
from core.threads import THREADS_ENV, LlamaThreads, llama_threads

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cpus():
    """Restrict this process to n CPUs (as ``taskset`` or a container's CPU set would)."""
    allowed = os.sched_getaffinity(0)

    def restrict(n: int) -> None:
        if len(allowed) < n:
            pytest.fail(f"this check needs {n} CPUs; the machine gives {len(allowed)}")
        os.sched_setaffinity(0, set(sorted(allowed)[:n]))

    yield restrict
    os.sched_setaffinity(0, allowed)


def test_llama_cpp_decodes_on_half_the_usable_cpus_and_reads_prompts_on_all(tiny_export, cpus, monkeypatch):
    from export.backend import LlamaCppModel

    monkeypatch.delenv(THREADS_ENV, raising=False)
    for n, (decode, batch) in ((1, (1, 1)), (2, (1, 2))):
        cpus(n)
        model = LlamaCppModel(tiny_export.base_gguf, tiny_export.chat, n_ctx=256)
        assert (model.llm.n_threads, model.llm.n_threads_batch) == (decode, batch)
        assert model.generate("Hello?", 4).new_tokens > 0
        model.close()


def test_the_thread_count_is_a_setting_checked_in_one_line(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")
    assert llama_threads() == LlamaThreads(3, 3)
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(UserError, match=f"{THREADS_ENV}={bad!r}: expected a whole number of threads"):
            llama_threads()


def test_a_bad_thread_count_stops_a_stage_before_any_work(tmp_path: Path):
    from pipelines.profile import compose_params

    compose_params("smoke", tmp_path / "params.yaml")
    result = subprocess.run([sys.executable, "-m", "pipelines.prepare_data"], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), THREADS_ENV: "many"}, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: {THREADS_ENV}='many': expected a whole number of threads, "
                                                  "at least 1"]
    assert not (tmp_path / "outputs").exists()
