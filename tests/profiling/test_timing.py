"""The step timing and the peak memory of an arm (``profiling/timing.py``, ``profiling/memory.py``),
on step functions that only move a test clock or allocate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiling.timing import interleaved_step_times

REPO = Path(__file__).resolve().parents[2]


def test_the_overhead_harness_times_interleaved_steps_and_weighs_one_arm():
    """Two step functions on a test clock (no wall time: a busy machine cannot move it), GRIT's
    step 10 units plus the batch, LoRA's 1: the harness runs them interleaved on the same batches,
    leaves the warm-up out and takes the medians; a step that touches 64 MiB raises the peak RSS."""
    seen: list[tuple[str, int]] = []
    now = [0.0]

    def fast(batch: int) -> None:
        seen.append(("lora", batch))
        now[0] += 1.0

    def slow(batch: int) -> None:
        seen.append(("grit", batch))
        now[0] += 10.0 + batch + (30.0 if batch == 4 else 0.0)    # batch 4: an inverting step

    prepared: list[str] = []
    timed = interleaved_step_times(fast, slow, range(5), warmup=2, prepare=prepared.append, clock=lambda: now[0])
    assert seen == [(arm, k) for k in range(5) for arm in ("lora", "grit")]
    assert prepared == ["lora", "grit"] * 5
    # timed batches 2, 3, 4: LoRA 1, 1, 1; GRIT 12, 13, 44 (the median leaves the inversion out)
    assert (timed.steps, timed.lora_s, timed.grit_s, timed.ratio) == (3, 1.0, 13.0, 13.0)
    assert (timed.lora_mean_s, timed.grit_mean_s, timed.mean_ratio) == (1.0, 23.0, 23.0)
    with pytest.raises(ValueError, match="no step was timed"):
        interleaved_step_times(fast, slow, range(2), warmup=2)

    # one arm per fresh process, as the harness is used: in a long-lived process freed memory that
    # is still resident can serve the step without raising the peak (a test suite's process is one)
    weigh = ("from profiling.memory import peak_memory\n"
             "held = []\n"
             "m = peak_memory(lambda size: held.append(bytearray(size)), [64 * 2**20], device='cpu')\n"
             "print(m.after_load_mib, m.added_mib)")
    done = subprocess.run([sys.executable, "-c", weigh], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    after_load, added = map(float, done.stdout.split())
    assert after_load > 0 and added > 48
