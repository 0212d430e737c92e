"""Ollama Modelfiles and the ``ollama create`` payload, from one description of a served model."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from core.files import sha256_file
from export.chat_format import ChatFormat, modelfile_escape, served_chat_format
from export.config import ServedForm, served_form
from export.decoding import GREEDY


class ExportIntegrityError(UserError):
    pass


def verified_file(path: Path, expected_sha256: str | None, recorded_in: Path) -> Path:
    """``path`` when its content is what the export recorded; else one line saying it changed.
    A truncated or altered GGUF would otherwise be uploaded, or crash llama.cpp mid-stage."""
    if not path.is_file():
        raise ExportIntegrityError(f"{path} is missing (recorded in {recorded_in}); run `dvc repro export` again")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise ExportIntegrityError(f"{path} does not match the sha256 recorded in {recorded_in} (truncated or "
                                   "altered since the export); run `dvc repro -f export` to write it again")
    return path


@dataclass(frozen=True)
class ServedModel:
    """What Ollama (or llama.cpp) serves for one variant: files, template, stops, defaults."""

    name: str                              # the Ollama model name, e.g. pure_grit_model
    variant: str                           # "base", a variant, or a seed replicate (<variant>_seed<s>)
    base_gguf: Path
    chat: ChatFormat
    adapter_gguf: Path | None = None
    merged_gguf: Path | None = None
    parameters: dict[str, float | int] = field(default_factory=dict)

    @classmethod
    def from_export(cls, folder: Path, key: str) -> ServedModel:
        """The model an ``export.json`` in ``folder`` describes, every GGUF checked against the
        sha256 recorded there; ``key`` is the variant or seed replicate it serves."""
        manifest_path = folder / "export.json"
        manifest = json.loads(manifest_path.read_text())

        def checked(name: str | None, digest_key: str) -> Path | None:
            return None if name is None else verified_file(folder / name, manifest.get(digest_key), manifest_path)

        return cls(name=manifest["ollama_name"], variant=key,
                   base_gguf=verified_file(Path(manifest["base_gguf"]), manifest.get("base_gguf_sha256"),
                                           manifest_path),
                   chat=served_chat_format(manifest["chat_family"], manifest["system"]),
                   adapter_gguf=checked(manifest["adapter_gguf"], "adapter_gguf_sha256"),
                   merged_gguf=checked(manifest["merged_gguf"], "merged_gguf_sha256"),
                   parameters=manifest["parameters"])

    @property
    def options(self) -> dict[str, float | int]:
        """Every PARAMETER but the stops: the export's (seed, context, reply length) and greedy
        decoding exactly as the evaluation decodes (``export.decoding``; it overrides the export's
        temperature, so ``ollama run`` answers what was measured)."""
        return {**self.parameters, **GREEDY}

    def weights(self, prefer: str) -> tuple[Path, Path | None]:
        """(FROM file, ADAPTER file or None) for ``prefer`` = adapter | merged, by the one rule
        (``export.config.served_form``)."""
        return {"merged": (self.merged_gguf, None), "adapter": (self.base_gguf, self.adapter_gguf),
                "base": (self.base_gguf, None)}[self.form(prefer)]

    def form(self, prefer: str) -> ServedForm:
        """What ``prefer`` = adapter | merged serves of this model (``export.config.served_form``)."""
        return served_form(prefer, self.adapter_gguf is not None, self.merged_gguf is not None)

    def modelfile(self, prefer: str = "adapter") -> str:
        model, adapter = self.weights(prefer)
        form = "base + adapter" if adapter else ("merged weights" if model == self.merged_gguf else "base")
        lines = [f"# {self.name}: {self.variant} ({form})", f"FROM {model}"]
        if adapter is not None:
            lines.append(f"ADAPTER {adapter}")
        lines.append(f"TEMPLATE {modelfile_escape(self.chat.ollama_template)}")
        if self.chat.default_system:
            lines.append(f"SYSTEM {modelfile_escape(self.chat.default_system)}")
        lines += [f'PARAMETER stop "{stop}"' for stop in self.chat.stops]
        lines += [f"PARAMETER {key} {value}" for key, value in self.options.items()]
        return "\n".join(lines) + "\n"

    def create_command(self, modelfile_path: Path) -> str:
        return f"ollama create {shlex.quote(self.name)} -f {shlex.quote(str(modelfile_path))}"

    def create_payload(self, digests: dict[Path, str], prefer: str) -> dict:
        """Keyword arguments of ``ollama.Client.create`` (blobs uploaded beforehand)."""
        model, adapter = self.weights(prefer)
        payload = {"model": self.name, "files": {model.name: digests[model]}, "template": self.chat.ollama_template,
                   "parameters": {"stop": list(self.chat.stops), **self.options}}
        if adapter is not None:
            payload["adapters"] = {adapter.name: digests[adapter]}
        if self.chat.default_system:
            payload["system"] = self.chat.default_system
        return payload
