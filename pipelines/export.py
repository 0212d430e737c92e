"""DVC stage ``export@<variant>``: the trained adapter as GGUF files and Ollama Modelfiles.

Writes ``artifacts/export/<variant>/``: ``adapter.gguf`` (scaling folded into B, llama.cpp's own
converter), ``merged.gguf`` (adapter merged into the fp32 base, quantised per
``export.quantization``), ``Modelfile`` (FROM base + ADAPTER) and ``Modelfile.merged``, and
``export.json`` (files, sha256, chat format, parity figures). Before publishing, the served files
are compared with the PEFT model on held-out prompts (``export/parity.py``); an export that
computes something else fails the stage and leaves the previous export as it was. Seed
replicates (``train.n_seeds > 1``) are exported the same way into ``seed-<s>/`` subfolders.
A variant whose LoRA settings have no GGUF form (DoRA: ``trainers.config.lora_capabilities``)
is skipped with one line saying why; its folder holds only ``skipped.json``.
"""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.files import files_under, fresh_staging_dir, publish_directory, sha256_file
from core.jsonl import read_jsonl
from db.models import EvalMetric
from pipelines.params import Params, capabilities, require_text_model
from pipelines.paths import ADAPTERS, DATA_DIR, export_dir
from pipelines.replicates import model_key, replicate_path
from pipelines.stage import StageContext, declared_variant, run_stage, stage_arguments, variant_argument
from trainers.config import Capabilities

PARITY_SOURCE = DATA_DIR / "eval_aqi.jsonl"
SKIPPED = "skipped.json"      # the export folder of a variant that cannot be served: why


def ollama_name(variant: str) -> str:
    return f"{variant}_model"


def parity_prompts(root: Path, n: int) -> list[str]:
    """The first ``n`` held-out prompts (harmful and benign alternate), never trained on."""

    return [row["prompt"] for row in read_jsonl(root / PARITY_SOURCE)[:n]]


def export_variant(ctx: StageContext, variant: str, seed: int, staging: Path) -> dict[str, Any]:
    """One replicate's GGUF files and Modelfiles into ``staging``, checked against the PEFT model;
    returns its ``export.json``."""
    from export.adapter import convert_adapter, folded_adapter
    from export.chat_format import chat_format
    from export.gguf import base_gguf, merged_gguf
    from export.modelfile import ServedModel
    from trainers.base_model import load_tokenizer, resolve_base_model

    params, settings = ctx.params, ctx.params.export
    files = resolve_base_model(params.model)
    tokenizer = load_tokenizer(files, params.model)
    chat = chat_format(tokenizer)
    adapter_dir = ctx.root / replicate_path(ADAPTERS / variant, params, seed)
    label = model_key(variant, params, seed)
    metadata = json.loads((adapter_dir / "grit_metadata.json").read_text())
    base = base_gguf(files, settings.quantization)

    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"export-{label}-") as scratch:
        folded = folded_adapter(adapter_dir, Path(scratch) / "folded", metadata.get("scalings"))
        adapter = convert_adapter(folded, files.hf_dir, staging / "adapter.gguf")
    merged = (merged_gguf(files, adapter, staging / "merged.gguf", settings.merged_quantization)
              if settings.merged and capabilities(params, variant).mergeable else None)
    served = ServedModel(
        name=ollama_name(label), variant=variant, base_gguf=base, chat=chat, adapter_gguf=adapter,
        merged_gguf=merged, parameters={"temperature": settings.temperature, "seed": settings.seed,
                                        "num_predict": settings.num_predict, "num_ctx": settings.num_ctx})
    parity = served_parity(ctx, label, adapter_dir, (files, tokenizer, chat),
                           {"adapter": (base, adapter), "merged": (merged, None)})

    (staging / "Modelfile").write_text(_relative(served.modelfile("adapter"), staging))
    if merged is not None:
        (staging / "Modelfile.merged").write_text(_relative(served.modelfile("merged"), staging))
    return export_record(served, seed, settings, parity,
                         "Q4_1 (package file)" if files.source == "embedded" else settings.quantization)


def served_parity(ctx: StageContext, label: str, adapter_dir: Path, base: tuple, forms: dict) -> dict[str, Any]:
    """The PEFT model (what was trained) against each served form of it (``base``: the base model's
    files, tokenizer and chat format; ``forms``: form -> (model GGUF, adapter GGUF), a form whose
    model is None was not written); a form that computes something else fails the stage."""
    from peft import PeftModel

    from export.backend import LlamaCppModel
    from export.parity import next_token_parity, peft_next_token_logits
    from pipelines.placement import host_placement, load_measured_base

    params, settings = ctx.params, ctx.params.export
    files, tokenizer, chat = base
    prompts = parity_prompts(ctx.root, settings.parity_prompts)
    placement = host_placement(params.model)           # fp32 on the CPU; on a CUDA host, as it trained
    reference_model = PeftModel.from_pretrained(load_measured_base(files, placement), str(adapter_dir))
    reference = peft_next_token_logits(reference_model, tokenizer, prompts, chat)
    del reference_model
    parity = {}
    for form, (model_file, adapter_file) in forms.items():
        if model_file is None:
            continue
        llm = LlamaCppModel(model_file, chat, adapter_file, n_ctx=settings.num_ctx)
        parity[form] = next_token_parity(reference, [llm.next_token_logits(p) for p in prompts], settings.tie_margin)
        llm.close()
        print(f"[export] {label} ({form}): {parity[form].describe()}")
    failed = {form: p for form, p in parity.items() if not p.passes(settings.min_agreement, settings.max_mean_kl)}
    if failed:
        raise UserError(f"{label}: the exported GGUF does not compute what the PEFT model computes ("
                        + "; ".join(f"{form}: {p.describe()}" for form, p in failed.items())
                        + f"; need >= {settings.min_agreement:.0%} and <= {settings.max_mean_kl} nats)")
    return parity


def export_record(served, seed: int, settings, parity: dict, quantization: str) -> dict[str, Any]:
    """``export.json`` of one replicate: its files with their sha256, chat format and parity."""
    base, adapter, merged, chat = served.base_gguf, served.adapter_gguf, served.merged_gguf, served.chat
    return {
        "variant": served.variant, "seed": seed, "ollama_name": served.name, "chat_family": chat.family,
        "stops": list(chat.stops),
        "system": chat.default_system, "template": chat.ollama_template, "parameters": served.parameters,
        "base_gguf": str(base), "base_gguf_sha256": sha256_file(base),
        "adapter_gguf": adapter.name, "adapter_gguf_sha256": sha256_file(adapter),
        "merged_gguf": merged.name if merged else None,
        "merged_gguf_sha256": sha256_file(merged) if merged else None,
        "quantization": quantization,
        "merged_quantization": settings.merged_quantization if merged else None,
        "parity": {form: vars(p) for form, p in parity.items()},
    }


def _relative(modelfile: str, folder: Path) -> str:
    """Files inside the export folder are named relative to the Modelfile (``ollama create -f``
    resolves them from its folder), so the folder can move; the base stays absolute."""
    return modelfile.replace(f" {folder}/", " ./")


def preflight(variant: str, params: Params) -> Capabilities:
    require_text_model(params, "export")
    declared_variant(params, variant)
    can = capabilities(params, variant)
    if not can.servable:
        return can          # nothing to convert or check: the stage records why (``skip``)
    from export.llama_cpp import converter, require_working_runtime

    require_working_runtime()  # quantize and parity run llama.cpp in this process

    if not (ADAPTERS / variant / "adapter_model.safetensors").is_file():
        raise UserError(f"{ADAPTERS / variant} holds no adapter; run `dvc repro train@{variant}` first")
    if not PARITY_SOURCE.is_file():
        raise UserError(f"{PARITY_SOURCE} is missing; run `dvc repro prepare_data` first")
    for name in ("lora", "hf"):   # a one-line setup hint when a converter is missing
        converter(name)
    return can


def skip(ctx: StageContext, variant: str, why: str) -> dict[str, Path]:
    """A variant whose LoRA settings have no served form: one line, and its export folder (the
    output dvc.yaml declares) holds only ``skipped.json`` with the reason, so that ``dvc repro``
    goes on; serve and evaluate ask the same capabilities and leave it out of serving."""
    final = ctx.root / export_dir(variant)
    staging = fresh_staging_dir(final)
    (staging / SKIPPED).write_text(json.dumps({"variant": variant, "skipped": why}, indent=2) + "\n")
    publish_directory(staging, final)
    print(f"[export@{variant}] skipped: {why}")
    return files_under(final)


def export(variant: str, ctx: StageContext, can: Capabilities) -> dict[str, Path]:
    if not can.servable:
        return skip(ctx, variant, can.why_not_served)
    final = ctx.root / export_dir(variant)
    staging = fresh_staging_dir(final)
    manifests = {}
    try:
        for seed in ctx.params.train.seeds:    # primary first: replicates nest in its folder
            folder = replicate_path(staging, ctx.params, seed)
            manifests[seed] = export_variant(ctx, variant, seed, folder)
            (folder / "export.json").write_text(json.dumps(manifests[seed], indent=2, sort_keys=True) + "\n")
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, final)
    with ctx.store.transaction() as session:
        for seed, manifest in manifests.items():
            for form, figures in manifest["parity"].items():
                for key in ("agreement", "exact_agreement", "mean_kl", "max_kl"):
                    ctx.store.replace_rows(session, EvalMetric, ctx.run_id,
                                           [{"value": figures[key], "n": figures["prompts"]}],
                                           variant=variant, seed=seed, metric=f"export_parity_{form}_{key}")
    return files_under(final)


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments("export", argv, variant_argument)
    return run_stage(f"export@{args.variant}", partial(export, args.variant),
                     preflight=partial(preflight, args.variant), args=args)


if __name__ == "__main__":
    raise SystemExit(main())
