"""A private Ollama server, driven through the real ``ollama`` CLI as a user drives it.

:func:`start_server` runs the cached build (``export.ollama_build``) as ``ollama serve`` on a
loopback address, CPU only, with its own model store (``OLLAMA_MODELS``, never ~/.ollama), and
waits until it answers. :func:`create` and :func:`copy` are ``ollama create NAME -f Modelfile``
and ``ollama cp``: the CLI parses the Modelfile as a user's would (relative ``FROM ./merged.gguf``
from the Modelfile's folder), uploads the files, and the server checks their headers. A command
the server refuses (an adapter cut short in its header: "failed to read tensor dimensions") is
:class:`OllamaCliError`, one line; so is a model the server accepted but cannot load (cut short in
its tensor data), found by :func:`check_answers`. :func:`check_greedy` reads ``ollama show
--parameters`` back: the model must decode as the evaluation does (``export.decoding``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from export.decoding import GREEDY
from export.ollama import reachable, shown_parameters

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class OllamaServerError(UserError):
    pass


class OllamaCliError(UserError):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def server_env(address: str, models: Path) -> dict[str, str]:
    """What ``ollama serve`` and every CLI call of it run with: this address, this store, no GPU."""
    return {**os.environ, "OLLAMA_HOST": address, "OLLAMA_MODELS": str(models.resolve()),
            "CUDA_VISIBLE_DEVICES": "-1", "HIP_VISIBLE_DEVICES": "-1"}


@dataclass(frozen=True)
class OllamaServer:
    binary: Path
    address: str          # host:port, as OLLAMA_HOST takes it
    models: Path          # OLLAMA_MODELS
    pid: int
    log: Path             # what `ollama serve` writes (a runner's reason to fail is there)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def cli(self, *args: str, timeout_s: float = 600,
            stdin: int = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], env=server_env(self.address, self.models),
                              capture_output=True, text=True, timeout=timeout_s, stdin=stdin)

    def command_line(self, *args: str) -> str:
        """How a user types ``args`` against this server."""
        return f"OLLAMA_HOST={self.address} {shlex.join([str(self.binary), *args])}"


def start_server(binary: Path, models: Path, log: Path, port: int | None = None,
                 timeout_s: float = 60) -> OllamaServer:
    """``ollama serve`` in its own session (it outlives the caller until :func:`stop_server`);
    returns once ``/api/version`` answers."""
    address = f"127.0.0.1:{port or free_port()}"
    models.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink:
        process = subprocess.Popen([str(binary), "serve"], env=server_env(address, models), stdin=subprocess.DEVNULL,
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    server = OllamaServer(binary=binary, address=address, models=models, pid=process.pid, log=log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OllamaServerError(f"`ollama serve` on {address} exited with status {process.returncode}: "
                                    f"{_last_line(log.read_text(errors='replace'))} (log: {log})")
        if reachable(server.url, timeout_s=1.0) is not None:
            return server
        time.sleep(0.2)
    stop_server(process.pid)
    raise OllamaServerError(f"`ollama serve` on {address} did not answer in {timeout_s:.0f} s (log: {log})")


def running(pid: int) -> bool:
    """Whether ``pid`` is an ``ollama serve`` process (not a recycled pid)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(command) > 1 and command[0].endswith(b"ollama") and command[1] == b"serve"


def stop_server(pid: int, timeout_s: float = 15) -> None:
    """Stop the server and the runners it started (its process group), SIGKILL after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:       # not our child: watch /proc instead
                if not running(pid):
                    return
            time.sleep(0.1)


def _last_line(text: str) -> str:
    """The CLI's ``Error: ...`` line (its progress output is full of cursor codes), else the last line."""
    lines = [line.strip() for line in _ANSI.sub("", text).replace("\r", "\n").splitlines() if line.strip()]
    errors = [line.split("Error:", 1)[1] for line in lines if "Error:" in line]
    return (errors or lines or ["no output"])[-1].strip()


def _run(server: OllamaServer, *args: str, stdin: int = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    done = server.cli(*args, stdin=stdin)
    if done.returncode != 0:
        raise OllamaCliError(f"`ollama {shlex.join(args)}` failed on the Ollama server at {server.address}: "
                             f"{_last_line(done.stderr + done.stdout)}")
    return done


def create(server: OllamaServer, name: str, modelfile: Path) -> None:
    _run(server, "create", name, "-f", str(modelfile))


def copy(server: OllamaServer, source: str, alias: str) -> None:
    _run(server, "cp", source, alias)


@dataclass(frozen=True)
class CliReply:
    text: str                   # what ``ollama run`` printed
    new_tokens: int             # its ``--verbose`` eval count
    decode_tokens_per_second: float | None


def run(server: OllamaServer, name: str, prompt: str) -> CliReply:
    """``ollama run --verbose NAME PROMPT`` as typed in a terminal. Its stdin is a terminal (a
    pseudo-terminal here): from any other stdin the CLI reads a prompt and joins it to the
    argument with a space, and the leading space changes the tokens and so the reply."""
    import pty

    controller, terminal = pty.openpty()
    try:
        done = _run(server, "run", "--verbose", name, prompt, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    stats = _ANSI.sub("", done.stderr)
    count, rate = (re.search(rf"^eval {name}:\s+([0-9.]+)", stats, re.M) for name in ("count", "rate"))
    return CliReply(text=done.stdout.strip(), new_tokens=int(count.group(1)) if count else 0,
                    decode_tokens_per_second=float(rate.group(1)) if rate else None)


def check_answers(server: OllamaServer, name: str) -> None:
    """One token from ``name``: the server accepts a file whose tensor data is cut short and
    fails only when it loads it ("llama runner process has terminated"), not in front of a user."""
    import ollama

    logged = server.log.stat().st_size if server.log.is_file() else 0
    try:
        ollama.Client(host=server.url).generate(model=name, prompt="Hi", options={"num_predict": 1})
    except ollama.ResponseError as error:
        with open(server.log, errors="replace") as log:
            log.seek(logged)
            reason = runner_failure(log.read())
        said = f"{error.error}: {reason}" if reason else f"{error.error} (a damaged GGUF?)"
        raise OllamaCliError(f"{name} was registered but does not load on the Ollama server at {server.address}: "
                             f"{said}; see {server.log}") from None


# What llama.cpp's loader logs before the runner exits: "failed to apply lora adapter: model arch
# and LoRA arch mismatch", "... tensor 'blk.0.attn_k.weight' has incorrect shape (hint: maybe wrong
# base model?)". The HTTP error says only that the runner terminated.
_LOADER_FAILURE = re.compile(r"^\w+: (failed to .*|error loading model.*)$", re.MULTILINE)


def runner_failure(log_text: str) -> str | None:
    """The last loader failure in a stretch of the server's log, as llama.cpp worded it."""
    found = _LOADER_FAILURE.findall(log_text)
    return found[-1].strip() if found else None


def check_greedy(server: OllamaServer, name: str, modelfile: Path) -> None:
    """The registered model decodes greedily, as the evaluation does; a Modelfile written before
    the options were stated (Ollama's defaults: repeat_penalty 1.1) is named with the fix."""
    held = shown_parameters(_run(server, "show", name, "--parameters").stdout)
    wrong = [f"{key} {held.get(key, ['unset'])[0]}" for key, value in GREEDY.items()
             if [float(v) for v in held.get(key, [])] != [float(value)]]
    if wrong:
        raise OllamaCliError(f"{name} was registered from {modelfile} with {', '.join(wrong)} (not greedy decoding "
                             "as the evaluation's); export it again with `dvc repro`")
