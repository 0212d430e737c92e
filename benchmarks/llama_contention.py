"""llama.cpp generation alone and beside one competing CPU-bound process, per threading setting.

Embedded SmolLM2-135M (the package's Q4_1 GGUF) through llama-cpp-python, greedy decoding of
``--tokens`` tokens per round. Each measurement is a fresh process (OpenMP reads its wait policy
when it is loaded, and torch, imported first as in every stage, loads the ``libgomp`` llama.cpp
then uses). The competitor is one single-threaded busy loop started just before and killed just
after. Settings are measured in interleaved order, alone and contended, ``--repeats`` times, and
the medians are compared side by side:

- ``openmp-default``: every usable CPU, GNU OpenMP's default spin (300,000 rounds before sleeping);
- ``project``: every usable CPU, the project's spin (``core.threads.SPIN_COUNT``), what stages use;
- ``passive``: every usable CPU, ``OMP_WAIT_POLICY=passive`` (sleep at once);
- ``one-thread``: a single llama.cpp thread.

Also, because torch shares that OpenMP runtime, a LoRA training step of SmolLM2-135M (batch 4 x
128 tokens) with OpenMP's default spin and with the project's, alone.
Target: generation beside one competing process at most 2.5x slower than alone on 2 cores, with
the project's setting, and no slower alone than OpenMP's default (within noise).

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

from core.threads import SPIN_COUNT, usable_cpus  # noqa: E402  (after the path is set)

SETTINGS = {
    "openmp-default": {"GOMP_SPINCOUNT": "300000"},
    "project": {"GOMP_SPINCOUNT": str(SPIN_COUNT)},
    "passive": {"OMP_WAIT_POLICY": "passive"},
    "one-thread": {"GOMP_SPINCOUNT": str(SPIN_COUNT), "GRIT_LLAMA_THREADS": "1"},
}
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
    threads = model.llm.n_threads
    model.close()
    return {"tokens_per_second": timing.decode_tokens_per_second, "threads": threads}


def child_training(steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from trainers.base_model import load_causal_lm, resolve_base_model
    from trainers.config import ModelParams

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(resolve_base_model(ModelParams()), ModelParams()),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"]))
    batch = torch.randint(0, 1000, (4, 128))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        times.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times[1:])}


def measure(kind: str, setting: str, contended: bool, amount: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env |= SETTINGS[setting] | {"PYTHONPATH": str(ROOT)}
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if contended else None
    try:
        if competitor:
            time.sleep(0.5)
        result = subprocess.run([sys.executable, __file__, "--child", kind, "--amount", str(amount)], env=env,
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
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=["generation", "training"], help=argparse.SUPPRESS)
    parser.add_argument("--amount", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        figures = child_generation(args.amount) if args.child == "generation" else child_training(args.amount)
        print(json.dumps(figures))
        return 0

    rates: dict[tuple[str, bool], list[float]] = {}
    for repeat in range(args.repeats):
        order = list(SETTINGS)[repeat % len(SETTINGS):] + list(SETTINGS)[:repeat % len(SETTINGS)]
        for setting in order:
            for contended in (False, True) if repeat % 2 == 0 else (True, False):
                rate = measure("generation", setting, contended, args.tokens)["tokens_per_second"]
                rates.setdefault((setting, contended), []).append(rate)
                print(f"  repeat {repeat + 1}: {setting:15s} {'beside a busy process' if contended else 'alone':22s}"
                      f" {rate:7.1f} tokens/s", flush=True)
    steps: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for setting in ("openmp-default", "project") if repeat % 2 == 0 else ("project", "openmp-default"):
            steps.setdefault(setting, []).append(measure("training", setting, False, args.train_steps)["step_s"])

    cpus = usable_cpus()
    print(f"\nllama.cpp generation on {cpus} usable CPUs, {args.tokens} tokens, median of {args.repeats}:")
    print(f"{'setting':16s} {'alone tok/s':>12s} {'contended':>10s} {'slowdown':>9s}")
    table = {}
    for setting in SETTINGS:
        alone, contended = (statistics.median(rates[(setting, c)]) for c in (False, True))
        table[setting] = {"alone_tokens_per_second": round(alone, 1),
                          "contended_tokens_per_second": round(contended, 1), "slowdown": round(alone / contended, 2)}
        print(f"{setting:16s} {alone:12.1f} {contended:10.1f} {alone / contended:8.2f}x")
    train = {s: statistics.median(v) for s, v in steps.items()}
    print(f"\nLoRA training step (SmolLM2-135M, 4 x 128 tokens), alone: OpenMP default {train['openmp-default']:.3f} s,"
          f" project {train['project']:.3f} s, ratio {train['project'] / train['openmp-default']:.3f}")
    verdict = table["project"]["slowdown"] <= 2.5
    print(f"target (project setting at most 2.5x slower beside one busy process): {'met' if verdict else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"usable_cpus": cpus, "tokens": args.tokens, "repeats": args.repeats,
                                         "spin_count": SPIN_COUNT, "generation": table,
                                         "training_step_s": {k: round(v, 4) for k, v in train.items()},
                                         "target_met": verdict}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
