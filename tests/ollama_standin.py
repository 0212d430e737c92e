"""A STAND-IN for the Ollama server, for tests only. It is not Ollama.

It speaks the documented REST contract the pipeline relies on and validates requests the way
the API documentation describes them: ``GET /api/version``, ``HEAD/POST /api/blobs/<digest>``
(digest format, body hash), ``POST /api/create`` (blobs must exist and be GGUF files, known
parameters only; optionally refuses adapters like newer releases), ``POST /api/copy``, ``POST /api/show``,
``GET /api/tags`` and ``POST /api/generate``. Generation is real: it renders the registered Go
TEMPLATE (the ``if``/variable subset Modelfiles use) and runs the registered GGUF files with
llama.cpp, so a wrong template, stop or file shows up in the reply.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KNOWN_PARAMETERS = {"stop", "temperature", "seed", "num_predict", "num_ctx", "top_k", "top_p", "repeat_penalty",
                    "min_p", "num_keep", "presence_penalty", "frequency_penalty"}
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def render_go_template(template: str, values: dict) -> str:
    """The Modelfile subset: ``{{ range .Messages }}...{{ end }}`` over messages with ``.Role`` and
    ``.Content``, ``{{ if .X }}...{{ end }}`` (not nested) and ``{{ .X }}``; a template without
    ``.Messages`` is cut where ``{{ .Response }}`` starts, as Ollama does for generation.
    ``tests/export/test_ollama_template.py`` checks it against Go's own text/template."""

    def fields(text: str, scope: dict) -> str:
        return re.sub(r"\{\{-? ?\.(\w+) ?-?\}\}", lambda m: str(scope.get(m.group(1), "")), text)

    def each_message(match: re.Match) -> str:
        return "".join(fields(match.group(1), message) for message in values.get("Messages") or [])

    def conditional(match: re.Match) -> str:
        return match.group(2) if values.get(match.group(1)) else ""

    if ".Messages" not in template:
        template = template.split("{{ .Response }}")[0]
    text = re.sub(r"\{\{-? ?range \.Messages ?-?\}\}(.*?)\{\{-? ?end ?-?\}\}", each_message, template, flags=re.S)
    text = re.sub(r"\{\{-? ?if \.(\w+) ?-?\}\}(.*?)\{\{-? ?end ?-?\}\}", conditional, text, flags=re.S)
    return fields(text, values)


def chat_messages(messages: list[dict], default_system: str | None) -> list[dict]:
    """``.Messages`` as Ollama's chat handler builds them: the Modelfile's SYSTEM first unless the
    first message is a system message (an explicitly empty one too), then consecutive messages of
    one role merged with a blank line."""
    if default_system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": default_system}, *messages]
    collated: list[dict] = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    return collated


def generate_messages(system: str | None, default_system: str | None, prompt: str) -> list[dict]:
    """``.Messages`` as Ollama's generate handler builds them: the request's system (when not
    empty), else the Modelfile's SYSTEM, then the prompt."""
    chosen = system or default_system
    return chat_messages([*([{"role": "system", "content": chosen}] if chosen else []),
                          {"role": "user", "content": prompt}], None)


class OllamaStandIn:
    def __init__(self, blob_dir: Path, refuse_adapters: bool = False, create_status: int | None = None) -> None:
        """``create_status``: answer every ``/api/create`` with this HTTP error (a failing server)."""
        self.blob_dir, self.refuse_adapters, self.create_status = blob_dir, refuse_adapters, create_status
        self.models: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        blob_dir.mkdir(parents=True, exist_ok=True)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> OllamaStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def blob(self, digest: str) -> Path:
        return self.blob_dir / digest.replace(":", "-")

    # ------------------------------------------------------------------------- endpoints

    def create(self, body: dict) -> tuple[int, dict]:
        if self.create_status is not None:
            return self.create_status, {"error": "internal server error (stand-in told to fail)"}
        name = body.get("model")
        if not name:
            return 400, {"error": "model is required"}
        files, adapters = body.get("files") or {}, body.get("adapters") or {}
        if not files and not body.get("from"):
            return 400, {"error": "neither 'from' nor 'files' was given"}
        for digest in [*files.values(), *adapters.values()]:
            if not _DIGEST.match(digest) or not self.blob(digest).is_file():
                return 400, {"error": f"blob {digest} not found; upload it with POST /api/blobs/{digest} first"}
            if self.blob(digest).read_bytes()[:4] != b"GGUF":
                return 400, {"error": f"blob {digest} is not a GGUF file"}
        if adapters and self.refuse_adapters:
            return 400, {"error": "adapters are not supported by this server"}
        unknown = set(body.get("parameters") or {}) - KNOWN_PARAMETERS
        if unknown:
            return 400, {"error": f"unknown parameter {sorted(unknown)[0]!r}"}
        self.models[name] = body
        return 200, {"status": "success"}

    def copy(self, body: dict) -> tuple[int, dict | None]:
        source, destination = body.get("source"), body.get("destination")
        if not source or not destination:
            return 400, {"error": "source and destination are required"}
        if source not in self.models:
            return 404, {"error": f"model '{source}' not found"}
        self.models[destination] = self.models[source]
        return 200, None

    def show(self, body: dict) -> tuple[int, dict]:
        model = self.models.get(body.get("model", ""))
        if model is None:
            return 404, {"error": f"model '{body.get('model')}' not found"}
        parameters = model.get("parameters") or {}
        lines = [f'{key} {json.dumps(v) if isinstance(v, str) else v}' for key, values in parameters.items()
                 for v in (values if isinstance(values, list) else [values])]
        modelfile = [f"FROM {self.blob(d)}" for d in (model.get("files") or {}).values()]
        modelfile += [f"ADAPTER {self.blob(d)}" for d in (model.get("adapters") or {}).values()]
        modelfile += [f'TEMPLATE """{model.get("template", "{{ .Prompt }}")}"""']
        if model.get("system"):
            modelfile.append(f'SYSTEM """{model["system"]}"""')
        modelfile += [f"PARAMETER {line}" for line in lines]
        return 200, {"modelfile": "\n".join(modelfile), "parameters": "\n".join(lines),
                     "template": model.get("template", "{{ .Prompt }}"),
                     "details": {"format": "gguf", "family": "llama"}, "model_info": {}}

    def generate(self, body: dict) -> tuple[int, dict]:
        from llama_cpp import Llama

        model = self.models.get(body.get("model", ""))
        if model is None:
            return 404, {"error": f"model '{body.get('model')}' not found"}
        options = {**(model.get("parameters") or {}), **(body.get("options") or {})}
        system = body.get("system") or model.get("system", "")
        prompt = render_go_template(model.get("template", "{{ .Prompt }}"),
                                    {"System": system, "Prompt": body.get("prompt", ""),
                                     "Messages": generate_messages(body.get("system"), model.get("system"),
                                                                   body.get("prompt", ""))})
        weights = self.blob(next(iter(model["files"].values())))
        adapters = list((model.get("adapters") or {}).values())
        llm = Llama(model_path=str(weights), lora_path=str(self.blob(adapters[0])) if adapters else None,
                    n_ctx=int(options.get("num_ctx", 2048)), seed=int(options.get("seed", 0)), verbose=False)
        started = time.perf_counter_ns()
        result = llm.create_completion(prompt, max_tokens=int(options.get("num_predict", 128)), temperature=0.0,
                                       top_k=1, stop=list(options.get("stop") or []), seed=int(options.get("seed", 0)))
        elapsed = time.perf_counter_ns() - started
        llm.close()
        usage = result["usage"]
        return 200, {"model": body["model"], "response": result["choices"][0]["text"], "done": True,
                     "done_reason": "stop" if result["choices"][0]["finish_reason"] == "stop" else "length",
                     "prompt_eval_count": usage["prompt_tokens"], "prompt_eval_duration": elapsed // 2,
                     "eval_count": usage["completion_tokens"], "eval_duration": elapsed // 2,
                     "total_duration": elapsed}

    # --------------------------------------------------------------------------- HTTP

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, payload: dict | None = None) -> None:
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if data and self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self) -> None:
                standin.requests.append(("GET", self.path))
                if self.path == "/api/version":
                    return self._reply(200, {"version": "0.0.0-standin"})
                if self.path == "/api/tags":
                    return self._reply(200, {"models": [{"name": n, "model": n} for n in standin.models]})
                self._reply(404, {"error": "not found"})

            def do_HEAD(self) -> None:
                standin.requests.append(("HEAD", self.path))
                digest = self.path.removeprefix("/api/blobs/")
                self._reply(200 if _DIGEST.match(digest) and standin.blob(digest).is_file() else 404)

            def do_POST(self) -> None:
                standin.requests.append(("POST", self.path))
                body = self._body()
                if self.path.startswith("/api/blobs/"):
                    digest = self.path.removeprefix("/api/blobs/")
                    if not _DIGEST.match(digest):
                        return self._reply(400, {"error": "invalid digest format"})
                    if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                        return self._reply(400, {"error": "digest mismatch"})
                    standin.blob(digest).write_bytes(body)
                    return self._reply(201)
                routes = {"/api/create": standin.create, "/api/copy": standin.copy,
                          "/api/show": standin.show, "/api/generate": standin.generate}
                if self.path not in routes:
                    return self._reply(404, {"error": "not found"})
                try:
                    request = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    return self._reply(400, {"error": "invalid JSON"})
                status, payload = routes[self.path](request)
                self._reply(status, payload)

        return Handler
