"""DVC stage ``serve``: register the exported models with Ollama, or serve them with llama.cpp.

When an Ollama server answers at ``serve.ollama_host`` (default ``$OLLAMA_HOST``, else loopback),
every variant is registered as ``<variant>_model`` (and the base as ``base_model``) through the
official client: blobs, create, ``show`` to check what the server holds, one short generation;
then each alias of ``serve.aliases`` (``unsloth_model``, ``grit_model``) as a copy, checked too.
Otherwise the stage records ``skipped: no Ollama server at <url>`` with the exact
``ollama create`` commands to run later, checks every model with llama.cpp instead, and goes on.
Either way it writes ``artifacts/serve/manifest.json``, the typed record evaluation reads
(``export.served.ServeManifest``: backend, model names, GGUF paths, chat format, the form each
model is served in, and the speed reference: the base in the merged variants' file format,
``export.gguf.in_format``). Whether a server is up is not a DVC dependency: after starting
one, run ``dvc repro -f serve`` (or ``python -m pipelines.serve``). A variant whose LoRA settings
cannot be served (DoRA, ``trainers.config.lora_capabilities``) is skipped with one line saying
why, and named with the reason under the manifest's ``not_served``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.files import atomic_write_text
from export.llama_cpp import require_working_runtime
from export.served import ServedEntry, ServeManifest, SpeedReference
from pipelines.params import Params, capabilities, require_text_model, served_aliases
from pipelines.paths import EXPORTS, SERVE_DIR, SERVE_MANIFEST, export_dir
from pipelines.replicates import model_key, replicate_path, served_replicates
from pipelines.stage import StageContext, run_stage


def served_models(root: Path, params: Params) -> list:
    """The base model and every exported variant (each seed replicate of each variant that can
    be served: ``served_replicates``), as ``ServedModel``
    descriptions whose GGUF files match the sha256 their export recorded;
    ``ServedModel.variant`` is the replicate's model key (``pipelines/replicates``)."""
    from export.modelfile import ServedModel

    models = [ServedModel.from_export(root / replicate_path(export_dir(variant), params, seed),
                                      model_key(variant, params, seed))
              for variant, seed in served_replicates(params)]
    first = models[0]
    base = ServedModel(name="base_model", variant="base", base_gguf=first.base_gguf, chat=first.chat,
                       parameters=first.parameters)
    return [base, *models]


def entry(model, modelfile: Path, aliases: list[str]) -> ServedEntry:
    return ServedEntry(ollama_name=model.name, base_gguf=model.base_gguf, adapter_gguf=model.adapter_gguf,
                       merged_gguf=model.merged_gguf, modelfile=modelfile, chat_family=model.chat.family,
                       system=model.chat.default_system, stops=list(model.chat.stops),
                       parameters=model.parameters, aliases=aliases)


def speed_reference(base_gguf: Path, merged: list[Path]) -> SpeedReference | None:
    """The base in the format of the merged files served (``export.gguf.in_format``), which the
    evaluation times the variants against; None when none is served merged, or when the base
    already is in their format (then the base itself is the fair reference)."""
    from core.files import sha256_file
    from export.gguf import file_type, in_format

    formats = {file_type(path) for path in merged}
    if len(formats) != 1:
        return None
    quantization = formats.pop()
    if quantization is None or quantization == file_type(base_gguf):
        return None
    return SpeedReference(gguf=in_format(base_gguf, sha256_file(base_gguf), quantization), quantization=quantization)


def aliases_by_variant(aliases: dict[str, str]) -> dict[str, list[str]]:
    """``serve.aliases`` (alias -> variant) turned round: each variant's other Ollama names."""
    by_variant: dict[str, list[str]] = {}
    for alias, variant in aliases.items():
        by_variant.setdefault(variant, []).append(alias)
    return by_variant


def check_with_llama_cpp(model, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """One greedy generation per served form (base + adapter, merged) through llama.cpp."""
    from export.backend import LlamaCppModel

    checks = {}
    forms = {"adapter": model.weights("adapter"), "merged": model.weights("merged")} if model.merged_gguf \
        else {"adapter": model.weights("adapter")}
    for form, (weights, adapter) in forms.items():
        llm = LlamaCppModel(weights, model.chat, adapter)
        generation = llm.generate(prompt, max_new_tokens)
        llm.close()
        checks[form if model.adapter_gguf else "base"] = asdict(generation)
    return checks


def preflight(params: Params) -> list:
    require_text_model(params, "serve")
    require_working_runtime()  # the llama.cpp check of each registered model runs in-process
    served = {v for v, _ in served_replicates(params)}
    if not served:
        raise UserError("serve: no declared variant can be served (" + "; ".join(
            f"{v}: {capabilities(params, v).why_not_served}" for v in params.variants) + "); declare one that can")
    missing = [v for v in params.variants if v in served and not (export_dir(v) / "export.json").is_file()]
    if missing:
        raise UserError(f"{EXPORTS}/{missing[0]}/export.json is missing; run `dvc repro export@{missing[0]}` first")
    return served_models(Path.cwd(), params)   # every GGUF checked against its recorded sha256


def serve(ctx: StageContext, models: list) -> dict[str, Path]:
    from export.ollama import ollama_host, reachable

    settings = ctx.params.serve
    base_modelfile = ctx.root / SERVE_DIR / "base" / "Modelfile"
    atomic_write_text(base_modelfile, models[0].modelfile())
    modelfiles = {m.name: (base_modelfile if m.variant == "base" else m.adapter_gguf.parent /
                           ("Modelfile.merged" if m.form(settings.weights) == "merged" else "Modelfile"))
                  for m in models}
    host = ollama_host(settings.ollama_host)
    version = reachable(host, settings.timeout_s)
    aliases = aliases_by_variant(served_aliases(ctx.params))
    entries = {m.variant: entry(m, modelfiles[m.name], aliases.get(m.variant, [])) for m in models}
    declared = {variant: capabilities(ctx.params, variant) for variant in ctx.params.variants}
    not_served = {variant: can.why_not_served for variant, can in declared.items() if not can.servable}
    for variant, why in not_served.items():
        print(f"[serve] {variant}: skipped: {why}")
    if version is not None:
        backend, ollama_state = "ollama", register_with_ollama(host, version, models, entries, aliases, settings)
    else:
        backend, ollama_state = "llama.cpp", serve_without_ollama(host, models, modelfiles, entries, aliases, settings)
    # the evaluation times the served files side by side through llama.cpp (evaluation.speed)
    reference = speed_reference(models[0].base_gguf,
                                [m.merged_gguf for m in models if entries[m.variant].weights == "merged"])
    if reference is not None:
        print(f"[serve] speed reference: the base in {reference.quantization}, the merged variants' format "
              f"({reference.gguf})")
    ServeManifest(backend=backend, weights=settings.weights, ollama=ollama_state, models=entries,
                  speed_reference=reference, not_served=not_served).write(ctx.root / SERVE_MANIFEST)
    return {"manifest": ctx.root / SERVE_MANIFEST, "base_modelfile": base_modelfile}


def register_with_ollama(host: str, version: str, models: list, entries: dict, aliases: dict,
                         settings) -> dict[str, Any]:
    """Every model and its aliases registered with the Ollama server at ``host``, each checked."""
    import httpx
    import ollama

    from export.ollama import RegistrationError, register, register_alias, server_failure

    client = ollama.Client(host=host, timeout=max(settings.timeout_s, 600))
    digests: dict[Path, str] = {}
    for m in models:
        try:
            registration = register(client, m, settings.weights, settings.check_prompt,
                                    settings.max_new_tokens, digests)
        except (ollama.ResponseError, httpx.HTTPError, RegistrationError) as error:
            raise UserError(server_failure(host, m.name, error)) from None
        entries[m.variant].ollama = asdict(registration)
        entries[m.variant].weights = registration.weights
        print(f"[serve] {m.name}: registered ({registration.weights}); {registration.show_check}; "
              f"reply {registration.reply[:60]!r}")
        for alias in aliases.get(m.variant, []):
            try:
                check = register_alias(client, m, registration.weights, alias)
            except (ollama.ResponseError, httpx.HTTPError, RegistrationError) as error:
                raise UserError(server_failure(host, alias, error)) from None
            print(f"[serve] {alias}: another name of {m.name}; {check}")
    return {"host": host, "version": version, "registered": True}


def serve_without_ollama(host: str, models: list, modelfiles: dict, entries: dict, aliases: dict,
                         settings) -> dict[str, Any]:
    """No server: the exact ``ollama create`` commands to run later, and every model checked with
    llama.cpp instead."""
    from export.ollama import copy_command

    commands = [m.create_command(modelfiles[m.name]) for m in models]
    commands += [copy_command(m.name, alias) for m in models for alias in aliases.get(m.variant, [])]
    print(f"[serve] skipped: no Ollama server at {host}; serving with llama.cpp. To register later:")
    for command in commands:
        print(f"[serve]   {command}")
    for m in models:
        entries[m.variant].weights = m.form(settings.weights)
        entries[m.variant].llama_cpp_check = check_with_llama_cpp(m, settings.check_prompt, settings.max_new_tokens)
        for form, check in entries[m.variant].llama_cpp_check.items():
            status = "stopped at end of turn" if check["stopped_at_end_of_turn"] else "RAN ON (no end of turn)"
            print(f"[serve] {m.name} ({form}, llama.cpp): {status}; {check['text'][:60]!r}")
    return {"host": host, "registered": False, "skipped": f"skipped: no Ollama server at {host}",
            "commands": commands}


def main(argv: list[str] | None = None) -> int:
    return run_stage("serve", serve, preflight=preflight, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
