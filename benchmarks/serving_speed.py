"""Serving speed of the base model, base + adapter and the merged GGUF, side by side in one run.

Embedded SmolLM2-135M (Q4_1) through llama.cpp. The adapter is a trained export when one exists
(``artifacts/export/<variant>/``), else a LoRA r=16 on all 7 projections with random B (the
default run's shape: speed does not depend on the values). The three models stay loaded and
are measured in interleaved rounds (base, adapter, merged, base, ...) on the same prompts, so
machine noise hits all alike; prefill and decode tokens/s come from llama.cpp's own timers
(new tokens only for decode). Printed: medians and the ratios to the base.
Target: the served fine-tuned model (merged) at >= 0.95x the base's decode speed.

    python benchmarks/serving_speed.py [--variant pure_grit] [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Explain how a rainbow forms.", "Write a short poem about autumn leaves.",
           "What are three tips for learning a new language?", "Describe the water cycle for a child."]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def exported_files(variant: str, scratch: Path, files) -> tuple[Path, Path, str]:
    """(adapter GGUF, merged GGUF, where they came from)."""
    from export.adapter import convert_adapter, folded_adapter
    from export.gguf import merged_gguf

    folder = ROOT / "artifacts/export" / variant
    if (folder / "adapter.gguf").is_file() and (folder / "merged.gguf").is_file():
        return folder / "adapter.gguf", folder / "merged.gguf", f"trained export of {variant}"
    import torch
    from peft import LoraConfig, get_peft_model

    from trainers.base_model import load_causal_lm
    from trainers.config import ModelParams

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(files, ModelParams()),
                           LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)
    model.save_pretrained(scratch / "adapter")
    adapter = convert_adapter(folded_adapter(scratch / "adapter", scratch / "folded"), files.hf_dir, scratch / "a.gguf")
    return adapter, merged_gguf(files, adapter, scratch / "merged.gguf", "Q4_1"), "random r=16 adapter"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="pure_grit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from export.backend import LlamaCppModel
    from export.chat_format import chat_format
    from trainers.base_model import load_tokenizer, resolve_base_model
    from trainers.config import ModelParams

    files = resolve_base_model(ModelParams())
    chat = chat_format(load_tokenizer(files, ModelParams()))
    with tempfile.TemporaryDirectory() as scratch:
        adapter, merged, origin = exported_files(args.variant, Path(scratch), files)
        # prompt_cache=False: prefill is timed on whole prompts
        models = {"base": LlamaCppModel(files.gguf_path, chat, prompt_cache=False),
                  "base+adapter": LlamaCppModel(files.gguf_path, chat, adapter, prompt_cache=False),
                  "merged": LlamaCppModel(merged, chat, prompt_cache=False)}
        decode: dict[str, list[float]] = {name: [] for name in models}
        prefill: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():   # warm-up: first calls pay for allocation
            model.generate(PROMPTS[0], 8)
        for _ in range(args.rounds):
            for prompt in PROMPTS:
                for name, model in models.items():
                    # Greedy, same prompt and budget for all three; rates are new tokens over
                    # llama.cpp's own decode time, so an earlier end of turn does not bias them.
                    generation = model.generate(prompt, args.tokens)
                    if generation.decode_tokens_per_second:
                        decode[name].append(generation.decode_tokens_per_second)
                    if generation.prefill_tokens_per_second:
                        prefill[name].append(generation.prefill_tokens_per_second)
        for model in models.values():
            model.close()
    print(f"llama.cpp, embedded SmolLM2-135M Q4_1, {origin}; {args.rounds} rounds x {len(PROMPTS)} prompts, "
          "median tokens/s (ratio to base)")
    base_decode, base_prefill = statistics.median(decode["base"]), statistics.median(prefill["base"])
    for name in models:
        d, p = statistics.median(decode[name]), statistics.median(prefill[name])
        print(f"  {name:13s} decode {d:7.1f} ({d / base_decode:.3f}x)   prefill {p:7.1f} ({p / base_prefill:.3f}x)")
    ratio = statistics.median(decode["merged"]) / base_decode
    print(f"served fine-tuned model (merged) decode at {ratio:.3f}x the base: "
          f"{'meets' if ratio >= 0.95 else 'MISSES'} the >= 0.95x target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
