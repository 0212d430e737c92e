"""``make gpu-check``: what only a CUDA machine can show, in a few minutes, with no model hub.

    python -m pipelines.gpu_check [--out reports/gpu_check.json] [--items hybrid,truncation,qlora,bf16,overhead,profile]

Runs each item of ``pipelines/gpu_check`` in its own process (``items.py``: Unsloth patches
libraries for the whole process), judges it (``report.py``), prints a table and writes one JSON
report. The items are ``report.TITLES``'s, the ones ``items.REGISTRY`` serves (a test checks
that they agree; this module does not import ``items.py``, which loads torch, transformers and
the trainers). ``overhead`` is composed here from per-process items: the interleaved step
times of both arms in one process, each arm's peak memory in a fresh one per arm; ``profile``
(a diagnosis, no target) from one process per engine and shape that profiles both arms.

Exit 0 when every item passes, 1 when one fails, 2 for an unknown item, 3 when no CUDA device
is visible (one line, nothing run). ``--device cpu`` rehearses the plumbing on a machine without
a GPU (the test suite does): its figures say nothing about CUDA and it never counts as a GPU check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipelines.gpu_check.report import EXIT_NO_CUDA, TITLES, exit_code, judge, report, table
from pipelines.gpu_check.sizing import OVERHEAD_SHAPES, Sizing
from profiling.timing import ARMS

ROOT = Path(__file__).resolve().parents[2]
ITEMS = tuple(TITLES)
ENGINES = ("unsloth", "peft")
# Items that say nothing off CUDA: not run there (reported, never a pass).
CUDA_ONLY = {"qlora": "bitsandbytes NF4 needs CUDA"}
NO_CUDA = ("no CUDA device: make gpu-check needs an NVIDIA GPU that torch can see (torch.cuda.is_available() "
           "is False); see docs/gpu.md")


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, object]:
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {"device": device, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "packages": {name: installed(name) for name in (
                "unsloth", "unsloth_zoo", "peft", "transformers", "trl", "bitsandbytes", "accelerate")}}


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


def keep_logs(workdir: Path, folder: Path) -> Path | None:
    """Copy the failed items' output out of the scratch folder (it is deleted at the end)."""
    logs = sorted(workdir.glob("*.log"))
    if not logs:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    for log in logs:
        (folder / log.name).write_text(log.read_text())
    return folder


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu_check.json")
    parser.add_argument("--items", default=",".join(ITEMS), help=f"comma-separated subset of {', '.join(ITEMS)}")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: rehearse the plumbing without a GPU (never a GPU check)")
    Sizing.add_arguments(parser)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per item process")
    parser.add_argument("--shapes", default=",".join(OVERHEAD_SHAPES),
                        help=f"model shapes of the overhead and profile items: some of {', '.join(OVERHEAD_SHAPES)}")
    args = parser.parse_args(argv)
    shapes = tuple(shape.strip() for shape in args.shapes.split(",") if shape.strip())
    if not shapes or any(shape not in OVERHEAD_SHAPES for shape in shapes):
        print(f"error: --shapes {args.shapes!r}: choose from {', '.join(OVERHEAD_SHAPES)}", file=sys.stderr)
        return 2
    wanted = [item.strip() for item in args.items.split(",") if item.strip()]
    unknown = [item for item in wanted if item not in ITEMS]
    if unknown:
        print(f"error: unknown item {unknown[0]!r}; choose from {', '.join(ITEMS)}", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: {NO_CUDA}", file=sys.stderr)
        return EXIT_NO_CUDA
    sizes = Sizing.from_args(args).argv()
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        workdir = Path(scratch)
        for item in wanted:
            print(f"[gpu-check] {item} ...", flush=True)
            if item in CUDA_ONLY and args.device != "cuda":
                results.append(judge(item, None, not_run=CUDA_ONLY[item]))
                continue
            if item in ("overhead", "profile"):
                run = overhead if item == "overhead" else profile
                figures, error = run(workdir, args.device, sizes, args.timeout, shapes)
            else:
                figures, error = run_item(item, workdir, args.device, sizes, args.timeout)
            results.append(judge(item, figures, error))
        kept = keep_logs(workdir, args.out.with_name(args.out.stem + "_logs"))
    payload = report(results, environment(args.device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    print(table(results))
    if kept:
        print(f"[gpu-check] output of the failed items: {kept}")
    print(f"[gpu-check] report: {args.out}" + ("" if args.device == "cuda" else " (cpu rehearsal: not a GPU check)"))
    return exit_code(results)

