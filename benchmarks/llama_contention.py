"""llama.cpp generation alone and beside one competing CPU-bound process, per thread setting.

Embedded SmolLM2-135M (the package's Q4_1 GGUF) through llama-cpp-python: a prompt is evaluated
(prefill) and ``--tokens`` tokens are decoded greedily, as the evaluate stage times served speed
(``evaluation.speed.time_one``). Each measurement is a fresh process, with torch imported first
as in every stage (llama.cpp then shares torch's OpenMP runtime). The competitor is one
single-threaded busy loop, started just before and killed just after. Settings are measured in
interleaved order, alone and contended, ``--repeats`` times; medians side by side:

- ``all-cpus``: every usable CPU for decoding and prompts (the project's setting before);
- ``project``: half the usable CPUs to decode, all of them for prompts (``core/threads.py``);
- ``passive``: every usable CPU with ``OMP_WAIT_POLICY=passive`` (threads sleep at a barrier);
- ``one-thread``: one thread for both.

Target: decoding beside one busy process at most 2.5x slower than alone on 2 cores, with the
project's setting, and alone no slower than ``all-cpus`` (within noise).

    python benchmarks/llama_contention.py [--tokens 64] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.threads import usable_cpus  # noqa: E402  (after the path is set)


def settings(cpus: int) -> dict[str, dict[str, str]]:
    return {"all-cpus": {"GRIT_LLAMA_THREADS": str(cpus)},
            "project": {},
            "passive": {"GRIT_LLAMA_THREADS": str(cpus), "OMP_WAIT_POLICY": "passive"},
            "one-thread": {"GRIT_LLAMA_THREADS": "1"}}


PROMPT = "Explain in a few sentences how a refrigerator keeps food cold, and why the back of it is warm."


def child_generation(tokens: int) -> dict:
    import torch  # noqa: F401  (loaded first, as in a stage: its libgomp is the one llama.cpp uses)

    from export.backend import LlamaCppModel
    from export.chat_format import chat_format
    from trainers.base_model import load_tokenizer, resolve_base_model
    from trainers.config import ModelParams

    files = resolve_base_model(ModelParams())
    model = LlamaCppModel(files.gguf_path, chat_format(load_tokenizer(files, ModelParams())), prompt_cache=False)
    from evaluation.speed import time_one

    prompt = model.prompt_tokens(PROMPT)
    time_one(model.llm, prompt, 8)                                      # warm-up
    timing = time_one(model.llm, prompt, tokens)
    threads = [model.llm.n_threads, model.llm.n_threads_batch]
    model.close()
    return {"decode": timing.decode_tokens_per_second, "prefill": timing.prefill_tokens_per_second,
            "threads": threads}


def measure(environment: dict[str, str], contended: bool, tokens: int) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "GRIT_LLAMA_THREADS")}
    env |= environment | {"PYTHONPATH": str(ROOT)}
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if contended else None
    try:
        if competitor:
            time.sleep(0.5)
        result = subprocess.run([sys.executable, __file__, "--child", "--tokens", str(tokens)], env=env,
                                capture_output=True, text=True, check=True)
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_generation(args.tokens)))
        return 0

    cpus = usable_cpus()
    chosen = settings(cpus)
    rates: dict[tuple[str, bool], list[dict]] = {}
    threads: dict[str, list[int]] = {}
    for repeat in range(args.repeats):
        names = list(chosen)
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for setting in order:
            for contended in (False, True) if repeat % 2 == 0 else (True, False):
                figures = measure(chosen[setting], contended, args.tokens)
                rates.setdefault((setting, contended), []).append(figures)
                threads[setting] = figures["threads"]
                print(f"  repeat {repeat + 1}: {setting:11s} {'beside a busy process' if contended else 'alone':22s}"
                      f" decode {figures['decode']:6.1f}  prefill {figures['prefill']:6.1f} tokens/s", flush=True)

    def median_of(setting: str, contended: bool, key: str) -> float:
        return statistics.median(r[key] for r in rates[(setting, contended)])

    print(f"\nllama.cpp on {cpus} usable CPUs, {args.tokens} decoded tokens, median of {args.repeats} (tokens/s):")
    print(f"{'setting':11s} {'threads':>9s} {'decode alone':>13s} {'contended':>10s} {'slowdown':>9s} "
          f"{'prefill alone':>14s} {'contended':>10s} {'slowdown':>9s}")
    table = {}
    for setting in chosen:
        row = {}
        for key in ("decode", "prefill"):
            alone, contended = median_of(setting, False, key), median_of(setting, True, key)
            row |= {f"{key}_alone": round(alone, 1), f"{key}_contended": round(contended, 1),
                    f"{key}_slowdown": round(alone / contended, 2)}
        table[setting] = {"threads (decode, batch)": threads[setting], **row}
        print(f"{setting:11s} {str(tuple(threads[setting])):>9s} {row['decode_alone']:13.1f} "
              f"{row['decode_contended']:10.1f} {row['decode_slowdown']:8.2f}x {row['prefill_alone']:14.1f} "
              f"{row['prefill_contended']:10.1f} {row['prefill_slowdown']:8.2f}x")
    met = table["project"]["decode_slowdown"] <= 2.5
    kept = table["project"]["decode_alone"] / table["all-cpus"]["decode_alone"]
    print(f"target (project: decoding at most 2.5x slower beside one busy process): {'met' if met else 'MISSED'}; "
          f"project alone / all-cpus alone: decode {kept:.3f}, prefill "
          f"{table['project']['prefill_alone'] / table['all-cpus']['prefill_alone']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"usable_cpus": cpus, "tokens": args.tokens, "repeats": args.repeats,
                                         "settings": table, "target_met": met}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
