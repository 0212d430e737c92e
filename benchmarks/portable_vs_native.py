"""Decode and prefill speed of the portable llama.cpp build against a native one, side by side.

Both wheels are built from the pinned sdist (cached under ``$GRIT_CACHE_DIR/wheels/<plan key>``;
the native build takes another 6-7 min on 2 cores the first time) and unpacked into a scratch
folder. One worker process per build loads the embedded SmolLM2-135M Q4_1 through the project's
serving backend; the parent alternates them prompt by prompt (portable first in odd rounds,
native first in even ones), so only one decodes at a time and machine noise hits both alike.
Rates come from llama.cpp's own timers (new tokens only). Printed: medians and the ratio
portable / native. Run it on a host where both builds run (a native build may die on a host
that advertises instructions it does not allow: that is the reason for the portable default).

    python benchmarks/portable_vs_native.py [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation.speed import SPEED_PROMPTS as PROMPTS  # noqa: E402  (needs the path set above)


def worker(tokens: int) -> int:
    """One build: load the model, print where llama_cpp came from, then answer each prompt index
    read from stdin with one JSON line of tokens/s."""
    import llama_cpp

    from export.backend import LlamaCppModel
    from export.chat_format import chat_format
    from trainers.base_model import load_tokenizer, resolve_base_model
    from trainers.config import ModelParams

    files = resolve_base_model(ModelParams())
    model = LlamaCppModel(files.gguf_path, chat_format(load_tokenizer(files, ModelParams())),
                          prompt_cache=False)   # prefill timed on whole prompts
    model.generate(PROMPTS[0], 8)  # warm-up: the first call pays for allocation
    info = llama_cpp.llama_print_system_info().decode()
    print(json.dumps({"module": llama_cpp.__file__, "system_info": info}), flush=True)
    for line in sys.stdin:
        generation = model.generate(PROMPTS[int(line)], tokens)
        print(json.dumps({"decode": generation.decode_tokens_per_second,
                          "prefill": generation.prefill_tokens_per_second}), flush=True)
    model.close()
    return 0


def unpacked_build(flavour: str, scratch: Path) -> tuple[str, Path]:
    """(plan label, folder holding that build's ``llama_cpp`` package)."""
    from export.llama_cpp import build_plan, build_wheel, download_sdist, host_cpu_flags

    plan = build_plan(flavour, platform.machine(), host_cpu_flags())
    wheel = build_wheel(download_sdist(), plan)
    target = scratch / plan.label
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    for library in target.rglob("*.so*"):  # zipfile drops the executable bit
        library.chmod(0o755)
    return plan.label, target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.tokens)

    with tempfile.TemporaryDirectory() as scratch:
        builds = dict(unpacked_build(flavour, Path(scratch)) for flavour in ("portable", "native"))
        workers = {}
        for label, folder in builds.items():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}
            workers[label] = subprocess.Popen(
                [sys.executable, __file__, "--worker", "--tokens", str(args.tokens)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            )
        for label, process in workers.items():
            ready = json.loads(process.stdout.readline())
            assert Path(ready["module"]).is_relative_to(builds[label]), ready["module"]
            print(f"{label}: {ready['system_info'].strip()}")
        rates = {label: {"decode": [], "prefill": []} for label in workers}
        order = list(workers)
        for round_index in range(args.rounds):
            for prompt_index in range(len(PROMPTS)):
                for label in order if round_index % 2 == 0 else order[::-1]:
                    process = workers[label]
                    process.stdin.write(f"{prompt_index}\n")
                    process.stdin.flush()
                    measured = json.loads(process.stdout.readline())
                    for kind in ("decode", "prefill"):
                        if measured[kind]:
                            rates[label][kind].append(measured[kind])
        for process in workers.values():
            process.stdin.close()
            process.wait(timeout=60)

    portable, native = order
    print(f"llama.cpp, embedded SmolLM2-135M Q4_1, base model; {args.rounds} rounds x {len(PROMPTS)} prompts "
          f"x {args.tokens} tokens, median tokens/s")
    for kind in ("decode", "prefill"):
        p, n = statistics.median(rates[portable][kind]), statistics.median(rates[native][kind])
        print(f"  {kind:7s} {portable} {p:7.1f}   {native} {n:7.1f}   portable / native = {p / n:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
