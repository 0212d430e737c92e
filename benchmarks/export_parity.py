"""The export stage's parity check, before and after its two speed-ups, side by side.

Parity compares the PEFT model's next-token logits with llama.cpp's on held-out prompts
(``export/parity.py``). Two changes made it cheaper, each measured here against the way it ran
before, rounds alternated so machine noise hits both alike:

- reference: prompts in right-padded batches projecting only each prompt's last real position
  onto the vocabulary (``peft_next_token_logits``) against one prompt at a time with every
  position projected (the former code, written out below);
- served: llama.cpp keeping the key/value cache of the prefix a prompt shares with the last one
  (``LlamaCppModel(prompt_cache=True)``, the default) against evaluating every prompt whole.

Prints the ratio of median times and the largest difference between the figures of each pair,
on the embedded SmolLM2-135M with a LoRA adapter (B drawn at random, so the adapter matters).

    python benchmarks/export_parity.py [--prompts 100] [--rounds 3]
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


def one_at_a_time(model, tokenizer, prompts, chat):
    """The former reference: each prompt alone, every position projected onto the vocabulary."""
    import torch

    with torch.no_grad():
        return [model(input_ids=tokenizer(chat.render(p), add_special_tokens=False, return_tensors="pt").input_ids)
                .logits[0, -1].double().numpy() for p in prompts]


def timed(function, *args) -> tuple[float, list]:
    started = time.perf_counter()
    out = function(*args)
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import numpy as np

    from benchmarks.embedded_lora import embedded_lora_model
    from export.backend import LlamaCppModel
    from export.parity import next_token_parity, peft_next_token_logits
    from trainers.data.sources import rho_refusal_pairs

    tokenizer, chat, model, files = embedded_lora_model(b_std=0.01)
    # held-out prompts as the stage takes them: harmful and benign alternating
    prompts = [t for pair in rho_refusal_pairs() for t in (pair.harmful, pair.benign)][: args.prompts]
    served = {cached: LlamaCppModel(files.gguf_path, chat, prompt_cache=cached) for cached in (True, False)}

    seconds: dict[str, list[float]] = {k: [] for k in ("batched", "alone", "cached", "whole")}
    logits: dict[str, list] = {}
    for _ in range(args.rounds):
        for key, run in (("batched", lambda: peft_next_token_logits(model, tokenizer, prompts, chat)),
                         ("alone", lambda: one_at_a_time(model, tokenizer, prompts, chat)),
                         ("cached", lambda: [served[True].next_token_logits(p) for p in prompts]),
                         ("whole", lambda: [served[False].next_token_logits(p) for p in prompts])):
            elapsed, logits[key] = timed(run)
            seconds[key].append(elapsed)
    for llm in served.values():
        llm.close()

    def largest_difference(a: str, b: str) -> float:
        return float(max(np.abs(x - y).max() for x, y in zip(logits[a], logits[b], strict=True)))

    median = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "prompts": len(prompts), "rounds": args.rounds, "seconds": median,
        "reference_ratio": median["batched"] / median["alone"],
        "reference_max_abs_logit_difference": largest_difference("batched", "alone"),
        "served_ratio": median["cached"] / median["whole"],
        "served_max_abs_logit_difference": largest_difference("cached", "whole"),
        "parity_before": vars(next_token_parity(logits["alone"], logits["whole"])),
        "parity_after": vars(next_token_parity(logits["batched"], logits["cached"])),
    }
    print(json.dumps(result, indent=2))
    print(f"[benchmark] reference batched / one at a time: {result['reference_ratio']:.2f} of the time, logits "
          f"within {result['reference_max_abs_logit_difference']:.1e}")
    print(f"[benchmark] llama.cpp with prompt cache / whole prompts: {result['served_ratio']:.2f} of the time, "
          f"logits within {result['served_max_abs_logit_difference']:.1e}")
    print(f"[benchmark] parity before: {next_token_parity(logits['alone'], logits['whole']).describe()}")
    print(f"[benchmark] parity after:  {next_token_parity(logits['batched'], logits['cached']).describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
