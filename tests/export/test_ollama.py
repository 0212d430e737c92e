"""The Ollama HTTP contract, exercised with the official client against a STAND-IN server
(``tests/ollama_standin.py``), for what a real server cannot be made to do on demand (refuse
adapters, answer HTTP 500); ``test_ollama_server.py`` meets the real one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ollama
import pytest
from ollama_standin import OllamaStandIn

from export.ollama import (
    check_shown,
    copy_command,
    ollama_host,
    reachable,
    register,
    register_alias,
    server_failure,
)


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


def test_an_alias_is_a_checked_copy_of_the_registered_model(tiny_export, tmp_path: Path):
    with OllamaStandIn(tmp_path / "blobs") as server:
        client = ollama.Client(host=server.url)
        with pytest.raises(ollama.ResponseError, match="not found"):     # nothing to copy yet
            register_alias(client, tiny_export, "adapter", "unsloth_model")
        register(client, tiny_export, "adapter", "Hello?", 8, {})
        assert "ADAPTER attached" in register_alias(client, tiny_export, "adapter", "unsloth_model")
        assert server.models["unsloth_model"] == server.models["tiny_model"]
        reply = client.generate(model="unsloth_model", prompt="Hello?", options={"num_predict": 4, "temperature": 0})
        assert reply.eval_count and reply.eval_count > 0
    assert copy_command("tiny_model", "unsloth_model") == "ollama cp tiny_model unsloth_model"


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


@pytest.mark.parametrize(("given", "url"), [
    ("127.0.0.1", "http://127.0.0.1:11434"), ("localhost", "http://localhost:11434"),
    ("0.0.0.0", "http://0.0.0.0:11434"), ("127.0.0.1:1234", "http://127.0.0.1:1234"),
    ("http://h:1", "http://h:1"), ("https://h", "https://h"),
])
def test_ollama_host_without_a_port_means_11434_as_for_the_official_client(monkeypatch, given, url):
    """``OLLAMA_HOST=127.0.0.1`` is port 11434 to ``ollama run``; probing port 80 instead found no
    server and skipped the registration silently."""
    monkeypatch.setenv("OLLAMA_HOST", given)
    assert ollama_host(None) == url == str(ollama.Client()._client.base_url).rstrip("/")
    monkeypatch.delenv("OLLAMA_HOST")
    assert ollama_host(given) == url


def test_blobs_the_server_already_holds_are_not_uploaded_again(tiny_export, tmp_path: Path):
    with OllamaStandIn(tmp_path / "blobs") as server:
        client = ollama.Client(host=server.url)
        register(client, tiny_export, "adapter", "Hello?", 8, {})
        first = list(server.requests)
        register(client, tiny_export, "adapter", "Hello?", 8, {})   # a new serve: nothing remembered locally
        second = server.requests[len(first):]
    def uploads(requests):
        return [path for method, path in requests if method == "POST" and path.startswith("/api/blobs/")]
    def asked(requests):
        return [path for method, path in requests if method == "HEAD" and path.startswith("/api/blobs/")]
    assert len(uploads(first)) == 2 and len(asked(first)) == 2     # asked, then uploaded base and adapter
    assert uploads(second) == [] and len(asked(second)) == 2        # asked, and the server had them


def test_the_registration_reports_the_weights_the_server_received(tiny_export, tmp_path: Path):
    """``serve.weights: merged`` without a merged GGUF registers base + ADAPTER, and says so."""
    no_merged = dataclasses.replace(tiny_export, merged_gguf=None)
    assert no_merged.form("merged") == "adapter"
    assert (tiny_export.form("merged") == "merged"
            and tiny_export.form("adapter") == "adapter")
    with OllamaStandIn(tmp_path / "blobs") as server:
        result = register(ollama.Client(host=server.url), no_merged, "merged", "Hello?", 8, {})
        assert result.weights == "adapter" and "ADAPTER attached" in result.show_check
        assert set(server.models["tiny_model"]["adapters"]) == {"adapter.gguf"}


def test_a_server_error_is_described_in_one_line(tiny_export, tmp_path: Path):
    with OllamaStandIn(tmp_path / "blobs", create_status=500) as server:
        with pytest.raises(ollama.ResponseError) as caught:
            register(ollama.Client(host=server.url), tiny_export, "adapter", "Hello?", 8, {})
    line = server_failure(server.url, "tiny_model", caught.value)
    assert "\n" not in line and "(HTTP 500)" in line and "internal server error" in line and "tiny_model" in line
