"""The serve stage's record of what it served, ``artifacts/serve/manifest.json``, typed.

``pipelines/serve.py`` writes it; the evaluation (``evaluation.serving``, ``evaluation.speed``,
``pipelines/evaluate.py``) and ``python -m pipelines.ollama`` read it, validated once here. Per
model (``base`` and every served replicate): its Ollama name, GGUF files, chat format, and the
form served (``weights``: ``export.config.served_form``, or what an Ollama server that refuses
adapters holds instead). Beside them: the backend, the speed reference (the base in the merged
variants' file format, timed beside them) and the variants not served, each with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from core.files import atomic_write_json
from export.chat_format import ChatFormat, served_chat_format
from export.config import ServedForm, served_form


class ServedEntry(BaseModel):
    """One served model: what it is called, which files and chat format, which form is served."""

    model_config = ConfigDict(extra="forbid")

    ollama_name: str = ""
    base_gguf: Path
    adapter_gguf: Path | None = None
    merged_gguf: Path | None = None
    modelfile: Path | None = None
    chat_family: str
    system: str | None = None
    stops: list[str] = []
    parameters: dict[str, float | int] = {}
    aliases: list[str] = []
    weights: ServedForm | None = None               # None: a manifest older than the field
    ollama: dict[str, Any] | None = None            # the Ollama registration (backend ollama)
    llama_cpp_check: dict[str, Any] | None = None   # the check generations (backend llama.cpp)

    @property
    def chat(self) -> ChatFormat:
        return served_chat_format(self.chat_family, self.system)


class SpeedReference(BaseModel):
    """The base in the merged variants' file format (``export.gguf.in_format``)."""

    model_config = ConfigDict(extra="forbid")

    gguf: Path
    quantization: str


class ServeManifest(BaseModel):
    """What the serve stage served, for the evaluation and the reports."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["ollama", "llama.cpp"]
    weights: Literal["adapter", "merged"] = "merged"     # serve.weights: the form asked for
    ollama: dict[str, Any] = {}
    models: dict[str, ServedEntry]
    speed_reference: SpeedReference | None = None
    not_served: dict[str, str | None] = {}

    @classmethod
    def read(cls, path: Path) -> ServeManifest:
        return cls.model_validate(json.loads(path.read_text()))

    def write(self, path: Path) -> None:
        raw = self.model_dump(mode="json")
        for entry in raw["models"].values():      # each backend's own record only
            for key in ("ollama", "llama_cpp_check"):
                if entry[key] is None:
                    del entry[key]
        atomic_write_json(path, raw)

    def form(self, key: str) -> ServedForm:
        """The form model ``key`` is served in: what serve recorded, else (an older manifest) the
        one rule applied to the stage-wide setting."""
        entry = self.models[key]
        return entry.weights or served_form(self.weights, entry.adapter_gguf is not None,
                                            entry.merged_gguf is not None)

    def served_files(self, key: str) -> tuple[Path, Path | None]:
        """(model GGUF, adapter GGUF or None) that ``key``'s served form loads."""
        entry = self.models[key]
        if self.form(key) == "merged":
            return entry.merged_gguf, None
        return entry.base_gguf, entry.adapter_gguf if self.form(key) == "adapter" else None

    @property
    def chat(self) -> ChatFormat:
        """The chat format every served model shares (the base's)."""
        return self.models["base"].chat

    def export_parity(self, key: str) -> dict[str, float] | None:
        """The parity figures of the form ``key`` is served in, from its ``export.json`` (the
        export stage stores the same figures as ``export_parity_<form>_<figure>``); None for the
        base and for a model served without an adapter."""
        entry = self.models.get(key)
        if key == "base" or entry is None or entry.adapter_gguf is None:
            return None
        path = entry.adapter_gguf.parent / "export.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text()).get("parity", {}).get(self.form(key))
