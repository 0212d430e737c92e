"""Open a served model the way the serve stage's record says it is served, through llama.cpp:
the evaluation's own served figures. The second backend, Ollama, is ``evaluation.ollama_backend``."""

from __future__ import annotations

from export.served import ServeManifest


def open_served(manifest: ServeManifest, key: str):
    """``key`` is ``base`` or a variant; returns an object with ``generate`` and ``close``: the
    form serve recorded for it (``ServeManifest.form``), decoded by llama.cpp in-process."""
    from export.backend import LlamaCppModel

    entry = manifest.models[key]
    model, adapter = manifest.served_files(key)
    return LlamaCppModel(model, entry.chat, adapter)


def chat_of(manifest: ServeManifest | dict):
    """The chat format of the served base (a manifest's raw JSON is validated first)."""
    return (manifest if isinstance(manifest, ServeManifest) else ServeManifest.model_validate(manifest)).chat
