"""Open a model the way the serve stage's record says it is served (Ollama or llama.cpp)."""

from __future__ import annotations

from export.served import ServeManifest


def open_served(manifest: ServeManifest, key: str):
    """``key`` is ``base`` or a variant; returns an object with ``generate`` and ``close``: the
    form serve recorded for it (``ServeManifest.form``)."""
    from export.backend import LlamaCppModel
    from export.ollama import OllamaModel

    entry = manifest.models[key]
    if manifest.backend == "ollama":
        return OllamaModel(manifest.ollama["host"], entry.ollama_name)
    model, adapter = manifest.served_files(key)
    return LlamaCppModel(model, entry.chat, adapter)


def chat_of(manifest: ServeManifest | dict):
    """The chat format of the served base (a manifest's raw JSON is validated first)."""
    return (manifest if isinstance(manifest, ServeManifest) else ServeManifest.model_validate(manifest)).chat
