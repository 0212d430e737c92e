"""``make gpu-check``: what only a CUDA machine can show, in a few minutes, with no model hub.

    python -m pipelines.gpu_check [--out reports/gpu_check.json] [--items hybrid,truncation,qlora,bf16,overhead,profile]

Runs each item of ``pipelines/gpu_check`` in its own process (``items.py``: Unsloth patches
libraries for the whole process), judges it (``report.py``), prints a table and writes one JSON
report. The items are ``report.CHECKS``'s, each declared there once (title, judge, headline,
whether it needs CUDA, how it runs), the ones ``items.REGISTRY`` serves (a test checks that they
agree; this module does not import ``items.py``, which loads torch, transformers and the
trainers). ``overhead`` and ``profile`` are composed of several worker processes
(``processes.py``); every other item is one process of its own name.

Exit 0 when every item passes, 1 when one fails, 2 for an unknown item, 3 when no CUDA device
is visible (one line, nothing run). ``--device cpu`` rehearses the plumbing on a machine without
a GPU (the test suite does): its figures say nothing about CUDA and it never counts as a GPU check.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipelines.gpu_check.processes import ROOT
from pipelines.gpu_check.report import CHECKS, EXIT_NO_CUDA, exit_code, judge, report, table
from pipelines.gpu_check.sizing import OVERHEAD_SHAPES, Sizing

ITEMS = tuple(CHECKS)
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


def keep_logs(workdir: Path, folder: Path) -> Path | None:
    """Copy the failed items' output out of the scratch folder (it is deleted at the end)."""
    logs = sorted(workdir.glob("*.log"))
    if not logs:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    for log in logs:
        (folder / log.name).write_text(log.read_text())
    return folder


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
    refusal = Sizing.from_args(args).refusal(args.device)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
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
            check = CHECKS[item]
            if check.cuda_only and args.device != "cuda":
                results.append(judge(item, None, not_run=check.cuda_only))
                continue
            figures, error = check.run(workdir, args.device, sizes, args.timeout, shapes)
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

