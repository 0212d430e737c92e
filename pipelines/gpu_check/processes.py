"""The GPU check's worker processes, as the orchestrator (``cli.py``) starts them: one process
per item kind (``items.py``: Unsloth patches libraries for the whole process), and the two items
composed of several: ``overhead`` from the interleaved step times of both arms in one process
and each arm's peak memory in a fresh one, ``profile`` from one process per engine and shape
that profiles both arms. No torch here: the orchestrator reads it before it knows a GPU is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipelines.gpu_check.sizing import OVERHEAD_SHAPES
from profiling.timing import ARMS

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("unsloth", "peft")


def run_item(item: str, workdir: Path, device: str, sizes: list[str], timeout_s: int) -> tuple[dict | None, str | None]:
    """(figures, None) or (None, the error that ended the item's process)."""
    out = workdir / f"{item.replace(':', '-')}.json"
    command = [sys.executable, "-m", "pipelines.gpu_check.items", item, "--workdir", str(workdir), "--out", str(out),
               "--device", device, *sizes]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"{item} did not finish in {timeout_s} s"
    result = json.loads(out.read_text()) if out.is_file() else {}
    if done.returncode != 0 or "error" in result:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), f"exit {done.returncode}")
        (workdir / f"{item.replace(':', '-')}.log").write_text(done.stdout + done.stderr)
        return None, result.get("error") or last.strip()
    return result, None



def overhead(workdir: Path, device: str, sizes: list[str], timeout_s: int,
             shapes: tuple[str, ...] = tuple(OVERHEAD_SHAPES)) -> tuple[dict | None, str | None]:
    """Per engine and model shape: the step-time ratio (and LoRA's own throughput) from one
    interleaved process, the peak-memory ratio from one fresh process per arm, which also counts
    the GRIT steps' host synchronisations."""
    engines: dict[str, dict] = {}
    for shape in shapes:
        for engine in ENGINES:
            label = f"{engine}@{shape}"
            timing, error = run_item(f"overhead-time:{engine}:{shape}", workdir, device, sizes, timeout_s)
            if error:
                return None, f"{label}: {error}"
            memory = {}
            for arm in ARMS:
                memory[arm], error = run_item(f"overhead-memory:{engine}:{arm}:{shape}", workdir, device, sizes,
                                              timeout_s)
                if error:
                    return None, f"{label} ({arm}): {error}"
            peaks = {arm: memory[arm]["peak_mib"] for arm in ARMS}
            ratio = peaks["grit"] / peaks["lora"] if peaks["lora"] and peaks["grit"] else None
            engines[label] = timing | {"lora_peak_mib": peaks["lora"], "grit_peak_mib": peaks["grit"],
                                       "peak_memory_ratio": ratio,
                                       "grit_host_syncs": memory["grit"].get("grit_host_syncs"),
                                       "grit_steps_watched": memory["grit"].get("grit_steps_watched")}
    notes = ["unsloth: the LoRA arm runs Unsloth's fused kernels and compiled layers, the GRIT arm GRIT's own fused "
             "LoRA functions uncompiled, so its ratio includes leaving Unsloth's per-layer compile",
             "host syncs: counted by torch's CUDA sync debug mode around GRIT's before_step and after_step"]
    return {"engines": engines, "notes": notes}, None


def profile(workdir: Path, device: str, sizes: list[str], timeout_s: int,
            shapes: tuple[str, ...] = tuple(OVERHEAD_SHAPES)) -> tuple[dict | None, str | None]:
    """Per engine and model shape, one process profiling both arms (``overhead-profile``)."""
    engines: dict[str, dict] = {}
    for shape in shapes:
        for engine in ENGINES:
            engines[f"{engine}@{shape}"], error = run_item(f"overhead-profile:{engine}:{shape}", workdir, device,
                                                          sizes, timeout_s)
            if error:
                return None, f"{engine}@{shape}: {error}"
    return {"engines": engines}, None
