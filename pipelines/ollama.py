"""The last run's models on a private Ollama server, for ``ollama run pure_grit_model``:

    make ollama                          # python -m pipelines.ollama start
    make ollama-stop                     # python -m pipelines.ollama stop

``start`` starts (or finds running) the Ollama build of ``make setup`` on 127.0.0.1:11435 (the
next free port when that one is taken), CPU only, its models under ``outputs/ollama/models``;
registers every model the ``serve`` stage served (``artifacts/serve/manifest.json``) through the
real CLI, ``ollama create NAME -f <the Modelfile serve recorded>``, then each alias with
``ollama cp``; checks each decodes greedily as the evaluation did and loads (one token); prints
the command to use. The
server keeps running until ``stop``.

Not part of ``dvc repro``: a server the serve stage finds is one evaluation goes through, and this
one is for people, started when they ask for it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import UserError, exit_status
from core.files import atomic_write_json
from export.served import ServeManifest
from pipelines.paths import SERVE_MANIFEST

OLLAMA_DIR = Path("outputs/ollama")
STATE = OLLAMA_DIR / "server.json"
DEFAULT_PORT = 11435        # beside a user's own Ollama on 11434, never in its way
TRY_PROMPT = "What is the capital of France?"


def recorded_server():
    """The server a previous ``start`` left running, or None."""
    from export.ollama import reachable
    from export.ollama_server import OllamaServer, running

    if not STATE.is_file():
        return None
    state = json.loads(STATE.read_text())
    server = OllamaServer(binary=Path(state["binary"]), address=state["address"], models=Path(state["models"]),
                          pid=state["pid"], log=Path(state["log"]))
    return server if running(server.pid) and reachable(server.url, timeout_s=2.0) else None


def ensure_server():
    """The running private server, started when there is none."""
    from export.ollama_build import installed_binary
    from export.ollama_server import port_is_free, start_server

    server = recorded_server()
    if server is None:
        port = DEFAULT_PORT if port_is_free(DEFAULT_PORT) else None
        server = start_server(installed_binary(), OLLAMA_DIR / "models", OLLAMA_DIR / "server.log", port)
        atomic_write_json(STATE, {"pid": server.pid, "address": server.address, "binary": str(server.binary),
                                  "models": str(server.models.resolve()), "log": str(server.log.resolve())})
        print(f"[ollama] started Ollama on {server.address} (pid {server.pid}, log {server.log})")
    return server


def served_models(manifest_path: Path = SERVE_MANIFEST) -> list[tuple[str, Path, list[str]]]:
    """(name, Modelfile, aliases) of every model the last serve stage served."""
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} is missing: no models have been served yet; run `make run` first")
    return [(entry.ollama_name, entry.modelfile, entry.aliases)
            for entry in ServeManifest.read(manifest_path).models.values()]


def register(server, models: list[tuple[str, Path, list[str]]]) -> None:
    from export.ollama_server import check_answers, check_greedy, copy, create

    for name, modelfile, aliases in models:
        create(server, name, modelfile)
        check_greedy(server, name, modelfile)
        check_answers(server, name)
        for alias in aliases:
            copy(server, name, alias)
        print(f"[ollama] {name}" + (f" (also {', '.join(aliases)})" if aliases else "") + f": from {modelfile}")


def start() -> None:
    models = served_models()
    server = ensure_server()
    register(server, models)
    names = [name for name, _, _ in models]
    example = "pure_grit_model" if "pure_grit_model" in names else names[-1]
    print(f"[ollama] {len(names)} models registered with the Ollama server at {server.address}; try:\n"
          f"{server.command_line('run', example, TRY_PROMPT)}\n"
          "[ollama] stop it with `make ollama-stop`")


def stop() -> None:
    from export.ollama_server import stop_server

    server = recorded_server()
    if server is None:
        print("[ollama] no private Ollama server is running")
    else:
        stop_server(server.pid)
        print(f"[ollama] stopped the Ollama server at {server.address}")
    STATE.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ollama", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop"))
    args = parser.parse_args(argv)
    return exit_status({"start": start, "stop": stop}[args.action])


if __name__ == "__main__":
    raise SystemExit(main())
