"""Registering served models with an Ollama server through its official Python client.

Order per model: upload every file as a blob (``POST /api/blobs/sha256:<hex>``; skipped when the
server already has it), ``create`` with ``files`` (+ ``adapters``), ``template``, ``system`` and
``parameters``, then ``show`` to check that what the server holds is what was sent (the adapter
or the merged weights, the template, the stops), then one short ``generate``. Newer Ollama
releases are reported to refuse adapters: on that refusal the merged GGUF is registered instead.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from core.files import sha256_file
from export.decoding import GREEDY, ollama_options
from export.modelfile import ServedModel

DEFAULT_HOST = "http://127.0.0.1:11434"


def ollama_host(configured: str | None) -> str:
    """The server URL exactly as the official client resolves ``configured`` (None: the
    client reads ``OLLAMA_HOST`` itself): ``127.0.0.1``, ``localhost`` or ``0.0.0.0`` without a
    port mean port 11434, as for ``ollama run``. Parsed by the client, never a second time here."""
    import ollama

    return str(ollama.Client(host=configured)._client.base_url).rstrip("/")


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


def server_failure(host: str, model: str, error: BaseException) -> str:
    """One line for a registration the server refused or broke off (HTTP status when it gave one)."""
    status = getattr(error, "status_code", None) or getattr(getattr(error, "response", None), "status_code", None)
    said = (str(getattr(error, "error", "") or error).strip().splitlines() or [type(error).__name__])[0]
    return (f"the Ollama server at {host} failed to register {model}"
            + (f" (HTTP {status})" if status else "") + f": {said}; fix the server or unset OLLAMA_HOST "
            "to serve with llama.cpp")


def blob_digest(path: Path) -> str:
    return f"sha256:{sha256_file(path)}"


def _upload(client, path: Path, known: dict[Path, str]) -> str:
    """Upload ``path`` unless the server already holds its blob (``HEAD /api/blobs/<digest>``,
    as the API documents; the client's ``create_blob`` would send the whole file every time)."""
    if path not in known:
        digest = blob_digest(path)
        if client._client.head(f"/api/blobs/{digest}").status_code != 200:
            uploaded = client.create_blob(path)
            if uploaded != digest:
                raise RegistrationError(f"{path.name}: the server stored digest {uploaded}, expected {digest}")
        known[path] = digest
    return known[path]


def _create(client, served: ServedModel, prefer: str, digests: dict[Path, str]) -> None:
    model, adapter = served.weights(prefer)
    for path in filter(None, (model, adapter)):
        _upload(client, path, digests)
    client.create(**served.create_payload(digests, prefer))


def _adapter_refused(error: Exception) -> bool:
    return "adapter" in str(error).lower()


def shown_parameters(text: str) -> dict[str, list[str]]:
    """``show``'s parameters (one ``name value`` line each, a list parameter on several lines)."""
    shown: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        if name:
            shown.setdefault(name, []).append(value.strip())
    return shown


def check_shown(shown, served: ServedModel, weights: str) -> str:
    """What the server holds must be what was sent: adapter (or merged weights), template, stops
    and the greedy decoding options (``export.decoding``: Ollama's defaults are not greedy)."""
    modelfile = shown.modelfile or ""
    if weights == "adapter" and served.adapter_gguf is not None and "ADAPTER" not in modelfile:
        raise RegistrationError(f"{served.name}: the server's Modelfile has no ADAPTER line; the adapter was dropped")
    if (shown.template or "").strip() != served.chat.ollama_template.strip():
        raise RegistrationError(f"{served.name}: the server holds another TEMPLATE than the one sent")
    missing = [stop for stop in served.chat.stops if stop not in (shown.parameters or "")]
    if missing:
        raise RegistrationError(f"{served.name}: stop parameter {missing[0]!r} is missing on the server")
    held = shown_parameters(shown.parameters or "")
    for name, value in GREEDY.items():
        if [float(v) for v in held.get(name, [])] != [float(value)]:
            raise RegistrationError(f"{served.name}: the server holds {name} {held.get(name) or 'unset'}, not "
                                    f"{value}; its replies would differ from the evaluation's greedy ones")
    return f"{_FORMS[weights]}, template, {len(served.chat.stops)} stops and greedy decoding match"


_FORMS = {"adapter": "ADAPTER attached", "merged": "merged weights", "base": "base weights"}


def register(client, served: ServedModel, prefer: str, prompt: str, max_new_tokens: int,
             digests: dict[Path, str]) -> Registration:
    import ollama

    weights = served.form(prefer)      # export.config.served_form
    try:
        _create(client, served, weights, digests)
    except ollama.ResponseError as error:
        if weights != "adapter" or served.merged_gguf is None or not _adapter_refused(error):
            raise
        weights = "merged"                      # this Ollama refuses adapters: serve the merged GGUF
        _create(client, served, weights, digests)
    check = check_shown(client.show(served.name), served, weights)
    reply = client.generate(model=served.name, prompt=prompt,
                            options=ollama_options(seed=0, num_predict=max_new_tokens))
    return Registration(
        name=served.name, weights=weights, show_check=check, reply=(reply.response or "").strip(),
        stopped_at_end_of_turn=reply.done_reason == "stop",
        decode_tokens_per_second=_rate(reply.eval_count, reply.eval_duration),
        prefill_tokens_per_second=_rate(reply.prompt_eval_count, reply.prompt_eval_duration),
    )


def copy_command(source: str, alias: str) -> str:
    return f"ollama cp {shlex.quote(source)} {shlex.quote(alias)}"


def register_alias(client, served: ServedModel, weights: str, alias: str) -> str:
    """``alias`` as another name of the registered ``served`` model (``ollama cp``), checked as the
    model itself is: the server must hold the same weights, template and stops under the alias."""
    client.copy(served.name, alias)
    return check_shown(client.show(alias), served, weights)


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
                                     options=ollama_options(seed=0, num_predict=max_new_tokens))
        return Generation(text=(reply.response or "").strip(), stopped_at_end_of_turn=reply.done_reason == "stop",
                          prompt_tokens=reply.prompt_eval_count or 0, new_tokens=reply.eval_count or 0,
                          prefill_tokens_per_second=_rate(reply.prompt_eval_count, reply.prompt_eval_duration),
                          decode_tokens_per_second=_rate(reply.eval_count, reply.eval_duration))

    def close(self) -> None:
        pass
