"""Registering served models with an Ollama server through its official Python client.

Order per model: upload every file as a blob (``POST /api/blobs/sha256:<hex>``; skipped when the
server already has it), ``create`` with ``files`` (+ ``adapters``), ``template``, ``system`` and
``parameters``, then ``show`` to check that what the server holds is what was sent (the adapter
or the merged weights, the template, the stops), then one short ``generate``. Newer Ollama
releases are reported to refuse adapters: on that refusal the merged GGUF is registered instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from export.modelfile import ServedModel

DEFAULT_HOST = "http://127.0.0.1:11434"


def ollama_host(configured: str | None) -> str:
    host = configured or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
    return host if "://" in host else f"http://{host}"


def reachable(host: str, timeout_s: float) -> str | None:
    """The server's version when it answers, else None."""
    import httpx

    try:
        response = httpx.get(f"{host.rstrip('/')}/api/version", timeout=timeout_s)
        response.raise_for_status()
        return str(response.json().get("version", "unknown"))
    except (httpx.HTTPError, ValueError):
        return None


@dataclass(frozen=True)
class Registration:
    name: str
    weights: str                    # "adapter" or "merged": what the server holds
    show_check: str                 # what `show` confirmed
    reply: str
    stopped_at_end_of_turn: bool
    decode_tokens_per_second: float | None
    prefill_tokens_per_second: float | None


class RegistrationError(RuntimeError):
    pass


def _upload(client, path: Path, known: dict[Path, str]) -> str:
    if path not in known:
        known[path] = client.create_blob(path)
    return known[path]


def _create(client, served: ServedModel, prefer: str, digests: dict[Path, str]) -> None:
    model, adapter = served.weights(prefer)
    for path in filter(None, (model, adapter)):
        _upload(client, path, digests)
    client.create(**served.create_payload(digests, prefer))


def _adapter_refused(error: Exception) -> bool:
    return "adapter" in str(error).lower()


def check_shown(shown, served: ServedModel, weights: str) -> str:
    """What the server holds must be what was sent: adapter (or merged weights), template, stops."""
    modelfile = shown.modelfile or ""
    if weights == "adapter" and served.adapter_gguf is not None and "ADAPTER" not in modelfile:
        raise RegistrationError(f"{served.name}: the server's Modelfile has no ADAPTER line; the adapter was dropped")
    if (shown.template or "").strip() != served.chat.ollama_template.strip():
        raise RegistrationError(f"{served.name}: the server holds another TEMPLATE than the one sent")
    missing = [stop for stop in served.chat.stops if stop not in (shown.parameters or "")]
    if missing:
        raise RegistrationError(f"{served.name}: stop parameter {missing[0]!r} is missing on the server")
    return f"ADAPTER attached, template and {len(served.chat.stops)} stops match" if weights == "adapter" \
        else f"merged weights, template and {len(served.chat.stops)} stops match"


def register(client, served: ServedModel, prefer: str, prompt: str, max_new_tokens: int,
             digests: dict[Path, str]) -> Registration:
    import ollama

    weights = prefer if served.adapter_gguf is not None else "merged"
    if served.adapter_gguf is None and served.merged_gguf is None:
        weights = "base"
    try:
        _create(client, served, weights, digests)
    except ollama.ResponseError as error:
        if weights != "adapter" or served.merged_gguf is None or not _adapter_refused(error):
            raise
        weights = "merged"                      # this Ollama refuses adapters: serve the merged GGUF
        _create(client, served, weights, digests)
    check = check_shown(client.show(served.name), served, weights)
    reply = client.generate(model=served.name, prompt=prompt,
                            options={"temperature": 0, "seed": 0, "num_predict": max_new_tokens})
    return Registration(
        name=served.name, weights=weights, show_check=check, reply=(reply.response or "").strip(),
        stopped_at_end_of_turn=reply.done_reason == "stop",
        decode_tokens_per_second=_rate(reply.eval_count, reply.eval_duration),
        prefill_tokens_per_second=_rate(reply.prompt_eval_count, reply.prompt_eval_duration),
    )


def _rate(count: int | None, nanoseconds: int | None) -> float | None:
    return count / nanoseconds * 1e9 if count and nanoseconds else None


class OllamaModel:
    """A registered model behind the same ``generate`` interface as ``backend.LlamaCppModel``;
    speed from Ollama's own counters (nanoseconds), new tokens only."""

    def __init__(self, host: str, name: str) -> None:
        import ollama

        self.client, self.name = ollama.Client(host=host), name

    def generate(self, prompt: str, max_new_tokens: int):
        from export.backend import Generation

        reply = self.client.generate(model=self.name, prompt=prompt,
                                     options={"temperature": 0, "seed": 0, "num_predict": max_new_tokens})
        return Generation(text=(reply.response or "").strip(), stopped_at_end_of_turn=reply.done_reason == "stop",
                          prompt_tokens=reply.prompt_eval_count or 0, new_tokens=reply.eval_count or 0,
                          prefill_tokens_per_second=_rate(reply.prompt_eval_count, reply.prompt_eval_duration),
                          decode_tokens_per_second=_rate(reply.eval_count, reply.eval_duration))

    def close(self) -> None:
        pass
