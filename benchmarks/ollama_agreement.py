"""Does ``ollama run <name>`` answer what the evaluation measured? Greedy replies through a real
Ollama server against llama-cpp-python's on the same GGUF files, prompt by prompt (issue 64).

Reads a finished run (``artifacts/serve/manifest.json``, the exported files and the held-out
prompts of ``artifacts/data``). Starts a private server from the build ``make setup`` makes,
registers every served variant twice from the Modelfiles the export wrote (base + ADAPTER, and
the merged GGUF; the evaluate stage's names and files, ``evaluation.ollama_backend``) with
``ollama create -f``, checks that ``ollama show`` holds exactly the greedy
options of ``export.decoding`` (the ones llama-cpp-python is called with), then asks both engines
the first ``--prompts`` harmful and edgy-benign prompts of the evaluation's sets for
``eval.max_new_tokens`` greedy tokens. Printed and written (``--json``) per variant and form:
``evaluation.agreement`` (same opening words, same whole reply, same judge verdict and its kappa,
median shared words) and each engine's explicit-refusal rate on the harmful prompts.

    python benchmarks/ollama_agreement.py [--root DIR] [--prompts 12] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation.agreement import reply_agreement  # noqa: E402  (after the path is set)
from evaluation.config import EvalParams  # noqa: E402
from evaluation.held_out import held_out_sets  # noqa: E402
from evaluation.ollama_backend import MODELFILES as FORMS  # noqa: E402
from evaluation.ollama_backend import ollama_name  # noqa: E402
from evaluation.refusals import is_refusal  # noqa: E402


def served_variants(manifest) -> dict:
    """The serve record's fine-tuned entries that have both forms on disk."""
    return {key: entry for key, entry in manifest.models.items()
            if key != "base" and entry.adapter_gguf and entry.merged_gguf}


def llama_cpp_engine(entry, form: str, chat):
    from export.backend import LlamaCppModel

    if form == "merged":
        return LlamaCppModel(entry.merged_gguf, chat)
    return LlamaCppModel(entry.base_gguf, chat, entry.adapter_gguf)


def replies(engine, prompts: list[str], tokens: int) -> list[str]:
    try:
        return [engine.generate(prompt, tokens).text for prompt in prompts]
    finally:
        engine.close()


def refusal_rate(texts: list[str]) -> float:
    return sum(map(is_refusal, texts)) / len(texts)


def compare_form(server, key: str, entry, form: str, chat, sets: dict, tokens: int) -> dict:
    """Register one form from its Modelfile, check its options, ask both engines."""
    from export.ollama import OllamaModel
    from export.ollama_server import check_greedy, create

    modelfile = entry.adapter_gguf.parent / FORMS[form]
    name = ollama_name(key, form)
    create(server, name, modelfile)
    check_greedy(server, name, modelfile)          # raises unless every greedy option is as stated
    prompts = sets["harmful"] + sets["edgy"]
    ollama = replies(OllamaModel(server.url, name), prompts, tokens)
    llama = replies(llama_cpp_engine(entry, form, chat), prompts, tokens)
    harmful = len(sets["harmful"])
    print(f"[agreement] {key} ({form}): {len(prompts)} prompts asked of both engines", flush=True)
    return {"options_match": True, "prompts": len(prompts),
            "agreement": reply_agreement(ollama, llama).as_dict(),
            "refusal_rate": {"ollama": refusal_rate(ollama[:harmful]), "llama.cpp": refusal_rate(llama[:harmful])},
            "replies": [{"prompt": p, "ollama": o, "llama.cpp": c} for p, o, c in zip(prompts, ollama, llama,
                                                                                    strict=True)]}


def measure(root: Path, prompts: int) -> dict:
    from export.ollama_build import OLLAMA_VERSION, installed_binary
    from export.ollama_server import start_server, stop_server
    from export.served import ServeManifest

    manifest = ServeManifest.read(root / "artifacts/serve/manifest.json")
    settings = EvalParams(refusal_prompts=prompts, overrefusal_prompts=prompts)
    sets, chat = held_out_sets(root / "artifacts/data", settings), manifest.chat
    tokens = settings.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="ollama-agreement-") as scratch:
        server = start_server(installed_binary(), Path(scratch) / "models", Path(scratch) / "server.log")
        try:
            variants = {key: {form: compare_form(server, key, entry, form, chat, sets, tokens) for form in FORMS}
                        for key, entry in served_variants(manifest).items()}
        finally:
            stop_server(server.pid)
    return {"ollama_version": OLLAMA_VERSION, "greedy_tokens": tokens, "variants": variants}


def print_table(result: dict) -> None:
    print(f"Ollama {result['ollama_version']} against llama-cpp-python, {result['greedy_tokens']} greedy tokens")
    print(f"{'variant':16} {'form':8} {'n':>3} {'opening':>8} {'whole':>6} {'verdict':>8} {'kappa':>6} "
          f"{'words':>6} {'refusals ollama/llama.cpp':>26}")
    for key, forms in result["variants"].items():
        for form, row in forms.items():
            a, r = row["agreement"], row["refusal_rate"]
            print(f"{key:16} {form:8} {a['replies']:3d} {a['same_opening']:8.2f} {a['same_reply']:6.2f} "
                  f"{a['same_verdict']:8.2f} {a['verdict_kappa']:6.2f} {a['shared_words']:6.1f} "
                  f"{r['ollama']:12.2f} / {r['llama.cpp']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the run to read (a checkout after `make run`)")
    parser.add_argument("--prompts", type=int, default=12,
                        help="harmful prompts and as many edgy-benign ones (default 12 each)")
    parser.add_argument("--json", type=Path, help="also write the figures and every reply here")
    args = parser.parse_args(argv)
    if not (args.root / "artifacts/serve/manifest.json").is_file():
        print(f"error: {args.root}/artifacts/serve/manifest.json is missing: run `make run` there first",
              file=sys.stderr)
        return 2
    result = measure(args.root, args.prompts)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
