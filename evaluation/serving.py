"""Open a model the way the serve stage's manifest says it is served (Ollama or llama.cpp)."""

from __future__ import annotations

from pathlib import Path

from export.chat_format import served_chat_format


def open_served(manifest: dict, key: str):
    """``key`` is ``base`` or a variant; returns an object with ``generate`` and ``close``."""
    from export.backend import LlamaCppModel
    from export.ollama import OllamaModel

    entry = manifest["models"][key]
    if manifest["backend"] == "ollama":
        return OllamaModel(manifest["ollama"]["host"], entry["ollama_name"])
    chat = served_chat_format(entry["chat_family"], entry["system"])
    # what serve really put behind this name (older manifests: the stage-wide setting)
    if entry.get("weights", manifest.get("weights")) == "merged" and entry.get("merged_gguf"):
        return LlamaCppModel(Path(entry["merged_gguf"]), chat)
    adapter = entry.get("adapter_gguf")
    return LlamaCppModel(Path(entry["base_gguf"]), chat, Path(adapter) if adapter else None)


def chat_of(manifest: dict):
    entry = manifest["models"]["base"]
    return served_chat_format(entry["chat_family"], entry["system"])
