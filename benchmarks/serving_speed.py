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

Beside them, Ollama's decode against llama-cpp-python's on the same files (the base and the
merged GGUF), through the build ``make setup`` makes, on a private server (``--no-ollama`` skips
it).

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
from evaluation.speed import speed_ratios  # noqa: E402

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


def ollama_beside_llama_cpp(forms: dict[str, tuple[Path, object]], chat, prompts: list[str], tokens: int,
                            rounds: int, scratch: Path) -> dict:
    """Decode speed of the same GGUF files through the project's Ollama build and through
    llama-cpp-python, interleaved (rotating order) on the same prompts; per form, medians and the
    median Ollama/llama.cpp ratio paired by round and prompt.

    Ollama's rate is its own ``eval_count / eval_duration`` (timed inside the server, its reply
    may stop at the end of turn before ``tokens``); llama.cpp's is ``evaluation.speed.time_one``
    (in-process, exactly ``tokens`` steps). Prefill is not compared: Ollama reuses a cached prompt
    across requests, so its prefill figure is not a whole prompt's."""
    from evaluation.speed import paired_median_ratio, rotation, time_one
    from export.modelfile import ServedModel
    from export.ollama import OllamaModel
    from export.ollama_build import OLLAMA_VERSION, installed_binary
    from export.ollama_server import create, start_server, stop_server

    binary = installed_binary()
    server = start_server(binary, scratch / "ollama-models", scratch / "ollama.log")
    try:
        engines = {}
        for form, (gguf, llama) in forms.items():
            served = ServedModel(name=f"bench_{form}", variant=form, base_gguf=gguf, chat=chat)
            (scratch / f"Modelfile.{form}").write_text(served.modelfile("adapter"))
            create(server, served.name, scratch / f"Modelfile.{form}")
            engines[f"ollama:{form}"] = OllamaModel(server.url, served.name)
            engines[f"llama.cpp:{form}"] = llama
        token_lists = {prompt: next(iter(forms.values()))[1].prompt_tokens(prompt) for prompt in prompts}

        def decode_rate(engine: str, prompt: str, steps: int) -> float:
            if engine.startswith("ollama:"):
                return engines[engine].generate(prompt, steps).decode_tokens_per_second
            return time_one(engines[engine].llm, token_lists[prompt], steps).decode_tokens_per_second

        for engine in engines:        # untimed: loads the model and pages in its weights
            decode_rate(engine, prompts[0], 4)
        rates: dict[str, list[float]] = {engine: [] for engine in engines}
        for round_index in range(rounds):
            for prompt in prompts:
                for engine in rotation(list(engines), round_index):
                    rates[engine].append(decode_rate(engine, prompt, tokens))
    finally:
        stop_server(server.pid)
    return {"version": OLLAMA_VERSION, "build": binary.resolve().parent.name,
            "forms": {form: {"ollama_decode": statistics.median(rates[f"ollama:{form}"]),
                             "llama_cpp_decode": statistics.median(rates[f"llama.cpp:{form}"]),
                             "decode_ratio": paired_median_ratio(rates[f"ollama:{form}"],
                                                                 rates[f"llama.cpp:{form}"])}
                      for form in forms}}


LABELS = {"base": "base (Q4_1)", "base+adapter": "base + adapter.gguf", "merged": "merged.gguf ({q})",
          "base_same_format": "base in {q}"}


def form_rows(rates: dict, quantization: str) -> list[dict]:
    """One row per served form: median tokens/s and the paired ratios to the base."""
    ratios = speed_ratios(rates)
    rows = []
    for name in rates:
        decode, prefill = statistics.median(rates[name]["decode"]), statistics.median(rates[name]["prefill"])
        dr, pr = (ratios[name]["decode_ratio"], ratios[name]["prefill_ratio"]) if name in ratios else (1.0, 1.0)
        rows.append({"form": name, "label": LABELS[name].format(q=quantization), "decode": decode,
                     "prefill": prefill, "decode_ratio": dr, "prefill_ratio": pr})
    return rows


def report(rows: list[dict], fair: dict, ollama: dict | None, origin: str, quantization: str, rounds: int,
           prompts: int) -> None:
    print(f"llama.cpp, embedded SmolLM2-135M Q4_1, {origin}; {rounds} rounds x {prompts} prompts, "
          "median tokens/s (median of the ratios to the base paired by round and prompt)")
    for row in rows:
        print(f"  {row['form']:16s} decode {row['decode']:7.1f} ({row['decode_ratio']:.3f}x)   "
              f"prefill {row['prefill']:7.1f} ({row['prefill_ratio']:.3f}x)")
    target, ratio = EvalParams().min_speed_ratio, fair["decode_ratio"]
    merged_ratio = next(row["decode_ratio"] for row in rows if row["form"] == "merged")
    print(f"served fine-tuned model (merged) decode at {ratio:.3f}x the base in {quantization} "
          f"({merged_ratio:.3f}x the base as served): "
          f"{'meets' if ratio >= target else 'MISSES'} the >= {target}x target (eval.min_speed_ratio)")
    if ollama is not None:
        print(f"Ollama {ollama['version']} (build {ollama['build']}) against llama-cpp-python on the same files, "
              "decode tokens/s:")
        for form, figures in ollama["forms"].items():
            print(f"  {form:16s} Ollama {figures['ollama_decode']:7.1f}   llama.cpp {figures['llama_cpp_decode']:7.1f}"
                  f"   ratio {figures['decode_ratio']:.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="pure_grit")
    parser.add_argument("--rounds", type=int, default=8, help="a multiple of 4: each form leads equally often")
    parser.add_argument("--tokens", type=int, default=EvalParams().speed_new_tokens)
    parser.add_argument("--no-ollama", action="store_true", help="skip Ollama's decode beside llama.cpp's")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from core.files import sha256_file
    from evaluation.speed import SPEED_PROMPTS, side_by_side
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
    ollama = None
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
            if not args.no_ollama:
                ollama = ollama_beside_llama_cpp({"base": (Path(files.gguf_path), models["base"]),
                                                  "merged": (merged, models["merged"])},
                                                 chat, prompts, args.tokens, args.rounds, Path(scratch))
        finally:
            for model in models.values():
                model.close()
    rows, fair = form_rows(rates, quantization), speed_ratios(rates, "base_same_format")["merged"]
    report(rows, fair, ollama, origin, quantization, args.rounds, len(prompts))
    if args.json:
        figures = {"adapter": origin, "threads": os.cpu_count(), "rounds": args.rounds, "prompts": len(prompts),
                   "tokens": args.tokens, "target": EvalParams().min_speed_ratio, "forms": rows,
                   "merged_vs_same_format": {"decode_ratio": fair["decode_ratio"],
                                             "prefill_ratio": fair["prefill_ratio"]}}
        args.json.write_text(json.dumps(figures if ollama is None else {**figures, "ollama": ollama}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
