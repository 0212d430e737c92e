"""Serving speed of the base model, base + adapter and the merged GGUF, side by side in one run.

Embedded SmolLM2-135M (Q4_1) through llama.cpp. The adapter is a trained export when one exists
(``artifacts/export/<variant>/``), else a LoRA r=16 on all 7 projections with random B (the
default run's shape: speed does not depend on the values). Beside them, the base in the merged
file's format (``export.gguf.in_format``), the evaluate stage's speed reference. The four models
stay loaded and are measured as the evaluate stage measures served speed
(``evaluation.speed.side_by_side``): interleaved rounds in a rotating order on the same prompts,
exactly ``--tokens`` greedy decode steps each, ratios to the base paired by round and prompt, so
machine noise hits all alike. Printed: medians and the ratios to the base; ``--json`` also writes
them (docs/serving.md renders its table from ``benchmarks/results/serving-speed-2cpu.json``).
Target, as the evaluate stage judges it: the served fine-tuned model (merged,
``export.merged_quantization``) at ``eval.min_speed_ratio`` (0.9x) the decode speed of the base
in the same format.

    python benchmarks/serving_speed.py [--variant pure_grit] [--rounds 5] [--tokens 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation.config import EvalParams  # noqa: E402  (after the path is set)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def exported_files(variant: str, scratch: Path, files) -> tuple[Path, Path, str]:
    """(adapter GGUF, merged GGUF, where they came from)."""
    from export.adapter import convert_adapter, folded_adapter
    from export.config import ExportParams
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
    merged = merged_gguf(files, adapter, scratch / "merged.gguf", ExportParams().merged_quantization)
    return adapter, merged, "a random r=16 adapter on all 7 projections"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="pure_grit")
    parser.add_argument("--rounds", type=int, default=8, help="a multiple of 4: each form leads equally often")
    parser.add_argument("--tokens", type=int, default=EvalParams().speed_new_tokens)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from core.files import sha256_file
    from evaluation.speed import SPEED_PROMPTS, side_by_side, speed_ratios
    from export.backend import LlamaCppModel
    from export.chat_format import chat_format
    from export.config import ExportParams
    from export.gguf import in_format
    from trainers.base_model import load_tokenizer, resolve_base_model
    from trainers.config import ModelParams

    prompts = list(SPEED_PROMPTS[:EvalParams().speed_prompts])     # the evaluate stage's prompts
    files = resolve_base_model(ModelParams())
    chat = chat_format(load_tokenizer(files, ModelParams()))
    quantization = ExportParams().merged_quantization
    same_format = in_format(Path(files.gguf_path), sha256_file(Path(files.gguf_path)), quantization)
    with tempfile.TemporaryDirectory() as scratch:
        adapter, merged, origin = exported_files(args.variant, Path(scratch), files)
        # prompt_cache=False: prefill is timed on whole prompts
        models = {"base": LlamaCppModel(files.gguf_path, chat, prompt_cache=False),
                  "base+adapter": LlamaCppModel(files.gguf_path, chat, adapter, prompt_cache=False),
                  "merged": LlamaCppModel(merged, chat, prompt_cache=False),
                  "base_same_format": LlamaCppModel(same_format, chat, prompt_cache=False)}
        try:
            # The evaluate stage's own measurement: the same prompts and decode steps for every
            # model, interleaved in a rotating order, ratios paired by round and prompt.
            rates = side_by_side(models, prompts, args.tokens, args.rounds)
        finally:
            for model in models.values():
                model.close()
    ratios = speed_ratios(rates)
    fair = speed_ratios(rates, "base_same_format")["merged"]
    print(f"llama.cpp, embedded SmolLM2-135M Q4_1, {origin}; {args.rounds} rounds x {len(prompts)} prompts, "
          "median tokens/s (median of the ratios to the base paired by round and prompt)")
    labels = {"base": "base (Q4_1)", "base+adapter": "base + adapter.gguf",
              "merged": f"merged.gguf ({quantization})", "base_same_format": f"base in {quantization}"}
    forms = []
    for name in models:
        d, p = statistics.median(rates[name]["decode"]), statistics.median(rates[name]["prefill"])
        dr, pr = (ratios[name]["decode_ratio"], ratios[name]["prefill_ratio"]) if name in ratios else (1.0, 1.0)
        forms.append({"form": name, "label": labels[name], "decode": d, "prefill": p,
                      "decode_ratio": dr, "prefill_ratio": pr})
        print(f"  {name:16s} decode {d:7.1f} ({dr:.3f}x)   prefill {p:7.1f} ({pr:.3f}x)")
    target = EvalParams().min_speed_ratio
    ratio = fair["decode_ratio"]
    print(f"served fine-tuned model (merged) decode at {ratio:.3f}x the base in {quantization} "
          f"({ratios['merged']['decode_ratio']:.3f}x the base as served): "
          f"{'meets' if ratio >= target else 'MISSES'} the >= {target}x target (eval.min_speed_ratio)")
    if args.json:
        args.json.write_text(json.dumps({"adapter": origin, "threads": os.cpu_count(), "rounds": args.rounds,
                                         "prompts": len(prompts), "tokens": args.tokens, "target": target,
                                         "forms": forms,
                                         "merged_vs_same_format": {"decode_ratio": fair["decode_ratio"],
                                                                   "prefill_ratio": fair["prefill_ratio"]}},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
