"""The Ollama HTTP contract, exercised with the official client against a STAND-IN server
(``tests/ollama_standin.py``; not Ollama, which cannot be installed here)."""

from __future__ import annotations

from pathlib import Path

import ollama
import pytest
from ollama_standin import OllamaStandIn

from export.ollama import check_shown, ollama_host, reachable, register


def test_register_uploads_creates_shows_and_generates(tiny_export, tmp_path: Path):
    with OllamaStandIn(tmp_path / "blobs") as server:
        client = ollama.Client(host=server.url)
        result = register(client, tiny_export, "adapter", "Hello?", 8, {})
        assert result.weights == "adapter" and "ADAPTER attached" in result.show_check
        created = server.models["tiny_model"]
        assert set(created["files"]) == {tiny_export.base_gguf.name} and set(created["adapters"]) == {"adapter.gguf"}
        assert created["template"] == tiny_export.chat.ollama_template
        assert created["parameters"]["stop"] == list(tiny_export.chat.stops)
        assert result.decode_tokens_per_second and result.decode_tokens_per_second > 0
        uploads = [path for method, path in server.requests if method == "POST" and path.startswith("/api/blobs/")]
        assert len(uploads) == 2                                   # base and adapter, once each


def test_a_server_that_refuses_adapters_gets_the_merged_gguf(tiny_export, tmp_path: Path):
    with OllamaStandIn(tmp_path / "blobs", refuse_adapters=True) as server:
        result = register(ollama.Client(host=server.url), tiny_export, "adapter", "Hello?", 8, {})
        assert result.weights == "merged" and "adapters" not in server.models["tiny_model"]
        assert set(server.models["tiny_model"]["files"]) == {"merged.gguf"}


def test_the_stand_in_validates_like_the_documented_api(tiny_export, tmp_path: Path):
    with OllamaStandIn(tmp_path / "blobs") as server:
        client = ollama.Client(host=server.url)
        with pytest.raises(ollama.ResponseError, match="not found"):      # create before upload
            client.create(model="x", files={"m.gguf": "sha256:" + "0" * 64})
        with pytest.raises(ollama.ResponseError, match="digest mismatch"):
            client._request_raw("POST", "/api/blobs/sha256:" + "1" * 64, content=b"not that")
        with pytest.raises(ollama.ResponseError, match="not found"):
            client.show("never_created")
        digest = client.create_blob(tiny_export.base_gguf)
        with pytest.raises(ollama.ResponseError, match="unknown parameter"):
            client.create(model="x", files={"m.gguf": digest}, parameters={"temprature": 0})


def test_show_mismatch_is_caught(tiny_export, tmp_path: Path):
    class Shown:
        modelfile, template, parameters = "FROM x", tiny_export.chat.ollama_template, 'stop "<|im_end|>"'

    with pytest.raises(Exception, match="no ADAPTER line"):
        check_shown(Shown(), tiny_export, "adapter")


def test_host_resolution_and_reachability(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert ollama_host(None) == "http://127.0.0.1:11434"
    monkeypatch.setenv("OLLAMA_HOST", "10.0.0.5:1234")
    assert ollama_host(None) == "http://10.0.0.5:1234" and ollama_host("http://h:1") == "http://h:1"
    assert reachable("http://127.0.0.1:9", timeout_s=0.5) is None
