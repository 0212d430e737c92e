"""The stable refusal measure's cost: prompts in batches against one prompt at a time.

``evaluation.measure.continuation_logprobs`` scores every reply opening after each held-out
prompt. It runs prompts in right-padded batches of ``measure.BATCH``; with ``BATCH = 1`` the
same code runs one prompt at a time (how it ran before). This benchmark times both on the
embedded SmolLM2-135M with a LoRA adapter attached (as the evaluate stage and the study measure
it), rounds alternated so machine noise hits both alike, and prints the ratio of medians and the
largest difference between their figures.

    python benchmarks/decline_probability.py [--prompts 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import numpy as np

    from benchmarks.embedded_lora import embedded_lora_model
    from evaluation import measure
    from evaluation.refusals import COMPLY_OPENINGS, DECLINE_OPENINGS
    from trainers.data.sources import harmbench_prompts

    tokenizer, chat, model, _ = embedded_lora_model()
    prompts = [p.text for p in harmbench_prompts()[: args.prompts]]
    openings = [*DECLINE_OPENINGS, *COMPLY_OPENINGS]
    batch = measure.BATCH
    seconds: dict[int, list[float]] = {batch: [], 1: []}
    scores: dict[int, np.ndarray] = {}
    for _ in range(args.rounds):
        for size in (batch, 1):
            measure.BATCH = size
            started = time.perf_counter()
            scores[size] = measure.continuation_logprobs(model, tokenizer, prompts, chat, openings)
            seconds[size].append(time.perf_counter() - started)
    measure.BATCH = batch
    result = {
        "prompts": len(prompts), "openings": len(openings), "rounds": args.rounds, "batch": batch,
        "seconds_batched": statistics.median(seconds[batch]), "seconds_one_at_a_time": statistics.median(seconds[1]),
        "max_abs_difference": float(np.abs(scores[batch] - scores[1]).max()),
    }
    result["speedup"] = result["seconds_one_at_a_time"] / result["seconds_batched"]
    print(json.dumps(result, indent=2))
    print(f"[benchmark] batched / one at a time: {1 / result['speedup']:.3f} of the time "
          f"({result['speedup']:.1f}x faster); figures agree within {result['max_abs_difference']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
