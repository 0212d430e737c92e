"""How Ollama is built (``export/ollama_build.py``), without building it: the instruction-set
level is the llama.cpp runtime's portable one, the cache key follows every flag, and a missing Go
or a missing build is one line that says what to do."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from export.llama_cpp import build_plan
from export.ollama_build import (
    OLLAMA_VERSION,
    OllamaBuildError,
    go_toolchain,
    installed_binary,
    main,
    ollama_build,
)

V3 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f"})
V2 = frozenset({"sse4_2", "popcnt"})


def test_the_level_is_the_llama_cpp_runtimes_portable_one():
    for flags in (V3, V2):
        build = ollama_build("x86_64", flags, "go1.27.3")
        assert build.label == build_plan("portable", "x86_64", flags).label
        assert build.cgo_flags == f"-O3 -march={build.label}" and "native" not in build.cgo_flags
    assert ollama_build("x86_64", V3, "go1.27.3").label == "x86-64-v3"
    assert ollama_build("x86_64", V2, "go1.27.3").label == "x86-64-v2"
    generic = ollama_build("aarch64", frozenset(), "go1.27.3")
    assert generic.cgo_flags == "-O3" and generic.label == "generic-aarch64"


def test_the_cache_key_names_version_and_level_and_follows_flags_and_go():
    build = ollama_build("x86_64", V3, "go1.27.3")
    assert build.key.startswith(f"{OLLAMA_VERSION}-x86-64-v3-")
    assert build.key != ollama_build("x86_64", V3, "go1.26.8").key
    assert build.key != ollama_build("x86_64", V2, "go1.27.3").key
    assert f"version.Version={OLLAMA_VERSION}" in build.ldflags       # else the binary says 0.0.0
    env = build.env(Path("bin"))
    assert env["CGO_CFLAGS"] == env["CGO_CXXFLAGS"] == build.cgo_flags and env["GOTOOLCHAIN"] == "local"
    assert Path(env["GOBIN"]).is_absolute()


def test_a_missing_go_is_one_line_that_says_what_to_do(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OllamaBuildError, match="Go is missing.*run `make setup` again") as caught:
        go_toolchain()
    assert "\n" not in str(caught.value)


def test_a_missing_build_is_one_line(monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(OllamaBuildError, match="Ollama is not built.*run `make setup`"):
        installed_binary()
    assert main(["where"]) == 2
    assert capsys.readouterr().err.startswith("error: Ollama is not built")
